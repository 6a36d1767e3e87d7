//! The coordinator's TLS acceptor.
//!
//! [`server_config`] builds a rustls configuration that accepts only TLS 1.3 clients presenting
//! a certificate from the Faultline CA that carries a Faultline identity. [`incoming`] turns a
//! TCP listener into the stream of completed handshakes that
//! `tonic::transport::Server::serve_with_incoming` wants, reporting every refused connection
//! so the coordinator can audit it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use rustls::{ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use crate::TlsError;
use crate::identity::{Role, identity_from_cert_der};
use crate::layout::CertDir;
use crate::pem::{cert_file_identity, load_certs, load_private_key, load_roots};

/// Longest a single TLS handshake may take before the connection is dropped; bounds how long a
/// slow or malicious client can hold a handshake slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Completed handshakes waiting for the gRPC server to pick them up.
const ACCEPTED_QUEUE: usize = 64;

/// Handshakes in flight at once; beyond this the accept loop waits, which pushes back on a
/// connection flood instead of spawning unbounded tasks.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Pause after a failed `accept()` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// TLS 1.3 only, client certificate REQUIRED and verified against ca.pem (rustls
/// WebPkiClientVerifier), ALPN "h2", ring provider, serving the coordinator's cert+key.
///
/// On top of chain verification, a client certificate must carry exactly one Faultline
/// identity (`spiffe://faultline/<role>/<name>`), so anonymous certificates are refused during
/// the handshake rather than in each handler. The coordinator certificate itself is checked to
/// be a coordinator identity, catching a mixed-up directory at startup.
pub fn server_config(dir: &CertDir) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca_path = dir.ca_cert();
    let roots = load_roots(&ca_path)?;
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|source| TlsError::Verifier {
            path: ca_path,
            source,
        })?;

    let cert_path = dir.coordinator_cert();
    let identity = cert_file_identity(&cert_path)?;
    if identity.role != Role::Coordinator {
        return Err(TlsError::WrongIdentity {
            path: cert_path,
            found: identity.to_string(),
            expected: "a coordinator identity".to_owned(),
        });
    }
    let certs = load_certs(&cert_path)?;
    let key = load_private_key(&dir.coordinator_key())?;

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            action: "restrict the server to TLS 1.3",
            source,
        })?
        .with_client_cert_verifier(Arc::new(FaultlineClientVerifier { inner: webpki }))
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Rustls {
            action: "load the coordinator certificate and key",
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// WebPKI client verification plus "the leaf carries a Faultline identity".
#[derive(Debug)]
struct FaultlineClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for FaultlineClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        identity_from_cert_der(end_entity.as_ref()).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
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
}

/// Accepts TCP connections and performs TLS handshakes concurrently (each bounded by a 10 s
/// timeout), yielding only completed handshakes. A failed handshake (no client certificate,
/// unknown CA, wrong protocol, timeout) never ends the stream: it is passed to
/// `on_refused(peer_addr, reason)` so the caller can audit it, and logged with tracing::warn.
///
/// The stream ends only when it is dropped (which also stops the accept loop) or, if this is
/// called outside a Tokio runtime, after yielding one error saying so.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    on_refused: impl Fn(SocketAddr, String) + Send + Sync + 'static,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(accept_loop(
                listener,
                TlsAcceptor::from(config),
                Arc::new(on_refused),
                tx,
            ));
        }
        Err(e) => {
            // Report instead of panicking; the channel has room, so try_send cannot fail here
            // except by a bug, and then the stream simply ends.
            let _ = tx.try_send(Err(std::io::Error::other(format!(
                "faultline_tls::server::incoming must be called inside a Tokio runtime: {e}"
            ))));
        }
    }
    ReceiverStream::new(rx)
}

type Accepted = Result<TlsStream<TcpStream>, std::io::Error>;

async fn accept_loop<F>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    on_refused: Arc<F>,
    tx: mpsc::Sender<Accepted>,
) where
    F: Fn(SocketAddr, String) + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        // Every await races against the receiver going away, so dropping the stream (server
        // shutdown) also closes the listening socket promptly.
        let permit = tokio::select! {
            () = tx.closed() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // Only happens if the semaphore is closed, which this loop never does.
                Err(_) => return,
            },
        };
        let (tcp, peer) = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a TCP connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        // gRPC messages are small and latency matters more than packet count.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let on_refused = on_refused.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop(permit);
            let reason = match outcome {
                Ok(Ok(stream)) => {
                    if tx.send(Ok(stream)).await.is_err() {
                        tracing::debug!(%peer, "server stopped before taking the connection");
                    }
                    return;
                }
                Ok(Err(e)) => describe_handshake_error(&e),
                Err(_) => format!(
                    "TLS handshake did not complete within {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                ),
            };
            tracing::warn!(%peer, %reason, "refused TLS connection");
            on_refused(peer, reason);
        });
    }
}

/// A reason for an audit log that says what the client did wrong, not just rustls' wording.
fn describe_handshake_error(err: &std::io::Error) -> String {
    let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                "connection closed before the TLS handshake completed".to_owned()
            }
            _ => format!("TLS handshake failed: {err}"),
        };
    };
    match tls {
        rustls::Error::NoCertificatesPresented => {
            "client presented no certificate (a Faultline client certificate is required)"
                .to_owned()
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "client certificate was not issued by the Faultline CA (unknown issuer)".to_owned()
        }
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            "client certificate signature does not verify against the Faultline CA (issued by \
             another CA of the same name?)"
                .to_owned()
        }
        // rustls formats `Other` with Debug; our own verifier errors read better via Display.
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => {
            format!("client certificate refused: {e}")
        }
        rustls::Error::InvalidCertificate(e) => format!("client certificate refused: {e}"),
        rustls::Error::PeerIncompatible(e) => format!(
            "client is incompatible (Faultline requires TLS 1.3 with a client certificate): {e:?}"
        ),
        rustls::Error::AlertReceived(alert) => format!(
            "client aborted the TLS handshake with alert {alert:?} (does it trust the \
             coordinator certificate?)"
        ),
        other => format!("TLS handshake failed: {other}"),
    }
}
