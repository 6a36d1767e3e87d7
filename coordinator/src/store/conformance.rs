//! The store's contract, as one suite both backends must pass: the SQLite store runs it in
//! this crate's unit tests, the PostgreSQL store in `integration-tests/tests/ha.rs` against a
//! real server (with the `store-conformance` feature). Written once, so the two backends
//! cannot drift apart unnoticed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test suite: a failed call is a failed check

use super::{
    AgentRecord, HaltRecord, MAX_PROBE_DETAIL_LEN, ProbeSampleRecord, RunEventRecord, RunRecord,
    RunState, Store, TelemetryEventRow, TelemetryLimits, TelemetrySampleRow, TelemetryStored,
    TelemetryWrite,
};

/// A running run created at `created_ms`.
pub fn run(id: &str, created_ms: i64) -> RunRecord {
    RunRecord {
        id: id.into(),
        title: "t".into(),
        state: RunState::Running.as_str().into(),
        plan_yaml: "y".into(),
        operator: "operator/op".into(),
        created_ms,
        finished_ms: None,
        reason: String::new(),
    }
}

fn concat(stored: &[u8], new: &[u8]) -> Vec<u8> {
    [stored, new].concat()
}

/// Checks the whole contract on an empty store. `store` and `other` are two handles to the
/// same database (two connections where the backend has them): what one writes, the other
/// must see. Panics on the first difference.
pub async fn check_semantics(store: &Store, other: &Store) {
    // Runs and their timeline.
    store.create_run(run("a", 1)).await.unwrap();
    store.create_run(run("b", 2)).await.unwrap();
    let event = |kind: &str| RunEventRecord {
        kind: kind.into(),
        at_ms: 5,
        ..Default::default()
    };
    assert_eq!(
        store
            .append_event("a", event("run-started"))
            .await
            .unwrap()
            .seq,
        1
    );
    assert_eq!(
        other
            .append_event("a", event("fault-applied"))
            .await
            .unwrap()
            .seq,
        2
    );
    let ids: Vec<_> = store
        .list_runs(10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["b", "a"]);
    store
        .finish_run("b", RunState::Completed, "", 3)
        .await
        .unwrap();
    let aborted = store
        .abort_unfinished_runs("coordinator lost", 9)
        .await
        .unwrap();
    assert_eq!(aborted, ["a"]);
    let (a, events) = store.get_run("a").await.unwrap().unwrap();
    assert_eq!((a.state.as_str(), a.finished_ms), ("aborted", Some(9)));
    assert_eq!(a.reason, "coordinator lost");
    let kinds: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["run-started", "fault-applied", "run-aborted"]);
    assert_eq!(events[2].seq, 3);
    let b = store.run_record("b").await.unwrap().unwrap();
    assert_eq!((b.state.as_str(), b.finished_ms), ("completed", Some(3)));
    assert!(store.get_run("nope").await.unwrap().is_none());

    // Audit, oldest first, the latest `limit`.
    for action in ["one", "two", "three"] {
        store
            .audit(7, "operator/op", action, "ok", "detail")
            .await
            .unwrap();
    }
    let audit: Vec<_> = store
        .list_audit(2)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(audit, ["two", "three"]);

    // Agents keep their first-seen time.
    let agent = |seen| AgentRecord {
        name: "agent-1".into(),
        version: "0.1".into(),
        host_json: "{}".into(),
        capabilities_json: "[]".into(),
        first_seen_ms: seen,
        last_seen_ms: seen,
    };
    store.upsert_agent(agent(1)).await.unwrap();
    store.upsert_agent(agent(5)).await.unwrap();
    store.touch_agent("agent-1", 8).await.unwrap();
    let agents = store.list_agents().await.unwrap();
    assert_eq!((agents[0].first_seen_ms, agents[0].last_seen_ms), (1, 8));

    // Halt switch.
    assert!(!store.halt_state().await.unwrap().halted);
    let halted = HaltRecord {
        halted: true,
        reason: "game-day over".into(),
        since_ms: 4,
    };
    store.set_halt(halted.clone()).await.unwrap();
    assert_eq!(other.halt_state().await.unwrap(), halted);

    // Probe samples: time order, NaN as absent, details capped, unknown runs refused.
    let sample = |probe: &str, at_ms, value| ProbeSampleRecord {
        probe: probe.into(),
        at_ms,
        ok: true,
        latency_ms: Some(1.5),
        value,
        detail: "x".repeat(1000),
    };
    let samples = vec![
        sample("api", 30, Some(f64::NAN)),
        sample("prom", 20, Some(4.5)),
    ];
    assert_eq!(store.append_probe_samples("a", samples).await.unwrap(), 2);
    let stored = store.probe_samples("a", 10).await.unwrap();
    assert_eq!(
        stored
            .iter()
            .map(|s| (s.probe.as_str(), s.at_ms, s.value))
            .collect::<Vec<_>>(),
        [("prom", 20, Some(4.5)), ("api", 30, None)]
    );
    assert!(stored[0].detail.len() <= MAX_PROBE_DETAIL_LEN);
    let err = store
        .append_probe_samples("nope", vec![sample("api", 1, None)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("storing probe samples"), "{err}");

    // Telemetry: buckets merged, duplicates ignored, gaps counted, limits applied.
    let limits = TelemetryLimits {
        samples_per_run: 2,
        events_per_kind: 1,
        notes_per_agent: 4,
    };
    let write = |seq, bucket_ms, data: &[u8]| TelemetryWrite {
        run_id: "a".into(),
        agent: "agent-1".into(),
        seq,
        received_ms: 100,
        sources: vec![1],
        drops: vec![2],
        notes: vec!["ebpf".into()],
        samples: vec![TelemetrySampleRow {
            agent: "agent-1".into(),
            target: "db".into(),
            bucket_ms,
            width_ms: 1000,
            data: data.to_vec(),
        }],
        events: vec![TelemetryEventRow {
            agent: "agent-1".into(),
            kind: "oom-kill".into(),
            at_ms: bucket_ms,
            data: vec![9],
        }],
    };
    let stored = store
        .append_telemetry(write(1, 1000, b"ab"), concat, limits)
        .await
        .unwrap();
    assert_eq!(stored, TelemetryStored::Stored);
    let duplicate = store
        .append_telemetry(write(1, 1000, b"zz"), concat, limits)
        .await
        .unwrap();
    assert_eq!(duplicate, TelemetryStored::Duplicate);
    store
        .append_telemetry(write(3, 1000, b"cd"), concat, limits)
        .await
        .unwrap();
    store
        .append_telemetry(write(4, 2000, b"ef"), concat, limits)
        .await
        .unwrap();
    store
        .append_telemetry(write(5, 3000, b"gh"), concat, limits)
        .await
        .unwrap();
    let read = store.telemetry("a", 0).await.unwrap();
    assert_eq!(read.agents.len(), 1);
    let agent = &read.agents[0];
    assert_eq!((agent.last_seq, agent.seq_gaps), (5, 1));
    assert_eq!(agent.notes, ["ebpf"]);
    assert_eq!((agent.samples_not_stored, agent.events_not_stored), (1, 3));
    let buckets: Vec<_> = read
        .samples
        .iter()
        .map(|s| (s.bucket_ms, s.data.clone()))
        .collect();
    assert_eq!(buckets, [(1000, b"abcd".to_vec()), (2000, b"ef".to_vec())]);
    assert_eq!(read.events.len(), 1);
    assert_eq!(store.telemetry("a", 1500).await.unwrap().samples.len(), 1);
}
