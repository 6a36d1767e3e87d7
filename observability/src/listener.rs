//! The `/metrics` listener: plain HTTP, or HTTPS with a certificate of the fleet CA. std +
//! tokio (+ tokio-rustls) only, no HTTP framework: it answers one GET per connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::Registry;

/// How long a client has to finish its TLS handshake and send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the HTTPS configuration of the metrics listener could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MetricsTlsError {
    #[error("reading {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no valid {what}: {reason}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "{} is a client-only certificate (its extended key usage lacks serverAuth): \
         TLS clients such as Prometheus would refuse it",
        path.display()
    )]
    NotAServerCertificate { path: PathBuf },
    #[error("parsing the certificate {}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("building the TLS configuration of the metrics listener: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A server-only TLS configuration (no client certificates: Prometheus scrapes with the fleet
/// CA as `tls_config.ca_file`) serving `cert` (PEM chain, leaf first) and `key`. The leaf must
/// be usable by a server: Faultline's agent certificates are deliberately client-only, and a
/// listener clients cannot verify would fail every scrape without saying why.
pub fn metrics_tls_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, MetricsTlsError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| MetricsTlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let pem_err = |what, path: &Path, reason: String| MetricsTlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let cert_pem = read("certificate", cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err("certificate", cert, e.to_string()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| pem_err("certificate", cert, "no CERTIFICATE block".into()))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| MetricsTlsError::Parse {
            path: cert.to_path_buf(),
            reason: e.to_string(),
        })?;
    if let Ok(Some(eku)) = parsed.extended_key_usage()
        && !eku.value.server_auth
        && !eku.value.any
    {
        return Err(MetricsTlsError::NotAServerCertificate {
            path: cert.to_path_buf(),
        });
    }
    let key_pem = read("private key", key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| pem_err("private key", key, e.to_string()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Starts the `/metrics` listener as a process's flags ask: over HTTPS with its own
/// `cert`/`key` when `tls`, else plain HTTP ([`serve_metrics`]). Metrics never stop a start
/// (an agent must keep reverting faults): an unusable certificate is logged and the listener
/// left off, never served in the clear instead.
pub async fn start_metrics(
    registry: &'static Registry,
    listen: &str,
    tls: bool,
    cert: &Path,
    key: &Path,
) -> Option<SocketAddr> {
    let tls = if tls {
        match metrics_tls_config(cert, key) {
            Ok(config) => Some(config),
            Err(err) => {
                tracing::error!(%err, "--metrics-tls: metrics listener not started");
                return None;
            }
        }
    } else {
        None
    };
    serve_metrics(registry, listen, tls).await
}

/// Starts the `/metrics` listener on `listen` (`off` disables it; port 0 picks a free port),
/// over HTTPS when `tls` is given, and logs `metrics listening on http(s)://ADDR/metrics`. A
/// bind failure is logged, not fatal: metrics never stop a coordinator or an agent.
pub async fn serve_metrics(
    registry: &'static Registry,
    listen: &str,
    tls: Option<Arc<ServerConfig>>,
) -> Option<SocketAddr> {
    if listen.trim().eq_ignore_ascii_case("off") {
        return None;
    }
    let listener = match TcpListener::bind(listen.trim()).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::warn!(%err, listen, "metrics listener not started");
            return None;
        }
    };
    let addr = listener.local_addr().ok()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!("metrics listening on {scheme}://{addr}/metrics");
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        match acceptor {
                            None => answer(registry, stream).await,
                            Some(acceptor) => {
                                match tokio::time::timeout(CLIENT_TIMEOUT, acceptor.accept(stream))
                                    .await
                                {
                                    Ok(Ok(stream)) => answer(registry, stream).await,
                                    Ok(Err(err)) => {
                                        tracing::debug!(%err, %peer, "metrics: TLS handshake failed")
                                    }
                                    Err(_) => {
                                        tracing::debug!(%peer, "metrics: TLS handshake timed out")
                                    }
                                }
                            }
                        }
                    });
                }
                Err(err) => {
                    tracing::warn!(%err, "metrics listener: accept failed");
                    // Out of file descriptors and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Some(addr)
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(registry: &'static Registry, mut stream: S) {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = tokio::time::timeout(CLIENT_TIMEOUT, async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    if read.is_err() {
        return;
    }
    let line = String::from_utf8_lossy(&request);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, body) = if method == "GET" && (path == "/metrics" || path == "/") {
        ("200 OK", registry.render())
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_leaf(dir: &Path, usages: Vec<rcgen::ExtendedKeyUsagePurpose>) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.extended_key_usages = usages;
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.join("leaf.pem"), dir.join("leaf.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    #[test]
    fn server_certificates_load_and_client_only_ones_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (cert, key) = write_leaf(dir, vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth]);
        let config = metrics_tls_config(&cert, &key).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);

        let (cert, key) = write_leaf(dir, vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]);
        let err = metrics_tls_config(&cert, &key).unwrap_err();
        assert!(
            matches!(err, MetricsTlsError::NotAServerCertificate { .. }),
            "{err}"
        );

        let err = metrics_tls_config(&dir.join("missing.pem"), &key).unwrap_err();
        assert!(err.to_string().starts_with("reading certificate "), "{err}");
    }
}
