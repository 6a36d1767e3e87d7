//! Traffic-control faults (netem, tbf, htb + u32) on the egress of the target's interfaces,
//! run inside the target's network namespace with the host's `tc`.
//!
//! Every fault is a small tree whose handles are derived from the fault's tag
//! ([`handles_for`]): a root qdisc `R:` (tbf, netem or htb) and a leaf qdisc `L:` at `R:1`
//! (bfifo, pfifo or netem). Both majors lie in `4000..=7fff`, a range neither tc's automatic
//! handles (`8001:` on) nor hand-written ones (`1:`, `10:`) normally use; the pair is the
//! signature by which [`undo`], [`verify`] and [`sweep`] recognise our qdiscs and never touch a
//! user's.
//!
//! Before a fault, [`plan`] records each interface's root qdisc as `tc qdisc show` prints it and
//! refuses an interface whose root it could not put back exactly (a classful tree, an unknown
//! kind). [`undo`] swaps the recorded qdisc back in with one `tc qdisc replace` (or deletes ours
//! when the kernel's default root was there before, which makes the kernel re-attach it).
//!
//! Scoped faults (peers, ports, protocol) use an htb root without a default class: unmatched
//! traffic goes through htb's direct queue untouched; u32 filters send matching traffic to
//! class `R:1` whose leaf is the netem (or the rate limit). The u32 port matches assume IP
//! headers without options (IPv4) and no extension headers (IPv6), as tc's `match ip dport`
//! always does.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use faultline_domain::fault::{Direction, NetScope, Protocol};
use serde::{Deserialize, Serialize};

use crate::sys::command::{CommandError, CommandRunner, CommandSpec};
use crate::sys::netns::Netns;
use crate::verification::Verification;

const TC: &str = "tc";
/// Our handle majors: `0x4000 | 14 bits of the tag's hash`.
const HANDLE_BASE: u16 = 0x4000;
const HANDLE_BITS: u64 = 0x3fff;
/// Packets netem (and the pfifo under it) may hold: 1000, tc's default, drops at ~120 Mbit/s
/// with 100 ms of delay.
const NETEM_LIMIT: u32 = 10_000;
/// Queue a rate limit may build before it drops, as tbf's `latency`.
const SHAPER_LATENCY_MS: u64 = 400;
/// Smallest bucket: 32 kbit, enough for a few full-size frames.
const MIN_BURST_BYTES: u64 = 4096;
/// The bucket holds 1/250 s of traffic above the minimum (one tick at HZ=250).
const BURST_HZ: u64 = 250;
/// Slowest rate accepted.
const MIN_RATE_BPS: u64 = 1000;
/// One class only: any quantum between MTU and 200000 keeps the kernel quiet.
const HTB_QUANTUM: &str = "60000";
/// Unmatched traffic of a scoped fault waits here (htb's direct queue, never shaped).
const HTB_DIRECT_QLEN: &str = "1000";
/// Rate of the class holding a scoped fault's leaf: never the bottleneck.
const HTB_UNLIMITED: &str = "100gbit";
const MAX_FILTERS: usize = 512;
const ROOT_KINDS: &[&str] = &["tbf", "netem", "htb"];
const LEAF_KINDS: &[&str] = &["bfifo", "pfifo", "netem", "tbf"];

/// What this host's kernel really does, found by trying it in a scratch namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcCaps {
    pub netem: bool,
    pub tbf: bool,
    pub htb: bool,
    pub clsact: bool,
    pub u32_filter: bool,
    /// One `name: yes` / `name: no (tc's error)` per mechanism.
    pub detail: String,
}

/// A traffic-control fault to apply.
#[derive(Debug, Clone)]
pub enum TcFault<'a> {
    /// Delay (± jitter, normal distribution), loss, duplication, corruption, reordering:
    /// shares in basis points (3000 = 30%).
    Netem {
        scope: &'a NetScope,
        delay_ms: u32,
        jitter_ms: u32,
        loss_bp: u32,
        duplicate_bp: u32,
        corrupt_bp: u32,
        reorder_bp: u32,
    },
    /// Limit all egress to `rate_bps` bits per second (tbf).
    Bandwidth { rate_bps: u64 },
    /// Limit egress matching `scope` to `rate_bps` (htb + u32; tbf when the scope is empty).
    ScopedBandwidth { scope: &'a NetScope, rate_bps: u64 },
}

/// The root qdisc an interface had before the fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum PreviousRoot {
    /// The kernel's default root (handle `0:`; `kind` as shown, `none` when tc listed none).
    /// Put back by deleting ours: the kernel re-attaches its default.
    Default { kind: String },
    /// A root qdisc someone installed, as `tc qdisc show` printed it.
    Qdisc {
        kind: String,
        /// As printed, e.g. `1:`.
        handle: String,
        /// Its parameters as printed, whitespace normalised (`rate 50Mbit burst 64Kb lat 50ms`).
        params: String,
        /// Arguments after `KIND` that re-create it (`tc qdisc replace dev D root handle H KIND ...`).
        restore: Vec<String>,
    },
}

impl PreviousRoot {
    fn describe(&self) -> String {
        match self {
            Self::Default { kind } => format!("the kernel's default root ({kind})"),
            Self::Qdisc {
                kind,
                handle,
                params,
                ..
            } => format!("{kind} {handle} {params}").trim_end().to_string(),
        }
    }
}

/// The tree we install on one interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OurTree {
    /// `tbf`, `netem` or `htb`.
    pub root_kind: String,
    pub root_handle: u16,
    /// `bfifo`, `pfifo` or `netem`, at `root_handle:1`.
    pub leaf_kind: String,
    pub leaf_handle: u16,
    /// u32 filters steering scoped traffic to `root_handle:1` (0 when unscoped).
    pub filters: usize,
}

/// Per interface: what was there before, and what we put there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceUndo {
    pub device: String,
    pub previous: PreviousRoot,
    pub ours: OurTree,
}

/// Everything needed to remove the fault, even after a restart (journal this before applying).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcUndo {
    pub netns: Netns,
    pub tag: String,
    pub devices: Vec<DeviceUndo>,
}

/// A planned fault: its undo, a human description, and the exact commands.
#[derive(Debug, Clone)]
pub struct TcPlan {
    pub undo: TcUndo,
    /// e.g. `tc tbf rate 1000000bit burst 4096 latency 400ms on egress of eth0`.
    pub mechanism: String,
    pub apply: Vec<CommandSpec>,
}

/// Failures, with the device and command concerned.
#[derive(Debug, thiserror::Error)]
pub enum TcError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("invalid tc fault: {0}")]
    Invalid(String),
    #[error("not possible on this host: {0}")]
    Unsupported(String),
    #[error(
        "no interface to act on in network namespace {0} (only interfaces that are up count; lo only when the scope names 127.0.0.0/8 or ::1)"
    )]
    NoInterfaces(u64),
    #[error(
        "device {device}: its root qdisc could not be put back exactly afterwards, so it is left alone: {reason}"
    )]
    Unrestorable { device: String, reason: String },
    #[error("device {device}: {reason}")]
    Conflict { device: String, reason: String },
    #[error(
        "device {device}: root qdisc changed since the plan: recorded `{expected}`, now `{found}`"
    )]
    Changed {
        device: String,
        expected: String,
        found: String,
    },
    #[error(
        "device {device}: could not re-create `{previous}` ({error}); our qdisc was removed instead, leaving the kernel's default root"
    )]
    RestoreFailed {
        device: String,
        previous: String,
        error: String,
    },
    #[error("unexpected output from `{command}`: {detail}")]
    Parse { command: String, detail: String },
    #[error("applying failed: {error}; rolled back: {rollback}")]
    ApplyFailed {
        error: Box<TcError>,
        rollback: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Handles

/// Root and leaf handle majors for a tag (distinct, both in `0x4000..=0x7fff`). Bits 8..=13
/// come from the tag's owner part (characters 3..7 of an agent's tag, see
/// `faults::fault_tag`), so an agent can tell its own leftovers from another agent's on a
/// shared kernel ([`owner_bits`]); bit 7 tells root from leaf; bits 0..=6 come from the tag.
pub fn handles_for(tag: &str) -> (u16, u16) {
    let fault = (fnv(tag) & 0x7f) as u16;
    let root = HANDLE_BASE | (owner_bits(tag) << 8) | fault;
    (root, root | 0x80)
}

/// The 6 owner bits a tag puts into its handles.
pub fn owner_bits(tag: &str) -> u16 {
    (fnv(tag.get(3..7).unwrap_or(tag)) & 0x3f) as u16
}

fn fnv(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn is_our_major(major: u16) -> bool {
    (HANDLE_BASE..=HANDLE_BASE | HANDLE_BITS as u16).contains(&major)
}

/// `"4a3f:"` -> 0x4a3f; `"0:"` -> 0.
fn handle_major(handle: &str) -> Option<u16> {
    let major = handle.strip_suffix(':').unwrap_or(handle);
    let major = major.split(':').next().unwrap_or(major);
    if major.is_empty() {
        return Some(0);
    }
    u16::from_str_radix(major, 16).ok()
}

/// `"4a3f:1"` -> (0x4a3f, 1); `":1"` -> (0, 1).
fn parse_classid(text: &str) -> Option<(u16, u16)> {
    let (major, minor) = text.split_once(':')?;
    let major = if major.is_empty() {
        0
    } else {
        u16::from_str_radix(major, 16).ok()?
    };
    let minor = if minor.is_empty() {
        0
    } else {
        u16::from_str_radix(minor, 16).ok()?
    };
    Some((major, minor))
}

// ---------------------------------------------------------------------------------------------
// Parsing `tc qdisc show`

/// Counters from `tc -s qdisc show`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QdiscStats {
    pub sent_bytes: u64,
    pub sent_packets: u64,
    pub dropped: u64,
    pub overlimits: u64,
    pub requeues: u64,
    /// As printed: `0b 0p`.
    pub backlog: String,
}

/// One qdisc as `tc qdisc show` printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QdiscInfo {
    pub kind: String,
    /// As printed: `1:`, `0:`, `ffff:`.
    pub handle: String,
    /// Present in the all-devices listing (`tc qdisc show` without `dev`).
    pub dev: Option<String>,
    /// `None` for the root qdisc; else as printed (`1:1`, `:1`, `ffff:fff1`).
    pub parent: Option<String>,
    /// Options as printed, whitespace normalised (refcnt excluded: it is not a parameter).
    pub params: String,
    pub stats: Option<QdiscStats>,
}

impl QdiscInfo {
    fn major(&self) -> u16 {
        handle_major(&self.handle).unwrap_or(0)
    }

    fn is_ingress(&self) -> bool {
        self.kind == "ingress"
            || self.kind == "clsact"
            || self
                .parent
                .as_deref()
                .is_some_and(|p| p.starts_with("ffff:"))
    }

    /// The line without counters, for comparing before and after.
    pub fn describe(&self) -> String {
        format!("{} {} {}", self.kind, self.handle, self.params)
            .trim_end()
            .to_string()
    }
}

/// Parses `tc [-s] qdisc show [dev D]` output.
pub fn parse_qdiscs(text: &str) -> Result<Vec<QdiscInfo>, String> {
    let mut out: Vec<QdiscInfo> = Vec::new();
    // Continuation lines before the first counter line are options printed on several lines.
    let mut in_stats = false;
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with("qdisc ") {
            out.push(parse_qdisc_line(line)?);
            in_stats = false;
            continue;
        }
        let Some(current) = out.last_mut() else {
            return Err(format!("line outside any qdisc: {line:?}"));
        };
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("Sent ") {
            in_stats = true;
            current.stats =
                Some(parse_sent(rest).ok_or_else(|| format!("bad counters: {line:?}"))?);
        } else if let Some(rest) = trimmed.strip_prefix("backlog ") {
            in_stats = true;
            if let Some(stats) = current.stats.as_mut() {
                let mut words = rest.split_whitespace();
                let bytes = words.next().unwrap_or_default();
                let packets = words.next().unwrap_or_default();
                stats.backlog = format!("{bytes} {packets}");
            }
        } else if !in_stats {
            let joined = format!("{} {}", current.params, trimmed);
            current.params = normalise(&joined);
        }
    }
    Ok(out)
}

fn normalise(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn parse_qdisc_line(line: &str) -> Result<QdiscInfo, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let bad = || format!("unrecognised qdisc line: {line:?}");
    if words.len() < 4 || words[0] != "qdisc" || !words[2].ends_with(':') {
        return Err(bad());
    }
    let mut info = QdiscInfo {
        kind: words[1].to_string(),
        handle: words[2].to_string(),
        dev: None,
        parent: None,
        params: String::new(),
        stats: None,
    };
    let mut i = 3;
    if words.get(i) == Some(&"dev") {
        info.dev = Some(words.get(i + 1).ok_or_else(bad)?.to_string());
        i += 2;
    }
    match words.get(i) {
        Some(&"root") => i += 1,
        Some(&"parent") => {
            info.parent = Some(words.get(i + 1).ok_or_else(bad)?.to_string());
            i += 2;
        }
        _ => return Err(bad()),
    }
    if words.get(i) == Some(&"refcnt") {
        i += 2;
    }
    info.params = words
        .get(i..)
        .map(|rest| rest.join(" "))
        .unwrap_or_default();
    Ok(info)
}

/// `12345 bytes 10 pkt (dropped 1, overlimits 2 requeues 0)`.
fn parse_sent(rest: &str) -> Option<QdiscStats> {
    let cleaned = rest.replace(['(', ')', ','], " ");
    let words: Vec<&str> = cleaned.split_whitespace().collect();
    let mut stats = QdiscStats {
        sent_bytes: words.first()?.parse().ok()?,
        sent_packets: words.get(2)?.parse().ok()?,
        ..QdiscStats::default()
    };
    for pair in words.windows(2) {
        let value = pair[1].parse().unwrap_or(0);
        match pair[0] {
            "dropped" => stats.dropped = value,
            "overlimits" => stats.overlimits = value,
            "requeues" => stats.requeues = value,
            _ => {}
        }
    }
    Some(stats)
}

/// Groups an all-devices listing by device.
fn by_device(qdiscs: Vec<QdiscInfo>) -> BTreeMap<String, Vec<QdiscInfo>> {
    let mut map: BTreeMap<String, Vec<QdiscInfo>> = BTreeMap::new();
    for q in qdiscs {
        let dev = q.dev.clone().unwrap_or_default();
        map.entry(dev).or_default().push(q);
    }
    map
}

fn root_of(list: &[QdiscInfo]) -> Option<&QdiscInfo> {
    list.iter().find(|q| q.parent.is_none())
}

/// Our (root, leaf) handle pair when this device carries a Faultline tree.
fn our_signature(list: &[QdiscInfo]) -> Option<(u16, u16)> {
    let root = root_of(list)?;
    let major = root.major();
    if !ROOT_KINDS.contains(&root.kind.as_str()) || !is_our_major(major) {
        return None;
    }
    let leaf = list.iter().find(|q| {
        q.parent.as_deref().and_then(parse_classid) == Some((major, 1))
            && LEAF_KINDS.contains(&q.kind.as_str())
            && is_our_major(q.major())
    })?;
    Some((major, leaf.major()))
}

/// How to re-create a root qdisc of `kind` printed with `params`, or why we cannot.
pub fn restore_args(kind: &str, params: &str) -> Result<Vec<String>, String> {
    let words: Vec<String> = params.split_whitespace().map(str::to_string).collect();
    // `limit 1000p` is printed with a unit the parser refuses.
    let strip_packets = |words: Vec<String>| -> Vec<String> {
        let mut out = Vec::with_capacity(words.len());
        let mut after_limit = false;
        for word in words {
            if after_limit {
                out.push(word.strip_suffix('p').unwrap_or(&word).to_string());
            } else {
                out.push(word.clone());
            }
            after_limit = word == "limit" || word == "flow_limit";
        }
        out
    };
    match kind {
        // No options, or fixed ones (pfifo_fast's bands and priomap cannot be set).
        "noqueue" | "pfifo_fast" | "mq" => Ok(Vec::new()),
        "pfifo" | "pfifo_head_drop" | "fq_codel" => Ok(strip_packets(words)),
        "bfifo" | "tbf" => Ok(words),
        "netem" => {
            // A jittered delay uses a distribution table tc cannot read back.
            if let Some(at) = words.iter().position(|w| w == "delay")
                && words.get(at + 2).is_some_and(|w| looks_like_time(w))
            {
                return Err(
                    "a netem root with jitter uses a distribution table that tc cannot read back"
                        .into(),
                );
            }
            Ok(words)
        }
        other => Err(format!(
            "Faultline does not re-create `{other}` root qdiscs"
        )),
    }
}

fn looks_like_time(word: &str) -> bool {
    word.starts_with(|c: char| c.is_ascii_digit()) && word.ends_with('s')
}

// ---------------------------------------------------------------------------------------------
// Commands

fn tc_spec<I, S>(netns: &Netns, args: I) -> CommandSpec
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    CommandSpec::new(TC, args).in_netns(netns)
}

async fn list_qdiscs<C: CommandRunner>(
    runner: &C,
    netns: &Netns,
    stats: bool,
) -> Result<BTreeMap<String, Vec<QdiscInfo>>, TcError> {
    let args: &[&str] = if stats {
        &["-s", "qdisc", "show"]
    } else {
        &["qdisc", "show"]
    };
    let spec = tc_spec(netns, args.iter().copied());
    let out = runner.run_checked(&spec).await?;
    let parsed = parse_qdiscs(&out.stdout).map_err(|detail| TcError::Parse {
        command: spec.display(),
        detail,
    })?;
    Ok(by_device(parsed))
}

async fn device_qdiscs<C: CommandRunner>(
    runner: &C,
    netns: &Netns,
    device: &str,
) -> Result<Vec<QdiscInfo>, TcError> {
    let spec = tc_spec(netns, ["qdisc", "show", "dev", device]);
    let out = runner.run_checked(&spec).await?;
    parse_qdiscs(&out.stdout).map_err(|detail| TcError::Parse {
        command: spec.display(),
        detail,
    })
}

/// An interface of the target namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    name: String,
    up: bool,
    loopback: bool,
}

async fn list_links<C: CommandRunner>(runner: &C, netns: &Netns) -> Result<Vec<Link>, TcError> {
    let spec = CommandSpec::new("ip", ["-j", "link", "show"]).in_netns(netns);
    let out = runner.run_checked(&spec).await?;
    parse_links(&out.stdout).map_err(|detail| TcError::Parse {
        command: spec.display(),
        detail,
    })
}

fn parse_links(json: &str) -> Result<Vec<Link>, String> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let items = value.as_array().ok_or("not a JSON array")?;
    let mut links = Vec::new();
    for item in items {
        let Some(name) = item.get("ifname").and_then(|n| n.as_str()) else {
            return Err(format!("link without ifname: {item}"));
        };
        let flags: Vec<&str> = item
            .get("flags")
            .and_then(|f| f.as_array())
            .map(|f| f.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let loopback = flags.contains(&"LOOPBACK")
            || item.get("link_type").and_then(|t| t.as_str()) == Some("loopback");
        links.push(Link {
            name: name.to_string(),
            up: flags.contains(&"UP"),
            loopback,
        });
    }
    Ok(links)
}

// ---------------------------------------------------------------------------------------------
// Probe

/// Tries every mechanism for real on `lo` of a scratch namespace it creates and deletes.
pub async fn probe<C: CommandRunner>(runner: &C) -> TcCaps {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "flt-probe-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let none = |detail: String| TcCaps {
        netem: false,
        tbf: false,
        htb: false,
        clsact: false,
        u32_filter: false,
        detail,
    };
    if let Err(reason) = attempt(runner, &CommandSpec::new("ip", ["netns", "add", &name])).await {
        return none(format!(
            "could not create a scratch network namespace: {reason}"
        ));
    }
    let tc = |args: &[&str]| {
        let mut all = vec!["-n", name.as_str()];
        all.extend_from_slice(args);
        CommandSpec::new(TC, all)
    };
    let del_root = tc(&["qdisc", "del", "dev", "lo", "root"]);
    let mut notes = Vec::new();
    let mut note = |what: &str, result: &Result<(), String>| match result {
        Ok(()) => notes.push(format!("{what}: yes")),
        Err(reason) => notes.push(format!("{what}: no ({reason})")),
    };

    let netem = attempt(
        runner,
        &tc(&[
            "qdisc", "add", "dev", "lo", "root", "handle", "1:", "netem", "delay", "1ms",
        ]),
    )
    .await;
    note("netem", &netem);
    if netem.is_ok() {
        let _ = attempt(runner, &del_root).await;
    }
    let tbf_args = [
        "qdisc", "add", "dev", "lo", "root", "handle", "1:", "tbf", "rate", "1mbit", "burst",
        "32kbit", "latency", "400ms",
    ];
    let tbf = attempt(runner, &tc(&tbf_args)).await;
    note("tbf", &tbf);
    if tbf.is_ok() {
        let _ = attempt(runner, &del_root).await;
    }
    let clsact = attempt(runner, &tc(&["qdisc", "add", "dev", "lo", "clsact"])).await;
    note("clsact", &clsact);
    if clsact.is_ok() {
        let _ = attempt(runner, &tc(&["qdisc", "del", "dev", "lo", "clsact"])).await;
    }
    let htb = attempt(
        runner,
        &tc(&["qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb"]),
    )
    .await;
    note("htb", &htb);
    let u32_filter = if htb.is_ok() {
        let class = attempt(
            runner,
            &tc(&[
                "class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate",
                "1mbit",
            ]),
        )
        .await;
        let filter = match class {
            Ok(()) => {
                attempt(
                    runner,
                    &tc(&[
                        "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio",
                        "1", "u32", "match", "ip", "dport", "9", "0xffff", "flowid", "1:1",
                    ]),
                )
                .await
            }
            Err(reason) => Err(format!("htb class: {reason}")),
        };
        let _ = attempt(runner, &del_root).await;
        filter
    } else {
        Err("not tried: needs htb".to_string())
    };
    note("u32", &u32_filter);
    let deleted = attempt(runner, &CommandSpec::new("ip", ["netns", "del", &name])).await;
    if let Err(reason) = deleted {
        notes.push(format!(
            "deleting scratch namespace {name} failed: {reason}"
        ));
    }
    TcCaps {
        netem: netem.is_ok(),
        tbf: tbf.is_ok(),
        htb: htb.is_ok(),
        clsact: clsact.is_ok(),
        u32_filter: u32_filter.is_ok(),
        detail: notes.join("; "),
    }
}

async fn attempt<C: CommandRunner>(runner: &C, spec: &CommandSpec) -> Result<(), String> {
    match runner.run(spec).await {
        Ok(out) if out.success() => Ok(()),
        Ok(out) => {
            let text = out.stderr.trim();
            let first = text.lines().next().unwrap_or("").trim();
            Err(if first.is_empty() {
                format!("exit {}", out.status)
            } else {
                first.to_string()
            })
        }
        Err(err) => Err(err.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Planning

/// What goes on each interface.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Shape {
    /// Root tbf with a bfifo leaf.
    Tbf { rate_bps: u64 },
    /// Root netem with a pfifo leaf.
    Netem { args: Vec<String> },
    /// Root htb (no default class: unmatched traffic goes direct), class R:1 that never
    /// limits, the leaf doing the work, and the filters.
    Htb { leaf: Leaf, filters: Vec<Filter> },
}

/// The qdisc under the scoped class. A rate limit is a tbf there too, not the htb class's
/// own rate: tbf splits GSO packets (64 KiB on a veth) into segments before queueing them,
/// where an htb class at 1 Mbit/s queues them whole and a 400 ms queue cannot hold one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Leaf {
    Netem(Vec<String>),
    Tbf(u64),
}

/// One u32 filter: protocol, prio, match clauses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Filter {
    ipv6: bool,
    matches: Vec<String>,
}

fn burst_bytes(rate_bps: u64) -> u64 {
    (rate_bps / 8 / BURST_HZ).max(MIN_BURST_BYTES)
}

/// Bytes a queue may hold so it drains within [`SHAPER_LATENCY_MS`] (as tbf's `latency`).
fn shaper_limit(rate_bps: u64) -> u64 {
    (rate_bps / 8).saturating_mul(SHAPER_LATENCY_MS) / 1000 + burst_bytes(rate_bps)
}

fn tbf_args(rate_bps: u64) -> Vec<String> {
    vec![
        "rate".into(),
        format!("{rate_bps}bit"),
        "burst".into(),
        burst_bytes(rate_bps).to_string(),
        "latency".into(),
        format!("{SHAPER_LATENCY_MS}ms"),
    ]
}

/// Basis points as tc's percent: 3000 -> `30%`, 125 -> `1.25%`, 150 -> `1.5%`.
fn percent(bp: u32) -> String {
    let whole = bp / 100;
    let frac = bp % 100;
    if frac == 0 {
        format!("{whole}%")
    } else if frac.is_multiple_of(10) {
        format!("{whole}.{}%", frac / 10)
    } else {
        format!("{whole}.{frac:02}%")
    }
}

fn netem_args(
    delay_ms: u32,
    jitter_ms: u32,
    loss_bp: u32,
    duplicate_bp: u32,
    corrupt_bp: u32,
    reorder_bp: u32,
) -> Result<Vec<String>, TcError> {
    for (what, bp) in [
        ("loss", loss_bp),
        ("duplicate", duplicate_bp),
        ("corrupt", corrupt_bp),
        ("reorder", reorder_bp),
    ] {
        if bp > 10_000 {
            return Err(TcError::Invalid(format!(
                "{what} of {bp} basis points is over 100%"
            )));
        }
    }
    if delay_ms == 0
        && jitter_ms == 0
        && loss_bp == 0
        && duplicate_bp == 0
        && corrupt_bp == 0
        && reorder_bp == 0
    {
        return Err(TcError::Invalid("netem fault with nothing to do".into()));
    }
    if reorder_bp > 0 && delay_ms == 0 {
        return Err(TcError::Invalid(
            "reordering needs a delay (netem sends the other packets late)".into(),
        ));
    }
    let mut args = vec!["limit".to_string(), NETEM_LIMIT.to_string()];
    if delay_ms > 0 || jitter_ms > 0 {
        args.push("delay".into());
        args.push(format!("{delay_ms}ms"));
        if jitter_ms > 0 {
            args.extend([
                format!("{jitter_ms}ms"),
                "distribution".into(),
                "normal".into(),
            ]);
        }
    }
    for (what, bp) in [
        ("loss", loss_bp),
        ("duplicate", duplicate_bp),
        ("corrupt", corrupt_bp),
        ("reorder", reorder_bp),
    ] {
        if bp > 0 {
            args.push(what.into());
            args.push(percent(bp));
        }
    }
    Ok(args)
}

fn scope_is_empty(scope: &NetScope) -> bool {
    scope.peers.is_empty() && scope.ports.is_empty() && scope.protocol == Protocol::Any
}

/// A peer network, canonicalised (`10.1.2.3/8` -> `10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Self, TcError> {
        let bad = |why: &str| TcError::Invalid(format!("peer {text:?}: {why}"));
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .trim()
                .parse::<u8>()
                .map_err(|_| bad("bad prefix length"))?,
            None => max,
        };
        if len > max {
            return Err(bad("prefix length too long"));
        }
        let addr = match addr {
            IpAddr::V4(v4) => {
                let mask = if len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(len))
                };
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(len))
                };
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        };
        Ok(Self { addr, len })
    }

    fn contains(&self, other: IpAddr) -> bool {
        match (self.addr, other) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len))
                };
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len))
                };
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }

    /// Overlaps 127.0.0.0/8 or contains ::1: traffic that only `lo` carries.
    fn names_loopback(&self) -> bool {
        match self.addr {
            IpAddr::V4(_) => {
                self.contains(IpAddr::V4([127, 0, 0, 0].into()))
                    || (self.len >= 8 && self.addr.is_loopback())
            }
            IpAddr::V6(_) => self.contains(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)),
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// u32 filters selecting the scope's egress traffic; and whether `lo` carries some of it.
fn scope_filters(scope: &NetScope) -> Result<(Vec<Filter>, bool), TcError> {
    if scope.direction == Direction::Ingress {
        return Err(TcError::Unsupported(
            "tc faults act on the target's egress; an ingress-only scope would need ifb redirection, which Faultline does not set up".into(),
        ));
    }
    let peers = scope
        .peers
        .iter()
        .map(|p| Cidr::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(port) = scope.ports.iter().find(|p| **p == 0) {
        return Err(TcError::Invalid(format!("port {port} is not a port")));
    }
    if scope.protocol == Protocol::Icmp && !scope.ports.is_empty() {
        return Err(TcError::Invalid("ICMP has no ports".into()));
    }
    let loopback = peers.iter().any(Cidr::names_loopback);
    // (ipv6, destination clause)
    let destinations: Vec<(bool, Option<String>)> = if peers.is_empty() {
        vec![(false, None), (true, None)]
    } else {
        peers
            .iter()
            .map(|p| {
                let v6 = p.addr.is_ipv6();
                (
                    v6,
                    Some(format!("match {} dst {p}", if v6 { "ip6" } else { "ip" })),
                )
            })
            .collect()
    };
    let mut filters = Vec::new();
    for (v6, dst) in destinations {
        let family = if v6 { "ip6" } else { "ip" };
        let protocols: Vec<Option<u8>> = match scope.protocol {
            Protocol::Any if scope.ports.is_empty() => vec![None],
            Protocol::Any => vec![Some(6), Some(17)],
            Protocol::Tcp => vec![Some(6)],
            Protocol::Udp => vec![Some(17)],
            Protocol::Icmp => vec![Some(if v6 { 58 } else { 1 })],
        };
        for protocol in protocols {
            let ports: Vec<Option<String>> = if scope.ports.is_empty() {
                vec![None]
            } else {
                scope
                    .ports
                    .iter()
                    .flat_map(|port| {
                        [
                            Some(format!("match {family} dport {port} 0xffff")),
                            Some(format!("match {family} sport {port} 0xffff")),
                        ]
                    })
                    .collect()
            };
            for port in ports {
                let mut text = Vec::new();
                text.extend(dst.clone());
                if let Some(protocol) = protocol {
                    text.push(format!("match {family} protocol {protocol} 0xff"));
                }
                text.extend(port);
                if text.is_empty() {
                    // Only when the scope is empty, which callers handle unscoped.
                    continue;
                }
                let matches = text.join(" ").split(' ').map(str::to_string).collect();
                filters.push(Filter { ipv6: v6, matches });
            }
        }
    }
    if filters.len() > MAX_FILTERS {
        return Err(TcError::Invalid(format!(
            "the scope needs {} u32 filters (peers x protocols x ports x 2); at most {MAX_FILTERS}",
            filters.len()
        )));
    }
    Ok((filters, loopback))
}

fn describe_scope(scope: &NetScope) -> String {
    let mut parts = Vec::new();
    if !scope.peers.is_empty() {
        parts.push(format!("peers {}", scope.peers.join(",")));
    }
    if scope.protocol != Protocol::Any {
        parts.push(format!("{:?}", scope.protocol).to_lowercase());
    }
    if !scope.ports.is_empty() {
        let ports: Vec<String> = scope.ports.iter().map(u16::to_string).collect();
        parts.push(format!("ports {}", ports.join(",")));
    }
    parts.join(" ")
}

/// Decides the tree for a fault: (shape, lo included?, description).
fn shape_for(fault: &TcFault<'_>, caps: &TcCaps) -> Result<(Shape, bool, String), TcError> {
    let need = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(TcError::Unsupported(format!(
                "{what} (probe: {})",
                caps.detail
            )))
        }
    };
    let rate_ok = |rate_bps: u64| {
        if rate_bps < MIN_RATE_BPS {
            Err(TcError::Invalid(format!(
                "rate {rate_bps} bit/s is below {MIN_RATE_BPS} bit/s"
            )))
        } else {
            Ok(())
        }
    };
    let scoped = |scope: &NetScope, leaf: Leaf, what: String| {
        need(caps.htb, "a scoped tc fault needs the htb qdisc")?;
        need(
            caps.u32_filter,
            "a scoped tc fault needs the u32 classifier",
        )?;
        let (filters, lo) = scope_filters(scope)?;
        let described = format!(
            "tc htb+u32 ({} filter{} for {}) with {what}",
            filters.len(),
            if filters.len() == 1 { "" } else { "s" },
            describe_scope(scope)
        );
        Ok((Shape::Htb { leaf, filters }, lo, described))
    };
    match fault {
        TcFault::Bandwidth { rate_bps } => {
            rate_ok(*rate_bps)?;
            need(caps.tbf, "a bandwidth fault needs the tbf qdisc")?;
            let what = format!("tc tbf {}", tbf_args(*rate_bps).join(" "));
            Ok((
                Shape::Tbf {
                    rate_bps: *rate_bps,
                },
                false,
                what,
            ))
        }
        TcFault::ScopedBandwidth { scope, rate_bps } => {
            rate_ok(*rate_bps)?;
            if scope_is_empty(scope) {
                if scope.direction == Direction::Ingress {
                    scope_filters(scope)?;
                }
                return shape_for(
                    &TcFault::Bandwidth {
                        rate_bps: *rate_bps,
                    },
                    caps,
                );
            }
            let what = format!("tbf {}", tbf_args(*rate_bps).join(" "));
            scoped(scope, Leaf::Tbf(*rate_bps), what)
        }
        TcFault::Netem {
            scope,
            delay_ms,
            jitter_ms,
            loss_bp,
            duplicate_bp,
            corrupt_bp,
            reorder_bp,
        } => {
            let args = netem_args(
                *delay_ms,
                *jitter_ms,
                *loss_bp,
                *duplicate_bp,
                *corrupt_bp,
                *reorder_bp,
            )?;
            need(
                caps.netem,
                "this fault needs the netem qdisc, which this kernel lacks",
            )?;
            if scope_is_empty(scope) {
                if scope.direction == Direction::Ingress {
                    scope_filters(scope)?;
                }
                let what = format!("tc netem {}", args.join(" "));
                return Ok((Shape::Netem { args }, false, what));
            }
            let what = format!("netem {}", args.join(" "));
            scoped(scope, Leaf::Netem(args), what)
        }
    }
}

/// tc argument lists installing `shape` on `dev`.
fn device_commands(dev: &str, shape: &Shape, root: u16, leaf: u16) -> (Vec<Vec<String>>, OurTree) {
    let s = |x: &str| x.to_string();
    let root_h = format!("{root:x}:");
    let leaf_h = format!("{leaf:x}:");
    let class_h = format!("{root:x}:1");
    let root_cmd = |kind: &str, args: &[String]| {
        let mut cmd = vec![
            s("qdisc"),
            s("replace"),
            s("dev"),
            s(dev),
            s("root"),
            s("handle"),
            root_h.clone(),
            s(kind),
        ];
        cmd.extend_from_slice(args);
        cmd
    };
    let leaf_cmd = |kind: &str, args: &[String]| {
        let mut cmd = vec![
            s("qdisc"),
            s("add"),
            s("dev"),
            s(dev),
            s("parent"),
            class_h.clone(),
            s("handle"),
            leaf_h.clone(),
            s(kind),
        ];
        cmd.extend_from_slice(args);
        cmd
    };
    let tree = |root_kind: &str, leaf_kind: &str, filters: usize| OurTree {
        root_kind: s(root_kind),
        root_handle: root,
        leaf_kind: s(leaf_kind),
        leaf_handle: leaf,
        filters,
    };
    match shape {
        Shape::Tbf { rate_bps } => (
            vec![
                root_cmd("tbf", &tbf_args(*rate_bps)),
                leaf_cmd("bfifo", &[s("limit"), shaper_limit(*rate_bps).to_string()]),
            ],
            tree("tbf", "bfifo", 0),
        ),
        Shape::Netem { args } => (
            vec![
                root_cmd("netem", args),
                leaf_cmd("pfifo", &[s("limit"), NETEM_LIMIT.to_string()]),
            ],
            tree("netem", "pfifo", 0),
        ),
        Shape::Htb {
            leaf: leaf_kind,
            filters,
        } => {
            let mut cmds = vec![root_cmd("htb", &[s("direct_qlen"), s(HTB_DIRECT_QLEN)])];
            let mut class_cmd = vec![
                s("class"),
                s("add"),
                s("dev"),
                s(dev),
                s("parent"),
                root_h.clone(),
                s("classid"),
                class_h.clone(),
                s("htb"),
            ];
            class_cmd.extend(
                [
                    "rate",
                    HTB_UNLIMITED,
                    "ceil",
                    HTB_UNLIMITED,
                    "burst",
                    "1mb",
                    "cburst",
                    "1mb",
                    "quantum",
                    HTB_QUANTUM,
                ]
                .map(s),
            );
            cmds.push(class_cmd);
            let leaf_name = match leaf_kind {
                Leaf::Netem(args) => {
                    cmds.push(leaf_cmd("netem", args));
                    "netem"
                }
                Leaf::Tbf(rate_bps) => {
                    cmds.push(leaf_cmd("tbf", &tbf_args(*rate_bps)));
                    "tbf"
                }
            };
            for filter in filters {
                let (protocol, prio) = if filter.ipv6 {
                    ("ipv6", "2")
                } else {
                    ("ip", "1")
                };
                let mut cmd = vec![
                    s("filter"),
                    s("add"),
                    s("dev"),
                    s(dev),
                    s("parent"),
                    root_h.clone(),
                    s("protocol"),
                    s(protocol),
                    s("prio"),
                    s(prio),
                    s("u32"),
                ];
                cmd.extend(filter.matches.iter().cloned());
                cmd.extend([s("flowid"), class_h.clone()]);
                cmds.push(cmd);
            }
            (cmds, tree("htb", leaf_name, filters.len()))
        }
    }
}

/// What was on `dev` before: refuses what could not be put back exactly.
fn classify_previous(
    dev: &str,
    list: &[QdiscInfo],
    ours: (u16, u16),
) -> Result<PreviousRoot, TcError> {
    let Some(root) = root_of(list) else {
        return Ok(PreviousRoot::Default {
            kind: "none".into(),
        });
    };
    if let Some(sig) = our_signature(list) {
        let reason = if sig == ours {
            "this fault's qdisc is already in place".to_string()
        } else {
            format!(
                "already carries another Faultline tc fault ({} {:x}:); faults on one interface's root cannot be combined",
                root.kind, sig.0
            )
        };
        return Err(TcError::Conflict {
            device: dev.into(),
            reason,
        });
    }
    let custom: Vec<&QdiscInfo> = list
        .iter()
        .filter(|q| q.parent.is_some() && !q.is_ingress() && q.major() != 0)
        .collect();
    let unrestorable = |reason: String| TcError::Unrestorable {
        device: dev.into(),
        reason,
    };
    if let Some(child) = custom.first() {
        return Err(unrestorable(format!(
            "root {} has a child qdisc `{}` under {}; Faultline does not re-create qdisc trees",
            root.describe(),
            child.describe(),
            child.parent.as_deref().unwrap_or("?")
        )));
    }
    let major = root.major();
    if major == 0 {
        return Ok(PreviousRoot::Default {
            kind: root.kind.clone(),
        });
    }
    if major == ours.0 || major == ours.1 {
        return Err(TcError::Conflict {
            device: dev.into(),
            reason: format!(
                "its root qdisc uses handle {}, which this fault's handles clash with",
                root.handle
            ),
        });
    }
    let restore = restore_args(&root.kind, &root.params).map_err(unrestorable)?;
    Ok(PreviousRoot::Qdisc {
        kind: root.kind.clone(),
        handle: root.handle.clone(),
        params: root.params.clone(),
        restore,
    })
}

/// True when the device's root is still what `previous` recorded.
fn root_matches(list: &[QdiscInfo], previous: &PreviousRoot) -> bool {
    let root = root_of(list);
    match previous {
        PreviousRoot::Default { kind } => match root {
            None => kind == "none",
            Some(root) => root.major() == 0 && &root.kind == kind,
        },
        PreviousRoot::Qdisc {
            kind,
            handle,
            params,
            ..
        } => root.is_some_and(|root| {
            &root.kind == kind
                && root.major() == handle_major(handle).unwrap_or(u16::MAX)
                && root.params == normalise(params)
        }),
    }
}

fn describe_root(list: &[QdiscInfo]) -> String {
    root_of(list)
        .map(QdiscInfo::describe)
        .unwrap_or_else(|| "no root listed".into())
}

/// Lists the target's interfaces, records their root qdiscs and computes the exact commands.
pub async fn plan<C: CommandRunner>(
    runner: &C,
    fault: &TcFault<'_>,
    netns: &Netns,
    tag: &str,
    caps: &TcCaps,
) -> Result<TcPlan, TcError> {
    let (shape, include_lo, what) = shape_for(fault, caps)?;
    let links = list_links(runner, netns).await?;
    let devices: Vec<String> = links
        .into_iter()
        .filter(|l| l.up && (!l.loopback || include_lo))
        .map(|l| l.name)
        .collect();
    if devices.is_empty() {
        return Err(TcError::NoInterfaces(netns.inode));
    }
    let qdiscs = list_qdiscs(runner, netns, false).await?;
    let handles = handles_for(tag);
    let mut undo_devices = Vec::new();
    let mut apply = Vec::new();
    for dev in &devices {
        let list = qdiscs.get(dev).map(Vec::as_slice).unwrap_or_default();
        let previous = classify_previous(dev, list, handles)?;
        let (commands, ours) = device_commands(dev, &shape, handles.0, handles.1);
        apply.extend(commands.into_iter().map(|args| tc_spec(netns, args)));
        undo_devices.push(DeviceUndo {
            device: dev.clone(),
            previous,
            ours,
        });
    }
    Ok(TcPlan {
        undo: TcUndo {
            netns: netns.clone(),
            tag: tag.to_string(),
            devices: undo_devices,
        },
        mechanism: format!("{what} on egress of {}", devices.join(", ")),
        apply,
    })
}

// ---------------------------------------------------------------------------------------------
// Apply, verify, undo, sweep

/// Applies the plan; on any failure removes whatever was applied, then reports the failure.
pub async fn apply<C: CommandRunner>(runner: &C, plan: &TcPlan) -> Result<(), TcError> {
    let netns = &plan.undo.netns;
    let qdiscs = list_qdiscs(runner, netns, false).await?;
    for dev in &plan.undo.devices {
        let list = qdiscs
            .get(&dev.device)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if !root_matches(list, &dev.previous) {
            return Err(TcError::Changed {
                device: dev.device.clone(),
                expected: dev.previous.describe(),
                found: describe_root(list),
            });
        }
    }
    for spec in &plan.apply {
        if let Err(err) = runner.run_checked(spec).await {
            let rollback = match undo(runner, &plan.undo).await {
                Ok(note) => note,
                Err(undo_err) => format!("ROLLBACK FAILED: {undo_err}"),
            };
            return Err(TcError::ApplyFailed {
                error: Box::new(err.into()),
                rollback,
            });
        }
    }
    Ok(())
}

fn is_ours(list: &[QdiscInfo], ours: &OurTree) -> bool {
    root_of(list).is_some_and(|r| r.kind == ours.root_kind && r.major() == ours.root_handle)
}

fn leaf_of<'a>(list: &'a [QdiscInfo], ours: &OurTree) -> Option<&'a QdiscInfo> {
    list.iter().find(|q| {
        q.parent.as_deref().and_then(parse_classid) == Some((ours.root_handle, 1))
            && q.kind == ours.leaf_kind
            && q.major() == ours.leaf_handle
    })
}

fn describe_stats(q: &QdiscInfo) -> String {
    match &q.stats {
        Some(s) => format!(
            "{} {}: sent {} bytes {} pkt, dropped {}, overlimits {}, backlog {}",
            q.kind, q.handle, s.sent_bytes, s.sent_packets, s.dropped, s.overlimits, s.backlog
        ),
        None => format!("{} {}: no counters", q.kind, q.handle),
    }
}

/// Checks our tree is on every interface, with the kernel's counters in the detail.
pub async fn verify<C: CommandRunner>(runner: &C, undo: &TcUndo) -> Result<Verification, TcError> {
    if !undo.netns.still_exists() {
        return Ok(Verification {
            effective: false,
            detail: format!("network namespace {} is gone", undo.netns.inode),
        });
    }
    let qdiscs = list_qdiscs(runner, &undo.netns, true).await?;
    let mut effective = true;
    let mut details = Vec::new();
    for dev in &undo.devices {
        let list = qdiscs
            .get(&dev.device)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let root = root_of(list).filter(|_| is_ours(list, &dev.ours));
        let leaf = leaf_of(list, &dev.ours);
        let (Some(root), Some(leaf)) = (root, leaf) else {
            effective = false;
            details.push(format!(
                "{}: our qdiscs are missing (root is {})",
                dev.device,
                describe_root(list)
            ));
            continue;
        };
        let mut line = format!(
            "{}: {}; {}",
            dev.device,
            describe_stats(root),
            describe_stats(leaf)
        );
        if dev.ours.filters > 0 {
            let spec = tc_spec(
                &undo.netns,
                [
                    "filter",
                    "show",
                    "dev",
                    dev.device.as_str(),
                    "parent",
                    &format!("{:x}:", dev.ours.root_handle),
                ],
            );
            let out = runner.run_checked(&spec).await?;
            let flowid = format!("flowid {:x}:1", dev.ours.root_handle);
            let found = out.stdout.lines().filter(|l| l.contains(&flowid)).count();
            if found < dev.ours.filters {
                effective = false;
            }
            line.push_str(&format!("; {found} of {} u32 filters", dev.ours.filters));
        }
        details.push(line);
    }
    Ok(Verification {
        effective,
        detail: details.join(" | "),
    })
}

fn netns_gone(netns: &Netns) -> String {
    format!(
        "namespace gone (inode {} at {}): its qdiscs went with it",
        netns.inode,
        netns.path.display()
    )
}

/// Removes our tree and puts each interface's previous root qdisc back. Idempotent.
pub async fn undo<C: CommandRunner>(runner: &C, undo: &TcUndo) -> Result<String, TcError> {
    let netns = &undo.netns;
    if !netns.still_exists() {
        return Ok(netns_gone(netns));
    }
    let qdiscs = match list_qdiscs(runner, netns, false).await {
        Ok(qdiscs) => qdiscs,
        Err(_) if !netns.still_exists() => return Ok(netns_gone(netns)),
        Err(err) => return Err(err),
    };
    let mut notes = Vec::new();
    let mut failure = None;
    for dev in &undo.devices {
        let list = qdiscs
            .get(&dev.device)
            .map(Vec::as_slice)
            .unwrap_or_default();
        match undo_device(runner, netns, dev, list).await {
            Ok(note) => notes.push(note),
            Err(err) => {
                notes.push(format!("{}: {err}", dev.device));
                failure.get_or_insert(err);
            }
        }
    }
    match failure {
        Some(err) if netns.still_exists() => Err(err),
        Some(_) => Ok(netns_gone(netns)),
        None => Ok(notes.join("; ")),
    }
}

async fn undo_device<C: CommandRunner>(
    runner: &C,
    netns: &Netns,
    dev: &DeviceUndo,
    list: &[QdiscInfo],
) -> Result<String, TcError> {
    let name = dev.device.as_str();
    if !is_ours(list, &dev.ours) {
        let root = if list.is_empty() {
            "none listed: device gone, down, or default".to_string()
        } else {
            describe_root(list)
        };
        return Ok(format!(
            "{name}: our qdisc is already absent (root: {root})"
        ));
    }
    let delete = tc_spec(netns, ["qdisc", "del", "dev", name, "root"]);
    let removed = format!(
        "{name}: removed tc {} {:x}:",
        dev.ours.root_kind, dev.ours.root_handle
    );
    let (kind, handle, params, restore) = match &dev.previous {
        PreviousRoot::Default { .. } => {
            runner.run_checked(&delete).await?;
            let after = device_qdiscs(runner, netns, name).await?;
            return Ok(if root_matches(&after, &dev.previous) {
                format!("{removed}, {} is back", dev.previous.describe())
            } else {
                format!(
                    "{removed}; the kernel attached `{}` (before: {})",
                    describe_root(&after),
                    dev.previous.describe()
                )
            });
        }
        PreviousRoot::Qdisc {
            kind,
            handle,
            params,
            restore,
        } => (kind, handle, params, restore),
    };
    let replace = |restore: &[String]| {
        let mut args = vec![
            "qdisc", "replace", "dev", name, "root", "handle", handle, kind,
        ];
        args.extend(restore.iter().map(String::as_str));
        tc_spec(netns, args)
    };
    if let Err(err) = runner.run_checked(&replace(restore)).await {
        runner.run_checked(&delete).await?;
        return Err(TcError::RestoreFailed {
            device: name.into(),
            previous: dev.previous.describe(),
            error: err.to_string(),
        });
    }
    let mut after = device_qdiscs(runner, netns, name).await?;
    // tc prints some sizes truncated (a tbf burst of 5000 bytes shows as 4999b, and 4999b
    // given back shows as 4998b): nudge such byte counts until the print matches.
    let mut args = restore.clone();
    for _ in 0..3 {
        if root_matches(&after, &dev.previous) {
            break;
        }
        let Some(now) = root_of(&after).filter(|r| &r.kind == kind) else {
            break;
        };
        let Some(nudged) = nudge_sizes(&args, params, &now.params) else {
            break;
        };
        if runner.run_checked(&replace(&nudged)).await.is_err() {
            break;
        }
        args = nudged;
        after = device_qdiscs(runner, netns, name).await?;
    }
    if root_matches(&after, &dev.previous) {
        Ok(format!("{removed}, {} is back", dev.previous.describe()))
    } else {
        tracing::warn!(device = name, recorded = %dev.previous.describe(), now = %describe_root(&after), "restored root qdisc prints differently");
        Ok(format!(
            "{removed}, put back {}, but tc now prints `{}` (tc's units round some values)",
            dev.previous.describe(),
            describe_root(&after)
        ))
    }
}

/// `4999b` -> 4999 (plain byte counts only, not `4Kb` or `1Mbit`).
fn plain_bytes(word: &str) -> Option<i64> {
    let digits = word.strip_suffix('b')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Restore arguments with each byte count that prints short (`recorded` vs `now`, as printed)
/// raised by the shortfall; `None` when the prints differ in any other way.
fn nudge_sizes(restore: &[String], recorded: &str, now: &str) -> Option<Vec<String>> {
    let recorded: Vec<&str> = recorded.split_whitespace().collect();
    let now: Vec<&str> = now.split_whitespace().collect();
    if recorded.len() != now.len() {
        return None;
    }
    let mut out = restore.to_vec();
    let mut changed = false;
    for (i, (want, got)) in recorded.iter().zip(&now).enumerate() {
        if want == got {
            continue;
        }
        let (want, got) = (plain_bytes(want)?, plain_bytes(got)?);
        let key = recorded.get(i.checked_sub(1)?)?;
        let at = out.iter().position(|w| w == key)? + 1;
        let current = plain_bytes(out.get(at)?)?;
        out[at] = format!("{}b", current + want - got);
        changed = true;
    }
    changed.then_some(out)
}

/// Removes Faultline qdisc trees whose tag is not live. Never touches anything else. Note: the
/// previous root qdisc of a leftover is unknown here (that is what the journal's undo is for):
/// the kernel's default root comes back.
pub async fn sweep<C: CommandRunner>(
    runner: &C,
    netns: &Netns,
    live_tags: &HashSet<String>,
) -> Result<Vec<String>, TcError> {
    sweep_owned(runner, netns, live_tags, None).await
}

/// Like [`sweep`], but when `owner_tag` is given only trees whose handles carry that tag's
/// owner bits are candidates: an agent never removes another agent's qdiscs.
pub async fn sweep_owned<C: CommandRunner>(
    runner: &C,
    netns: &Netns,
    live_tags: &HashSet<String>,
    owner_tag: Option<&str>,
) -> Result<Vec<String>, TcError> {
    if !netns.still_exists() {
        return Ok(Vec::new());
    }
    let live: HashSet<(u16, u16)> = live_tags.iter().map(|t| handles_for(t)).collect();
    let foreign = |root: u16| owner_tag.is_some_and(|tag| (root >> 8) & 0x3f != owner_bits(tag));
    let qdiscs = list_qdiscs(runner, netns, false).await?;
    let mut removed = Vec::new();
    for (dev, list) in &qdiscs {
        let Some(sig) = our_signature(list) else {
            continue;
        };
        if live.contains(&sig) || foreign(sig.0) {
            continue;
        }
        let root = describe_root(list);
        runner
            .run_checked(&tc_spec(
                netns,
                ["qdisc", "del", "dev", dev.as_str(), "root"],
            ))
            .await?;
        removed.push(format!(
            "{dev}: removed leftover Faultline tc tree `{root}` (leaf {:x}:) of no live fault; kernel default root back",
            sig.1
        ));
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::command::{CommandOutput, RecordingRunner};

    const TAG: &str = "flt0123456789";
    // handles_for(TAG): root 513e:, leaf 51be:.
    const H: &str = "513e";
    const L: &str = "51be";

    /// `ip -j link show` inside a container-like namespace (captured, addresses shortened):
    /// lo, a down fallback tunnel, and the veth.
    const LINKS: &str = r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"qdisc":"noqueue","operstate":"UNKNOWN","linkmode":"DEFAULT","group":"default","txqlen":1000,"link_type":"loopback","address":"00:00:00:00:00:00","broadcast":"00:00:00:00:00:00"},{"ifindex":2,"ifname":"tunl0","flags":["NOARP"],"mtu":1480,"qdisc":"noop","operstate":"DOWN","linkmode":"DEFAULT","group":"default","txqlen":1000,"link_type":"ipip","address":"0.0.0.0","broadcast":"0.0.0.0"},{"ifindex":3,"link_index":4,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1500,"qdisc":"noqueue","operstate":"UP","linkmode":"DEFAULT","group":"default","txqlen":1000,"link_type":"ether","address":"0e:1d:46:e0:24:2d","broadcast":"ff:ff:ff:ff:ff:ff","link_netnsid":0}]"#;

    /// Captured on this kernel (iproute2 6.1): `tc qdisc show` with a user's tbf and a clsact.
    const SHOW_USER_TBF: &str = "qdisc tbf 1: dev eth0 root refcnt 3 rate 50Mbit burst 64Kb lat 50ms \nqdisc clsact ffff: dev eth0 parent ffff:fff1 \n";
    /// Captured: a veth's default root.
    const SHOW_DEFAULT: &str =
        "qdisc noqueue 0: dev lo root refcnt 2 \nqdisc noqueue 0: dev eth0 root refcnt 2 \n";
    /// A physical NIC's default root (single queue).
    const SHOW_PFIFO_FAST_DEFAULT: &str = "qdisc noqueue 0: dev lo root refcnt 2 \nqdisc pfifo_fast 0: dev eth0 root refcnt 2 bands 3 priomap 1 2 2 2 1 2 0 0 1 1 1 1 1 1 1 1\n";
    /// Captured: pfifo_fast installed by hand.
    const SHOW_PFIFO_FAST_EXPLICIT: &str = "qdisc pfifo_fast 1: dev eth0 root refcnt 3 bands 3 priomap 1 2 2 2 1 2 0 0 1 1 1 1 1 1 1 1\n";

    fn caps() -> TcCaps {
        TcCaps {
            netem: true,
            tbf: true,
            htb: true,
            clsact: true,
            u32_filter: true,
            detail: "test".into(),
        }
    }

    fn me() -> Netns {
        Netns::current().unwrap()
    }

    fn lines(runner: &RecordingRunner) -> Vec<String> {
        let prefix = format!("[netns {}] ", me().inode);
        runner
            .lines()
            .into_iter()
            .map(|l| l.strip_prefix(&prefix).unwrap_or(&l).to_string())
            .collect()
    }

    fn scope() -> NetScope {
        NetScope {
            peers: vec!["10.1.2.3/8".into()],
            ports: vec![3306],
            protocol: Protocol::Tcp,
            direction: Direction::Both,
        }
    }

    /// What `tc qdisc show` prints once our tree is in place.
    fn show_ours(ours: &OurTree) -> String {
        format!(
            "qdisc {} {:x}: dev eth0 root refcnt 2 x\nqdisc {} {:x}: dev eth0 parent {:x}:1 limit 1\n",
            ours.root_kind, ours.root_handle, ours.leaf_kind, ours.leaf_handle, ours.root_handle
        )
    }

    #[test]
    fn handles_are_derived_from_the_tag_and_stay_in_our_range() {
        assert_eq!(handles_for(TAG), (0x513e, 0x51be));
        for i in 0..2000 {
            let (root, leaf) = handles_for(&crate::net::tag_for(&format!("run/{i}")));
            assert!(is_our_major(root) && is_our_major(leaf) && root != leaf);
        }
        assert!(!is_our_major(1) && !is_our_major(0x8001) && !is_our_major(0xffff));
    }

    #[test]
    fn percentages_are_written_as_tc_reads_them() {
        assert_eq!(percent(3000), "30%");
        assert_eq!(percent(125), "1.25%");
        assert_eq!(percent(150), "1.5%");
        assert_eq!(percent(5), "0.05%");
        assert_eq!(percent(10_000), "100%");
    }

    #[test]
    fn qdisc_listings_parse_with_and_without_devices_and_counters() {
        let all = parse_qdiscs(SHOW_USER_TBF).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].kind, "tbf");
        assert_eq!(all[0].handle, "1:");
        assert_eq!(all[0].dev.as_deref(), Some("eth0"));
        assert_eq!(all[0].parent, None);
        assert_eq!(all[0].params, "rate 50Mbit burst 64Kb lat 50ms");
        assert!(all[1].is_ingress());

        // Captured: `tc -s qdisc show dev v0` with our tbf + bfifo leaf after a transfer.
        let stats = "qdisc tbf 4a3f: root refcnt 3 rate 1Mbit burst 4Kb lat 400ms \n Sent 262798 bytes 186 pkt (dropped 3, overlimits 171 requeues 0) \n backlog 0b 0p requeues 0\nqdisc bfifo 5b21: parent 4a3f:1 limit 54096b\n Sent 262798 bytes 186 pkt (dropped 3, overlimits 0 requeues 0) \n backlog 1514b 1p requeues 0\n";
        let parsed = parse_qdiscs(stats).unwrap();
        assert_eq!(parsed.len(), 2);
        let s = parsed[0].stats.clone().unwrap();
        assert_eq!(
            (s.sent_bytes, s.sent_packets, s.dropped, s.overlimits),
            (262_798, 186, 3, 171)
        );
        assert_eq!(parsed[1].stats.as_ref().unwrap().backlog, "1514b 1p");
        assert_eq!(parsed[1].parent.as_deref(), Some("4a3f:1"));
        assert_eq!(our_signature(&parsed), Some((0x4a3f, 0x5b21)));

        // Captured: htb + pfifo leaf, and an mq with its default children.
        let htb = "qdisc htb 4a3f: root refcnt 3 r2q 10 default 0 direct_packets_stat 0 direct_qlen 1000\n Sent 0 bytes 0 pkt (dropped 0, overlimits 0 requeues 0) \n backlog 0b 0p requeues 0\nqdisc pfifo 5b21: parent 4a3f:1 limit 10000p\n Sent 0 bytes 0 pkt (dropped 0, overlimits 0 requeues 0) \n backlog 0b 0p requeues 0\n";
        assert_eq!(
            our_signature(&parse_qdiscs(htb).unwrap()),
            Some((0x4a3f, 0x5b21))
        );
        let mq = "qdisc mq 1: dev v1 root \nqdisc pfifo_fast 0: dev v1 parent 1:1 bands 3 priomap 1 2 2 2 1 2 0 0 1 1 1 1 1 1 1 1\nqdisc ingress ffff: dev lo parent ffff:fff1 ---------------- \n";
        let mq = parse_qdiscs(mq).unwrap();
        assert_eq!(mq[0].params, "");
        assert_eq!(mq[1].parent.as_deref(), Some("1:1"));
        assert_eq!(mq[1].major(), 0);
        assert!(mq[2].is_ingress());
        assert_eq!(our_signature(&mq[..2]), None);

        // A user's tbf with a handle in our range but no leaf of ours is not ours.
        let lookalike =
            parse_qdiscs("qdisc tbf 4a3f: root refcnt 2 rate 1Mbit burst 4Kb lat 400ms\n").unwrap();
        assert_eq!(our_signature(&lookalike), None);

        assert!(parse_qdiscs("garbage line\n").is_err());
        assert!(parse_qdiscs("qdisc tbf nohandle root\n").is_err());
        assert_eq!(parse_qdiscs("").unwrap(), vec![]);
    }

    #[test]
    fn restore_arguments_come_from_the_printed_parameters() {
        assert_eq!(
            restore_args("tbf", "rate 50Mbit burst 64Kb lat 50ms").unwrap(),
            ["rate", "50Mbit", "burst", "64Kb", "lat", "50ms"]
        );
        assert_eq!(restore_args("pfifo", "limit 33p").unwrap(), ["limit", "33"]);
        assert_eq!(
            restore_args("bfifo", "limit 20000b").unwrap(),
            ["limit", "20000b"]
        );
        assert!(
            restore_args(
                "pfifo_fast",
                "bands 3 priomap 1 2 2 2 1 2 0 0 1 1 1 1 1 1 1 1"
            )
            .unwrap()
            .is_empty()
        );
        assert_eq!(
            restore_args("fq_codel", "limit 10240p flows 1024 quantum 1514 target 5ms interval 100ms memory_limit 32Mb ecn drop_batch 64").unwrap().join(" "),
            "limit 10240 flows 1024 quantum 1514 target 5ms interval 100ms memory_limit 32Mb ecn drop_batch 64"
        );
        assert_eq!(
            restore_args("netem", "limit 1000 delay 100ms loss 1%")
                .unwrap()
                .join(" "),
            "limit 1000 delay 100ms loss 1%"
        );
        assert!(
            restore_args("netem", "limit 1000 delay 100ms  10ms")
                .unwrap_err()
                .contains("jitter")
        );
        assert!(
            restore_args(
                "htb",
                "r2q 10 default 0x1 direct_packets_stat 0 direct_qlen 1000"
            )
            .is_err()
        );
        assert!(restore_args("cake", "bandwidth 10Mbit").is_err());
    }

    #[test]
    fn sizes_that_print_short_are_nudged() {
        let restore: Vec<String> =
            "rate 7654Kbit burst 4999b peakrate 20Mbit minburst 1600b lat 50ms"
                .split(' ')
                .map(String::from)
                .collect();
        let recorded = "rate 7654Kbit burst 4999b peakrate 20Mbit minburst 1600b lat 50ms";
        let now = "rate 7654Kbit burst 4998b peakrate 20Mbit minburst 1600b lat 50ms";
        let nudged = nudge_sizes(&restore, recorded, now).unwrap();
        assert_eq!(
            nudged.join(" "),
            "rate 7654Kbit burst 5000b peakrate 20Mbit minburst 1600b lat 50ms"
        );
        assert_eq!(nudge_sizes(&restore, recorded, recorded), None);
        assert_eq!(
            nudge_sizes(
                &restore,
                recorded,
                "rate 1Mbit burst 4998b peakrate 20Mbit minburst 1600b lat 50ms"
            ),
            None
        );
        assert_eq!(plain_bytes("4Kb"), None);
        assert_eq!(plain_bytes("1600b"), Some(1600));
    }

    #[test]
    fn links_parse_and_scopes_pick_interfaces() {
        let links = parse_links(LINKS).unwrap();
        let names: Vec<_> = links
            .iter()
            .map(|l| (l.name.as_str(), l.up, l.loopback))
            .collect();
        assert_eq!(
            names,
            [
                ("lo", true, true),
                ("tunl0", false, false),
                ("eth0", true, false)
            ]
        );
        assert!(parse_links("not json").is_err());
    }

    #[test]
    fn peers_are_canonicalised_and_loopback_is_recognised() {
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            Cidr::parse("192.168.1.5").unwrap().to_string(),
            "192.168.1.5/32"
        );
        assert_eq!(Cidr::parse("fd00::1/8").unwrap().to_string(), "fd00::/8");
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("host.example").is_err());
        assert!(Cidr::parse("127.0.0.1/32").unwrap().names_loopback());
        assert!(Cidr::parse("127.5.0.0/16").unwrap().names_loopback());
        assert!(Cidr::parse("0.0.0.0/0").unwrap().names_loopback());
        assert!(Cidr::parse("::1").unwrap().names_loopback());
        assert!(!Cidr::parse("10.0.0.0/8").unwrap().names_loopback());
        assert!(!Cidr::parse("fd00::/8").unwrap().names_loopback());
    }

    #[test]
    fn scope_filters_cover_both_ports_protocols_and_families() {
        let any = NetScope {
            ports: vec![53],
            ..NetScope::default()
        };
        let (filters, lo) = scope_filters(&any).unwrap();
        assert!(!lo);
        let text: Vec<String> = filters
            .iter()
            .map(|f| format!("{} {}", f.ipv6, f.matches.join(" ")))
            .collect();
        assert_eq!(
            text,
            [
                "false match ip protocol 6 0xff match ip dport 53 0xffff",
                "false match ip protocol 6 0xff match ip sport 53 0xffff",
                "false match ip protocol 17 0xff match ip dport 53 0xffff",
                "false match ip protocol 17 0xff match ip sport 53 0xffff",
                "true match ip6 protocol 6 0xff match ip6 dport 53 0xffff",
                "true match ip6 protocol 6 0xff match ip6 sport 53 0xffff",
                "true match ip6 protocol 17 0xff match ip6 dport 53 0xffff",
                "true match ip6 protocol 17 0xff match ip6 sport 53 0xffff",
            ]
        );
        let icmp = NetScope {
            peers: vec!["::1".into(), "127.0.0.1".into()],
            protocol: Protocol::Icmp,
            ..NetScope::default()
        };
        let (filters, lo) = scope_filters(&icmp).unwrap();
        assert!(lo);
        let text: Vec<String> = filters.iter().map(|f| f.matches.join(" ")).collect();
        assert_eq!(
            text,
            [
                "match ip6 dst ::1/128 match ip6 protocol 58 0xff",
                "match ip dst 127.0.0.1/32 match ip protocol 1 0xff"
            ]
        );
        let ingress = NetScope {
            direction: Direction::Ingress,
            ..scope()
        };
        assert!(matches!(
            scope_filters(&ingress),
            Err(TcError::Unsupported(_))
        ));
        let icmp_ports = NetScope {
            protocol: Protocol::Icmp,
            ports: vec![1],
            ..NetScope::default()
        };
        assert!(matches!(
            scope_filters(&icmp_ports),
            Err(TcError::Invalid(_))
        ));
        let huge = NetScope {
            ports: (1..=300).collect(),
            ..NetScope::default()
        };
        assert!(matches!(scope_filters(&huge), Err(TcError::Invalid(_))));
    }

    /// The previous roots every fault is tried against: (listing, undo command).
    fn previous_roots() -> Vec<(&'static str, &'static str, Option<String>)> {
        vec![
            (
                "none (veth default)",
                SHOW_DEFAULT,
                Some("tc qdisc del dev eth0 root".into()),
            ),
            (
                "pfifo_fast default",
                SHOW_PFIFO_FAST_DEFAULT,
                Some("tc qdisc del dev eth0 root".into()),
            ),
            (
                "pfifo_fast by hand",
                SHOW_PFIFO_FAST_EXPLICIT,
                Some("tc qdisc replace dev eth0 root handle 1: pfifo_fast".into()),
            ),
            (
                "user's tbf",
                SHOW_USER_TBF,
                Some(
                    "tc qdisc replace dev eth0 root handle 1: tbf rate 50Mbit burst 64Kb lat 50ms"
                        .into(),
                ),
            ),
        ]
    }

    async fn plan_apply_undo(fault: &TcFault<'_>, before: &str) -> (TcPlan, Vec<String>, String) {
        let runner = RecordingRunner::new();
        runner.answer("ip -j link show", CommandOutput::ok(LINKS));
        runner.answer("tc qdisc show", CommandOutput::ok(before));
        let plan = super::plan(&runner, fault, &me(), TAG, &caps())
            .await
            .unwrap();
        runner.answer("tc qdisc show", CommandOutput::ok(before));
        apply(&runner, &plan).await.unwrap();
        runner.answer(
            "tc qdisc show",
            CommandOutput::ok(&show_ours(&plan.undo.devices[0].ours)),
        );
        let after_del: String = before
            .lines()
            .filter(|l| l.contains("dev eth0 "))
            .map(|l| format!("{}\n", l.replace("dev eth0 ", "")))
            .collect();
        runner.answer("qdisc show dev eth0", CommandOutput::ok(&after_del));
        let note = undo(&runner, &plan.undo).await.unwrap();
        (plan, lines(&runner), note)
    }

    #[tokio::test]
    async fn every_fault_on_every_previous_root_has_exact_commands_and_an_exact_undo() {
        let scope = scope();
        let unscoped = NetScope::default();
        let filters = |h: &str| {
            vec![
                format!(
                    "tc filter add dev eth0 parent {h}: protocol ip prio 1 u32 match ip dst 10.0.0.0/8 match ip protocol 6 0xff match ip dport 3306 0xffff flowid {h}:1"
                ),
                format!(
                    "tc filter add dev eth0 parent {h}: protocol ip prio 1 u32 match ip dst 10.0.0.0/8 match ip protocol 6 0xff match ip sport 3306 0xffff flowid {h}:1"
                ),
            ]
        };
        let netem = "netem limit 10000 delay 100ms 10ms distribution normal loss 1% duplicate 0.5% corrupt 0.05% reorder 25%";
        let cases: Vec<(&str, TcFault<'_>, Vec<String>, &str)> = vec![
            (
                "bandwidth",
                TcFault::Bandwidth { rate_bps: 1_000_000 },
                vec![
                    format!("tc qdisc replace dev eth0 root handle {H}: tbf rate 1000000bit burst 4096 latency 400ms"),
                    format!("tc qdisc add dev eth0 parent {H}:1 handle {L}: bfifo limit 54096"),
                ],
                "tc tbf rate 1000000bit burst 4096 latency 400ms on egress of eth0",
            ),
            (
                "bandwidth, empty scope",
                TcFault::ScopedBandwidth { scope: &unscoped, rate_bps: 1_000_000 },
                vec![
                    format!("tc qdisc replace dev eth0 root handle {H}: tbf rate 1000000bit burst 4096 latency 400ms"),
                    format!("tc qdisc add dev eth0 parent {H}:1 handle {L}: bfifo limit 54096"),
                ],
                "tc tbf rate 1000000bit burst 4096 latency 400ms on egress of eth0",
            ),
            (
                "bandwidth, scoped",
                TcFault::ScopedBandwidth { scope: &scope, rate_bps: 10_000_000 },
                [
                    vec![
                        format!("tc qdisc replace dev eth0 root handle {H}: htb direct_qlen 1000"),
                        format!("tc class add dev eth0 parent {H}: classid {H}:1 htb rate 100gbit ceil 100gbit burst 1mb cburst 1mb quantum 60000"),
                        format!("tc qdisc add dev eth0 parent {H}:1 handle {L}: tbf rate 10000000bit burst 5000 latency 400ms"),
                    ],
                    filters(H),
                ]
                .concat(),
                "tc htb+u32 (2 filters for peers 10.1.2.3/8 tcp ports 3306) with tbf rate 10000000bit burst 5000 latency 400ms on egress of eth0",
            ),
            (
                "netem",
                TcFault::Netem { scope: &unscoped, delay_ms: 100, jitter_ms: 10, loss_bp: 100, duplicate_bp: 50, corrupt_bp: 5, reorder_bp: 2500 },
                vec![
                    format!("tc qdisc replace dev eth0 root handle {H}: {netem}"),
                    format!("tc qdisc add dev eth0 parent {H}:1 handle {L}: pfifo limit 10000"),
                ],
                "tc netem limit 10000 delay 100ms 10ms distribution normal loss 1% duplicate 0.5% corrupt 0.05% reorder 25% on egress of eth0",
            ),
            (
                "netem, scoped",
                TcFault::Netem { scope: &scope, delay_ms: 100, jitter_ms: 10, loss_bp: 100, duplicate_bp: 50, corrupt_bp: 5, reorder_bp: 2500 },
                [
                    vec![
                        format!("tc qdisc replace dev eth0 root handle {H}: htb direct_qlen 1000"),
                        format!("tc class add dev eth0 parent {H}: classid {H}:1 htb rate 100gbit ceil 100gbit burst 1mb cburst 1mb quantum 60000"),
                        format!("tc qdisc add dev eth0 parent {H}:1 handle {L}: {netem}"),
                    ],
                    filters(H),
                ]
                .concat(),
                "tc htb+u32 (2 filters for peers 10.1.2.3/8 tcp ports 3306) with netem limit 10000 delay 100ms 10ms distribution normal loss 1% duplicate 0.5% corrupt 0.05% reorder 25% on egress of eth0",
            ),
        ];
        for (name, fault, apply_lines, mechanism) in &cases {
            for (previous, before, undo_line) in previous_roots() {
                let (plan, got, note) = plan_apply_undo(fault, before).await;
                let mut expected = vec![
                    "ip -j link show".to_string(),
                    "tc qdisc show".into(),
                    "tc qdisc show".into(),
                ];
                expected.extend(apply_lines.iter().cloned());
                expected.push("tc qdisc show".into());
                expected.extend(undo_line.clone());
                expected.push("tc qdisc show dev eth0".into());
                assert_eq!(got, expected, "{name} over {previous}");
                assert_eq!(&plan.mechanism, mechanism, "{name}");
                assert_eq!(
                    plan.undo.devices.len(),
                    1,
                    "lo and the down tunnel are left alone"
                );
                assert!(note.contains("is back"), "{name} over {previous}: {note}");
                // The undo survives the journal.
                let json = serde_json::to_string(&plan.undo).unwrap();
                assert_eq!(serde_json::from_str::<TcUndo>(&json).unwrap(), plan.undo);
            }
        }
    }

    #[tokio::test]
    async fn the_recorded_previous_root_is_what_tc_printed() {
        let runner = RecordingRunner::new();
        runner.answer("ip -j link show", CommandOutput::ok(LINKS));
        runner.answer("tc qdisc show", CommandOutput::ok(SHOW_USER_TBF));
        let plan = super::plan(
            &runner,
            &TcFault::Bandwidth {
                rate_bps: 1_000_000,
            },
            &me(),
            TAG,
            &caps(),
        )
        .await
        .unwrap();
        assert_eq!(
            plan.undo.devices[0].previous,
            PreviousRoot::Qdisc {
                kind: "tbf".into(),
                handle: "1:".into(),
                params: "rate 50Mbit burst 64Kb lat 50ms".into(),
                restore: ["rate", "50Mbit", "burst", "64Kb", "lat", "50ms"]
                    .map(String::from)
                    .to_vec(),
            }
        );
        assert_eq!(
            plan.undo.devices[0].ours,
            OurTree {
                root_kind: "tbf".into(),
                root_handle: 0x513e,
                leaf_kind: "bfifo".into(),
                leaf_handle: 0x51be,
                filters: 0
            }
        );
        let runner = RecordingRunner::new();
        runner.answer("ip -j link show", CommandOutput::ok(LINKS));
        runner.answer("tc qdisc show", CommandOutput::ok(SHOW_PFIFO_FAST_DEFAULT));
        let plan = super::plan(
            &runner,
            &TcFault::Bandwidth {
                rate_bps: 1_000_000,
            },
            &me(),
            TAG,
            &caps(),
        )
        .await
        .unwrap();
        assert_eq!(
            plan.undo.devices[0].previous,
            PreviousRoot::Default {
                kind: "pfifo_fast".into()
            }
        );
    }

    #[tokio::test]
    async fn loopback_is_included_only_when_the_scope_names_it() {
        let scope = NetScope {
            peers: vec!["127.0.0.1/32".into()],
            ..NetScope::default()
        };
        let runner = RecordingRunner::new();
        runner.answer("ip -j link show", CommandOutput::ok(LINKS));
        runner.answer("tc qdisc show", CommandOutput::ok(SHOW_DEFAULT));
        let fault = TcFault::Netem {
            scope: &scope,
            delay_ms: 50,
            jitter_ms: 0,
            loss_bp: 0,
            duplicate_bp: 0,
            corrupt_bp: 0,
            reorder_bp: 0,
        };
        let plan = super::plan(&runner, &fault, &me(), TAG, &caps())
            .await
            .unwrap();
        let devices: Vec<_> = plan
            .undo
            .devices
            .iter()
            .map(|d| d.device.as_str())
            .collect();
        assert_eq!(devices, ["lo", "eth0"]);
        assert_eq!(plan.undo.devices[0].ours.filters, 1);
        assert!(
            plan.mechanism.ends_with("on egress of lo, eth0"),
            "{}",
            plan.mechanism
        );
    }

    #[tokio::test]
    async fn faults_this_host_cannot_do_or_undo_are_refused_before_anything_runs() {
        let unscoped = NetScope::default();
        let delay = TcFault::Netem {
            scope: &unscoped,
            delay_ms: 100,
            jitter_ms: 0,
            loss_bp: 0,
            duplicate_bp: 0,
            corrupt_bp: 0,
            reorder_bp: 0,
        };
        let no_netem = TcCaps {
            netem: false,
            ..caps()
        };
        let runner = RecordingRunner::new();
        let err = plan(&runner, &delay, &me(), TAG, &no_netem)
            .await
            .unwrap_err();
        assert!(matches!(err, TcError::Unsupported(_)), "{err}");
        assert!(err.to_string().contains("netem"), "{err}");
        assert!(runner.lines().is_empty());

        let invalid = [
            TcFault::Netem {
                scope: &unscoped,
                delay_ms: 0,
                jitter_ms: 0,
                loss_bp: 0,
                duplicate_bp: 0,
                corrupt_bp: 0,
                reorder_bp: 0,
            },
            TcFault::Netem {
                scope: &unscoped,
                delay_ms: 0,
                jitter_ms: 0,
                loss_bp: 0,
                duplicate_bp: 0,
                corrupt_bp: 0,
                reorder_bp: 100,
            },
            TcFault::Netem {
                scope: &unscoped,
                delay_ms: 0,
                jitter_ms: 0,
                loss_bp: 10_001,
                duplicate_bp: 0,
                corrupt_bp: 0,
                reorder_bp: 0,
            },
            TcFault::Bandwidth { rate_bps: 10 },
        ];
        for fault in &invalid {
            let err = plan(&runner, fault, &me(), TAG, &caps()).await.unwrap_err();
            assert!(matches!(err, TcError::Invalid(_)), "{fault:?}: {err}");
        }
        let scoped = scope();
        let err = plan(
            &runner,
            &TcFault::ScopedBandwidth {
                scope: &scoped,
                rate_bps: 1_000_000,
            },
            &me(),
            TAG,
            &TcCaps {
                u32_filter: false,
                ..caps()
            },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("u32"), "{err}");
        assert!(runner.lines().is_empty());

        let refused = [
            // A classful user tree.
            (
                "qdisc htb 1: dev eth0 root refcnt 2 r2q 10 default 0x10 direct_packets_stat 0 direct_qlen 1000\n",
                "Unrestorable",
            ),
            // netem + tbf child, the classic recipe.
            (
                "qdisc netem 1: dev eth0 root refcnt 2 limit 1000 delay 100ms\nqdisc tbf 10: dev eth0 parent 1:1 rate 256Kbit burst 1600b lat 4.2ms\n",
                "Unrestorable",
            ),
            // A default mq whose children someone replaced.
            (
                "qdisc mq 0: dev eth0 root \nqdisc fq 8001: dev eth0 parent :1 limit 10000p flow_limit 100p\n",
                "Unrestorable",
            ),
            // Ours already, and another fault's.
            (
                &*format!(
                    "qdisc tbf {H}: dev eth0 root refcnt 2 rate 1Mbit burst 4Kb lat 400ms\nqdisc bfifo {L}: dev eth0 parent {H}:1 limit 54096b\n"
                ),
                "Conflict",
            ),
            (
                "qdisc tbf 4a3f: dev eth0 root refcnt 2 rate 1Mbit burst 4Kb lat 400ms\nqdisc bfifo 5b21: dev eth0 parent 4a3f:1 limit 54096b\n",
                "Conflict",
            ),
        ];
        for (listing, kind) in refused {
            let runner = RecordingRunner::new();
            runner.answer("ip -j link show", CommandOutput::ok(LINKS));
            runner.answer("tc qdisc show", CommandOutput::ok(listing));
            let err = plan(
                &runner,
                &TcFault::Bandwidth {
                    rate_bps: 1_000_000,
                },
                &me(),
                TAG,
                &caps(),
            )
            .await
            .unwrap_err();
            assert!(format!("{err:?}").starts_with(kind), "{listing}: {err:?}");
            assert_eq!(lines(&runner), ["ip -j link show", "tc qdisc show"]);
        }

        let runner = RecordingRunner::new();
        runner.answer(
            "ip -j link show",
            CommandOutput::ok(
                r#"[{"ifname":"lo","flags":["LOOPBACK","UP"],"link_type":"loopback"}]"#,
            ),
        );
        let err = plan(
            &runner,
            &TcFault::Bandwidth {
                rate_bps: 1_000_000,
            },
            &me(),
            TAG,
            &caps(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, TcError::NoInterfaces(_)), "{err}");
    }

    async fn planned(before: &str) -> TcPlan {
        let runner = RecordingRunner::new();
        runner.answer("ip -j link show", CommandOutput::ok(LINKS));
        runner.answer("tc qdisc show", CommandOutput::ok(before));
        plan(
            &runner,
            &TcFault::Bandwidth {
                rate_bps: 1_000_000,
            },
            &me(),
            TAG,
            &caps(),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_partial_apply_is_rolled_back_before_the_error_is_reported() {
        let plan = planned(SHOW_USER_TBF).await;
        let runner = RecordingRunner::new();
        runner.answer("tc qdisc show", CommandOutput::ok(SHOW_USER_TBF));
        runner.answer(
            "bfifo",
            CommandOutput::failed(2, "Error: Exclusivity flag on, cannot modify."),
        );
        runner.answer(
            "tc qdisc show",
            CommandOutput::ok(&format!(
                "qdisc tbf {H}: dev eth0 root refcnt 2 rate 1Mbit burst 4Kb lat 400ms\n"
            )),
        );
        runner.answer(
            "qdisc show dev eth0",
            CommandOutput::ok("qdisc tbf 1: root refcnt 3 rate 50Mbit burst 64Kb lat 50ms \n"),
        );
        let err = apply(&runner, &plan).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, TcError::ApplyFailed { .. }), "{text}");
        assert!(
            text.contains("Exclusivity")
                && text.contains("rolled back")
                && text.contains("is back"),
            "{text}"
        );
        assert_eq!(
            lines(&runner),
            [
                "tc qdisc show".to_string(),
                format!(
                    "tc qdisc replace dev eth0 root handle {H}: tbf rate 1000000bit burst 4096 latency 400ms"
                ),
                format!("tc qdisc add dev eth0 parent {H}:1 handle {L}: bfifo limit 54096"),
                "tc qdisc show".into(),
                "tc qdisc replace dev eth0 root handle 1: tbf rate 50Mbit burst 64Kb lat 50ms"
                    .into(),
                "tc qdisc show dev eth0".into(),
            ]
        );
    }

    #[tokio::test]
    async fn apply_refuses_when_the_root_changed_since_the_plan() {
        let plan = planned(SHOW_DEFAULT).await;
        let runner = RecordingRunner::new();
        runner.answer("tc qdisc show", CommandOutput::ok(SHOW_USER_TBF));
        let err = apply(&runner, &plan).await.unwrap_err();
        assert!(matches!(err, TcError::Changed { .. }), "{err}");
        assert_eq!(lines(&runner), ["tc qdisc show"]);
    }

    #[tokio::test]
    async fn undo_is_idempotent_and_survives_a_vanished_namespace() {
        let plan = planned(SHOW_USER_TBF).await;
        let runner = RecordingRunner::new();
        runner.answer("tc qdisc show", CommandOutput::ok(SHOW_USER_TBF));
        let note = undo(&runner, &plan.undo).await.unwrap();
        assert!(note.contains("already absent"), "{note}");
        assert_eq!(lines(&runner), ["tc qdisc show"]);

        let mut gone = plan.undo.clone();
        gone.netns = Netns {
            path: "/nonexistent/netns".into(),
            inode: 1,
        };
        let runner = RecordingRunner::new();
        let note = undo(&runner, &gone).await.unwrap();
        assert!(note.starts_with("namespace gone"), "{note}");
        assert!(runner.lines().is_empty());
        assert!(
            sweep(&runner, &gone.netns, &HashSet::new())
                .await
                .unwrap()
                .is_empty()
        );
        assert!(!verify(&runner, &gone).await.unwrap().effective);
    }

    #[tokio::test]
    async fn a_restore_that_fails_still_removes_the_fault() {
        let plan = planned(SHOW_USER_TBF).await;
        let runner = RecordingRunner::new();
        runner.answer(
            "tc qdisc show",
            CommandOutput::ok(&format!(
                "qdisc tbf {H}: dev eth0 root refcnt 2 rate 1Mbit\n"
            )),
        );
        runner.answer(
            "handle 1: tbf",
            CommandOutput::failed(1, "Error: bad burst"),
        );
        let err = undo(&runner, &plan.undo).await.unwrap_err();
        assert!(matches!(err, TcError::RestoreFailed { .. }), "{err}");
        assert_eq!(
            lines(&runner),
            [
                "tc qdisc show",
                "tc qdisc replace dev eth0 root handle 1: tbf rate 50Mbit burst 64Kb lat 50ms",
                "tc qdisc del dev eth0 root",
            ]
        );
    }

    #[tokio::test]
    async fn verify_reports_the_kernels_counters() {
        let plan = planned(SHOW_DEFAULT).await;
        let runner = RecordingRunner::new();
        let stats = format!(
            "qdisc tbf {H}: dev eth0 root refcnt 3 rate 1Mbit burst 4Kb lat 400ms \n Sent 262798 bytes 186 pkt (dropped 3, overlimits 171 requeues 0) \n backlog 0b 0p requeues 0\nqdisc bfifo {L}: dev eth0 parent {H}:1 limit 54096b\n Sent 262798 bytes 186 pkt (dropped 3, overlimits 0 requeues 0) \n backlog 0b 0p requeues 0\n"
        );
        runner.answer("tc -s qdisc show", CommandOutput::ok(&stats));
        let v = verify(&runner, &plan.undo).await.unwrap();
        assert!(v.effective, "{}", v.detail);
        assert!(
            v.detail
                .contains("sent 262798 bytes 186 pkt, dropped 3, overlimits 171"),
            "{}",
            v.detail
        );
        runner.answer("tc -s qdisc show", CommandOutput::ok(SHOW_DEFAULT));
        let v = verify(&runner, &plan.undo).await.unwrap();
        assert!(!v.effective && v.detail.contains("missing"), "{}", v.detail);

        // Scoped: the filters are counted too.
        let scope = scope();
        let runner = RecordingRunner::new();
        runner.answer("ip -j link show", CommandOutput::ok(LINKS));
        runner.answer("tc qdisc show", CommandOutput::ok(SHOW_DEFAULT));
        let plan = super::plan(
            &runner,
            &TcFault::ScopedBandwidth {
                scope: &scope,
                rate_bps: 1_000_000,
            },
            &me(),
            TAG,
            &caps(),
        )
        .await
        .unwrap();
        let runner = RecordingRunner::new();
        runner.answer("tc -s qdisc show", CommandOutput::ok(&format!("qdisc htb {H}: dev eth0 root refcnt 3 r2q 10 default 0 direct_packets_stat 7 direct_qlen 1000\n Sent 1 bytes 1 pkt (dropped 0, overlimits 0 requeues 0) \nqdisc tbf {L}: dev eth0 parent {H}:1 rate 1Mbit burst 4Kb lat 400ms\n Sent 1 bytes 1 pkt (dropped 0, overlimits 0 requeues 0) \n")));
        runner.answer("filter show", CommandOutput::ok(&format!("filter parent {H}: protocol ip pref 1 u32 chain 0 \nfilter parent {H}: protocol ip pref 1 u32 chain 0 fh 800: ht divisor 1 \nfilter parent {H}: protocol ip pref 1 u32 chain 0 fh 800::800 order 2048 key ht 800 bkt 0 *flowid {H}:1 not_in_hw \n  match 0a000000/ff000000 at 16\n")));
        let v = verify(&runner, &plan.undo).await.unwrap();
        assert!(
            !v.effective && v.detail.contains("1 of 2 u32 filters"),
            "{}",
            v.detail
        );
        assert_eq!(
            lines(&runner)[1],
            format!("tc filter show dev eth0 parent {H}:")
        );
    }

    #[tokio::test]
    async fn sweep_removes_only_leftovers_of_ours() {
        let live = crate::net::tag_for("live");
        let dead = crate::net::tag_for("dead");
        let (lr, ll) = handles_for(&live);
        let (dr, dl) = handles_for(&dead);
        let listing = format!(
            "qdisc noqueue 0: dev lo root refcnt 2 \n\
             qdisc tbf {dr:x}: dev eth0 root refcnt 3 rate 1Mbit burst 4Kb lat 400ms \n\
             qdisc bfifo {dl:x}: dev eth0 parent {dr:x}:1 limit 54096b\n\
             qdisc htb {lr:x}: dev eth1 root refcnt 3 r2q 10 default 0 direct_packets_stat 0 direct_qlen 1000\n\
             qdisc netem {ll:x}: dev eth1 parent {lr:x}:1 limit 10000 delay 100ms\n\
             qdisc tbf 1: dev eth2 root refcnt 3 rate 50Mbit burst 64Kb lat 50ms \n\
             qdisc tbf 4001: dev eth3 root refcnt 3 rate 50Mbit burst 64Kb lat 50ms \n\
             qdisc clsact ffff: dev eth3 parent ffff:fff1 \n"
        );
        let runner = RecordingRunner::new();
        runner.answer("tc qdisc show", CommandOutput::ok(&listing));
        let removed = sweep(&runner, &me(), &HashSet::from([live])).await.unwrap();
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert!(
            removed[0].starts_with("eth0: removed leftover"),
            "{removed:?}"
        );
        assert_eq!(
            lines(&runner),
            ["tc qdisc show", "tc qdisc del dev eth0 root"]
        );
    }

    #[tokio::test]
    async fn probe_reads_what_the_kernel_refused() {
        let runner = RecordingRunner::new();
        runner.answer(
            "netem",
            CommandOutput::failed(2, "Error: Specified qdisc kind is unknown.\n"),
        );
        let caps = probe(&runner).await;
        assert!(
            !caps.netem && caps.tbf && caps.htb && caps.clsact && caps.u32_filter,
            "{caps:?}"
        );
        assert!(
            caps.detail
                .contains("netem: no (Error: Specified qdisc kind is unknown.)"),
            "{}",
            caps.detail
        );
        let got = runner.lines();
        let name = got[0].strip_prefix("ip netns add ").unwrap().to_string();
        assert!(name.starts_with("flt-probe-"));
        let tc = |rest: &str| format!("tc -n {name} {rest}");
        assert_eq!(
            got,
            [
                format!("ip netns add {name}"),
                tc("qdisc add dev lo root handle 1: netem delay 1ms"),
                tc("qdisc add dev lo root handle 1: tbf rate 1mbit burst 32kbit latency 400ms"),
                tc("qdisc del dev lo root"),
                tc("qdisc add dev lo clsact"),
                tc("qdisc del dev lo clsact"),
                tc("qdisc add dev lo root handle 1: htb"),
                tc("class add dev lo parent 1: classid 1:1 htb rate 1mbit"),
                tc(
                    "filter add dev lo parent 1: protocol ip prio 1 u32 match ip dport 9 0xffff flowid 1:1"
                ),
                tc("qdisc del dev lo root"),
                format!("ip netns del {name}"),
            ]
        );

        let runner = RecordingRunner::new();
        runner.answer(
            "ip netns add",
            CommandOutput::failed(
                1,
                "mount --make-shared /run/netns failed: Operation not permitted",
            ),
        );
        let caps = probe(&runner).await;
        assert!(!caps.netem && !caps.tbf && !caps.htb && !caps.u32_filter);
        assert!(
            caps.detail.contains("Operation not permitted"),
            "{}",
            caps.detail
        );
        assert_eq!(runner.lines().len(), 1);

        let runner = RecordingRunner::new();
        runner.answer(
            "htb",
            CommandOutput::failed(2, "Error: Specified qdisc kind is unknown."),
        );
        let caps = probe(&runner).await;
        assert!(caps.netem && !caps.htb && !caps.u32_filter, "{caps:?}");
        assert!(
            caps.detail.contains("u32: no (not tried: needs htb)"),
            "{}",
            caps.detail
        );
    }
}
