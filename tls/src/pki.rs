//! The Faultline private CA: `faultline certs init` and issuing extra leaves.
//!
//! A deployment has one CA that signs the coordinator certificate, one certificate per agent
//! and one operator certificate, plus an independent ed25519 key pair the coordinator signs
//! commands with. Everything is generated in memory first and written only when all of it
//! succeeded, so a failed run leaves the directory as it was (short of an I/O error midway).

use std::collections::HashSet;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::TlsError;
use crate::identity::{COORDINATOR_NAME, Role, spiffe_uri, validate_name};
use crate::layout::{CertDir, read_text};
use crate::pem::{LineEnding, Zeroizing};

/// Operator name used when none is given.
pub const DEFAULT_OPERATOR_NAME: &str = "operator";

/// Coordinator hosts used when none are given: good for a single-machine trial.
pub const DEFAULT_COORDINATOR_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Certificate lifetime used when none is given.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;

/// Certificates start being valid this long before "now", so that hosts whose clocks lag the
/// machine that ran `certs init` do not refuse fresh certificates.
const BACKDATE: Duration = Duration::hours(1);

/// Mode of every file written: keys are secrets, and certificates name the fleet.
const FILE_MODE: u32 = 0o600;

/// Mode of a certificate directory created by [`init`].
const DIR_MODE: u32 = 0o700;

/// What `faultline certs init` should generate.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Directory to write into; created (mode 0700) if missing.
    pub dir: PathBuf,
    /// One agent certificate is issued per name.
    pub agents: Vec<String>,
    /// Name in the operator certificate (default [`DEFAULT_OPERATOR_NAME`]).
    pub operator_name: String,
    /// DNS names or IP addresses put in the coordinator certificate's SANs; clients verify the
    /// host they dial against these. Callers default to [`DEFAULT_COORDINATOR_HOSTS`].
    pub coordinator_hosts: Vec<String>,
    /// Replace existing files instead of refusing.
    pub force: bool,
    /// Lifetime of the CA and every certificate, in days.
    pub validity_days: u32,
}

impl InitOptions {
    /// Options for `dir` with no agents and every other field at its default.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            agents: Vec::new(),
            operator_name: DEFAULT_OPERATOR_NAME.to_owned(),
            coordinator_hosts: DEFAULT_COORDINATOR_HOSTS.map(str::to_owned).to_vec(),
            force: false,
            validity_days: DEFAULT_VALIDITY_DAYS,
        }
    }
}

/// What was written.
#[derive(Debug)]
pub struct InitReport {
    /// Every file written, in writing order.
    pub written: Vec<PathBuf>,
}

/// A file to write, held in memory until everything has been generated.
struct PendingFile {
    path: PathBuf,
    // Zeroizing because most of these are private keys.
    contents: Zeroizing<Vec<u8>>,
}

impl PendingFile {
    fn new(path: PathBuf, contents: impl Into<Vec<u8>>) -> Self {
        Self {
            path,
            contents: Zeroizing::new(contents.into()),
        }
    }
}

/// Validity window of generated certificates.
#[derive(Debug, Clone, Copy)]
struct Validity {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl Validity {
    fn days_from_now(days: u32) -> Result<Self, TlsError> {
        if days == 0 {
            return Err(TlsError::InvalidOptions {
                reason: "validity must be at least one day".to_owned(),
            });
        }
        let now = OffsetDateTime::now_utc();
        // checked_add: an absurd day count must be an error, not an overflow panic.
        let not_after = now
            .checked_add(Duration::days(i64::from(days)))
            .filter(|t| t.year() <= 9999)
            .ok_or_else(|| TlsError::InvalidOptions {
                reason: format!("validity of {days} days reaches past the year 9999"),
            })?;
        Ok(Self {
            not_before: now - BACKDATE,
            not_after,
        })
    }
}

/// Generates a complete certificate directory: CA, coordinator, agents, operator and the
/// command-signing key pair.
///
/// Names and hosts are validated, and the presence of every target file is checked (unless
/// `force`), before anything is generated or written: on such an error the directory is
/// untouched. Every file is written with mode 0600 and fsynced.
pub fn init(opts: &InitOptions) -> Result<InitReport, TlsError> {
    let mut seen = HashSet::new();
    for agent in &opts.agents {
        validate_name("agent", agent)?;
        if !seen.insert(agent.as_str()) {
            return Err(TlsError::DuplicateName {
                name: agent.clone(),
            });
        }
    }
    validate_name("operator", &opts.operator_name)?;
    let hosts = parse_hosts(&opts.coordinator_hosts)?;
    let validity = Validity::days_from_now(opts.validity_days)?;

    let dir = CertDir::new(&opts.dir);
    let mut targets = vec![
        dir.ca_cert(),
        dir.ca_key(),
        dir.coordinator_cert(),
        dir.coordinator_key(),
    ];
    for agent in &opts.agents {
        targets.push(dir.agent_cert(agent));
        targets.push(dir.agent_key(agent));
    }
    targets.extend([
        dir.operator_cert(),
        dir.operator_key(),
        dir.signing_key(),
        dir.verifying_key(),
    ]);
    if !opts.force {
        refuse_existing(&targets)?;
    }

    let ca = generate_ca(validity)?;
    let mut files = vec![
        PendingFile::new(dir.ca_cert(), ca.pem()),
        PendingFile::new(dir.ca_key(), ca.key().serialize_pem()),
    ];
    files.extend(generate_leaf(
        &ca,
        &dir,
        Role::Coordinator,
        COORDINATOR_NAME,
        &hosts,
        validity,
    )?);
    for agent in &opts.agents {
        files.extend(generate_leaf(&ca, &dir, Role::Agent, agent, &[], validity)?);
    }
    files.extend(generate_leaf(
        &ca,
        &dir,
        Role::Operator,
        &opts.operator_name,
        &[],
        validity,
    )?);
    files.extend(generate_signing_pair(&dir)?);

    // The planned names and the generated files must agree, or the existence check above
    // would have checked the wrong files.
    debug_assert_eq!(
        targets,
        files.iter().map(|f| f.path.clone()).collect::<Vec<_>>()
    );

    create_dir(&opts.dir)?;
    write_files(&opts.dir, &files, opts.force)
}

/// Signs one extra leaf certificate with the CA in `ca_dir` (`ca.pem` + `ca.key`) and writes
/// its certificate and key into `out_dir`, e.g. to add an agent after `certs init`.
///
/// The new leaf expires together with the CA. If `out_dir` is another directory, `ca.pem` is
/// copied there too so that the directory is usable on its own. The coordinator certificate is
/// not issued here because it needs host names; re-run [`init`] for that. Existing files are
/// refused unless `force`, and nothing is written in that case.
pub fn issue_leaf(
    ca_dir: &CertDir,
    role: Role,
    name: &str,
    out_dir: &CertDir,
    force: bool,
) -> Result<InitReport, TlsError> {
    if role == Role::Coordinator {
        return Err(TlsError::InvalidOptions {
            reason: "the coordinator certificate needs host names; issue it with `certs init`"
                .to_owned(),
        });
    }
    validate_name(role.as_str(), name)?;

    let ca_cert_path = ca_dir.ca_cert();
    let ca_key_path = ca_dir.ca_key();
    let ca_pem = read_text(&ca_cert_path, "read CA certificate")?;
    let ca_key_pem = Zeroizing::new(read_text(&ca_key_path, "read CA private key")?);
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::BadPem {
        path: ca_key_path.clone(),
        what: "PKCS#8 private key",
        reason: e.to_string(),
    })?;
    let ca_der = first_cert_der(&ca_cert_path, &ca_pem)?;
    let (_, ca_x509) = X509Certificate::from_der(&ca_der).map_err(|e| TlsError::CertParse {
        context: format!("CA certificate {}", ca_cert_path.display()),
        reason: e.to_string(),
    })?;
    // A CA key that does not belong to the CA certificate would produce leaves nobody trusts;
    // catch that here rather than at the first failed handshake.
    if ca_x509.public_key().subject_public_key.data.as_ref() != ca_key.public_key_raw() {
        return Err(TlsError::BadPem {
            path: ca_key_path,
            what: "CA private key",
            reason: format!(
                "it does not match the CA certificate {}",
                ca_cert_path.display()
            ),
        });
    }
    let validity = Validity {
        not_before: OffsetDateTime::now_utc() - BACKDATE,
        not_after: ca_x509.validity().not_after.to_datetime(),
    };
    if validity.not_after <= OffsetDateTime::now_utc() {
        return Err(TlsError::InvalidOptions {
            reason: format!(
                "the CA certificate {} has expired; run `certs init` again",
                ca_cert_path.display()
            ),
        });
    }
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|source| TlsError::CertGeneration {
            action: format!("load the CA from {}", ca_cert_path.display()),
            source,
        })?;

    let mut files = Vec::from(generate_leaf(&issuer, out_dir, role, name, &[], validity)?);
    let out_ca = out_dir.ca_cert();
    // Copy ca.pem unless the very same file (same directory) or identical content is there.
    let copy_ca = match std::fs::read_to_string(&out_ca) {
        Ok(existing) => existing != ca_pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(source) => {
            return Err(TlsError::Io {
                action: "read CA certificate",
                path: out_ca,
                source,
            });
        }
    };
    if copy_ca {
        files.insert(0, PendingFile::new(out_ca, ca_pem.clone()));
    }
    if !force {
        refuse_existing(&files.iter().map(|f| f.path.clone()).collect::<Vec<_>>())?;
    }
    create_dir(out_dir.root())?;
    write_files(out_dir.root(), &files, force)
}

/// Errors with the first of `paths` that exists (a dangling symlink counts: writing through
/// it would create a file somewhere else).
fn refuse_existing(paths: &[PathBuf]) -> Result<(), TlsError> {
    for path in paths {
        match std::fs::symlink_metadata(path) {
            Ok(_) => return Err(TlsError::AlreadyExists { path: path.clone() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TlsError::Io {
                    action: "check for existing file",
                    path: path.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Turns coordinator hosts into SANs, refusing anything a TLS client could not match.
fn parse_hosts(hosts: &[String]) -> Result<Vec<SanType>, TlsError> {
    if hosts.is_empty() {
        return Err(TlsError::InvalidOptions {
            reason: "at least one coordinator host is needed, or no client could verify the \
                     coordinator certificate"
                .to_owned(),
        });
    }
    hosts
        .iter()
        .map(|host| {
            let invalid = |reason: String| TlsError::InvalidHost {
                host: host.clone(),
                reason,
            };
            if let Ok(ip) = host.parse::<IpAddr>() {
                return Ok(SanType::IpAddress(ip));
            }
            // Check with the same parser rustls uses on the client side, so a SAN that no
            // client could ever match is refused now.
            rustls_pki_types::DnsName::try_from(host.as_str())
                .map_err(|e| invalid(format!("not a DNS name or IP address: {e}")))?;
            let ia5 = host
                .as_str()
                .try_into()
                .map_err(|e| invalid(format!("not encodable in a certificate: {e}")))?;
            Ok(SanType::DnsName(ia5))
        })
        .collect()
}

fn generate_ca(validity: Validity) -> Result<CertifiedIssuer<'static, KeyPair>, TlsError> {
    let gen_err = |action: &str| {
        let action = action.to_owned();
        move |source| TlsError::CertGeneration { action, source }
    };
    let key = KeyPair::generate().map_err(gen_err("generate the CA key"))?;
    let mut params = CertificateParams::default();
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Faultline");
    params
        .distinguished_name
        .push(DnType::CommonName, "Faultline CA");
    // A per-CA random tag makes every deployment's CA name distinct. With identical names, a
    // certificate from another Faultline installation would be checked against our CA and fail
    // as "bad signature"; with distinct names it fails clearly as "unknown issuer".
    params.distinguished_name.push(
        DnType::OrganizationalUnitName,
        format!("ca-{}", random_hex(8)),
    );
    // Path length 0: this CA signs leaves only, never intermediate CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, key).map_err(gen_err("self-sign the CA certificate"))
}

/// `bytes` random bytes from the OS, hex-encoded.
fn random_hex(bytes: usize) -> String {
    use rand_core::RngCore;
    let mut buf = vec![0u8; bytes];
    rand_core::OsRng.fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Generates the key and certificate of one identity, returned as `[cert, key]` files.
fn generate_leaf(
    issuer: &Issuer<'_, KeyPair>,
    dir: &CertDir,
    role: Role,
    name: &str,
    extra_sans: &[SanType],
    validity: Validity,
) -> Result<[PendingFile; 2], TlsError> {
    let subject = format!("{}/{name}", role.as_str());
    let gen_err = |what: &str| {
        let action = format!("{what} for {subject}");
        move |source| TlsError::CertGeneration { action, source }
    };
    let key = KeyPair::generate().map_err(gen_err("generate a key"))?;
    let uri = spiffe_uri(role, name);
    let mut params = CertificateParams::default();
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Faultline");
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, role.as_str());
    params.distinguished_name.push(DnType::CommonName, name);
    let uri_ia5 = uri
        .as_str()
        .try_into()
        .map_err(gen_err("encode the SPIFFE URI"))?;
    params.subject_alt_names = vec![SanType::URI(uri_ia5)];
    params.subject_alt_names.extend_from_slice(extra_sans);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Only the coordinator serves TLS; every other identity can only act as a client, so a
    // stolen agent key cannot impersonate the coordinator.
    params.extended_key_usages = match role {
        Role::Coordinator => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Agent | Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(gen_err("sign the certificate"))?;
    let (cert_path, key_path) = dir.identity_files(role, name);
    Ok([
        PendingFile::new(cert_path, cert.pem()),
        PendingFile::new(key_path, key.serialize_pem()),
    ])
}

/// Generates the command-signing key pair, returned as `[private, public]` files.
fn generate_signing_pair(dir: &CertDir) -> Result<[PendingFile; 2], TlsError> {
    let signing = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
    let private = signing
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| TlsError::KeyEncoding {
            what: "the command-signing key as PKCS#8 PEM",
            reason: e.to_string(),
        })?;
    let public = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| TlsError::KeyEncoding {
            what: "the command-verifying key as SPKI PEM",
            reason: e.to_string(),
        })?;
    Ok([
        PendingFile::new(dir.signing_key(), private.as_bytes()),
        PendingFile::new(dir.verifying_key(), public),
    ])
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| TlsError::Io {
            action: "create certificate directory",
            path: dir.to_owned(),
            source,
        })
}

fn write_files(dir: &Path, files: &[PendingFile], force: bool) -> Result<InitReport, TlsError> {
    let mut written = Vec::with_capacity(files.len());
    for file in files {
        if force {
            replace_file(&file.path, &file.contents)?;
        } else {
            write_new_file(&file.path, &file.contents)?;
        }
        written.push(file.path.clone());
    }
    // Make the new directory entries durable too, not just the file contents.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| TlsError::Io {
            action: "sync certificate directory",
            path: dir.to_owned(),
            source,
        })?;
    Ok(InitReport { written })
}

/// Creates `path` exclusively (O_EXCL), so a file that appeared since the existence check is
/// never overwritten.
fn write_new_file(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                TlsError::AlreadyExists {
                    path: path.to_owned(),
                }
            } else {
                TlsError::Io {
                    action: "create",
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
    fill_file(file, path, contents)
}

/// Replaces `path` atomically: write a temporary file next to it, then rename over it. Unlike
/// truncating in place, this also resets the mode of a pre-existing file to 0600 and never
/// leaves a half-written key behind.
fn replace_file(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        file_name.unwrap_or_default(),
        std::process::id()
    ));
    // A leftover from a crashed run with the same pid would make create_new fail.
    let _ = std::fs::remove_file(&tmp);
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&tmp)
        .map_err(|source| TlsError::Io {
            action: "create temporary file",
            path: tmp.clone(),
            source,
        })
        .and_then(|file| fill_file(file, &tmp, contents))
        .and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|source| TlsError::Io {
                action: "move new file into place at",
                path: path.to_owned(),
                source,
            })
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn fill_file(mut file: File, path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    let io_err = |action| {
        move |source| TlsError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    // The open mode is filtered by the umask; set it explicitly so the result never depends on
    // the caller's environment.
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
        .map_err(io_err("set mode 0600 on"))?;
    file.write_all(contents).map_err(io_err("write"))?;
    file.sync_all().map_err(io_err("sync"))
}

/// DER of the first certificate in a PEM text.
pub(crate) fn first_cert_der(path: &Path, pem: &str) -> Result<Vec<u8>, TlsError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let bad = |reason: String| TlsError::BadPem {
        path: path.to_owned(),
        what: "certificate",
        reason,
    };
    match CertificateDer::pem_slice_iter(pem.as_bytes()).next() {
        Some(Ok(der)) => Ok(der.to_vec()),
        Some(Err(e)) => Err(bad(e.to_string())),
        None => Err(bad("no CERTIFICATE block found".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{PeerIdentity, identity_from_cert_der};
    use crate::layout::{load_signing_key, load_verifying_key};
    use ed25519_dalek::{Signer, Verifier};
    use std::os::unix::fs::MetadataExt;

    fn opts(dir: &Path) -> InitOptions {
        InitOptions {
            agents: vec!["agent-1".to_owned(), "agent-2".to_owned()],
            ..InitOptions::new(dir)
        }
    }

    fn cert_identity(path: &Path) -> PeerIdentity {
        let pem = std::fs::read_to_string(path).unwrap();
        identity_from_cert_der(&first_cert_der(path, &pem).unwrap()).unwrap()
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn init_writes_every_file_with_mode_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("certs");
        let report = init(&opts(&root)).unwrap();
        let dir = CertDir::new(&root);
        let expected = vec![
            dir.ca_cert(),
            dir.ca_key(),
            dir.coordinator_cert(),
            dir.coordinator_key(),
            dir.agent_cert("agent-1"),
            dir.agent_key("agent-1"),
            dir.agent_cert("agent-2"),
            dir.agent_key("agent-2"),
            dir.operator_cert(),
            dir.operator_key(),
            dir.signing_key(),
            dir.verifying_key(),
        ];
        assert_eq!(report.written, expected);
        assert_eq!(
            listing(&root).len(),
            expected.len(),
            "stray files: {:?}",
            listing(&root)
        );
        for path in &expected {
            let mode = std::fs::metadata(path).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        assert_eq!(std::fs::metadata(&root).unwrap().mode() & 0o777, 0o700);

        assert_eq!(
            cert_identity(&dir.coordinator_cert()).to_string(),
            "coordinator/coordinator"
        );
        assert_eq!(
            cert_identity(&dir.agent_cert("agent-2")).to_string(),
            "agent/agent-2"
        );
        assert_eq!(
            cert_identity(&dir.operator_cert()).to_string(),
            "operator/operator"
        );
    }

    #[test]
    fn coordinator_cert_has_host_sans_and_server_auth() {
        let tmp = tempfile::tempdir().unwrap();
        let mut o = opts(tmp.path());
        o.coordinator_hosts = vec!["coord.example".to_owned(), "10.0.0.7".to_owned()];
        init(&o).unwrap();
        let dir = CertDir::new(tmp.path());
        let pem = std::fs::read_to_string(dir.coordinator_cert()).unwrap();
        let der = first_cert_der(&dir.coordinator_cert(), &pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let sans = format!(
            "{:?}",
            cert.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(sans.contains("coord.example"), "{sans}");
        assert!(
            sans.contains("spiffe://faultline/coordinator/coordinator"),
            "{sans}"
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);

        let pem = std::fs::read_to_string(dir.agent_cert("agent-1")).unwrap();
        let der = first_cert_der(&dir.agent_cert("agent-1"), &pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(
            eku.client_auth && !eku.server_auth,
            "agents must not be servers"
        );
        let ca_pem = std::fs::read_to_string(dir.ca_cert()).unwrap();
        let ca_der = first_cert_der(&dir.ca_cert(), &ca_pem).unwrap();
        let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
        assert!(ca.is_ca());
        assert_eq!(cert.issuer(), ca.subject());
    }

    #[test]
    fn refuses_to_overwrite_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        init(&opts(tmp.path())).unwrap();
        let dir = CertDir::new(tmp.path());
        let before = std::fs::read(dir.ca_key()).unwrap();
        let mtime_before = std::fs::metadata(dir.ca_key()).unwrap().modified().unwrap();

        // A new agent would be a new file, but the existing CA files must block everything.
        let mut again = opts(tmp.path());
        again.agents.push("agent-3".to_owned());
        let err = init(&again).unwrap_err();
        match &err {
            TlsError::AlreadyExists { path } => assert_eq!(path, &dir.ca_cert()),
            other => panic!("unexpected error {other}"),
        }
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert_eq!(std::fs::read(dir.ca_key()).unwrap(), before);
        assert_eq!(
            std::fs::metadata(dir.ca_key()).unwrap().modified().unwrap(),
            mtime_before
        );
        assert!(!dir.agent_cert("agent-3").exists(), "agent-3 was written");
    }

    #[test]
    fn a_single_existing_file_blocks_init() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CertDir::new(tmp.path());
        std::fs::write(dir.verifying_key(), "keep me").unwrap();
        let err = init(&opts(tmp.path())).unwrap_err();
        assert!(err.to_string().contains("command-signing.pub"), "{err}");
        assert_eq!(listing(tmp.path()), vec!["command-signing.pub".to_owned()]);
        assert_eq!(
            std::fs::read_to_string(dir.verifying_key()).unwrap(),
            "keep me"
        );
    }

    #[test]
    fn force_overwrites() {
        let tmp = tempfile::tempdir().unwrap();
        init(&opts(tmp.path())).unwrap();
        let dir = CertDir::new(tmp.path());
        let old_ca = std::fs::read(dir.ca_cert()).unwrap();
        // A pre-existing loose mode must not survive the rewrite.
        std::fs::set_permissions(dir.ca_cert(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut o = opts(tmp.path());
        o.force = true;
        let report = init(&o).unwrap();
        assert_eq!(report.written.len(), 12);
        assert_ne!(std::fs::read(dir.ca_cert()).unwrap(), old_ca);
        assert_eq!(
            std::fs::metadata(dir.ca_cert()).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(listing(tmp.path()).len(), 12, "temporary files left behind");
    }

    #[test]
    fn bad_names_and_options_are_refused_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("certs");
        let cases: Vec<(InitOptions, &str)> = vec![
            (
                InitOptions {
                    agents: vec!["a".into(), "b".into(), "a".into()],
                    ..InitOptions::new(&root)
                },
                "more than once",
            ),
            (
                InitOptions {
                    agents: vec!["ok".into(), "bad/name".into()],
                    ..InitOptions::new(&root)
                },
                "bad/name",
            ),
            (
                InitOptions {
                    agents: vec!["".into()],
                    ..InitOptions::new(&root)
                },
                "empty",
            ),
            (
                InitOptions {
                    operator_name: "al ice".into(),
                    ..InitOptions::new(&root)
                },
                "operator",
            ),
            (
                InitOptions {
                    coordinator_hosts: vec![],
                    ..InitOptions::new(&root)
                },
                "coordinator host",
            ),
            (
                InitOptions {
                    coordinator_hosts: vec!["bad host".into()],
                    ..InitOptions::new(&root)
                },
                "bad host",
            ),
            (
                InitOptions {
                    validity_days: 0,
                    ..InitOptions::new(&root)
                },
                "at least one day",
            ),
            (
                InitOptions {
                    validity_days: u32::MAX,
                    ..InitOptions::new(&root)
                },
                "9999",
            ),
        ];
        for (o, needle) in cases {
            let err = init(&o).unwrap_err();
            assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
            assert!(
                !root.exists(),
                "{} was created for {needle}",
                root.display()
            );
        }
    }

    #[test]
    fn signing_keys_load_and_match() {
        let tmp = tempfile::tempdir().unwrap();
        init(&opts(tmp.path())).unwrap();
        let dir = CertDir::new(tmp.path());
        let signing = load_signing_key(&dir.signing_key()).unwrap();
        let verifying = load_verifying_key(&dir.verifying_key()).unwrap();
        assert_eq!(signing.verifying_key(), verifying);
        let sig = signing.sign(b"apply fault f-1");
        verifying.verify(b"apply fault f-1", &sig).unwrap();
        assert!(verifying.verify(b"apply fault f-2", &sig).is_err());
        let pem = std::fs::read_to_string(dir.signing_key()).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        let pem = std::fs::read_to_string(dir.verifying_key()).unwrap();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    }

    #[test]
    fn issue_leaf_adds_an_agent() {
        let tmp = tempfile::tempdir().unwrap();
        init(&opts(tmp.path())).unwrap();
        let ca_dir = CertDir::new(tmp.path());

        // Same directory: only the two leaf files are written.
        let report = issue_leaf(&ca_dir, Role::Agent, "agent-9", &ca_dir, false).unwrap();
        assert_eq!(
            report.written,
            vec![ca_dir.agent_cert("agent-9"), ca_dir.agent_key("agent-9")]
        );
        assert_eq!(
            cert_identity(&ca_dir.agent_cert("agent-9")).to_string(),
            "agent/agent-9"
        );
        let err = issue_leaf(&ca_dir, Role::Agent, "agent-9", &ca_dir, false).unwrap_err();
        assert!(matches!(err, TlsError::AlreadyExists { .. }), "{err}");
        issue_leaf(&ca_dir, Role::Agent, "agent-9", &ca_dir, true).unwrap();

        // Another directory gets ca.pem as well.
        let other = tempfile::tempdir().unwrap();
        let out = CertDir::new(other.path().join("host"));
        let report = issue_leaf(&ca_dir, Role::Operator, "bob", &out, false).unwrap();
        assert_eq!(report.written.len(), 3);
        assert_eq!(
            std::fs::read(out.ca_cert()).unwrap(),
            std::fs::read(ca_dir.ca_cert()).unwrap()
        );
        assert_eq!(
            cert_identity(&out.operator_cert()).to_string(),
            "operator/bob"
        );
        for path in &report.written {
            assert_eq!(std::fs::metadata(path).unwrap().mode() & 0o777, 0o600);
        }

        assert!(issue_leaf(&ca_dir, Role::Coordinator, "c", &out, true).is_err());
        assert!(issue_leaf(&ca_dir, Role::Agent, "no good", &out, true).is_err());
        let missing = CertDir::new(other.path().join("nothing"));
        let err = issue_leaf(&missing, Role::Agent, "x", &out, true).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[test]
    fn issue_leaf_refuses_a_mismatched_ca_key() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init(&opts(a.path())).unwrap();
        init(&opts(b.path())).unwrap();
        let dir_a = CertDir::new(a.path());
        std::fs::copy(CertDir::new(b.path()).ca_key(), dir_a.ca_key()).unwrap();
        let err = issue_leaf(&dir_a, Role::Agent, "x", &dir_a, false).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }
}
