//! Loading PEM certificates and keys from a certificate directory for rustls.

use std::path::Path;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsError;
use crate::identity::{PeerIdentity, identity_from_cert_der};

/// All certificates in a PEM file (leaf first); at least one is required.
pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path, "read certificate")?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, "certificate", e.to_string()))?;
    if certs.is_empty() {
        return Err(bad(
            path,
            "certificate",
            "no CERTIFICATE block found".to_owned(),
        ));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub(crate) fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = Zeroizing::new(read(path, "read private key")?);
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| bad(path, "private key", e.to_string()))
}

/// A root store holding the certificates of `ca.pem`, and nothing else: Faultline trusts only
/// its own CA, never the system roots.
pub(crate) fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| bad(path, "CA certificate", e.to_string()))?;
    }
    Ok(roots)
}

/// The Faultline identity of the leaf certificate in `path`.
pub(crate) fn cert_file_identity(path: &Path) -> Result<PeerIdentity, TlsError> {
    let certs = load_certs(path)?;
    let leaf = certs
        .first()
        .ok_or_else(|| bad(path, "certificate", "no CERTIFICATE block found".to_owned()))?;
    identity_from_cert_der(leaf.as_ref())
        .map_err(|e| bad(path, "Faultline certificate", e.to_string()))
}

fn read(path: &Path, action: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        action,
        path: path.to_owned(),
        source,
    })
}

fn bad(path: &Path, what: &'static str, reason: String) -> TlsError {
    TlsError::BadPem {
        path: path.to_owned(),
        what,
        reason,
    }
}

/// Wipes secrets (key PEM text) from memory on drop. Taken from the ed25519 dependency tree,
/// which already builds `zeroize`, rather than adding a dependency just for this.
pub(crate) use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;

/// PEM line endings for the ed25519 key encoders.
pub(crate) use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
