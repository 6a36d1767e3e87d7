//! The `AgentLink` gRPC edge: authenticates the agent by its certificate, checks its
//! registration, then hands the stream's two halves to the hub. No state lives here.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use faultline_proto::v1 as pb;
use faultline_tls::identity::{PeerIdentity, Role, peer_identity};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::audit::Auditor;
use crate::clock::now_ms;
use crate::hub::{AgentReport, AgentSession, HubHandle};
use crate::store::AgentRecord;

/// How long an agent has to send its registration after opening the stream.
const REGISTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

/// The AgentLink service.
#[derive(Debug, Clone)]
pub struct AgentLinkService {
    pub hub: HubHandle,
    pub auditor: Auditor,
    pub version: String,
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_link_server::AgentLink for AgentLinkService {
    type SessionStream = CommandStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer_address = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let identity = self.authenticate(&request, &peer_address).await?;
        let mut inbound = request.into_inner();

        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.next()).await;
        let register = match first {
            Ok(Some(Ok(pb::AgentMessage {
                body: Some(pb::agent_message::Body::Register(r)),
            }))) => r,
            Ok(Some(Err(status))) => return Err(status),
            _ => {
                let why = "first message on the agent link must be a registration";
                self.auditor
                    .refused(&identity.to_string(), "agent-register", why)
                    .await;
                return Err(Status::invalid_argument(why));
            }
        };
        if register.agent_name != identity.name {
            let why = format!(
                "registration names agent {:?} but the certificate is for {:?}",
                register.agent_name, identity.name
            );
            self.auditor
                .refused(&identity.to_string(), "agent-register", &why)
                .await;
            return Err(Status::permission_denied(why));
        }

        let now = now_ms();
        let session = AgentSession {
            name: identity.name.clone(),
            version: register.version.clone(),
            host: register.host.clone(),
            capabilities: register.capabilities.clone(),
            peer_address: peer_address.clone(),
            connected_at_ms: now,
            last_seen_ms: now,
            active_faults: register.active_fault_ids.len() as u32,
        };
        let record = AgentRecord {
            name: identity.name.clone(),
            version: register.version.clone(),
            host_json: serde_json::to_string(&host_json(register.host.as_ref()))
                .unwrap_or_default(),
            capabilities_json: serde_json::to_string(&capabilities_json(&register.capabilities))
                .unwrap_or_default(),
            first_seen_ms: now,
            last_seen_ms: now,
        };
        if let Err(err) = self.auditor.store().upsert_agent(record).await {
            tracing::error!(%err, "could not record agent registration");
        }
        self.auditor
            .ok(
                &identity.to_string(),
                "agent-register",
                &format!(
                    "from {peer_address}, version {}, {} active fault(s)",
                    register.version,
                    register.active_fault_ids.len()
                ),
            )
            .await;

        let (outbound, outbound_rx) = mpsc::channel(256);
        let welcome = pb::CoordinatorMessage {
            body: Some(pb::coordinator_message::Body::Welcome(pb::Welcome {
                coordinator_version: self.version.clone(),
                server_time_unix_ms: now,
            })),
        };
        outbound
            .send(Ok(welcome))
            .await
            .map_err(|_| Status::unavailable("stream closed"))?;
        let conn_id = CONNECTION_IDS.fetch_add(1, Ordering::Relaxed);
        self.hub.connected(session, outbound, conn_id).await;
        tracing::info!(agent = %identity.name, %peer_address, "agent connected");

        let hub = self.hub.clone();
        let store = self.auditor.store().clone();
        let name = identity.name.clone();
        tokio::spawn(async move {
            while let Some(message) = inbound.next().await {
                match message {
                    Ok(pb::AgentMessage {
                        body: Some(pb::agent_message::Body::Heartbeat(hb)),
                    }) => {
                        hub.heartbeat(name.clone(), hb.active_faults).await;
                        let _ = store.touch_agent(&name, now_ms()).await;
                    }
                    Ok(pb::AgentMessage {
                        body: Some(pb::agent_message::Body::Report(report)),
                    }) => {
                        hub.report(AgentReport {
                            agent: name.clone(),
                            report,
                        })
                        .await;
                    }
                    Ok(pb::AgentMessage {
                        body: Some(pb::agent_message::Body::ProbeResult(result)),
                    }) => hub.probe_result(name.clone(), result).await,
                    Ok(pb::AgentMessage {
                        body: Some(pb::agent_message::Body::DryRunResult(result)),
                    }) => hub.dry_run_result(name.clone(), result).await,
                    Ok(_) => tracing::warn!(agent = %name, "ignoring unexpected agent message"),
                    Err(status) => {
                        tracing::info!(agent = %name, %status, "agent stream ended with error");
                        break;
                    }
                }
            }
            hub.disconnected(name, conn_id).await;
        });

        let stream = ReceiverStream::new(outbound_rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

impl AgentLinkService {
    async fn authenticate<T>(
        &self,
        request: &Request<T>,
        peer_address: &str,
    ) -> Result<PeerIdentity, Status> {
        let identity = match peer_identity(request) {
            Ok(identity) => identity,
            Err(status) => {
                let actor = format!("tls {peer_address}");
                self.auditor
                    .refused(&actor, "agent-connect", status.message())
                    .await;
                return Err(status);
            }
        };
        if identity.role != Role::Agent {
            let why = format!("{identity} may not use the agent link: agent certificate required");
            self.auditor
                .refused(&identity.to_string(), "agent-connect", &why)
                .await;
            return Err(Status::permission_denied(why));
        }
        Ok(identity)
    }
}

pub(crate) fn host_json(host: Option<&pb::HostFacts>) -> serde_json::Value {
    match host {
        Some(h) => serde_json::json!({
            "hostname": h.hostname, "kernel": h.kernel, "os": h.os, "cpus": h.cpus, "root": h.root,
        }),
        None => serde_json::Value::Null,
    }
}

pub(crate) fn capabilities_json(capabilities: &[pb::Capability]) -> serde_json::Value {
    capabilities
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name, "available": c.available, "mechanism": c.mechanism,
                "detail": c.detail,
            })
        })
        .collect()
}
