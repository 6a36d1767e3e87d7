#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! Nobody gets in: connections without the right certificate are refused and audited, each
//! certificate role is confined to its service, and the real agent refuses every command that
//! is unsigned, tampered, forged, expired, replayed (also after a restart) or addressed to
//! another agent — applying nothing.

use std::time::Duration;

use faultline_integration_tests::cluster::Cluster;
use faultline_integration_tests::docker::TestContainer;
use faultline_integration_tests::scripted::{self, AgentProcess, ScriptedCoordinator};
use faultline_proto::v1 as pb;
use faultline_tls::identity::Role;
use faultline_tls::layout::CertDir;
use serde_json::Value;

async fn audit(cluster: &Cluster) -> Vec<Value> {
    let entries = cluster
        .cli_json(&["audit", "--output", "json", "--limit", "1000"])
        .await
        .unwrap();
    entries.as_array().cloned().unwrap()
}

async fn wait_audit(cluster: &Cluster, action: &str, fragment: &str) -> Value {
    for _ in 0..100 {
        let found = audit(cluster).await.into_iter().find(|e| {
            e["action"] == action
                && e["outcome"] == "refused"
                && e["detail"].as_str().unwrap_or_default().contains(fragment)
        });
        if let Some(entry) = found {
            return entry;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "no refused {action} audit entry containing {fragment:?}: {:#?}",
        audit(cluster).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_the_right_certificate_are_refused_and_audited() {
    let cluster = Cluster::start(&["agent-1"]).await.unwrap();
    let url = cluster.url();
    let ours = CertDir::new(&cluster.certs);

    // 1. No client certificate at all.
    let bare = faultline_tls::client::channel_without_identity(&url, &ours.ca_cert()).unwrap();
    let err = pb::operator_client::OperatorClient::new(bare)
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    let entry = wait_audit(&cluster, "tls-handshake", "no certificate").await;
    assert!(
        entry["actor"]
            .as_str()
            .unwrap()
            .starts_with("tls 127.0.0.1:"),
        "{entry}"
    );

    // 2. A certificate from another CA (the client trusts our CA, so only the server refuses).
    let other = tempfile::tempdir().unwrap();
    let mut options = faultline_tls::pki::InitOptions::new(other.path());
    options.agents = vec!["agent-1".into()];
    faultline_tls::pki::init(&options).unwrap();
    let hybrid = tempfile::tempdir().unwrap();
    std::fs::copy(ours.ca_cert(), hybrid.path().join("ca.pem")).unwrap();
    let theirs = CertDir::new(other.path());
    std::fs::copy(theirs.operator_cert(), hybrid.path().join("operator.pem")).unwrap();
    std::fs::copy(theirs.operator_key(), hybrid.path().join("operator.key")).unwrap();
    let foreign = faultline_tls::client::channel(
        &url,
        &CertDir::new(hybrid.path()),
        Role::Operator,
        "operator",
    )
    .unwrap();
    let err = pb::operator_client::OperatorClient::new(foreign)
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    wait_audit(&cluster, "tls-handshake", "not issued by the Faultline CA").await;

    // 3. An agent certificate calling the operator service.
    let as_agent = faultline_tls::client::channel(&url, &ours, Role::Agent, "agent-1").unwrap();
    let err = pb::operator_client::OperatorClient::new(as_agent.clone())
        .start_run(pb::StartRunRequest {
            source_name: "x".into(),
            plan_yaml: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let entry = wait_audit(&cluster, "start-run", "may not call the operator service").await;
    assert_eq!(entry["actor"], "agent/agent-1");

    // 4. An operator certificate registering as an agent.
    let as_operator =
        faultline_tls::client::channel(&url, &ours, Role::Operator, "operator").unwrap();
    let register = pb::AgentMessage {
        body: Some(pb::agent_message::Body::Register(pb::Register {
            agent_name: "agent-1".into(),
            ..Default::default()
        })),
    };
    let err = pb::agent_link_client::AgentLinkClient::new(as_operator)
        .session(tokio_stream::iter(vec![register]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let entry = wait_audit(&cluster, "agent-connect", "agent certificate required").await;
    assert_eq!(entry["actor"], "operator/operator");

    // 5. An agent registering under another agent's name.
    let impostor = pb::AgentMessage {
        body: Some(pb::agent_message::Body::Register(pb::Register {
            agent_name: "agent-2".into(),
            ..Default::default()
        })),
    };
    let err = pb::agent_link_client::AgentLinkClient::new(as_agent)
        .session(tokio_stream::iter(vec![impostor]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    wait_audit(&cluster, "agent-register", "certificate is for \"agent-1\"").await;

    // The legitimate agent is unaffected by all of the above.
    cluster
        .wait_connected(&["agent-1"], Duration::from_secs(5))
        .await
        .unwrap();
}

fn kind(report: &pb::CommandReport) -> pb::ReportKind {
    pb::ReportKind::try_from(report.kind).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_bad_commands_and_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let certs_path = dir.path().join("certs");
    let mut options = faultline_tls::pki::InitOptions::new(&certs_path);
    options.agents = vec!["agent-1".into()];
    faultline_tls::pki::init(&options).unwrap();
    let certs = CertDir::new(&certs_path);
    let key = faultline_tls::layout::load_signing_key(&certs.signing_key()).unwrap();
    let state = dir.path().join("state");
    let target = TestContainer::start("fl-refuse").await.unwrap();

    let mut coordinator = ScriptedCoordinator::start(&certs).await.unwrap();
    let agent = AgentProcess::start(&coordinator.url(), &certs_path, &state).unwrap();
    coordinator
        .wait_register(Duration::from_secs(20))
        .await
        .unwrap();

    let timeout = Duration::from_secs(10);
    let apply = |id: &str| {
        scripted::command(
            id,
            "agent-1",
            scripted::pause("f", &target.name, 60_000, 60_000),
        )
    };
    let mut refusals: Vec<(&str, pb::SignedCommand, &str)> = Vec::new();

    let mut unsigned = scripted::sign(&key, &apply("unsigned"));
    unsigned.signature.clear();
    refusals.push(("unsigned", unsigned, "unsigned"));

    let mut tampered = scripted::sign(&key, &apply("tampered"));
    let at = tampered.command.len() - 5;
    tampered.command[at] ^= 0x01; // a bit of the lease/duration, after the signature was made
    refusals.push(("tampered", tampered, "does not verify"));

    let forger = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    refusals.push((
        "forged",
        scripted::sign(&forger, &apply("forged")),
        "does not verify",
    ));

    let mut expired = apply("expired");
    expired.issued_at_unix_ms -= 60_000;
    expired.not_after_unix_ms = expired.issued_at_unix_ms + 30_000;
    refusals.push(("expired", scripted::sign(&key, &expired), "expired"));

    let mut elsewhere = apply("elsewhere");
    elsewhere.target_agent = "agent-2".into();
    refusals.push((
        "elsewhere",
        scripted::sign(&key, &elsewhere),
        "addressed to agent",
    ));

    for (id, command, reason) in refusals {
        coordinator.send(command).await.unwrap();
        let report = coordinator.report_for(id, timeout).await.unwrap();
        assert_eq!(kind(&report), pb::ReportKind::Refused, "{id}: {report:?}");
        assert!(report.detail.contains(reason), "{id}: {}", report.detail);
        assert_eq!(
            target.state().await.unwrap(),
            "running",
            "{id} applied nothing"
        );
    }

    // A good command is obeyed; its exact bytes are refused when replayed.
    let good = scripted::sign(&key, &apply("good"));
    coordinator.send(good.clone()).await.unwrap();
    let report = coordinator.report_for("good", timeout).await.unwrap();
    assert_eq!(kind(&report), pb::ReportKind::Applied, "{report:?}");
    assert_eq!(target.state().await.unwrap(), "paused");
    let revert = scripted::command(
        "undo",
        "agent-1",
        pb::command::Action::Revert(pb::RevertFault {
            fault_id: "f".into(),
            reason: "test".into(),
        }),
    );
    coordinator
        .send(scripted::sign(&key, &revert))
        .await
        .unwrap();
    assert_eq!(
        kind(&coordinator.report_for("undo", timeout).await.unwrap()),
        pb::ReportKind::Reverted
    );
    assert_eq!(target.state().await.unwrap(), "running");

    coordinator.send(good.clone()).await.unwrap();
    let report = coordinator.report_for("good", timeout).await.unwrap();
    assert_eq!(kind(&report), pb::ReportKind::Refused, "{report:?}");
    assert!(report.detail.contains("replays nonce"), "{}", report.detail);
    assert_eq!(
        target.state().await.unwrap(),
        "running",
        "replay applied nothing"
    );

    // The replay ledger survives an agent restart.
    agent.stop().await.unwrap();
    let agent = AgentProcess::start(&coordinator.url(), &certs_path, &state).unwrap();
    coordinator
        .wait_register(Duration::from_secs(20))
        .await
        .unwrap();
    coordinator.send(good).await.unwrap();
    let report = coordinator.report_for("good", timeout).await.unwrap();
    assert_eq!(kind(&report), pb::ReportKind::Refused, "{report:?}");
    assert!(report.detail.contains("replays nonce"), "{}", report.detail);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        target.state().await.unwrap(),
        "running",
        "replay after restart applied nothing"
    );
    agent.stop().await.unwrap();
}
