//! Process plumbing: forking into the background (the `unsafe` part), telling whether
//! another process is still alive, and the open file limit.
//!
//! The daemon's other `unsafe` code is just as confined: `engine::uring` and
//! `engine::mapped` (memory the kernel reads or fills), and the ublk and loop device
//! plumbing in `frontend` (see ARCHITECTURE.md).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

/// Raises the soft limit on open files to the hard limit (a daemon serving many clients
/// should not stop at a login shell's 1024); returns the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!("cannot raise the open file limit: {e}");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The daemon side of a fork: report readiness (or failure) to the waiting parent through it.
#[derive(Debug)]
pub struct ReadyPipe {
    pipe: File,
}

impl ReadyPipe {
    /// Tells the parent to exit with `status` (0 = ready) and closes the pipe.
    pub fn report(self, status: i32) {
        let mut pipe = self.pipe;
        // If the parent is gone there is nobody left to tell.
        let _ = pipe.write_all(&status.to_le_bytes());
    }
}

/// Forks. The parent waits until the child reports through its [`ReadyPipe`] and exits with
/// the reported status (`EIO` if the child died first); only the child returns.
///
/// Must be called before any thread is started.
pub fn daemonize() -> io::Result<ReadyPipe> {
    let (read_end, write_end): (OwnedFd, OwnedFd) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(io::Error::from)?;
    // SAFETY: the process is still single-threaded here (main calls this before building the
    // tokio runtime or spawning anything), so the child gets a consistent copy of all state and
    // may keep running ordinary Rust code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(read_end);
            rustix::process::setsid().map_err(io::Error::from)?;
            Ok(ReadyPipe {
                pipe: File::from(write_end),
            })
        }
        _ => {
            drop(write_end);
            let mut status = [0u8; 4];
            let code = match File::from(read_end).read_exact(&mut status) {
                Ok(()) => i32::from_le_bytes(status),
                Err(_) => libc::EIO,
            };
            std::process::exit(code);
        }
    }
}

/// True while process `pid` exists and is not a zombie (`/proc/<pid>/stat`); never for a pid
/// of 0 or below (the ublk driver reports `-1` for a device nobody serves).
pub fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
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
    fn process_liveness() {
        assert!(process_alive(i32::try_from(std::process::id()).unwrap()));
        assert!(!process_alive(0));
        assert!(!process_alive(-1));
        assert!(!process_alive(i32::MAX));
    }
}
