//! gRPC channels to the coordinator.
//!
//! Clients trust only `ca.pem`, verify the coordinator's host name as usual, and additionally
//! insist that the server certificate carries the coordinator identity
//! (`spiffe://faultline/coordinator/...`). Without that last check any agent or operator
//! certificate from the same CA could impersonate the coordinator towards other agents, if it
//! had a matching host SAN; Faultline's leaves lack the serverAuth usage too, but checking the
//! role does not rely on that.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::SignatureScheme;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Identity};

use crate::TlsError;
use crate::identity::{Role, identity_from_cert_der};
use crate::layout::CertDir;
use crate::pem::{cert_file_identity, load_roots};

/// How long to wait for the TCP connection to the coordinator.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the TLS handshake may take once connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keepalive: lets the kernel notice a vanished coordinator on an idle agent link.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// HTTP/2 pings: detect a dead coordinator within roughly interval + timeout even when the
/// agent stream is idle, so the agent reconnects instead of waiting on a half-open socket.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A lazily-connecting tonic Channel to `url` (https://host:port) presenting the identity
/// files of `role`/`name` from `dir`, trusting only ca.pem, and refusing any server whose
/// certificate is not the Faultline coordinator (URI SAN spiffe://faultline/coordinator/...)
/// in addition to normal hostname verification.
///
/// The certificate file is checked up front to hold the identity asked for (`role`, and for
/// agents also `name`), so a mixed-up directory fails here rather than as a confusing
/// permission error from the coordinator. Must be called inside a Tokio runtime (tonic spawns
/// the channel's worker task); nothing is dialled until the first request.
pub fn channel(url: &str, dir: &CertDir, role: Role, name: &str) -> Result<Channel, TlsError> {
    let identity = client_identity(dir, role, name)?;
    Ok(endpoint(url, &dir.ca_cert(), Some(identity))?.connect_lazy())
}

/// A connected channel to the first of several coordinator replicas, tried in order, that
/// accepts a connection (TCP and TLS), and its URL. Standby replicas do not listen, so they
/// refuse at once and the active one is found in one pass. One URL behaves like [`channel`]
/// except that it connects now, so an unreachable coordinator is reported here.
pub async fn first_reachable(
    urls: &[String],
    dir: &CertDir,
    role: Role,
    name: &str,
) -> Result<(String, Channel), TlsError> {
    let identity = client_identity(dir, role, name)?;
    let mut tried = Vec::new();
    for url in urls {
        let endpoint = endpoint(url, &dir.ca_cert(), Some(identity.clone()))?;
        match endpoint.connect().await {
            Ok(channel) => return Ok((url.clone(), channel)),
            Err(err) => tried.push(format!("{url}: {}", error_chain(&err))),
        }
    }
    Err(TlsError::NoCoordinator {
        tried: if tried.is_empty() {
            "no coordinator URL given".to_string()
        } else {
            tried.join("; ")
        },
    })
}

/// An error with its sources, `: `-joined (tonic's own message is just "transport error").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// The identity of `role`/`name` from `dir`, checked to be the one asked for.
fn client_identity(dir: &CertDir, role: Role, name: &str) -> Result<Identity, TlsError> {
    let (cert_path, key_path) = dir.identity_files(role, name);
    let found = cert_file_identity(&cert_path)?;
    if found.role != role || (role == Role::Agent && found.name != name) {
        let expected = match role {
            Role::Agent => format!("{}/{name}", role.as_str()),
            Role::Coordinator | Role::Operator => format!("a {} identity", role.as_str()),
        };
        return Err(TlsError::WrongIdentity {
            path: cert_path,
            found: found.to_string(),
            expected,
        });
    }
    let cert_pem = std::fs::read(&cert_path).map_err(|source| TlsError::Io {
        action: "read client certificate",
        path: cert_path.clone(),
        source,
    })?;
    let key_pem = std::fs::read(&key_path).map_err(|source| TlsError::Io {
        action: "read client private key",
        path: key_path.clone(),
        source,
    })?;
    Ok(Identity::from_pem(cert_pem, key_pem))
}

/// Same, but presents no client certificate at all (used by tests that prove the server
/// refuses such clients).
pub fn channel_without_identity(url: &str, ca_pem_path: &Path) -> Result<Channel, TlsError> {
    Ok(endpoint(url, ca_pem_path, None)?.connect_lazy())
}

fn endpoint(url: &str, ca_path: &Path, identity: Option<Identity>) -> Result<Endpoint, TlsError> {
    let host = https_host(url)?;
    let verifier = CoordinatorOnlyVerifier::new(ca_path)?;
    let transport_err = |source| TlsError::Transport {
        url: url.to_owned(),
        source,
    };
    // No ca_certificate() here: tonic refuses to mix it with a custom verifier, and the
    // verifier already holds ca.pem as its only trust anchor.
    let mut tls = ClientTlsConfig::new()
        .domain_name(host)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(transport_err)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_keepalive(Some(TCP_KEEPALIVE))
        .http2_keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tls_config_with_verifier(tls, Arc::new(verifier))
        .map_err(transport_err)?;
    Ok(endpoint)
}

/// The host of an `https://host:port` URL, without IPv6 brackets (the form TLS server-name
/// verification needs).
fn https_host(url: &str) -> Result<String, TlsError> {
    let invalid = |reason: String| TlsError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .map_err(|e: tonic::codegen::http::uri::InvalidUri| invalid(e.to_string()))?;
    if uri.scheme_str() != Some("https") {
        // Plain http would silently skip TLS; Faultline never talks to the coordinator in the
        // clear.
        return Err(invalid("the scheme must be https".to_owned()));
    }
    let host = uri
        .host()
        .ok_or_else(|| invalid("it has no host".to_owned()))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Ok(host.to_owned())
}

/// rustls' WebPKI server verification (chain to ca.pem, validity, serverAuth, host name) plus
/// "the leaf carries the coordinator identity".
#[derive(Debug)]
struct CoordinatorOnlyVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl CoordinatorOnlyVerifier {
    fn new(ca_path: &Path) -> Result<Self, TlsError> {
        let roots = load_roots(ca_path)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|source| TlsError::Verifier {
                path: ca_path.to_owned(),
                source,
            })?;
        Ok(Self { inner })
    }
}

/// Why a correctly chained server certificate was still refused.
#[derive(Debug, thiserror::Error)]
#[error("server certificate belongs to {found}, not to the Faultline coordinator")]
struct NotCoordinator {
    found: String,
}

impl ServerCertVerifier for CoordinatorOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let refuse = |e: Box<dyn std::error::Error + Send + Sync>| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::from(e))))
        };
        let identity = identity_from_cert_der(end_entity.as_ref()).map_err(|e| refuse(e.into()))?;
        if identity.role != Role::Coordinator {
            return Err(refuse(
                NotCoordinator {
                    found: identity.to_string(),
                }
                .into(),
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{InitOptions, init};

    #[test]
    fn url_rules() {
        assert_eq!(
            https_host("https://coord.example:7443").unwrap(),
            "coord.example"
        );
        assert_eq!(https_host("https://127.0.0.1:7443").unwrap(), "127.0.0.1");
        assert_eq!(https_host("https://[::1]:7443").unwrap(), "::1");
        let err = https_host("http://127.0.0.1:7443").unwrap_err();
        assert!(err.to_string().contains("https"), "{err}");
        assert!(https_host("not a url").is_err());
    }

    fn leaf_der(path: &Path) -> CertificateDer<'static> {
        crate::pem::load_certs(path).unwrap().remove(0)
    }

    #[test]
    fn verifier_accepts_only_the_coordinator() {
        let tmp = tempfile::tempdir().unwrap();
        init(&InitOptions {
            agents: vec!["a1".to_owned()],
            ..InitOptions::new(tmp.path())
        })
        .unwrap();
        let dir = CertDir::new(tmp.path());
        let verifier = CoordinatorOnlyVerifier::new(&dir.ca_cert()).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        verifier
            .verify_server_cert(
                &leaf_der(&dir.coordinator_cert()),
                &[],
                &name,
                &[],
                UnixTime::now(),
            )
            .unwrap();

        // Wrong host name: normal WebPKI verification still applies.
        let other = ServerName::try_from("elsewhere.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(
                    &leaf_der(&dir.coordinator_cert()),
                    &[],
                    &other,
                    &[],
                    UnixTime::now()
                )
                .is_err()
        );

        // A server-capable certificate from the same CA with the right host, but an
        // operator identity: only the role check stands in the way.
        let ca_pem = std::fs::read_to_string(dir.ca_cert()).unwrap();
        let ca_key =
            rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.ca_key()).unwrap()).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://faultline/operator/mallory".try_into().unwrap(),
        ));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let impostor = params.signed_by(&key, &issuer).unwrap();
        let err = verifier
            .verify_server_cert(impostor.der(), &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("operator/mallory"), "{err}");
    }

    #[tokio::test]
    async fn channel_checks_the_identity_files() {
        let tmp = tempfile::tempdir().unwrap();
        init(&InitOptions {
            agents: vec!["a1".to_owned()],
            ..InitOptions::new(tmp.path())
        })
        .unwrap();
        let dir = CertDir::new(tmp.path());
        channel("https://localhost:1", &dir, Role::Agent, "a1").unwrap();
        channel("https://localhost:1", &dir, Role::Operator, "anything").unwrap();
        let err = channel("https://localhost:1", &dir, Role::Agent, "a2").unwrap_err();
        assert!(err.to_string().contains("agent-a2.pem"), "{err}");
        // The coordinator.pem is a coordinator, so asking for an operator from it must fail.
        std::fs::copy(dir.operator_cert(), tmp.path().join("agent-x.pem")).unwrap();
        std::fs::copy(dir.operator_key(), tmp.path().join("agent-x.key")).unwrap();
        let err = channel("https://localhost:1", &dir, Role::Agent, "x").unwrap_err();
        assert!(matches!(err, TlsError::WrongIdentity { .. }), "{err}");
        let err = channel("http://localhost:1", &dir, Role::Agent, "a1").unwrap_err();
        assert!(matches!(err, TlsError::InvalidUrl { .. }), "{err}");
        channel_without_identity("https://localhost:1", &dir.ca_cert()).unwrap();
    }
}
