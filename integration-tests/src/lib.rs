//! Shared fixtures for Faultline's end-to-end tests.

pub mod cluster;
pub mod docker;
pub mod lab;
pub mod netclient;
pub mod postgres;
pub mod redis;
pub mod scripted;
pub mod snapshot;
