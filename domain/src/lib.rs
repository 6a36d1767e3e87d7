//! Faultline's pure domain model: plans, faults, targets, safety interlocks and the signed
//! command envelope. No I/O lives here: time, randomness and storage are passed in, so every
//! rule is a plain function that table tests can pin down.

pub mod command;
pub mod duration;
pub mod fault;
pub mod interlock;
pub mod plan;
pub mod preflight;
pub mod probe;
