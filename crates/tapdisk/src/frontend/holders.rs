//! Is anybody using a kernel block device of ours? Asked before a non-forced close removes
//! one, which must then fail with `EBUSY` and leave the device working (ublk and FUSE + loop
//! alike, and any later kernel-device frontend).
//!
//! Four signs of use, any one suffices:
//! 1. `/sys/dev/block/<major>:<minor>/holders/` is not empty: device-mapper, md and the like;
//! 2. Xen's blkback serves it to a guest (`xl` disk `phy:/dev/ublkbN`): blkback opens the
//!    device inside the kernel without claiming it, so only its sysfs attribute
//!    `/sys/bus/xen-backend/devices/vbd-<domid>-<devid>/physical_device` ("major:minor" in
//!    hex) tells. (Removing a ublk device blkback still has open would wait for its close
//!    forever.)
//! 3. an exclusive open (`O_EXCL`) fails with `EBUSY`: a mounted file system, a swap area or
//!    another exclusive claimer;
//! 4. a process other than this one has the device open: a `/proc/<pid>/fd/*` link into
//!    `/dev/` resolves to a block device with the same device number.
//!
//! The check is a snapshot: a process may open the device right after it. [`claim`] narrows
//! that window by keeping the exclusive descriptor it opened, which keeps new mounts out until
//! it is closed. The race exists for blktap2's REMOVE_DEVICE too; the point is to refuse while
//! a user is visibly there.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A process holding a device open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opener {
    /// Its pid.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`; empty when it could not be read).
    pub command: String,
}

impl std::fmt::Display for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.command.is_empty() {
            write!(f, "process {}", self.pid)
        } else {
            write!(f, "process {} ({})", self.pid, self.command)
        }
    }
}

/// Who holds a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Kernel holders listed in sysfs (device-mapper, md, ...).
    Stacked(Vec<String>),
    /// An exclusive claim (mount, swap, ...).
    Exclusive,
    /// Processes with an open file descriptor.
    Processes(Vec<Opener>),
    /// Xen block back-ends serving it to guests (`vbd-<domid>-<devid>`).
    XenGuests(Vec<String>),
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stacked(names) => write!(f, "held by {}", names.join(", ")),
            Self::Exclusive => f.write_str("claimed exclusively (mounted?)"),
            Self::Processes(openers) => {
                let list: Vec<String> = openers.iter().map(ToString::to_string).collect();
                write!(f, "open in {}", list.join(", "))
            }
            Self::XenGuests(names) => write!(f, "served to a Xen guest by {}", names.join(", ")),
        }
    }
}

/// The device number of block device `node`; `InvalidInput` for anything else.
fn block_device_number(node: &Path) -> io::Result<u64> {
    match std::fs::metadata(node) {
        Ok(meta) if meta.file_type().is_block_device() => Ok(meta.rdev()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a block device", node.display()),
        )),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", node.display()))),
    }
}

/// The sysfs `holders` directory of the block device numbered `rdev`.
fn holders_dir(rdev: u64) -> PathBuf {
    PathBuf::from(format!(
        "/sys/dev/block/{}:{}/holders",
        rustix::fs::major(rdev),
        rustix::fs::minor(rdev)
    ))
}

/// Opens `node` with `O_EXCL` (no other exclusive user may exist, none may come while open).
fn open_exclusive(node: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(node)
}

/// Where Linux lists Xen back-end devices (blkback's `vbd-<domid>-<devid>`).
const XEN_BACKEND_DEVICES: &str = "/sys/bus/xen-backend/devices";

/// Kernel holders of the block device numbered `rdev`: stacked devices, then Xen guests.
fn kernel_holders(rdev: u64) -> Option<Holder> {
    let stacked = sysfs_holders(&holders_dir(rdev));
    if !stacked.is_empty() {
        return Some(Holder::Stacked(stacked));
    }
    let guests = xen_backends_serving(Path::new(XEN_BACKEND_DEVICES), rdev);
    (!guests.is_empty()).then_some(Holder::XenGuests(guests))
}

/// Xen block back-ends under `devices` (sysfs `xen-backend` devices) whose
/// `physical_device` ("major:minor", hex) is `rdev`, sorted (none when it cannot be read).
pub fn xen_backends_serving(devices: &Path, rdev: u64) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(devices) else {
        return Vec::new();
    };
    let wanted = format!(
        "{:x}:{:x}",
        rustix::fs::major(rdev),
        rustix::fs::minor(rdev)
    );
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|entry| {
            std::fs::read_to_string(entry.path().join("physical_device"))
                .is_ok_and(|text| text.trim() == wanted)
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Other processes with the block device numbered `rdev` open.
fn other_openers(rdev: u64) -> Option<Holder> {
    let openers = processes_holding(Path::new("/proc"), rdev, std::process::id());
    (!openers.is_empty()).then_some(Holder::Processes(openers))
}

/// The first sign of use of block device `node`, or `None` when it is free. An exclusive
/// open that fails for another reason than `EBUSY` (the device going away) says nothing
/// about holders and is not an error.
pub fn find_holder(node: &Path) -> io::Result<Option<Holder>> {
    let rdev = block_device_number(node)?;
    if let Some(holder) = kernel_holders(rdev) {
        return Ok(Some(holder));
    }
    if let Err(e) = open_exclusive(node) {
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Ok(Some(Holder::Exclusive));
        }
    }
    Ok(other_openers(rdev))
}

/// Claims block device `node` for its removal: `Ok(Ok(file))` when nothing holds it, with
/// `file` opened `O_EXCL` (keep it while removing the device, so nothing mounts it
/// meanwhile); `Ok(Err(holder))` when something does. Errors are those of opening it.
pub fn claim(node: &Path) -> io::Result<Result<File, Holder>> {
    let rdev = block_device_number(node)?;
    if let Some(holder) = kernel_holders(rdev) {
        return Ok(Err(holder));
    }
    let file = match open_exclusive(node) {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(Err(Holder::Exclusive)),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", node.display()))),
    };
    match other_openers(rdev) {
        Some(holder) => Ok(Err(holder)),
        None => Ok(Ok(file)),
    }
}

/// Entries of a sysfs `holders` directory, sorted (none when it cannot be read).
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

/// True when descriptor link `fd` (under `/proc/<pid>/fd`) refers to block device `rdev`.
/// Only links into `/dev/` are examined: `stat` on a file of some other (maybe hung) FUSE
/// filesystem could block.
fn refers_to(fd: &Path, rdev: u64) -> bool {
    let Ok(target) = std::fs::read_link(fd) else {
        return false;
    };
    if !target.starts_with("/dev/") {
        return false;
    }
    std::fs::metadata(fd)
        .is_ok_and(|meta| meta.file_type().is_block_device() && meta.rdev() == rdev)
}

/// Processes under `proc_root` other than `own_pid` with a file descriptor open on the block
/// device numbered `rdev`, by pid. Processes that vanish or cannot be inspected are skipped.
pub fn processes_holding(proc_root: &Path, rdev: u64, own_pid: u32) -> Vec<Opener> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut openers: Vec<Opener> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != own_pid)
        .filter_map(|pid| {
            let process = proc_root.join(pid.to_string());
            let fds = std::fs::read_dir(process.join("fd")).ok()?;
            if !fds.flatten().any(|fd| refers_to(&fd.path(), rdev)) {
                return None;
            }
            let command = std::fs::read_to_string(process.join("comm"))
                .map(|comm| comm.trim_end().to_owned())
                .unwrap_or_default();
            Some(Opener { pid, command })
        })
        .collect();
    openers.sort_unstable_by_key(|opener| opener.pid);
    openers
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block device of this machine reachable under `/dev/`, if it has any.
    fn a_block_device() -> Option<(PathBuf, u64)> {
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
        let make = |pid: &str, target: &Path, comm: Option<&str>| {
            let fd_dir = root.path().join(pid).join("fd");
            std::fs::create_dir_all(&fd_dir).unwrap();
            std::os::unix::fs::symlink(target, fd_dir.join("3")).unwrap();
            if let Some(comm) = comm {
                std::fs::write(root.path().join(pid).join("comm"), format!("{comm}\n")).unwrap();
            }
        };
        make("100", Path::new("/dev/null"), None);
        make("self", Path::new("/dev/null"), None);
        make("101", Path::new("/nonexistent/target"), None);
        std::fs::create_dir_all(root.path().join("102")).unwrap(); // no fd dir
        let Some((device, rdev)) = a_block_device() else {
            assert!(processes_holding(root.path(), 0, 1).is_empty());
            return;
        };
        make("300", &device, None);
        make("200", &device, Some("mount"));
        let found = processes_holding(root.path(), rdev, 1);
        assert_eq!(
            found,
            vec![
                Opener {
                    pid: 200,
                    command: "mount".into()
                },
                Opener {
                    pid: 300,
                    command: String::new()
                }
            ]
        );
        // Our own pid is never reported.
        let pids: Vec<u32> = processes_holding(root.path(), rdev, 200)
            .iter()
            .map(|o| o.pid)
            .collect();
        assert_eq!(pids, vec![300]);
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
        assert_eq!(
            holders_dir(rustix::fs::makedev(259, 3)),
            Path::new("/sys/dev/block/259:3/holders")
        );
    }

    #[test]
    fn xen_blkback_devices() {
        let dir = tempfile::tempdir().unwrap();
        assert!(xen_backends_serving(&dir.path().join("missing"), 0).is_empty());
        for (name, device) in [
            ("vbd-3-51712", "103:2\n"),
            ("vbd-4-51712", "103:20\n"),
            ("vif-3-0", ""),
        ] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            if !device.is_empty() {
                std::fs::write(dir.path().join(name).join("physical_device"), device).unwrap();
            }
        }
        let rdev = rustix::fs::makedev(0x103, 2);
        assert_eq!(xen_backends_serving(dir.path(), rdev), vec!["vbd-3-51712"]);
        assert_eq!(
            Holder::XenGuests(vec!["vbd-3-51712".into()]).to_string(),
            "served to a Xen guest by vbd-3-51712"
        );
    }

    #[test]
    fn not_a_block_device_is_an_error() {
        let error = find_holder(Path::new("/dev/null")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        let error = claim(Path::new("/dev/null")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        let error = find_holder(Path::new("/nonexistent/dev")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn holder_messages() {
        let openers = vec![
            Opener {
                pid: 7,
                command: "fio".into(),
            },
            Opener {
                pid: 9,
                command: String::new(),
            },
        ];
        assert_eq!(
            Holder::Processes(openers).to_string(),
            "open in process 7 (fio), process 9"
        );
        assert_eq!(
            Holder::Stacked(vec!["dm-0".into()]).to_string(),
            "held by dm-0"
        );
    }
}
