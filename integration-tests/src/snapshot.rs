//! A snapshot of everything a Faultline fault could change about one container, taken from
//! the outside: its Docker state, limits and networks; the firewall rules and qdiscs inside its
//! network namespace; its cgroup limit files; its processes and their states; and the top of
//! its root filesystem. Two snapshots compare equal when the container is exactly as it was.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;

use crate::docker::docker;

/// What a fault could have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub docker: String,
    pub netns: BTreeMap<String, String>,
    pub cgroup: BTreeMap<String, String>,
    pub processes: Vec<(String, char)>,
    /// How many processes the container's cgroup holds (stressors join it from outside the
    /// container's pid namespace).
    pub cgroup_procs: usize,
    pub root_entries: Vec<String>,
}

/// Files of a v1 cgroup that faults write.
const CGROUP_V1_FILES: &[(&str, &str)] = &[
    ("cpu", "cpu.cfs_quota_us"),
    ("cpu", "cpu.cfs_period_us"),
    ("memory", "memory.limit_in_bytes"),
    ("blkio", "blkio.throttle.read_bps_device"),
    ("blkio", "blkio.throttle.write_bps_device"),
    ("blkio", "blkio.throttle.read_iops_device"),
    ("blkio", "blkio.throttle.write_iops_device"),
    ("pids", "pids.max"),
    ("freezer", "freezer.state"),
];

/// Files of a v2 cgroup that faults write.
const CGROUP_V2_FILES: &[&str] = &[
    "cpu.max",
    "memory.max",
    "io.max",
    "pids.max",
    "cgroup.freeze",
];

async fn in_netns(pid: u32, program: &str, args: &[&str]) -> String {
    let pid = pid.to_string();
    let mut full = vec!["-t", pid.as_str(), "-n", program];
    full.extend_from_slice(args);
    match tokio::process::Command::new("nsenter")
        .args(&full)
        .output()
        .await
    {
        Ok(out) if out.status.success() => normalise(&String::from_utf8_lossy(&out.stdout)),
        Ok(out) => format!("(failed: {})", String::from_utf8_lossy(&out.stderr).trim()),
        Err(err) => format!("(not run: {err})"),
    }
}

/// Drops what changes by itself or is Docker's to change, not a fault's: timestamps in
/// iptables-save comments; the embedded-DNS NAT rules for 127.0.0.11, which Docker rewrites
/// with fresh ports every time a container starts; and interface numbering (`eth0` becomes
/// `eth1` when Docker reattaches a network).
fn normalise(text: &str) -> String {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.contains("127.0.0.11"))
        .map(|line| {
            line.split(' ')
                .map(|word| {
                    let is_eth = word
                        .strip_prefix("eth")
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
                    if is_eth { "ethN" } else { word }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Docker's `HostConfig` limits as what they do: Docker 20.10 cannot store a limit back as 0,
/// so "no limit" is spelled 0, -1 or the kernel maximum; the cgroup files in the snapshot show
/// the values in force exactly.
fn effective_limits(nano_cpus: &str, quota: &str, memory: &str) -> String {
    let num = |s: &str| s.parse::<i64>().unwrap_or(0);
    let cpu = if num(nano_cpus) > 0 {
        format!("cpus={}", num(nano_cpus))
    } else if num(quota) > 0 {
        format!("quota={}", num(quota))
    } else {
        "cpu=unlimited".into()
    };
    let memory = match num(memory) {
        m if m <= 0 || m >= (1 << 62) => "memory=unlimited".to_string(),
        m => format!("memory={m}"),
    };
    format!("{cpu} {memory}")
}

/// Takes a snapshot of container `id`.
pub async fn take(id: &str) -> anyhow::Result<Snapshot> {
    let inspected = docker(&[
        "inspect",
        "--format",
        "{{.State.Status}} {{.HostConfig.NanoCpus}} {{.HostConfig.CpuQuota}} \
         {{.HostConfig.Memory}} {{range $k, $v := .NetworkSettings.Networks}}{{$k}}={{$v.IPAddress}} {{end}}",
        id,
    ])
    .await?;
    let words: Vec<&str> = inspected.split_whitespace().collect();
    let docker_state = match words.as_slice() {
        [status, nano, quota, memory, networks @ ..] => {
            format!(
                "{status} {} {}",
                effective_limits(nano, quota, memory),
                networks.join(" ")
            )
        }
        _ => inspected.clone(),
    };
    let pid: u32 = docker(&["inspect", "--format", "{{.State.Pid}}", id])
        .await?
        .parse()
        .context("container pid")?;
    let mut netns = BTreeMap::new();
    let mut cgroup = BTreeMap::new();
    let mut processes = Vec::new();
    let mut cgroup_procs = 0;
    let mut root_entries = Vec::new();
    if pid != 0 {
        netns.insert("iptables".into(), in_netns(pid, "iptables-save", &[]).await);
        netns.insert(
            "ip6tables".into(),
            in_netns(pid, "ip6tables-save", &[]).await,
        );
        netns.insert(
            "iptables-legacy".into(),
            in_netns(pid, "iptables-legacy-save", &[]).await,
        );
        netns.insert(
            "nft".into(),
            in_netns(pid, "nft", &["list", "ruleset"]).await,
        );
        netns.insert("tc".into(), in_netns(pid, "tc", &["qdisc", "show"]).await);

        let v1 = Path::new("/sys/fs/cgroup/cpu/docker").join(id);
        if v1.exists() {
            cgroup_procs = read_trimmed(&v1.join("cgroup.procs")).lines().count();
            for (controller, file) in CGROUP_V1_FILES {
                let path = Path::new("/sys/fs/cgroup")
                    .join(controller)
                    .join("docker")
                    .join(id)
                    .join(file);
                cgroup.insert(format!("{controller}/{file}"), read_trimmed(&path));
            }
        } else {
            let relative = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
                .unwrap_or_default();
            let dir = Path::new("/sys/fs/cgroup").join(relative.trim_start_matches('/'));
            cgroup_procs = read_trimmed(&dir.join("cgroup.procs")).lines().count();
            for file in CGROUP_V2_FILES {
                cgroup.insert((*file).to_string(), read_trimmed(&dir.join(file)));
            }
        }
        processes = container_processes(pid);
        root_entries = std::fs::read_dir(format!("/proc/{pid}/root"))
            .map(|entries| {
                let mut names: Vec<String> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                names
            })
            .unwrap_or_default();
    }
    Ok(Snapshot {
        docker: docker_state,
        netns,
        cgroup,
        processes,
        cgroup_procs,
        root_entries,
    })
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("({e})"))
}

/// `(comm, state)` of every process in the pid namespace of `pid`, sorted.
fn container_processes(pid: u32) -> Vec<(String, char)> {
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    let Some(target) = ns(&pid.to_string()) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) || ns(&name).as_ref() != Some(&target) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{name}/stat")).unwrap_or_default();
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let state = stat[close + 1..].trim_start().chars().next().unwrap_or('?');
        // Sleeping and running are the same "alive" for our purposes; stopped/frozen differ.
        let state = if matches!(state, 'S' | 'R' | 'I') {
            'S'
        } else {
            state
        };
        found.push((comm, state));
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_is_unlimited_however_docker_spells_it() {
        assert_eq!(
            effective_limits("0", "0", "0"),
            effective_limits("0", "-1", "9223372036854771712")
        );
        assert_ne!(
            effective_limits("0", "20000", "0"),
            effective_limits("0", "-1", "0")
        );
        assert_eq!(
            normalise("qdisc noqueue 0: dev eth1 root"),
            normalise("qdisc noqueue 0: dev eth0 root")
        );
    }

    #[test]
    fn comment_lines_with_timestamps_are_ignored() {
        let a = "# Generated by iptables-save v1.8.9 on Mon Nov 23 10:00:00 2026\n*filter\nCOMMIT";
        let b = "# Generated by iptables-save v1.8.9 on Mon Nov 23 10:00:05 2026\n*filter\nCOMMIT";
        assert_eq!(normalise(a), normalise(b));
    }
}
