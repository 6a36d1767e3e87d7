//! Fault dispatch: turns a fault spec into resolved kernel identities, an undo record, a
//! mutation and a verification, by the mechanism this host supports. The order is the safety
//! contract: resolve -> prepare (computes the undo, changes nothing) -> JOURNAL -> apply ->
//! verify; on any failure after the journal write, the undo runs and the entry is removed.

pub mod container;
pub mod net;
pub mod process;
pub mod resource;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use faultline_domain::fault::{FaultFamily, FaultKind, FaultSpec, TargetSelector};
use serde::{Deserialize, Serialize};

use crate::cgroup::{CgroupRef, CgroupUndo};
use crate::clock::now_ms;
use crate::journal::{Journal, JournalEntry};
use crate::preflight::HostCaps;
use crate::process::{ProcessId, ProcessUndo};
use crate::runtime::{ContainerRef, ContainerRuntime};
use crate::stress::StressorUndo;
use crate::sys::command::CommandRunner;
use crate::sys::netns::Netns;

use self::container::ContainerUndo;
use self::net::NetUndo;
use self::process::ProcessScope;

/// Everything a fault mechanism may use on this host.
#[derive(Debug)]
pub struct Backends<R, C> {
    pub runtime: Arc<R>,
    pub commands: Arc<C>,
    /// What the host can do, probed at start-up.
    pub caps: Arc<HostCaps>,
    /// This agent's name: tags of what it creates carry it, so its sweep never touches
    /// another agent's faults on a shared kernel.
    pub agent: String,
    /// Addresses faults must never cut: the agent's own coordinator connection.
    pub protect: Vec<SocketAddr>,
    /// This agent's executable, re-executed for stressors.
    pub agent_exe: PathBuf,
}

impl<R, C> Clone for Backends<R, C> {
    fn clone(&self) -> Self {
        Self {
            runtime: Arc::clone(&self.runtime),
            commands: Arc::clone(&self.commands),
            caps: Arc::clone(&self.caps),
            agent: self.agent.clone(),
            protect: self.protect.clone(),
            agent_exe: self.agent_exe.clone(),
        }
    }
}

/// The stable identities a fault acts on, resolved at apply time and journaled. Reverts act on
/// these, never on the selector again: a new container with the same name is not ours.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub container: Option<ContainerRef>,
    /// The target's (main) process, with its start time.
    pub process: Option<ProcessId>,
    pub netns: Option<Netns>,
    pub cgroup: Option<CgroupRef>,
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(container) = &self.container {
            parts.push(container.to_string());
        }
        if let Some(process) = &self.process {
            parts.push(format!("process {process}"));
        }
        if let Some(netns) = &self.netns {
            parts.push(format!("netns {}", netns.inode));
        }
        if let Some(cgroup) = &self.cgroup {
            parts.push(format!("cgroup {}", cgroup.describe()));
        }
        if parts.is_empty() {
            f.write_str("nothing")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// How to undo one applied fault, journaled before the fault is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "kebab-case")]
pub enum Undo {
    Container(ContainerUndo),
    Net(NetUndo),
    Cgroup(CgroupUndo),
    Stressor(StressorUndo),
    Process(ProcessUndo),
}

/// Identifiers of the command that asked for a fault.
#[derive(Debug, Clone, Copy)]
pub struct FaultIds<'a> {
    pub fault_id: &'a str,
    pub command_id: &'a str,
    pub run_id: &'a str,
}

/// A fault in force, with what the agent observed when applying it.
#[derive(Debug, Clone)]
pub struct Applied {
    pub entry: JournalEntry,
    /// Verification result, mechanism included.
    pub detail: String,
}

/// The tag naming everything this agent creates for `fault_id`: `flt` + 4 hex digits of the
/// agent + 6 of the fault. 13 characters fit iptables chain names with a suffix.
pub fn fault_tag(agent: &str, fault_id: &str) -> String {
    // The low digits: FNV-1a mixes a name's last bytes into the low bits first.
    format!("flt{}{}", &hash_hex(agent)[12..], &hash_hex(fault_id)[10..])
}

/// True when `tag` was made by `agent` (see [`fault_tag`]).
pub fn tag_owned_by(tag: &str, agent: &str) -> bool {
    tag.len() == 13 && tag.get(3..7) == Some(&hash_hex(agent)[12..])
}

fn hash_hex(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn layout<R, C>(backends: &Backends<R, C>) -> Result<&crate::cgroup::CgroupLayout, String> {
    backends
        .caps
        .cgroups
        .as_ref()
        .map_err(|why| format!("cgroups not usable here: {why}"))
}

async fn resolve<R: ContainerRuntime, C: CommandRunner>(
    backends: &Backends<R, C>,
    spec: &FaultSpec,
) -> Result<Resolved, String> {
    let family = spec.kind.family();
    if family == FaultFamily::Container && !spec.target.is_container() {
        return Err(format!(
            "{} needs a container target, not {}",
            spec.kind.name(),
            spec.target
        ));
    }
    let mut resolved = Resolved::default();
    let pid = match &spec.target {
        target if target.is_container() => {
            let container = backends
                .runtime
                .resolve(target)
                .await
                .map_err(|e| e.to_string())?;
            let pid = if family == FaultFamily::Container {
                None
            } else {
                Some(
                    backends
                        .runtime
                        .main_pid(&container.id)
                        .await
                        .map_err(|e| e.to_string())?,
                )
            };
            resolved.container = Some(container);
            pid
        }
        TargetSelector::Pid(_) | TargetSelector::ProcessName(_) => {
            let process = crate::process::resolve_host(&spec.target).map_err(|e| e.to_string())?;
            Some(process.pid)
        }
        TargetSelector::Cgroup(path) => {
            if matches!(family, FaultFamily::Network | FaultFamily::Process) {
                return Err(format!(
                    "{} needs a container or process target",
                    spec.kind.name()
                ));
            }
            let cgroup =
                CgroupRef::from_path(layout(backends)?, path).map_err(|e| e.to_string())?;
            let first = cgroup.procs().ok().and_then(|procs| procs.first().copied());
            resolved.cgroup = Some(cgroup);
            first
        }
        other => return Err(format!("cannot resolve {other}")),
    };
    if let Some(pid) = pid {
        resolved.process = Some(ProcessId::of(pid).map_err(|e| e.to_string())?);
        match family {
            FaultFamily::Network => {
                resolved.netns = Some(Netns::of_pid(pid).map_err(|e| e.to_string())?);
            }
            FaultFamily::Resource | FaultFamily::Stressor if resolved.cgroup.is_none() => {
                let cgroup =
                    CgroupRef::of_pid(layout(backends)?, pid).map_err(|e| e.to_string())?;
                resolved.cgroup = Some(cgroup);
            }
            _ => {}
        }
    }
    Ok(resolved)
}

/// A fault computed but not yet applied.
enum Prepared {
    Container,
    Net(net::NetPrepared),
    Cgroup(crate::cgroup::CgroupPlan),
    Stressor(crate::stress::StressPlan),
    ProcessStop,
    KillStorm(ProcessScope),
}

fn process_scope(spec: &FaultSpec, resolved: &Resolved, name: Option<&String>) -> ProcessScope {
    match &resolved.container {
        Some(container) => ProcessScope::Container {
            container: container.clone(),
            name: name.cloned(),
        },
        None => ProcessScope::Host {
            selector: spec.target.clone(),
        },
    }
}

async fn prepare<R: ContainerRuntime, C: CommandRunner>(
    backends: &Backends<R, C>,
    spec: &FaultSpec,
    resolved: &Resolved,
    tag: &str,
) -> Result<(Prepared, Undo, String), String> {
    backends.caps.support(&spec.kind)?;
    let missing = |what: &str| format!("{}: no {what} resolved", spec.kind.name());
    match spec.kind.family() {
        FaultFamily::Container => {
            let container = resolved
                .container
                .as_ref()
                .ok_or_else(|| missing("container"))?;
            container::precheck(&*backends.runtime, container).await?;
            let (undo, mechanism) =
                container::prepare(&*backends.runtime, &spec.kind, container).await?;
            Ok((Prepared::Container, Undo::Container(undo), mechanism))
        }
        FaultFamily::Network => {
            let netns = resolved
                .netns
                .as_ref()
                .ok_or_else(|| missing("network namespace"))?;
            let prepared = net::prepare(
                &*backends.commands,
                &backends.caps.net,
                &spec.kind,
                netns,
                tag,
                &backends.protect,
            )
            .await?;
            let (undo, mechanism) = (prepared.undo(), prepared.mechanism());
            Ok((Prepared::Net(prepared), Undo::Net(undo), mechanism))
        }
        FaultFamily::Resource => {
            let cgroup = resolved.cgroup.as_ref().ok_or_else(|| missing("cgroup"))?;
            let plan = resource::prepare_limits(layout(backends)?, cgroup, &spec.kind)?;
            let (undo, mechanism) = (plan.undo.clone(), plan.mechanism.clone());
            Ok((Prepared::Cgroup(plan), Undo::Cgroup(undo), mechanism))
        }
        FaultFamily::Stressor => {
            let cgroup = resolved.cgroup.as_ref().ok_or_else(|| missing("cgroup"))?;
            let pid = resolved
                .process
                .as_ref()
                .ok_or_else(|| missing("process"))?
                .pid;
            let plan =
                resource::prepare_stressor(&spec.kind, cgroup, pid, tag, &backends.agent_exe)?;
            let (undo, mechanism) = (plan.undo.clone(), plan.mechanism.clone());
            Ok((Prepared::Stressor(plan), Undo::Stressor(undo), mechanism))
        }
        FaultFamily::Process => match &spec.kind {
            FaultKind::ProcessStop { name } => {
                let scope = process_scope(spec, resolved, name.as_ref());
                let targets = process::find(&*backends.runtime, &scope).await?;
                let listed: Vec<String> = targets.iter().map(ToString::to_string).collect();
                let undo = ProcessUndo {
                    tag: tag.to_string(),
                    stopped: targets,
                };
                let mechanism = format!("SIGSTOP to {}", listed.join(", "));
                Ok((Prepared::ProcessStop, Undo::Process(undo), mechanism))
            }
            FaultKind::ProcessKill {
                signal,
                name,
                count,
                interval_ms,
            } => {
                let scope = process_scope(spec, resolved, name.as_ref());
                let undo = ProcessUndo {
                    tag: tag.to_string(),
                    stopped: Vec::new(),
                };
                let mechanism = format!("{signal} x{count} every {interval_ms} ms (kill storm)");
                Ok((Prepared::KillStorm(scope), Undo::Process(undo), mechanism))
            }
            other => Err(format!("{} is not a process fault", other.name())),
        },
    }
}

/// Applies a prepared fault. Returns the verification when applying already established it.
async fn apply<R: ContainerRuntime, C: CommandRunner>(
    backends: &Backends<R, C>,
    journal: &Journal,
    entry: &mut JournalEntry,
    prepared: Prepared,
    tag: &str,
) -> Result<Option<String>, String> {
    match prepared {
        Prepared::Container => {
            let container = entry.resolved.container.as_ref().ok_or("no container")?;
            container::apply(&*backends.runtime, &entry.spec.kind, container).await?;
            Ok(None)
        }
        Prepared::Net(prepared) => {
            net::apply(&*backends.commands, &prepared).await?;
            Ok(None)
        }
        Prepared::Cgroup(plan) => {
            resource::apply_limits(&plan)?;
            Ok(None)
        }
        Prepared::Stressor(mut plan) => {
            let started = resource::apply_stressor(&mut plan).await;
            // Record the processes started (with their start times) even if starting failed
            // half-way, so the undo finds exactly them.
            entry.undo = Undo::Stressor(plan.undo.clone());
            journal.record(entry).map_err(|e| e.to_string())?;
            started.map(|()| None)
        }
        Prepared::ProcessStop => match &entry.undo {
            Undo::Process(undo) => process::stop(undo).map(Some),
            _ => Err("process-stop without a process undo".into()),
        },
        Prepared::KillStorm(scope) => {
            let runtime = Arc::clone(&backends.runtime);
            process::start_storm(runtime, &entry.spec.kind, scope, tag)
                .await
                .map(Some)
        }
    }
}

/// Reads the fault back: did it take effect?
async fn verify<R: ContainerRuntime, C: CommandRunner>(
    backends: &Backends<R, C>,
    entry: &JournalEntry,
) -> Result<String, String> {
    let (effective, detail) = match &entry.undo {
        Undo::Container(_) => {
            let container = entry.resolved.container.as_ref().ok_or("no container")?;
            return container::verify(&*backends.runtime, &entry.spec.kind, container).await;
        }
        Undo::Net(undo) => net::verify(&*backends.commands, undo).await?,
        Undo::Cgroup(undo) => resource::verify_limits(undo, &entry.spec.kind).await?,
        Undo::Stressor(undo) => {
            let cgroup = entry.resolved.cgroup.as_ref().ok_or("no cgroup")?;
            resource::verify_stressor(undo, cgroup).await?
        }
        Undo::Process(_) => return Ok("in force".into()),
    };
    if effective {
        Ok(format!("verified: {detail}"))
    } else {
        Err(detail)
    }
}

/// Resolves, prepares, journals, applies and verifies one fault. On failure nothing stays
/// applied and nothing stays journaled; the error says so.
pub async fn apply_fault<R: ContainerRuntime, C: CommandRunner>(
    backends: &Backends<R, C>,
    journal: &Journal,
    ids: FaultIds<'_>,
    spec: &FaultSpec,
) -> Result<Applied, String> {
    let nothing = |e: String| format!("{e}; nothing applied");
    let tag = fault_tag(&backends.agent, ids.fault_id);
    let resolved = resolve(backends, spec).await.map_err(nothing)?;
    let (prepared, undo, mechanism) = prepare(backends, spec, &resolved, &tag)
        .await
        .map_err(nothing)?;
    let mut entry = JournalEntry {
        fault_id: ids.fault_id.to_string(),
        command_id: ids.command_id.to_string(),
        run_id: ids.run_id.to_string(),
        spec: spec.clone(),
        resolved,
        undo,
        mechanism,
        journaled_at_ms: now_ms(),
    };
    // Journal before mutating: a crash after this line is reverted on the next start.
    journal.record(&entry).map_err(|e| nothing(e.to_string()))?;

    let outcome = match apply(backends, journal, &mut entry, prepared, &tag).await {
        Ok(Some(verified)) => Ok(verified),
        Ok(None) => verify(backends, &entry)
            .await
            .map_err(|d| format!("fault did not take effect: {d}")),
        Err(err) => Err(err),
    };
    match outcome {
        Ok(detail) => Ok(Applied {
            detail: format!("{detail} [{}]", entry.mechanism),
            entry,
        }),
        Err(err) => Err(match revert_fault(backends, journal, &entry).await {
            Ok(_) => format!("{err}; state restored"),
            Err(undo) => format!("{err}; restoring also failed: {undo}"),
        }),
    }
}

/// What a fault would do on this host, computed by the same resolve and prepare steps as
/// [`apply_fault`] — nothing journaled, nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRun {
    /// The identities the fault would act on, as [`Resolved`] prints them.
    pub resolved: String,
    /// The mechanism this host would use.
    pub mechanism: String,
    /// The exact actions, in order: command lines, cgroup file writes, Docker API calls,
    /// signals, processes started.
    pub actions: Vec<String>,
}

/// Resolves and prepares `spec` as [`apply_fault`] would, and reports the exact actions; changes
/// nothing (target resolution only reads: Docker inspect, `/proc`, the cgroup tree).
pub async fn dry_run_fault<R: ContainerRuntime, C: CommandRunner>(
    backends: &Backends<R, C>,
    fault_id: &str,
    spec: &FaultSpec,
) -> Result<DryRun, String> {
    let tag = fault_tag(&backends.agent, fault_id);
    let resolved = resolve(backends, spec).await?;
    let (prepared, undo, mechanism) = prepare(backends, spec, &resolved, &tag).await?;
    Ok(DryRun {
        actions: describe_actions(&spec.kind, &prepared, &undo, &resolved),
        resolved: resolved.to_string(),
        mechanism,
    })
}

/// The actions of a prepared fault, for a person reading a dry run.
fn describe_actions(
    kind: &FaultKind,
    prepared: &Prepared,
    undo: &Undo,
    resolved: &Resolved,
) -> Vec<String> {
    let container = resolved
        .container
        .as_ref()
        .map_or_else(|| "?".to_string(), |c| c.name.clone());
    match prepared {
        Prepared::Container => vec![match kind {
            FaultKind::ContainerPause => format!("docker pause {container}"),
            FaultKind::ContainerStop { grace_seconds } => {
                format!("docker stop --time {grace_seconds} {container}")
            }
            FaultKind::ContainerKill { signal, .. } => {
                format!("docker kill --signal {signal} {container}")
            }
            FaultKind::ContainerRestart { grace_seconds } => {
                format!("docker restart --time {grace_seconds} {container}")
            }
            FaultKind::ContainerLimit {
                millicpus,
                memory_bytes,
            } => {
                let mut line = String::from("docker update");
                if let Some(millicpus) = millicpus {
                    line.push_str(&format!(" --cpus {}", *millicpus as f64 / 1000.0));
                }
                if let Some(bytes) = memory_bytes {
                    line.push_str(&format!(" --memory {bytes}"));
                }
                format!("{line} {container}")
            }
            FaultKind::NetworkDisconnect { network } => {
                format!("docker network disconnect {network} {container}")
            }
            other => format!("{} on {container}", other.name()),
        }],
        Prepared::Net(net::NetPrepared::Firewall(plan)) => {
            plan.apply.iter().map(command_with_input).collect()
        }
        Prepared::Net(net::NetPrepared::Delay {
            plan,
            delay,
            jitter,
            ..
        }) => {
            let mut actions: Vec<String> = plan.apply.iter().map(command_with_input).collect();
            actions.push(format!(
                "start the NFQUEUE delay daemon holding packets {} ms ± {} ms",
                delay.as_millis(),
                jitter.as_millis()
            ));
            actions
        }
        Prepared::Net(net::NetPrepared::Tc(plan)) => {
            plan.apply.iter().map(command_with_input).collect()
        }
        Prepared::Cgroup(plan) => plan
            .writes
            .iter()
            .map(|(path, value)| format!("write {value:?} to {}", path.display()))
            .collect(),
        Prepared::Stressor(plan) => vec![match &plan.action {
            crate::stress::StressAction::Spawn { program, args } => format!(
                "start {} {} (its own process, moved into the target's cgroup)",
                program.display(),
                args.join(" ")
            ),
            crate::stress::StressAction::Fill { file, amount } => {
                format!("create {} and fill it to {amount:?}", file.display())
            }
        }],
        Prepared::ProcessStop => match undo {
            Undo::Process(undo) => undo
                .stopped
                .iter()
                .map(|process| format!("kill -STOP {process}"))
                .collect(),
            _ => Vec::new(),
        },
        Prepared::KillStorm(scope) => vec![match kind {
            FaultKind::ProcessKill {
                signal,
                count,
                interval_ms,
                ..
            } => format!(
                "send {signal} {count} time(s), every {interval_ms} ms, to {}",
                describe_scope(scope)
            ),
            other => format!("{} on {}", other.name(), describe_scope(scope)),
        }],
    }
}

/// A command line, followed by what it reads on stdin (an `nft -f -` script) as a here-doc.
fn command_with_input(command: &crate::sys::command::CommandSpec) -> String {
    match &command.stdin {
        Some(input) => format!("{} <<'EOF'\n{}\nEOF", command.display(), input.trim_end()),
        None => command.display(),
    }
}

fn describe_scope(scope: &ProcessScope) -> String {
    match scope {
        ProcessScope::Container { container, name } => match name {
            Some(name) => format!("processes named {name} in {container}"),
            None => format!("the main process of {container}"),
        },
        ProcessScope::Host { selector } => format!("the host process {selector}"),
    }
}

/// Undoes a journaled fault, then forgets it. Safe to repeat, and works from the journal
/// entry alone (after a restart).
pub async fn revert_fault<R: ContainerRuntime, C: CommandRunner>(
    backends: &Backends<R, C>,
    journal: &Journal,
    entry: &JournalEntry,
) -> Result<String, String> {
    let detail = match &entry.undo {
        Undo::Container(undo) => container::undo(&*backends.runtime, undo).await?,
        Undo::Net(undo) => net::undo(&*backends.commands, undo).await?,
        Undo::Cgroup(undo) => resource::undo_limits(undo)?,
        Undo::Stressor(undo) => resource::undo_stressor(undo).await?,
        Undo::Process(undo) => process::undo(undo)?,
    };
    journal
        .remove(&entry.fault_id)
        .map_err(|e| format!("{detail}, but {e}"))?;
    Ok(format!("{detail} ({})", entry.resolved))
}

/// Removes what this agent tagged and no journal entry covers (`live` are the tags of journaled
/// faults): firewall tables/chains and qdiscs in every namespace, stressor processes. Only this
/// agent's own tags are touched, so agents sharing a kernel never remove each other's faults.
pub async fn sweep_leftovers<R: ContainerRuntime, C: CommandRunner>(
    backends: Backends<R, C>,
    live: std::collections::HashSet<String>,
) {
    let agent = backends.agent.clone();
    let is_leftover = |tag: &str| tag_owned_by(tag, &agent) && !live.contains(tag);
    let mut removed = Vec::new();
    match crate::stress::sweep_where(&is_leftover).await {
        Ok(done) => removed.extend(done),
        Err(err) => tracing::error!(%err, "stressor sweep failed"),
    }
    let owner = fault_tag(&agent, "");
    for netns in crate::sys::netns::all() {
        let runner = &*backends.commands;
        match crate::net::firewall::sweep_where(runner, &netns, &is_leftover).await {
            Ok(done) => removed.extend(done),
            Err(err) => tracing::warn!(%err, netns = netns.inode, "firewall sweep failed"),
        }
        match crate::net::tc::sweep_owned(runner, &netns, &live, Some(&owner)).await {
            Ok(done) => removed.extend(done),
            Err(err) => tracing::warn!(%err, netns = netns.inode, "tc sweep failed"),
        }
    }
    for what in &removed {
        tracing::warn!("start-up sweep removed a leftover with no journal entry: {what}");
    }
    tracing::info!(removed = removed.len(), "start-up sweep done");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_carry_their_agent() {
        let tag = fault_tag("agent-1", "run/stage/0");
        assert_eq!(tag.len(), 13);
        assert!(tag.starts_with("flt") && tag.chars().all(|c| c.is_ascii_alphanumeric()));
        assert!(tag_owned_by(&tag, "agent-1"));
        assert!(!tag_owned_by(&tag, "agent-2"));
        assert_ne!(tag, fault_tag("agent-1", "run/stage/1"));
        assert_ne!(tag, fault_tag("agent-2", "run/stage/0"));
    }
}
