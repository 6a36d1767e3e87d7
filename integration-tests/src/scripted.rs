//! A scripted coordinator for testing the real agent's defences: it serves the AgentLink
//! service with the real coordinator certificate, lets the test push arbitrary (also forged,
//! tampered, expired or replayed) signed commands down the agent's stream, and hands every
//! message the agent sends back to the test.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ed25519_dalek::SigningKey;
use faultline_proto::v1 as pb;
use faultline_tls::layout::CertDir;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

type Outbound = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

#[derive(Clone)]
struct Service {
    current: Arc<Mutex<Option<Outbound>>>,
    inbound: mpsc::Sender<pb::AgentMessage>,
}

#[tonic::async_trait]
impl pb::agent_link_server::AgentLink for Service {
    type SessionStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut stream = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        if let Ok(mut slot) = self.current.lock() {
            *slot = Some(tx);
        }
        let inbound = self.inbound.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if inbound.send(message).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The scripted coordinator.
#[derive(Debug)]
pub struct ScriptedCoordinator {
    pub addr: std::net::SocketAddr,
    current: Arc<Mutex<Option<Outbound>>>,
    inbound: mpsc::Receiver<pb::AgentMessage>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedCoordinator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl ScriptedCoordinator {
    /// Serves on a free loopback port with `certs`' coordinator identity.
    pub async fn start(certs: &CertDir) -> anyhow::Result<Self> {
        let config = faultline_tls::server::server_config(certs)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let incoming = faultline_tls::server::incoming(listener, config, |_, _| {});
        let current = Arc::new(Mutex::new(None));
        let (inbound_tx, inbound) = mpsc::channel(1024);
        let service = Service {
            current: Arc::clone(&current),
            inbound: inbound_tx,
        };
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(pb::agent_link_server::AgentLinkServer::new(service))
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(Self {
            addr,
            current,
            inbound,
            server,
        })
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Waits for the agent's next registration (a new session).
    pub async fn wait_register(&mut self, timeout: Duration) -> anyhow::Result<pb::Register> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.inbound.recv())
                .await
                .context("no registration in time")?
                .context("server gone")?;
            if let Some(pb::agent_message::Body::Register(register)) = message.body {
                return Ok(register);
            }
        }
    }

    /// Sends a signed command down the current session.
    pub async fn send(&self, command: pb::SignedCommand) -> anyhow::Result<()> {
        let tx = self
            .current
            .lock()
            .ok()
            .and_then(|slot| slot.clone())
            .context("no session")?;
        let body = pb::coordinator_message::Body::Command(command);
        tx.send(Ok(pb::CoordinatorMessage { body: Some(body) }))
            .await
            .context("session closed")
    }

    /// Waits for the report answering `command_id`, skipping heartbeats and other reports.
    pub async fn report_for(
        &mut self,
        command_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<pb::CommandReport> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.inbound.recv())
                .await
                .with_context(|| format!("no report for {command_id} in time"))?
                .context("server gone")?;
            if let Some(pb::agent_message::Body::Report(report)) = message.body
                && report.command_id == command_id
            {
                return Ok(report);
            }
        }
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A well-formed command for `agent`, valid for 30 s from now, with a fresh random nonce.
pub fn command(id: &str, agent: &str, action: pb::command::Action) -> pb::Command {
    let mut nonce = vec![0u8; 16];
    getrandom::fill(&mut nonce).unwrap_or_default();
    let now = now_ms();
    pb::Command {
        command_id: id.to_string(),
        run_id: "scripted-run".into(),
        target_agent: agent.to_string(),
        issued_at_unix_ms: now,
        not_after_unix_ms: now + 30_000,
        nonce,
        traceparent: String::new(),
        action: Some(action),
    }
}

/// An apply of `container-pause` on `container`.
pub fn pause(
    fault_id: &str,
    container: &str,
    duration_ms: u64,
    lease_ms: u64,
) -> pb::command::Action {
    pb::command::Action::Apply(pb::ApplyFault {
        fault_id: fault_id.to_string(),
        fault: Some(pb::Fault {
            target: Some(pb::Target {
                selector: Some(pb::target::Selector::ContainerName(container.to_string())),
            }),
            kind: Some(pb::fault::Kind::ContainerPause(pb::ContainerPause {})),
        }),
        duration_ms,
        lease_ms,
    })
}

/// Encodes and signs `command` with `key`.
pub fn sign(key: &SigningKey, command: &pb::Command) -> pb::SignedCommand {
    let bytes = command.encode_to_vec();
    pb::SignedCommand {
        signature: faultline_domain::command::sign(key, &bytes),
        command: bytes,
    }
}

/// A real `faultline-agent` process for scripted tests (named `agent-1`), stopped on drop.
#[derive(Debug)]
pub struct AgentProcess {
    child: tokio::process::Child,
}

impl AgentProcess {
    /// Starts the agent binary against `url` with `certs` and `state`.
    pub fn start(
        url: &str,
        certs: &std::path::Path,
        state: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let child = tokio::process::Command::new(crate::cluster::bin("faultline-agent"))
            .args(["--coordinator", url, "--name", "agent-1"])
            .arg("--certs")
            .arg(certs)
            .arg("--state-dir")
            .arg(state)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting faultline-agent")?;
        Ok(Self { child })
    }

    /// SIGTERM and wait: the agent reverts what it holds before exiting.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("agent already gone")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        Ok(())
    }

    /// SIGKILL, as a crash would: nothing is reverted.
    pub async fn crash(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}
