//! Errors, with the context needed to act on them.

use std::io;
use std::path::{Path, PathBuf};

use crate::Group;

/// Everything that can go wrong loading programs, reading their maps or reading fallbacks.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// A libbpf operation failed.
    #[error("{context}: {source}")]
    Libbpf {
        /// What was being done.
        context: String,
        /// libbpf's error.
        #[source]
        source: libbpf_rs::Error,
    },
    /// Reading or writing a file failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A kernel interface returned something this crate cannot parse.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which interface.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A cgroup path that is not a plain relative path.
    #[error("invalid cgroup path {}: it must not contain `..`", path.display())]
    InvalidCgroupPath {
        /// The path.
        path: PathBuf,
    },
    /// The operation needs a group that is not loaded.
    #[error("the {group} programs are not loaded")]
    NotLoaded {
        /// The group.
        group: Group,
    },
    /// The scope filter map is full.
    #[error("scope filter of the {group} programs is full ({max} cgroups)")]
    ScopeFull {
        /// The group.
        group: Group,
        /// Its capacity.
        max: u32,
    },
}

impl BpfError {
    pub(crate) fn io(what: &'static str, path: &Path, source: io::Error) -> Self {
        BpfError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn libbpf(context: impl Into<String>) -> impl FnOnce(libbpf_rs::Error) -> Self {
        let context = context.into();
        move |source| BpfError::Libbpf { context, source }
    }
}
