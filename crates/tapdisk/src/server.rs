//! The state of one tapdisk process and its control-message handlers.
//!
//! A tapdisk hosts any number of VBDs, keyed by minor. Each attached VBD holds the `flock` on
//! its marker file `<ctl dir>/tapdisk/tapdisk-<minor>` (so `tap-ctl free` refuses it), and each
//! open VBD serves an NBD export. The process exits after its last VBD is detached.
//!
//! Handlers return `Err(errno)`; the control layer turns that into an `ERROR` reply.

use blktapctl::marker::MarkerLock;
use blktapctl::paths::ControlDir;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tapdisk_proto::{
    Blkif, Body, ImageInfo, ListEntry, Message, MessageType, OpenFlags, Params, Query, StatInfo,
};
use tokio::sync::watch;

use crate::commit::{CommitJob, JobStatus};
use crate::config::{Config, DeviceSettings};
use crate::control::ClientWatch;
use crate::driver::nbd::passed::PassedSockets;
use crate::driver::nbd::NbdClientContext;
use crate::driver::{DiskInfo, OpenOptions};
use crate::error::{errno_of, failure, message_of};
use crate::frontend::blkif::{BlkifRing, BlkifStart, XenBackend};
use crate::frontend::nbd::{NbdFrontend, NbdSettings, NbdTcpFrontend, TcpListen};
use crate::frontend::ublk::{UblkDevice, UblkStart};
use crate::frontend::{
    downcast, start_block_device, BlockDeviceChoice, Frontend, FrontendContext, StartFrontend,
};
use crate::lcache::IntelliCache;
use crate::secondary::{SecondaryConfig, SecondaryMode, NULL_SECONDARY};
use crate::stats::{self, VbdStats, XenbusRings};
use crate::vbd::{OpenRequest, SecondaryChange, Vbd, DEFAULT_REQUEST_TIMEOUT};
use nbd::ConnectionLimit;

/// Extra bytes a control request may carry after its 544-byte message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Trailer {
    /// CBT log path (OPEN/RESUME with `ADD_LOG`).
    pub log_path: Option<String>,
    /// Encryption key (OPEN with `OPEN_ENCRYPTED`), in locked memory; shown redacted.
    pub key: Option<Arc<secret::Key>>,
    /// Per-VBD open options (OPEN with `OPEN_OPTIONS`, a blktap-rs extension): `key = value`
    /// lines, see [`crate::config::DeviceSettings::with_open_options`].
    pub options: Option<String>,
}

/// What the control layer writes back.
#[derive(Debug)]
pub enum Reply {
    /// One message.
    Message(Message),
    /// A `LIST` stream (already terminated by its `count == 0` entry).
    List(Vec<Message>),
    /// A `STATS_RSP` followed by its text.
    Stats(Message, String),
}

/// Open flags this tapdisk implements; any other flag is refused with `EOPNOTSUPP`.
const SUPPORTED_OPEN_FLAGS: u32 = OpenFlags::RDONLY.0
    | OpenFlags::NO_O_DIRECT.0
    | OpenFlags::SHARED.0
    | OpenFlags::ADD_LOG.0
    | OpenFlags::SECONDARY.0
    | OpenFlags::STANDBY.0
    | OpenFlags::ADD_LCACHE.0
    | OpenFlags::REUSE_PRT.0
    | OpenFlags::BLOCKDEV_CHOICE.0
    | OpenFlags::BLOCKDEV_RECOVER.0
    | OpenFlags::OPEN_ENCRYPTED.0
    | OpenFlags::OPEN_OPTIONS.0;

/// The secondary `params` names: `u.params.secondary` when `SECONDARY` is set (required
/// then), nothing otherwise.
fn secondary_of(params: &Params) -> io::Result<Option<&str>> {
    if !params.flags.contains(OpenFlags::SECONDARY) {
        return Ok(None);
    }
    if params.secondary.is_empty() {
        return Err(failure(
            libc::EINVAL,
            "SECONDARY is set but no secondary image is named",
        ));
    }
    Ok(Some(&params.secondary))
}

/// The NBD socket of VBD `minor` in the control directory (`nbd<pid>.<minor>`, whichever
/// tapdisk serves it), for an open with `-e MINOR`: `ENOENT` when there is none, `EINVAL`
/// when there are several (as the C stack's glob).
fn parent_export(control_dir: &ControlDir, minor: u32) -> io::Result<PathBuf> {
    let root = control_dir.root();
    let context = |e: io::Error| {
        crate::error::with_context(
            e,
            format!(
                "looking for the export of minor {minor} in {}",
                root.display()
            ),
        )
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root).map_err(context)? {
        let name = entry.map_err(context)?.file_name();
        let owned = name
            .to_str()
            .and_then(blktapctl::paths::parse_nbd_socket_name);
        if owned.is_some_and(|(_, of)| of == minor) {
            found.push(root.join(&name));
        }
    }
    match found.as_slice() {
        [socket] => Ok(socket.clone()),
        [] => Err(failure(
            libc::ENOENT,
            format!(
                "-e {minor}: no NBD export of minor {minor} in {}",
                root.display()
            ),
        )),
        _ => Err(failure(
            libc::EINVAL,
            format!(
                "-e {minor}: {} NBD exports of minor {minor} in {}",
                found.len(),
                root.display()
            ),
        )),
    }
}

/// IntelliCache's part of an OPEN: `ADD_LCACHE` (`-r`) and `REUSE_PRT` with `prt_devnum`
/// (`-e MINOR`).
fn intellicache_of(params: &Params, control_dir: &ControlDir) -> io::Result<IntelliCache> {
    let reuse = params.flags.contains(OpenFlags::REUSE_PRT)
        && params.prt_devnum != tapdisk_proto::NO_PARENT_DEVNUM;
    let parent_export = if reuse {
        Some(parent_export(control_dir, params.prt_devnum)?)
    } else {
        None
    };
    Ok(IntelliCache {
        local_cache: params.flags.contains(OpenFlags::ADD_LCACHE),
        parent_export,
    })
}

/// One attached VBD.
#[derive(Debug)]
struct Slot {
    vbd: Arc<Vbd>,
    /// The locked marker file; dropping it empties it and releases the lock.
    _marker: MarkerLock,
    /// The cap on this VBD's NBD connections, shared by its sockets and TCP listeners.
    nbd_connections: Arc<ConnectionLimit>,
    /// What serves the open VBD, in the order started (the NBD export first, Xen guest
    /// rings as they connect); empty while closed.
    frontends: Vec<Box<dyn Frontend>>,
    /// Why the open VBD has no kernel block device although its site default asked for
    /// one (shown by `tap-ctl stats` as `"blockdev_error"`).
    blockdev_error: Option<String>,
    /// The live commit job, until a query reports it concluded.
    commit: Option<Arc<CommitJob>>,
}

impl Slot {
    /// The kernel block device serving the VBD, if any.
    fn block_device(&self) -> Option<PathBuf> {
        self.frontends
            .iter()
            .find_map(|frontend| frontend.stats().blockdev)
    }

    /// The VBD's Xen guest rings (connected, or disconnected and still completing requests).
    fn rings(&self) -> impl Iterator<Item = &BlkifRing> {
        self.frontends
            .iter()
            .filter_map(|frontend| downcast::<BlkifRing>(frontend.as_ref()))
    }

    /// The statistics of the VBD and its frontends.
    fn stats(&self) -> VbdStats {
        let mut stats = VbdStats::of(&self.vbd, self.block_device().as_deref());
        stats.blockdev_error = self.blockdev_error.clone();
        stats.xenbus = XenbusRings(
            self.frontends
                .iter()
                .filter_map(|frontend| frontend.stats().xenbus)
                .collect(),
        );
        stats
    }
}

/// One tapdisk process.
#[derive(Debug)]
pub struct Tapdisk {
    pid: u32,
    config: Arc<Config>,
    control_dir: ControlDir,
    /// What `nbd:` images are opened with: the client settings and the sockets received on
    /// `nbdclient<pid>`.
    nbd_client: NbdClientContext,
    slots: Mutex<BTreeMap<u16, Slot>>,
    /// One turn per minor: the requests that change a minor's state (all but PID, LIST,
    /// STATS, DISK_INFO and the commit job's QUERY and CANCEL) run one at a time, in arrival
    /// order; other minors do not wait. A commit job takes its minor's turn to switch the
    /// VBD's chain.
    turns: Mutex<HashMap<u16, Arc<tokio::sync::Mutex<()>>>>,
    /// Set to true once the last VBD is detached.
    exit: watch::Sender<bool>,
    /// The cap on NBD connections of the whole process; each VBD has its own inside it
    /// ([`Slot::nbd_connections`]).
    nbd_connections: Arc<ConnectionLimit>,
    /// The Xen devices guests' rings are served on (`XENBLKIF_CONNECT`).
    xen: XenBackend,
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// A request not carried out because its client closed the connection first.
fn gave_up(msg_type: MessageType) -> io::Error {
    failure(
        libc::ECANCELED,
        format!(
            "the client gave up waiting: {} not carried out",
            msg_type.name()
        ),
    )
}

/// The longest prefix of `text` that fits `max` bytes without splitting a character.
fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The changed-block-tracking log an OPEN or RESUME asks for (`ADD_LOG`), which must be an
/// absolute path (tapdisk runs in `/`).
fn log_path(trailer: &Trailer) -> io::Result<Option<PathBuf>> {
    match trailer.log_path.as_deref() {
        None => Ok(None),
        Some(path) if path.starts_with('/') => Ok(Some(PathBuf::from(path))),
        Some(path) => Err(failure(
            libc::EINVAL,
            format!("the CBT log path '{path}' is not absolute"),
        )),
    }
}

/// The image description sent in OPEN_RSP and DISK_INFO_RSP. The C
/// tapdisk's drivers never set `VDISK_READONLY` there (a read-only open
/// reports 0); ours keep it internally for the frontends only.
fn image_info(info: DiskInfo) -> ImageInfo {
    ImageInfo {
        sectors: info.sectors,
        sector_size: info.sector_size,
        info: info.info & !crate::driver::VDISK_READONLY,
    }
}

/// Stops `frontends`: kernel devices first, then the others newest first (the NBD export
/// that was started first goes last), removing each one stopped from the list. Unless `force`, stops at the first that
/// refuses (`EBUSY`: still in use), which stays in the list with those not yet stopped.
async fn stop_all(frontends: &mut Vec<Box<dyn Frontend>>, force: bool) -> io::Result<()> {
    // Kernel devices, which may refuse, go first (a stable sort keeps the start order among
    // the rest), so a refusal leaves everything else serving.
    frontends.sort_by_key(|frontend| frontend.device().is_some());
    while let Some(mut frontend) = frontends.pop() {
        if let Err(e) = frontend.stop(force).await {
            if !force {
                frontends.push(frontend);
                return Err(e);
            }
            tracing::warn!("forced stop of {}: {e}", frontend.kind());
        }
    }
    Ok(())
}

impl Tapdisk {
    /// The state of process `pid`, configured by `config`; guests' rings on Xen's devices,
    /// with their statistics in `/dev/shm`.
    pub fn new(pid: u32, config: Arc<Config>) -> Self {
        Self::with_xen(pid, config, XenBackend::real(pid))
    }

    /// As [`Tapdisk::new`], with guests' rings served by `xen` (e.g. a simulated Xen).
    pub fn with_xen(pid: u32, config: Arc<Config>, xen: XenBackend) -> Self {
        Self {
            pid,
            control_dir: ControlDir::new(&config.control_dir),
            nbd_client: NbdClientContext {
                settings: config.nbd_client.clone(),
                sockets: Arc::new(PassedSockets::default()),
            },
            slots: Mutex::new(BTreeMap::new()),
            turns: Mutex::new(HashMap::new()),
            exit: watch::channel(false).0,
            nbd_connections: ConnectionLimit::new("this tapdisk", config.nbd.per_tapdisk),
            xen,
            config,
        }
    }

    /// The cap on one VBD's NBD connections, inside the tapdisk's.
    fn vbd_connection_limit(&self, minor: u16) -> Arc<ConnectionLimit> {
        self.nbd_connections.within(
            format!("minor {minor} of tapdisk {}", self.pid),
            self.config.nbd.per_vbd,
        )
    }

    /// The sockets handed to this process for `nbd:` images; `main` feeds them from
    /// `nbdclient<pid>` ([`PassedSockets::receive`]).
    pub fn passed_sockets(&self) -> Arc<PassedSockets> {
        Arc::clone(&self.nbd_client.sockets)
    }

    fn slots(&self) -> MutexGuard<'_, BTreeMap<u16, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn vbd(&self, minor: u16) -> io::Result<Arc<Vbd>> {
        self.slots()
            .get(&minor)
            .map(|slot| Arc::clone(&slot.vbd))
            .ok_or_else(|| errno(libc::ENODEV))
    }

    /// What frontends of VBD `minor` are started with.
    fn frontend_context(&self, minor: u16, vbd: &Arc<Vbd>, params: String) -> FrontendContext {
        let nbd_connections = self
            .slots()
            .get(&minor)
            .map(|slot| Arc::clone(&slot.nbd_connections))
            .unwrap_or_else(|| self.vbd_connection_limit(minor));
        FrontendContext {
            nbd_connections,
            vbd: Arc::clone(vbd),
            minor,
            pid: self.pid,
            control_dir: self.control_dir.clone(),
            params,
        }
    }

    /// Serves VBD `minor`'s NBD export on TCP as `text` (`ADDRESS tls=DIR` or
    /// `ADDRESS plain`) asks; returns the bound address.
    async fn nbd_listen(&self, minor: u16, text: &str) -> io::Result<std::net::SocketAddr> {
        let listen = TcpListen::parse(text)?;
        let vbd = self.vbd(minor)?;
        let params = vbd.params().ok_or_else(|| errno(libc::EINVAL))?;
        let context = self.frontend_context(minor, &vbd, params);
        let tcp = NbdTcpFrontend::start(&context, listen).await?;
        let address = tcp.address();
        let mut unwanted = match self.slots().get_mut(&minor) {
            // The VBD was closed meanwhile: nothing to serve.
            Some(slot) if vbd.is_open() => {
                slot.frontends.push(Box::new(tcp));
                return Ok(address);
            }
            _ => tcp,
        };
        unwanted.stop(true).await?;
        Err(errno(libc::ENODEV))
    }

    /// `XENBLKIF_CONNECT`: serves the guest ring `blkif` describes as a frontend of VBD
    /// `minor`.
    async fn xen_connect(&self, minor: u16, blkif: &Blkif) -> io::Result<()> {
        let vbd = self.vbd(minor)?;
        let connected = |slot: &Slot| {
            slot.rings().any(|ring| {
                ring.is_connected() && ring.guest_device() == (blkif.domid, blkif.devid)
            })
        };
        if self.slots().values().any(connected) {
            return Err(errno(libc::EALREADY));
        }
        let params = vbd.params().ok_or_else(|| {
            failure(
                libc::EINVAL,
                format!(
                    "ring of domain {} device {}: VBD {minor} is not open",
                    blkif.domid, blkif.devid
                ),
            )
        })?;
        let context = self.frontend_context(minor, &vbd, params);
        let settings = BlkifStart {
            xen: self.xen.clone(),
            blkif: blkif.clone(),
        };
        let ring = BlkifRing::start(&context, settings).await?;
        let mut unwanted = match self.slots().get_mut(&minor) {
            Some(slot) if vbd.is_open() => {
                // Rings disconnected earlier whose requests have all completed are done.
                slot.frontends.retain(|frontend| {
                    downcast::<BlkifRing>(frontend.as_ref()).is_none_or(|ring| !ring.is_released())
                });
                slot.frontends.push(Box::new(ring));
                return Ok(());
            }
            // Closed meanwhile (never, while requests are serialised): nothing to serve.
            _ => ring,
        };
        unwanted.stop(true).await?;
        Err(errno(libc::ENODEV))
    }

    /// `XENBLKIF_DISCONNECT`: lets go of guest `(domid, devid)`'s ring; `ENODEV` unless it is
    /// connected. Its requests in flight complete silently afterwards.
    fn xen_disconnect(&self, domid: u32, devid: u32) -> io::Result<()> {
        let slots = self.slots();
        let ring = slots
            .values()
            .flat_map(Slot::rings)
            .find(|ring| ring.is_connected() && ring.guest_device() == (domid, devid))
            .ok_or_else(|| errno(libc::ENODEV))?;
        ring.disconnect();
        Ok(())
    }

    /// Resolves once the process should exit (its last VBD was detached).
    pub async fn wait_for_exit(&self) {
        let mut exit = self.exit.subscribe();
        let _ = exit.wait_for(|done| *done).await;
    }

    /// True when the request type may run while another request is being handled.
    pub fn is_reentrant(msg_type: MessageType) -> bool {
        matches!(
            msg_type,
            MessageType::Pid
                | MessageType::List
                | MessageType::Stats
                | MessageType::DiskInfo
                | MessageType::QueryCommitJob
                | MessageType::CancelCommitJob
        )
    }

    /// The turn of `minor` (see [`Tapdisk::turns`]).
    fn turn(&self, minor: u16) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.turns.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(turns.entry(minor).or_default())
    }

    /// Handles one decoded request for `client`.
    ///
    /// A request that changes state waits for its minor's turn; if its client gives up
    /// meanwhile, it is dropped unapplied. With its turn, it runs to the end, except where a
    /// handler checks `client` (an open or resume not yet installed, a pause still draining):
    /// there a client that has gone makes it undo what it did and fail with `ECANCELED`. What
    /// remains is the moment between the last check and the reply: a client giving up just
    /// then sees a failure although the change was made, as with any request and reply.
    pub async fn handle(
        &self,
        request: &Message,
        trailer: &Trailer,
        client: ClientWatch<'_>,
    ) -> Reply {
        let cookie = request.cookie;
        let result = if Self::is_reentrant(request.msg_type) {
            self.dispatch(request, trailer, client).await
        } else {
            let turn = self.turn(cookie);
            let waited = tokio::select! {
                held = turn.lock_owned() => Some(held),
                () = client.gone() => None,
            };
            match waited {
                Some(_held) if !client.is_gone() => self.dispatch(request, trailer, client).await,
                _ => Err(gave_up(request.msg_type)),
            }
        };
        result.unwrap_or_else(|e| {
            let code = errno_of(&e);
            tracing::info!(minor = cookie, "{} failed: {e}", request.msg_type.name());
            let message = truncate_utf8(&message_of(&e), tapdisk_proto::PATH_LEN - 1).to_owned();
            Reply::Message(Message::new(
                MessageType::Error,
                cookie,
                Body::Response {
                    error: code,
                    message,
                },
            ))
        })
    }

    async fn dispatch(
        &self,
        request: &Message,
        trailer: &Trailer,
        client: ClientWatch<'_>,
    ) -> io::Result<Reply> {
        let minor = request.cookie;
        let reply = |msg_type, body| Ok(Reply::Message(Message::new(msg_type, minor, body)));
        match (request.msg_type, &request.body) {
            (MessageType::Pid, _) => {
                let pid = i32::try_from(self.pid).map_err(|_| errno(libc::EOVERFLOW))?;
                reply(MessageType::PidRsp, Body::Pid(pid))
            }
            (MessageType::Attach, _) => {
                self.attach(minor)?;
                reply(MessageType::AttachRsp, Body::Empty)
            }
            (MessageType::Detach, _) => {
                self.detach(minor)?;
                reply(
                    MessageType::DetachRsp,
                    Body::Response {
                        error: 0,
                        message: String::new(),
                    },
                )
            }
            (MessageType::Open, Body::Params(params)) => {
                let info = self.open(minor, params, trailer, client).await?;
                reply(MessageType::OpenRsp, Body::Image(image_info(info)))
            }
            (MessageType::Close, _) => {
                self.close(minor, false).await?;
                reply(MessageType::CloseRsp, Body::Empty)
            }
            (MessageType::ForceShutdown, _) => {
                self.close(minor, true).await?;
                reply(MessageType::CloseRsp, Body::Empty)
            }
            (MessageType::Pause, _) => {
                self.end_commit(minor).await;
                self.vbd(minor)?.pause_unless(client.gone()).await?;
                reply(MessageType::PauseRsp, Body::Empty)
            }
            (MessageType::Resume, Body::Params(params)) => {
                self.resume(minor, params, trailer, client).await?;
                reply(MessageType::ResumeRsp, Body::Empty)
            }
            (MessageType::List, _) => Ok(Reply::List(self.list())),
            (MessageType::Stats, _) => {
                let text = self.stats_text(minor)?;
                let length = u64::try_from(text.len()).map_err(|_| errno(libc::EOVERFLOW))?;
                let stat = StatInfo {
                    msg_type: MessageType::StatsRsp as u16,
                    cookie: minor,
                    length,
                };
                Ok(Reply::Stats(
                    Message::new(MessageType::StatsRsp, minor, Body::Stat(stat)),
                    text,
                ))
            }
            (MessageType::NbdListen, Body::Text(text)) => {
                let address = self.nbd_listen(minor, text).await?;
                reply(MessageType::NbdListenRsp, Body::Text(address.to_string()))
            }
            (MessageType::BlockDevice, _) => {
                let path = self.block_device_path(minor)?;
                reply(MessageType::BlockDeviceRsp, Body::Text(path))
            }
            (MessageType::DiskInfo, _) => {
                let info = self
                    .vbd(minor)?
                    .disk_info()
                    .ok_or_else(|| errno(libc::EINVAL))?;
                reply(MessageType::DiskInfoRsp, Body::Image(image_info(info)))
            }
            (MessageType::Commit, Body::Params(params)) => {
                self.commit(minor, &params.path)?;
                reply(MessageType::CommitRsp, Body::Empty)
            }
            (MessageType::QueryCommitJob, _) => {
                let query = self.query_commit(minor)?;
                reply(MessageType::QueryCommitJobRsp, Body::Query(query))
            }
            (MessageType::CancelCommitJob, Body::Params(params)) => {
                let job = self.commit_job(minor)?;
                if let Some(job) = job {
                    job.cancel(params.flags.0 & 1 != 0).await;
                }
                reply(MessageType::CancelCommitJobRsp, Body::Empty)
            }
            (MessageType::XenblkifConnect, Body::Blkif(blkif)) => {
                self.xen_connect(minor, blkif).await?;
                reply(MessageType::XenblkifConnectRsp, Body::Empty)
            }
            (MessageType::XenblkifDisconnect, Body::Blkif(blkif)) => {
                self.xen_disconnect(blkif.domid, blkif.devid)?;
                reply(MessageType::XenblkifDisconnectRsp, Body::Empty)
            }
            _ => Err(errno(libc::EINVAL)),
        }
    }

    fn attach(&self, minor: u16) -> io::Result<()> {
        if minor == tapdisk_proto::COOKIE_ALL {
            return Err(errno(libc::EINVAL));
        }
        let mut slots = self.slots();
        if slots.contains_key(&minor) {
            return Err(errno(libc::EEXIST));
        }
        if *self.exit.borrow() {
            // The last VBD was detached a moment ago: this process is on its way out.
            return Err(failure(libc::ENODEV, "this tapdisk is exiting"));
        }
        let marker_path = self.control_dir.marker_path(u32::from(minor));
        let marker = MarkerLock::acquire(&marker_path, self.pid).inspect_err(|e| {
            tracing::error!(
                minor,
                "attach: cannot lock marker {}: {e}",
                marker_path.display()
            );
        })?;
        slots.insert(
            minor,
            Slot {
                vbd: Arc::new(Vbd::new(minor)),
                _marker: marker,
                nbd_connections: self.vbd_connection_limit(minor),
                frontends: Vec::new(),
                blockdev_error: None,
                commit: None,
            },
        );
        tracing::info!(minor, "attached");
        Ok(())
    }

    fn detach(&self, minor: u16) -> io::Result<()> {
        let mut slots = self.slots();
        let slot = slots.get(&minor).ok_or_else(|| errno(libc::ENODEV))?;
        if slot.vbd.is_open() {
            return Err(errno(libc::EBUSY));
        }
        slots.remove(&minor);
        let last = slots.is_empty();
        drop(slots);
        tracing::info!(minor, "detached");
        if last {
            // Unlink the sockets before the reply goes out, so that once the caller sees the
            // last DETACH acknowledged, `tap-ctl list` no longer finds this process and
            // nothing of it is left in the control directory (the control socket last).
            for socket in [
                self.control_dir.nbd_client_socket_path(self.pid),
                self.control_dir.ctl_socket_path(self.pid),
            ] {
                if let Err(e) = std::fs::remove_file(&socket) {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!("removing {}: {e}", socket.display());
                    }
                }
            }
            self.exit.send_replace(true);
        }
        Ok(())
    }

    async fn open(
        &self,
        minor: u16,
        params: &Params,
        trailer: &Trailer,
        client: ClientWatch<'_>,
    ) -> io::Result<DiskInfo> {
        let vbd = self.vbd(minor).map_err(|_| {
            failure(
                libc::EINVAL,
                format!("minor {minor} is not attached to this tapdisk"),
            )
        })?;
        let unsupported = params.flags.0 & !SUPPORTED_OPEN_FLAGS;
        if unsupported != 0 {
            let what = format!("open flags {unsupported:#x} are not supported by this tapdisk");
            tracing::error!(minor, "{what}");
            return Err(failure(libc::EOPNOTSUPP, what));
        }
        if trailer.key.is_some() && params.flags.contains(OpenFlags::SECONDARY) {
            // The secondary would receive the guest's plaintext.
            let what = "a secondary image (-2) of an encrypted VBD (-E) is not supported";
            tracing::error!(minor, "{what}");
            return Err(failure(libc::EOPNOTSUPP, what));
        }
        let log = log_path(trailer)?;
        // Recovery re-attaches to the ublk device a dead tapdisk left; without a path the
        // image is the one its state file records.
        let recover = params.flags.contains(OpenFlags::BLOCKDEV_RECOVER);
        let (path, recorded_read_only) = if recover && params.path.is_empty() {
            crate::frontend::ublk::recorded_open(self.control_dir.root(), minor)?
        } else {
            (params.path.clone(), false)
        };
        if path.is_empty() {
            return Err(errno(libc::EINVAL));
        }
        let choice = if recover {
            // Only a ublk device survives its tapdisk.
            match params.flags.bits() & OpenFlags::BLOCKDEV_CHOICE.bits() {
                0 => BlockDeviceChoice::Ublk,
                b if b == OpenFlags::BLOCKDEV_UBLK.bits()
                    || b == OpenFlags::BLOCKDEV_AUTO.bits() =>
                {
                    BlockDeviceChoice::Ublk
                }
                _ => {
                    return Err(failure(
                        libc::EINVAL,
                        "only a ublk block device can be recovered",
                    ))
                }
            }
        } else {
            BlockDeviceChoice::from_flags(params.flags, &self.config.block_device)?
        };
        // Only a device the OPEN itself asks for (`tap-ctl -b`, `$BLKTAP_BLOCK_DEVICE`, a
        // recovery) fails the open when it cannot be made; a site default falls back to NBD.
        let required = recover || BlockDeviceChoice::chosen_by(params.flags);
        let device = match &trailer.options {
            Some(text) => self.config.device.with_open_options(text)?,
            None => self.config.device,
        };
        let options = OpenOptions {
            read_only: params.flags.contains(OpenFlags::RDONLY) || recorded_read_only,
            no_o_direct: params.flags.contains(OpenFlags::NO_O_DIRECT),
            shareable: params.flags.contains(OpenFlags::SHARED),
            io: self.config.io,
            nbd: self.nbd_client.clone(),
            key: trailer.key.clone(),
        };
        let timeout = match params.req_timeout {
            0 => DEFAULT_REQUEST_TIMEOUT,
            secs => Duration::from_secs(u64::from(secs)),
        };
        let secondary = match secondary_of(params)? {
            None | Some(NULL_SECONDARY) => None,
            Some(secondary) => {
                let mode = if params.flags.contains(OpenFlags::STANDBY) {
                    SecondaryMode::Standby
                } else {
                    SecondaryMode::Mirror
                };
                Some(SecondaryConfig::new(secondary.to_owned(), mode))
            }
        };
        let request = OpenRequest {
            params: path.clone(),
            options,
            timeout,
            log: log.clone(),
            secondary,
            intellicache: intellicache_of(params, &self.control_dir)?,
        };
        if vbd.is_open() {
            return Err(errno(libc::EALREADY));
        }
        // A slow open (stale NFS, a device that hangs) holds only this minor's turn, and
        // only as long as its client waits: the open itself cannot be interrupted, so it
        // finishes on the blocking pool and the chain it makes is closed.
        let chain = tokio::select! {
            chain = crate::vbd::open_chain(&request, minor) => chain,
            () = client.gone() => Err(gave_up(MessageType::Open)),
        };
        let chain = chain.inspect_err(|e| {
            tracing::error!(minor, "open {path} failed: {e}");
        })?;
        if client.is_gone() {
            return Err(gave_up(MessageType::Open));
        }
        let info = vbd.install(chain, request)?;
        let context = self.frontend_context(minor, &vbd, path.clone());
        let (frontends, blockdev_error) = match self
            .start_frontends(&context, choice, &device, recover, required)
            .await
        {
            Ok(started) => started,
            Err(e) => {
                tracing::error!(minor, "open {path}: {e}");
                vbd.close(true).await;
                return Err(e);
            }
        };
        if client.is_gone() {
            let mut frontends = frontends;
            let _ = stop_all(&mut frontends, true).await;
            vbd.close(true).await;
            return Err(gave_up(MessageType::Open));
        }
        let slot_frontends = frontends.iter().map(|f| f.kind()).collect::<Vec<_>>();
        let device = frontends.iter().find_map(|f| f.stats().blockdev);
        if let Some(slot) = self.slots().get_mut(&minor) {
            slot.frontends = frontends;
            slot.blockdev_error = blockdev_error;
        }
        tracing::info!(
            minor,
            "opened {} ({} sectors), served by {}, block device {}, CBT log {}",
            path,
            info.sectors,
            slot_frontends.join(", "),
            device
                .as_ref()
                .map_or("none".into(), |d| d.display().to_string()),
            log.as_ref()
                .map_or("none".into(), |log| log.display().to_string())
        );
        Ok(info)
    }

    /// Starts the frontends of a VBD just opened: the NBD export, then the block device
    /// `choice` asks for (or the recovered one). A block device that cannot be made fails
    /// the open only when `required`; otherwise the VBD is served over NBD alone and the
    /// reason is returned (and logged). On failure, the frontends already started are
    /// stopped again.
    async fn start_frontends(
        &self,
        context: &FrontendContext,
        choice: BlockDeviceChoice,
        device: &DeviceSettings,
        recover: bool,
        required: bool,
    ) -> io::Result<(Vec<Box<dyn Frontend>>, Option<String>)> {
        let tuning = &self.config.tuning;
        let nbd_settings = NbdSettings {
            gather_replies: tuning.nbd_gather,
        };
        let nbd = NbdFrontend::start(context, nbd_settings).await?;
        let mut frontends: Vec<Box<dyn Frontend>> = vec![Box::new(nbd)];
        let ublk = UblkStart {
            config: device.ublk(tuning),
            recover,
        };
        let started = if recover {
            UblkDevice::start(context, ublk)
                .await
                .map(|device| Some(Box::new(device) as Box<dyn Frontend>))
        } else {
            start_block_device(choice, context, ublk).await
        };
        let e = match started {
            Ok(device) => {
                frontends.extend(device);
                return Ok((frontends, None));
            }
            Err(e) => crate::error::with_context(
                e,
                format!("cannot start the {} block device", choice.name()),
            ),
        };
        if required {
            // Forced: never refuses.
            let _ = stop_all(&mut frontends, true).await;
            return Err(e);
        }
        tracing::warn!(
            minor = context.minor,
            "no block device, serving NBD only: {e} (the site default chose it; \
             only an explicit choice fails the open)"
        );
        Ok((frontends, Some(e.to_string())))
    }

    /// Starts a live commit of `top` (the active layer) on VBD `minor`.
    fn commit(&self, minor: u16, top: &str) -> io::Result<()> {
        let vbd = self.vbd(minor)?;
        if let Some(job) = self.commit_job(minor)? {
            return Err(crate::error::failure(
                libc::EINVAL,
                format!(
                    "minor {minor} already has a commit job ({}); query it until it concludes",
                    job.progress().status.name()
                ),
            ));
        }
        let job = CommitJob::start(vbd, top, self.turn(minor))?;
        if let Some(slot) = self.slots().get_mut(&minor) {
            slot.commit = Some(job);
        }
        Ok(())
    }

    fn commit_job(&self, minor: u16) -> io::Result<Option<Arc<CommitJob>>> {
        let slots = self.slots();
        let slot = slots.get(&minor).ok_or_else(|| errno(libc::ENODEV))?;
        Ok(slot.commit.clone())
    }

    /// The commit job's progress. A ready job is asked to complete; a concluded one is
    /// dismissed (the next query says `undefined`), and if it failed the query fails with its
    /// errno and reason.
    fn query_commit(&self, minor: u16) -> io::Result<Query> {
        let Some(job) = self.commit_job(minor)? else {
            return Ok(Query {
                current_progress: 0,
                total_progress: 0,
                status: "undefined".to_owned(),
            });
        };
        let progress = job.progress();
        match progress.status {
            JobStatus::Ready => job.request_complete(),
            JobStatus::Concluded => {
                if let Some(slot) = self.slots().get_mut(&minor) {
                    slot.commit = None;
                }
                if let Some((code, message)) = progress.error {
                    return Err(crate::error::failure(code, message));
                }
            }
            _ => {}
        }
        Ok(Query {
            current_progress: progress.current,
            total_progress: progress.total,
            status: progress.status.name().to_owned(),
        })
    }

    /// Cancels VBD `minor`'s commit job, if any, and waits until it has stopped (before
    /// the VBD is paused or closed).
    async fn end_commit(&self, minor: u16) {
        let job = self
            .slots()
            .get_mut(&minor)
            .and_then(|slot| slot.commit.take());
        if let Some(job) = job {
            job.cancel(false).await;
            job.finished().await;
        }
    }

    async fn close(&self, minor: u16, force: bool) -> io::Result<()> {
        self.end_commit(minor).await;
        let (vbd, mut frontends) = {
            let mut slots = self.slots();
            let slot = slots.get_mut(&minor).ok_or_else(|| errno(libc::ENODEV))?;
            (Arc::clone(&slot.vbd), std::mem::take(&mut slot.frontends))
        };
        if !force {
            // Refuse before stopping anything while any frontend is held.
            for frontend in &frontends {
                let held = frontend.holder().await;
                if let Ok(Some(holder)) = held {
                    let what = match frontend.device() {
                        Some(device) => format!("{} is in use: {holder}", device.display()),
                        None => format!("{} is in use: {holder}", frontend.kind()),
                    };
                    tracing::error!(minor, "close refused: {what}");
                    self.give_back(minor, frontends);
                    return Err(failure(libc::EBUSY, what));
                }
            }
        }
        if let Err(e) = stop_all(&mut frontends, force).await {
            tracing::error!(minor, "close refused: {e}");
            // Still in use: keep serving what is left and refuse the close.
            self.give_back(minor, frontends);
            return Err(e);
        }
        vbd.close(force).await;
        if let Some(slot) = self.slots().get_mut(&minor) {
            slot.blockdev_error = None;
        }
        tracing::info!(minor, force, "closed");
        Ok(())
    }

    /// Puts frontends taken out for a close that was refused back into their slot.
    fn give_back(&self, minor: u16, frontends: Vec<Box<dyn Frontend>>) {
        if let Some(slot) = self.slots().get_mut(&minor) {
            slot.frontends = frontends;
        }
    }

    async fn resume(
        &self,
        minor: u16,
        params: &Params,
        trailer: &Trailer,
        client: ClientWatch<'_>,
    ) -> io::Result<()> {
        let vbd = self.vbd(minor)?;
        let unsupported = params.flags.0 & !SUPPORTED_OPEN_FLAGS;
        if unsupported != 0 {
            let what =
                format!("resume with flags {unsupported:#x} is not supported by this tapdisk");
            tracing::error!(minor, "{what}");
            return Err(failure(libc::EOPNOTSUPP, what));
        }
        let log = log_path(trailer)?;
        let change = match secondary_of(params)? {
            None => SecondaryChange::Keep,
            Some(NULL_SECONDARY) => SecondaryChange::Remove,
            Some(secondary) => SecondaryChange::Set(secondary.to_owned()),
        };
        if matches!(change, SecondaryChange::Set(_)) && vbd.open_options().key.is_some() {
            // As at open: the secondary would receive the guest's plaintext.
            let what = "a secondary image (-2) of an encrypted VBD is not supported";
            tracing::error!(minor, "{what}");
            return Err(failure(libc::EOPNOTSUPP, what));
        }
        let new_params = (!params.path.is_empty()).then(|| params.path.clone());
        let reopened = tokio::select! {
            reopened = vbd.reopen(new_params, log, change) => reopened?,
            () = client.gone() => return Err(gave_up(MessageType::Resume)),
        };
        if client.is_gone() {
            return Err(gave_up(MessageType::Resume));
        }
        vbd.finish_resume(reopened);
        Ok(())
    }

    fn list(&self) -> Vec<Message> {
        let slots = self.slots();
        let total = slots.len();
        let mut messages = Vec::with_capacity(total + 1);
        for (index, (minor, slot)) in slots.iter().enumerate() {
            let entry = ListEntry {
                count: i32::try_from(total - index).unwrap_or(i32::MAX),
                minor: i32::from(*minor),
                state: i32::try_from(slot.vbd.state()).unwrap_or(i32::MAX),
                path: slot.vbd.params().unwrap_or_default(),
            };
            messages.push(Message::new(
                MessageType::ListRsp,
                *minor,
                Body::List(entry),
            ));
        }
        let end = ListEntry {
            count: 0,
            minor: -1,
            state: 0,
            path: String::new(),
        };
        messages.push(Message::new(
            MessageType::ListRsp,
            tapdisk_proto::COOKIE_ALL,
            Body::List(end),
        ));
        messages
    }

    fn block_device_path(&self, minor: u16) -> io::Result<String> {
        let slots = self.slots();
        let slot = slots.get(&minor).ok_or_else(|| errno(libc::ENODEV))?;
        Ok(slot
            .block_device()
            .map(|device| device.display().to_string())
            .unwrap_or_default())
    }

    fn stats_text(&self, minor: u16) -> io::Result<String> {
        let slots = self.slots();
        if minor == tapdisk_proto::COOKIE_ALL {
            let all: Vec<VbdStats> = slots.values().map(Slot::stats).collect();
            return stats::to_text(&all);
        }
        let slot = slots.get(&minor).ok_or_else(|| errno(libc::ENODEV))?;
        stats::to_text(&slot.stats())
    }

    /// Closes every VBD (forced) and stops their exports; used on SIGTERM/SIGINT.
    pub async fn shutdown(&self) {
        let minors: Vec<u16> = self.slots().keys().copied().collect();
        for minor in minors {
            let _ = self.close(minor, true).await;
        }
        self.slots().clear();
        self.xen.remove_stats_dir();
    }
}
