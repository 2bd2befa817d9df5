//! Who holds a minor: the marker file's lock and the pid recorded in it.
//!
//! A tapdisk that attaches minor N takes an exclusive `flock` on `<ctl dir>/tapdisk/tapdisk-N`
//! (as the C tapdisk does) and, beyond the C stack, writes its pid into the file; an orderly
//! detach or exit empties the file again before the lock goes. So a marker is in one of
//! three states, told apart by facts the kernel keeps, never by timing:
//!
//! * **held**: locked; the lock's owner (from `/proc/locks`) is the tapdisk serving it;
//! * **allocated**: unlocked and empty: handed out by `allocate`, not (or no longer) attached;
//! * **stale**: unlocked but naming a pid: the tapdisk that attached it ended without
//!   detaching (`kill -9`, a crash). The lock is the proof: the kernel drops it only when
//!   the last descriptor of the locking process closes.
//!
//! Markers written by the C tapdisk stay empty, so they are never taken for stale.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

/// The lock a tapdisk holds on the marker of a minor it attached. Dropping it empties the
/// marker (an orderly detach or exit) and releases the lock; a process that dies without
/// dropping it leaves its pid behind, which is how a stale marker is recognised.
#[derive(Debug)]
pub struct MarkerLock {
    file: File,
}

impl MarkerLock {
    /// Opens and locks `path` (without waiting) and records `pid` in it. `EBUSY` when
    /// another process holds the lock; the marker must exist (`ENOENT` otherwise).
    pub fn acquire(path: &Path, pid: u32) -> io::Result<Self> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(|e| {
            if e == rustix::io::Errno::WOULDBLOCK {
                io::Error::from_raw_os_error(libc::EBUSY)
            } else {
                io::Error::from(e)
            }
        })?;
        file.set_len(0)?;
        file.write_all(format!("{pid}\n").as_bytes())?;
        Ok(Self { file })
    }
}

impl Drop for MarkerLock {
    fn drop(&mut self) {
        // Released in order: not stale. (Failing to empty it only makes the marker look
        // stale to the next `allocate`, which then frees it, as `free` would.)
        let _ = self.file.set_len(0);
    }
}

/// The pid a tapdisk recorded in the marker at `path` when it attached; `None` for an empty
/// (or unreadable, or foreign) marker.
pub fn recorded_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The `flock` locks of the system, from `/proc/locks`: which process holds a lock on which
/// file. Read once, looked up per marker, so `tap-ctl list` never takes a marker's lock
/// itself (a tapdisk attaching at that moment would find it busy).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlockHolders {
    /// `(device major, device minor, inode)` -> pid.
    holders: HashMap<(u32, u32, u64), u32>,
}

impl FlockHolders {
    /// Reads `/proc/locks`; `None` when it cannot be read (then nobody can tell who holds
    /// what, and callers must not conclude a marker is stale).
    pub fn read() -> Option<Self> {
        std::fs::read_to_string("/proc/locks")
            .ok()
            .map(|text| Self::parse(&text))
    }

    /// Parses the text of `/proc/locks`: lines like
    /// `1: FLOCK  ADVISORY  WRITE 4242 00:1a:1234 0 EOF` (`->` lines are waiters, skipped).
    pub fn parse(text: &str) -> Self {
        let mut holders = HashMap::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 6 || fields[1] != "FLOCK" {
                continue;
            }
            let (Ok(pid), Some(key)) = (fields[4].parse::<u32>(), parse_inode(fields[5])) else {
                continue;
            };
            holders.insert(key, pid);
        }
        Self { holders }
    }

    /// The pid holding a `flock` on the file at `path`, if any.
    pub fn holder(&self, path: &Path) -> Option<u32> {
        let meta = std::fs::metadata(path).ok()?;
        let dev = meta.dev();
        let key = (rustix::fs::major(dev), rustix::fs::minor(dev), meta.ino());
        self.holders.get(&key).copied()
    }
}

/// `MAJOR:MINOR:INODE` (device numbers in hex, inode in decimal).
fn parse_inode(field: &str) -> Option<(u32, u32, u64)> {
    let mut parts = field.split(':');
    let major = u32::from_str_radix(parts.next()?, 16).ok()?;
    let minor = u32::from_str_radix(parts.next()?, 16).ok()?;
    let inode = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((major, minor, inode))
}

/// The paths of the UNIX sockets someone listens on, from `/proc/net/unix` (lines with the
/// accepting flag `0x10000`); `None` when it cannot be read. Reading it asks no process
/// anything, unlike a trial `connect` (which a live tapdisk would have to accept and drop).
pub fn listening_unix_sockets() -> Option<HashSet<PathBuf>> {
    let text = std::fs::read_to_string("/proc/net/unix").ok()?;
    Some(parse_listening_sockets(&text))
}

/// Parses the text of `/proc/net/unix`:
/// `Num RefCount Protocol Flags Type St Inode Path`, the path (if any) last.
fn parse_listening_sockets(text: &str) -> HashSet<PathBuf> {
    const ACCEPTING: u32 = 0x0001_0000;
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.splitn(8, ' ').filter(|f| !f.is_empty());
            let flags = u32::from_str_radix(fields.nth(3)?, 16).ok()?;
            let path = line.split_whitespace().nth(7)?;
            (flags & ACCEPTING != 0).then(|| PathBuf::from(path))
        })
        .collect()
}

/// True unless process `pid` is known to be gone: `kill(pid, 0)` fails with `ESRCH`, or it
/// is a zombie (dead, waiting for its parent to reap it).
pub fn process_exists(pid: u32) -> bool {
    let Some(raw) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    if rustix::process::test_kill_process(raw) == Err(rustix::io::Errno::SRCH) {
        return false;
    }
    // `/proc/<pid>/stat` is `pid (comm) STATE ...`; comm may hold anything but the last `)`.
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            Some(rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    !zombie
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_map_inodes_to_pids() {
        let text = "1: FLOCK  ADVISORY  WRITE 4242 00:1a:1234 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 77 00:1a:1234 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 99 08:01:55 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 17 103:02:987654 0 EOF\n\
                    garbage\n";
        let locks = FlockHolders::parse(text);
        assert_eq!(locks.holders.len(), 2);
        assert_eq!(locks.holders.get(&(0, 0x1a, 1234)), Some(&4242));
        assert_eq!(locks.holders.get(&(0x103, 2, 987_654)), Some(&17));
    }

    #[test]
    fn a_lock_records_its_pid_and_an_orderly_release_empties_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tapdisk-3");
        std::fs::write(&path, b"").unwrap();
        assert_eq!(recorded_pid(&path), None);
        let lock = MarkerLock::acquire(&path, 4242).unwrap();
        assert_eq!(recorded_pid(&path), Some(4242));
        let busy = MarkerLock::acquire(&path, 1).unwrap_err();
        assert_eq!(busy.raw_os_error(), Some(libc::EBUSY));
        if let Some(locks) = FlockHolders::read() {
            assert_eq!(locks.holder(&path), Some(std::process::id()));
        }
        drop(lock);
        assert_eq!(recorded_pid(&path), None);
        if let Some(locks) = FlockHolders::read() {
            assert_eq!(locks.holder(&path), None);
        }
        let missing = MarkerLock::acquire(&dir.path().join("tapdisk-4"), 1).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn listening_sockets_are_read_from_proc_net_unix() {
        let text = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            00000000f9d26242: 00000003 00000000 00000000 0001 03  1308\n\
            000000002929bb67: 00000002 00000000 00010000 0001 01 339329 /run/blktap-control/ctl42\n\
            000000002929bb68: 00000003 00000000 00000000 0001 03 339330 /run/blktap-control/nbd42.0\n";
        let listening = parse_listening_sockets(text);
        assert_eq!(
            listening,
            HashSet::from([PathBuf::from("/run/blktap-control/ctl42")])
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl1");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        if let Some(listening) = listening_unix_sockets() {
            assert!(listening.contains(&path));
            drop(listener);
            assert!(!listening_unix_sockets().unwrap().contains(&path));
        }
    }

    #[test]
    fn our_own_process_exists_and_a_reaped_child_does_not() {
        assert!(process_exists(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_exists(pid));
    }
}
