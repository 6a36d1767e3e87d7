//! The write-ahead journal: before the agent changes anything on its host it durably records
//! the fault and how to undo it. An entry is removed only once the revert succeeded, so after
//! a crash, a restart finds every fault that may still be in force and reverts it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use faultline_domain::fault::FaultSpec;
use serde::{Deserialize, Serialize};

use crate::faults::{Resolved, Undo};

/// One fault that may be in force on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub fault_id: String,
    pub command_id: String,
    pub run_id: String,
    pub spec: FaultSpec,
    /// The concrete objects the fault acts on, resolved at apply time.
    pub resolved: Resolved,
    /// Exactly how to undo it, computed before anything changed.
    pub undo: Undo,
    /// Which mechanism applied it (e.g. "docker pause", "iptables-nft statistic").
    pub mechanism: String,
    pub journaled_at_ms: i64,
}

/// Journal failures, with the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("creating journal directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing journal entry {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("removing journal entry {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading journal {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal entry {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// A directory of entries, one JSON file per fault.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens (creating) the journal under `state_dir/journal`.
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        let dir = state_dir.join("journal");
        fs::create_dir_all(&dir).map_err(|source| JournalError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    fn path_of(&self, fault_id: &str) -> PathBuf {
        // Fault ids contain '/', so encode them into a safe, reversible-enough file name.
        self.dir
            .join(format!("{}.json", hex::encode(fault_id.as_bytes())))
    }

    /// Durably records `entry` (write to a temporary file, fsync, rename, fsync the directory)
    /// so a crash at any point leaves either the old or the new entry, never half of one.
    pub fn record(&self, entry: &JournalEntry) -> Result<(), JournalError> {
        let path = self.path_of(&entry.fault_id);
        let tmp = path.with_extension("tmp");
        let werr = |source| JournalError::Write {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(entry).map_err(|e| werr(std::io::Error::other(e)))?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(werr)?;
        file.write_all(&bytes).map_err(werr)?;
        file.sync_all().map_err(werr)?;
        fs::rename(&tmp, &path).map_err(werr)?;
        sync_dir(&self.dir).map_err(werr)
    }

    /// Forgets a fault after its revert succeeded. Removing a missing entry is fine.
    pub fn remove(&self, fault_id: &str) -> Result<(), JournalError> {
        let path = self.path_of(fault_id);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir).map_err(|source| JournalError::Remove { path, source }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(JournalError::Remove { path, source }),
        }
    }

    /// Every entry on disk. A corrupt entry is an error, not skipped: it may be a fault
    /// still in force, and an operator must look at it.
    pub fn entries(&self) -> Result<Vec<JournalEntry>, JournalError> {
        let rerr = |source| JournalError::Read {
            path: self.dir.clone(),
            source,
        };
        let mut entries = Vec::new();
        for item in fs::read_dir(&self.dir).map_err(rerr)? {
            let path = item.map_err(rerr)?.path();
            if path.extension().is_some_and(|ext| ext == "tmp") {
                // An interrupted write: its fault was never applied (we apply after rename).
                let _ = fs::remove_file(&path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            let bytes = fs::read(&path).map_err(|source| JournalError::Read {
                path: path.clone(),
                source,
            })?;
            let entry = serde_json::from_slice(&bytes).map_err(|source| JournalError::Corrupt {
                path: path.clone(),
                source,
            })?;
            entries.push(entry);
        }
        entries.sort_by_key(|entry: &JournalEntry| entry.journaled_at_ms);
        Ok(entries)
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use faultline_domain::fault::{FaultKind, TargetSelector};

    use super::*;
    use crate::faults::container::ContainerUndo;
    use crate::runtime::ContainerRef;

    fn entry(fault_id: &str, at: i64) -> JournalEntry {
        JournalEntry {
            fault_id: fault_id.into(),
            command_id: "c".into(),
            run_id: "r".into(),
            spec: FaultSpec {
                kind: FaultKind::ContainerPause,
                target: TargetSelector::Container("db".into()),
                duration: Duration::from_secs(3),
            },
            resolved: Resolved {
                container: Some(ContainerRef {
                    id: "abc".into(),
                    name: "db".into(),
                }),
                ..Default::default()
            },
            undo: Undo::Container(ContainerUndo::Unpause { id: "abc".into() }),
            mechanism: "docker pause".into(),
            journaled_at_ms: at,
        }
    }

    #[test]
    fn entries_survive_reopening_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal.record(&entry("run/stage/0", 2)).unwrap();
        journal.record(&entry("run/stage/1", 1)).unwrap();
        let reopened = Journal::open(dir.path()).unwrap();
        let ids: Vec<_> = reopened
            .entries()
            .unwrap()
            .into_iter()
            .map(|e| e.fault_id)
            .collect();
        assert_eq!(ids, ["run/stage/1", "run/stage/0"], "oldest first");
        reopened.remove("run/stage/1").unwrap();
        reopened.remove("run/stage/1").unwrap();
        assert_eq!(reopened.entries().unwrap(), vec![entry("run/stage/0", 2)]);
    }

    #[test]
    fn entry_files_are_private_and_leftover_temporaries_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal.record(&entry("f", 1)).unwrap();
        let file = journal.path_of("f");
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::write(file.with_extension("tmp"), b"half").unwrap();
        assert_eq!(journal.entries().unwrap().len(), 1);
        assert!(!file.with_extension("tmp").exists());
    }

    #[test]
    fn a_corrupt_entry_is_reported_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        fs::write(journal.path_of("bad"), b"{not json").unwrap();
        assert!(matches!(
            journal.entries(),
            Err(JournalError::Corrupt { .. })
        ));
    }
}
