//! The cgroup(s) of one target: from `/proc/<pid>/cgroup`, mapped onto the layout's mounts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CgroupError;
use super::layout::{CgroupLayout, Version};

/// One target's cgroup: a directory per v1 controller, and the unified (v2) directory when the
/// host mounts cgroup2. Directories are absolute host paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupRef {
    /// v1 controller name -> this cgroup's directory in that controller's hierarchy.
    pub v1: BTreeMap<String, PathBuf>,
    /// This cgroup's directory in the unified hierarchy.
    pub v2: Option<PathBuf>,
}

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controller,list:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcCgroupLine {
    pub hierarchy: u32,
    /// Empty for the unified hierarchy (`0::/path`).
    pub controllers: Vec<String>,
    pub path: String,
}

/// Parses `/proc/<pid>/cgroup` (cgroups(7)).
pub fn parse_proc_cgroup(text: &str) -> Result<Vec<ProcCgroupLine>, String> {
    let mut lines = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("not `id:controllers:path`: {line:?}"));
        };
        let hierarchy = id
            .parse()
            .map_err(|_| format!("bad hierarchy id in {line:?}"))?;
        lines.push(ProcCgroupLine {
            hierarchy,
            controllers: controllers
                .split(',')
                .filter(|name| !name.is_empty())
                .map(str::to_string)
                .collect(),
            path: path.to_string(),
        });
    }
    Ok(lines)
}

/// `mount` + `/a/b` -> `mount/a/b` (never escapes `mount` through `..`).
fn under(mount: &Path, path: &str) -> Result<PathBuf, String> {
    let relative = path.trim_start_matches('/');
    if relative.split('/').any(|part| part == "..") {
        return Err(format!("cgroup path {path:?} contains `..`"));
    }
    Ok(if relative.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(relative)
    })
}

impl CgroupRef {
    /// The cgroups process `pid` is in now.
    pub fn of_pid(layout: &CgroupLayout, pid: u32) -> Result<Self, CgroupError> {
        let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text = std::fs::read_to_string(&path).map_err(|source| CgroupError::Process {
            pid,
            detail: format!("reading {}: {source}", path.display()),
        })?;
        Self::from_proc_cgroup(layout, &text).map_err(|err| CgroupError::Process {
            pid,
            detail: err.to_string(),
        })
    }

    /// Maps the text of a `/proc/<pid>/cgroup` file onto `layout`.
    pub fn from_proc_cgroup(layout: &CgroupLayout, text: &str) -> Result<Self, CgroupError> {
        let parse_error = |detail: String| CgroupError::Parse {
            path: PathBuf::from("/proc/<pid>/cgroup"),
            content: text.to_string(),
            detail,
        };
        let lines = parse_proc_cgroup(text).map_err(parse_error)?;
        let mut v1 = BTreeMap::new();
        let mut v2 = None;
        for line in &lines {
            if line.path.ends_with(" (deleted)") {
                return Err(parse_error(format!("cgroup {} was deleted", line.path)));
            }
            if line.hierarchy == 0 && line.controllers.is_empty() {
                if let Some(root) = layout.v2_root() {
                    v2 = Some(under(root, &line.path).map_err(parse_error)?);
                }
                continue;
            }
            let Some(mounts) = layout.v1_mounts() else {
                continue;
            };
            for controller in &line.controllers {
                if let Some(mount) = mounts.get(controller) {
                    v1.insert(
                        controller.clone(),
                        under(mount, &line.path).map_err(parse_error)?,
                    );
                }
            }
        }
        let found = Self { v1, v2 };
        if found.is_empty() {
            return Err(parse_error("no line matches a mounted hierarchy".into()));
        }
        Ok(found)
    }

    /// A cgroup by its path below each hierarchy's root (`docker/<id>`,
    /// `system.slice/nginx.service`). Hierarchies where that directory does not exist are left
    /// out; none existing is an error.
    pub fn from_path(layout: &CgroupLayout, relative: &str) -> Result<Self, CgroupError> {
        let invalid = |detail: String| CgroupError::Parse {
            path: PathBuf::from(relative),
            content: relative.to_string(),
            detail,
        };
        let mut v1 = BTreeMap::new();
        if let Some(mounts) = layout.v1_mounts() {
            for (controller, mount) in mounts {
                let dir = under(mount, relative).map_err(invalid)?;
                if dir.is_dir() {
                    v1.insert(controller.clone(), dir);
                }
            }
        }
        let v2 = match layout.v2_root() {
            Some(root) => Some(under(root, relative).map_err(invalid)?).filter(|dir| dir.is_dir()),
            None => None,
        };
        let found = Self { v1, v2 };
        if found.is_empty() {
            return Err(CgroupError::Missing {
                path: PathBuf::from(relative),
            });
        }
        Ok(found)
    }

    fn is_empty(&self) -> bool {
        self.v1.is_empty() && self.v2.is_none()
    }

    /// Every distinct directory of this cgroup (co-mounted v1 controllers share one).
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut seen = BTreeSet::new();
        self.v1
            .values()
            .chain(self.v2.iter())
            .filter(|dir| seen.insert((*dir).clone()))
            .cloned()
            .collect()
    }

    /// The directory through which `controller` (v1 name: `cpu`, `memory`, `blkio`, `pids`,
    /// `freezer`) is reached for this cgroup on `layout`.
    pub fn controller_dir(
        &self,
        layout: &CgroupLayout,
        controller: &str,
    ) -> Option<(Version, PathBuf)> {
        if let Some(dir) = self.v1.get(controller) {
            return Some((Version::V1, dir.clone()));
        }
        match (layout.controller(controller), &self.v2) {
            (Some(Version::V2), Some(dir)) => Some((Version::V2, dir.clone())),
            _ => None,
        }
    }

    /// Every pid in this cgroup (the union over its directories), sorted.
    pub fn procs(&self) -> Result<Vec<u32>, CgroupError> {
        let mut pids = BTreeSet::new();
        for dir in self.dirs() {
            pids.extend(read_procs(&dir)?);
        }
        Ok(pids.into_iter().collect())
    }

    /// One line for reports: `v1 /docker/abc (blkio,cpu,...) under /sys/fs/cgroup; v2 ...`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        // Group v1 controllers by their directory.
        let mut by_dir: BTreeMap<&PathBuf, Vec<&str>> = BTreeMap::new();
        for (controller, dir) in &self.v1 {
            by_dir.entry(dir).or_default().push(controller);
        }
        for (dir, controllers) in by_dir {
            parts.push(format!("v1 {} [{}]", dir.display(), controllers.join(",")));
        }
        if let Some(dir) = &self.v2 {
            parts.push(format!("v2 {}", dir.display()));
        }
        parts.join("; ")
    }
}

/// The pids listed in `dir/cgroup.procs`.
pub fn read_procs(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    let text = std::fs::read_to_string(&path).map_err(|source| CgroupError::Read {
        path: path.clone(),
        source,
    })?;
    text.split_whitespace()
        .map(|pid| {
            pid.parse().map_err(|_| CgroupError::Parse {
                path: path.clone(),
                content: text.clone(),
                detail: format!("not a pid: {pid:?}"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hybrid() -> CgroupLayout {
        CgroupLayout::from_mountinfo(super::super::layout::tests_support::HYBRID).unwrap()
    }

    #[test]
    fn proc_cgroup_of_a_docker_container_on_this_hybrid_host() {
        let text = "\
9:name=systemd:/docker/4f1c
8:pids:/docker/4f1c
7:blkio:/docker/4f1c
6:freezer:/docker/4f1c
5:devices:/docker/4f1c
4:memory:/docker/4f1c
3:cpuset:/docker/4f1c
2:cpuacct:/docker/4f1c
1:cpu:/docker/4f1c
0::/docker/4f1c
";
        let cgroup = CgroupRef::from_proc_cgroup(&hybrid(), text).unwrap();
        assert_eq!(
            cgroup.v1["cpu"],
            Path::new("/sys/fs/cgroup/cpu/docker/4f1c")
        );
        assert_eq!(
            cgroup.v1["pids"],
            Path::new("/sys/fs/cgroup/pids/docker/4f1c")
        );
        assert_eq!(cgroup.v1.len(), 8);
        assert_eq!(
            cgroup.v2.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified/docker/4f1c"))
        );
        assert_eq!(cgroup.dirs().len(), 9);
        assert!(
            cgroup
                .describe()
                .contains("v1 /sys/fs/cgroup/memory/docker/4f1c [memory]")
        );
        let (version, dir) = cgroup.controller_dir(&hybrid(), "freezer").unwrap();
        assert_eq!(version, Version::V1);
        assert_eq!(dir, Path::new("/sys/fs/cgroup/freezer/docker/4f1c"));
    }

    #[test]
    fn comounted_v1_controllers_share_a_directory() {
        let layout = CgroupLayout::V1 {
            controllers: [
                (
                    "cpu".to_string(),
                    PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"),
                ),
                (
                    "cpuacct".to_string(),
                    PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"),
                ),
            ]
            .into(),
        };
        let text = "4:cpu,cpuacct:/system.slice/nginx.service\n1:name=systemd:/system.slice/nginx.service\n0::/system.slice/nginx.service\n";
        let cgroup = CgroupRef::from_proc_cgroup(&layout, text).unwrap();
        assert_eq!(
            cgroup.dirs(),
            [PathBuf::from(
                "/sys/fs/cgroup/cpu,cpuacct/system.slice/nginx.service"
            )]
        );
        assert_eq!(
            cgroup.v2, None,
            "no cgroup2 mount, so the 0:: line maps nowhere"
        );
        assert!(
            cgroup.describe().contains("[cpu,cpuacct]"),
            "{}",
            cgroup.describe()
        );
    }

    #[test]
    fn pure_v2_uses_the_unified_line_only() {
        let layout = CgroupLayout::V2 {
            root: PathBuf::from("/sys/fs/cgroup"),
            controllers: ["cpu", "io", "memory", "pids"].map(String::from).into(),
        };
        let text = "0::/system.slice/docker-4f1c.scope\n";
        let cgroup = CgroupRef::from_proc_cgroup(&layout, text).unwrap();
        let dir = PathBuf::from("/sys/fs/cgroup/system.slice/docker-4f1c.scope");
        assert_eq!(cgroup.v2.as_ref(), Some(&dir));
        assert_eq!(
            cgroup.controller_dir(&layout, "blkio"),
            Some((Version::V2, dir.clone()))
        );
        assert_eq!(cgroup.controller_dir(&layout, "hugetlb"), None);
        let root = CgroupRef::from_proc_cgroup(&layout, "0::/\n").unwrap();
        assert_eq!(root.v2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
    }

    #[test]
    fn bad_and_deleted_and_escaping_lines_are_refused() {
        let layout = hybrid();
        assert!(CgroupRef::from_proc_cgroup(&layout, "garbage\n").is_err());
        assert!(CgroupRef::from_proc_cgroup(&layout, "1:cpu:/gone (deleted)\n").is_err());
        assert!(CgroupRef::from_proc_cgroup(&layout, "1:cpu:/../../etc\n").is_err());
        assert!(CgroupRef::from_proc_cgroup(&layout, "1:nonesuch:/x\n").is_err());
    }

    #[test]
    fn our_own_cgroup_is_found_and_lists_us() {
        let layout = CgroupLayout::detect().unwrap();
        let cgroup = CgroupRef::of_pid(&layout, std::process::id()).unwrap();
        assert!(
            cgroup.procs().unwrap().contains(&std::process::id()),
            "{}",
            cgroup.describe()
        );
    }

    #[test]
    fn from_path_keeps_existing_directories_only() {
        let dir = tempfile::tempdir().unwrap();
        let cpu = dir.path().join("cpu");
        let memory = dir.path().join("memory");
        std::fs::create_dir_all(cpu.join("docker/abc")).unwrap();
        std::fs::create_dir_all(&memory).unwrap();
        let layout = CgroupLayout::V1 {
            controllers: [
                ("cpu".to_string(), cpu.clone()),
                ("memory".to_string(), memory),
            ]
            .into(),
        };
        let cgroup = CgroupRef::from_path(&layout, "/docker/abc").unwrap();
        assert_eq!(cgroup.v1.len(), 1);
        assert_eq!(cgroup.v1["cpu"], cpu.join("docker/abc"));
        std::fs::write(cpu.join("docker/abc/cgroup.procs"), "12\n7\n12\n").unwrap();
        assert_eq!(cgroup.procs().unwrap(), [7, 12]);
        assert!(matches!(
            CgroupRef::from_path(&layout, "docker/none"),
            Err(CgroupError::Missing { .. })
        ));
    }
}
