//! Which cgroup hierarchy attributes what, and converting between cgroup directories and the
//! ids the programs report.
//!
//! A cgroup id is the kernfs node id of the cgroup's directory, which on 64-bit kernels is the
//! directory's inode number: `stat -c %i /sys/fs/cgroup/<hierarchy>/<path>`. The same path has
//! a different id in each hierarchy, so every id comes with the hierarchy it belongs to (see
//! [`crate::Telemetry::hierarchy`]).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::error::BpfError;

/// The cgroup v1 controllers whose hierarchies the programs can attribute tasks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum V1Controller {
    /// `cpu` (CFS bandwidth: `cpu.cfs_quota_us`).
    Cpu,
    /// `memory` (`memory.limit_in_bytes`, OOM kills).
    Memory,
    /// `blkio` (the io controller's v1 name).
    Blkio,
    /// `pids`.
    Pids,
}

impl V1Controller {
    /// The controller's name in mount options and `/proc/<pid>/cgroup`.
    pub fn name(self) -> &'static str {
        match self {
            V1Controller::Cpu => "cpu",
            V1Controller::Memory => "memory",
            V1Controller::Blkio => "blkio",
            V1Controller::Pids => "pids",
        }
    }

    /// The value of the programs' `cg_source` constant selecting this controller's hierarchy.
    pub(crate) fn cg_source(self) -> u32 {
        match self {
            V1Controller::Cpu => 1,
            V1Controller::Memory => 2,
            V1Controller::Blkio => 3,
            V1Controller::Pids => 4,
        }
    }
}

/// A cgroup hierarchy: the v2 unified one, or the v1 hierarchy a controller is mounted in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HierarchyKind {
    /// cgroup v2 (the default hierarchy).
    Unified,
    /// The cgroup v1 hierarchy of this controller.
    V1(V1Controller),
}

impl fmt::Display for HierarchyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HierarchyKind::Unified => f.write_str("cgroup v2"),
            HierarchyKind::V1(c) => write!(f, "cgroup v1 {}", c.name()),
        }
    }
}

/// A mounted hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    /// Which hierarchy.
    pub kind: HierarchyKind,
    /// Where it is mounted, e.g. `/sys/fs/cgroup/memory` or `/sys/fs/cgroup`.
    pub mount: PathBuf,
}

impl Hierarchy {
    pub(crate) fn cg_source(&self) -> u32 {
        match self.kind {
            HierarchyKind::Unified => 0,
            HierarchyKind::V1(c) => c.cg_source(),
        }
    }

    /// The directory of the cgroup at `path` (relative to the hierarchy's root, with or
    /// without a leading `/`, as in `/proc/<pid>/cgroup`).
    pub fn dir(&self, path: impl AsRef<Path>) -> Result<PathBuf, BpfError> {
        let path = path.as_ref();
        let mut dir = self.mount.clone();
        for c in path.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(part) => dir.push(part),
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(BpfError::InvalidCgroupPath {
                        path: path.to_owned(),
                    });
                }
            }
        }
        Ok(dir)
    }

    /// The id the programs report for the cgroup at `path` in this hierarchy.
    pub fn id_of(&self, path: impl AsRef<Path>) -> Result<u64, BpfError> {
        let dir = self.dir(path)?;
        fs::metadata(&dir)
            .map(|m| m.ino())
            .map_err(|source| BpfError::io("cgroup directory", &dir, source))
    }

    /// The path (from the hierarchy's root, with a leading `/`) of the cgroup with this id, by
    /// walking the hierarchy; `None` if it no longer exists.
    pub fn path_of(&self, id: u64) -> Option<PathBuf> {
        let root = fs::metadata(&self.mount).ok()?;
        if root.ino() == id {
            return Some(PathBuf::from("/"));
        }
        let mut stack = vec![self.mount.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(ft) = entry.file_type() else { continue };
                if !ft.is_dir() {
                    continue;
                }
                let path = entry.path();
                if entry.metadata().is_ok_and(|m| m.ino() == id) {
                    let rel = path.strip_prefix(&self.mount).ok()?;
                    return Some(Path::new("/").join(rel));
                }
                stack.push(path);
            }
        }
        None
    }

    /// The cgroup (path from the hierarchy's root) process `pid` is in, from
    /// `/proc/<pid>/cgroup`.
    pub fn path_of_pid(&self, pid: u32) -> Result<PathBuf, BpfError> {
        let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text =
            fs::read_to_string(&file).map_err(|e| BpfError::io("cgroup membership", &file, e))?;
        self.path_in_proc_cgroup(&text)
            .ok_or_else(|| BpfError::Malformed {
                what: "/proc/<pid>/cgroup",
                detail: format!(
                    "no line for the {} hierarchy in {}",
                    self.kind,
                    file.display()
                ),
            })
    }

    /// The path for this hierarchy in the text of a `/proc/<pid>/cgroup` file.
    pub fn path_in_proc_cgroup(&self, text: &str) -> Option<PathBuf> {
        text.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let matches = match &self.kind {
                HierarchyKind::Unified => id == "0" && controllers.is_empty(),
                HierarchyKind::V1(c) => controllers.split(',').any(|x| x == c.name()),
            };
            matches.then(|| PathBuf::from(path))
        })
    }
}

/// The cgroup file systems mounted on this host (from `/proc/self/mountinfo`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupMounts {
    /// The cgroup2 mount, if any.
    pub unified: Option<PathBuf>,
    /// v1 mounts by controller (a co-mounted `cpu,cpuacct` appears under both names).
    pub v1: BTreeMap<String, PathBuf>,
}

impl CgroupMounts {
    /// Reads `/proc/self/mountinfo`.
    pub fn discover() -> Result<Self, BpfError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(|e| BpfError::io("mount table", path, e))?;
        Ok(Self::parse(&text))
    }

    /// Parses the text of a `mountinfo` file. The first mount of each kind wins.
    pub fn parse(mountinfo: &str) -> Self {
        let mut mounts = CgroupMounts::default();
        for line in mountinfo.lines() {
            // id parent major:minor root mount-point options [optional...] - fstype source super-options
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split(' ').nth(4) else {
                continue;
            };
            let mut right = right.split(' ');
            let (Some(fstype), _, Some(super_opts)) = (right.next(), right.next(), right.next())
            else {
                continue;
            };
            let mount_point = PathBuf::from(unescape_mount_path(mount_point));
            match fstype {
                "cgroup2" => {
                    mounts.unified.get_or_insert(mount_point);
                }
                "cgroup" => {
                    for opt in super_opts.split(',') {
                        mounts
                            .v1
                            .entry(opt.to_owned())
                            .or_insert_with(|| mount_point.clone());
                    }
                }
                _ => {}
            }
        }
        mounts
    }

    /// The hierarchy a v1 controller is mounted in.
    pub fn v1(&self, controller: V1Controller) -> Option<Hierarchy> {
        self.v1.get(controller.name()).map(|mount| Hierarchy {
            kind: HierarchyKind::V1(controller),
            mount: mount.clone(),
        })
    }

    /// The unified hierarchy, if mounted.
    pub fn unified(&self) -> Option<Hierarchy> {
        self.unified.as_ref().map(|mount| Hierarchy {
            kind: HierarchyKind::Unified,
            mount: mount.clone(),
        })
    }

    /// Where a controller's cgroups live: its v1 hierarchy when mounted as v1, otherwise the
    /// unified one (pure cgroup v2 hosts).
    pub fn for_controller(&self, controller: V1Controller) -> Option<Hierarchy> {
        self.v1(controller).or_else(|| self.unified())
    }

    /// The hierarchy for attributing things that belong to no controller (TCP connections,
    /// process lifecycle) under [`Attribution::Auto`]: on hosts with v1 controllers, the v1
    /// `memory` hierarchy (then `cpu`, `pids`, `blkio`) — container runtimes create the same
    /// path in each; otherwise the unified hierarchy.
    pub fn primary(&self, attribution: Attribution) -> Option<Hierarchy> {
        match attribution {
            Attribution::Unified => self.unified(),
            Attribution::V1(c) => self.v1(c),
            Attribution::Auto => [
                V1Controller::Memory,
                V1Controller::Cpu,
                V1Controller::Pids,
                V1Controller::Blkio,
            ]
            .into_iter()
            .find_map(|c| self.v1(c))
            .or_else(|| self.unified()),
        }
    }
}

/// Which hierarchy attributes TCP connections and process events to cgroups.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Attribution {
    /// See [`CgroupMounts::primary`].
    #[default]
    Auto,
    /// The cgroup v2 hierarchy.
    Unified,
    /// A v1 controller's hierarchy.
    V1(V1Controller),
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 1 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup rw shared:9 - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw,relatime shared:13 - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/my\\040dir rw,relatime shared:14 - cgroup cgroup rw,pids
";

    const PURE_V2: &str = "\
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn hybrid_mounts_map_controllers_and_pick_memory_as_primary() {
        let m = CgroupMounts::parse(HYBRID);
        assert_eq!(
            m.unified.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            m.v1.get("cpu").map(PathBuf::as_path),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(m.v1.get("cpuacct"), m.v1.get("cpu"));
        assert_eq!(
            m.v1.get("pids").map(PathBuf::as_path),
            Some(Path::new("/sys/fs/cgroup/my dir"))
        );
        let primary = m.primary(Attribution::Auto).map(|h| h.kind);
        assert_eq!(primary, Some(HierarchyKind::V1(V1Controller::Memory)));
        // blkio is not mounted as v1 here: falls back to the unified hierarchy.
        assert_eq!(
            m.for_controller(V1Controller::Blkio).map(|h| h.kind),
            Some(HierarchyKind::Unified)
        );
    }

    #[test]
    fn pure_v2_uses_the_unified_hierarchy_for_everything() {
        let m = CgroupMounts::parse(PURE_V2);
        for c in [
            V1Controller::Cpu,
            V1Controller::Memory,
            V1Controller::Blkio,
            V1Controller::Pids,
        ] {
            let h = m.for_controller(c);
            assert_eq!(h.as_ref().map(|h| &h.kind), Some(&HierarchyKind::Unified));
            assert_eq!(h.map(|h| h.mount), Some(PathBuf::from("/sys/fs/cgroup")));
        }
        assert_eq!(
            m.primary(Attribution::Auto).map(|h| h.kind),
            Some(HierarchyKind::Unified)
        );
        assert_eq!(m.primary(Attribution::V1(V1Controller::Memory)), None);
    }

    #[test]
    fn proc_cgroup_lines_are_matched_per_hierarchy() {
        let text = "12:pids:/a\n4:cpu,cpuacct:/docker/x\n1:name=systemd:/s\n0::/user.slice\n";
        let cpu = Hierarchy {
            kind: HierarchyKind::V1(V1Controller::Cpu),
            mount: "/c".into(),
        };
        let uni = Hierarchy {
            kind: HierarchyKind::Unified,
            mount: "/u".into(),
        };
        let mem = Hierarchy {
            kind: HierarchyKind::V1(V1Controller::Memory),
            mount: "/m".into(),
        };
        assert_eq!(
            cpu.path_in_proc_cgroup(text),
            Some(PathBuf::from("/docker/x"))
        );
        assert_eq!(
            uni.path_in_proc_cgroup(text),
            Some(PathBuf::from("/user.slice"))
        );
        assert_eq!(mem.path_in_proc_cgroup(text), None);
    }

    #[test]
    fn ids_are_directory_inodes_and_paths_are_found_back() -> Result<(), BpfError> {
        let tmp = tempfile::tempdir().map_err(|e| BpfError::io("tempdir", Path::new("/tmp"), e))?;
        let nested = tmp.path().join("docker/abc");
        fs::create_dir_all(&nested).map_err(|e| BpfError::io("mkdir", &nested, e))?;
        let h = Hierarchy {
            kind: HierarchyKind::Unified,
            mount: tmp.path().to_owned(),
        };
        let id = h.id_of("/docker/abc")?;
        let ino = fs::metadata(&nested)
            .map_err(|e| BpfError::io("stat", &nested, e))?
            .ino();
        assert_eq!(id, ino);
        assert_eq!(h.id_of("docker/abc")?, id);
        assert_eq!(h.path_of(id), Some(PathBuf::from("/docker/abc")));
        assert!(h.dir("../etc").is_err());
        Ok(())
    }
}
