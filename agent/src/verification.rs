//! The outcome of checking a fault in force, shared by every fault backend (network rules and
//! qdiscs, cgroup limits, stressors, stopped processes).

/// Whether a fault is in force, and the evidence read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// The fault is in force (values read back as set, rules counting, processes stopped...).
    pub effective: bool,
    /// What was read, for the report.
    pub detail: String,
}
