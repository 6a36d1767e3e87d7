//! Shared fixtures for Faultline's end-to-end tests.

pub mod cluster;
pub mod docker;
pub mod scripted;
pub mod snapshot;
