//! Faultline's mutual-TLS plumbing.
//!
//! Every Faultline component talks to the coordinator over gRPC protected by mutual TLS, and the
//! caller's role is taken from its client certificate, never from a message field. This crate
//! owns everything needed for that:
//!
//! * [`pki`]: the small private CA behind `faultline certs init` (CA, coordinator, agent and
//!   operator certificates plus the ed25519 command-signing key pair);
//! * [`layout`]: where those files live inside a certificate directory, and loading the
//!   command-signing keys;
//! * [`identity`]: the `spiffe://faultline/<role>/<name>` identity carried in certificates and
//!   how tonic handlers read it from a request;
//! * [`server`]: the coordinator's TLS 1.3, client-certificate-required acceptor that feeds
//!   `tonic::transport::Server::serve_with_incoming` and reports refused handshakes for audit;
//! * [`client`]: tonic channels that present a Faultline identity and accept only the
//!   coordinator as the server.

pub mod client;
pub mod error;
pub mod identity;
pub mod layout;
mod pem;
pub mod pki;
pub mod server;

pub use error::TlsError;
