//! Faultline's eBPF telemetry programs and loaders.
//!
//! Placeholder: the CO-RE programs (TCP state, run-queue latency, OOM kills, exec/exit, block IO)
//! and their libbpf-rs skeletons arrive with the telemetry issue. Nothing here is used yet.
