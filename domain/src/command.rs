//! The signed command envelope and the rules an agent applies before it obeys a command.
//!
//! The coordinator signs the exact encoded bytes of a command with ed25519; the agent checks the
//! signature against its pinned public key *before* decoding, then checks the decoded header:
//! addressed to this agent, inside its validity window, nonce never seen. Every failure is a
//! [`Refusal`] whose text reaches the coordinator's audit log. Time and the replay ledger are
//! passed in, so these are plain functions.

use std::collections::HashMap;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// A command may be valid for at most this long; this bounds the replay ledger's size too.
pub const MAX_VALIDITY_MS: i64 = 5 * 60 * 1000;
/// Tolerated clock difference between coordinator and agent for `issued_at`.
pub const MAX_CLOCK_SKEW_MS: i64 = 30 * 1000;
/// Nonces shorter than this are refused: they would make collisions likely.
pub const MIN_NONCE_LEN: usize = 16;

/// The fields of a command that admission looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandHeader {
    pub command_id: String,
    pub target_agent: String,
    pub issued_at_ms: i64,
    pub not_after_ms: i64,
    pub nonce: Vec<u8>,
}

/// Why an agent refused a command. Nothing is applied for any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("command is unsigned")]
    Unsigned,
    #[error("signature is malformed ({len} bytes, expected 64)")]
    MalformedSignature { len: usize },
    #[error("signature does not verify against the pinned command-signing key")]
    BadSignature,
    #[error("signed bytes do not decode as a command: {0}")]
    Undecodable(String),
    #[error(
        "command {command_id} is addressed to agent {addressed_to:?}, not to this agent {me:?}"
    )]
    WrongTarget {
        command_id: String,
        addressed_to: String,
        me: String,
    },
    #[error("command {command_id} expired at {not_after_ms} ms, now is {now_ms} ms")]
    Expired {
        command_id: String,
        not_after_ms: i64,
        now_ms: i64,
    },
    #[error(
        "command {command_id} was issued at {issued_at_ms} ms, in the future (now {now_ms} ms, \
         tolerated skew {MAX_CLOCK_SKEW_MS} ms)"
    )]
    IssuedInFuture {
        command_id: String,
        issued_at_ms: i64,
        now_ms: i64,
    },
    #[error(
        "command {command_id} claims a validity of {validity_ms} ms; at most {MAX_VALIDITY_MS} ms \
         is accepted"
    )]
    ValidityTooLong {
        command_id: String,
        validity_ms: i64,
    },
    #[error("command {command_id} has a {len}-byte nonce; at least {MIN_NONCE_LEN} are required")]
    NonceTooShort { command_id: String, len: usize },
    #[error("command {command_id} replays nonce {nonce_hex}, already seen")]
    Replayed {
        command_id: String,
        nonce_hex: String,
    },
    #[error("command {command_id} has no action")]
    NoAction { command_id: String },
    #[error("command {command_id} carries an invalid fault: {reason}")]
    InvalidFault { command_id: String, reason: String },
}

/// Signs `bytes` (the exact encoded command).
pub fn sign(key: &SigningKey, bytes: &[u8]) -> Vec<u8> {
    key.sign(bytes).to_bytes().to_vec()
}

/// Checks `signature` over `bytes` against the pinned key. Done before decoding anything.
pub fn verify_signature(key: &VerifyingKey, bytes: &[u8], signature: &[u8]) -> Result<(), Refusal> {
    if signature.is_empty() {
        return Err(Refusal::Unsigned);
    }
    let signature = Signature::from_slice(signature).map_err(|_| Refusal::MalformedSignature {
        len: signature.len(),
    })?;
    // verify_strict rejects weak keys and malleable signatures, which plain verify tolerates.
    key.verify_strict(bytes, &signature)
        .map_err(|_| Refusal::BadSignature)?;
    // Belt and braces: the non-strict check must agree.
    key.verify(bytes, &signature)
        .map_err(|_| Refusal::BadSignature)
}

/// Decides whether a verified command's header may be obeyed by agent `me` at `now_ms`.
/// `seen` answers whether a nonce was already used. Does not record the nonce: the caller
/// records it in its durable ledger only once the command is admitted.
pub fn admit(
    header: &CommandHeader,
    me: &str,
    now_ms: i64,
    seen: impl Fn(&[u8]) -> bool,
) -> Result<(), Refusal> {
    let command_id = header.command_id.clone();
    if header.target_agent != me {
        return Err(Refusal::WrongTarget {
            command_id,
            addressed_to: header.target_agent.clone(),
            me: me.to_string(),
        });
    }
    let validity_ms = header.not_after_ms.saturating_sub(header.issued_at_ms);
    if validity_ms > MAX_VALIDITY_MS {
        return Err(Refusal::ValidityTooLong {
            command_id,
            validity_ms,
        });
    }
    if now_ms > header.not_after_ms {
        return Err(Refusal::Expired {
            command_id,
            not_after_ms: header.not_after_ms,
            now_ms,
        });
    }
    if header.issued_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(Refusal::IssuedInFuture {
            command_id,
            issued_at_ms: header.issued_at_ms,
            now_ms,
        });
    }
    if header.nonce.len() < MIN_NONCE_LEN {
        return Err(Refusal::NonceTooShort {
            command_id,
            len: header.nonce.len(),
        });
    }
    if seen(&header.nonce) {
        return Err(Refusal::Replayed {
            command_id,
            nonce_hex: hex::encode(&header.nonce),
        });
    }
    Ok(())
}

/// Nonces seen, each kept until its command's expiry (after which [`admit`] refuses the command
/// as expired anyway, so the nonce can be forgotten). The agent persists it.
#[derive(Debug, Default, Clone)]
pub struct ReplayLedger {
    nonces: HashMap<Vec<u8>, i64>,
}

impl ReplayLedger {
    /// True when `nonce` was recorded and not yet pruned.
    pub fn contains(&self, nonce: &[u8]) -> bool {
        self.nonces.contains_key(nonce)
    }

    /// Records a nonce with the expiry of the command that carried it.
    pub fn record(&mut self, nonce: Vec<u8>, not_after_ms: i64) {
        self.nonces.insert(nonce, not_after_ms);
    }

    /// Forgets nonces whose commands expired more than the clock-skew margin ago.
    pub fn prune(&mut self, now_ms: i64) {
        self.nonces
            .retain(|_, not_after| *not_after + MAX_CLOCK_SKEW_MS >= now_ms);
    }

    /// Entries, for persisting.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], i64)> {
        self.nonces
            .iter()
            .map(|(nonce, not_after)| (nonce.as_slice(), *not_after))
    }

    pub fn len(&self) -> usize {
        self.nonces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nonces.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn header() -> CommandHeader {
        CommandHeader {
            command_id: "c1".into(),
            target_agent: "agent-2".into(),
            issued_at_ms: NOW - 1_000,
            not_after_ms: NOW + 30_000,
            nonce: vec![7; 16],
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn admission_rules_table() {
        type Case = (&'static str, fn(&mut CommandHeader), Option<&'static str>);
        let cases: &[Case] = &[
            ("valid", |_| {}, None),
            (
                "other agent",
                |h| h.target_agent = "agent-3".into(),
                Some("addressed to agent"),
            ),
            ("expired", |h| h.not_after_ms = NOW - 1, Some("expired")),
            (
                "expires exactly now is still valid",
                |h| h.not_after_ms = NOW,
                None,
            ),
            (
                "issued in the future beyond skew",
                |h| {
                    h.issued_at_ms = NOW + MAX_CLOCK_SKEW_MS + 1;
                    h.not_after_ms = h.issued_at_ms + 1_000;
                },
                Some("in the future"),
            ),
            (
                "issued in the future within skew",
                |h| {
                    h.issued_at_ms = NOW + MAX_CLOCK_SKEW_MS;
                    h.not_after_ms = h.issued_at_ms + 1_000;
                },
                None,
            ),
            (
                "validity too long",
                |h| h.not_after_ms = h.issued_at_ms + MAX_VALIDITY_MS + 1,
                Some("validity"),
            ),
            ("short nonce", |h| h.nonce = vec![1; 15], Some("nonce")),
            (
                "replayed nonce",
                |h| h.nonce = vec![9; 16],
                Some("replays nonce"),
            ),
        ];
        for (name, mutate, expected) in cases {
            let mut h = header();
            mutate(&mut h);
            let result = admit(&h, "agent-2", NOW, |nonce| nonce == [9; 16].as_slice());
            match (expected, result) {
                (None, Ok(())) => {}
                (Some(fragment), Err(refusal)) => {
                    let text = refusal.to_string();
                    assert!(
                        text.contains(fragment),
                        "{name}: {text:?} lacks {fragment:?}"
                    );
                }
                (expected, got) => panic!("{name}: expected {expected:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn signatures_verify_only_for_the_exact_bytes_and_key() {
        let signing = key(1);
        let bytes = b"encoded command";
        let signature = sign(&signing, bytes);
        assert_eq!(
            verify_signature(&signing.verifying_key(), bytes, &signature),
            Ok(())
        );

        let mut tampered = bytes.to_vec();
        tampered[0] ^= 1;
        assert_eq!(
            verify_signature(&signing.verifying_key(), &tampered, &signature),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            verify_signature(&key(2).verifying_key(), bytes, &signature),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            verify_signature(&signing.verifying_key(), bytes, &[]),
            Err(Refusal::Unsigned)
        );
        assert_eq!(
            verify_signature(&signing.verifying_key(), bytes, &[0; 10]),
            Err(Refusal::MalformedSignature { len: 10 })
        );
    }

    #[test]
    fn ledger_forgets_nonces_only_after_their_command_expired() {
        let mut ledger = ReplayLedger::default();
        ledger.record(vec![1; 16], NOW);
        ledger.record(vec![2; 16], NOW + 60_000);
        ledger.prune(NOW + MAX_CLOCK_SKEW_MS);
        assert!(ledger.contains(&[1; 16]), "kept within the skew margin");
        ledger.prune(NOW + MAX_CLOCK_SKEW_MS + 1);
        assert!(!ledger.contains(&[1; 16]));
        assert!(ledger.contains(&[2; 16]));
        assert_eq!(ledger.len(), 1);
    }
}
