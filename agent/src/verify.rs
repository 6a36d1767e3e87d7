//! Turns a signed wire command into a verified, decoded command — or a refusal. Order matters:
//! signature over the exact bytes first, then decode, then the header rules (target, expiry,
//! replay), then the action's contents; the nonce is recorded durably last, and only then may
//! the command be obeyed. A command that fails any step changes nothing.

use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use faultline_domain::command::{self, CommandHeader, Refusal};
use faultline_domain::fault::FaultSpec;
// The agent enforces the same bounds the plan parser does: a forged-but-signed or buggy
// coordinator cannot pin a fault longer than a valid plan could.
use faultline_domain::plan::{MAX_FAULT_DURATION, MAX_LEASE, MIN_LEASE};
use faultline_proto::v1 as pb;
use prost::Message;

use crate::ledger::DurableLedger;

/// What a verified command asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Apply {
        fault_id: String,
        spec: FaultSpec,
        lease: Duration,
    },
    Revert {
        fault_id: String,
        reason: String,
    },
    Renew {
        fault_ids: Vec<String>,
        lease: Duration,
    },
    /// Run a `command` steady-state probe (the link runs it, not the engine).
    Probe(crate::probe::ProbeRequest),
    /// Resolve and prepare a fault, report what it would do, change nothing.
    DryRun {
        fault_id: String,
        spec: FaultSpec,
    },
    /// Stream telemetry about the run's targets (the telemetry service does, not the engine).
    TelemetrySubscribe(crate::telemetry::Subscription),
    /// Stop the run's telemetry.
    TelemetryUnsubscribe,
}

/// A command that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCommand {
    pub command_id: String,
    pub run_id: String,
    pub action: Action,
    /// W3C traceparent of the coordinator's span (empty when traces are off).
    pub traceparent: String,
}

/// A refused command, with whatever identifiers could be read from it for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedCommand {
    pub command_id: String,
    pub run_id: String,
    pub fault_id: String,
    pub refusal: Refusal,
}

/// Checks commands for one agent against the pinned coordinator key.
#[derive(Debug)]
pub struct Verifier {
    key: VerifyingKey,
    me: String,
    ledger: DurableLedger,
}

impl Verifier {
    pub fn new(key: VerifyingKey, me: String, ledger: DurableLedger) -> Self {
        Self { key, me, ledger }
    }

    /// Verifies `signed` at `now_ms`.
    pub fn verify(
        &mut self,
        signed: &pb::SignedCommand,
        now_ms: i64,
    ) -> Result<VerifiedCommand, Box<RefusedCommand>> {
        // Best-effort identifiers for the refusal report, read WITHOUT trusting them.
        let unverified = pb::Command::decode(signed.command.as_slice()).ok();
        let refuse = |refusal: Refusal| {
            let (command_id, run_id, fault_id) = unverified
                .as_ref()
                .map(|c| (c.command_id.clone(), c.run_id.clone(), fault_id_of(c)))
                .unwrap_or_default();
            RefusedCommand {
                command_id,
                run_id,
                fault_id,
                refusal,
            }
        };
        command::verify_signature(&self.key, &signed.command, &signed.signature).map_err(refuse)?;
        let decoded = pb::Command::decode(signed.command.as_slice())
            .map_err(|err| refuse(Refusal::Undecodable(err.to_string())))?;
        let header = CommandHeader {
            command_id: decoded.command_id.clone(),
            target_agent: decoded.target_agent.clone(),
            issued_at_ms: decoded.issued_at_unix_ms,
            not_after_ms: decoded.not_after_unix_ms,
            nonce: decoded.nonce.clone(),
        };
        command::admit(&header, &self.me, now_ms, |nonce| {
            self.ledger.contains(nonce)
        })
        .map_err(refuse)?;
        let action = action_from_wire(&decoded).map_err(refuse)?;
        self.ledger
            .record(&decoded.nonce, decoded.not_after_unix_ms, now_ms)
            .map_err(|err| {
                refuse(Refusal::InvalidFault {
                    command_id: decoded.command_id.clone(),
                    reason: format!("cannot record its nonce, so cannot obey it: {err}"),
                })
            })?;
        Ok(VerifiedCommand {
            command_id: decoded.command_id,
            run_id: decoded.run_id,
            action,
            traceparent: decoded.traceparent,
        })
    }
}

fn fault_id_of(command: &pb::Command) -> String {
    match &command.action {
        Some(pb::command::Action::Apply(apply)) => apply.fault_id.clone(),
        Some(pb::command::Action::Revert(revert)) => revert.fault_id.clone(),
        _ => String::new(),
    }
}

fn lease_from_ms(command_id: &str, lease_ms: u64) -> Result<Duration, Refusal> {
    let lease = Duration::from_millis(lease_ms);
    if lease < MIN_LEASE || lease > MAX_LEASE {
        return Err(Refusal::InvalidFault {
            command_id: command_id.to_string(),
            reason: format!(
                "lease {lease_ms} ms outside {}..={} ms",
                MIN_LEASE.as_millis(),
                MAX_LEASE.as_millis()
            ),
        });
    }
    Ok(lease)
}

/// Converts the command's action into domain terms, refusing anything incomplete.
pub fn action_from_wire(command: &pb::Command) -> Result<Action, Refusal> {
    let id = command.command_id.as_str();
    let invalid = |reason: String| Refusal::InvalidFault {
        command_id: id.to_string(),
        reason,
    };
    match &command.action {
        None => Err(Refusal::NoAction {
            command_id: id.to_string(),
        }),
        Some(pb::command::Action::Apply(apply)) => {
            if apply.fault_id.is_empty() {
                return Err(invalid("empty fault id".into()));
            }
            let lease = lease_from_ms(id, apply.lease_ms)?;
            let duration = Duration::from_millis(apply.duration_ms);
            if duration.is_zero() || duration > MAX_FAULT_DURATION {
                return Err(invalid(format!(
                    "duration {} ms out of range",
                    apply.duration_ms
                )));
            }
            let fault = apply
                .fault
                .as_ref()
                .ok_or_else(|| invalid("no fault".into()))?;
            let spec = crate::wire::fault_from_wire(fault, duration).map_err(invalid)?;
            Ok(Action::Apply {
                fault_id: apply.fault_id.clone(),
                spec,
                lease,
            })
        }
        Some(pb::command::Action::Revert(revert)) => Ok(Action::Revert {
            fault_id: revert.fault_id.clone(),
            reason: revert.reason.clone(),
        }),
        Some(pb::command::Action::Renew(renew)) => Ok(Action::Renew {
            fault_ids: renew.fault_ids.clone(),
            lease: lease_from_ms(id, renew.lease_ms)?,
        }),
        Some(pb::command::Action::Probe(probe)) => {
            Ok(Action::Probe(crate::wire::probe_from_wire(probe)))
        }
        Some(pb::command::Action::DryRun(dry_run)) => {
            if dry_run.fault_id.is_empty() {
                return Err(invalid("empty fault id".into()));
            }
            let duration = Duration::from_millis(dry_run.duration_ms);
            if duration.is_zero() || duration > MAX_FAULT_DURATION {
                return Err(invalid(format!(
                    "duration {} ms out of range",
                    dry_run.duration_ms
                )));
            }
            let fault = dry_run
                .fault
                .as_ref()
                .ok_or_else(|| invalid("no fault".into()))?;
            let spec = crate::wire::fault_from_wire(fault, duration).map_err(invalid)?;
            Ok(Action::DryRun {
                fault_id: dry_run.fault_id.clone(),
                spec,
            })
        }
        Some(pb::command::Action::TelemetrySubscribe(subscribe)) => {
            if command.run_id.is_empty() {
                return Err(invalid("telemetry subscription without a run id".into()));
            }
            crate::telemetry::subscription_from_wire(subscribe)
                .map(Action::TelemetrySubscribe)
                .map_err(invalid)
        }
        Some(pb::command::Action::TelemetryUnsubscribe(_)) => Ok(Action::TelemetryUnsubscribe),
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn apply_command(agent: &str, nonce: u8) -> pb::Command {
        pb::Command {
            command_id: format!("cmd-{nonce}"),
            run_id: "run".into(),
            target_agent: agent.into(),
            issued_at_unix_ms: NOW,
            not_after_unix_ms: NOW + 10_000,
            nonce: vec![nonce; 16],
            traceparent: String::new(),
            action: Some(pb::command::Action::Apply(pb::ApplyFault {
                fault_id: "f1".into(),
                fault: Some(pb::Fault {
                    target: Some(pb::Target {
                        selector: Some(pb::target::Selector::ContainerName("db".into())),
                    }),
                    kind: Some(pb::fault::Kind::ContainerPause(pb::ContainerPause {})),
                }),
                duration_ms: 3_000,
                lease_ms: 5_000,
            })),
        }
    }

    fn sign(key: &SigningKey, command: &pb::Command) -> pb::SignedCommand {
        let bytes = command.encode_to_vec();
        pb::SignedCommand {
            signature: command::sign(key, &bytes),
            command: bytes,
        }
    }

    fn verifier(dir: &std::path::Path, key: &SigningKey) -> Verifier {
        let ledger = DurableLedger::open(dir, NOW).unwrap();
        Verifier::new(key.verifying_key(), "agent-2".into(), ledger)
    }

    #[test]
    fn a_good_command_verifies_once_and_its_replay_is_refused_even_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[4; 32]);
        let signed = sign(&key, &apply_command("agent-2", 1));
        let verified = verifier(dir.path(), &key).verify(&signed, NOW).unwrap();
        assert_eq!(verified.command_id, "cmd-1");
        assert!(matches!(verified.action, Action::Apply { ref fault_id, .. } if fault_id == "f1"));

        let refused = verifier(dir.path(), &key)
            .verify(&signed, NOW + 1)
            .unwrap_err();
        assert!(
            matches!(refused.refusal, Refusal::Replayed { .. }),
            "{refused:?}"
        );
        assert_eq!(
            (refused.command_id.as_str(), refused.fault_id.as_str()),
            ("cmd-1", "f1")
        );
    }

    #[test]
    fn forged_tampered_misaddressed_and_expired_commands_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[4; 32]);
        let mut v = verifier(dir.path(), &key);

        let forged = sign(
            &SigningKey::from_bytes(&[5; 32]),
            &apply_command("agent-2", 2),
        );
        assert_eq!(
            v.verify(&forged, NOW).unwrap_err().refusal,
            Refusal::BadSignature
        );

        let mut tampered = sign(&key, &apply_command("agent-2", 3));
        let last = tampered.command.len() - 1;
        tampered.command[last] ^= 0x01;
        assert_eq!(
            v.verify(&tampered, NOW).unwrap_err().refusal,
            Refusal::BadSignature
        );

        let mut unsigned = sign(&key, &apply_command("agent-2", 4));
        unsigned.signature.clear();
        assert_eq!(
            v.verify(&unsigned, NOW).unwrap_err().refusal,
            Refusal::Unsigned
        );

        let other = sign(&key, &apply_command("agent-3", 5));
        assert!(matches!(
            v.verify(&other, NOW).unwrap_err().refusal,
            Refusal::WrongTarget { .. }
        ));

        let expired = sign(&key, &apply_command("agent-2", 6));
        let refusal = v.verify(&expired, NOW + 10_001).unwrap_err().refusal;
        assert!(matches!(refusal, Refusal::Expired { .. }));

        // None of the refused commands burned a nonce: a legitimate retry still works.
        assert!(
            v.verify(&sign(&key, &apply_command("agent-2", 6)), NOW)
                .is_ok()
        );
    }

    #[test]
    fn incomplete_or_out_of_range_actions_are_refused() {
        let mut no_target = apply_command("agent-2", 1);
        if let Some(pb::command::Action::Apply(apply)) = &mut no_target.action {
            apply.fault.as_mut().unwrap().target = None;
        }
        assert!(
            action_from_wire(&no_target)
                .unwrap_err()
                .to_string()
                .contains("no target")
        );

        let mut long_lease = apply_command("agent-2", 1);
        if let Some(pb::command::Action::Apply(apply)) = &mut long_lease.action {
            apply.lease_ms = 3_600_000;
        }
        assert!(
            action_from_wire(&long_lease)
                .unwrap_err()
                .to_string()
                .contains("lease")
        );

        let mut bad_signal = apply_command("agent-2", 1);
        if let Some(pb::command::Action::Apply(apply)) = &mut bad_signal.action {
            apply.fault.as_mut().unwrap().kind =
                Some(pb::fault::Kind::ContainerKill(pb::ContainerKill {
                    signal: "SIGNOPE".into(),
                    restart_on_revert: true,
                }));
        }
        assert!(
            action_from_wire(&bad_signal)
                .unwrap_err()
                .to_string()
                .contains("signal")
        );

        let mut none = apply_command("agent-2", 1);
        none.action = None;
        assert!(matches!(
            action_from_wire(&none),
            Err(Refusal::NoAction { .. })
        ));
    }
}
