//! Resource faults through the target's cgroup: CPU throttling, memory and pids limits, block-IO
//! throttling and freezing, on cgroup v1, v2 and systemd's hybrid layout.
//!
//! The flow is plan → journal the undo → [`apply`] → [`verify`] → … → [`undo`]:
//! - [`CgroupLayout`] says how cgroups are mounted (detected from mountinfo, never assumed);
//! - [`CgroupRef`] is the target's cgroup, one directory per v1 controller and/or one unified one;
//! - [`plan`] only *reads*: it computes the exact writes and, from the values in force before,
//!   the exact writes that restore them ([`CgroupUndo`], journaled before anything changes);
//! - [`apply`] writes, rolling back its own partial work on failure;
//! - [`undo`] writes the previous values back; it is idempotent and reports "cgroup gone" when
//!   the target's cgroup was removed in the meantime (container deleted).
//!
//! Every path is taken from the layout, so the v2 logic is tested against a temporary directory
//! shaped like a cgroup2 tree, and the v1 logic for real on this project's hybrid hosts.

mod cgref;
pub mod device;
mod layout;
mod ops;

use std::path::PathBuf;

pub use cgref::{CgroupRef, ProcCgroupLine, parse_proc_cgroup, read_procs};
pub use layout::{CgroupLayout, MountEntry, Version, parse_dev, parse_mountinfo, read_controllers};
pub use ops::{CgroupPlan, CgroupUndo, RestoreWrite, apply, plan, undo, verify};

/// Failures, each with the file and the operation.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("{path}: unexpected content {content:?}: {detail}")]
    Parse {
        path: PathBuf,
        content: String,
        detail: String,
    },
    #[error("no cgroup filesystem is mounted (mountinfo has neither cgroup nor cgroup2)")]
    NotMounted,
    #[error("{fault} is not possible here: {reason}")]
    Unsupported { fault: String, reason: String },
    #[error("{fault} refused: {reason}")]
    Refused { fault: String, reason: String },
    #[error("invalid {fault}: {reason}")]
    Invalid { fault: String, reason: String },
    #[error("process {pid}: {detail}")]
    Process { pid: u32, detail: String },
    #[error("cgroup {path} does not exist")]
    Missing { path: PathBuf },
    #[error("{failed}; rolled back what was written before: {rollback}")]
    RolledBack {
        failed: Box<CgroupError>,
        rollback: String,
    },
    #[error("restoring {} value(s) failed: {}", .failures.len(), .failures.join("; "))]
    Restore { failures: Vec<String> },
}
