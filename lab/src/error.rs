//! The lab's error type: every variant says what was being done, to what.

use std::path::PathBuf;
use std::time::Duration;

/// Why a lab operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A program could not be started at all (usually: not installed).
    #[error("could not run `{command}`: {source}{hint}")]
    Spawn {
        /// The command line, for the message.
        command: String,
        /// Extra advice appended to the message (may be empty).
        hint: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A program ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its trimmed standard error.
        stderr: String,
    },
    /// A program did not finish in time (and was killed).
    #[error("`{command}` did not finish within {timeout:?}")]
    CommandTimeout {
        /// The command line.
        command: String,
        /// The limit it exceeded.
        timeout: Duration,
    },
    /// A file-system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "creating the work directory".
        action: String,
        /// The path it was done to.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// `ldd` could not list a binary's libraries.
    #[error("listing the shared libraries of {binary} with ldd: {reason}")]
    Ldd {
        /// The binary.
        binary: String,
        /// ldd's complaint.
        reason: String,
    },
    /// A Faultline binary the lab needs is missing.
    #[error("{} not found; {hint}", path.display())]
    MissingBinary {
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        hint: String,
    },
    /// Certificates could not be created or loaded.
    #[error("{action}: {source}")]
    Tls {
        /// What was being done.
        action: String,
        /// The TLS layer's error.
        #[source]
        source: faultline_tls::TlsError,
    },
    /// A gRPC call to the coordinator failed.
    #[error("{action}: {status}")]
    Rpc {
        /// Which call, for what.
        action: String,
        /// The status returned (boxed: tonic's Status is large).
        status: Box<tonic::Status>,
    },
    /// A lab process misbehaved (exited early, printed something unexpected...).
    #[error("{what}: {detail}")]
    Process {
        /// Which process, doing what.
        what: String,
        /// What happened, with pointers to its log.
        detail: String,
    },
    /// Something the lab waits for did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        after: Duration,
    },
    /// Docker objects with the lab's names exist but are not the lab's (not labelled): the lab
    /// would have to remove someone else's containers, so it touches nothing.
    #[error(
        "{what} already exist(s) on this Docker Engine but not labelled faultline.lab=1, so \
         they are not the lab's; nothing was changed. Rename or remove them (docker rm -f \
         NAME), then run `faultline lab up` again"
    )]
    Conflict {
        /// The objects, e.g. `container postgres, container redis`.
        what: String,
    },
    /// A service of the demo stack did not become healthy in time.
    #[error(
        "demo stack service {service} is not up after {after:?}: {detail}\n\
         last log lines of container {service}:\n{logs}"
    )]
    Unhealthy {
        /// The service (also its container name).
        service: String,
        /// What its last check saw.
        detail: String,
        /// How long it was waited for.
        after: Duration,
        /// The container's last log lines.
        logs: String,
    },
}

impl LabError {
    /// An [`LabError::Io`] error.
    pub(crate) fn io(
        action: impl Into<String>,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action: action.into(),
            path: path.into(),
            source,
        }
    }
}
