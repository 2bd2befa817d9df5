//! Who holds a block device: processes with it open (`/proc/<pid>/fd`) and kernel holders
//! (`/sys/block/<dev>/holders`: device-mapper, md). Mounts and other exclusive users are found
//! by the caller's `O_EXCL` open, which the kernel refuses while they hold it.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// A process holding the device open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opener {
    /// Its pid.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub command: String,
}

impl std::fmt::Display for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "process {} ({})", self.pid, self.command)
    }
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

/// Processes other than `except_pid` with an open descriptor of block device `rdev`.
pub fn openers(rdev: u64, except_pid: u32) -> Vec<Opener> {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for process in processes.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == except_pid {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        if fds.flatten().any(|fd| refers_to(&fd.path(), rdev)) {
            let command = std::fs::read_to_string(process.path().join("comm"))
                .map(|comm| comm.trim_end().to_owned())
                .unwrap_or_default();
            found.push(Opener { pid, command });
        }
    }
    found
}

/// True while process `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_process_holding_a_device_open() {
        // /dev/null is a character device: never reported as a block-device opener.
        let null = std::fs::File::open("/dev/null").unwrap();
        let rdev = null.metadata().unwrap().rdev();
        assert!(openers(rdev, 0).iter().all(|o| o.pid != std::process::id()));
        drop(null);
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }
}
