//! The durable replay ledger: every admitted command's nonce is appended (and fsynced) before
//! the command is obeyed, so a replayed command is refused even after the agent restarts.
//! Entries are forgotten once their command has expired; the file is compacted on open.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use faultline_domain::command::ReplayLedger;

/// Ledger failures, with the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("reading nonce ledger {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing nonce ledger {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Nonces seen, in memory and on disk.
#[derive(Debug)]
pub struct DurableLedger {
    path: PathBuf,
    file: File,
    ledger: ReplayLedger,
}

impl DurableLedger {
    /// Loads `state_dir/nonces.log`, drops expired entries and rewrites it compactly.
    pub fn open(state_dir: &Path, now_ms: i64) -> Result<Self, LedgerError> {
        let path = state_dir.join("nonces.log");
        let mut ledger = ReplayLedger::default();
        match fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines() {
                    // A torn last line (crash mid-append) is skipped: its command was not
                    // obeyed, because obeying waits for the fsync.
                    let Some((nonce, not_after)) = line.split_once(' ') else {
                        continue;
                    };
                    let (Ok(nonce), Ok(not_after)) = (hex::decode(nonce), not_after.parse()) else {
                        continue;
                    };
                    ledger.record(nonce, not_after);
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(LedgerError::Read { path, source }),
        }
        ledger.prune(now_ms);
        let werr = |source| LedgerError::Write {
            path: path.clone(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let mut compact = String::new();
        for (nonce, not_after) in ledger.entries() {
            compact.push_str(&format!("{} {not_after}\n", hex::encode(nonce)));
        }
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(werr)?;
        out.write_all(compact.as_bytes()).map_err(werr)?;
        out.sync_all().map_err(werr)?;
        fs::rename(&tmp, &path).map_err(werr)?;
        let file = OpenOptions::new()
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(werr)?;
        Ok(Self { path, file, ledger })
    }

    pub fn contains(&self, nonce: &[u8]) -> bool {
        self.ledger.contains(nonce)
    }

    /// Records a nonce durably. Only after this returns may the command be obeyed.
    pub fn record(
        &mut self,
        nonce: &[u8],
        not_after_ms: i64,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        let line = format!("{} {not_after_ms}\n", hex::encode(nonce));
        let werr = |source| LedgerError::Write {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(line.as_bytes()).map_err(werr)?;
        self.file.sync_data().map_err(werr)?;
        self.ledger.record(nonce.to_vec(), not_after_ms);
        self.ledger.prune(now_ms);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_survive_restart_until_their_command_expires() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = DurableLedger::open(dir.path(), 1_000).unwrap();
        ledger.record(&[1; 16], 10_000, 1_000).unwrap();
        ledger.record(&[2; 16], 500_000, 1_000).unwrap();
        drop(ledger);

        let reopened = DurableLedger::open(dir.path(), 2_000).unwrap();
        assert!(reopened.contains(&[1; 16]));
        assert!(reopened.contains(&[2; 16]));
        drop(reopened);

        // Long after the first command expired, its nonce is forgotten and compacted away.
        let later = DurableLedger::open(dir.path(), 200_000).unwrap();
        assert!(!later.contains(&[1; 16]));
        assert!(later.contains(&[2; 16]));
        let text = fs::read_to_string(dir.path().join("nonces.log")).unwrap();
        assert_eq!(text.lines().count(), 1);
    }

    #[test]
    fn a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let good = format!("{} 99999\n{}", hex::encode([3u8; 16]), "abcd");
        fs::write(dir.path().join("nonces.log"), good).unwrap();
        let ledger = DurableLedger::open(dir.path(), 1_000).unwrap();
        assert!(ledger.contains(&[3; 16]));
    }
}
