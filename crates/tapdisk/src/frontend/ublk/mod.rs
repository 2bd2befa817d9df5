//! The ublk block device (`/dev/ublkbN`): the in-tree successor of the blktap2 kernel driver,
//! built on the `libublk` crate.
//!
//! # Life cycle
//! The blktap2 steps map onto ublk one to one, with the ublk device id equal to the VBD's
//! minor, so minor N is always `/dev/ublkbN`:
//!
//! | tapdisk | ublk |
//! |---|---|
//! | OPEN | `ADD_DEV` (id = minor), `SET_PARAMS`, queues fetch, `START_DEV`: the disk appears |
//! | CLOSE | refuse with `EBUSY` while the disk is in use ([`super::holders`]), else `STOP_DEV`, `DEL_DEV` |
//! | OPEN with `BLOCKDEV_RECOVER` | `START_USER_RECOVERY`, queues fetch, `END_USER_RECOVERY` |
//!
//! Each device runs on its own thread (`ublk<minor>`), which owns the libublk control object
//! and its control ring; libublk starts one more thread per queue ([`queue`]). Requests of every
//! queue go through the same [`Vbd`], so pausing the VBD holds them all and its counters count
//! them all. Stopping sends `STOP_DEV` from a blocking-pool thread; the device thread then sees
//! its queues end and deletes the device.
//!
//! # Settings ([`config::UblkConfig`], from tapdisk's configuration)
//! Per VBD (site defaults in `tapdisk.toml`, overridden by `tap-ctl open/create -o`):
//! `ublk.queues` (default 2), `ublk.depth` (default 64), `ublk.max_io_kib` (default 512),
//! `ublk.user_copy` (`auto`/`off`), `block_device.compat_symlinks` (the
//! `/dev/xen/blktap-2/tapdev<minor>` link, [`compat`]). Tapdisk-wide tuning:
//! `tuning.ublk_bridge` (`inline`/`spawn`, how queue threads reach the runtime) and
//! `tuning.ublk_affinity` (`any`/`queue`/`other`, where queue threads run).
//! The driver's features are read with `GET_FEATURES` and negotiated by
//! [`config::negotiate`]: user copy where offered, plain copy otherwise; user recovery with
//! re-issue where offered. Buffers are never `mlock`ed (RLIMIT_MEMLOCK is small on many hosts).
//!
//! # Surviving a tapdisk crash
//! Devices are created with `UBLK_F_USER_RECOVERY` (+`REISSUE`). When their tapdisk dies the
//! kernel keeps the device and queues its requests ("quiesced"); requests the dead process had
//! taken are re-issued to the next one. `tap-ctl recover -m N [-a type:/path]` spawns a new
//! tapdisk, attaches minor N and opens with the `BLOCKDEV_RECOVER` flag: the device starts
//! with [`UblkStart::recover`]. Without `-a`, the image comes from the state file
//! `<ctl dir>/vbd-<N>` ([`state`]) written at open and removed at close. A later OPEN of the same minor (after the
//! minor was freed without recovery) finds the orphan device, sees its tapdisk is gone, deletes
//! it and creates a fresh one, so stale state never blocks a create.
//!
//! # Caveat
//! As libublk documents, a ublk server must not share a mount namespace with a file system
//! mounted from its own device when it *exits* with that file system still mounted (the unmount
//! would wait for I/O only the exiting server can serve). Close the VBD before unmounting is
//! impossible anyway (`EBUSY`), so this only concerns forced shutdowns.

pub mod chardev;
pub mod compat;
pub mod config;
pub mod queue;
pub mod state;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkError, UblkFlags};

use super::holders::{self, Holder};
use super::{Frontend, FrontendContext, StartFrontend};
use crate::driver::SECTOR_SIZE;
use crate::engine::IoFuture;
use crate::sys::process_alive;
use crate::vbd::Vbd;
use config::{device_params, negotiate, Affinity, UblkConfig};
use queue::QueueContext;
use state::VbdState;

/// The ublk control device.
pub const CONTROL_DEVICE: &str = "/dev/ublk-control";

/// How long an OPEN waits for its device to come up (recovery waits up to 30 s for the
/// driver to finish quiescing the old device).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// True when the kernel offers ublk (`/dev/ublk-control`).
pub fn available() -> bool {
    Path::new(CONTROL_DEVICE).exists()
}

/// The block device node of ublk device `id`.
pub fn device_node(id: u16) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// An errno for a libublk error (`EIO` when it carries none).
fn ublk_errno(error: &UblkError) -> i32 {
    match error {
        UblkError::UringIOError(code) | UblkError::OtherError(code) => {
            code.checked_neg().filter(|c| *c > 0).unwrap_or(libc::EIO)
        }
        UblkError::IOError(e) => e.raw_os_error().unwrap_or(libc::EIO),
        UblkError::InvalidVal => libc::EINVAL,
        UblkError::UringTimeout => libc::ETIMEDOUT,
        UblkError::QueueIsDown => libc::ENODEV,
        _ => libc::EIO,
    }
}

/// Logs `what` failed for device `minor` and returns the failure (errno, `ublk: what`, and
/// libublk's error as the cause).
fn ublk_failure(minor: u16, what: &str, error: &UblkError) -> io::Error {
    let code = ublk_errno(error);
    tracing::error!(minor, "ublk: {what}: {error} ({})", errno(code));
    crate::error::failure(code, format!("ublk: {what}: {error}"))
}

/// The image to reopen for `tap-ctl recover` without `-a`: `(params, read_only)` from the
/// state file of `minor`. `ENOENT` without one, `EINVAL` when it is malformed (logged).
pub fn recorded_open(control_dir: &Path, minor: u16) -> io::Result<(String, bool)> {
    match VbdState::read(control_dir, minor) {
        Ok(state) => Ok((state.params, state.read_only)),
        Err(e) => {
            tracing::error!(minor, "recover: no usable recovery state: {e}");
            Err(errno(if e.kind() == io::ErrorKind::NotFound {
                libc::ENOENT
            } else {
                libc::EINVAL
            }))
        }
    }
}

/// New device or re-attachment to a surviving one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Add,
    Recover,
}

/// Reported by the device thread once the disk is live.
#[derive(Debug, Clone, Copy)]
struct Live {
    flags: u64,
    queues: u16,
    depth: u16,
}

/// A running ublk device serving one VBD.
#[derive(Debug)]
pub struct UblkDevice {
    minor: u16,
    node: PathBuf,
    control_dir: PathBuf,
    compat_link: Option<PathBuf>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How a ublk device starts: its settings, and whether it is new or re-attaches to the
/// device of the VBD's minor that survived its previous tapdisk (`tap-ctl recover`).
#[derive(Debug, Clone, Copy)]
pub struct UblkStart {
    /// Queues, depth, copy mode, links, thread placement.
    pub config: UblkConfig,
    /// Re-attach instead of adding: `ENODEV` when there is no such device, `EBUSY` while a
    /// live tapdisk still serves it, `EMEDIUMTYPE` when the image's size differs from it.
    pub recover: bool,
}

impl StartFrontend for UblkDevice {
    type Settings = UblkStart;

    async fn start(context: &FrontendContext, settings: UblkStart) -> io::Result<Self> {
        let mode = if settings.recover {
            Mode::Recover
        } else {
            Mode::Add
        };
        launch(context, settings.config, mode).await
    }
}

async fn launch(
    context: &FrontendContext,
    config: UblkConfig,
    mode: Mode,
) -> io::Result<UblkDevice> {
    let minor = context.minor;
    if !available() {
        return Err(crate::error::failure(
            libc::ENODEV,
            format!(
                "ublk: {CONTROL_DEVICE} is missing (no ublk_drv in this kernel, or not loaded)"
            ),
        ));
    }
    let disk = context.vbd.disk_info().ok_or_else(|| errno(libc::EINVAL))?;
    let (ready_sender, ready) = tokio::sync::oneshot::channel::<io::Result<Live>>();
    let abandoned = Arc::new(AtomicBool::new(false));
    let job = DeviceJob {
        mode,
        minor,
        config,
        params: device_params(&disk, config.max_io_bytes, context.vbd.capabilities()),
        vbd: Arc::clone(&context.vbd),
        runtime: tokio::runtime::Handle::current(),
        ready: Mutex::new(Some(ready_sender)),
        abandoned: Arc::clone(&abandoned),
    };
    let thread = std::thread::Builder::new()
        .name(format!("ublk{minor}"))
        .spawn(move || job.run())?;
    let live = match tokio::time::timeout(START_TIMEOUT, ready).await {
        Ok(Ok(Ok(live))) => live,
        Ok(Ok(Err(e))) => {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            return Err(e);
        }
        Ok(Err(_)) => {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            return Err(errno(libc::EIO));
        }
        Err(_) => {
            // The thread removes the device itself if it ever comes up.
            abandoned.store(true, Ordering::SeqCst);
            tracing::error!(
                minor,
                "ublk: device did not come up within {START_TIMEOUT:?}"
            );
            return Err(errno(libc::ETIMEDOUT));
        }
    };
    let node = device_node(minor);
    tracing::info!(
        minor,
        "ublk: {} {} ({} queues x {}, {})",
        if mode == Mode::Add {
            "serving"
        } else {
            "recovered"
        },
        node.display(),
        live.queues,
        live.depth,
        config::describe_flags(live.flags)
    );
    let mut device = UblkDevice {
        minor,
        node,
        control_dir: context.control_dir.root().to_path_buf(),
        compat_link: None,
        thread: Some(thread),
    };
    let recorded = VbdState {
        minor,
        pid: context.pid,
        params: context.params.clone(),
        read_only: disk.info & crate::driver::VDISK_READONLY != 0,
        device: device.node.clone(),
    };
    if let Err(e) = recorded.write(context.control_dir.root()) {
        // Recovery without -a will not work, the device itself does.
        tracing::warn!(minor, "ublk: recovery state not saved: {e}");
    }
    if config.compat_symlinks {
        match compat::create_link(Path::new(compat::COMPAT_DIR), minor, &device.node) {
            Ok(link) => device.compat_link = Some(link),
            Err(e) => tracing::warn!(minor, "ublk: compatibility link not created: {e}"),
        }
    }
    Ok(device)
}

impl UblkDevice {
    /// Who holds the device (blocking: scans `/proc`).
    async fn find_holder(&self) -> io::Result<Option<Holder>> {
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || holders::find_holder(&node))
            .await
            .map_err(io::Error::other)?
    }

    async fn remove(&mut self, force: bool) -> io::Result<()> {
        let minor = self.minor;
        if !force {
            if let Some(holder) = self.find_holder().await? {
                return Err(crate::error::failure(
                    libc::EBUSY,
                    format!("{} is in use: {holder}", self.node.display()),
                ));
            }
        }
        let stopped = tokio::task::spawn_blocking(move || stop_device(minor))
            .await
            .map_err(io::Error::other)?;
        if let Err(e) = stopped {
            let finished = self
                .thread
                .as_ref()
                .is_none_or(std::thread::JoinHandle::is_finished);
            if !finished {
                return Err(e);
            }
        }
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(io::Error::other)?
                .map_err(|_| errno(libc::EIO))?;
        }
        if let Some(link) = self.compat_link.take() {
            if let Some(dir) = link.parent() {
                if let Err(e) = compat::remove_link(dir, minor, &self.node) {
                    tracing::warn!(minor, "ublk: cannot remove {}: {e}", link.display());
                }
            }
        }
        if let Err(e) = state::remove_state(&self.control_dir, minor) {
            tracing::warn!(minor, "ublk: cannot remove the recovery state: {e}");
        }
        tracing::info!(minor, "ublk: {} removed", self.node.display());
        Ok(())
    }
}

impl Frontend for UblkDevice {
    fn kind(&self) -> &'static str {
        "ublk"
    }

    fn device(&self) -> Option<&Path> {
        Some(&self.node)
    }

    fn holder(&self) -> IoFuture<'_, Option<Holder>> {
        Box::pin(self.find_holder())
    }

    fn stop(&mut self, force: bool) -> IoFuture<'_, ()> {
        Box::pin(self.remove(force))
    }
}

/// Sends `STOP_DEV` to device `id` (from any thread: libublk's control ring is per thread).
fn stop_device(id: u16) -> io::Result<()> {
    let control =
        UblkCtrl::new_simple(i32::from(id)).map_err(|e| ublk_failure(id, "opening", &e))?;
    control
        .kill_dev()
        .map_err(|e| ublk_failure(id, "STOP_DEV", &e))?;
    Ok(())
}

/// Everything the device thread needs.
struct DeviceJob {
    mode: Mode,
    minor: u16,
    config: UblkConfig,
    params: sys::ublk_params,
    vbd: Arc<Vbd>,
    runtime: tokio::runtime::Handle,
    ready: Mutex<Option<tokio::sync::oneshot::Sender<io::Result<Live>>>>,
    abandoned: Arc<AtomicBool>,
}

impl DeviceJob {
    fn report(&self, result: io::Result<Live>) {
        let sender = self
            .ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(sender) = sender {
            let _ = sender.send(result);
        }
    }

    /// The device thread: create or recover, serve until stopped, delete.
    fn run(self) {
        let control = match self.mode {
            Mode::Add => self.add(),
            Mode::Recover => self.reattach(),
        };
        let (control, user_copy) = match control {
            Ok(pair) => pair,
            Err(e) => return self.report(Err(e)),
        };
        let minor = self.minor;
        let context = Arc::new(QueueContext {
            vbd: Arc::clone(&self.vbd),
            runtime: self.runtime.clone(),
            user_copy,
            max_io_bytes: usize::try_from(control.dev_info().max_io_buf_bytes)
                .unwrap_or(usize::MAX),
            minor,
            bridge: self.config.bridge,
            // The device thread was never pinned: its CPUs are tapdisk's.
            cpus: match self.config.affinity {
                Affinity::Any | Affinity::Other => rustix::thread::sched_getaffinity(None).ok(),
                Affinity::Queue => None,
            },
            avoid_queue_cpus: self.config.affinity == Affinity::Other,
        });
        let params = self.params;
        let dev_bytes = params.basic.dev_sectors.saturating_mul(SECTOR_SIZE);
        let set_up = move |dev: &mut UblkDev| {
            dev.tgt.dev_size = dev_bytes;
            dev.tgt.params = params;
            // Room for each tag's commit plus one data copy, and the wake-up poll.
            let depth = dev.dev_info.queue_depth;
            dev.tgt.sq_depth = depth.saturating_mul(2).saturating_add(4);
            dev.tgt.cq_depth = depth.saturating_mul(2).saturating_add(4);
            Ok(())
        };
        let serve = move |qid: u16, dev: &UblkDev| queue::serve_queue(qid, dev, &context);
        let ready = Arc::new(Mutex::new(
            self.ready.lock().ok().and_then(|mut r| r.take()),
        ));
        let abandoned = Arc::clone(&self.abandoned);
        let on_live = {
            let ready = Arc::clone(&ready);
            move |control: &UblkCtrl| {
                let info = control.dev_info();
                if abandoned.load(Ordering::SeqCst) {
                    let _ = control.kill_dev();
                    return;
                }
                let sender = ready
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                if let Some(sender) = sender {
                    let _ = sender.send(Ok(Live {
                        flags: info.flags,
                        queues: info.nr_hw_queues,
                        depth: info.queue_depth,
                    }));
                }
            }
        };
        let served = control.run_target(set_up, serve, on_live);
        let unreported = ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Err(e) = &served {
            let failure = ublk_failure(minor, "starting the device", e);
            if let Some(sender) = unreported {
                let _ = sender.send(Err(failure));
            }
        } else if let Some(sender) = unreported {
            let _ = sender.send(Err(errno(libc::EIO)));
        }
        if served.is_err() && self.mode == Mode::Recover {
            // Leave the device quiesced for another recovery attempt.
            return;
        }
        match control.del_dev() {
            Ok(_) => tracing::debug!(minor, "ublk: device deleted"),
            Err(e) => {
                ublk_failure(minor, "DEL_DEV", &e);
            }
        }
    }

    /// Removes an orphan device with our id whose tapdisk is gone.
    fn clear_orphan(&self) -> io::Result<()> {
        let minor = self.minor;
        if !Path::new(&format!("/sys/class/ublk-char/ublkc{minor}")).exists() {
            return Ok(());
        }
        let Ok(orphan) = UblkCtrl::new_simple(i32::from(minor)) else {
            return Ok(());
        };
        let info = orphan.dev_info();
        if process_alive(info.ublksrv_pid) {
            tracing::error!(
                minor,
                "ublk: device {minor} exists and is served by live process {}",
                info.ublksrv_pid
            );
            return Err(errno(libc::EEXIST));
        }
        tracing::warn!(
            minor,
            "ublk: removing orphan device {minor} (state {}, its server {} is gone)",
            info.state,
            info.ublksrv_pid
        );
        orphan
            .del_dev()
            .map_err(|e| ublk_failure(minor, "deleting the orphan device", &e))?;
        Ok(())
    }

    /// A new device: probe features, clear an orphan, ADD_DEV.
    fn add(&self) -> io::Result<(UblkCtrl, bool)> {
        let minor = self.minor;
        let features = UblkCtrl::get_features();
        let agreed = negotiate(features, self.config.user_copy);
        tracing::debug!(
            minor,
            "ublk: driver features {features:#x?}, using {}",
            config::describe_flags(agreed.ctrl_flags)
        );
        self.clear_orphan()?;
        let control = UblkCtrlBuilder::default()
            .name("tapdisk")
            .id(i32::from(minor))
            .nr_queues(self.config.queues)
            .depth(self.config.depth)
            .io_buf_bytes(self.config.max_io_bytes)
            .ctrl_flags(agreed.ctrl_flags)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|e| ublk_failure(minor, "ADD_DEV", &e))?;
        Ok((control, agreed.user_copy))
    }

    /// An existing, quiesced device: check it, START_USER_RECOVERY.
    fn reattach(&self) -> io::Result<(UblkCtrl, bool)> {
        let minor = self.minor;
        let existing = UblkCtrl::new_simple(i32::from(minor)).map_err(|e| {
            let failure = ublk_failure(minor, "no device to recover", &e);
            if failure.raw_os_error() == Some(libc::ENOENT) {
                errno(libc::ENODEV)
            } else {
                failure
            }
        })?;
        let info = existing.dev_info();
        if info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) == 0 {
            tracing::error!(minor, "ublk: device {minor} was created without recovery");
            return Err(errno(libc::EOPNOTSUPP));
        }
        if info.state == u16::try_from(sys::UBLK_S_DEV_LIVE).unwrap_or(u16::MAX)
            && process_alive(info.ublksrv_pid)
        {
            tracing::error!(
                minor,
                "ublk: device {minor} is still served by process {}",
                info.ublksrv_pid
            );
            return Err(errno(libc::EBUSY));
        }
        let mut current = sys::ublk_params::default();
        existing
            .get_params(&mut current)
            .map_err(|e| ublk_failure(minor, "GET_PARAMS", &e))?;
        if current.basic.dev_sectors != self.params.basic.dev_sectors {
            tracing::error!(
                minor,
                "ublk: device {minor} has {} sectors, the image {}",
                current.basic.dev_sectors,
                self.params.basic.dev_sectors
            );
            return Err(errno(libc::EMEDIUMTYPE));
        }
        drop(existing);
        let control = UblkCtrlBuilder::default()
            .name("tapdisk")
            .id(i32::from(minor))
            .nr_queues(info.nr_hw_queues)
            .depth(info.queue_depth)
            .io_buf_bytes(info.max_io_buf_bytes)
            .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
            .build()
            .map_err(|e| ublk_failure(minor, "opening the device for recovery", &e))?;
        match control.start_user_recover() {
            Ok(code) if code >= 0 => {}
            Ok(code) => {
                tracing::error!(
                    minor,
                    "ublk: START_USER_RECOVERY: {} (the old server has not let go)",
                    errno(-code)
                );
                return Err(errno(-code));
            }
            Err(e) => return Err(ublk_failure(minor, "START_USER_RECOVERY", &e)),
        }
        let user_copy = control.dev_info().flags & u64::from(sys::UBLK_F_USER_COPY) != 0;
        Ok((control, user_copy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libublk_errors_become_errnos() {
        assert_eq!(
            ublk_errno(&UblkError::UringIOError(-libc::EEXIST)),
            libc::EEXIST
        );
        assert_eq!(
            ublk_errno(&UblkError::OtherError(-libc::EBUSY)),
            libc::EBUSY
        );
        assert_eq!(ublk_errno(&UblkError::OtherError(0)), libc::EIO);
        assert_eq!(ublk_errno(&UblkError::OtherError(i32::MIN)), libc::EIO);
        assert_eq!(
            ublk_errno(&UblkError::IOError(errno(libc::ENOENT))),
            libc::ENOENT
        );
        assert_eq!(ublk_errno(&UblkError::InvalidVal), libc::EINVAL);
        assert_eq!(ublk_errno(&UblkError::QueueIsDown), libc::ENODEV);
    }

    #[test]
    fn nodes_and_availability() {
        assert_eq!(device_node(7), PathBuf::from("/dev/ublkb7"));
        assert_eq!(available(), Path::new("/dev/ublk-control").exists());
    }

    #[test]
    fn recorded_open_reads_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            recorded_open(dir.path(), 2).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
        VbdState {
            minor: 2,
            pid: 1,
            params: "aio:/x.img".into(),
            read_only: true,
            device: device_node(2),
        }
        .write(dir.path())
        .unwrap();
        assert_eq!(
            recorded_open(dir.path(), 2).unwrap(),
            ("aio:/x.img".to_owned(), true)
        );
        std::fs::write(state::state_path(dir.path(), 2), "junk").unwrap();
        assert_eq!(
            recorded_open(dir.path(), 2).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
    }
}
