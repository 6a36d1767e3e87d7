//! Resource faults through cgroup files (cpu, memory, io, pids, freezer) with exact restore of
//! the previous values, and stressors placed inside the target's cgroup(s).

use std::path::Path;

use faultline_domain::fault::FaultKind;

use crate::cgroup::{self, CgroupLayout, CgroupPlan, CgroupRef, CgroupUndo};
use crate::stress::{self, StressPlan, StressorUndo};

/// Computes the cgroup writes and their exact restores. Reads only.
pub fn prepare_limits(
    layout: &CgroupLayout,
    cgroup: &CgroupRef,
    kind: &FaultKind,
) -> Result<CgroupPlan, String> {
    cgroup::plan(layout, cgroup, kind).map_err(|e| e.to_string())
}

pub fn apply_limits(plan: &CgroupPlan) -> Result<(), String> {
    cgroup::apply(plan).map_err(|e| e.to_string())
}

/// Reads the values back (and samples throttling counters for up to ~2 s, so off the runtime's
/// worker threads).
pub async fn verify_limits(undo: &CgroupUndo, kind: &FaultKind) -> Result<(bool, String), String> {
    let (undo, kind) = (undo.clone(), kind.clone());
    tokio::task::spawn_blocking(move || cgroup::verify(&undo, &kind))
        .await
        .map_err(|e| format!("cgroup verification task failed: {e}"))?
        .map(|v| (v.effective, v.detail))
        .map_err(|e| e.to_string())
}

pub fn undo_limits(undo: &CgroupUndo) -> Result<String, String> {
    cgroup::undo(undo).map_err(|e| e.to_string())
}

/// Computes a stressor: the child's command line or the file to fill. Reads only.
pub fn prepare_stressor(
    kind: &FaultKind,
    cgroup: &CgroupRef,
    target_pid: u32,
    tag: &str,
    agent_exe: &Path,
) -> Result<StressPlan, String> {
    stress::plan(kind, cgroup, target_pid, tag, agent_exe).map_err(|e| e.to_string())
}

/// Starts the stressor; the plan's undo then also lists the processes started.
pub async fn apply_stressor(plan: &mut StressPlan) -> Result<(), String> {
    stress::apply(plan).await.map_err(|e| e.to_string())
}

pub async fn verify_stressor(
    undo: &StressorUndo,
    cgroup: &CgroupRef,
) -> Result<(bool, String), String> {
    stress::verify(undo, cgroup)
        .await
        .map(|v| (v.effective, v.detail))
        .map_err(|e| e.to_string())
}

pub async fn undo_stressor(undo: &StressorUndo) -> Result<String, String> {
    stress::undo(undo).await.map_err(|e| e.to_string())
}
