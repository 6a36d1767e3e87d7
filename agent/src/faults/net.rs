//! Network faults: picks the best mechanism this host has (detected, not assumed) and says
//! which one ran. Latency uses netem when the kernel has it and falls back openly to the
//! NFQUEUE delay daemon when it does not; duplicate/corrupt/reorder need netem.

use std::net::SocketAddr;
use std::time::Duration;

use faultline_domain::fault::FaultKind;
use serde::{Deserialize, Serialize};

use crate::net::delay::{self, DelayDaemon};
use crate::net::firewall::{self, FirewallCaps, FirewallFault, FirewallPlan, FirewallUndo};
use crate::net::tc::{self, TcCaps, TcFault, TcPlan, TcUndo};
use crate::sys::command::{CommandRunner, CommandSpec};
use crate::sys::netns::Netns;

/// What the host offers for network faults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCaps {
    pub firewall: FirewallCaps,
    pub tc: TcCaps,
}

/// How to undo a network fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "layer", rename_all = "kebab-case")]
pub enum NetUndo {
    /// Our firewall table/chains.
    Firewall(FirewallUndo),
    /// The NFQUEUE delay fallback: its rules and daemon, and the tables (e.g. `ip mangle`)
    /// that only exist because iptables-nft created them for those rules.
    Delay {
        rules: FirewallUndo,
        created_tables: Vec<String>,
    },
    /// Our qdiscs, with each interface's previous root qdisc.
    Tc(TcUndo),
}

impl NetUndo {
    pub fn netns(&self) -> &Netns {
        match self {
            Self::Firewall(undo) | Self::Delay { rules: undo, .. } => &undo.netns,
            Self::Tc(undo) => &undo.netns,
        }
    }
}

/// A network fault ready to apply.
#[derive(Debug)]
pub enum NetPrepared {
    Firewall(FirewallPlan),
    /// NFQUEUE rules plus the daemon that holds the packets.
    Delay {
        plan: FirewallPlan,
        delay: Duration,
        jitter: Duration,
        created_tables: Vec<String>,
    },
    Tc(TcPlan),
}

impl NetPrepared {
    pub fn undo(&self) -> NetUndo {
        match self {
            Self::Firewall(plan) => NetUndo::Firewall(plan.undo.clone()),
            Self::Delay {
                plan,
                created_tables,
                ..
            } => NetUndo::Delay {
                rules: plan.undo.clone(),
                created_tables: created_tables.clone(),
            },
            Self::Tc(plan) => NetUndo::Tc(plan.undo.clone()),
        }
    }

    pub fn mechanism(&self) -> String {
        match self {
            Self::Firewall(plan) => plan.mechanism.clone(),
            Self::Delay {
                plan,
                delay,
                jitter,
                ..
            } => format!(
                "NFQUEUE delay daemon {}ms±{}ms (fallback: this kernel has no netem); {}",
                delay.as_millis(),
                jitter.as_millis(),
                plan.mechanism
            ),
            Self::Tc(plan) => plan.mechanism.clone(),
        }
    }
}

/// Which mechanism `kind` would use here, or why it cannot run.
pub fn mechanism_for(kind: &FaultKind, caps: &NetCaps) -> Result<&'static str, String> {
    let firewall = caps.firewall.backend.map(|b| b.name());
    let need_firewall =
        || firewall.ok_or_else(|| format!("no firewall tool works: {}", caps.firewall.detail));
    match kind {
        FaultKind::Partition { .. } => need_firewall(),
        FaultKind::Dns { .. } => need_firewall(),
        FaultKind::Loss { .. } if caps.firewall.statistic => need_firewall(),
        FaultKind::Loss { .. } if caps.tc.netem => Ok("tc netem loss"),
        FaultKind::Loss { .. } => {
            Err("needs random drop (iptables statistic / nft numgen) or netem".into())
        }
        FaultKind::Latency { .. } if caps.tc.netem => Ok("tc netem delay"),
        FaultKind::Latency { .. } if caps.firewall.nfqueue => {
            Ok("NFQUEUE delay daemon (fallback: no netem on this kernel)")
        }
        FaultKind::Latency { .. } => Err("needs netem or NFQUEUE; this host has neither".into()),
        FaultKind::Duplicate { .. } | FaultKind::Corrupt { .. } | FaultKind::Reorder { .. } => {
            if caps.tc.netem {
                Ok("tc netem")
            } else {
                Err("needs the netem qdisc, which this kernel does not have".into())
            }
        }
        FaultKind::Bandwidth { .. } if caps.tc.tbf => Ok("tc tbf"),
        FaultKind::Bandwidth { .. } => Err("needs the tbf qdisc".into()),
        other => Err(format!("{} is not a network fault", other.name())),
    }
}

/// Computes exactly what to do and how to undo it. Changes nothing.
pub async fn prepare<C: CommandRunner>(
    runner: &C,
    caps: &NetCaps,
    kind: &FaultKind,
    netns: &Netns,
    tag: &str,
    protect: &[SocketAddr],
) -> Result<NetPrepared, String> {
    mechanism_for(kind, caps)?;
    let firewall_plan = |fault: FirewallFault<'_>| {
        firewall::plan(&fault, netns, tag, &caps.firewall, protect).map_err(|e| e.to_string())
    };
    let netem = |scope, delay_ms, jitter_ms, loss_bp, duplicate_bp, corrupt_bp, reorder_bp| {
        Choice::Tc(TcFault::Netem {
            scope,
            delay_ms,
            jitter_ms,
            loss_bp,
            duplicate_bp,
            corrupt_bp,
            reorder_bp,
        })
    };
    let choice = match kind {
        FaultKind::Partition { scope, mode } => {
            Choice::Firewall(FirewallFault::Partition { scope, mode: *mode })
        }
        FaultKind::Dns { mode } => Choice::Firewall(FirewallFault::Dns { mode: *mode }),
        FaultKind::Loss {
            scope,
            basis_points,
        } if caps.firewall.statistic => Choice::Firewall(FirewallFault::Loss {
            scope,
            basis_points: *basis_points,
        }),
        FaultKind::Loss {
            scope,
            basis_points,
        } => netem(scope, 0, 0, *basis_points, 0, 0, 0),
        FaultKind::Latency {
            scope,
            delay_ms,
            jitter_ms,
        } if caps.tc.netem => netem(scope, *delay_ms, *jitter_ms, 0, 0, 0, 0),
        FaultKind::Latency {
            scope,
            delay_ms,
            jitter_ms,
        } => Choice::Delay(
            FirewallFault::Delay {
                scope,
                queue: delay::queue_for(tag),
            },
            Duration::from_millis(u64::from(*delay_ms)),
            Duration::from_millis(u64::from(*jitter_ms)),
        ),
        FaultKind::Duplicate {
            scope,
            basis_points,
        } => netem(scope, 0, 0, 0, *basis_points, 0, 0),
        FaultKind::Corrupt {
            scope,
            basis_points,
        } => netem(scope, 0, 0, 0, 0, *basis_points, 0),
        FaultKind::Reorder {
            scope,
            basis_points,
            delay_ms,
        } => netem(scope, *delay_ms, 0, 0, 0, 0, *basis_points),
        FaultKind::Bandwidth { rate_bps } => Choice::Tc(TcFault::Bandwidth {
            rate_bps: *rate_bps,
        }),
        other => return Err(format!("{} is not a network fault", other.name())),
    };
    if netns.is_agents_own() && matches!(choice, Choice::Tc(_)) {
        // Firewall rules exempt the coordinator connection; a qdisc on the host's interfaces
        // would shape or delay it too, and a slow control path delays halts and reverts.
        return Err(format!(
            "{} would shape the agent's own network namespace, including its connection to \
             the coordinator; target a container or process with its own namespace",
            kind.name()
        ));
    }
    Ok(match choice {
        Choice::Firewall(fault) => NetPrepared::Firewall(firewall_plan(fault)?),
        Choice::Delay(fault, delay, jitter) => {
            let plan = firewall_plan(fault)?;
            let created_tables = missing_tables(runner, netns, &["ip mangle", "ip6 mangle"]).await;
            NetPrepared::Delay {
                plan,
                delay,
                jitter,
                created_tables,
            }
        }
        Choice::Tc(fault) => NetPrepared::Tc(
            tc::plan(runner, &fault, netns, tag, &caps.tc)
                .await
                .map_err(|e| e.to_string())?,
        ),
    })
}

/// Which layer a network fault is expressed in.
enum Choice<'a> {
    Firewall(FirewallFault<'a>),
    Delay(FirewallFault<'a>, Duration, Duration),
    Tc(TcFault<'a>),
}

/// Applies a prepared network fault (the undo is already journaled).
pub async fn apply<C: CommandRunner>(runner: &C, prepared: &NetPrepared) -> Result<(), String> {
    match prepared {
        NetPrepared::Firewall(plan) => firewall::apply(runner, plan)
            .await
            .map_err(|e| e.to_string()),
        NetPrepared::Delay {
            plan,
            delay,
            jitter,
            ..
        } => {
            let queue = plan.undo.queue.ok_or("delay plan without a queue")?;
            // The daemon binds the queue before any packet is steered to it; the rules use
            // queue-bypass, so traffic flows undelayed if the daemon (or the agent) dies.
            let daemon = DelayDaemon::start(&plan.undo.netns, queue, *delay, *jitter)
                .map_err(|e| e.to_string())?;
            delay::registry().insert(plan.undo.tag.clone(), daemon);
            if let Err(err) = firewall::apply(runner, plan).await {
                delay::registry().remove(&plan.undo.tag);
                return Err(err.to_string());
            }
            Ok(())
        }
        NetPrepared::Tc(plan) => tc::apply(runner, plan).await.map_err(|e| e.to_string()),
    }
}

/// Reads the fault back: rules with counters, qdiscs with statistics, the daemon's queue.
pub async fn verify<C: CommandRunner>(
    runner: &C,
    undo: &NetUndo,
) -> Result<(bool, String), String> {
    match undo {
        NetUndo::Firewall(undo) | NetUndo::Delay { rules: undo, .. } => {
            let verification = firewall::verify(runner, undo)
                .await
                .map_err(|e| e.to_string())?;
            let mut detail = verification.detail;
            let mut effective = verification.effective;
            if undo.queue.is_some() {
                if delay::registry().contains(&undo.tag) {
                    detail.push_str("; delay daemon bound to its queue");
                } else {
                    effective = false;
                    detail.push_str("; delay daemon NOT running");
                }
            }
            Ok((effective, detail))
        }
        NetUndo::Tc(undo) => {
            let verification = tc::verify(runner, undo).await.map_err(|e| e.to_string())?;
            Ok((verification.effective, verification.detail))
        }
    }
}

/// Removes the fault. Idempotent; a vanished namespace has nothing left to undo.
pub async fn undo<C: CommandRunner>(runner: &C, undo: &NetUndo) -> Result<String, String> {
    match undo {
        NetUndo::Firewall(undo) => firewall::undo(runner, undo)
            .await
            .map_err(|e| e.to_string()),
        NetUndo::Delay {
            rules,
            created_tables,
        } => {
            // The firewall undo stops the daemon too; make sure even if that changes.
            delay::registry().remove(&rules.tag);
            let mut done = firewall::undo(runner, rules)
                .await
                .map_err(|e| e.to_string())?;
            for table in drop_empty_tables(runner, &rules.netns, created_tables).await? {
                done.push_str(&format!(
                    "; removed the empty {table} table our rules had created"
                ));
            }
            Ok(done)
        }
        NetUndo::Tc(undo) => tc::undo(runner, undo).await.map_err(|e| e.to_string()),
    }
}

/// Which of `tables` (nft names like `ip mangle`) do not exist in `netns` now. Read only; a
/// host without `nft` reports none (legacy tables are built into the kernel).
async fn missing_tables<C: CommandRunner>(
    runner: &C,
    netns: &Netns,
    tables: &[&str],
) -> Vec<String> {
    let listed = CommandSpec::new("nft", ["list", "tables"]).in_netns(netns);
    match runner.run(&listed).await {
        Ok(out) if out.success() => tables
            .iter()
            .filter(|t| {
                !out.stdout
                    .lines()
                    .any(|line| line.trim() == format!("table {t}"))
            })
            .map(|t| t.to_string())
            .collect(),
        _ => Vec::new(),
    }
}

/// Deletes those of `tables` that hold no rule (only base chains with their policies), and
/// returns which. A table someone filled meanwhile is left alone.
async fn drop_empty_tables<C: CommandRunner>(
    runner: &C,
    netns: &Netns,
    tables: &[String],
) -> Result<Vec<String>, String> {
    let mut dropped = Vec::new();
    if !netns.still_exists() {
        return Ok(dropped);
    }
    for table in tables {
        let mut words: Vec<String> = vec!["list".into(), "table".into()];
        words.extend(table.split_whitespace().map(str::to_string));
        let listed = CommandSpec::new("nft", words).in_netns(netns);
        let Ok(out) = runner.run(&listed).await else {
            continue;
        };
        if !out.success() || !holds_no_rules(&out.stdout) {
            continue;
        }
        let mut words: Vec<String> = vec!["delete".into(), "table".into()];
        words.extend(table.split_whitespace().map(str::to_string));
        let delete = CommandSpec::new("nft", words).in_netns(netns);
        runner
            .run_checked(&delete)
            .await
            .map_err(|e| e.to_string())?;
        dropped.push(table.clone());
    }
    Ok(dropped)
}

/// True when an `nft list table` listing has chains but no rules in them.
fn holds_no_rules(listing: &str) -> bool {
    listing.lines().map(str::trim).all(|line| {
        line.is_empty()
            || line == "}"
            || line.starts_with("table ")
            || line.starts_with("chain ")
            || line.starts_with("type ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::firewall::FirewallBackend;

    fn caps(netem: bool, nfqueue: bool) -> NetCaps {
        NetCaps {
            firewall: FirewallCaps {
                backend: Some(FirewallBackend::Nft),
                statistic: true,
                nfqueue,
                reject_tcp_reset: true,
                detail: String::new(),
            },
            tc: TcCaps {
                netem,
                tbf: true,
                htb: true,
                clsact: true,
                u32_filter: true,
                detail: String::new(),
            },
        }
    }

    use faultline_domain::fault::NetScope;

    #[test]
    fn only_tables_without_rules_count_as_empty() {
        let empty = "table ip mangle {\n\tchain OUTPUT {\n\t\ttype route hook output priority mangle; policy accept;\n\t}\n}\n";
        assert!(holds_no_rules(empty));
        let used = "table ip mangle {\n\tchain OUTPUT {\n\t\ttype route hook output priority mangle; policy accept;\n\t\tmeta mark set 0x1\n\t}\n}\n";
        assert!(!holds_no_rules(used));
    }

    #[test]
    fn latency_uses_netem_when_present_and_falls_back_openly() {
        let latency = FaultKind::Latency {
            scope: NetScope::default(),
            delay_ms: 100,
            jitter_ms: 0,
        };
        assert_eq!(
            mechanism_for(&latency, &caps(true, true)),
            Ok("tc netem delay")
        );
        assert!(
            mechanism_for(&latency, &caps(false, true))
                .unwrap()
                .contains("fallback")
        );
        assert!(mechanism_for(&latency, &caps(false, false)).is_err());
        let dup = FaultKind::Duplicate {
            scope: NetScope::default(),
            basis_points: 100,
        };
        assert!(
            mechanism_for(&dup, &caps(false, true))
                .unwrap_err()
                .contains("netem")
        );
        assert_eq!(mechanism_for(&dup, &caps(true, true)), Ok("tc netem"));
        let loss = FaultKind::Loss {
            scope: NetScope::default(),
            basis_points: 3000,
        };
        assert_eq!(mechanism_for(&loss, &caps(false, false)), Ok("nft"));
    }
}
