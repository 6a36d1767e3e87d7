//! File names inside a Faultline certificate directory, and loading of the command-signing keys.
//!
//! One directory layout is shared by `faultline certs init`, the coordinator, agents and the
//! CLI, so that every component finds its files from the directory path alone.

use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::TlsError;
use crate::identity::Role;
use crate::pem::Zeroizing;

/// A certificate directory and the names of the files in it.
#[derive(Debug, Clone)]
pub struct CertDir {
    root: PathBuf,
}

impl CertDir {
    /// A certificate directory rooted at `root` (nothing is read or created).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// CA certificate, trusted by every component: `ca.pem`.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }

    /// CA private key, needed only to issue more certificates: `ca.key`.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }

    /// Coordinator certificate: `coordinator.pem`.
    pub fn coordinator_cert(&self) -> PathBuf {
        self.root.join("coordinator.pem")
    }

    /// Coordinator private key: `coordinator.key`.
    pub fn coordinator_key(&self) -> PathBuf {
        self.root.join("coordinator.key")
    }

    /// Certificate of agent `name`: `agent-NAME.pem`.
    pub fn agent_cert(&self, name: &str) -> PathBuf {
        self.root.join(format!("agent-{name}.pem"))
    }

    /// Private key of agent `name`: `agent-NAME.key`.
    pub fn agent_key(&self, name: &str) -> PathBuf {
        self.root.join(format!("agent-{name}.key"))
    }

    /// Operator certificate: `operator.pem` (the operator's name lives in the certificate).
    pub fn operator_cert(&self) -> PathBuf {
        self.root.join("operator.pem")
    }

    /// Operator private key: `operator.key`.
    pub fn operator_key(&self) -> PathBuf {
        self.root.join("operator.key")
    }

    /// Command-signing private key (ed25519, PKCS#8 PEM): `command-signing.key`.
    pub fn signing_key(&self) -> PathBuf {
        self.root.join("command-signing.key")
    }

    /// Command-signing public key (ed25519, SPKI PEM): `command-signing.pub`.
    pub fn verifying_key(&self) -> PathBuf {
        self.root.join("command-signing.pub")
    }

    /// Certificate and key of a role: Agent needs the name; Operator and Coordinator ignore it.
    pub fn identity_files(&self, role: Role, name: &str) -> (PathBuf, PathBuf) {
        match role {
            Role::Coordinator => (self.coordinator_cert(), self.coordinator_key()),
            Role::Agent => (self.agent_cert(name), self.agent_key(name)),
            Role::Operator => (self.operator_cert(), self.operator_key()),
        }
    }
}

/// Reads a file to a string, naming the file and the purpose in the error.
pub(crate) fn read_text(path: &Path, action: &'static str) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        action,
        path: path.to_owned(),
        source,
    })
}

/// Loads the coordinator's command-signing key (ed25519, PKCS#8 PEM).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, TlsError> {
    // Zeroize the PEM text once decoded: it is the most sensitive secret Faultline has.
    let pem = Zeroizing::new(read_text(path, "read command-signing key")?);
    SigningKey::from_pkcs8_pem(pem.as_str()).map_err(|e| TlsError::BadPem {
        path: path.to_owned(),
        what: "ed25519 PKCS#8 private key",
        reason: e.to_string(),
    })
}

/// Loads the command-verifying key (ed25519, SPKI PEM) that agents check commands against.
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, TlsError> {
    let pem = read_text(path, "read command-verifying key")?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| TlsError::BadPem {
        path: path.to_owned(),
        what: "ed25519 SPKI public key",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        let dir = CertDir::new("/etc/faultline");
        assert_eq!(dir.root(), Path::new("/etc/faultline"));
        assert_eq!(dir.ca_cert(), Path::new("/etc/faultline/ca.pem"));
        assert_eq!(dir.ca_key(), Path::new("/etc/faultline/ca.key"));
        assert_eq!(
            dir.agent_cert("web-1"),
            Path::new("/etc/faultline/agent-web-1.pem")
        );
        assert_eq!(
            dir.agent_key("web-1"),
            Path::new("/etc/faultline/agent-web-1.key")
        );
        assert_eq!(
            dir.signing_key(),
            Path::new("/etc/faultline/command-signing.key")
        );
        assert_eq!(
            dir.verifying_key(),
            Path::new("/etc/faultline/command-signing.pub")
        );
        assert_eq!(
            dir.identity_files(Role::Agent, "a"),
            (dir.agent_cert("a"), dir.agent_key("a"))
        );
        assert_eq!(
            dir.identity_files(Role::Operator, "ignored"),
            (dir.operator_cert(), dir.operator_key())
        );
        assert_eq!(
            dir.identity_files(Role::Coordinator, "ignored"),
            (dir.coordinator_cert(), dir.coordinator_key())
        );
    }

    #[test]
    fn missing_key_file_names_the_path() {
        let err = load_signing_key(Path::new("/nonexistent/command-signing.key")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/command-signing.key"),
            "{err}"
        );
        let err = load_verifying_key(Path::new("/nonexistent/command-signing.pub")).unwrap_err();
        assert!(err.to_string().contains("command-signing.pub"), "{err}");
    }

    #[test]
    fn garbage_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "hello").unwrap();
        assert!(matches!(
            load_signing_key(&path),
            Err(TlsError::BadPem { .. })
        ));
        assert!(matches!(
            load_verifying_key(&path),
            Err(TlsError::BadPem { .. })
        ));
    }
}
