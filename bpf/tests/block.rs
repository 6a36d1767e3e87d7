//! Block IO attribution: `dd` writes a known amount with O_DIRECT (so the writes reach the
//! device from dd itself, not later from writeback) from a scratch cgroup of the io/blkio
//! hierarchy; the block aggregates of that cgroup must count at least those bytes, on the
//! device the file lives on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::ScratchCgroup;
use faultline_bpf::Group;

#[test]
fn direct_writes_are_counted_for_the_writing_cgroup_and_device() {
    if !common::bpf_available() {
        return;
    }
    let mut t = common::load(&[Group::Block]);
    let cg = ScratchCgroup::new(t.hierarchy(Group::Block).unwrap(), "block");
    t.set_scope(&[&cg.path]).unwrap();
    // Let requests issued before the scope was set complete.
    std::thread::sleep(Duration::from_millis(200));
    let before = t.snapshot().unwrap();
    // On the disk the build lives on (not a tmpfs /tmp).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = dir.path().join("data");
    let (mib, count) = (1u64 << 20, 8u64);

    let child = cg.spawn(&format!(
        "exec dd if=/dev/zero of={} bs={mib} count={count} oflag=direct status=none",
        file.display()
    ));
    let (status, stderr) = common::wait(child, Duration::from_secs(60));
    if !status.success() && stderr.contains("Invalid argument") {
        eprintln!(
            "SKIPPED: O_DIRECT is not supported under {}: {stderr}",
            dir.path().display()
        );
        return;
    }
    assert!(status.success(), "dd failed: {stderr}");
    let dev = std::fs::metadata(&file).unwrap().dev();
    let device = (
        nix::sys::stat::major(dev) as u32,
        nix::sys::stat::minor(dev) as u32,
    );
    if device.0 == 0 {
        eprintln!("SKIPPED: {} is not on a block device", dir.path().display());
        return;
    }

    let snap = t.snapshot().unwrap();
    let rows: Vec<_> = snap.block_for(cg.id).collect();
    println!("device {device:?}: {rows:#?}");
    let row = rows
        .iter()
        .find(|r| r.device == device)
        .unwrap_or_else(|| panic!("no row for {device:?}: {:#?}", snap.block));
    assert!(row.write_bytes >= mib * count, "{row:?}");
    assert!(row.write_ops >= 1);
    assert_eq!(row.errors, 0);
    assert_eq!(
        row.latency.count,
        row.read_ops + row.write_ops + row.other_ops
    );
    assert!(row.latency.p50().is_some());
    // The scope filter kept everything else out: only this cgroup's rows changed.
    for now in &snap.block {
        let then = before
            .block
            .iter()
            .find(|b| b.cgroup_id == now.cgroup_id && b.device == now.device);
        let changed = then.is_none_or(|then| now.since(then).latency.count > 0);
        assert!(
            !changed || now.cgroup_id == cg.id,
            "out-of-scope row changed: {now:?}"
        );
    }
}
