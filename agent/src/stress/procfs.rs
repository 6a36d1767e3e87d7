//! What stressors read from `/proc/<pid>` besides identities (those, start-time checks and
//! race-free signalling are [`crate::process`]'s): CPU time, memory, owners, command lines
//! (the tag marker) and root directories.

use std::path::Path;

use crate::process::Stat;

/// User + system CPU time in clock ticks (all threads).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = Stat::read(pid).ok().flatten()?;
    Some(stat.utime + stat.stime)
}

/// Clock ticks per second.
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks)
        .ok()
        .filter(|ticks| *ticks > 0)
        .unwrap_or(100)
}

/// Resident set size in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Real uid of `pid`.
pub fn uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The argument vector of `pid` (empty for zombies and kernel threads).
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|byte| *byte == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect(),
    )
}

/// Every pid in `/proc`.
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The `/proc/<pid>/root` of a process: its root directory as the host reaches it.
pub fn root_of(pid: u32) -> std::path::PathBuf {
    Path::new("/proc").join(pid.to_string()).join("root")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_reads_back() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        assert!(rss_bytes(me).unwrap() > 0);
        assert_eq!(uid(me), Some(nix::unistd::getuid().as_raw()));
        assert!(cmdline(me).unwrap()[0].contains("faultline_agent"));
        assert!(all_pids().contains(&me));
        assert_eq!(root_of(me), Path::new(&format!("/proc/{me}/root")));
    }
}
