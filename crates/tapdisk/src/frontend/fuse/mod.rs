//! The FUSE + loop block device, for kernels without ublk: the disk is exported as one
//! regular file through FUSE and bound to a loop device with direct I/O, giving `/dev/loopN`.
//!
//! Layout: the FUSE filesystem is mounted *on a file*, `<ctl dir>/fuse<pid>.<minor>` (its
//! root inode is the disk file, as `nbdfuse` does), so the file and the mount point are the
//! same path. The loop device is bound to that file with `LOOP_CONFIGURE`
//! (`LO_FLAGS_DIRECT_IO`, 512-byte blocks, read-only for read-only disks) and left without
//! autoclear, so it outlives its openers until tapdisk detaches it.
//!
//! Data path: `/dev/loopN` → loop (direct I/O) → FUSE request → [`fs::VbdFile`] → a tokio task
//! → [`disk::ByteDisk`] → [`Vbd`](crate::vbd::Vbd). Writes are copied out of the FUSE receive
//! buffer before they are queued (sharing that buffer with in-flight requests is how
//! qemu-storage-daemon's FUSE export corrupted writes under a direct-I/O loop device).
//!
//! Stop: unless forced, refuses with `EBUSY` while the loop device is mounted, held
//! exclusively, held by a kernel holder or open in any process (`/proc/*/fd`), and then
//! changes nothing. Otherwise it unbinds the loop device (`LOOP_CLR_FD`, waiting for the
//! kernel to release the file), unmounts the FUSE file (lazily if something else has it
//! open), joins the session threads and removes the mount point. Forced, a still-open loop
//! device is unbound at its last close and I/O to it fails meanwhile.
//!
//! After a crash: a tapdisk killed with SIGKILL leaves its mount (whose connection the
//! kernel aborted: I/O fails with `ENOTCONN`) and its loop device behind. The next FUSE block
//! device started with the same control directory (by any tapdisk) cleans them up first:
//! every `fuse<pid>.<minor>` whose pid is gone has its loop devices unbound (at last close if
//! still in use), its mount detached and the file removed. [`cleanup_stale`] does the same on
//! demand.

pub mod disk;
pub mod error;
pub mod fs;
pub mod loopdev;
pub mod mounts;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption, Session};

use self::disk::ByteDisk;
use self::error::FuseError;
use self::fs::VbdFile;
use self::loopdev::{AttachOptions, LoopDevice};
use self::mounts::Unmounted;
use super::holders::{self, Holder};
use super::{Frontend, FrontendContext, StartFrontend};
use crate::driver::{SECTOR_SIZE, VDISK_READONLY};
use crate::engine::IoFuture;
use crate::sys::process_alive;

/// FUSE session threads (each with its own cloned `/dev/fuse` descriptor).
const SESSION_THREADS: usize = 2;

/// How long stop waits for the kernel to release the FUSE file after unbinding the loop
/// device, and for the session threads to end after unmounting.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The same waits when a forced stop found the loop device still in use.
const FORCED_PATIENCE: Duration = Duration::from_secs(1);

/// Logical block size of the loop device.
const LOOP_BLOCK_SIZE: u32 = 512;

/// True when `/dev/fuse` exists.
pub fn available() -> bool {
    Path::new("/dev/fuse").exists()
}

/// The FUSE file (and mount point) of `minor` in tapdisk `pid`.
pub fn mount_point(control_dir: &Path, pid: u32, minor: u16) -> PathBuf {
    control_dir.join(format!("fuse{pid}.{minor}"))
}

/// Parses `fuse<pid>.<minor>`.
fn parse_mount_name(name: &str) -> Option<(u32, u16)> {
    let (pid, minor) = name.strip_prefix("fuse")?.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(minor) {
        return None;
    }
    Some((pid.parse().ok()?, minor.parse().ok()?))
}

/// Cleans up what dead tapdisks left in `control_dir`: for every `fuse<pid>.<minor>` whose
/// pid is gone, unbinds the loop devices bound to it (at their last close if still open),
/// detaches the mount and removes the file. Returns the paths cleaned.
pub fn cleanup_stale(control_dir: &Path) -> Vec<PathBuf> {
    // Canonical, as the kernel shows loop backing files and mount points; the directory is
    // resolved, never the files in it (stat on a dead FUSE mount fails with ENOTCONN).
    let Ok(control_dir) = control_dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&control_dir) else {
        return Vec::new();
    };
    let mut cleaned = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((pid, _)) = name.to_str().and_then(parse_mount_name) else {
            continue;
        };
        if i32::try_from(pid).is_ok_and(process_alive) {
            continue;
        }
        let path = entry.path();
        clean_mount_point(&path);
        cleaned.push(path);
    }
    cleaned
}

/// Unbinds loop devices backed by `path`, unmounts it (lazily) and removes it. Best effort:
/// failures are logged.
fn clean_mount_point(path: &Path) {
    for (index, backing) in loopdev::bound_devices() {
        if backing != path {
            continue;
        }
        let device = loopdev::device_path(index);
        match File::open(&device).and_then(|file| {
            loopdev::clear(&file).map_err(|e| io::Error::new(e.kind(), format!("LOOP_CLR_FD: {e}")))
        }) {
            Ok(()) => tracing::warn!(
                "unbound stale {} from {} (at its last close if still open)",
                device.display(),
                path.display()
            ),
            Err(e) => tracing::error!("cannot unbind stale {}: {e}", device.display()),
        }
    }
    match mounts::unmount_all(path) {
        Ok(Unmounted::NotMounted) => {}
        Ok(how) => tracing::warn!("unmounted stale FUSE mount {} ({how:?})", path.display()),
        Err(e) => tracing::error!("cannot unmount stale FUSE mount: {e}"),
    }
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::error!("cannot remove stale {}: {e}", path.display());
        }
    }
}

/// The mounted FUSE file and its session.
#[derive(Debug)]
struct FuseMount {
    path: PathBuf,
    session: Option<BackgroundSession>,
}

impl FuseMount {
    /// Creates the mount point and mounts `filesystem` on it.
    fn mount(path: PathBuf, filesystem: VbdFile, read_only: bool) -> Result<Self, FuseError> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| FuseError::io("creating the mount point", &path, e))?;
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("tapdisk".into()),
            MountOption::Subtype("tapdisk".into()),
            MountOption::NoAtime,
            MountOption::NoExec,
            if read_only {
                MountOption::RO
            } else {
                MountOption::RW
            },
        ];
        config.n_threads = Some(SESSION_THREADS);
        config.clone_fd = true;
        let session = Session::new(filesystem, &path, &config)
            .and_then(Session::spawn)
            .map_err(|e| {
                let _ = std::fs::remove_file(&path);
                FuseError::io("mounting FUSE at", &path, e)
            })?;
        Ok(Self {
            path,
            session: Some(session),
        })
    }

    /// Unmounts (lazily if busy), joins the session threads (waiting up to `patience`; they
    /// end by themselves with the connection) and removes the mount point. Best effort:
    /// problems are logged.
    fn unmount(&mut self, patience: Duration) {
        match mounts::unmount_all(&self.path) {
            Ok(Unmounted::Lazy) => tracing::warn!(
                "{} was still open elsewhere: detached lazily",
                self.path.display()
            ),
            Ok(_) => {}
            Err(e) => tracing::error!("{e}"),
        }
        if let Some(session) = self.session.take() {
            // The threads end when the kernel ends the connection; do not wait forever.
            let (done, finished) = std::sync::mpsc::channel();
            let joiner = std::thread::Builder::new()
                .name("fuse-join".into())
                .spawn(move || {
                    let _ = done.send(session.join());
                });
            match joiner {
                Ok(_) => match finished.recv_timeout(patience) {
                    Ok(Ok(())) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
                    Ok(Err(e)) => tracing::warn!("FUSE session {}: {e}", self.path.display()),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => tracing::warn!(
                        "FUSE session {} still running after unmount; it ends with its last user",
                        self.path.display()
                    ),
                },
                Err(e) => tracing::warn!("cannot join the FUSE session: {e}"),
            }
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::error!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// The running pieces of a FUSE block device.
#[derive(Debug)]
struct Attached {
    mount: FuseMount,
    device: LoopDevice,
}

impl Attached {
    /// Fails with [`FuseError::Busy`] if anything holds the loop device; otherwise returns
    /// it opened with `O_EXCL`, which keeps new mounts out until it is closed.
    fn claim(&self) -> Result<File, FuseError> {
        let path = &self.device.path;
        match holders::claim(path) {
            Ok(Ok(claimed)) => Ok(claimed),
            Ok(Err(holder)) => Err(FuseError::Busy {
                device: path.clone(),
                holder: holder.to_string(),
            }),
            Err(e) => Err(FuseError::io("opening", path, e)),
        }
    }

    /// Removes the device. Unless `force`, hands itself back with [`FuseError::Busy`] (having
    /// changed nothing) while the loop device is in use.
    fn teardown(mut self, force: bool) -> Result<(), Box<(Self, FuseError)>> {
        let (handle, in_use) = match self.claim() {
            Ok(claimed) => (Some(claimed), false),
            Err(e) if !force => return Err(Box::new((self, e))),
            Err(e) => {
                tracing::warn!("forced removal: {e}; it is unbound at its last close");
                let handle = File::open(&self.device.path)
                    .inspect_err(|e| tracing::warn!("opening {}: {e}", self.device.path.display()))
                    .ok();
                (handle, true)
            }
        };
        if let Some(handle) = handle {
            if let Err(e) = loopdev::clear(&handle) {
                // ENXIO: not bound any more.
                if e.raw_os_error() != Some(libc::ENXIO) {
                    tracing::error!("LOOP_CLR_FD {}: {e}", self.device.path.display());
                }
            }
        }
        // A device still in use keeps the FUSE file until its last close: waiting is useless.
        let patience = if in_use {
            FORCED_PATIENCE
        } else {
            RELEASE_TIMEOUT
        };
        self.wait_released(patience);
        self.mount.unmount(patience);
        tracing::info!(
            "removed {} and its FUSE file {}",
            self.device.path.display(),
            self.mount.path.display()
        );
        Ok(())
    }

    /// Waits until the loop device no longer uses the FUSE file.
    fn wait_released(&self, patience: Duration) {
        let started = Instant::now();
        while loopdev::backing_file(self.device.index).is_some_and(|f| f == self.mount.path) {
            if started.elapsed() > patience {
                tracing::warn!(
                    "{} is still open: it is unbound at its last close, I/O to it fails meanwhile",
                    self.device.path.display()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A VBD served as `/dev/loopN` over a FUSE file.
#[derive(Debug)]
pub struct FuseBlockDevice {
    minor: u16,
    path: PathBuf,
    attached: Option<Attached>,
}

impl StartFrontend for FuseBlockDevice {
    type Settings = ();

    async fn start(context: &FrontendContext, (): ()) -> io::Result<Self> {
        let minor = context.minor;
        let runtime = tokio::runtime::Handle::current();
        let context = context.clone();
        tokio::task::spawn_blocking(move || Self::mount_and_bind(&context, runtime))
            .await
            .map_err(io::Error::other)?
            .map_err(|e| e.into_logged_io(minor))
    }
}

impl FuseBlockDevice {
    /// Mounts the FUSE file and binds a loop device to it (blocking).
    fn mount_and_bind(
        context: &FrontendContext,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, FuseError> {
        let minor = context.minor;
        let info = context.vbd.disk_info().ok_or(FuseError::NoDisk { minor })?;
        let size = info.sectors.saturating_mul(SECTOR_SIZE);
        let read_only = info.info & VDISK_READONLY != 0;

        for path in cleanup_stale(context.control_dir.root()) {
            tracing::warn!(
                minor,
                "cleaned up {} left by a dead tapdisk",
                path.display()
            );
        }
        let control_dir = context
            .control_dir
            .root()
            .canonicalize()
            .map_err(|e| FuseError::io("resolving", context.control_dir.root(), e))?;
        let path = mount_point(&control_dir, context.pid, minor);
        // Anything at our own name was left by an earlier process with our pid.
        clean_mount_point(&path);

        let disk = Arc::new(ByteDisk::new(Arc::clone(&context.vbd), size));
        let filesystem = VbdFile::new(disk, runtime, read_only, context.vbd.capabilities(), minor);
        let mut mount = FuseMount::mount(path.clone(), filesystem, read_only)?;

        let attached = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| FuseError::io("opening the FUSE file", &path, e))
            .and_then(|file| {
                loopdev::attach(
                    &file,
                    &path,
                    AttachOptions {
                        read_only,
                        direct_io: true,
                        block_size: LOOP_BLOCK_SIZE,
                    },
                )
            });
        let device = match attached {
            Ok(device) => device,
            Err(e) => {
                mount.unmount(RELEASE_TIMEOUT);
                return Err(e);
            }
        };
        tracing::info!(
            minor,
            "{} serves {} through FUSE file {} ({} bytes, direct I/O {})",
            device.path.display(),
            context.params,
            path.display(),
            size,
            if device.direct_io { "on" } else { "off" }
        );
        Ok(Self {
            minor,
            path: device.path.clone(),
            attached: Some(Attached { mount, device }),
        })
    }
}

impl Frontend for FuseBlockDevice {
    fn kind(&self) -> &'static str {
        "fuse"
    }

    fn device(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn holder(&self) -> IoFuture<'_, Option<Holder>> {
        let path = self.path.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || holders::find_holder(&path))
                .await
                .map_err(io::Error::other)?
        })
    }

    fn stop(&mut self, force: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let Some(attached) = self.attached.take() else {
                return Ok(());
            };
            let outcome = tokio::task::spawn_blocking(move || attached.teardown(force))
                .await
                .map_err(io::Error::other)?;
            match outcome {
                Ok(()) => Ok(()),
                Err(busy) => {
                    let (attached, error) = *busy;
                    self.attached = Some(attached);
                    Err(error.into_logged_io(self.minor))
                }
            }
        })
    }
}

impl Drop for FuseBlockDevice {
    fn drop(&mut self) {
        if let Some(attached) = self.attached.take() {
            tracing::warn!(
                minor = self.minor,
                "{} dropped without stop: removing it",
                self.path.display()
            );
            let _ = attached.teardown(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_names_round_trip() {
        let path = mount_point(Path::new("/run/blktap-control"), 812, 3);
        assert_eq!(path, Path::new("/run/blktap-control/fuse812.3"));
        assert_eq!(parse_mount_name("fuse812.3"), Some((812, 3)));
        for bad in [
            "fuse812",
            "fuse.3",
            "fuse812.",
            "fusex.3",
            "nbd812.3",
            "fuse8.3.1",
            "fuse1.99999",
        ] {
            assert_eq!(parse_mount_name(bad), None, "{bad}");
        }
    }
}
