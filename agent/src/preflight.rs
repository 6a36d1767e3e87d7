//! Pre-flight: what this host can do, probed at start-up by trying things (a scratch network
//! namespace for qdiscs and firewall features, /proc/self/mountinfo for cgroups, the Docker
//! API), never assumed from a distribution or kernel version. Reported on registration as
//! capabilities — host probes plus one `fault:<name>` entry per fault kind saying which
//! mechanism it would use here, or why it cannot run.

use std::path::Path;

use faultline_domain::fault::{FaultFamily, FaultKind};
use faultline_domain::preflight::FAULT_CAPABILITY_PREFIX;
use faultline_proto::v1 as pb;

use crate::cgroup::CgroupLayout;
use crate::faults::net::{self, NetCaps};
use crate::net::{firewall, tc};
use crate::runtime::ContainerRuntime;
use crate::sys::command::CommandRunner;

/// Everything the agent found out about its host.
#[derive(Debug, Clone)]
pub struct HostCaps {
    pub root: bool,
    /// The engine's description, or why it is unreachable.
    pub docker: Result<String, String>,
    pub net: NetCaps,
    pub cgroups: Result<CgroupLayout, String>,
    /// (name, available, how it was established)
    pub bpf: Vec<(String, bool, String)>,
}

impl HostCaps {
    /// Probes the host. Takes well under a second.
    pub async fn probe<R: ContainerRuntime, C: CommandRunner>(runtime: &R, runner: &C) -> Self {
        let (firewall, tc) = tokio::join!(firewall::probe(runner), tc::probe(runner));
        Self {
            root: nix::unistd::geteuid().is_root(),
            docker: runtime.describe().await.map_err(|e| e.to_string()),
            net: NetCaps { firewall, tc },
            cgroups: CgroupLayout::detect().map_err(|e| e.to_string()),
            bpf: probe_bpf(Path::new("/sys")),
        }
    }

    /// The mechanism `kind` would use on this host, or why it cannot run here.
    pub fn support(&self, kind: &FaultKind) -> Result<String, String> {
        let needs_root = |what: &str| {
            if self.root {
                Ok(())
            } else {
                Err(format!("{what} needs root"))
            }
        };
        match kind.family() {
            FaultFamily::Container => self
                .docker
                .as_ref()
                .map(|engine| format!("docker ({engine})"))
                .map_err(Clone::clone),
            FaultFamily::Network => {
                needs_root("entering network namespaces")?;
                net::mechanism_for(kind, &self.net).map(str::to_string)
            }
            FaultFamily::Resource | FaultFamily::Stressor => {
                needs_root("writing cgroup files")?;
                match &self.cgroups {
                    Ok(layout) => layout.supports(kind),
                    Err(why) => Err(format!("cgroups not usable: {why}")),
                }
            }
            FaultFamily::Process => {
                needs_root("signalling other users' processes")?;
                Ok(match kind {
                    FaultKind::ProcessStop { .. } => "SIGSTOP / SIGCONT by pid + start time",
                    _ => "signals by pid + start time (recycled pids are never hit)",
                }
                .to_string())
            }
        }
    }

    /// Capabilities as reported to the coordinator.
    pub fn capabilities(&self) -> Vec<pb::Capability> {
        let cap = |name: &str, available: bool, mechanism: String, detail: String| pb::Capability {
            name: name.to_string(),
            available,
            mechanism,
            detail,
        };
        let mut caps = vec![
            cap("root", self.root, "euid".into(), String::new()),
            match &self.docker {
                Ok(engine) => cap(
                    "docker",
                    true,
                    "docker engine API (unix socket)".into(),
                    engine.clone(),
                ),
                Err(why) => cap(
                    "docker",
                    false,
                    "docker engine API (unix socket)".into(),
                    why.clone(),
                ),
            },
            cap(
                "firewall",
                self.net.firewall.backend.is_some(),
                self.net
                    .firewall
                    .backend
                    .map(|b| b.name().to_string())
                    .unwrap_or_default(),
                self.net.firewall.detail.clone(),
            ),
            cap(
                "tc",
                self.net.tc.tbf || self.net.tc.netem,
                format!(
                    "netem: {}, tbf: {}, htb: {}, clsact: {}, u32: {}",
                    yes_no(self.net.tc.netem),
                    yes_no(self.net.tc.tbf),
                    yes_no(self.net.tc.htb),
                    yes_no(self.net.tc.clsact),
                    yes_no(self.net.tc.u32_filter)
                ),
                self.net.tc.detail.clone(),
            ),
            match &self.cgroups {
                Ok(layout) => cap("cgroups", true, layout.describe(), String::new()),
                Err(why) => cap("cgroups", false, String::new(), why.clone()),
            },
        ];
        for (name, available, how) in &self.bpf {
            caps.push(cap(name, *available, "probe".into(), how.clone()));
        }
        for kind in faultline_domain::fault::examples() {
            let name = format!("{FAULT_CAPABILITY_PREFIX}{}", kind.name());
            caps.push(match self.support(&kind) {
                Ok(mechanism) => cap(&name, true, mechanism, String::new()),
                Err(why) => cap(&name, false, String::new(), why),
            });
        }
        caps
    }
}

#[cfg(test)]
impl HostCaps {
    /// Capabilities of an imaginary host with everything, for unit tests with fake backends.
    pub fn everything_for_tests() -> Self {
        use crate::net::firewall::{FirewallBackend, FirewallCaps};
        use crate::net::tc::TcCaps;
        let layout = CgroupLayout::from_mountinfo(
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw",
        )
        .map_err(|e| e.to_string());
        Self {
            root: true,
            docker: Ok("fake engine".into()),
            net: NetCaps {
                firewall: FirewallCaps {
                    backend: Some(FirewallBackend::Nft),
                    statistic: true,
                    nfqueue: true,
                    reject_tcp_reset: true,
                    detail: String::new(),
                },
                tc: TcCaps {
                    netem: true,
                    tbf: true,
                    htb: true,
                    clsact: true,
                    u32_filter: true,
                    detail: String::new(),
                },
            },
            cgroups: layout,
            bpf: Vec::new(),
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Cheap, honest BPF indicators from sysfs. Loading programs for real is the telemetry
/// agent's job; what these say is what the files show, no more.
pub fn probe_bpf(sys: &Path) -> Vec<(String, bool, String)> {
    let btf = sys.join("kernel/btf/vmlinux");
    let kprobe = sys.join("bus/event_source/devices/kprobe");
    vec![
        (
            "bpf-btf".into(),
            btf.exists(),
            format!(
                "{} {}",
                btf.display(),
                if btf.exists() {
                    "present: CO-RE and tp_btf usable"
                } else {
                    "absent"
                }
            ),
        ),
        (
            "bpf-kprobes".into(),
            kprobe.exists(),
            format!(
                "{} {}",
                kprobe.display(),
                if kprobe.exists() {
                    "present"
                } else {
                    "absent: kernel built without kprobes"
                }
            ),
        ),
    ]
}

/// Capabilities `bpf:<group>` saying how each telemetry group is collected on this host, as
/// loading the programs at start-up found: `bpf` (available; the programs attached), `fallback`
/// (available; what stands in and why the programs did not load) or nothing (why).
pub fn telemetry_capabilities(sources: &[pb::TelemetrySource]) -> Vec<pb::Capability> {
    sources
        .iter()
        .map(|source| {
            let available = source.mechanism == "bpf" || source.mechanism == "fallback";
            let (mechanism, detail) = match source.mechanism.as_str() {
                "bpf" => (format!("bpf: {}", source.detail), String::new()),
                "fallback" => match source.detail.split_once("; programs not loaded: ") {
                    Some((what, why)) => (
                        format!("fallback: {what}"),
                        format!("programs not loaded: {why}"),
                    ),
                    None => ("fallback".to_string(), source.detail.clone()),
                },
                _ => (String::new(), source.detail.clone()),
            };
            pb::Capability {
                name: format!("bpf:{}", source.group),
                available,
                mechanism,
                detail,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_groups_become_capabilities() {
        let source = |group: &str, mechanism: &str, detail: &str| pb::TelemetrySource {
            group: group.into(),
            mechanism: mechanism.into(),
            detail: detail.into(),
        };
        let caps = telemetry_capabilities(&[
            source(
                "tcp",
                "bpf",
                "tp_btf/inet_sock_set_state; cgroups: cgroup v1 memory",
            ),
            source(
                "sched",
                "fallback",
                "cpu.stat of the target's cgroup; programs not loaded: no BTF",
            ),
            source(
                "proc",
                "none",
                "programs not loaded (no BTF) and nothing stands in",
            ),
        ]);
        assert_eq!(caps[0].name, "bpf:tcp");
        assert!(caps[0].available);
        assert_eq!(
            caps[0].mechanism,
            "bpf: tp_btf/inet_sock_set_state; cgroups: cgroup v1 memory"
        );
        assert!(caps[1].available);
        assert_eq!(
            caps[1].mechanism,
            "fallback: cpu.stat of the target's cgroup"
        );
        assert_eq!(caps[1].detail, "programs not loaded: no BTF");
        assert!(!caps[2].available);
        assert!(caps[2].detail.contains("nothing stands in"));
    }

    #[test]
    fn bpf_indicators_follow_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kernel/btf")).unwrap();
        std::fs::write(dir.path().join("kernel/btf/vmlinux"), b"").unwrap();
        let found = probe_bpf(dir.path());
        assert_eq!(found[0].0, "bpf-btf");
        assert!(found[0].1);
        assert!(!found[1].1, "no kprobe PMU in the fake sysfs");
        assert!(found[1].2.contains("without kprobes"));
    }
}
