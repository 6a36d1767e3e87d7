//! Which block device backs a target's root filesystem, for IO throttling without an explicit
//! device. Read from the target's own `/proc/<pid>/mountinfo` (its mount namespace, so a
//! container's overlay root is seen as the container sees it).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::{major, minor};

use super::layout::{MountEntry, parse_mountinfo};

/// The mount of `/` in a mountinfo (the last one wins: later mounts cover earlier ones).
pub fn root_mount(entries: &[MountEntry]) -> Option<&MountEntry> {
    entries
        .iter()
        .rev()
        .find(|entry| entry.mount_point == Path::new("/"))
}

/// `upperdir=` of an overlay mount: where a container's writes land on the host.
pub fn overlay_upperdir(entry: &MountEntry) -> Option<PathBuf> {
    if entry.fstype != "overlay" {
        return None;
    }
    entry
        .super_options
        .iter()
        .find_map(|option| option.strip_prefix("upperdir="))
        .map(PathBuf::from)
}

/// The device a mount's data lives on: its own `st_dev` when that is a real device; the
/// upper directory's device for kernel overlayfs (Docker's overlay2); the source device node
/// (btrfs and others report an anonymous `0:N`); else, for filesystems with no device of their
/// own (fuse-overlayfs, as Docker uses on some hosts), the disk holding the directory where the
/// host mounts them (`/var/lib/docker/<driver>/<id>/merged` sits next to its layers). `host`
/// is the host's (the agent's) mountinfo.
pub fn backing_device(entry: &MountEntry, host: &[MountEntry]) -> Result<(u32, u32), String> {
    if entry.major != 0 {
        return Ok((entry.major, entry.minor));
    }
    let describe = || {
        format!(
            "{} {} on {}",
            entry.fstype,
            entry.source,
            entry.mount_point.display()
        )
    };
    let device_of = |path: &Path| -> Option<(u32, u32)> {
        let dev = std::fs::metadata(path).ok()?.dev();
        (major(dev) != 0).then(|| (major(dev) as u32, minor(dev) as u32))
    };
    if let Some(upper) = overlay_upperdir(entry)
        && let Some(device) = device_of(&upper)
    {
        return Ok(device);
    }
    if entry.source.starts_with("/dev/")
        && let Ok(meta) = std::fs::metadata(&entry.source)
        && major(meta.rdev()) != 0
    {
        return Ok((major(meta.rdev()) as u32, minor(meta.rdev()) as u32));
    }
    let on_host = host.iter().find(|mount| {
        (mount.major, mount.minor) == (entry.major, entry.minor) && mount.root == entry.root
    });
    if let Some(parent) = on_host.and_then(|mount| mount.mount_point.parent())
        && parent != Path::new("/")
        && let Some(device) = device_of(parent)
    {
        return Ok(device);
    }
    Err(format!("{} is not backed by a block device", describe()))
}

/// Block-IO limits apply to whole disks, not partitions (the kernel refuses those): maps a
/// partition `MAJ:MIN` to its disk through `<sys>/dev/block/`.
pub fn whole_disk(sys: &Path, (major, minor): (u32, u32)) -> Result<(u32, u32), String> {
    let link = sys.join(format!("dev/block/{major}:{minor}"));
    if !link.exists() {
        return Err(format!(
            "{major}:{minor} is not a block device ({} missing)",
            link.display()
        ));
    }
    if !link.join("partition").exists() {
        return Ok((major, minor));
    }
    let real = std::fs::canonicalize(&link).map_err(|err| format!("{}: {err}", link.display()))?;
    let parent_dev = real
        .parent()
        .map(|disk| disk.join("dev"))
        .ok_or_else(|| format!("{} has no parent disk", real.display()))?;
    let text = std::fs::read_to_string(&parent_dev)
        .map_err(|err| format!("{}: {err}", parent_dev.display()))?;
    super::layout::parse_dev(&text)
        .ok_or_else(|| format!("{}: unexpected {text:?}", parent_dev.display()))
}

/// `MAJ:MIN` of the whole disk backing process `pid`'s root filesystem.
pub fn root_device_of_pid(pid: u32) -> Result<String, String> {
    let path = format!("/proc/{pid}/mountinfo");
    let text = std::fs::read_to_string(&path).map_err(|err| format!("{path}: {err}"))?;
    let entries = parse_mountinfo(&text)?;
    let root = root_mount(&entries).ok_or_else(|| format!("{path}: no mount at /"))?;
    let host = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|text| parse_mountinfo(&text).ok())
        .unwrap_or_default();
    let device = backing_device(root, &host)?;
    let (major, minor) = whole_disk(Path::new("/sys"), device)?;
    Ok(format!("{major}:{minor}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_mount_of_a_docker_container_is_its_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("diff");
        std::fs::create_dir(&upper).unwrap();
        // A container's mountinfo (Docker 24, overlay2), upper dir moved to the temp dir.
        let text = format!(
            "620 520 0:52 / / rw,relatime master:276 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/ABC:/var/lib/docker/overlay2/l/DEF,upperdir={},workdir=/var/lib/docker/overlay2/x/work\n\
             621 620 0:55 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw\n",
            upper.display()
        );
        let entries = parse_mountinfo(&text).unwrap();
        let root = root_mount(&entries).unwrap();
        assert_eq!(overlay_upperdir(root), Some(upper.clone()));
        let expected = std::fs::metadata(&upper).unwrap().dev();
        assert_eq!(
            backing_device(root, &[]).unwrap(),
            (major(expected) as u32, minor(expected) as u32)
        );
    }

    #[test]
    fn a_plain_root_uses_its_own_device_and_tmpfs_is_refused() {
        let text = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n";
        let entries = parse_mountinfo(text).unwrap();
        assert_eq!(
            backing_device(root_mount(&entries).unwrap(), &[]).unwrap(),
            (254, 0)
        );
        let text = "22 1 0:44 / / rw - tmpfs tmpfs rw\n";
        let entries = parse_mountinfo(text).unwrap();
        let err = backing_device(root_mount(&entries).unwrap(), &[]).unwrap_err();
        assert!(err.contains("not backed by a block device"), "{err}");
    }

    #[test]
    fn a_fuse_overlay_root_uses_the_disk_under_its_host_mount_point() {
        // Docker with fuse-overlayfs: the container sees `/` as a FUSE mount without options.
        let inside = "700 600 0:61 / / rw,relatime - fuse.fuse-overlayfs fuse-overlayfs rw,user_id=0,group_id=0,default_permissions,allow_other\n";
        let entries = parse_mountinfo(inside).unwrap();
        let root = root_mount(&entries).unwrap();
        // The host mounts it at <driver dir>/<id>/merged; the layers sit next to it.
        let layers = tempfile::tempdir().unwrap();
        let merged = layers.path().join("merged");
        let host_text = format!(
            "22 1 254:0 / / rw - ext4 /dev/vda rw\n\
             800 22 0:61 / {} rw,relatime - fuse.fuse-overlayfs fuse-overlayfs rw,user_id=0,group_id=0\n",
            merged.display()
        );
        let host = parse_mountinfo(&host_text).unwrap();
        let dev = std::fs::metadata(layers.path()).unwrap().dev();
        if major(dev) == 0 {
            eprintln!("skipped: the temp dir is not on a block device here");
            return;
        }
        assert_eq!(
            backing_device(root, &host).unwrap(),
            (major(dev) as u32, minor(dev) as u32)
        );
        assert!(
            backing_device(root, &[]).is_err(),
            "without the host's view it cannot know"
        );
    }

    #[test]
    fn partitions_map_to_their_disk() {
        // A sysfs-shaped tree: /sys/dev/block/8:1 -> ../../block/sda/sda1.
        let sys = tempfile::tempdir().unwrap();
        let disk = sys.path().join("block/sda");
        std::fs::create_dir_all(disk.join("sda1")).unwrap();
        std::fs::write(disk.join("dev"), "8:0\n").unwrap();
        std::fs::write(disk.join("sda1/dev"), "8:1\n").unwrap();
        std::fs::write(disk.join("sda1/partition"), "1\n").unwrap();
        std::fs::create_dir_all(sys.path().join("dev/block")).unwrap();
        std::os::unix::fs::symlink("../../block/sda/sda1", sys.path().join("dev/block/8:1"))
            .unwrap();
        std::os::unix::fs::symlink("../../block/sda", sys.path().join("dev/block/8:0")).unwrap();
        assert_eq!(whole_disk(sys.path(), (8, 1)).unwrap(), (8, 0));
        assert_eq!(whole_disk(sys.path(), (8, 0)).unwrap(), (8, 0));
        assert!(whole_disk(sys.path(), (9, 9)).is_err());
    }

    #[test]
    fn our_own_root_device_is_a_real_disk() {
        match root_device_of_pid(std::process::id()) {
            Ok(device) => {
                assert!(
                    super::super::layout::parse_dev(&device).is_some(),
                    "{device}"
                );
                assert!(Path::new(&format!("/sys/dev/block/{device}")).exists());
            }
            // A root on tmpfs or similar (some CI sandboxes) has no device: say why.
            Err(why) => assert!(why.contains("block device"), "{why}"),
        }
    }
}
