//! Faultline identities carried in certificates.
//!
//! Each certificate issued by the Faultline CA holds exactly one URI subject alternative name of
//! the form `spiffe://faultline/<role>/<name>`. The coordinator authorises callers from that URI
//! alone, so parsing it is strict: one Faultline URI, a known role, a name from a small charset.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::TlsError;

/// Prefix shared by all Faultline SPIFFE URIs (trust domain `faultline`).
pub const SPIFFE_PREFIX: &str = "spiffe://faultline/";

/// The name the coordinator's certificate carries (`spiffe://faultline/coordinator/coordinator`).
pub const COORDINATOR_NAME: &str = "coordinator";

/// Longest accepted agent/operator name; 63 keeps names usable as DNS labels and file names.
pub const MAX_NAME_LEN: usize = 63;

/// What a certificate holder is allowed to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The single coordinator: serves gRPC and sends signed commands.
    Coordinator,
    /// A host agent that applies faults on its machine.
    Agent,
    /// A human or tool driving the coordinator (the CLI).
    Operator,
}

impl Role {
    /// All roles, in a stable order.
    pub const ALL: [Role; 3] = [Role::Coordinator, Role::Agent, Role::Operator];

    /// The role as it appears in SPIFFE URIs: `coordinator`, `agent` or `operator`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Agent => "agent",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;

    /// Parses `coordinator`, `agent` or `operator` (exactly, lower case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| TlsError::UnknownRole { role: s.to_owned() })
    }
}

/// The verified identity of a peer, taken from its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The peer's role.
    pub role: Role,
    /// The peer's name within its role, e.g. `agent-2`.
    pub name: String,
}

impl fmt::Display for PeerIdentity {
    /// Formats as `role/name`, e.g. `agent/agent-2`, the form used in audit logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// The SPIFFE URI for `role`/`name`, e.g. `spiffe://faultline/agent/agent-2`.
///
/// The coordinator's certificate uses [`COORDINATOR_NAME`] as its name. The name is not
/// validated here; see [`validate_name`].
pub fn spiffe_uri(role: Role, name: &str) -> String {
    format!("{SPIFFE_PREFIX}{}/{name}", role.as_str())
}

/// Checks a name against the rule shared by all Faultline identities: 1 to 63 characters from
/// `[A-Za-z0-9._-]`.
///
/// The rule keeps names safe to embed in URIs, file names (`agent-NAME.pem`) and log lines
/// without any escaping. `what` names the kind of name in the error ("agent", "operator").
pub fn validate_name(what: &'static str, name: &str) -> Result<(), TlsError> {
    let invalid = |reason: String| TlsError::InvalidName {
        what,
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty".to_owned()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "it is {} bytes long, at most {MAX_NAME_LEN} are allowed",
            name.len()
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(format!(
            "character {bad:?} is not allowed (use A-Z, a-z, 0-9, '.', '_' or '-')"
        )));
    }
    // "." and ".." pass the charset but would turn agent-file names into path tricks elsewhere;
    // refusing them costs nothing.
    if name == "." || name == ".." {
        return Err(invalid("it is a relative path component".to_owned()));
    }
    Ok(())
}

/// Parses a Faultline SPIFFE URI (`spiffe://faultline/<role>/<name>`).
pub fn parse_spiffe_uri(uri: &str) -> Result<PeerIdentity, TlsError> {
    let not_identity = |reason: String| TlsError::NotFaultlineIdentity { reason };
    let rest = uri
        .strip_prefix(SPIFFE_PREFIX)
        .ok_or_else(|| not_identity(format!("URI {uri:?} is not in the faultline trust domain")))?;
    let (role, name) = rest.split_once('/').ok_or_else(|| {
        not_identity(format!(
            "URI {uri:?} is not of the form {SPIFFE_PREFIX}<role>/<name>"
        ))
    })?;
    let role: Role = role
        .parse()
        .map_err(|e| not_identity(format!("URI {uri:?}: {e}")))?;
    validate_name(role.as_str(), name)
        .map_err(|e| not_identity(format!("URI {uri:?} has a bad name: {e}")))?;
    Ok(PeerIdentity {
        role,
        name: name.to_owned(),
    })
}

/// Extracts the Faultline identity from a DER-encoded certificate.
///
/// The certificate must carry exactly one URI SAN in the `spiffe://faultline/` trust domain;
/// zero is refused because the holder would be anonymous, more than one because it would be
/// ambiguous which identity to authorise. URI SANs outside the trust domain are ignored. This
/// does not verify the certificate chain: call it only on certificates rustls has verified.
pub fn identity_from_cert_der(der: &[u8]) -> Result<PeerIdentity, TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::CertParse {
        context: "peer certificate".to_owned(),
        reason: e.to_string(),
    })?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::CertParse {
            context: "subject alternative names of the peer certificate".to_owned(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| TlsError::NotFaultlineIdentity {
            reason: "it has no subject alternative names".to_owned(),
        })?;
    let faultline_uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .filter(|uri| uri.starts_with(SPIFFE_PREFIX))
        .collect();
    match faultline_uris.as_slice() {
        [] => Err(TlsError::NotFaultlineIdentity {
            reason: format!("it has no {SPIFFE_PREFIX}... URI subject alternative name"),
        }),
        [uri] => parse_spiffe_uri(uri),
        many => Err(TlsError::NotFaultlineIdentity {
            reason: format!(
                "it has {} faultline URIs ({many:?}); exactly one is required",
                many.len()
            ),
        }),
    }
}

/// For tonic handlers: identity of the verified client certificate of this request.
///
/// Relies on the connection having come through [`crate::server::incoming`] (rustls verified
/// the chain against the Faultline CA during the handshake); the first peer certificate is the
/// leaf. Returns `Status::unauthenticated` when the request carries no certificate (for example
/// a plaintext or in-process connection) or the certificate holds no valid Faultline identity.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Result<PeerIdentity, tonic::Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        tonic::Status::unauthenticated(
            "no verified client certificate on this connection; Faultline requires mutual TLS",
        )
    })?;
    let leaf = certs.first().ok_or_else(|| {
        tonic::Status::unauthenticated(
            "the TLS connection carries an empty client certificate chain",
        )
    })?;
    identity_from_cert_der(leaf.as_ref())
        .map_err(|e| tonic::Status::unauthenticated(format!("client certificate refused: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn spiffe_uri_format() {
        assert_eq!(
            spiffe_uri(Role::Agent, "agent-2"),
            "spiffe://faultline/agent/agent-2"
        );
        assert_eq!(
            spiffe_uri(Role::Coordinator, COORDINATOR_NAME),
            "spiffe://faultline/coordinator/coordinator"
        );
        let id = PeerIdentity {
            role: Role::Agent,
            name: "agent-2".to_owned(),
        };
        assert_eq!(id.to_string(), "agent/agent-2");
    }

    #[test]
    fn round_trip_every_role() {
        for (role, name) in [
            (Role::Coordinator, COORDINATOR_NAME),
            (Role::Agent, "agent-2"),
            (Role::Operator, "ops.alice_1"),
        ] {
            let der = cert_with_uris(&[&spiffe_uri(role, name)]);
            let id = identity_from_cert_der(&der).unwrap();
            assert_eq!(
                id,
                PeerIdentity {
                    role,
                    name: name.to_owned()
                }
            );
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        let err = "Agent".parse::<Role>().unwrap_err();
        assert!(matches!(err, TlsError::UnknownRole { .. }), "{err}");
    }

    #[test]
    fn foreign_uris_are_ignored_but_one_faultline_uri_is_needed() {
        let der = cert_with_uris(&["spiffe://other/agent/a", "spiffe://faultline/agent/a"]);
        assert_eq!(identity_from_cert_der(&der).unwrap().name, "a");

        let none = cert_with_uris(&[]);
        let err = identity_from_cert_der(&none).unwrap_err();
        assert!(
            matches!(err, TlsError::NotFaultlineIdentity { .. }),
            "{err}"
        );

        let foreign = cert_with_uris(&["spiffe://other/agent/a"]);
        assert!(identity_from_cert_der(&foreign).is_err());

        let two = cert_with_uris(&["spiffe://faultline/agent/a", "spiffe://faultline/agent/b"]);
        let err = identity_from_cert_der(&two).unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
    }

    #[test]
    fn bad_roles_and_names_are_refused() {
        for uri in [
            "spiffe://faultline/admin/x",
            "spiffe://faultline/agent/",
            "spiffe://faultline/agent",
            "spiffe://faultline/agent/a/b",
            "spiffe://faultline/agent/a%20b",
            "spiffe://faultline/agent/..",
            "spiffe://faultline/Agent/x",
        ] {
            let der = cert_with_uris(&[uri]);
            assert!(identity_from_cert_der(&der).is_err(), "{uri} was accepted");
        }
        let long = format!("spiffe://faultline/agent/{}", "a".repeat(64));
        assert!(identity_from_cert_der(&cert_with_uris(&[&long])).is_err());
        let max = format!("spiffe://faultline/agent/{}", "a".repeat(63));
        assert!(identity_from_cert_der(&cert_with_uris(&[&max])).is_ok());
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        let err = identity_from_cert_der(b"not a certificate").unwrap_err();
        assert!(matches!(err, TlsError::CertParse { .. }), "{err}");
    }

    #[test]
    fn name_rule() {
        for ok in ["a", "agent-1", "web.01", "A_b-c.d", &"x".repeat(63)] {
            validate_name("agent", ok).unwrap();
        }
        for bad in ["", "a b", "a/b", "ä", "a:b", ".", "..", &"x".repeat(64)] {
            assert!(validate_name("agent", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn peer_identity_without_tls_is_unauthenticated() {
        let req = tonic::Request::new(());
        let status = peer_identity(&req).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(
            status.message().contains("certificate"),
            "{}",
            status.message()
        );
    }
}
