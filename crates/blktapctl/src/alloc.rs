//! Minor allocation with marker files (the v4 scheme, no kernel device).
//!
//! A minor is "allocated" while `<ctl dir>/tapdisk/tapdisk-<minor>` exists. Allocation holds an
//! exclusive `flock` on the marker directory while it picks the lowest missing number, so
//! concurrent `tap-ctl allocate` calls never hand out the same minor. A tapdisk that attached a
//! minor keeps an exclusive `flock` on its marker; `free` refuses to remove a marker it cannot
//! lock itself.
//!
//! Before picking a number, allocation reclaims what tapdisks that died attached (`kill -9`, a
//! crash) left behind ([`reclaim_stale`]): their markers (stale by the rule of
//! [`crate::marker`]: unlocked yet naming the tapdisk that attached them) and their sockets.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

use crate::error::{Error, Result};
use crate::marker::{listening_unix_sockets, process_exists, recorded_pid};
use crate::paths::{parse_marker_name, parse_socket_owner, ControlDir, MAX_MINOR};

/// Creates `<ctl dir>` (0755) and `<ctl dir>/tapdisk` (0700) if they are missing.
fn prepare_directories(dir: &ControlDir) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir.root())
        .map_err(|e| {
            Error::from_io(
                &e,
                format!("creating control directory {}", dir.root().display()),
            )
        })?;
    let markers = dir.marker_dir();
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&markers)
        .map_err(|e| {
            Error::from_io(
                &e,
                format!("creating marker directory {}", markers.display()),
            )
        })
}

/// Opens the marker directory and takes an exclusive (blocking) lock on it; the lock is
/// released when the returned file is dropped.
fn lock_marker_dir(markers: &Path) -> Result<File> {
    let handle = File::open(markers).map_err(|e| {
        Error::from_io(
            &e,
            format!("opening marker directory {}", markers.display()),
        )
    })?;
    flock(&handle, FlockOperation::LockExclusive).map_err(|e| {
        Error::from_errno(e, format!("locking marker directory {}", markers.display()))
    })?;
    Ok(handle)
}

/// Allocates the lowest free minor: creates its marker file (mode 0600) and returns
/// `(minor, marker path)`. Fails with `ENOSPC` when all of `0..=MAX_MINOR` are taken.
pub fn allocate(dir: &ControlDir) -> Result<(u32, PathBuf)> {
    prepare_directories(dir)?;
    let markers = dir.marker_dir();
    let _lock = lock_marker_dir(&markers)?;
    reclaim_stale(dir);

    let mut taken = vec![false; usize::try_from(MAX_MINOR).unwrap_or(usize::MAX) + 1];
    let entries = std::fs::read_dir(&markers).map_err(|e| {
        Error::from_io(
            &e,
            format!("reading marker directory {}", markers.display()),
        )
    })?;
    for entry in entries {
        let entry = entry.map_err(|e| {
            Error::from_io(
                &e,
                format!("reading marker directory {}", markers.display()),
            )
        })?;
        let minor = entry.file_name().to_str().and_then(parse_marker_name);
        if let Some(slot) = minor
            .and_then(|m| usize::try_from(m).ok())
            .and_then(|m| taken.get_mut(m))
        {
            *slot = true;
        }
    }

    for minor in 0..=MAX_MINOR {
        let index = usize::try_from(minor).unwrap_or(usize::MAX);
        if taken.get(index).copied().unwrap_or(true) {
            continue;
        }
        let path = dir.marker_path(minor);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(_) => return Ok((minor, path)),
            // Created by someone who does not take the directory lock: skip it.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Error::from_io(
                    &e,
                    format!("creating marker file {}", path.display()),
                ))
            }
        }
    }
    Err(Error::new(
        libc::ENOSPC,
        format!(
            "all minors 0..={MAX_MINOR} are allocated in {}",
            markers.display()
        ),
    ))
}

/// What [`reclaim_stale`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    /// Minors whose stale markers were removed.
    pub minors: Vec<u32>,
    /// Sockets of tapdisks that are gone.
    pub sockets: Vec<PathBuf>,
}

/// Removes what tapdisks that ended without detaching left in `dir` (best effort: what
/// cannot be removed stays for the next try). Callers hold the marker directory's lock.
///
/// * A marker is reclaimed when it names the tapdisk that attached it, no process holds its
///   lock (this function takes the lock itself before removing it, as `free` does), and no
///   ublk device of that minor waits for `tap-ctl recover` (`<ctl dir>/vbd-<minor>`).
/// * A tapdisk's sockets (`ctl<pid>`, `nbd*<pid>.<minor>`) are removed when process `pid`
///   no longer exists and nobody listens on its control socket (`/proc/net/unix`).
///
/// Empty markers (allocated and not yet attached, or written by the C tapdisk) are never
/// touched: only `free` removes those.
pub fn reclaim_stale(dir: &ControlDir) -> Reclaimed {
    let mut reclaimed = Reclaimed::default();
    for minor in allocated_minors(dir).unwrap_or_default() {
        let path = dir.marker_path(minor);
        if recorded_pid(&path).is_none() || dir.recovery_state_path(minor).exists() {
            continue;
        }
        let Ok(marker) = File::open(&path) else {
            continue;
        };
        if flock(&marker, FlockOperation::NonBlockingLockExclusive).is_err() {
            continue; // held: its tapdisk is alive
        }
        if std::fs::remove_file(&path).is_ok() {
            reclaimed.minors.push(minor);
        }
    }
    let (Ok(entries), Some(listening)) = (std::fs::read_dir(dir.root()), listening_unix_sockets())
    else {
        return reclaimed;
    };
    let mut sockets: Vec<(u32, PathBuf)> = entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().is_ok_and(|t| !t.is_dir()))
        .filter_map(|entry| {
            let owner = entry.file_name().to_str().and_then(parse_socket_owner)?;
            Some((owner, entry.path()))
        })
        .collect();
    sockets.sort();
    let mut gone: Option<(u32, bool)> = None;
    for (pid, path) in sockets {
        let is_gone = match gone {
            Some((known, verdict)) if known == pid => verdict,
            _ => {
                let verdict =
                    !process_exists(pid) && !listening.contains(&dir.ctl_socket_path(pid));
                gone = Some((pid, verdict));
                verdict
            }
        };
        if is_gone && std::fs::remove_file(&path).is_ok() {
            reclaimed.sockets.push(path);
        }
    }
    reclaimed
}

/// Frees `minor`: removes its marker file unless a tapdisk holds the marker's lock.
///
/// Errors: `ENOENT` when the marker does not exist; `EAGAIN` (= `EWOULDBLOCK`, what the C tool
/// returns) when the marker is locked, i.e. the minor is still attached to a tapdisk.
pub fn free(dir: &ControlDir, minor: u32) -> Result<()> {
    let markers = dir.marker_dir();
    let _lock = lock_marker_dir(&markers)?;
    let path = dir.marker_path(minor);
    let marker = File::open(&path).map_err(|e| {
        Error::from_io(
            &e,
            format!("opening marker file {} of minor {minor}", path.display()),
        )
    })?;
    flock(&marker, FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        let context = format!(
            "marker file {} of minor {minor} is locked by a tapdisk (still attached?)",
            path.display()
        );
        Error::from_errno(e, context)
    })?;
    std::fs::remove_file(&path).map_err(|e| {
        Error::from_io(
            &e,
            format!("removing marker file {} of minor {minor}", path.display()),
        )
    })
}

/// How long [`free_settling`] keeps retrying a marker that is still locked.
pub const FREE_SETTLE_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// [`free`], retrying for up to [`FREE_SETTLE_TIME`] while the marker is locked: used right
/// after a detach (or a kill), when the tapdisk may release its lock only as it exits.
pub fn free_settling(dir: &ControlDir, minor: u32) -> Result<()> {
    let deadline = std::time::Instant::now() + FREE_SETTLE_TIME;
    loop {
        match free(dir, minor) {
            Err(e) if e.errno() == libc::EAGAIN && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Minors that currently have a marker file, ascending. A missing directory means none.
pub fn allocated_minors(dir: &ControlDir) -> Result<Vec<u32>> {
    let markers = dir.marker_dir();
    let entries = match std::fs::read_dir(&markers) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::from_io(
                &e,
                format!("reading marker directory {}", markers.display()),
            ))
        }
    };
    let mut minors = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| {
            Error::from_io(
                &e,
                format!("reading marker directory {}", markers.display()),
            )
        })?;
        if let Some(minor) = entry.file_name().to_str().and_then(parse_marker_name) {
            minors.push(minor);
        }
    }
    minors.sort_unstable();
    Ok(minors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::os::unix::fs::PermissionsExt;

    fn temp_control_dir() -> (tempfile::TempDir, ControlDir) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = ControlDir::new(tmp.path().join("blktap-control"));
        (tmp, dir)
    }

    #[test]
    fn allocate_creates_directories_and_first_marker() {
        let (_tmp, dir) = temp_control_dir();
        let (minor, path) = allocate(&dir).expect("allocate");
        assert_eq!(minor, 0);
        assert_eq!(path, dir.marker_path(0));
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(
            mode(&path) & 0o077,
            0,
            "marker must not be group/other accessible"
        );
        assert_eq!(mode(&dir.marker_dir()) & 0o077, 0);
        assert!(dir.root().is_dir());
    }

    #[test]
    fn lowest_free_minor_is_reused() {
        let (_tmp, dir) = temp_control_dir();
        for expected in 0..4 {
            assert_eq!(allocate(&dir).expect("allocate").0, expected);
        }
        free(&dir, 1).expect("free 1");
        free(&dir, 2).expect("free 2");
        assert_eq!(allocate(&dir).expect("allocate").0, 1);
        assert_eq!(allocate(&dir).expect("allocate").0, 2);
        assert_eq!(allocate(&dir).expect("allocate").0, 4);
        assert_eq!(allocated_minors(&dir).expect("list"), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn unrelated_files_do_not_count_as_minors() {
        let (_tmp, dir) = temp_control_dir();
        std::fs::create_dir_all(dir.marker_dir()).expect("mkdir");
        for name in ["tapdisk-x", "other", "tapdisk-99999"] {
            std::fs::write(dir.marker_dir().join(name), b"").expect("write");
        }
        assert_eq!(allocate(&dir).expect("allocate").0, 0);
        assert_eq!(allocated_minors(&dir).expect("list"), vec![0]);
    }

    #[test]
    fn concurrent_allocations_get_distinct_minors() {
        let (_tmp, dir) = temp_control_dir();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    (0..8)
                        .map(|_| allocate(&dir).expect("allocate").0)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = BTreeSet::new();
        for handle in threads {
            for minor in handle.join().expect("thread") {
                assert!(all.insert(minor), "minor {minor} handed out twice");
            }
        }
        assert_eq!(all, (0..64).collect::<BTreeSet<u32>>());
    }

    #[test]
    fn free_of_missing_marker_is_enoent() {
        let (_tmp, dir) = temp_control_dir();
        allocate(&dir).expect("allocate");
        let err = free(&dir, 5).expect_err("no marker for 5");
        assert_eq!(err.errno(), libc::ENOENT);
        assert!(err.context().contains("tapdisk-5"), "{err}");
    }

    #[test]
    fn free_without_control_dir_is_enoent() {
        let (_tmp, dir) = temp_control_dir();
        assert_eq!(free(&dir, 0).expect_err("no dir").errno(), libc::ENOENT);
        assert_eq!(allocated_minors(&dir).expect("empty"), Vec::<u32>::new());
    }

    #[test]
    fn free_refuses_a_locked_marker() {
        let (_tmp, dir) = temp_control_dir();
        let (minor, path) = allocate(&dir).expect("allocate");
        // Stand in for a tapdisk that attached the minor.
        let holder = File::open(&path).expect("open marker");
        flock(&holder, FlockOperation::LockExclusive).expect("lock marker");
        let err = free(&dir, minor).expect_err("locked");
        assert_eq!(err.errno(), libc::EAGAIN);
        assert!(path.exists());
        drop(holder);
        free(&dir, minor).expect("free after unlock");
        assert!(!path.exists());
    }

    /// The pid of a process that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        pid
    }

    #[test]
    fn allocation_reclaims_what_dead_tapdisks_left_and_nothing_else() {
        let (_tmp, dir) = temp_control_dir();
        for _ in 0..5 {
            allocate(&dir).expect("allocate");
        }
        let dead = dead_pid();
        let alive = std::process::id();
        // 0: allocated, never attached (empty). 1: attached by a live process (us).
        // 2: attached by a dead tapdisk. 3: the same, but its ublk device awaits recovery.
        // 4: names a live pid but is unlocked (that process detached uncleanly): stale too.
        let held = crate::marker::MarkerLock::acquire(&dir.marker_path(1), alive).expect("lock");
        std::fs::write(dir.marker_path(2), format!("{dead}\n")).expect("write");
        std::fs::write(dir.marker_path(3), format!("{dead}\n")).expect("write");
        std::fs::write(dir.recovery_state_path(3), "state").expect("write");
        std::fs::write(dir.marker_path(4), format!("{alive}\n")).expect("write");
        // Sockets: the dead tapdisk's (nobody listens), and a live listener's.
        let dead_sockets: Vec<PathBuf> = [
            dir.ctl_socket_path(dead),
            dir.nbd_socket_path(dead, 2),
            dir.root().join(format!("nbd-old{dead}.2")),
            dir.root().join(format!("nbdserver-new{dead}.2")),
            dir.root().join(format!("nbdserver{dead}.2")),
        ]
        .into();
        for path in &dead_sockets {
            drop(std::os::unix::net::UnixListener::bind(path).expect("bind"));
        }
        let live =
            std::os::unix::net::UnixListener::bind(dir.ctl_socket_path(alive)).expect("bind");
        let _live_nbd =
            std::os::unix::net::UnixListener::bind(dir.nbd_socket_path(alive, 1)).expect("bind");

        let (minor, _) = allocate(&dir).expect("allocate");
        assert_eq!(minor, 2, "the stale minor is handed out again");
        assert_eq!(allocated_minors(&dir).expect("list"), vec![0, 1, 2, 3]);
        assert_eq!(allocate(&dir).expect("allocate").0, 4);
        for path in &dead_sockets {
            assert!(!path.exists(), "{} reclaimed", path.display());
        }
        assert!(dir.ctl_socket_path(alive).exists());
        assert!(dir.nbd_socket_path(alive, 1).exists());
        assert!(dir.recovery_state_path(3).exists());
        drop((held, live));
    }

    #[test]
    fn full_range_gives_enospc() {
        let (_tmp, dir) = temp_control_dir();
        std::fs::create_dir_all(dir.marker_dir()).expect("mkdir");
        for minor in 0..=MAX_MINOR {
            std::fs::write(dir.marker_path(minor), b"").expect("write");
        }
        assert_eq!(allocate(&dir).expect_err("full").errno(), libc::ENOSPC);
        free(&dir, 77).expect("free");
        assert_eq!(allocate(&dir).expect("allocate").0, 77);
    }
}
