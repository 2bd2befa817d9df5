//! Is anybody using a block device? Checked before a non-forced close removes the device,
//! which must then fail with `EBUSY` and leave the device working.
//!
//! Three signs of use, any one suffices:
//! 1. an exclusive open (`O_EXCL`) fails with `EBUSY`: a mounted file system, a swap area or
//!    another exclusive claimer;
//! 2. `/sys/class/block/<name>/holders/` is not empty: device-mapper, md and the like;
//! 3. a process other than this one has the device open: a `/proc/<pid>/fd/*` link resolves to
//!    a block device with the same device number.
//!
//! The check is a snapshot: a process may open the device right after it. That race exists
//! for blktap2's REMOVE_DEVICE too; the point is to refuse while a user is visibly there.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Who holds a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// An exclusive claim (mount, swap, ...).
    Exclusive,
    /// Kernel holders listed in sysfs.
    Stacked(Vec<String>),
    /// Processes with an open file descriptor.
    Processes(Vec<u32>),
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exclusive => f.write_str("claimed exclusively (mounted?)"),
            Self::Stacked(names) => write!(f, "held by {}", names.join(", ")),
            Self::Processes(pids) => {
                let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
                write!(f, "open in process {}", pids.join(", "))
            }
        }
    }
}

/// The first sign of use of block device `node` (sysfs name `name`), or `None` when it is free.
pub fn find_holder(node: &Path, name: &str) -> io::Result<Option<Holder>> {
    let rdev = match std::fs::metadata(node) {
        Ok(meta) if meta.file_type().is_block_device() => meta.rdev(),
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a block device", node.display()),
            ))
        }
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", node.display()))),
    };
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(node)
    {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(Some(Holder::Exclusive)),
        // Other failures (e.g. the device is going away) say nothing about holders.
        _ => {}
    }
    let stacked = sysfs_holders(&Path::new("/sys/class/block").join(name).join("holders"));
    if !stacked.is_empty() {
        return Ok(Some(Holder::Stacked(stacked)));
    }
    let pids = processes_holding(Path::new("/proc"), rdev, std::process::id());
    if !pids.is_empty() {
        return Ok(Some(Holder::Processes(pids)));
    }
    Ok(None)
}

/// Entries of a sysfs `holders` directory (none when it cannot be read).
pub fn sysfs_holders(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Pids (other than `own_pid`) under `proc_root` with a file descriptor open on the block
/// device numbered `rdev`, sorted. Processes that vanish or cannot be inspected are skipped.
pub fn processes_holding(proc_root: &Path, rdev: u64, own_pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != own_pid)
        .filter(|pid| {
            let Ok(fds) = std::fs::read_dir(proc_root.join(pid.to_string()).join("fd")) else {
                return false;
            };
            fds.flatten().any(|fd| {
                std::fs::metadata(fd.path())
                    .is_ok_and(|meta| meta.file_type().is_block_device() && meta.rdev() == rdev)
            })
        })
        .collect();
    pids.sort_unstable();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Some block device of this machine, if it has any.
    fn a_block_device() -> Option<(std::path::PathBuf, u64)> {
        std::fs::read_dir("/dev").ok()?.flatten().find_map(|entry| {
            let meta = std::fs::metadata(entry.path()).ok()?;
            meta.file_type()
                .is_block_device()
                .then(|| (entry.path(), meta.rdev()))
        })
    }

    #[test]
    fn fake_proc_tree() {
        let root = tempfile::tempdir().unwrap();
        let make = |pid: &str, target: &Path| {
            let fd_dir = root.path().join(pid).join("fd");
            std::fs::create_dir_all(&fd_dir).unwrap();
            std::os::unix::fs::symlink(target, fd_dir.join("3")).unwrap();
        };
        make("100", Path::new("/dev/null"));
        make("self", Path::new("/dev/null"));
        make("101", Path::new("/nonexistent/target"));
        std::fs::create_dir_all(root.path().join("102")).unwrap(); // no fd dir
        let Some((device, rdev)) = a_block_device() else {
            assert!(processes_holding(root.path(), 0, 1).is_empty());
            return;
        };
        make("200", &device);
        make("300", &device);
        assert_eq!(processes_holding(root.path(), rdev, 1), vec![200, 300]);
        // Our own pid is never reported.
        assert_eq!(processes_holding(root.path(), rdev, 200), vec![300]);
        // Another device number matches nothing.
        assert!(processes_holding(root.path(), rdev.wrapping_add(1), 1).is_empty());
    }

    #[test]
    fn holders_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(sysfs_holders(dir.path()).is_empty());
        assert!(sysfs_holders(&dir.path().join("missing")).is_empty());
        std::fs::write(dir.path().join("dm-1"), "").unwrap();
        std::fs::write(dir.path().join("dm-0"), "").unwrap();
        assert_eq!(sysfs_holders(dir.path()), vec!["dm-0", "dm-1"]);
    }

    #[test]
    fn not_a_block_device_is_an_error() {
        let error = find_holder(Path::new("/dev/null"), "null").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        let error = find_holder(Path::new("/nonexistent/dev"), "x").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn holder_messages() {
        assert_eq!(
            Holder::Processes(vec![7, 9]).to_string(),
            "open in process 7, 9"
        );
        assert_eq!(
            Holder::Stacked(vec!["dm-0".into()]).to_string(),
            "held by dm-0"
        );
    }
}
