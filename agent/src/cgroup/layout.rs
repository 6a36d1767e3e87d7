//! How cgroups are mounted on this host, read from `/proc/self/mountinfo` (never assumed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use faultline_domain::fault::FaultKind;
use serde::{Deserialize, Serialize};

use super::CgroupError;

/// Controller names a cgroup v1 mount can carry in its super options. Anything else there is a
/// mount option (`rw`, `nosuid`, ...) or a named hierarchy (`name=systemd`), which carries no
/// resource controller.
const V1_CONTROLLERS: &[&str] = &[
    "blkio",
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "freezer",
    "hugetlb",
    "memory",
    "misc",
    "net_cls",
    "net_prio",
    "perf_event",
    "pids",
    "rdma",
    "debug",
];

/// How cgroups are mounted here. Roots come from mountinfo, so tests point them at a temp dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CgroupLayout {
    /// Only cgroup v1 hierarchies: controller name -> its mount point (co-mounted controllers
    /// such as `cpu,cpuacct` map to the same directory).
    V1 {
        controllers: BTreeMap<String, PathBuf>,
    },
    /// The unified hierarchy only; `controllers` as the root's `cgroup.controllers` lists them.
    V2 {
        root: PathBuf,
        controllers: BTreeSet<String>,
    },
    /// v1 controllers plus a cgroup2 mount (systemd's "hybrid": usually without controllers,
    /// but `cgroup.freeze` and `cgroup.kill` work there).
    Hybrid {
        v1: BTreeMap<String, PathBuf>,
        v2_root: PathBuf,
    },
}

/// One line of a mountinfo file, the fields Faultline uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `st_dev` of the mounted filesystem.
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that is mounted (not `/` for bind mounts).
    pub root: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    pub super_options: Vec<String>,
}

/// Parses a mountinfo file (proc(5)). Unparsable lines are an error: a layout guessed from
/// half a file would be wrong silently.
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountEntry>, String> {
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(' ').collect();
        let bad = |why: &str| format!("line {}: {why}: {line:?}", index + 1);
        let separator = fields
            .iter()
            .skip(6)
            .position(|field| *field == "-")
            .map(|position| position + 6)
            .ok_or_else(|| bad("no ' - ' separator"))?;
        if fields.len() < separator + 3 {
            return Err(bad("too few fields after the separator"));
        }
        let (major, minor) = parse_dev(fields[2]).ok_or_else(|| bad("bad major:minor"))?;
        entries.push(MountEntry {
            major,
            minor,
            root: unescape(fields[3]),
            mount_point: PathBuf::from(unescape(fields[4])),
            fstype: fields[separator + 1].to_string(),
            source: unescape(fields[separator + 2]),
            super_options: fields
                .get(separator + 3)
                .map(|options| options.split(',').map(unescape).collect())
                .unwrap_or_default(),
        });
    }
    Ok(entries)
}

/// `"254:0"` -> `(254, 0)`.
pub fn parse_dev(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Undoes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` `\`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
            && let Ok(value) = u8::try_from(
                digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0')),
            )
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which kernel interface a controller of one cgroup is reached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl CgroupLayout {
    /// Reads `/proc/self/mountinfo`.
    pub fn detect() -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_mountinfo(&text)
    }

    /// Builds the layout from mountinfo text. For a pure v2 host this reads the root's
    /// `cgroup.controllers` (at the mount point the text names, so tests use a temp dir).
    pub fn from_mountinfo(text: &str) -> Result<Self, CgroupError> {
        let entries = parse_mountinfo(text).map_err(|detail| CgroupError::Parse {
            path: PathBuf::from("mountinfo"),
            content: String::new(),
            detail,
        })?;
        // Prefer mounts of a hierarchy's root over bind mounts of a sub-directory.
        let mut v1: BTreeMap<String, (PathBuf, bool)> = BTreeMap::new();
        let mut v2: Option<(PathBuf, bool)> = None;
        for entry in &entries {
            let whole = entry.root == "/";
            match entry.fstype.as_str() {
                "cgroup" => {
                    for option in &entry.super_options {
                        if !V1_CONTROLLERS.contains(&option.as_str()) {
                            continue;
                        }
                        let better = match v1.get(option) {
                            None => true,
                            Some((_, existing_whole)) => whole && !existing_whole,
                        };
                        if better {
                            v1.insert(option.clone(), (entry.mount_point.clone(), whole));
                        }
                    }
                }
                "cgroup2" => {
                    let better = match &v2 {
                        None => true,
                        Some((_, existing_whole)) => whole && !existing_whole,
                    };
                    if better {
                        v2 = Some((entry.mount_point.clone(), whole));
                    }
                }
                _ => {}
            }
        }
        let v1: BTreeMap<String, PathBuf> = v1
            .into_iter()
            .map(|(name, (path, _))| (name, path))
            .collect();
        match (v1.is_empty(), v2) {
            (true, None) => Err(CgroupError::NotMounted),
            (false, None) => Ok(Self::V1 { controllers: v1 }),
            (false, Some((v2_root, _))) => Ok(Self::Hybrid { v1, v2_root }),
            (true, Some((root, _))) => {
                let controllers = read_controllers(&root)?;
                Ok(Self::V2 { root, controllers })
            }
        }
    }

    /// One line for pre-flight reports.
    pub fn describe(&self) -> String {
        match self {
            Self::V1 { controllers } => {
                format!("cgroup v1 only: {}", describe_v1(controllers))
            }
            Self::V2 { root, controllers } => format!(
                "cgroup v2 (unified) at {}: controllers {}",
                root.display(),
                join_or_none(controllers.iter())
            ),
            Self::Hybrid { v1, v2_root } => {
                let v2 = read_controllers(v2_root).unwrap_or_default();
                format!(
                    "cgroup v1/v2 hybrid: v1 {}; cgroup2 at {} with controllers {}",
                    describe_v1(v1),
                    v2_root.display(),
                    join_or_none(v2.iter())
                )
            }
        }
    }

    /// The v1 mounts, if any.
    pub fn v1_mounts(&self) -> Option<&BTreeMap<String, PathBuf>> {
        match self {
            Self::V1 { controllers } => Some(controllers),
            Self::Hybrid { v1, .. } => Some(v1),
            Self::V2 { .. } => None,
        }
    }

    /// The cgroup2 mount point, if any.
    pub fn v2_root(&self) -> Option<&Path> {
        match self {
            Self::V1 { .. } => None,
            Self::V2 { root, .. } => Some(root),
            Self::Hybrid { v2_root, .. } => Some(v2_root),
        }
    }

    /// Controllers the unified hierarchy offers (read live for a hybrid layout).
    pub fn v2_controllers(&self) -> BTreeSet<String> {
        match self {
            Self::V1 { .. } => BTreeSet::new(),
            Self::V2 { controllers, .. } => controllers.clone(),
            Self::Hybrid { v2_root, .. } => read_controllers(v2_root).unwrap_or_default(),
        }
    }

    /// Where `controller` lives: v1 when a v1 hierarchy has it, else v2 when the unified
    /// hierarchy offers it. `freezer` maps to v2's built-in `cgroup.freeze`.
    pub fn controller(&self, controller: &str) -> Option<Version> {
        if self
            .v1_mounts()
            .is_some_and(|v1| v1.contains_key(controller))
        {
            return Some(Version::V1);
        }
        let v2_name = if controller == "blkio" {
            "io"
        } else {
            controller
        };
        match self.v2_root() {
            Some(_) if controller == "freezer" => Some(Version::V2),
            Some(_) if self.v2_controllers().contains(v2_name) => Some(Version::V2),
            _ => None,
        }
    }

    /// Whether `fault` can be done through cgroups here: `Ok(mechanism)` or `Err(why not)`.
    pub fn supports(&self, fault: &FaultKind) -> Result<String, String> {
        let (controller, v1_files, v2_files) = match fault {
            FaultKind::CpuThrottle { .. } => {
                ("cpu", "cpu.cfs_quota_us/cpu.cfs_period_us", "cpu.max")
            }
            FaultKind::MemoryLimit { .. } => ("memory", "memory.limit_in_bytes", "memory.max"),
            FaultKind::IoThrottle { .. } => ("blkio", "blkio.throttle.*_device", "io.max"),
            FaultKind::PidsLimit { .. } => ("pids", "pids.max", "pids.max"),
            FaultKind::Freeze => ("freezer", "freezer.state", "cgroup.freeze"),
            FaultKind::CpuHog { .. } | FaultKind::MemoryHog { .. } | FaultKind::IoHog { .. } => {
                return Ok(format!(
                    "stressor process joined to the target's cgroup(s) ({})",
                    self.short_name()
                ));
            }
            FaultKind::DiskFill { .. } => {
                return Ok("file written through /proc/<pid>/root (no cgroup needed)".into());
            }
            other => return Err(format!("{} is not a cgroup fault", other.name())),
        };
        match self.controller(controller) {
            Some(Version::V1) => {
                let mount = self
                    .v1_mounts()
                    .and_then(|v1| v1.get(controller))
                    .map(|path| path.display().to_string())
                    .unwrap_or_default();
                Ok(format!(
                    "cgroup v1 {controller} controller at {mount}: {v1_files}"
                ))
            }
            Some(Version::V2) => Ok(format!("cgroup v2 {v2_files}")),
            None => {
                let v2_name = if controller == "blkio" {
                    "io"
                } else {
                    controller
                };
                Err(match self {
                    Self::V1 { .. } => {
                        format!("no cgroup v1 hierarchy has the {controller} controller")
                    }
                    Self::V2 { .. } => format!(
                        "the cgroup v2 root does not offer the {v2_name} controller (cgroup.controllers)"
                    ),
                    Self::Hybrid { .. } => format!(
                        "neither a v1 hierarchy nor the cgroup2 mount has the {controller} controller"
                    ),
                })
            }
        }
    }

    fn short_name(&self) -> &'static str {
        match self {
            Self::V1 { .. } => "cgroup v1",
            Self::V2 { .. } => "cgroup v2",
            Self::Hybrid { .. } => "cgroup v1/v2 hybrid",
        }
    }
}

/// The controllers a cgroup2 directory offers (`cgroup.controllers`).
pub fn read_controllers(dir: &Path) -> Result<BTreeSet<String>, CgroupError> {
    let path = dir.join("cgroup.controllers");
    let text = std::fs::read_to_string(&path).map_err(|source| CgroupError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(text.split_whitespace().map(str::to_string).collect())
}

fn describe_v1(controllers: &BTreeMap<String, PathBuf>) -> String {
    // Group co-mounted controllers: "cpu,cpuacct at /sys/fs/cgroup/cpu,cpuacct".
    let mut by_mount: BTreeMap<&PathBuf, Vec<&str>> = BTreeMap::new();
    for (name, mount) in controllers {
        by_mount.entry(mount).or_default().push(name);
    }
    let parts: Vec<String> = by_mount
        .iter()
        .map(|(mount, names)| format!("{} at {}", names.join(","), mount.display()))
        .collect();
    parts.join("; ")
}

fn join_or_none<'a>(items: impl Iterator<Item = &'a String>) -> String {
    let items: Vec<&str> = items.map(String::as_str).collect();
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(" ")
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// This machine (Debian 12 VM, kernel 6.18): systemd-style hybrid layout.
    pub const HYBRID: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
}

#[cfg(test)]
mod tests {
    use super::tests_support::HYBRID;
    use super::*;

    /// Classic v1 (Ubuntu 18.04 / CentOS 7 style) with co-mounted controllers.
    const V1: &str = "\
25 0 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,xattr,name=systemd
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/blkio rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,blkio
37 30 0:33 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:18 - cgroup cgroup rw,pids
38 30 0:34 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:19 - cgroup cgroup rw,freezer
39 30 0:35 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec,relatime shared:20 - cgroup cgroup rw,net_cls,net_prio
";

    #[test]
    fn this_hosts_hybrid_mountinfo_is_read_as_hybrid() {
        let layout = CgroupLayout::from_mountinfo(HYBRID).unwrap();
        let CgroupLayout::Hybrid { v1, v2_root } = &layout else {
            panic!("{layout:?}")
        };
        assert_eq!(v2_root, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(v1["cpu"], Path::new("/sys/fs/cgroup/cpu"));
        assert_eq!(v1["memory"], Path::new("/sys/fs/cgroup/memory"));
        assert!(!v1.contains_key("name=systemd") && !v1.contains_key("rw"));
        assert_eq!(v1.len(), 8, "{v1:?}");
        assert_eq!(layout.controller("cpu"), Some(Version::V1));
        assert!(
            layout.describe().starts_with("cgroup v1/v2 hybrid"),
            "{}",
            layout.describe()
        );
        let mechanism = layout
            .supports(&FaultKind::CpuThrottle { millicpus: 100 })
            .unwrap();
        assert!(mechanism.contains("cpu.cfs_quota_us"), "{mechanism}");
    }

    #[test]
    fn classic_v1_with_comounted_controllers() {
        let layout = CgroupLayout::from_mountinfo(V1).unwrap();
        let CgroupLayout::V1 { controllers } = &layout else {
            panic!("{layout:?}")
        };
        assert_eq!(controllers["cpu"], Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(
            controllers["cpuacct"],
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(
            controllers["net_prio"],
            Path::new("/sys/fs/cgroup/net_cls,net_prio")
        );
        assert!(
            layout
                .describe()
                .contains("cpu,cpuacct at /sys/fs/cgroup/cpu,cpuacct")
        );
        assert!(
            layout
                .supports(&FaultKind::Freeze)
                .unwrap()
                .contains("freezer.state")
        );
        assert!(
            layout
                .supports(&FaultKind::Latency {
                    scope: Default::default(),
                    delay_ms: 1,
                    jitter_ms: 0
                })
                .is_err()
        );
    }

    #[test]
    fn pure_v2_reads_the_roots_controllers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        // Debian 12 / Ubuntu 22.04 style line, with the mount point moved to the temp dir.
        let text = format!(
            "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
             26 22 0:23 / {} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n",
            dir.path().display()
        );
        let layout = CgroupLayout::from_mountinfo(&text).unwrap();
        let CgroupLayout::V2 { root, controllers } = &layout else {
            panic!("{layout:?}")
        };
        assert_eq!(root, dir.path());
        assert!(controllers.contains("io") && controllers.contains("memory"));
        assert_eq!(layout.controller("blkio"), Some(Version::V2));
        assert_eq!(layout.controller("freezer"), Some(Version::V2));
        assert!(
            layout
                .supports(&FaultKind::CpuThrottle { millicpus: 5 })
                .unwrap()
                .contains("cpu.max")
        );
        assert_eq!(layout.controller("hugetlb"), None);
        std::fs::write(dir.path().join("cgroup.controllers"), "memory\n").unwrap();
        let layout = CgroupLayout::from_mountinfo(&text).unwrap();
        let why = layout
            .supports(&FaultKind::PidsLimit { max: 5 })
            .unwrap_err();
        assert!(why.contains("pids"), "{why}");
    }

    #[test]
    fn no_cgroup_mounts_and_garbage_are_errors() {
        let only_root = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n";
        assert!(matches!(
            CgroupLayout::from_mountinfo(only_root),
            Err(CgroupError::NotMounted)
        ));
        assert!(CgroupLayout::from_mountinfo("not a mountinfo line\n").is_err());
    }

    #[test]
    fn escapes_and_bind_mounts() {
        let text = "\
50 31 0:29 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
51 31 0:29 / /host\\040cgroup/cpu rw - cgroup cgroup rw,cpu
";
        let entries = parse_mountinfo(text).unwrap();
        assert_eq!(entries[1].mount_point, Path::new("/host cgroup/cpu"));
        let layout = CgroupLayout::from_mountinfo(text).unwrap();
        // The hierarchy's root wins over a bind mount of a sub-directory.
        assert_eq!(
            layout.v1_mounts().unwrap()["cpu"],
            Path::new("/host cgroup/cpu")
        );
        assert_eq!(parse_dev(" 8:16\n"), Some((8, 16)));
    }

    #[test]
    fn the_real_host_layout_is_detected() {
        // Whatever this machine has, detection must succeed and describe it.
        let layout = CgroupLayout::detect().unwrap();
        assert!(!layout.describe().is_empty());
    }
}
