//! The single error type of this crate.
//!
//! Every variant carries enough context (the file involved, what was being done) for an operator
//! to act on the message without a debugger: these errors end up in CLI output and logs.

use std::path::PathBuf;

/// Everything that can go wrong while creating, loading or using Faultline TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A filesystem operation on a certificate or key file failed.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What was being attempted, e.g. "read CA certificate".
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A file that `certs init` (or leaf issuance) would write already exists and `force` was
    /// not given; nothing has been written.
    #[error(
        "refusing to overwrite existing file {} (nothing was written; use --force to replace \
         the whole set)",
        path.display()
    )]
    AlreadyExists {
        /// The first existing file found.
        path: PathBuf,
    },

    /// An agent or operator name does not satisfy the naming rule.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// Which kind of name was checked ("agent", "operator", ...).
        what: &'static str,
        /// The offending name.
        name: String,
        /// Why it was refused.
        reason: String,
    },

    /// The same agent name was given twice.
    #[error("agent name {name:?} was given more than once")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },

    /// A coordinator host for the certificate's subject alternative names is not a valid DNS
    /// name or IP address.
    #[error("invalid coordinator host {host:?} for the certificate: {reason}")]
    InvalidHost {
        /// The offending host.
        host: String,
        /// Why it was refused.
        reason: String,
    },

    /// The options given to certificate generation are unusable.
    #[error("invalid certificate options: {reason}")]
    InvalidOptions {
        /// What is wrong.
        reason: String,
    },

    /// rcgen failed to build or sign a certificate or key.
    #[error("could not {action}: {source}")]
    CertGeneration {
        /// What was being generated, e.g. "sign certificate for agent/agent-1".
        action: String,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },

    /// A PEM file did not contain what it should (no certificate, no private key, bad
    /// encoding).
    #[error("{} does not hold a valid {what}: {reason}", path.display())]
    BadPem {
        /// The file that was read.
        path: PathBuf,
        /// What was expected in it, e.g. "certificate" or "ed25519 PKCS#8 private key".
        what: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// A DER certificate could not be parsed as X.509.
    #[error("could not parse {context} as an X.509 certificate: {reason}")]
    CertParse {
        /// Which certificate was being parsed.
        context: String,
        /// The parser's complaint.
        reason: String,
    },

    /// A role name is not one of `coordinator`, `agent`, `operator`.
    #[error("unknown role {role:?} (expected coordinator, agent or operator)")]
    UnknownRole {
        /// The string that was parsed.
        role: String,
    },

    /// A certificate parsed fine but does not carry exactly one valid Faultline identity.
    #[error("certificate is not a Faultline identity: {reason}")]
    NotFaultlineIdentity {
        /// What is missing or wrong.
        reason: String,
    },

    /// A certificate carries a valid Faultline identity, but not the one required here.
    #[error("{} holds identity {found}, but {expected} was required", path.display())]
    WrongIdentity {
        /// The certificate file.
        path: PathBuf,
        /// The identity found in it.
        found: String,
        /// The identity (or role) that was required.
        expected: String,
    },

    /// Encoding a key to PEM failed.
    #[error("could not encode {what}: {reason}")]
    KeyEncoding {
        /// Which key was being encoded.
        what: &'static str,
        /// The encoder's complaint.
        reason: String,
    },

    /// rustls refused a configuration (bad key, unsupported protocol set, ...).
    #[error("could not {action}: {source}")]
    Rustls {
        /// What was being configured.
        action: &'static str,
        /// The underlying rustls error.
        #[source]
        source: rustls::Error,
    },

    /// rustls could not build a certificate verifier from the CA file.
    #[error("could not build a certificate verifier from {}: {source}", path.display())]
    Verifier {
        /// The CA certificate file the verifier trusts.
        path: PathBuf,
        /// The underlying rustls error.
        #[source]
        source: rustls::client::VerifierBuilderError,
    },

    /// The coordinator URL is unusable.
    #[error("invalid coordinator URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },

    /// None of several coordinator replicas accepted a connection (standbys do not listen).
    #[error("no coordinator reachable: {tried}")]
    NoCoordinator {
        /// Each URL tried with why it failed, `; `-separated.
        tried: String,
    },

    /// tonic refused the endpoint or TLS configuration.
    #[error("could not set up a gRPC channel to {url}: {source}")]
    Transport {
        /// The coordinator URL.
        url: String,
        /// The underlying tonic error.
        #[source]
        source: tonic::transport::Error,
    },
}
