//! Real loopback mTLS tests: the coordinator acceptor (`server_config` + `incoming`) against
//! raw tokio-rustls clients, and end to end through tonic with `client::channel`.

// Helpers outside #[test] functions are not covered by clippy's allow-unwrap-in-tests; in a
// test crate a panic is the failure report we want.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use faultline_tls::identity::{Role, identity_from_cert_der, peer_identity};
use faultline_tls::layout::CertDir;
use faultline_tls::pki::{InitOptions, init};
use faultline_tls::{client, server};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::server::TlsStream;
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::{Service, http};

type Refusals = mpsc::UnboundedReceiver<(SocketAddr, String)>;
type Accepted = std::pin::Pin<Box<dyn Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send>>;

fn make_certs(dir: &Path, agents: &[&str]) -> CertDir {
    init(&InitOptions {
        agents: agents.iter().map(|a| (*a).to_owned()).collect(),
        ..InitOptions::new(dir)
    })
    .unwrap();
    CertDir::new(dir)
}

/// Starts the acceptor on 127.0.0.1:0; refusals are forwarded to the returned receiver.
async fn start(dir: &CertDir) -> (SocketAddr, Accepted, Refusals) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let config = server::server_config(dir).unwrap();
    let stream = server::incoming(listener, config, move |peer, reason| {
        let _ = tx.send((peer, reason));
    });
    (addr, Box::pin(stream), rx)
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A raw rustls client trusting `ca`, optionally presenting `identity` (cert, key).
fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca) {
        roots.add(cert).unwrap();
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(certs(cert), PrivateKeyDer::from_pem_file(key).unwrap())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

async fn next_refusal(refusals: &mut Refusals) -> (SocketAddr, String) {
    tokio::time::timeout(Duration::from_secs(5), refusals.recv())
        .await
        .expect("on_refused was not called")
        .expect("refusal channel closed")
}

async fn assert_nothing_accepted(accepted: &mut Accepted) {
    let next = tokio::time::timeout(Duration::from_millis(200), accepted.next()).await;
    assert!(
        next.is_err(),
        "a connection was yielded or the stream ended"
    );
}

#[tokio::test]
async fn valid_agent_is_accepted_and_identified() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_certs(tmp.path(), &["agent-1"]);
    let (addr, mut accepted, mut refusals) = start(&dir).await;

    let config = client_config(
        &dir.ca_cert(),
        Some((&dir.agent_cert("agent-1"), &dir.agent_key("agent-1"))),
        &[&rustls::version::TLS13],
    );
    let mut client = connect(addr, config).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    client.flush().await.unwrap();

    let mut conn = tokio::time::timeout(Duration::from_secs(5), accepted.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (_, session) = conn.get_ref();
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    let leaf = session.peer_certificates().unwrap()[0].clone();
    let id = identity_from_cert_der(leaf.as_ref()).unwrap();
    assert_eq!((id.role, id.name.as_str()), (Role::Agent, "agent-1"));

    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    assert!(
        refusals.try_recv().is_err(),
        "a valid client was reported as refused"
    );
}

#[tokio::test]
async fn refused_handshakes_are_reported_and_do_not_end_the_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_certs(tmp.path(), &["agent-1"]);
    let foreign_tmp = tempfile::tempdir().unwrap();
    let foreign = make_certs(foreign_tmp.path(), &["agent-1"]);
    let (addr, mut accepted, mut refusals) = start(&dir).await;
    let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

    // (a) No client certificate. In TLS 1.3 the client finishes its side of the handshake
    // before the server checks its (empty) certificate, so the refusal shows on the server.
    let mut client = connect(addr, client_config(&dir.ca_cert(), None, tls13))
        .await
        .unwrap();
    let (peer, reason) = next_refusal(&mut refusals).await;
    assert_eq!(peer.ip(), addr.ip());
    assert!(reason.contains("no certificate"), "{reason}");
    let mut buf = [0u8; 1];
    assert!(
        matches!(client.read(&mut buf).await, Err(_) | Ok(0)),
        "the refused client can still read"
    );
    assert_nothing_accepted(&mut accepted).await;

    // (b) A certificate from another Faultline CA, for a name that also exists here.
    let config = client_config(
        &dir.ca_cert(),
        Some((
            &foreign.agent_cert("agent-1"),
            &foreign.agent_key("agent-1"),
        )),
        tls13,
    );
    let _client = connect(addr, config).await;
    let (_, reason) = next_refusal(&mut refusals).await;
    assert!(
        reason.contains("not issued by the Faultline CA"),
        "{reason}"
    );
    assert_nothing_accepted(&mut accepted).await;

    // (c) A TLS 1.2-only client never gets a session.
    let config = client_config(
        &dir.ca_cert(),
        Some((&dir.agent_cert("agent-1"), &dir.agent_key("agent-1"))),
        &[&rustls::version::TLS12],
    );
    assert!(
        connect(addr, config).await.is_err(),
        "TLS 1.2 handshake succeeded"
    );
    let (_, reason) = next_refusal(&mut refusals).await;
    assert!(reason.contains("TLS 1.3"), "{reason}");
    assert_nothing_accepted(&mut accepted).await;

    // (d) Our CA, but no Faultline identity in the certificate.
    let anonymous = tmp.path().join("anonymous");
    std::fs::create_dir(&anonymous).unwrap();
    let (cert, key) = sign_without_identity(&dir, &anonymous);
    let config = client_config(&dir.ca_cert(), Some((&cert, &key)), tls13);
    let _client = connect(addr, config).await;
    let (_, reason) = next_refusal(&mut refusals).await;
    assert!(reason.contains("not a Faultline identity"), "{reason}");
    assert_nothing_accepted(&mut accepted).await;

    // (e) Plain TCP that closes at once (a port scanner, a load-balancer probe).
    drop(TcpStream::connect(addr).await.unwrap());
    let (_, reason) = next_refusal(&mut refusals).await;
    assert!(reason.contains("closed before"), "{reason}");

    // After all that, the stream still serves a valid client.
    let config = client_config(
        &dir.ca_cert(),
        Some((&dir.agent_cert("agent-1"), &dir.agent_key("agent-1"))),
        tls13,
    );
    let _client = connect(addr, config).await.unwrap();
    let conn = tokio::time::timeout(Duration::from_secs(5), accepted.next())
        .await
        .unwrap();
    assert!(matches!(conn, Some(Ok(_))));
}

/// Signs a client certificate with the real CA but without any URI SAN.
fn sign_without_identity(dir: &CertDir, out: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let ca_pem = std::fs::read_to_string(dir.ca_cert()).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.ca_key()).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["client.example".to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (out.join("anon.pem"), out.join("anon.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[tokio::test]
async fn handshakes_run_concurrently_and_stalled_ones_time_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_certs(tmp.path(), &["agent-1"]);
    let (addr, mut accepted, mut refusals) = start(&dir).await;

    // A client that connects and never speaks holds its handshake open...
    let stalled = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    // ...yet a valid client is served meanwhile.
    let config = client_config(
        &dir.ca_cert(),
        Some((&dir.agent_cert("agent-1"), &dir.agent_key("agent-1"))),
        &[&rustls::version::TLS13],
    );
    let _client = connect(addr, config).await.unwrap();
    let conn = tokio::time::timeout(Duration::from_secs(5), accepted.next())
        .await
        .unwrap();
    assert!(matches!(conn, Some(Ok(_))));

    let (peer, reason) = tokio::time::timeout(
        server::HANDSHAKE_TIMEOUT + Duration::from_secs(5),
        refusals.recv(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(peer, stalled.local_addr().unwrap());
    assert!(reason.contains("did not complete within 10 s"), "{reason}");
}

/// A minimal gRPC service answering every call with an OK status whose message is the
/// caller's identity, as read by `peer_identity` (or the Unauthenticated status it returned).
#[derive(Clone)]
struct WhoAmI;

impl tonic::server::NamedService for WhoAmI {
    const NAME: &'static str = "faultline.test.WhoAmI";
}

impl Service<http::Request<tonic::body::Body>> for WhoAmI {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let req = tonic::Request::from_http(req);
        let status = match peer_identity(&req) {
            Ok(id) => tonic::Status::new(tonic::Code::Ok, id.to_string()),
            Err(status) => status,
        };
        std::future::ready(Ok(status.into_http()))
    }
}

async fn who_am_i(mut channel: tonic::transport::Channel) -> Result<tonic::Status, String> {
    std::future::poll_fn(|cx| Service::poll_ready(&mut channel, cx))
        .await
        .map_err(|e| format!("{e:?}"))?;
    let req = http::Request::builder()
        .method("POST")
        .uri("/faultline.test.WhoAmI/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::empty())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), channel.call(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    tonic::Status::from_header_map(resp.headers()).ok_or_else(|| "no grpc-status".to_owned())
}

#[tokio::test]
async fn tonic_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_certs(tmp.path(), &["agent-1"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, mut refusals) = mpsc::unbounded_channel();
    let incoming = server::incoming(
        listener,
        server::server_config(&dir).unwrap(),
        move |p, r| {
            let _ = tx.send((p, r));
        },
    );
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WhoAmI)
            .serve_with_incoming(incoming),
    );

    for url in [
        format!("https://127.0.0.1:{port}"),
        format!("https://localhost:{port}"),
    ] {
        let agent = client::channel(&url, &dir, Role::Agent, "agent-1").unwrap();
        let status = who_am_i(agent).await.unwrap();
        assert_eq!(status.code(), tonic::Code::Ok, "{status:?}");
        assert_eq!(status.message(), "agent/agent-1");
    }

    let operator = client::channel(
        &format!("https://localhost:{port}"),
        &dir,
        Role::Operator,
        "x",
    )
    .unwrap();
    assert_eq!(
        who_am_i(operator).await.unwrap().message(),
        "operator/operator"
    );

    // No client certificate: the call fails and the server reports why.
    let anonymous =
        client::channel_without_identity(&format!("https://localhost:{port}"), &dir.ca_cert())
            .unwrap();
    let err = who_am_i(anonymous).await.unwrap_err();
    let (_, reason) = next_refusal(&mut refusals).await;
    assert!(
        reason.contains("no certificate"),
        "{reason} (client saw {err})"
    );

    // A client trusting another CA refuses our coordinator.
    let foreign_tmp = tempfile::tempdir().unwrap();
    let foreign = make_certs(foreign_tmp.path(), &["agent-1"]);
    let lost = client::channel(
        &format!("https://localhost:{port}"),
        &foreign,
        Role::Agent,
        "agent-1",
    )
    .unwrap();
    let err = who_am_i(lost).await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");

    server.abort();
}

#[tokio::test]
async fn dropping_the_stream_closes_the_listener() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_certs(tmp.path(), &[]);
    let (addr, accepted, _refusals) = start(&dir).await;
    TcpStream::connect(addr).await.unwrap();
    drop(accepted);
    // The accept loop notices the closed channel and drops the listener; poll until it has.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
