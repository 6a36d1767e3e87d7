//! Fallback statistics from `/proc` and cgroup files, for hosts (or groups) where the programs
//! cannot load: no BTF, no privileges, a verifier refusal. Coarser than the programs — host-
//! or namespace-wide TCP counters, cgroup-wide throttling and OOM-kill counts — and always
//! labelled as fallback where they are reported.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cgroup::{CgroupMounts, Hierarchy, HierarchyKind, V1Controller};
use crate::error::BpfError;

/// The `Tcp:` counters of `/proc/net/snmp` (cumulative, for one network namespace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSnmp {
    /// Connections opened by this host (SYN_SENT).
    pub active_opens: u64,
    /// Connections accepted.
    pub passive_opens: u64,
    /// Connection attempts that failed (SYN_SENT/SYN_RECV to CLOSED, or SYN_RECV to LISTEN).
    pub attempt_fails: u64,
    /// Resets of established connections.
    pub estab_resets: u64,
    /// Connections currently established.
    pub curr_estab: u64,
    /// Segments retransmitted.
    pub retrans_segs: u64,
    /// Resets sent.
    pub out_rsts: u64,
    /// Segments received in error.
    pub in_errs: u64,
}

impl TcpSnmp {
    /// Reads `/proc/net/snmp` (this process's network namespace).
    pub fn read() -> Result<Self, BpfError> {
        Self::read_from(Path::new("/proc/net/snmp"))
    }

    /// Reads the counters of the network namespace process `pid` is in.
    pub fn read_for_pid(pid: u32) -> Result<Self, BpfError> {
        Self::read_from(&PathBuf::from(format!("/proc/{pid}/net/snmp")))
    }

    /// Reads an snmp file.
    pub fn read_from(path: &Path) -> Result<Self, BpfError> {
        let text = fs::read_to_string(path).map_err(|e| BpfError::io("snmp counters", path, e))?;
        Self::parse(&text)
    }

    /// Parses the text of an snmp file (a `Tcp:` header line, then a `Tcp:` value line).
    pub fn parse(text: &str) -> Result<Self, BpfError> {
        let mut lines = text.lines().filter(|l| l.starts_with("Tcp:"));
        let malformed = |detail: &str| BpfError::Malformed {
            what: "/proc/net/snmp",
            detail: detail.to_owned(),
        };
        let names = lines
            .next()
            .ok_or_else(|| malformed("no Tcp: header line"))?;
        let values = lines
            .next()
            .ok_or_else(|| malformed("no Tcp: value line"))?;
        let mut s = TcpSnmp::default();
        for (name, value) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            // CurrEstab is a gauge; MaxConn is -1: parse as signed, clamp at 0.
            let v = value
                .parse::<i64>()
                .map_err(|_| malformed(&format!("{name}={value}")))?
                .max(0) as u64;
            match name {
                "ActiveOpens" => s.active_opens = v,
                "PassiveOpens" => s.passive_opens = v,
                "AttemptFails" => s.attempt_fails = v,
                "EstabResets" => s.estab_resets = v,
                "CurrEstab" => s.curr_estab = v,
                "RetransSegs" => s.retrans_segs = v,
                "OutRsts" => s.out_rsts = v,
                "InErrs" => s.in_errs = v,
                _ => {}
            }
        }
        Ok(s)
    }

    /// The change since an older reading.
    pub fn since(&self, earlier: &Self) -> Self {
        TcpSnmp {
            active_opens: self.active_opens.saturating_sub(earlier.active_opens),
            passive_opens: self.passive_opens.saturating_sub(earlier.passive_opens),
            attempt_fails: self.attempt_fails.saturating_sub(earlier.attempt_fails),
            estab_resets: self.estab_resets.saturating_sub(earlier.estab_resets),
            curr_estab: self.curr_estab,
            retrans_segs: self.retrans_segs.saturating_sub(earlier.retrans_segs),
            out_rsts: self.out_rsts.saturating_sub(earlier.out_rsts),
            in_errs: self.in_errs.saturating_sub(earlier.in_errs),
        }
    }
}

/// CFS bandwidth figures from a cgroup's `cpu.stat` (v1 and v2 spell them differently).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStat {
    /// Enforcement periods that have elapsed.
    pub nr_periods: u64,
    /// Periods in which the cgroup was throttled.
    pub nr_throttled: u64,
    /// Total time throttled (v1 `throttled_time` ns, v2 `throttled_usec`).
    pub throttled: Duration,
    /// CPU time used (v2 `usage_usec`; v1 keeps it in cpuacct, not read here).
    pub usage: Option<Duration>,
}

impl CpuStat {
    /// Reads `<dir>/cpu.stat`.
    pub fn read(dir: &Path) -> Result<Self, BpfError> {
        let path = dir.join("cpu.stat");
        let text = fs::read_to_string(&path).map_err(|e| BpfError::io("cpu.stat", &path, e))?;
        Self::parse(&text)
    }

    /// Parses `cpu.stat` text, v1 or v2.
    pub fn parse(text: &str) -> Result<Self, BpfError> {
        let mut s = CpuStat::default();
        for (key, value) in keyed_values(text, "cpu.stat")? {
            match key {
                "nr_periods" => s.nr_periods = value,
                "nr_throttled" => s.nr_throttled = value,
                "throttled_time" => s.throttled = Duration::from_nanos(value),
                "throttled_usec" => s.throttled = Duration::from_micros(value),
                "usage_usec" => s.usage = Some(Duration::from_micros(value)),
                _ => {}
            }
        }
        Ok(s)
    }
}

/// OOM figures of a memory cgroup: v2 `memory.events`, v1 `memory.oom_control`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryOom {
    /// Processes killed by the OOM killer in this cgroup (v1 `oom_kill`, v2 `oom_kill`).
    pub oom_kills: u64,
    /// Times the cgroup hit its limit and the OOM killer was invoked (v2 `oom`; v1: none).
    pub ooms: Option<u64>,
    /// v1: whether the cgroup is under OOM right now (`under_oom`).
    pub under_oom: Option<bool>,
}

impl MemoryOom {
    /// Reads `<dir>/memory.events` (v2) or, failing that, `<dir>/memory.oom_control` (v1).
    pub fn read(dir: &Path) -> Result<Self, BpfError> {
        let events = dir.join("memory.events");
        match fs::read_to_string(&events) {
            Ok(text) => Self::parse_v2(&text),
            Err(_) => {
                let control = dir.join("memory.oom_control");
                let text = fs::read_to_string(&control)
                    .map_err(|e| BpfError::io("memory.oom_control", &control, e))?;
                Self::parse_v1(&text)
            }
        }
    }

    /// Parses v2 `memory.events`.
    pub fn parse_v2(text: &str) -> Result<Self, BpfError> {
        let mut s = MemoryOom {
            ooms: Some(0),
            ..MemoryOom::default()
        };
        for (key, value) in keyed_values(text, "memory.events")? {
            match key {
                "oom" => s.ooms = Some(value),
                "oom_kill" => s.oom_kills = value,
                _ => {}
            }
        }
        Ok(s)
    }

    /// Parses v1 `memory.oom_control` (`oom_kill` exists since Linux 4.13).
    pub fn parse_v1(text: &str) -> Result<Self, BpfError> {
        let mut s = MemoryOom::default();
        for (key, value) in keyed_values(text, "memory.oom_control")? {
            match key {
                "oom_kill" => s.oom_kills = value,
                "under_oom" => s.under_oom = Some(value != 0),
                _ => {}
            }
        }
        Ok(s)
    }
}

/// Fallback figures of one scoped cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupFallback {
    /// The cgroup's path (as given to [`crate::Telemetry::set_scope`]).
    pub path: PathBuf,
    /// From the cpu controller's hierarchy; `None` if unreadable there.
    pub cpu: Option<CpuStat>,
    /// From the memory controller's hierarchy; `None` if unreadable there.
    pub memory: Option<MemoryOom>,
}

/// Fallback statistics: labelled, coarser stand-ins for what the programs would report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FallbackSnapshot {
    /// Always `"fallback"`: reports must say these are not eBPF figures.
    pub label: &'static str,
    /// TCP counters of the agent's network namespace (`/proc/net/snmp`); per-target
    /// namespaces: [`TcpSnmp::read_for_pid`].
    pub tcp: Option<TcpSnmp>,
    /// Per scoped cgroup.
    pub cgroups: Vec<CgroupFallback>,
}

impl FallbackSnapshot {
    /// Reads the fallback figures for these cgroup paths.
    pub fn collect(mounts: &CgroupMounts, cgroups: &[PathBuf]) -> Self {
        let cpu = mounts.for_controller(V1Controller::Cpu);
        let memory = mounts.for_controller(V1Controller::Memory);
        let read_in =
            |h: &Option<Hierarchy>, path: &Path| h.as_ref().and_then(|h| h.dir(path).ok());
        let cgroups = cgroups
            .iter()
            .map(|path| CgroupFallback {
                path: path.clone(),
                cpu: read_in(&cpu, path).and_then(|d| CpuStat::read(&d).ok()),
                memory: read_in(&memory, path).and_then(|d| MemoryOom::read(&d).ok()),
            })
            .collect();
        FallbackSnapshot {
            label: "fallback",
            tcp: TcpSnmp::read().ok(),
            cgroups,
        }
    }
}

/// What a failed group falls back to, if anything.
pub(crate) fn source_for(group: crate::Group, mounts: &CgroupMounts) -> Option<String> {
    let kind = |c| mounts.for_controller(c).map(|h: Hierarchy| h.kind);
    match group {
        crate::Group::Tcp => Some("/proc/net/snmp (namespace-wide TCP counters)".to_owned()),
        crate::Group::Sched => kind(V1Controller::Cpu).map(|k| {
            format!(
                "{} cpu.stat (throttling counts, no run-queue latency)",
                label(&k)
            )
        }),
        crate::Group::Oom => kind(V1Controller::Memory).map(|k| match k {
            HierarchyKind::Unified => {
                "cgroup v2 memory.events oom_kill (counts, no victims)".to_owned()
            }
            _ => "cgroup v1 memory.oom_control oom_kill (counts, no victims)".to_owned(),
        }),
        crate::Group::Proc | crate::Group::Block => None,
    }
}

fn label(kind: &HierarchyKind) -> &'static str {
    match kind {
        HierarchyKind::Unified => "cgroup v2",
        HierarchyKind::V1(_) => "cgroup v1",
    }
}

fn keyed_values<'a>(text: &'a str, what: &'static str) -> Result<Vec<(&'a str, u64)>, BpfError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut parts = line.split_whitespace();
            let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
                return Err(BpfError::Malformed {
                    what,
                    detail: format!("line {line:?}"),
                });
            };
            let value = value.parse::<u64>().map_err(|_| BpfError::Malformed {
                what,
                detail: format!("{key}={value}"),
            })?;
            Ok((key, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP: &str = "\
Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 12345
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 17 5 3 2 4 1000 900 11 1 6 0
Udp: InDatagrams NoPorts
Udp: 1 2
";

    #[test]
    fn snmp_tcp_counters_are_parsed_by_name() {
        let s = TcpSnmp::parse(SNMP).unwrap();
        assert_eq!(
            s,
            TcpSnmp {
                active_opens: 17,
                passive_opens: 5,
                attempt_fails: 3,
                estab_resets: 2,
                curr_estab: 4,
                retrans_segs: 11,
                out_rsts: 6,
                in_errs: 1
            }
        );
        assert!(TcpSnmp::parse("Ip: a\nIp: 1\n").is_err());
        let later = TcpSnmp {
            retrans_segs: 20,
            ..s
        };
        assert_eq!(later.since(&s).retrans_segs, 9);
    }

    #[test]
    fn cpu_stat_v1_and_v2() {
        let v1 =
            CpuStat::parse("nr_periods 40\nnr_throttled 36\nthrottled_time 3200000000\n").unwrap();
        assert_eq!(
            (v1.nr_periods, v1.nr_throttled, v1.throttled, v1.usage),
            (40, 36, Duration::from_millis(3200), None)
        );
        let v2 = CpuStat::parse(
            "usage_usec 5000\nuser_usec 4000\nsystem_usec 1000\nnr_periods 10\nnr_throttled 9\nthrottled_usec 810000\nnr_bursts 0\nburst_usec 0\n",
        )
        .unwrap();
        assert_eq!(
            (v2.nr_throttled, v2.throttled, v2.usage),
            (
                9,
                Duration::from_millis(810),
                Some(Duration::from_millis(5))
            )
        );
        assert!(CpuStat::parse("nr_periods x\n").is_err());
    }

    #[test]
    fn memory_oom_v1_and_v2_files_in_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        // v2: memory.events
        let v2 = tmp.path().join("v2");
        fs::create_dir(&v2).unwrap();
        fs::write(
            v2.join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(
            MemoryOom::read(&v2).unwrap(),
            MemoryOom {
                oom_kills: 1,
                ooms: Some(2),
                under_oom: None
            }
        );
        // v1: memory.oom_control
        let v1 = tmp.path().join("v1");
        fs::create_dir(&v1).unwrap();
        fs::write(
            v1.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        assert_eq!(
            MemoryOom::read(&v1).unwrap(),
            MemoryOom {
                oom_kills: 3,
                ooms: None,
                under_oom: Some(false)
            }
        );
        assert!(MemoryOom::read(tmp.path()).is_err());
    }

    #[test]
    fn v2_cpu_stat_is_found_through_the_unified_hierarchy() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("system.slice/app.service");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1\nnr_periods 5\nnr_throttled 4\nthrottled_usec 400\n",
        )
        .unwrap();
        fs::write(dir.join("memory.events"), "oom 1\noom_kill 1\n").unwrap();
        let mounts = CgroupMounts {
            unified: Some(tmp.path().to_owned()),
            ..CgroupMounts::default()
        };
        let snap =
            FallbackSnapshot::collect(&mounts, &[PathBuf::from("/system.slice/app.service")]);
        assert_eq!(snap.label, "fallback");
        let cg = &snap.cgroups[0];
        assert_eq!(cg.cpu.map(|c| c.nr_throttled), Some(4));
        assert_eq!(cg.memory.map(|m| m.oom_kills), Some(1));
    }
}
