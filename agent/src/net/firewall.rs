//! Firewall faults inside a network namespace: partition (drop / reject), random loss, DNS
//! failure, and the NFQUEUE hand-off used by the delay fallback ([`super::delay`]).
//!
//! Everything Faultline adds lives in objects of its own, named after the fault's tag, so the
//! undo deletes exactly what was made and the start-up [`sweep`] can find leftovers:
//!
//! - **nft** (preferred): one `table inet <tag>` with base chains `input` / `output` hooked at
//!   priority `filter - 10` (DNS: `raw - 10`, so a DNAT'd resolver such as Docker's 127.0.0.11
//!   is still seen as port 53), policy accept. The table is created in one atomic `nft -f -`
//!   transaction and deleted with one command.
//! - **iptables** (`iptables-nft` or `iptables-legacy`, and the `ip6tables-*` twins): chains
//!   `<tag>-IN` / `<tag>-OUT` in the `filter` table (delay: `mangle`, so a re-injected packet
//!   still meets the host's own filter rules) reached by `-I INPUT 1 -j <tag>-IN` /
//!   `-I OUTPUT 1 -j <tag>-OUT`, inserted last so the fault starts only once complete.
//!
//! The NFQUEUE rule for delay always goes through iptables (`-j NFQUEUE --queue-bypass`): many
//! kernels (this project's CI among them) lack nft's own `queue` expression
//! (`CONFIG_NFT_QUEUE`), while the xtables target works on nf_tables hosts via `iptables-nft`.
//!
//! Exemptions (the agent's coordinator connection, loopback) use `accept` in our own nft base
//! chain, which only ends *our* chain, and `RETURN` in iptables (an `ACCEPT` there would also
//! skip the host's own filter rules behind our jump).
//!
//! [`plan`] is pure (it only checks whether the target is the agent's own namespace); the
//! command lists it returns are pinned down by the unit tests below.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use faultline_domain::fault::{Direction, NetScope, PartitionMode, Protocol};
use serde::{Deserialize, Serialize};

use super::{TAG_PREFIX, delay};
use crate::sys::command::{CommandError, CommandRunner, CommandSpec};
use crate::sys::netns::{Netns, NetnsError};
use crate::verification::Verification;

/// Priority of our nft base chains: just before the default `filter` (0).
pub const NFT_PRIORITY: i32 = -10;
/// Priority of the DNS fault's output chain: before conntrack and NAT (`raw - 10`), so queries
/// to a resolver that is DNAT'd in the same namespace (Docker's 127.0.0.11) still show port 53.
pub const NFT_DNS_PRIORITY: i32 = -310;
/// `-w` seconds given to every iptables call (xtables lock).
const IPTABLES_WAIT: &str = "5";
/// Most ports one `-m multiport` match takes.
const MULTIPORT_MAX: usize = 15;

// ------------------------------------------------------------------------------------------
// Public types
// ------------------------------------------------------------------------------------------

/// Which tool family owns this host's firewall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FirewallBackend {
    /// Native nftables: our own `table inet <tag>`.
    Nft,
    /// `iptables-nft` / `ip6tables-nft` (xtables syntax over nf_tables).
    IptablesNft,
    /// `iptables-legacy` / `ip6tables-legacy` (x_tables).
    IptablesLegacy,
}

impl FirewallBackend {
    /// The tool name as people know it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Nft => "nft",
            Self::IptablesNft => "iptables-nft",
            Self::IptablesLegacy => "iptables-legacy",
        }
    }

    /// The iptables program for `v6` (None for native nft).
    fn iptables_program(&self, family: Family) -> Option<&'static str> {
        match (self, family) {
            (Self::Nft, _) => None,
            (Self::IptablesNft, Family::V4) => Some("iptables-nft"),
            (Self::IptablesNft, Family::V6) => Some("ip6tables-nft"),
            (Self::IptablesLegacy, Family::V4) => Some("iptables-legacy"),
            (Self::IptablesLegacy, Family::V6) => Some("ip6tables-legacy"),
        }
    }
}

impl fmt::Display for FirewallBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallCaps {
    /// The backend faults will use; `None` when no firewall tool works.
    pub backend: Option<FirewallBackend>,
    /// Random drop works (nft `numgen`, iptables `-m statistic`): needed for loss.
    pub statistic: bool,
    /// `-j NFQUEUE --queue-bypass` works (through iptables even on nft hosts): needed for the
    /// delay fallback.
    pub nfqueue: bool,
    /// Reject with a TCP reset works: needed for reject-mode partitions and DNS.
    pub reject_tcp_reset: bool,
    /// Why this backend was chosen and how each capability was established.
    pub detail: String,
}

/// A fault to express as firewall rules.
#[derive(Debug, Clone, Copy)]
pub enum FirewallFault<'a> {
    /// Drop or reject traffic in scope.
    Partition {
        scope: &'a NetScope,
        mode: PartitionMode,
    },
    /// Drop `basis_points`/10000 of the packets in scope, at random (on ingress unless the
    /// scope says egress).
    Loss {
        scope: &'a NetScope,
        basis_points: u32,
    },
    /// Drop or reject the target's outgoing DNS (UDP and TCP port 53).
    Dns { mode: PartitionMode },
    /// Hand the traffic in scope to NFQUEUE `queue`, where a [`delay::DelayDaemon`] holds it
    /// (egress unless the scope says ingress, so a round trip is delayed once, as with netem).
    Delay { scope: &'a NetScope, queue: u16 },
}

/// One chain we created, and the hook that leads to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChainRef {
    /// `nft`, `iptables-nft`, `ip6tables-legacy`, ...
    pub program: String,
    /// nft: `inet <tag>`; iptables: `filter` or `mangle`.
    pub table: String,
    /// nft: `input` / `output`; iptables: `<tag>-IN` / `<tag>-OUT`.
    pub chain: String,
    /// nft: the hook (`input` / `output`); iptables: the built-in chain holding our jump
    /// (`INPUT` / `OUTPUT`).
    pub hook: String,
}

/// Everything needed to remove a firewall fault, journaled before it is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallUndo {
    pub netns: Netns,
    pub tag: String,
    /// The tool family actually used (delay on an nft host uses `IptablesNft`).
    pub backend: FirewallBackend,
    /// nft: the table, as `inet <tag>`; `None` for iptables.
    pub nft_table: Option<String>,
    /// Every chain created (for nft: the base chains of `nft_table`).
    pub chains: Vec<ChainRef>,
    /// NFQUEUE number used (delay): undo also stops the registered daemon of this tag.
    pub queue: Option<u16>,
    /// How many fault rules (with counters) were made, exemptions excluded.
    pub fault_rules: usize,
}

/// The commands for one fault, and its undo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallPlan {
    pub undo: FirewallUndo,
    /// Human-readable description, e.g. `nft table inet flt… (drop)`.
    pub mechanism: String,
    /// The exact commands [`apply`] runs, in order.
    pub apply: Vec<CommandSpec>,
}

/// Network fault failures, with the command line and namespace concerned.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid network fault: {0}")]
    Invalid(String),
    #[error("no usable firewall tool on this host: {0}")]
    NoBackend(String),
    #[error("{what} is not available with {backend}: {detail}")]
    Unsupported {
        what: String,
        backend: String,
        detail: String,
    },
    #[error("in network namespace {netns}: {source}")]
    Command {
        netns: String,
        #[source]
        source: Box<CommandError>,
    },
    #[error(
        "applying {tag} in network namespace {netns} failed: {source}; rolled back: {rollback}"
    )]
    Apply {
        tag: String,
        netns: String,
        #[source]
        source: Box<CommandError>,
        rollback: String,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("delay daemon for NFQUEUE {queue} in network namespace {netns}: {message}")]
    Delay {
        queue: u16,
        netns: String,
        message: String,
    },
    #[error("sweeping network namespace {netns}: removed {removed:?}, failed: {}", failures.join("; "))]
    Sweep {
        netns: String,
        removed: Vec<String>,
        failures: Vec<String>,
    },
}

/// How a namespace is named in errors and logs.
pub(crate) fn describe_netns(netns: &Netns) -> String {
    format!("{} (inode {})", netns.path.display(), netns.inode)
}

fn command_error(netns: &Netns, source: CommandError) -> NetError {
    NetError::Command {
        netns: describe_netns(netns),
        source: Box::new(source),
    }
}

// ------------------------------------------------------------------------------------------
// Probe
// ------------------------------------------------------------------------------------------

/// Finds which firewall this host uses, without mixing silently: legacy iptables when the
/// legacy tables hold rules and nft holds none; otherwise native nft when `nft` works;
/// otherwise `iptables-nft`. Capabilities are tried for real in a throw-away namespace
/// (`unshare --net`), so nothing on the host changes.
pub async fn probe<C: CommandRunner>(runner: &C) -> FirewallCaps {
    let mut notes = Vec::new();

    let nft = runner
        .run(&CommandSpec::new("nft", ["list", "ruleset"]))
        .await;
    let (nft_works, nft_tables) = match &nft {
        Ok(out) if out.success() => {
            let tables: Vec<String> = out
                .stdout
                .lines()
                .filter_map(|line| line.strip_prefix("table "))
                .map(|rest| rest.trim_end_matches(" {").trim().to_string())
                .filter(|table| {
                    !table
                        .split_whitespace()
                        .nth(1)
                        .is_some_and(|n| n.starts_with(TAG_PREFIX))
                })
                .collect();
            (true, tables)
        }
        Ok(out) => {
            notes.push(format!("`nft list ruleset` failed: {}", out.stderr.trim()));
            (false, Vec::new())
        }
        Err(err) => {
            notes.push(format!("nft unusable: {err}"));
            (false, Vec::new())
        }
    };

    let legacy_rules = legacy_rule_count(runner, None).await;
    let legacy_available = tool_works(runner, "iptables-legacy").await;
    let iptables_nft_available = tool_works(runner, "iptables-nft").await;

    let (backend, why) = if legacy_rules > 0 && nft_tables.is_empty() {
        (
            Some(FirewallBackend::IptablesLegacy),
            format!(
                "legacy iptables holds {legacy_rules} rule(s)/chain(s) and nft none: using iptables-legacy so rules are not split across two firewalls"
            ),
        )
    } else if nft_works {
        let mut why = format!(
            "nft works ({} table(s) present: {}): using native nft tables `table inet <tag>`",
            nft_tables.len(),
            if nft_tables.is_empty() {
                "none".to_string()
            } else {
                nft_tables.join(", ")
            }
        );
        if legacy_rules > 0 {
            why.push_str(&format!(
                "; note: legacy iptables also holds {legacy_rules} rule(s)/chain(s) (both firewalls are in force on this host)"
            ));
        }
        (Some(FirewallBackend::Nft), why)
    } else if iptables_nft_available {
        (
            Some(FirewallBackend::IptablesNft),
            "nft unusable, iptables-nft works: using iptables-nft".to_string(),
        )
    } else if legacy_available {
        (
            Some(FirewallBackend::IptablesLegacy),
            "nft and iptables-nft unusable, iptables-legacy works".to_string(),
        )
    } else {
        (
            None,
            "no firewall tool works (nft, iptables-nft, iptables-legacy)".to_string(),
        )
    };

    let mut caps = FirewallCaps {
        backend,
        statistic: false,
        nfqueue: false,
        reject_tcp_reset: false,
        detail: String::new(),
    };
    let mut lines = vec![why];
    if let Some(backend) = backend {
        let (statistic, reject, nfqueue) = capability_scripts(backend);
        for (what, spec, flag) in [
            ("random drop", statistic, &mut caps.statistic),
            ("reject with tcp reset", reject, &mut caps.reject_tcp_reset),
            (
                "NFQUEUE with bypass (via iptables)",
                nfqueue,
                &mut caps.nfqueue,
            ),
        ] {
            match runner.run(&spec).await {
                Ok(out) if out.success() => {
                    *flag = true;
                    lines.push(format!("{what}: yes (tried in a scratch namespace)"));
                }
                Ok(out) if out.stderr.trim_start().starts_with("unshare:") => {
                    // No scratch namespace (e.g. no CAP_SYS_ADMIN): cannot try.
                    *flag = true;
                    lines.push(format!(
                        "{what}: assumed (not tried: {})",
                        first_line(&out.stderr)
                    ));
                }
                Ok(out) => lines.push(format!("{what}: no ({})", first_line(&out.stderr))),
                Err(CommandError::Spawn { .. }) => {
                    // `unshare` missing: cannot try; apply still rolls back if the kernel refuses.
                    *flag = true;
                    lines.push(format!("{what}: assumed (unshare unavailable, not tried)"));
                }
                Err(err) => lines.push(format!("{what}: no ({err})")),
            }
        }
    }
    lines.extend(notes);
    caps.detail = lines.join("; ");
    caps
}

fn first_line(text: &str) -> String {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

async fn tool_works<C: CommandRunner>(runner: &C, program: &str) -> bool {
    runner
        .run(&CommandSpec::new(program, ["--version"]))
        .await
        .is_ok_and(|o| o.success())
}

/// Rules and user chains in the legacy x_tables of `netns` (None: the agent's), not counting
/// our own. Reads `/proc/net/ip*_tables_names` first so a host without legacy tables does not
/// get them instantiated by the look.
async fn legacy_rule_count<C: CommandRunner>(runner: &C, netns: Option<&Netns>) -> usize {
    let mut count = 0;
    for (names, save) in [
        ("/proc/net/ip_tables_names", "iptables-legacy-save"),
        ("/proc/net/ip6_tables_names", "ip6tables-legacy-save"),
    ] {
        let mut cat = CommandSpec::new("cat", [names]);
        let mut dump = CommandSpec::new(save, Vec::<String>::new());
        if let Some(ns) = netns {
            cat = cat.in_netns(ns);
            dump = dump.in_netns(ns);
        }
        let loaded = runner
            .run(&cat)
            .await
            .is_ok_and(|o| o.success() && !o.stdout.trim().is_empty());
        if !loaded {
            continue;
        }
        if let Ok(out) = runner.run(&dump).await
            && out.success()
        {
            count += out
                .stdout
                .lines()
                .filter(|l| l.starts_with("-A ") || l.starts_with("-N "))
                .filter(|l| {
                    !l.split_whitespace()
                        .nth(1)
                        .is_some_and(|c| c.starts_with(TAG_PREFIX))
                })
                .count();
        }
    }
    count
}

/// Commands trying random drop, reject-with-reset and NFQUEUE in a scratch namespace.
fn capability_scripts(backend: FirewallBackend) -> (CommandSpec, CommandSpec, CommandSpec) {
    let nfq_tool = match backend {
        FirewallBackend::IptablesLegacy => "iptables-legacy",
        _ => "iptables-nft",
    };
    let nfqueue = CommandSpec::new(
        "unshare",
        [
            "--net".to_string(),
            "sh".to_string(),
            "-c".to_string(),
            format!(
                "{nfq_tool} -w 5 -t mangle -N fltprobe && {nfq_tool} -w 5 -t mangle -A fltprobe -j NFQUEUE --queue-num 1000 --queue-bypass"
            ),
        ],
    );
    match backend {
        FirewallBackend::Nft => {
            let script = |rule: &str| {
                format!(
                    "table inet fltprobe {{\n\tchain input {{\n\t\ttype filter hook input priority {NFT_PRIORITY}; policy accept;\n\t\t{rule}\n\t}}\n}}\n"
                )
            };
            let statistic = CommandSpec::new("unshare", ["--net", "nft", "-f", "-"])
                .with_stdin(script("numgen random mod 10000 < 5000 counter drop"));
            let reject = CommandSpec::new("unshare", ["--net", "nft", "-f", "-"])
                .with_stdin(script("meta l4proto tcp counter reject with tcp reset"));
            (statistic, reject, nfqueue)
        }
        FirewallBackend::IptablesNft | FirewallBackend::IptablesLegacy => {
            let tool = backend.iptables_program(Family::V4).unwrap_or("iptables");
            let try_rule = |rule: &str| {
                CommandSpec::new(
                    "unshare",
                    [
                        "--net".to_string(),
                        "sh".to_string(),
                        "-c".to_string(),
                        format!("{tool} -w 5 -N fltprobe && {tool} -w 5 -A fltprobe {rule}"),
                    ],
                )
            };
            (
                try_rule("-m statistic --mode random --probability 0.5 -j DROP"),
                try_rule("-p tcp -j REJECT --reject-with tcp-reset"),
                nfqueue,
            )
        }
    }
}

// ------------------------------------------------------------------------------------------
// Scope
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    Input,
    Output,
}

impl Hook {
    fn nft(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Output => "output",
        }
    }
    fn iptables(self) -> &'static str {
        match self {
            Self::Input => "INPUT",
            Self::Output => "OUTPUT",
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Self::Input => "IN",
            Self::Output => "OUT",
        }
    }
}

/// A network in CIDR form, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("peer {text:?} is not an address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("peer {text:?} has an invalid prefix length"))?,
            None => max,
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(prefix))
                };
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(prefix))
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(Self { addr, prefix })
    }

    fn family(&self) -> Family {
        if self.addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    /// True when this network and the loopback network share addresses.
    fn touches_loopback(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => {
                let bits = u32::from(self.prefix.min(8));
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                u32::from(a) & mask == u32::from(Ipv4Addr::new(127, 0, 0, 0)) & mask
            }
            IpAddr::V6(a) => {
                let bits = u32::from(self.prefix);
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                u128::from(Ipv6Addr::LOCALHOST) & mask == u128::from(a)
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A validated [`NetScope`].
#[derive(Debug, Clone)]
struct Scope {
    v4: Vec<Cidr>,
    v6: Vec<Cidr>,
    ports: Vec<u16>,
    protocol: Protocol,
    direction: Direction,
    names_loopback: bool,
    /// Match ports as destination only (DNS) instead of either side.
    dest_ports_only: bool,
}

impl Scope {
    fn compile(scope: &NetScope) -> Result<Self, NetError> {
        let peers: BTreeSet<Cidr> = scope
            .peers
            .iter()
            .map(|p| Cidr::parse(p))
            .collect::<Result<_, _>>()
            .map_err(NetError::Invalid)?;
        if scope.ports.contains(&0) {
            return Err(NetError::Invalid("port 0 in scope".into()));
        }
        let ports: Vec<u16> = scope
            .ports
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !ports.is_empty() && scope.protocol == Protocol::Icmp {
            return Err(NetError::Invalid(
                "ports make no sense with protocol icmp".into(),
            ));
        }
        Ok(Self {
            names_loopback: peers.iter().any(Cidr::touches_loopback),
            v4: peers
                .iter()
                .copied()
                .filter(|c| c.family() == Family::V4)
                .collect(),
            v6: peers
                .iter()
                .copied()
                .filter(|c| c.family() == Family::V6)
                .collect(),
            ports,
            protocol: scope.protocol,
            direction: scope.direction,
            dest_ports_only: false,
        })
    }

    /// Scope of the DNS fault: egress TCP and UDP to port 53, any peer, loopback included.
    fn dns() -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
            ports: vec![53],
            protocol: Protocol::Any,
            direction: Direction::Egress,
            names_loopback: true,
            dest_ports_only: true,
        }
    }

    fn families(&self) -> Vec<Family> {
        match (self.v4.is_empty(), self.v6.is_empty()) {
            (true, true) => vec![Family::V4, Family::V6],
            (false, true) => vec![Family::V4],
            (true, false) => vec![Family::V6],
            (false, false) => vec![Family::V4, Family::V6],
        }
    }

    fn peers(&self, family: Family) -> &[Cidr] {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    fn has_peers(&self) -> bool {
        !(self.v4.is_empty() && self.v6.is_empty())
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.has_peers() {
            let peers: Vec<String> = self
                .v4
                .iter()
                .chain(&self.v6)
                .map(Cidr::to_string)
                .collect();
            parts.push(format!("peers {}", peers.join(",")));
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
            let side = if self.dest_ports_only {
                "destination"
            } else {
                "either side"
            };
            parts.push(format!("ports {} ({side})", ports.join(",")));
        }
        if self.protocol != Protocol::Any {
            parts.push(format!("{:?}", self.protocol).to_lowercase());
        }
        if parts.is_empty() {
            "all traffic".into()
        } else {
            parts.join(", ")
        }
    }
}

/// What matching packets suffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Drop,
    Reject,
    Loss(u32),
    Queue(u16),
}

/// Protocol of one emitted rule. `NotTcp` follows a TCP reject rule: "everything else".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RuleProto {
    Any,
    Tcp,
    Udp,
    Icmp,
    NotTcp,
}

/// The (protocol, verdict) pairs an action needs: reject answers TCP with a reset and the rest
/// with ICMP port unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Drop,
    RejectTcpReset,
    RejectUnreachable,
    Loss(u32),
    Queue(u16),
}

fn rule_variants(action: Action, protocol: Protocol) -> Vec<(RuleProto, Verdict)> {
    let proto = match protocol {
        Protocol::Any => RuleProto::Any,
        Protocol::Tcp => RuleProto::Tcp,
        Protocol::Udp => RuleProto::Udp,
        Protocol::Icmp => RuleProto::Icmp,
    };
    match action {
        Action::Drop => vec![(proto, Verdict::Drop)],
        Action::Loss(bp) => vec![(proto, Verdict::Loss(bp))],
        Action::Queue(q) => vec![(proto, Verdict::Queue(q))],
        Action::Reject => match protocol {
            Protocol::Any => vec![
                (RuleProto::Tcp, Verdict::RejectTcpReset),
                (RuleProto::NotTcp, Verdict::RejectUnreachable),
            ],
            Protocol::Tcp => vec![(RuleProto::Tcp, Verdict::RejectTcpReset)],
            Protocol::Udp | Protocol::Icmp => vec![(proto, Verdict::RejectUnreachable)],
        },
    }
}

// ------------------------------------------------------------------------------------------
// Plan
// ------------------------------------------------------------------------------------------

/// Checks a tag is ours and fits iptables chain names (`<tag>-OUT` ≤ 28 characters).
fn check_tag(tag: &str) -> Result<(), NetError> {
    if !tag.starts_with(TAG_PREFIX)
        || tag.len() > 24
        || !tag.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Err(NetError::Invalid(format!(
            "tag {tag:?} must start with {TAG_PREFIX:?}, be alphanumeric and at most 24 characters"
        )));
    }
    Ok(())
}

/// Everything [`plan`] decided, before rendering for a backend.
struct Design {
    scope: Scope,
    action: Action,
    hooks: Vec<Hook>,
    /// Exempt loopback traffic.
    exempt_loopback: bool,
    /// Remote endpoints to exempt (only in the agent's own namespace).
    protect: Vec<SocketAddr>,
    nft_priority: i32,
    /// Why the hooks are what they are, for the mechanism text.
    direction_note: String,
    what: String,
}

/// Computes the undo record and the exact commands for `fault` in `netns`. Pure apart from
/// checking whether `netns` is the agent's own (then `protect` endpoints are exempted first).
pub fn plan(
    fault: &FirewallFault,
    netns: &Netns,
    tag: &str,
    caps: &FirewallCaps,
    protect: &[SocketAddr],
) -> Result<FirewallPlan, NetError> {
    plan_with_ownership(fault, netns, tag, caps, protect, netns.is_agents_own())
}

fn plan_with_ownership(
    fault: &FirewallFault,
    netns: &Netns,
    tag: &str,
    caps: &FirewallCaps,
    protect: &[SocketAddr],
    agents_own: bool,
) -> Result<FirewallPlan, NetError> {
    check_tag(tag)?;
    let backend = caps
        .backend
        .ok_or_else(|| NetError::NoBackend(caps.detail.clone()))?;
    let unsupported = |what: &str| NetError::Unsupported {
        what: what.to_string(),
        backend: backend.name().to_string(),
        detail: caps.detail.clone(),
    };
    let protect: Vec<SocketAddr> = if agents_own {
        protect.to_vec()
    } else {
        Vec::new()
    };
    let design = match fault {
        FirewallFault::Partition { scope, mode } => {
            let scope = Scope::compile(scope)?;
            let action = match mode {
                PartitionMode::Drop => Action::Drop,
                PartitionMode::Reject => {
                    if !caps.reject_tcp_reset {
                        return Err(unsupported("reject with tcp reset"));
                    }
                    Action::Reject
                }
            };
            let (hooks, direction_note) = match scope.direction {
                Direction::Both => (vec![Hook::Input, Hook::Output], "both directions"),
                Direction::Ingress => (vec![Hook::Input], "ingress"),
                Direction::Egress => (vec![Hook::Output], "egress"),
            };
            Design {
                exempt_loopback: !scope.names_loopback,
                what: match mode {
                    PartitionMode::Drop => "drop".into(),
                    PartitionMode::Reject => "reject (tcp reset / icmp port-unreachable)".into(),
                },
                scope,
                action,
                hooks,
                protect,
                nft_priority: NFT_PRIORITY,
                direction_note: direction_note.into(),
            }
        }
        FirewallFault::Loss {
            scope,
            basis_points,
        } => {
            if *basis_points == 0 || *basis_points > 10_000 {
                return Err(NetError::Invalid(format!(
                    "loss of {basis_points} basis points (must be 1..=10000)"
                )));
            }
            if !caps.statistic {
                return Err(unsupported("random drop (statistic / numgen)"));
            }
            let scope = Scope::compile(scope)?;
            let (hooks, note) = match scope.direction {
                Direction::Egress => (
                    vec![Hook::Output],
                    "on egress (output hook): local senders are told of these drops and may retry, so loss seen by peers can be lower",
                ),
                Direction::Ingress | Direction::Both => (
                    vec![Hook::Input],
                    "on ingress (input hook; egress drops would be reported to the local sender, which retries)",
                ),
            };
            Design {
                exempt_loopback: !scope.names_loopback,
                what: format!("random drop {}", percent(*basis_points)),
                scope,
                action: Action::Loss(*basis_points),
                hooks,
                protect,
                nft_priority: NFT_PRIORITY,
                direction_note: note.into(),
            }
        }
        FirewallFault::Dns { mode } => {
            let action = match mode {
                PartitionMode::Drop => Action::Drop,
                PartitionMode::Reject => {
                    if !caps.reject_tcp_reset {
                        return Err(unsupported("reject with tcp reset"));
                    }
                    Action::Reject
                }
            };
            Design {
                scope: Scope::dns(),
                action,
                hooks: vec![Hook::Output],
                exempt_loopback: false,
                protect,
                nft_priority: NFT_DNS_PRIORITY,
                direction_note: "egress to port 53 (udp+tcp), loopback resolvers included".into(),
                what: match mode {
                    PartitionMode::Drop => "dns drop".into(),
                    PartitionMode::Reject => "dns reject".into(),
                },
            }
        }
        FirewallFault::Delay { scope, queue } => {
            if !caps.nfqueue {
                return Err(unsupported("NFQUEUE"));
            }
            if !(delay::QUEUE_MIN..=delay::QUEUE_MAX).contains(queue) {
                return Err(NetError::Invalid(format!(
                    "NFQUEUE number {queue} outside {}..={}",
                    delay::QUEUE_MIN,
                    delay::QUEUE_MAX
                )));
            }
            let scope = Scope::compile(scope)?;
            let (hooks, note) = match scope.direction {
                Direction::Ingress => (vec![Hook::Input], "on ingress (input hook)"),
                Direction::Egress | Direction::Both => (
                    vec![Hook::Output],
                    "on egress (output hook: a round trip is delayed once, as with netem)",
                ),
            };
            Design {
                exempt_loopback: !scope.names_loopback,
                what: format!("NFQUEUE {queue} with bypass"),
                scope,
                action: Action::Queue(*queue),
                hooks,
                protect,
                nft_priority: NFT_PRIORITY,
                direction_note: note.into(),
            }
        }
    };

    match (backend, design.action) {
        (FirewallBackend::Nft, Action::Queue(_)) => {
            // nft's own `queue` needs CONFIG_NFT_QUEUE, often missing; the xtables target via
            // iptables-nft lands in nf_tables too, so the host's firewall is still one.
            let mut plan = render_iptables(&design, FirewallBackend::IptablesNft, netns, tag);
            plan.mechanism.push_str(
                "; nft host: NFQUEUE through iptables-nft (nft `queue` expression not relied on)",
            );
            Ok(plan)
        }
        (FirewallBackend::Nft, _) => Ok(render_nft(&design, netns, tag)),
        (other, _) => Ok(render_iptables(&design, other, netns, tag)),
    }
}

fn percent(basis_points: u32) -> String {
    format!("{}.{:02}%", basis_points / 100, basis_points % 100)
}

fn probability(basis_points: u32) -> String {
    format!("{}.{:04}", basis_points / 10_000, basis_points % 10_000)
}

// ----- nft ----------------------------------------------------------------------------------

fn nft_set<T: fmt::Display>(items: &[T]) -> String {
    if items.len() == 1 {
        items[0].to_string()
    } else {
        let parts: Vec<String> = items.iter().map(T::to_string).collect();
        format!("{{ {} }}", parts.join(", "))
    }
}

fn nft_verdict(verdict: Verdict) -> String {
    match verdict {
        Verdict::Drop => "counter drop".into(),
        Verdict::RejectTcpReset => "counter reject with tcp reset".into(),
        Verdict::RejectUnreachable => "counter reject with icmpx type port-unreachable".into(),
        Verdict::Loss(bp) => format!("numgen random mod 10000 < {bp} counter drop"),
        Verdict::Queue(q) => format!("counter queue num {q} bypass"),
    }
}

/// Layer-4 matches for one rule: one without ports, two (dport, sport) with ports (one when
/// only destination ports count).
fn nft_l4(proto: RuleProto, scope: &Scope) -> Vec<Option<String>> {
    let ports = &scope.ports;
    if ports.is_empty() {
        return vec![match proto {
            RuleProto::Any | RuleProto::NotTcp => None,
            RuleProto::Tcp => Some("meta l4proto tcp".into()),
            RuleProto::Udp => Some("meta l4proto udp".into()),
            RuleProto::Icmp => Some("meta l4proto { icmp, ipv6-icmp }".into()),
        }];
    }
    let set = nft_set(ports);
    let sides: &[&str] = if scope.dest_ports_only {
        &["dport"]
    } else {
        &["dport", "sport"]
    };
    sides
        .iter()
        .map(|side| {
            Some(match proto {
                RuleProto::Tcp => format!("tcp {side} {set}"),
                RuleProto::Udp | RuleProto::NotTcp => format!("udp {side} {set}"),
                RuleProto::Any | RuleProto::Icmp => {
                    format!("meta l4proto {{ tcp, udp }} th {side} {set}")
                }
            })
        })
        .collect()
}

fn nft_rules(design: &Design, hook: Hook) -> (Vec<String>, usize) {
    let mut rules = Vec::new();
    let (addr_dir, port_dir, iface) = match hook {
        Hook::Input => ("saddr", "sport", "iifname"),
        Hook::Output => ("daddr", "dport", "oifname"),
    };
    for endpoint in &design.protect {
        let ip = if endpoint.is_ipv4() { "ip" } else { "ip6" };
        rules.push(format!(
            "{ip} {addr_dir} {} tcp {port_dir} {} accept",
            endpoint.ip(),
            endpoint.port()
        ));
    }
    if design.exempt_loopback {
        rules.push(format!("{iface} \"lo\" accept"));
    }
    if design.action == Action::Reject {
        // The resets and unreachables our reject sends must not be caught by our other chain.
        rules.push("tcp flags & rst == rst accept".into());
        rules.push("icmp type destination-unreachable accept".into());
        rules.push("icmpv6 type destination-unreachable accept".into());
    }
    let scope = &design.scope;
    let addr_matches: Vec<Option<String>> = if scope.has_peers() {
        scope
            .families()
            .into_iter()
            .map(|family| {
                let ip = if family == Family::V4 { "ip" } else { "ip6" };
                Some(format!("{ip} {addr_dir} {}", nft_set(scope.peers(family))))
            })
            .collect()
    } else {
        vec![None]
    };
    let mut count = 0;
    for addr in &addr_matches {
        for (proto, verdict) in rule_variants(design.action, scope.protocol) {
            for l4 in nft_l4(proto, scope) {
                let parts: Vec<String> = [addr.clone(), l4, Some(nft_verdict(verdict))]
                    .into_iter()
                    .flatten()
                    .collect();
                rules.push(parts.join(" "));
                count += 1;
            }
        }
    }
    (rules, count)
}

fn render_nft(design: &Design, netns: &Netns, tag: &str) -> FirewallPlan {
    let table = format!("inet {tag}");
    let mut script = format!("add table {table}\ndelete table {table}\ntable {table} {{\n");
    let mut chains = Vec::new();
    let mut fault_rules = 0;
    for hook in &design.hooks {
        let (rules, count) = nft_rules(design, *hook);
        fault_rules += count;
        script.push_str(&format!(
            "\tchain {name} {{\n\t\ttype filter hook {name} priority {prio}; policy accept;\n",
            name = hook.nft(),
            prio = design.nft_priority
        ));
        for rule in rules {
            script.push_str(&format!("\t\t{rule}\n"));
        }
        script.push_str("\t}\n");
        chains.push(ChainRef {
            program: "nft".into(),
            table: table.clone(),
            chain: hook.nft().into(),
            hook: hook.nft().into(),
        });
    }
    script.push_str("}\n");
    let hooks: Vec<&str> = design.hooks.iter().map(|h| h.nft()).collect();
    let mechanism = format!(
        "nft table {table} ({what}; {scope}; {dir}; hooks {hooks} at priority {prio}{lo}{prot})",
        what = design.what,
        scope = design.scope.describe(),
        dir = design.direction_note,
        hooks = hooks.join("+"),
        prio = design.nft_priority,
        lo = if design.exempt_loopback {
            "; loopback exempt"
        } else {
            ""
        },
        prot = protect_note(&design.protect),
    );
    FirewallPlan {
        undo: FirewallUndo {
            netns: netns.clone(),
            tag: tag.to_string(),
            backend: FirewallBackend::Nft,
            nft_table: Some(table),
            chains,
            queue: None,
            fault_rules,
        },
        mechanism,
        apply: vec![
            CommandSpec::new("nft", ["-f", "-"])
                .with_stdin(script)
                .in_netns(netns),
        ],
    }
}

fn protect_note(protect: &[SocketAddr]) -> String {
    if protect.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = protect.iter().map(SocketAddr::to_string).collect();
        format!("; agent's own namespace: {} exempt first", list.join(", "))
    }
}

// ----- iptables -----------------------------------------------------------------------------

fn iptables_args<I, S>(table: &str, rest: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut args: Vec<String> = vec!["-w".into(), IPTABLES_WAIT.into(), "-t".into(), table.into()];
    args.extend(rest.into_iter().map(Into::into));
    args
}

fn iptables_verdict(verdict: Verdict, family: Family) -> Vec<String> {
    let words: Vec<String> = match verdict {
        Verdict::Drop => vec!["-j".into(), "DROP".into()],
        Verdict::RejectTcpReset => vec![
            "-j".into(),
            "REJECT".into(),
            "--reject-with".into(),
            "tcp-reset".into(),
        ],
        Verdict::RejectUnreachable => vec![
            "-j".into(),
            "REJECT".into(),
            "--reject-with".into(),
            match family {
                Family::V4 => "icmp-port-unreachable".into(),
                Family::V6 => "icmp6-port-unreachable".into(),
            },
        ],
        Verdict::Loss(bp) => vec![
            "-m".into(),
            "statistic".into(),
            "--mode".into(),
            "random".into(),
            "--probability".into(),
            probability(bp),
            "-j".into(),
            "DROP".into(),
        ],
        Verdict::Queue(q) => vec![
            "-j".into(),
            "NFQUEUE".into(),
            "--queue-num".into(),
            q.to_string(),
            "--queue-bypass".into(),
        ],
    };
    words
}

/// Protocol (and multiport) matches for one rule; several when ports exceed one multiport or
/// the protocol is "tcp and udp".
fn iptables_l4(proto: RuleProto, scope: &Scope, family: Family) -> Vec<Vec<String>> {
    let ports = &scope.ports;
    let icmp = match family {
        Family::V4 => "icmp",
        Family::V6 => "ipv6-icmp",
    };
    if ports.is_empty() {
        return vec![match proto {
            RuleProto::Any | RuleProto::NotTcp => vec![],
            RuleProto::Tcp => vec!["-p".into(), "tcp".into()],
            RuleProto::Udp => vec!["-p".into(), "udp".into()],
            RuleProto::Icmp => vec!["-p".into(), icmp.into()],
        }];
    }
    let protocols: &[&str] = match proto {
        RuleProto::Tcp => &["tcp"],
        RuleProto::Udp | RuleProto::NotTcp => &["udp"],
        RuleProto::Any | RuleProto::Icmp => &["tcp", "udp"],
    };
    let mut out = Vec::new();
    for p in protocols {
        for chunk in ports.chunks(MULTIPORT_MAX) {
            let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
            out.push(vec![
                "-p".into(),
                (*p).into(),
                "-m".into(),
                "multiport".into(),
                if scope.dest_ports_only {
                    "--dports"
                } else {
                    "--ports"
                }
                .into(),
                list.join(","),
            ]);
        }
    }
    out
}

fn render_iptables(
    design: &Design,
    backend: FirewallBackend,
    netns: &Netns,
    tag: &str,
) -> FirewallPlan {
    let table = match design.action {
        Action::Queue(_) => "mangle",
        _ => "filter",
    };
    let scope = &design.scope;
    let mut apply = Vec::new();
    let mut jumps = Vec::new();
    let mut chains = Vec::new();
    let mut fault_rules = 0;
    let mut programs = Vec::new();
    for family in scope.families() {
        let Some(program) = backend.iptables_program(family) else {
            continue;
        };
        programs.push(program);
        for hook in &design.hooks {
            let chain = format!("{tag}-{}", hook.suffix());
            let run = |rest: Vec<String>| {
                CommandSpec::new(program, iptables_args(table, rest)).in_netns(netns)
            };
            apply.push(run(vec!["-N".into(), chain.clone()]));
            let (addr_flag, port_flag, iface_flag) = match hook {
                Hook::Input => ("-s", "--sport", "-i"),
                Hook::Output => ("-d", "--dport", "-o"),
            };
            for endpoint in &design.protect {
                if (family == Family::V4) != endpoint.is_ipv4() {
                    continue;
                }
                let host = match endpoint.ip() {
                    IpAddr::V4(a) => format!("{a}/32"),
                    IpAddr::V6(a) => format!("{a}/128"),
                };
                apply.push(run(vec![
                    "-A".into(),
                    chain.clone(),
                    addr_flag.into(),
                    host,
                    "-p".into(),
                    "tcp".into(),
                    port_flag.into(),
                    endpoint.port().to_string(),
                    "-j".into(),
                    "RETURN".into(),
                ]));
            }
            if design.exempt_loopback {
                apply.push(run(vec![
                    "-A".into(),
                    chain.clone(),
                    iface_flag.into(),
                    "lo".into(),
                    "-j".into(),
                    "RETURN".into(),
                ]));
            }
            if design.action == Action::Reject {
                // The resets and unreachables our reject sends must pass our other chain.
                apply.push(run(vec![
                    "-A".into(),
                    chain.clone(),
                    "-p".into(),
                    "tcp".into(),
                    "--tcp-flags".into(),
                    "RST".into(),
                    "RST".into(),
                    "-j".into(),
                    "RETURN".into(),
                ]));
                let (icmp, flag) = match family {
                    Family::V4 => ("icmp", "--icmp-type"),
                    Family::V6 => ("ipv6-icmp", "--icmpv6-type"),
                };
                apply.push(run(vec![
                    "-A".into(),
                    chain.clone(),
                    "-p".into(),
                    icmp.into(),
                    flag.into(),
                    "destination-unreachable".into(),
                    "-j".into(),
                    "RETURN".into(),
                ]));
            }
            let addr: Vec<String> = if scope.has_peers() {
                let list: Vec<String> = scope.peers(family).iter().map(Cidr::to_string).collect();
                vec![addr_flag.into(), list.join(",")]
            } else {
                Vec::new()
            };
            for (proto, verdict) in rule_variants(design.action, scope.protocol) {
                for l4 in iptables_l4(proto, scope, family) {
                    let mut rest = vec!["-A".to_string(), chain.clone()];
                    rest.extend(addr.iter().cloned());
                    rest.extend(l4);
                    rest.extend(iptables_verdict(verdict, family));
                    apply.push(run(rest));
                    // `-s a,b` expands into one rule per network.
                    fault_rules += if scope.has_peers() {
                        scope.peers(family).len()
                    } else {
                        1
                    };
                }
            }
            jumps.push(run(vec![
                "-I".into(),
                hook.iptables().into(),
                "1".into(),
                "-j".into(),
                chain.clone(),
            ]));
            chains.push(ChainRef {
                program: program.into(),
                table: table.into(),
                chain,
                hook: hook.iptables().into(),
            });
        }
    }
    apply.extend(jumps);
    let chain_names: BTreeSet<&str> = chains.iter().map(|c| c.chain.as_str()).collect();
    let mechanism = format!(
        "{} chains {} in {table} ({what}; {scope}; {dir}{lo}{prot})",
        programs.join("+"),
        chain_names.into_iter().collect::<Vec<_>>().join("/"),
        what = design.what,
        scope = scope.describe(),
        dir = design.direction_note,
        lo = if design.exempt_loopback {
            "; loopback exempt"
        } else {
            ""
        },
        prot = protect_note(&design.protect),
    );
    FirewallPlan {
        undo: FirewallUndo {
            netns: netns.clone(),
            tag: tag.to_string(),
            backend,
            nft_table: None,
            chains,
            queue: match design.action {
                Action::Queue(q) => Some(q),
                _ => None,
            },
            fault_rules,
        },
        mechanism,
        apply,
    }
}

// ------------------------------------------------------------------------------------------
// Apply / verify / undo / sweep
// ------------------------------------------------------------------------------------------

/// Runs the plan's commands in order; on failure removes whatever was made, then reports.
pub async fn apply<C: CommandRunner>(runner: &C, plan: &FirewallPlan) -> Result<(), NetError> {
    for spec in &plan.apply {
        if let Err(source) = runner.run_checked(spec).await {
            let rollback = match undo(runner, &plan.undo).await {
                Ok(text) => text,
                Err(err) => format!("rollback failed too: {err}"),
            };
            return Err(NetError::Apply {
                tag: plan.undo.tag.clone(),
                netns: describe_netns(&plan.undo.netns),
                source: Box::new(source),
                rollback,
            });
        }
    }
    Ok(())
}

/// Sums `counter packets N bytes M` (nft) or `-c N M` (iptables -v -S) over fault rules.
fn sum_counters(text: &str) -> (usize, u64, u64) {
    let mut rules = 0;
    let (mut packets, mut bytes) = (0u64, 0u64);
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "packets")
            && words.get(i.wrapping_sub(1)) == Some(&"counter")
        {
            rules += 1;
            packets += words
                .get(i + 1)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0);
            bytes += words
                .get(i + 3)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0);
        } else if words.first() == Some(&"-A")
            && !line.ends_with("-j RETURN")
            && let Some(i) = words.iter().position(|w| *w == "-c")
        {
            rules += 1;
            packets += words
                .get(i + 1)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0);
            bytes += words
                .get(i + 2)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (rules, packets, bytes)
}

fn is_missing(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    s.contains("no such file or directory")
        || s.contains("does not exist")
        || s.contains("no chain/target/match")
        || s.contains("is incompatible")
}

/// Checks our table/chains and jumps are in place, with packet counters in the detail.
pub async fn verify<C: CommandRunner>(
    runner: &C,
    undo: &FirewallUndo,
) -> Result<Verification, NetError> {
    if !undo.netns.still_exists() {
        return Ok(Verification {
            effective: false,
            detail: "namespace gone".into(),
        });
    }
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut total = 0u64;
    if let Some(table) = &undo.nft_table {
        let mut args = vec!["list".to_string(), "table".to_string()];
        args.extend(table.split_whitespace().map(String::from));
        let spec = CommandSpec::new("nft", args).in_netns(&undo.netns);
        let out = runner
            .run(&spec)
            .await
            .map_err(|e| command_error(&undo.netns, e))?;
        if !out.success() {
            problems.push(format!(
                "nft table {table} missing ({})",
                first_line(&out.stderr)
            ));
        } else {
            for chain in &undo.chains {
                if !out.stdout.contains(&format!("chain {} {{", chain.chain)) {
                    problems.push(format!("chain {} missing from {table}", chain.chain));
                }
            }
            let (rules, packets, bytes) = sum_counters(&out.stdout);
            total += packets;
            if rules < undo.fault_rules {
                problems.push(format!(
                    "{rules} of {} fault rules present",
                    undo.fault_rules
                ));
            }
            notes.push(format!(
                "nft table {table}: {rules} fault rule(s), matched {packets} packets / {bytes} bytes"
            ));
        }
    }
    for chain in undo.chains.iter().filter(|c| c.program != "nft") {
        let list = CommandSpec::new(
            &chain.program,
            iptables_args(&chain.table, ["-v", "-S", chain.chain.as_str()]),
        )
        .in_netns(&undo.netns);
        let out = runner
            .run(&list)
            .await
            .map_err(|e| command_error(&undo.netns, e))?;
        if !out.success() {
            problems.push(format!(
                "{} chain {} missing ({})",
                chain.program,
                chain.chain,
                first_line(&out.stderr)
            ));
            continue;
        }
        let (rules, packets, bytes) = sum_counters(&out.stdout);
        total += packets;
        notes.push(format!(
            "{} {}/{}: {rules} fault rule(s), matched {packets} packets / {bytes} bytes",
            chain.program, chain.table, chain.chain
        ));
        if rules == 0 {
            problems.push(format!(
                "{} chain {} holds no fault rule",
                chain.program, chain.chain
            ));
        }
        let hook = CommandSpec::new(
            &chain.program,
            iptables_args(&chain.table, ["-S", chain.hook.as_str()]),
        )
        .in_netns(&undo.netns);
        let out = runner
            .run(&hook)
            .await
            .map_err(|e| command_error(&undo.netns, e))?;
        let jump = format!("-j {}", chain.chain);
        let rules: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.starts_with("-A "))
            .collect();
        match rules.iter().position(|l| l.ends_with(&jump)) {
            None => problems.push(format!("no jump from {} to {}", chain.hook, chain.chain)),
            Some(0) => {}
            Some(i) => notes.push(format!(
                "jump to {} is rule {} of {}",
                chain.chain,
                i + 1,
                chain.hook
            )),
        }
    }
    if let Some(queue) = undo.queue {
        match delay::registry().stats(&undo.tag) {
            Some(stats) if stats.running => notes.push(format!(
                "delay daemon on NFQUEUE {queue}: {} packets delayed, {} held now",
                stats.packets, stats.held
            )),
            Some(stats) => problems.push(format!(
                "delay daemon for {} has stopped ({}): NFQUEUE {queue} is bypassed",
                undo.tag,
                stats.error.as_deref().unwrap_or("no error recorded")
            )),
            None => problems.push(format!(
                "no delay daemon registered for {} (NFQUEUE {queue} is bypassed)",
                undo.tag
            )),
        }
    }
    let mut detail = format!(
        "total: {total} packets matched by fault rules; {}",
        notes.join("; ")
    );
    if !problems.is_empty() {
        if !detail.is_empty() {
            detail.push_str("; ");
        }
        detail.push_str("PROBLEMS: ");
        detail.push_str(&problems.join("; "));
    }
    Ok(Verification {
        effective: problems.is_empty(),
        detail,
    })
}

/// Removes one iptables chain of ours: jumps to it from built-in chains, then its rules, then
/// the chain. `Ok(false)` when it was already gone.
async fn remove_iptables_chain<C: CommandRunner>(
    runner: &C,
    netns: &Netns,
    program: &str,
    table: &str,
    chain: &str,
) -> Result<bool, NetError> {
    let run =
        |rest: Vec<String>| CommandSpec::new(program, iptables_args(table, rest)).in_netns(netns);
    let all = runner
        .run(&run(vec!["-S".into()]))
        .await
        .map_err(|e| command_error(netns, e))?;
    if !all.success() {
        return Err(command_error(
            netns,
            CommandError::Failed {
                command: run(vec!["-S".into()]).display(),
                status: all.status,
                stderr: all.stderr.trim().to_string(),
            },
        ));
    }
    let exists = all.stdout.lines().any(|l| l == format!("-N {chain}"));
    let jump = format!("-j {chain}");
    let jumps: Vec<Vec<String>> = all
        .stdout
        .lines()
        .filter(|l| l.starts_with("-A ") && (l.ends_with(&jump) || l.contains(&format!("{jump} "))))
        .map(|l| {
            let mut words: Vec<String> = l.split_whitespace().map(String::from).collect();
            words[0] = "-D".into();
            words
        })
        .collect();
    for rule in jumps {
        let spec = run(rule);
        let out = runner
            .run(&spec)
            .await
            .map_err(|e| command_error(netns, e))?;
        if !out.success() && !out.stderr.contains("Bad rule") {
            return Err(command_error(
                netns,
                CommandError::Failed {
                    command: spec.display(),
                    status: out.status,
                    stderr: out.stderr.trim().into(),
                },
            ));
        }
    }
    if !exists {
        return Ok(false);
    }
    for op in ["-F", "-X"] {
        let spec = run(vec![op.into(), chain.into()]);
        let out = runner
            .run(&spec)
            .await
            .map_err(|e| command_error(netns, e))?;
        if !out.success() && !is_missing(&out.stderr) {
            return Err(command_error(
                netns,
                CommandError::Failed {
                    command: spec.display(),
                    status: out.status,
                    stderr: out.stderr.trim().into(),
                },
            ));
        }
    }
    Ok(true)
}

async fn remove_nft_table<C: CommandRunner>(
    runner: &C,
    netns: &Netns,
    table: &str,
) -> Result<bool, NetError> {
    let mut args = vec!["delete".to_string(), "table".to_string()];
    args.extend(table.split_whitespace().map(String::from));
    let spec = CommandSpec::new("nft", args).in_netns(netns);
    let out = runner
        .run(&spec)
        .await
        .map_err(|e| command_error(netns, e))?;
    if out.success() {
        Ok(true)
    } else if is_missing(&out.stderr) {
        Ok(false)
    } else {
        Err(command_error(
            netns,
            CommandError::Failed {
                command: spec.display(),
                status: out.status,
                stderr: out.stderr.trim().into(),
            },
        ))
    }
}

/// Removes exactly what the plan made (and stops the delay daemon of this tag). Idempotent;
/// `Ok("namespace gone")` when the namespace no longer exists.
pub async fn undo<C: CommandRunner>(runner: &C, undo: &FirewallUndo) -> Result<String, NetError> {
    let stopped = undo.queue.is_some() && delay::registry().remove(&undo.tag);
    if !undo.netns.still_exists() {
        return Ok("namespace gone".into());
    }
    let mut done = Vec::new();
    let mut already = Vec::new();
    if let Some(table) = &undo.nft_table {
        match remove_nft_table(runner, &undo.netns, table).await {
            Ok(true) => done.push(format!("deleted nft table {table}")),
            Ok(false) => already.push(format!("nft table {table}")),
            Err(NetError::Command { source, .. })
                if matches!(*source, CommandError::Netns { .. }) =>
            {
                return Ok("namespace gone".into());
            }
            Err(err) => return Err(err),
        }
    }
    for chain in undo.chains.iter().filter(|c| c.program != "nft") {
        match remove_iptables_chain(
            runner,
            &undo.netns,
            &chain.program,
            &chain.table,
            &chain.chain,
        )
        .await
        {
            Ok(true) => done.push(format!(
                "deleted {} {} chain {}",
                chain.program, chain.table, chain.chain
            )),
            Ok(false) => already.push(format!("{} chain {}", chain.program, chain.chain)),
            Err(NetError::Command { source, .. })
                if matches!(*source, CommandError::Netns { .. }) =>
            {
                return Ok("namespace gone".into());
            }
            Err(err) => return Err(err),
        }
    }
    if stopped {
        done.push(format!("stopped delay daemon {}", undo.tag));
    }
    let mut text = done.join("; ");
    if !already.is_empty() {
        if !text.is_empty() {
            text.push_str("; ");
        }
        text.push_str(&format!("already gone: {}", already.join(", ")));
    }
    if text.is_empty() {
        text = "nothing to remove".into();
    }
    Ok(text)
}

/// Tag of one of our nft tables or iptables chains (`<tag>`, `<tag>-IN`, `<tag>-OUT`).
fn tag_of(name: &str) -> Option<&str> {
    if !name.starts_with(TAG_PREFIX) {
        return None;
    }
    Some(
        name.strip_suffix("-IN")
            .or_else(|| name.strip_suffix("-OUT"))
            .unwrap_or(name),
    )
}

/// Deletes our tables/chains (named from [`TAG_PREFIX`]) in `netns` whose tag is not in
/// `live_tags`, in every firewall tool present (a host may have changed backend), and stops
/// delay daemons of dead tags. Returns what was removed.
pub async fn sweep<C: CommandRunner>(
    runner: &C,
    netns: &Netns,
    live_tags: &HashSet<String>,
) -> Result<Vec<String>, NetError> {
    sweep_where(runner, netns, &|tag: &str| !live_tags.contains(tag)).await
}

/// Like [`sweep`], removing what `is_leftover(tag)` says is left over (the agent uses this to
/// touch only its own tags on a kernel shared with other agents).
pub async fn sweep_where<C: CommandRunner>(
    runner: &C,
    netns: &Netns,
    is_leftover: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Vec<String>, NetError> {
    let mut removed = Vec::new();
    let mut failures = Vec::new();
    if !netns.still_exists() {
        return Ok(removed);
    }
    if let Ok(out) = runner
        .run(&CommandSpec::new("nft", ["list", "tables"]).in_netns(netns))
        .await
        && out.success()
    {
        for line in out.stdout.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["table", "inet", name] = words.as_slice()
                && tag_of(name).is_some_and(is_leftover)
            {
                let table = format!("inet {name}");
                match remove_nft_table(runner, netns, &table).await {
                    Ok(true) => removed.push(format!("nft table {table}")),
                    Ok(false) => {}
                    Err(err) => failures.push(err.to_string()),
                }
            }
        }
    }
    let legacy_loaded = [
        ("/proc/net/ip_tables_names", Family::V4),
        ("/proc/net/ip6_tables_names", Family::V6),
    ];
    let mut programs: Vec<(&str, Vec<String>)> = Vec::new();
    for (names, family) in legacy_loaded {
        let nft_prog = FirewallBackend::IptablesNft
            .iptables_program(family)
            .unwrap_or_default();
        programs.push((nft_prog, vec!["filter".into(), "mangle".into()]));
        if let Ok(out) = runner
            .run(&CommandSpec::new("cat", [names]).in_netns(netns))
            .await
            && out.success()
        {
            let tables: Vec<String> = out
                .stdout
                .lines()
                .map(str::trim)
                .filter(|t| *t == "filter" || *t == "mangle")
                .map(String::from)
                .collect();
            if !tables.is_empty() {
                let legacy = FirewallBackend::IptablesLegacy
                    .iptables_program(family)
                    .unwrap_or_default();
                programs.push((legacy, tables));
            }
        }
    }
    for (program, tables) in programs {
        for table in tables {
            let spec = CommandSpec::new(program, iptables_args(&table, ["-S"])).in_netns(netns);
            let out = match runner.run(&spec).await {
                Ok(out) if out.success() => out,
                _ => continue, // tool absent or table unusable: nothing of ours there
            };
            let dead: Vec<String> = out
                .stdout
                .lines()
                .filter_map(|l| l.strip_prefix("-N "))
                .filter(|chain| tag_of(chain).is_some_and(is_leftover))
                .map(String::from)
                .collect();
            for chain in dead {
                match remove_iptables_chain(runner, netns, program, &table, &chain).await {
                    Ok(true) => removed.push(format!("{program} {table} chain {chain}")),
                    Ok(false) => {}
                    Err(err) => failures.push(err.to_string()),
                }
            }
        }
    }
    for tag in delay::registry().tags() {
        if is_leftover(&tag)
            && delay::registry()
                .netns_of(&tag)
                .is_some_and(|n| n.inode == netns.inode)
        {
            delay::registry().remove(&tag);
            removed.push(format!("delay daemon {tag}"));
        }
    }
    if failures.is_empty() {
        Ok(removed)
    } else {
        Err(NetError::Sweep {
            netns: describe_netns(netns),
            removed,
            failures,
        })
    }
}

// ------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::command::{CommandOutput, RecordingRunner};

    const TAG: &str = "flt0123456789";

    fn target() -> Netns {
        Netns {
            path: "/run/netns/target".into(),
            inode: 4242,
        }
    }

    fn caps(backend: FirewallBackend) -> FirewallCaps {
        FirewallCaps {
            backend: Some(backend),
            statistic: true,
            nfqueue: true,
            reject_tcp_reset: true,
            detail: "test".into(),
        }
    }

    fn protect() -> Vec<SocketAddr> {
        vec![
            "127.0.0.1:7443".parse().unwrap(),
            "[fd00::9]:7443".parse().unwrap(),
        ]
    }

    /// Plan in a namespace that is not the agent's.
    fn plan_for(fault: FirewallFault, backend: FirewallBackend) -> FirewallPlan {
        plan_with_ownership(&fault, &target(), TAG, &caps(backend), &protect(), false).unwrap()
    }

    /// `program args…` of each command (the netns is checked separately).
    fn lines(plan: &FirewallPlan) -> Vec<String> {
        plan.apply
            .iter()
            .map(|c| {
                assert_eq!(c.netns.as_ref(), Some(&target()), "{}", c.display());
                format!("{} {}", c.program, c.args.join(" "))
            })
            .collect()
    }

    fn script(plan: &FirewallPlan) -> String {
        assert_eq!(plan.apply.len(), 1);
        assert_eq!(plan.apply[0].program, "nft");
        assert_eq!(plan.apply[0].args, ["-f", "-"]);
        plan.apply[0].stdin.clone().unwrap()
    }

    fn scope(peers: &[&str], ports: &[u16], protocol: Protocol, direction: Direction) -> NetScope {
        NetScope {
            peers: peers.iter().map(|p| p.to_string()).collect(),
            ports: ports.to_vec(),
            protocol,
            direction,
        }
    }

    // ----- nft ----------------------------------------------------------------------------

    #[test]
    fn nft_partition_drop_of_everything_both_directions() {
        let all = NetScope::default();
        let plan = plan_for(
            FirewallFault::Partition {
                scope: &all,
                mode: PartitionMode::Drop,
            },
            FirewallBackend::Nft,
        );
        assert_eq!(
            script(&plan),
            "add table inet flt0123456789\n\
             delete table inet flt0123456789\n\
             table inet flt0123456789 {\n\
             \tchain input {\n\
             \t\ttype filter hook input priority -10; policy accept;\n\
             \t\tiifname \"lo\" accept\n\
             \t\tcounter drop\n\
             \t}\n\
             \tchain output {\n\
             \t\ttype filter hook output priority -10; policy accept;\n\
             \t\toifname \"lo\" accept\n\
             \t\tcounter drop\n\
             \t}\n\
             }\n"
        );
        assert_eq!(
            plan.undo,
            FirewallUndo {
                netns: target(),
                tag: TAG.into(),
                backend: FirewallBackend::Nft,
                nft_table: Some("inet flt0123456789".into()),
                chains: vec![
                    ChainRef {
                        program: "nft".into(),
                        table: "inet flt0123456789".into(),
                        chain: "input".into(),
                        hook: "input".into()
                    },
                    ChainRef {
                        program: "nft".into(),
                        table: "inet flt0123456789".into(),
                        chain: "output".into(),
                        hook: "output".into()
                    },
                ],
                queue: None,
                fault_rules: 2,
            }
        );
        assert!(
            plan.mechanism
                .starts_with("nft table inet flt0123456789 (drop;"),
            "{}",
            plan.mechanism
        );
    }

    #[test]
    fn nft_reject_with_dual_stack_peers_and_ports_on_ingress() {
        let s = scope(
            &["10.1.2.3/16", "fd00::1/64", "192.168.7.7"],
            &[443, 80, 80],
            Protocol::Any,
            Direction::Ingress,
        );
        let plan = plan_for(
            FirewallFault::Partition {
                scope: &s,
                mode: PartitionMode::Reject,
            },
            FirewallBackend::Nft,
        );
        let script = script(&plan);
        let rules: Vec<&str> = script
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(
            rules[3..],
            [
                "chain input {",
                "type filter hook input priority -10; policy accept;",
                "iifname \"lo\" accept",
                "tcp flags & rst == rst accept",
                "icmp type destination-unreachable accept",
                "icmpv6 type destination-unreachable accept",
                "ip saddr { 10.1.0.0/16, 192.168.7.7/32 } tcp dport { 80, 443 } counter reject with tcp reset",
                "ip saddr { 10.1.0.0/16, 192.168.7.7/32 } tcp sport { 80, 443 } counter reject with tcp reset",
                "ip saddr { 10.1.0.0/16, 192.168.7.7/32 } udp dport { 80, 443 } counter reject with icmpx type port-unreachable",
                "ip saddr { 10.1.0.0/16, 192.168.7.7/32 } udp sport { 80, 443 } counter reject with icmpx type port-unreachable",
                "ip6 saddr fd00::/64 tcp dport { 80, 443 } counter reject with tcp reset",
                "ip6 saddr fd00::/64 tcp sport { 80, 443 } counter reject with tcp reset",
                "ip6 saddr fd00::/64 udp dport { 80, 443 } counter reject with icmpx type port-unreachable",
                "ip6 saddr fd00::/64 udp sport { 80, 443 } counter reject with icmpx type port-unreachable",
                "}",
                "}",
            ]
        );
        assert_eq!(plan.undo.chains.len(), 1);
        assert_eq!(plan.undo.fault_rules, 8);
    }

    #[test]
    fn nft_protocols_and_egress_peers() {
        let tcp = scope(&["10.0.0.9"], &[], Protocol::Tcp, Direction::Egress);
        let plan = plan_for(
            FirewallFault::Partition {
                scope: &tcp,
                mode: PartitionMode::Drop,
            },
            FirewallBackend::Nft,
        );
        assert!(script(&plan).contains(
            "\t\toifname \"lo\" accept\n\t\tip daddr 10.0.0.9/32 meta l4proto tcp counter drop\n"
        ));
        assert!(!script(&plan).contains("chain input"));

        let udp = scope(&[], &[53], Protocol::Udp, Direction::Both);
        let plan = plan_for(
            FirewallFault::Partition {
                scope: &udp,
                mode: PartitionMode::Reject,
            },
            FirewallBackend::Nft,
        );
        let text = script(&plan);
        assert!(text.contains("udp dport 53 counter reject with icmpx type port-unreachable\n\t\tudp sport 53 counter reject with icmpx type port-unreachable\n"), "{text}");
        assert!(!text.contains("tcp reset"), "{text}");

        let icmp = scope(&[], &[], Protocol::Icmp, Direction::Ingress);
        let plan = plan_for(
            FirewallFault::Partition {
                scope: &icmp,
                mode: PartitionMode::Drop,
            },
            FirewallBackend::Nft,
        );
        assert!(script(&plan).contains("meta l4proto { icmp, ipv6-icmp } counter drop"));

        let any_ports = scope(&[], &[8080], Protocol::Any, Direction::Ingress);
        let plan = plan_for(
            FirewallFault::Partition {
                scope: &any_ports,
                mode: PartitionMode::Drop,
            },
            FirewallBackend::Nft,
        );
        let text = script(&plan);
        assert!(text.contains("meta l4proto { tcp, udp } th dport 8080 counter drop\n\t\tmeta l4proto { tcp, udp } th sport 8080 counter drop\n"), "{text}");
    }

    #[test]
    fn nft_loss_is_numgen_on_ingress_unless_egress_is_asked() {
        let all = NetScope::default();
        let plan = plan_for(
            FirewallFault::Loss {
                scope: &all,
                basis_points: 3000,
            },
            FirewallBackend::Nft,
        );
        let text = script(&plan);
        assert!(text.contains("\tchain input {\n\t\ttype filter hook input priority -10; policy accept;\n\t\tiifname \"lo\" accept\n\t\tnumgen random mod 10000 < 3000 counter drop\n\t}\n"), "{text}");
        assert!(!text.contains("chain output"));
        assert!(
            plan.mechanism.contains("random drop 30.00%") && plan.mechanism.contains("on ingress"),
            "{}",
            plan.mechanism
        );

        let egress = scope(&["fd00::/8"], &[], Protocol::Any, Direction::Egress);
        let plan = plan_for(
            FirewallFault::Loss {
                scope: &egress,
                basis_points: 125,
            },
            FirewallBackend::Nft,
        );
        let text = script(&plan);
        assert!(
            text.contains("ip6 daddr fd00::/8 numgen random mod 10000 < 125 counter drop"),
            "{text}"
        );
        assert!(text.contains("chain output") && !text.contains("chain input"));
        assert!(
            plan.mechanism.contains("random drop 1.25%")
                && plan.mechanism.contains("on egress")
                && plan.mechanism.contains("retry"),
            "{}",
            plan.mechanism
        );
    }

    #[test]
    fn nft_dns_matches_destination_port_53_before_nat_without_loopback_exemption() {
        let plan = plan_for(
            FirewallFault::Dns {
                mode: PartitionMode::Drop,
            },
            FirewallBackend::Nft,
        );
        assert_eq!(
            script(&plan),
            "add table inet flt0123456789\n\
             delete table inet flt0123456789\n\
             table inet flt0123456789 {\n\
             \tchain output {\n\
             \t\ttype filter hook output priority -310; policy accept;\n\
             \t\tmeta l4proto { tcp, udp } th dport 53 counter drop\n\
             \t}\n\
             }\n"
        );
        let plan = plan_for(
            FirewallFault::Dns {
                mode: PartitionMode::Reject,
            },
            FirewallBackend::Nft,
        );
        let text = script(&plan);
        assert!(text.contains("\t\ttcp dport 53 counter reject with tcp reset\n\t\tudp dport 53 counter reject with icmpx type port-unreachable\n"), "{text}");
        assert_eq!(plan.undo.fault_rules, 2);
    }

    #[test]
    fn loopback_is_exempt_unless_the_scope_names_it() {
        for (peers, exempt) in [
            (vec![], true),
            (vec!["10.0.0.0/8"], true),
            (vec!["127.0.0.1"], false),
            (vec!["0.0.0.0/0"], false),
            (vec!["::1"], false),
            (vec!["::/0"], false),
            (vec!["fd00::/8"], true),
        ] {
            let s = scope(&peers, &[], Protocol::Any, Direction::Both);
            let plan = plan_for(
                FirewallFault::Partition {
                    scope: &s,
                    mode: PartitionMode::Drop,
                },
                FirewallBackend::Nft,
            );
            assert_eq!(script(&plan).contains("\"lo\" accept"), exempt, "{peers:?}");
        }
    }

    // ----- iptables ----------------------------------------------------------------------------

    #[test]
    fn iptables_legacy_partition_drop_of_everything() {
        let all = NetScope::default();
        let plan = plan_for(
            FirewallFault::Partition {
                scope: &all,
                mode: PartitionMode::Drop,
            },
            FirewallBackend::IptablesLegacy,
        );
        assert_eq!(
            lines(&plan),
            [
                "iptables-legacy -w 5 -t filter -N flt0123456789-IN",
                "iptables-legacy -w 5 -t filter -A flt0123456789-IN -i lo -j RETURN",
                "iptables-legacy -w 5 -t filter -A flt0123456789-IN -j DROP",
                "iptables-legacy -w 5 -t filter -N flt0123456789-OUT",
                "iptables-legacy -w 5 -t filter -A flt0123456789-OUT -o lo -j RETURN",
                "iptables-legacy -w 5 -t filter -A flt0123456789-OUT -j DROP",
                "ip6tables-legacy -w 5 -t filter -N flt0123456789-IN",
                "ip6tables-legacy -w 5 -t filter -A flt0123456789-IN -i lo -j RETURN",
                "ip6tables-legacy -w 5 -t filter -A flt0123456789-IN -j DROP",
                "ip6tables-legacy -w 5 -t filter -N flt0123456789-OUT",
                "ip6tables-legacy -w 5 -t filter -A flt0123456789-OUT -o lo -j RETURN",
                "ip6tables-legacy -w 5 -t filter -A flt0123456789-OUT -j DROP",
                "iptables-legacy -w 5 -t filter -I INPUT 1 -j flt0123456789-IN",
                "iptables-legacy -w 5 -t filter -I OUTPUT 1 -j flt0123456789-OUT",
                "ip6tables-legacy -w 5 -t filter -I INPUT 1 -j flt0123456789-IN",
                "ip6tables-legacy -w 5 -t filter -I OUTPUT 1 -j flt0123456789-OUT",
            ]
        );
        assert_eq!(plan.undo.backend, FirewallBackend::IptablesLegacy);
        assert_eq!(plan.undo.nft_table, None);
        assert_eq!(plan.undo.chains.len(), 4);
        assert_eq!(
            plan.undo.chains[2],
            ChainRef {
                program: "ip6tables-legacy".into(),
                table: "filter".into(),
                chain: "flt0123456789-IN".into(),
                hook: "INPUT".into()
            }
        );
        assert_eq!(plan.undo.fault_rules, 4);
    }

    #[test]
    fn iptables_nft_reject_with_v4_peers_only_skips_ip6tables() {
        let s = scope(
            &["10.0.0.0/8", "172.16.0.0/12"],
            &[80],
            Protocol::Tcp,
            Direction::Ingress,
        );
        let plan = plan_for(
            FirewallFault::Partition {
                scope: &s,
                mode: PartitionMode::Reject,
            },
            FirewallBackend::IptablesNft,
        );
        assert_eq!(
            lines(&plan),
            [
                "iptables-nft -w 5 -t filter -N flt0123456789-IN",
                "iptables-nft -w 5 -t filter -A flt0123456789-IN -i lo -j RETURN",
                "iptables-nft -w 5 -t filter -A flt0123456789-IN -p tcp --tcp-flags RST RST -j RETURN",
                "iptables-nft -w 5 -t filter -A flt0123456789-IN -p icmp --icmp-type destination-unreachable -j RETURN",
                "iptables-nft -w 5 -t filter -A flt0123456789-IN -s 10.0.0.0/8,172.16.0.0/12 -p tcp -m multiport --ports 80 -j REJECT --reject-with tcp-reset",
                "iptables-nft -w 5 -t filter -I INPUT 1 -j flt0123456789-IN",
            ]
        );
        // `-s a,b` becomes two rules.
        assert_eq!(plan.undo.fault_rules, 2);
        assert!(
            plan.mechanism
                .starts_with("iptables-nft chains flt0123456789-IN in filter (reject"),
            "{}",
            plan.mechanism
        );
    }

    #[test]
    fn iptables_reject_of_any_protocol_on_v6_uses_icmp6() {
        let s = scope(&["fd00::/8"], &[], Protocol::Any, Direction::Egress);
        let plan = plan_for(
            FirewallFault::Partition {
                scope: &s,
                mode: PartitionMode::Reject,
            },
            FirewallBackend::IptablesNft,
        );
        assert_eq!(
            lines(&plan),
            [
                "ip6tables-nft -w 5 -t filter -N flt0123456789-OUT",
                "ip6tables-nft -w 5 -t filter -A flt0123456789-OUT -o lo -j RETURN",
                "ip6tables-nft -w 5 -t filter -A flt0123456789-OUT -p tcp --tcp-flags RST RST -j RETURN",
                "ip6tables-nft -w 5 -t filter -A flt0123456789-OUT -p ipv6-icmp --icmpv6-type destination-unreachable -j RETURN",
                "ip6tables-nft -w 5 -t filter -A flt0123456789-OUT -d fd00::/8 -p tcp -j REJECT --reject-with tcp-reset",
                "ip6tables-nft -w 5 -t filter -A flt0123456789-OUT -d fd00::/8 -j REJECT --reject-with icmp6-port-unreachable",
                "ip6tables-nft -w 5 -t filter -I OUTPUT 1 -j flt0123456789-OUT",
            ]
        );
    }

    #[test]
    fn iptables_loss_uses_statistic_and_any_protocol_ports_split_into_tcp_and_udp() {
        let s = scope(
            &["192.168.1.0/24"],
            &[5432, 6379],
            Protocol::Any,
            Direction::Both,
        );
        let plan = plan_for(
            FirewallFault::Loss {
                scope: &s,
                basis_points: 3000,
            },
            FirewallBackend::IptablesLegacy,
        );
        assert_eq!(
            lines(&plan),
            [
                "iptables-legacy -w 5 -t filter -N flt0123456789-IN",
                "iptables-legacy -w 5 -t filter -A flt0123456789-IN -i lo -j RETURN",
                "iptables-legacy -w 5 -t filter -A flt0123456789-IN -s 192.168.1.0/24 -p tcp -m multiport --ports 5432,6379 -m statistic --mode random --probability 0.3000 -j DROP",
                "iptables-legacy -w 5 -t filter -A flt0123456789-IN -s 192.168.1.0/24 -p udp -m multiport --ports 5432,6379 -m statistic --mode random --probability 0.3000 -j DROP",
                "iptables-legacy -w 5 -t filter -I INPUT 1 -j flt0123456789-IN",
            ]
        );
        let all = NetScope {
            direction: Direction::Egress,
            ..NetScope::default()
        };
        let plan = plan_for(
            FirewallFault::Loss {
                scope: &all,
                basis_points: 10_000,
            },
            FirewallBackend::IptablesNft,
        );
        assert_eq!(
            lines(&plan)[2],
            "iptables-nft -w 5 -t filter -A flt0123456789-OUT -m statistic --mode random --probability 1.0000 -j DROP"
        );
        assert!(plan.mechanism.contains("on egress"), "{}", plan.mechanism);
    }

    #[test]
    fn iptables_multiport_takes_at_most_15_ports() {
        let ports: Vec<u16> = (1..=17).collect();
        let s = scope(&[], &ports, Protocol::Udp, Direction::Ingress);
        let plan = plan_for(
            FirewallFault::Partition {
                scope: &s,
                mode: PartitionMode::Drop,
            },
            FirewallBackend::IptablesNft,
        );
        let l = lines(&plan);
        assert_eq!(
            l[2],
            "iptables-nft -w 5 -t filter -A flt0123456789-IN -p udp -m multiport --ports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j DROP"
        );
        assert_eq!(
            l[3],
            "iptables-nft -w 5 -t filter -A flt0123456789-IN -p udp -m multiport --ports 16,17 -j DROP"
        );
    }

    #[test]
    fn iptables_dns_matches_destination_port_53_in_both_families() {
        let plan = plan_for(
            FirewallFault::Dns {
                mode: PartitionMode::Drop,
            },
            FirewallBackend::IptablesLegacy,
        );
        assert_eq!(
            lines(&plan),
            [
                "iptables-legacy -w 5 -t filter -N flt0123456789-OUT",
                "iptables-legacy -w 5 -t filter -A flt0123456789-OUT -p tcp -m multiport --dports 53 -j DROP",
                "iptables-legacy -w 5 -t filter -A flt0123456789-OUT -p udp -m multiport --dports 53 -j DROP",
                "ip6tables-legacy -w 5 -t filter -N flt0123456789-OUT",
                "ip6tables-legacy -w 5 -t filter -A flt0123456789-OUT -p tcp -m multiport --dports 53 -j DROP",
                "ip6tables-legacy -w 5 -t filter -A flt0123456789-OUT -p udp -m multiport --dports 53 -j DROP",
                "iptables-legacy -w 5 -t filter -I OUTPUT 1 -j flt0123456789-OUT",
                "ip6tables-legacy -w 5 -t filter -I OUTPUT 1 -j flt0123456789-OUT",
            ]
        );
    }

    #[test]
    fn delay_queues_in_mangle_on_egress_and_goes_through_iptables_nft_on_nft_hosts() {
        let s = scope(&["10.0.0.2"], &[], Protocol::Any, Direction::Both);
        for (backend, program, used) in [
            (
                FirewallBackend::Nft,
                "iptables-nft",
                FirewallBackend::IptablesNft,
            ),
            (
                FirewallBackend::IptablesNft,
                "iptables-nft",
                FirewallBackend::IptablesNft,
            ),
            (
                FirewallBackend::IptablesLegacy,
                "iptables-legacy",
                FirewallBackend::IptablesLegacy,
            ),
        ] {
            let plan = plan_for(
                FirewallFault::Delay {
                    scope: &s,
                    queue: 1234,
                },
                backend,
            );
            assert_eq!(
                lines(&plan),
                [
                    format!("{program} -w 5 -t mangle -N flt0123456789-OUT"),
                    format!("{program} -w 5 -t mangle -A flt0123456789-OUT -o lo -j RETURN"),
                    format!(
                        "{program} -w 5 -t mangle -A flt0123456789-OUT -d 10.0.0.2/32 -j NFQUEUE --queue-num 1234 --queue-bypass"
                    ),
                    format!("{program} -w 5 -t mangle -I OUTPUT 1 -j flt0123456789-OUT"),
                ]
            );
            assert_eq!(plan.undo.backend, used);
            assert_eq!(plan.undo.queue, Some(1234));
            assert_eq!(
                plan.mechanism.contains("nft host"),
                backend == FirewallBackend::Nft,
                "{}",
                plan.mechanism
            );
        }
        let ingress = scope(&[], &[443], Protocol::Tcp, Direction::Ingress);
        let plan = plan_for(
            FirewallFault::Delay {
                scope: &ingress,
                queue: 1000,
            },
            FirewallBackend::IptablesNft,
        );
        assert_eq!(
            lines(&plan)[2],
            "iptables-nft -w 5 -t mangle -A flt0123456789-IN -p tcp -m multiport --ports 443 -j NFQUEUE --queue-num 1000 --queue-bypass"
        );
    }

    // ----- the agent's own namespace ----------------------------------------------------------

    #[test]
    fn in_the_agents_own_namespace_protected_endpoints_come_first() {
        let all = NetScope::default();
        let fault = FirewallFault::Partition {
            scope: &all,
            mode: PartitionMode::Drop,
        };
        let plan = plan_with_ownership(
            &fault,
            &target(),
            TAG,
            &caps(FirewallBackend::Nft),
            &protect(),
            true,
        )
        .unwrap();
        let text = script(&plan);
        assert!(
            text.contains(
                "\t\ttype filter hook input priority -10; policy accept;\n\
             \t\tip saddr 127.0.0.1 tcp sport 7443 accept\n\
             \t\tip6 saddr fd00::9 tcp sport 7443 accept\n\
             \t\tiifname \"lo\" accept\n\
             \t\tcounter drop\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "\t\ttype filter hook output priority -10; policy accept;\n\
             \t\tip daddr 127.0.0.1 tcp dport 7443 accept\n\
             \t\tip6 daddr fd00::9 tcp dport 7443 accept\n\
             \t\toifname \"lo\" accept\n\
             \t\tcounter drop\n"
            ),
            "{text}"
        );
        assert!(
            plan.mechanism.contains("agent's own namespace"),
            "{}",
            plan.mechanism
        );

        let plan = plan_with_ownership(
            &fault,
            &target(),
            TAG,
            &caps(FirewallBackend::IptablesLegacy),
            &protect(),
            true,
        )
        .unwrap();
        let l = lines(&plan);
        assert_eq!(
            l[1],
            "iptables-legacy -w 5 -t filter -A flt0123456789-IN -s 127.0.0.1/32 -p tcp --sport 7443 -j RETURN"
        );
        assert_eq!(
            l[2],
            "iptables-legacy -w 5 -t filter -A flt0123456789-IN -i lo -j RETURN"
        );
        assert_eq!(
            l[5],
            "iptables-legacy -w 5 -t filter -A flt0123456789-OUT -d 127.0.0.1/32 -p tcp --dport 7443 -j RETURN"
        );
        assert!(l.contains(&"ip6tables-legacy -w 5 -t filter -A flt0123456789-IN -s fd00::9/128 -p tcp --sport 7443 -j RETURN".to_string()));

        // DNS has no loopback exemption, but protection still comes first.
        let plan = plan_with_ownership(
            &FirewallFault::Dns {
                mode: PartitionMode::Drop,
            },
            &target(),
            TAG,
            &caps(FirewallBackend::Nft),
            &protect(),
            true,
        )
        .unwrap();
        assert!(script(&plan).contains("policy accept;\n\t\tip daddr 127.0.0.1 tcp dport 7443 accept\n\t\tip6 daddr fd00::9 tcp dport 7443 accept\n\t\tmeta l4proto"));

        // The public entry point finds out by itself.
        let own = Netns::current().unwrap();
        let planned =
            super::plan(&fault, &own, TAG, &caps(FirewallBackend::Nft), &protect()).unwrap();
        assert!(script_of(&planned).contains("ip saddr 127.0.0.1 tcp sport 7443 accept"));
        let planned = super::plan(
            &fault,
            &target(),
            TAG,
            &caps(FirewallBackend::Nft),
            &protect(),
        )
        .unwrap();
        assert!(!script_of(&planned).contains("7443"));
    }

    fn script_of(plan: &FirewallPlan) -> String {
        plan.apply[0].stdin.clone().unwrap()
    }

    // ----- refusals ------------------------------------------------------------------------------

    #[test]
    fn invalid_faults_and_missing_capabilities_are_refused() {
        let all = NetScope::default();
        let drop = FirewallFault::Partition {
            scope: &all,
            mode: PartitionMode::Drop,
        };
        let refuse = |fault: &FirewallFault, tag: &str, caps: &FirewallCaps| {
            plan_with_ownership(fault, &target(), tag, caps, &[], false)
                .unwrap_err()
                .to_string()
        };
        let nft = caps(FirewallBackend::Nft);
        assert!(refuse(&drop, "nottag", &nft).contains("must start with"));
        assert!(refuse(&drop, "flt-bad-chars", &nft).contains("alphanumeric"));
        assert!(refuse(&drop, "flt012345678901234567890123", &nft).contains("24 characters"));
        for (peers, ports, protocol, needle) in [
            (vec!["10.0.0.0/33"], vec![], Protocol::Any, "prefix"),
            (vec!["not-an-ip"], vec![], Protocol::Any, "not an address"),
            (vec![], vec![0], Protocol::Any, "port 0"),
            (vec![], vec![80], Protocol::Icmp, "icmp"),
        ] {
            let s = scope(&peers, &ports, protocol, Direction::Both);
            let err = refuse(
                &FirewallFault::Partition {
                    scope: &s,
                    mode: PartitionMode::Drop,
                },
                TAG,
                &nft,
            );
            assert!(err.contains(needle), "{err}");
        }
        assert!(
            refuse(
                &FirewallFault::Loss {
                    scope: &all,
                    basis_points: 0
                },
                TAG,
                &nft
            )
            .contains("basis points")
        );
        assert!(
            refuse(
                &FirewallFault::Loss {
                    scope: &all,
                    basis_points: 10_001
                },
                TAG,
                &nft
            )
            .contains("basis points")
        );
        assert!(
            refuse(
                &FirewallFault::Delay {
                    scope: &all,
                    queue: 999
                },
                TAG,
                &nft
            )
            .contains("outside")
        );

        let none = FirewallCaps {
            backend: None,
            statistic: false,
            nfqueue: false,
            reject_tcp_reset: false,
            detail: "nothing works".into(),
        };
        assert!(refuse(&drop, TAG, &none).contains("nothing works"));
        let weak = FirewallCaps {
            statistic: false,
            nfqueue: false,
            reject_tcp_reset: false,
            ..caps(FirewallBackend::IptablesLegacy)
        };
        assert!(
            refuse(
                &FirewallFault::Loss {
                    scope: &all,
                    basis_points: 10
                },
                TAG,
                &weak
            )
            .contains("random drop")
        );
        assert!(
            refuse(
                &FirewallFault::Delay {
                    scope: &all,
                    queue: 1000
                },
                TAG,
                &weak
            )
            .contains("NFQUEUE")
        );
        assert!(
            refuse(
                &FirewallFault::Partition {
                    scope: &all,
                    mode: PartitionMode::Reject
                },
                TAG,
                &weak
            )
            .contains("reject")
        );
        assert!(
            refuse(
                &FirewallFault::Dns {
                    mode: PartitionMode::Reject
                },
                TAG,
                &weak
            )
            .contains("reject")
        );
        // Drop needs nothing special.
        assert!(plan_with_ownership(&drop, &target(), TAG, &weak, &[], false).is_ok());
    }

    #[test]
    fn cidrs_are_normalised_and_loopback_overlap_is_found() {
        let c = Cidr::parse("10.1.2.3/16").unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert_eq!(
            Cidr::parse(" 10.0.0.1 ").unwrap().to_string(),
            "10.0.0.1/32"
        );
        assert_eq!(Cidr::parse("fd00::1/8").unwrap().to_string(), "fd00::/8");
        assert_eq!(Cidr::parse("::1").unwrap().to_string(), "::1/128");
        assert!(Cidr::parse("127.5.0.0/16").unwrap().touches_loopback());
        assert!(Cidr::parse("64.0.0.0/2").unwrap().touches_loopback());
        assert!(!Cidr::parse("128.0.0.0/1").unwrap().touches_loopback());
        assert!(!Cidr::parse("fe80::/10").unwrap().touches_loopback());
        assert_eq!(probability(3000), "0.3000");
        assert_eq!(probability(1), "0.0001");
        assert_eq!(percent(3050), "30.50%");
    }

    // ----- apply / verify / undo / sweep / probe against a recording runner -----------------------

    fn own() -> Netns {
        Netns::current().unwrap()
    }

    fn stripped(runner: &RecordingRunner) -> Vec<String> {
        runner
            .calls()
            .iter()
            .map(|c| format!("{} {}", c.program, c.args.join(" ")))
            .collect()
    }

    #[tokio::test]
    async fn a_failed_apply_rolls_back_what_was_made() {
        let all = NetScope::default();
        let plan = plan_with_ownership(
            &FirewallFault::Partition {
                scope: &all,
                mode: PartitionMode::Drop,
            },
            &own(),
            TAG,
            &caps(FirewallBackend::IptablesNft),
            &[],
            false,
        )
        .unwrap();
        let runner = RecordingRunner::new();
        runner.answer(
            "-N flt0123456789-OUT",
            CommandOutput::failed(4, "iptables: Resource temporarily unavailable."),
        );
        // The rollback finds the IN chain (made) but not the OUT one.
        runner.answer(
            "iptables-nft -w 5 -t filter -S",
            CommandOutput::ok("-P INPUT ACCEPT\n-N flt0123456789-IN\n"),
        );
        let err = apply(&runner, &plan).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("-N flt0123456789-OUT") && text.contains("Resource temporarily"),
            "{text}"
        );
        assert!(
            text.contains("rolled back: deleted iptables-nft filter chain flt0123456789-IN"),
            "{text}"
        );
        let calls = stripped(&runner);
        let rollback = &calls[4..];
        assert_eq!(rollback[0], "iptables-nft -w 5 -t filter -S");
        assert_eq!(
            rollback[1],
            "iptables-nft -w 5 -t filter -F flt0123456789-IN"
        );
        assert_eq!(
            rollback[2],
            "iptables-nft -w 5 -t filter -X flt0123456789-IN"
        );
        assert!(
            !calls.iter().any(|c| c.contains("-I INPUT")),
            "no jump was inserted: {calls:?}"
        );
    }

    #[tokio::test]
    async fn undo_deletes_jumps_then_chains_and_is_idempotent() {
        let all = NetScope::default();
        let plan = plan_with_ownership(
            &FirewallFault::Partition {
                scope: &all,
                mode: PartitionMode::Drop,
            },
            &own(),
            TAG,
            &caps(FirewallBackend::IptablesLegacy),
            &[],
            false,
        )
        .unwrap();
        let runner = RecordingRunner::new();
        runner.answer(
            "iptables-legacy -w 5 -t filter -S",
            CommandOutput::ok("-P INPUT ACCEPT\n-N flt0123456789-IN\n-N flt0123456789-OUT\n-A INPUT -j flt0123456789-IN\n-A INPUT -j flt0123456789-IN\n-A OUTPUT -j flt0123456789-OUT\n-A flt0123456789-IN -j DROP\n"),
        );
        let text = undo(&runner, &plan.undo).await.unwrap();
        let calls = stripped(&runner);
        assert_eq!(
            calls[..4],
            [
                "iptables-legacy -w 5 -t filter -S",
                "iptables-legacy -w 5 -t filter -D INPUT -j flt0123456789-IN",
                "iptables-legacy -w 5 -t filter -D INPUT -j flt0123456789-IN",
                "iptables-legacy -w 5 -t filter -F flt0123456789-IN",
            ]
        );
        assert_eq!(
            calls[4],
            "iptables-legacy -w 5 -t filter -X flt0123456789-IN"
        );
        assert!(
            text.contains("deleted iptables-legacy filter chain flt0123456789-IN"),
            "{text}"
        );
        // Empty `-S` answers for the rest: already gone.
        assert!(
            text.contains("already gone: iptables-legacy chain flt0123456789-OUT"),
            "{text}"
        );

        let runner = RecordingRunner::new();
        let nft = plan_with_ownership(
            &FirewallFault::Partition {
                scope: &all,
                mode: PartitionMode::Drop,
            },
            &own(),
            TAG,
            &caps(FirewallBackend::Nft),
            &[],
            false,
        )
        .unwrap();
        assert_eq!(
            undo(&runner, &nft.undo).await.unwrap(),
            "deleted nft table inet flt0123456789"
        );
        runner.answer(
            "delete table",
            CommandOutput::failed(
                1,
                "Error: Could not process rule: No such file or directory",
            ),
        );
        assert_eq!(
            undo(&runner, &nft.undo).await.unwrap(),
            "already gone: nft table inet flt0123456789"
        );
        runner.answer(
            "delete table",
            CommandOutput::failed(1, "Error: Operation not permitted"),
        );
        assert!(undo(&runner, &nft.undo).await.is_err());
        assert_eq!(stripped(&runner)[0], "nft delete table inet flt0123456789");

        let gone = FirewallUndo {
            netns: Netns {
                path: "/run/netns/flt-never-existed".into(),
                inode: 1,
            },
            ..nft.undo.clone()
        };
        assert_eq!(undo(&runner, &gone).await.unwrap(), "namespace gone");
    }

    #[tokio::test]
    async fn verify_reads_tables_chains_jumps_and_counters() {
        let all = NetScope::default();
        let nft = plan_with_ownership(
            &FirewallFault::Partition {
                scope: &all,
                mode: PartitionMode::Drop,
            },
            &own(),
            TAG,
            &caps(FirewallBackend::Nft),
            &[],
            false,
        )
        .unwrap();
        let runner = RecordingRunner::new();
        runner.answer(
            "nft list table inet",
            CommandOutput::ok("table inet flt0123456789 {\n\tchain input {\n\t\ttype filter hook input priority filter - 10; policy accept;\n\t\tiifname \"lo\" accept\n\t\tcounter packets 7 bytes 420 drop\n\t}\n\tchain output {\n\t\ttype filter hook output priority filter - 10; policy accept;\n\t\toifname \"lo\" accept\n\t\tcounter packets 3 bytes 180 drop\n\t}\n}\n"),
        );
        let v = verify(&runner, &nft.undo).await.unwrap();
        assert!(v.effective, "{}", v.detail);
        assert!(v.detail.starts_with("total: 10 packets"), "{}", v.detail);
        assert!(
            v.detail
                .contains("2 fault rule(s), matched 10 packets / 600 bytes"),
            "{}",
            v.detail
        );
        runner.answer(
            "nft list table inet",
            CommandOutput::failed(1, "Error: No such file or directory"),
        );
        let v = verify(&runner, &nft.undo).await.unwrap();
        assert!(!v.effective && v.detail.contains("missing"), "{}", v.detail);

        let ipt = plan_with_ownership(
            &FirewallFault::Loss {
                scope: &scope(&["10.0.0.0/8"], &[], Protocol::Any, Direction::Ingress),
                basis_points: 500,
            },
            &own(),
            TAG,
            &caps(FirewallBackend::IptablesNft),
            &[],
            false,
        )
        .unwrap();
        let runner = RecordingRunner::new();
        runner.answer("-v -S flt0123456789-IN", CommandOutput::ok("-N flt0123456789-IN\n-A flt0123456789-IN -i lo -c 9 900 -j RETURN\n-A flt0123456789-IN -s 10.0.0.0/8 -m statistic --mode random --probability 0.05000000000 -c 5 300 -j DROP\n"));
        runner.answer(
            "-S INPUT",
            CommandOutput::ok("-P INPUT ACCEPT\n-A INPUT -j flt0123456789-IN\n"),
        );
        let v = verify(&runner, &ipt.undo).await.unwrap();
        assert!(v.effective, "{}", v.detail);
        assert!(v.detail.contains("iptables-nft filter/flt0123456789-IN: 1 fault rule(s), matched 5 packets / 300 bytes"), "{}", v.detail);
        // Jump missing.
        runner.answer(
            "-v -S flt0123456789-IN",
            CommandOutput::ok("-A flt0123456789-IN -c 0 0 -j DROP\n"),
        );
        runner.answer("-S INPUT", CommandOutput::ok("-P INPUT ACCEPT\n"));
        let v = verify(&runner, &ipt.undo).await.unwrap();
        assert!(
            !v.effective && v.detail.contains("no jump from INPUT"),
            "{}",
            v.detail
        );

        // A delay without its daemon is not effective (traffic bypasses the queue).
        let d = plan_with_ownership(
            &FirewallFault::Delay {
                scope: &all,
                queue: 1500,
            },
            &own(),
            "flt00000000dd",
            &caps(FirewallBackend::IptablesNft),
            &[],
            false,
        )
        .unwrap();
        let runner = RecordingRunner::new();
        runner.answer(
            "-v -S",
            CommandOutput::ok(
                "-A flt00000000dd-OUT -c 1 1 -j NFQUEUE --queue-num 1500 --queue-bypass\n",
            ),
        );
        runner.answer(
            "-S OUTPUT",
            CommandOutput::ok("-A OUTPUT -j flt00000000dd-OUT\n"),
        );
        let v = verify(&runner, &d.undo).await.unwrap();
        assert!(
            !v.effective && v.detail.contains("bypassed"),
            "{}",
            v.detail
        );
    }

    #[tokio::test]
    async fn sweep_removes_only_dead_tags_everywhere() {
        let runner = RecordingRunner::new();
        runner.answer("nft list tables", CommandOutput::ok("table ip filter\ntable inet flt00000000aa\ntable inet flt00000000bb\ntable inet other\n"));
        runner.answer(
            "cat /proc/net/ip_tables_names",
            CommandOutput::ok("filter\nnat\n"),
        );
        runner.answer(
            "cat /proc/net/ip6_tables_names",
            CommandOutput::failed(1, "No such file"),
        );
        runner.answer("iptables-nft -w 5 -t mangle -S", CommandOutput::ok("-P OUTPUT ACCEPT\n-N flt00000000cc-OUT\n-A OUTPUT -j flt00000000cc-OUT\n-A flt00000000cc-OUT -j NFQUEUE --queue-num 1000 --queue-bypass\n"));
        runner.answer(
            "iptables-nft -w 5 -t mangle -S",
            CommandOutput::ok(
                "-P OUTPUT ACCEPT\n-N flt00000000cc-OUT\n-A OUTPUT -j flt00000000cc-OUT\n",
            ),
        );
        runner.answer(
            "iptables-legacy -w 5 -t filter -S",
            CommandOutput::ok("-N flt00000000aa-IN\n-N DOCKER\n"),
        );
        let live: HashSet<String> = ["flt00000000aa".to_string()].into();
        let removed = sweep(&runner, &own(), &live).await.unwrap();
        assert_eq!(
            removed,
            [
                "nft table inet flt00000000bb",
                "iptables-nft mangle chain flt00000000cc-OUT"
            ]
        );
        let calls = stripped(&runner);
        assert!(
            calls.contains(&"nft delete table inet flt00000000bb".to_string()),
            "{calls:?}"
        );
        assert!(
            calls.contains(
                &"iptables-nft -w 5 -t mangle -D OUTPUT -j flt00000000cc-OUT".to_string()
            ),
            "{calls:?}"
        );
        assert!(
            calls.contains(&"iptables-nft -w 5 -t mangle -X flt00000000cc-OUT".to_string()),
            "{calls:?}"
        );
        assert!(
            !calls
                .iter()
                .any(|c| c.contains("delete table inet flt00000000aa") || c.contains("other")),
            "{calls:?}"
        );
        // Legacy was looked at (its tables exist) but only for filter (nat is not ours to touch).
        assert!(
            calls.contains(&"iptables-legacy -w 5 -t filter -S".to_string()),
            "{calls:?}"
        );
        assert!(
            !calls.iter().any(|c| c.starts_with("ip6tables-legacy")),
            "{calls:?}"
        );
    }

    #[tokio::test]
    async fn probe_prefers_legacy_only_when_it_alone_has_rules() {
        // Legacy has rules, nft none.
        let runner = RecordingRunner::new();
        runner.answer("nft list ruleset", CommandOutput::ok(""));
        runner.answer(
            "cat /proc/net/ip_tables_names",
            CommandOutput::ok("filter\n"),
        );
        runner.answer(
            "iptables-legacy-save",
            CommandOutput::ok(
                "*filter\n:INPUT ACCEPT [0:0]\n-N DOCKER\n-A INPUT -j DOCKER\nCOMMIT\n",
            ),
        );
        let caps = probe(&runner).await;
        assert_eq!(
            caps.backend,
            Some(FirewallBackend::IptablesLegacy),
            "{}",
            caps.detail
        );
        assert!(
            caps.detail.contains("legacy iptables holds 2"),
            "{}",
            caps.detail
        );
        assert!(caps.statistic && caps.reject_tcp_reset && caps.nfqueue);
        let calls = stripped(&runner);
        assert!(calls.iter().any(|c| c.starts_with("unshare --net sh -c iptables-legacy -w 5 -N fltprobe && iptables-legacy -w 5 -A fltprobe -m statistic")), "{calls:?}");

        // nft has tables (e.g. iptables-nft's): native nft, legacy noted.
        let runner = RecordingRunner::new();
        runner.answer(
            "nft list ruleset",
            CommandOutput::ok("table ip filter {\n}\ntable inet flt00000000aa {\n}\n"),
        );
        runner.answer(
            "cat /proc/net/ip_tables_names",
            CommandOutput::ok("filter\n"),
        );
        runner.answer(
            "iptables-legacy-save",
            CommandOutput::ok("-A INPUT -j ACCEPT\n"),
        );
        runner.answer(
            "unshare --net nft",
            CommandOutput::failed(
                1,
                "Error: Could not process rule: No such file or directory",
            ),
        );
        let caps = probe(&runner).await;
        assert_eq!(caps.backend, Some(FirewallBackend::Nft), "{}", caps.detail);
        assert!(
            caps.detail.contains("1 table(s) present: ip filter"),
            "{}",
            caps.detail
        );
        assert!(
            caps.detail.contains("legacy iptables also holds 1"),
            "{}",
            caps.detail
        );
        assert!(!caps.statistic && caps.reject_tcp_reset, "{}", caps.detail);
        assert!(
            caps.detail
                .contains("random drop: no (Error: Could not process rule"),
            "{}",
            caps.detail
        );

        // nft unusable: iptables-nft.
        let runner = RecordingRunner::new();
        runner.answer(
            "nft list ruleset",
            CommandOutput::failed(1, "netlink: Error: cache initialization failed"),
        );
        let caps = probe(&runner).await;
        assert_eq!(
            caps.backend,
            Some(FirewallBackend::IptablesNft),
            "{}",
            caps.detail
        );
    }
}
