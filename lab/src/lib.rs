//! Local lab: images built from host content, demo containers, local clusters.
//!
//! Everything a game-day on one machine needs, with nothing pulled from a registry:
//!
//! * [`image`]: container images assembled `FROM scratch` out of host binaries and the shared
//!   libraries `ldd` lists for them, built once per tag;
//! * [`docker`]: the docker CLI calls the lab makes (run, inspect, remove, list by label),
//!   each bounded by a timeout so a wedged engine fails instead of hanging;
//! * [`fleet`]: a fleet on the Docker Engine — a coordinator and N agent hosts, each its own
//!   container with its own address on a private network (`faultline lab up|down|status`);
//! * [`stack`]: the demo stack on that fleet — PostgreSQL, Redis, the order API, nginx and a
//!   load generator, named as the plans in `examples/game-day/` expect;
//! * [`local`]: a local cluster of real processes — certificates, a coordinator on a free
//!   loopback port and N agents, each with its own identity, state directory and log — that
//!   is stopped in a safe order (agents first, so they revert their faults) on teardown or drop.
//!
//! The docker CLI is used rather than the Engine API: `docker build` on a directory is far
//! simpler than uploading a tar context, and `Drop` needs a synchronous way to remove things.

pub mod docker;
mod error;
pub mod fleet;
pub mod image;
pub mod local;
pub mod stack;

pub use error::LabError;
