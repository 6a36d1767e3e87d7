//! Disk fill: one file on the target's own filesystem, reached through `/proc/<pid>/root`.

use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use faultline_domain::fault::FillAmount;
use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::sys::statvfs::statvfs;

use super::StressError;

/// Usage of the filesystem holding `dir`, as `df` computes it: used / (used + available to
/// unprivileged users), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub used: u64,
    pub available: u64,
}

impl Usage {
    pub fn of(dir: &Path) -> Result<Self, StressError> {
        let stat = statvfs(dir).map_err(|errno| StressError::Io {
            op: "statvfs",
            path: dir.to_path_buf(),
            source: errno.into(),
        })?;
        let fragment = stat.fragment_size();
        let used = (stat.blocks() - stat.blocks_free()) * fragment;
        let available = stat.blocks_available() * fragment;
        Ok(Self { used, available })
    }

    /// Percent used, `df`-style.
    pub fn percent(&self) -> f64 {
        let size = self.used + self.available;
        if size == 0 {
            0.0
        } else {
            self.used as f64 * 100.0 / size as f64
        }
    }

    /// Bytes to add to reach `amount`.
    pub fn to_fill(&self, amount: FillAmount) -> u64 {
        match amount {
            FillAmount::Bytes(bytes) => bytes,
            FillAmount::Percent(percent) => {
                let size = u128::from(self.used + self.available);
                let target = (size * u128::from(percent.min(100))).div_ceil(100);
                u64::try_from(target)
                    .unwrap_or(u64::MAX)
                    .saturating_sub(self.used)
            }
        }
    }
}

/// Creates `file` (never through a symlink, never over an existing file) and makes it take
/// `amount`: `fallocate` first, writing zeros where that is unsupported; when the disk has less
/// room than asked, it fills what there is. Returns the bytes the file holds.
pub fn fill(file: &Path, amount: FillAmount) -> Result<u64, StressError> {
    let dir = file.parent().unwrap_or(Path::new("/"));
    let want = Usage::of(dir)?.to_fill(amount);
    let io = |op: &'static str| {
        move |source: std::io::Error| StressError::Io {
            op,
            path: file.to_path_buf(),
            source,
        }
    };
    let mut handle = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(file)
        .map_err(io("creating"))?;
    if want == 0 {
        return Ok(0);
    }
    let length = libc::off_t::try_from(want).unwrap_or(libc::off_t::MAX);
    match fallocate(&handle, FallocateFlags::empty(), 0, length) {
        Ok(()) => return Ok(want),
        // No fallocate here (some filesystems), or not that much room: write what fits.
        Err(Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::ENOSPC | Errno::EFBIG) => {}
        Err(errno) => return Err(io("fallocate")(errno.into())),
    }
    let block = vec![0u8; 1 << 20];
    let mut written = 0u64;
    while written < want {
        let size = (want - written).min(block.len() as u64) as usize;
        match handle.write(&block[..size]) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(err) => return Err(io("writing")(err)),
        }
    }
    // Data on disk, not only in the page cache, so the space is really taken.
    let _ = handle.sync_data();
    Ok(handle
        .metadata()
        .map(|meta| meta.blocks() * 512)
        .unwrap_or(written)
        .max(written))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_targets_count_from_what_is_used() {
        let usage = Usage {
            used: 20,
            available: 80,
        };
        assert_eq!(usage.to_fill(FillAmount::Percent(50)), 30);
        assert_eq!(usage.to_fill(FillAmount::Percent(10)), 0, "already fuller");
        assert_eq!(usage.to_fill(FillAmount::Percent(100)), 80);
        assert_eq!(usage.to_fill(FillAmount::Bytes(7)), 7);
        assert!((usage.percent() - 20.0).abs() < 1e-9);
    }

    #[test]
    fn a_file_of_the_asked_size_is_created_and_never_over_an_existing_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".faultline-fill-t");
        assert_eq!(fill(&file, FillAmount::Bytes(1 << 20)).unwrap(), 1 << 20);
        assert!(std::fs::metadata(&file).unwrap().blocks() * 512 >= 1 << 20);
        assert!(fill(&file, FillAmount::Bytes(1)).is_err());
        let link = dir.path().join(".faultline-fill-l");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
        assert!(
            fill(&link, FillAmount::Bytes(1)).is_err(),
            "symlinks are not followed"
        );
        assert!(!dir.path().join("elsewhere").exists());
    }
}
