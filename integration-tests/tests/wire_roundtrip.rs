//! The coordinator's `fault_to_wire` and the agent's `fault_from_wire` are inverse: every fault
//! kind with every target selector it accepts survives domain -> wire -> bytes -> wire ->
//! domain unchanged, and what a plan produces passes the agent's checks.

use std::collections::BTreeSet;
use std::time::Duration;

use faultline_agent::wire::fault_from_wire;
use faultline_coordinator::wire::fault_to_wire;
use faultline_domain::fault::{FaultKind, FaultSpec, TargetSelector};
use faultline_domain::plan::{example_selectors, example_specs, parse_plan};
use faultline_proto::v1 as pb;
use prost::Message;

/// Through the coordinator's encoder, protobuf bytes and the agent's decoder.
fn round_trip(spec: &FaultSpec) -> Result<FaultSpec, String> {
    let bytes = fault_to_wire(spec).encode_to_vec();
    let decoded = pb::Fault::decode(bytes.as_slice()).map_err(|err| err.to_string())?;
    fault_from_wire(&decoded, spec.duration)
}

fn selector_name(selector: &TargetSelector) -> String {
    format!("{:?}", std::mem::discriminant(selector))
}

#[test]
fn every_kind_and_selector_survives_the_wire() {
    let specs = example_specs();
    let mut kinds = BTreeSet::new();
    let mut selectors = BTreeSet::new();
    for spec in &specs {
        assert_eq!(round_trip(spec).as_ref(), Ok(spec), "{spec:?}");
        kinds.insert(spec.kind.name());
        selectors.insert(selector_name(&spec.target));
    }
    let names: BTreeSet<&str> = FaultKind::NAMES.iter().copied().collect();
    assert_eq!(kinds, names, "every fault kind crossed the wire");
    let all: BTreeSet<String> = example_selectors().iter().map(selector_name).collect();
    assert_eq!(all.len(), 7);
    assert_eq!(selectors, all, "every selector crossed the wire");
    // Every kind x every selector it accepts: 25 kinds, several with more than one example.
    assert!(specs.len() > 100, "{}", specs.len());
}

#[test]
fn every_shipped_example_plan_survives_the_wire() {
    let examples = [
        include_str!("../../examples/pause-database.yaml"),
        include_str!("../../examples/network-chaos.yaml"),
        include_str!("../../examples/resource-pressure.yaml"),
        include_str!("../../examples/process-chaos.yaml"),
        include_str!("../../examples/every-fault.yaml"),
    ];
    let mut kinds = BTreeSet::new();
    for text in examples {
        let plan = parse_plan(text).unwrap_or_else(|errors| panic!("{errors:?}"));
        for fault in plan.stages.iter().flat_map(|stage| &stage.faults) {
            assert_eq!(round_trip(&fault.spec).as_ref(), Ok(&fault.spec));
            kinds.insert(fault.spec.kind.name());
        }
    }
    assert_eq!(kinds.len(), FaultKind::NAMES.len());
}

#[test]
fn the_agent_refuses_what_the_coordinator_would_never_send() {
    let spec = example_specs()
        .into_iter()
        .find(|spec| matches!(spec.kind, FaultKind::Loss { .. }))
        .unwrap_or_else(|| panic!("no loss example"));
    let mut wire = fault_to_wire(&spec);
    if let Some(pb::fault::Kind::Loss(loss)) = &mut wire.kind {
        loss.basis_points = 20_000;
    }
    let err = fault_from_wire(&wire, spec.duration).unwrap_err();
    assert!(err.contains("basis_points 20000"), "{err}");

    let mut wire = fault_to_wire(&spec);
    wire.target = Some(pb::Target {
        selector: Some(pb::target::Selector::CgroupPath("system.slice".into())),
    });
    let err = fault_from_wire(&wire, Duration::from_secs(1)).unwrap_err();
    assert!(err.contains("no network namespace"), "{err}");
}
