//! Network namespaces, identified by inode so a recorded namespace can be recognised later (a
//! pid can be reused; an inode of a live namespace cannot).

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Failures entering or identifying a namespace, with the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("reading network namespace {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "network namespace at {path} is now inode {found}, not the recorded {expected}: the namespace it named is gone"
    )]
    Replaced {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
}

/// A network namespace: where to open it and which one it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Netns {
    /// `/proc/<pid>/ns/net` or a bind mount such as `/run/netns/<name>`.
    pub path: PathBuf,
    /// Inode number of the namespace (what `ip netns identify` and `lsns` show).
    pub inode: u64,
}

impl Netns {
    /// The namespace at `path`.
    pub fn from_path(path: impl Into<PathBuf>) -> Result<Self, NetnsError> {
        let path = path.into();
        let inode = inode_of(&path)?;
        Ok(Self { path, inode })
    }

    /// The namespace of process `pid`.
    pub fn of_pid(pid: u32) -> Result<Self, NetnsError> {
        Self::from_path(format!("/proc/{pid}/ns/net"))
    }

    /// The agent's own namespace.
    pub fn current() -> Result<Self, NetnsError> {
        Self::from_path("/proc/self/ns/net")
    }

    /// A named namespace made with `ip netns add NAME`.
    pub fn named(name: &str) -> Result<Self, NetnsError> {
        Self::from_path(Path::new("/run/netns").join(name))
    }

    /// True when this is the agent's own namespace: faults there could cut the agent off.
    pub fn is_agents_own(&self) -> bool {
        Self::current().is_ok_and(|me| me.inode == self.inode)
    }

    /// Opens the namespace, checking it is still the recorded one.
    pub fn open(&self) -> Result<File, NetnsError> {
        let file = File::open(&self.path).map_err(|source| NetnsError::Read {
            path: self.path.clone(),
            source,
        })?;
        let found = file
            .metadata()
            .map_err(|source| NetnsError::Read {
                path: self.path.clone(),
                source,
            })?
            .ino();
        if found != self.inode {
            return Err(NetnsError::Replaced {
                path: self.path.clone(),
                expected: self.inode,
                found,
            });
        }
        Ok(file)
    }

    /// True while the recorded namespace still exists at its path.
    pub fn still_exists(&self) -> bool {
        inode_of(&self.path).is_ok_and(|inode| inode == self.inode)
    }

    /// Moves the CALLING THREAD into this namespace (network namespaces are per thread). Use on
    /// a dedicated thread only, never on a tokio worker.
    pub fn enter_current_thread(&self) -> Result<(), NetnsError> {
        let file = self.open()?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
            NetnsError::Enter {
                path: self.path.clone(),
                source,
            }
        })
    }
}

/// Every network namespace on the host that has a process in it or a name under /run/netns,
/// each once (by inode). Used by the start-up sweep.
pub fn all() -> Vec<Netns> {
    let mut seen = std::collections::BTreeMap::new();
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(Result::ok);
    let procs = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        });
    for path in named
        .map(|e| e.path())
        .chain(procs.map(|e| e.path().join("ns/net")))
    {
        if let Ok(netns) = Netns::from_path(&path) {
            seen.entry(netns.inode).or_insert(netns);
        }
    }
    seen.into_values().collect()
}

fn inode_of(path: &Path) -> Result<u64, NetnsError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| NetnsError::Read {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_namespaces_include_our_own_once() {
        let me = Netns::current().unwrap();
        let all = all();
        assert_eq!(all.iter().filter(|n| n.inode == me.inode).count(), 1);
    }

    #[test]
    fn own_namespace_is_recognised_by_inode() {
        let me = Netns::current().unwrap();
        assert!(me.is_agents_own());
        assert!(me.still_exists());
        let by_pid = Netns::of_pid(std::process::id()).unwrap();
        assert_eq!(by_pid.inode, me.inode);
        let stale = Netns {
            path: me.path.clone(),
            inode: me.inode + 1,
        };
        assert!(matches!(stale.open(), Err(NetnsError::Replaced { .. })));
        assert!(!stale.still_exists());
    }
}
