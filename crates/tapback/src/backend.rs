//! The back-end side of each `vbd3` device: XenStore keys in, tapdisk requests out.
//!
//! For device `<root>/<domid>/<devid>` (root `/local/domain/0/backend/vbd3`):
//! 1. when it appears: write `max-ring-page-order` (3) and watch the front end's `state`;
//! 2. once `hotplug-status` is `connected` and `physical-device-path` names a tapdisk's NBD
//!    socket (`<ctl dir>/nbd<pid>.<minor>`): DISK_INFO, then `kthread-pid`;
//! 3. front end Initialising (1): our state InitWait (2); Initialised (3) or Connected (4):
//!    read `ring-page-order`, `ring-ref`/`ring-refN`, `event-channel`, `protocol`, send
//!    XENBLKIF_CONNECT (`EALREADY` is fine), then in one transaction the features
//!    (`feature-barrier`, `feature-flush-cache`, `feature-discard` with granularity,
//!    `feature-max-indirect-segments`), `sector-size`, `sectors`, `info` and state Connected
//!    (4); Closing (5): Closing; Closed (6): XENBLKIF_DISCONNECT, then Closed (6);
//! 4. front end `state` gone after it was there (the guest died): remove the back-end
//!    directory;
//!    back-end directory gone: XENBLKIF_DISCONNECT and forget the device.
//!
//! Departures from the C tapback: a front end without `protocol` is native (as `blkif.h`
//! says; C assumes x86_32), `x86_64-abi` is sent as ABI 3, and one process serves every
//! domain (no per-domain children).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use blkif::abi::Abi;
use blktapctl::{Blkif, ControlDir, ImageInfo};

/// Token of the watch on the back-end root.
pub const BACKEND_TOKEN: &str = "tapback-back";
/// Token of the watches on front ends' `state`.
pub const FRONTEND_TOKEN: &str = "tapback-front";

/// `VDISK_CDROM`.
const VDISK_CDROM: u32 = 0x1;
/// `VDISK_READONLY`.
const VDISK_READONLY: u32 = 0x4;

/// XenStore as the state machine uses it.
pub trait Store {
    /// A key's value; `None` when it does not exist.
    fn read(&mut self, path: &str) -> io::Result<Option<String>>;
    /// The children of a directory (none when it does not exist).
    fn directory(&mut self, path: &str) -> io::Result<Vec<String>>;
    /// Writes keys in one transaction.
    fn write(&mut self, pairs: &[(String, String)]) -> io::Result<()>;
    /// Removes a key and everything below it (absent is fine).
    fn remove(&mut self, path: &str) -> io::Result<()>;
    /// Watches `path` (and below) with `token`.
    fn watch(&mut self, path: &str, token: &str) -> io::Result<()>;
    /// Stops watching.
    fn unwatch(&mut self, path: &str, token: &str) -> io::Result<()>;
}

/// The tapdisk requests tapback sends.
pub trait Tapdisks {
    /// DISK_INFO of VBD `minor` of tapdisk `pid`.
    fn disk_info(&mut self, dir: &Path, pid: u32, minor: u32) -> io::Result<ImageInfo>;
    /// XENBLKIF_CONNECT.
    fn connect(&mut self, dir: &Path, pid: u32, minor: u32, blkif: &Blkif) -> io::Result<()>;
    /// XENBLKIF_DISCONNECT.
    fn disconnect(&mut self, dir: &Path, pid: u32, domid: u32, devid: u32) -> io::Result<()>;
}

/// The real tapdisks, over their control sockets.
#[derive(Debug, Default)]
pub struct ControlSockets;

/// A control-library error as an `io::Error` that keeps it (and so its errno).
pub fn io_error(error: blktapctl::Error) -> io::Error {
    io::Error::new(io::Error::from_raw_os_error(error.errno()).kind(), error)
}

/// The errno of an error made by [`Tapdisks`] or [`Store`].
pub fn errno(error: &io::Error) -> i32 {
    error.raw_os_error().unwrap_or_else(|| {
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<blktapctl::Error>())
            .map_or(libc::EIO, blktapctl::Error::errno)
    })
}

impl Tapdisks for ControlSockets {
    fn disk_info(&mut self, dir: &Path, pid: u32, minor: u32) -> io::Result<ImageInfo> {
        blktapctl::info(&ControlDir::new(dir), pid, minor).map_err(io_error)
    }

    fn connect(&mut self, dir: &Path, pid: u32, minor: u32, blkif: &Blkif) -> io::Result<()> {
        blktapctl::connect_xenblkif(&ControlDir::new(dir), pid, minor, blkif).map_err(io_error)
    }

    fn disconnect(&mut self, dir: &Path, pid: u32, domid: u32, devid: u32) -> io::Result<()> {
        blktapctl::disconnect_xenblkif(&ControlDir::new(dir), pid, domid, devid).map_err(io_error)
    }
}

/// What the back end offers guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// `feature-barrier` (the C tapback's `-b` turns it off).
    pub barrier: bool,
    /// `feature-max-indirect-segments` (0: not offered).
    pub max_indirect_segments: u32,
    /// `feature-discard` (with `discard-granularity` 4096).
    pub discard: bool,
}

impl Default for Features {
    fn default() -> Self {
        Self {
            barrier: true,
            max_indirect_segments: 256,
            discard: true,
        }
    }
}

/// The tapdisk serving a device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Served {
    dir: PathBuf,
    pid: u32,
    minor: u32,
    info: ImageInfo,
}

#[derive(Debug)]
struct Device {
    frontend: String,
    served: Option<Served>,
    connected: bool,
    /// The last state we wrote.
    state: u32,
    /// Whether the front end's `state` was ever there: only its removal afterwards means
    /// the guest went away (the toolstack may write the back end first).
    frontend_seen: bool,
}

/// `<dir>/nbd<pid>.<minor>` -> (dir, pid, minor).
pub fn parse_nbd_socket(path: &str) -> Option<(PathBuf, u32, u32)> {
    let path = Path::new(path);
    let name = path.file_name()?.to_str()?;
    let (pid, minor) = name.strip_prefix("nbd")?.split_once('.')?;
    Some((
        path.parent()?.to_path_buf(),
        pid.parse().ok()?,
        minor.parse().ok()?,
    ))
}

/// Every `vbd3` device of one back-end domain.
#[derive(Debug)]
pub struct Tapback<S, T> {
    store: S,
    tapdisks: T,
    root: String,
    features: Features,
    devices: BTreeMap<(u32, u32), Device>,
}

fn key(path: &str, name: &str) -> String {
    format!("{path}/{name}")
}

impl<S: Store, T: Tapdisks> Tapback<S, T> {
    /// Serves the devices under `root` (e.g. `/local/domain/0/backend/vbd3`).
    pub fn new(store: S, tapdisks: T, root: &str, features: Features) -> Self {
        Self {
            store,
            tapdisks,
            root: root.trim_end_matches('/').to_owned(),
            features,
            devices: BTreeMap::new(),
        }
    }

    /// The store (for the caller's event loop).
    pub fn store(&mut self) -> &mut S {
        &mut self.store
    }

    /// The tapdisk requests.
    pub fn tapdisks_mut(&mut self) -> &mut T {
        &mut self.tapdisks
    }

    /// Starts watching the back-end root (xenstored fires the watch once at once, which
    /// scans what exists).
    pub fn start(&mut self) -> io::Result<()> {
        self.store.watch(&self.root, BACKEND_TOKEN)
    }

    /// Handles one watch event.
    pub fn handle_event(&mut self, path: &str, token: &str) {
        match token {
            BACKEND_TOKEN => {
                let rest = path
                    .strip_prefix(&self.root)
                    .map(|rest| rest.trim_start_matches('/'));
                let mut parts = rest.unwrap_or("").split('/');
                let domid = parts.next().and_then(|p| p.parse::<u32>().ok());
                let devid = parts.next().and_then(|p| p.parse::<u32>().ok());
                match (domid, devid) {
                    (Some(domid), Some(devid)) => self.evaluate(domid, devid),
                    _ => self.rescan(),
                }
            }
            FRONTEND_TOKEN => {
                let found: Vec<(u32, u32)> = self
                    .devices
                    .iter()
                    .filter(|(_, device)| key(&device.frontend, "state") == path)
                    .map(|(id, _)| *id)
                    .collect();
                for (domid, devid) in found {
                    self.evaluate(domid, devid);
                }
            }
            _ => {}
        }
    }

    /// Looks at every device that exists or that we know.
    fn rescan(&mut self) {
        let mut ids: Vec<(u32, u32)> = self.devices.keys().copied().collect();
        match self.store.directory(&self.root) {
            Ok(domains) => {
                for domain in domains {
                    let Ok(domid) = domain.parse::<u32>() else {
                        continue;
                    };
                    let path = key(&self.root, &domain);
                    for device in self.store.directory(&path).unwrap_or_default() {
                        if let Ok(devid) = device.parse::<u32>() {
                            ids.push((domid, devid));
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("listing {}: {e}", self.root),
        }
        ids.sort_unstable();
        ids.dedup();
        for (domid, devid) in ids {
            self.evaluate(domid, devid);
        }
    }

    /// Brings device `(domid, devid)` up to date; errors are logged.
    pub fn evaluate(&mut self, domid: u32, devid: u32) {
        if let Err(e) = self.try_evaluate(domid, devid) {
            tracing::error!("vbd3 {domid}/{devid}: {e}");
        }
    }

    fn backend(&self, domid: u32, devid: u32) -> String {
        format!("{}/{domid}/{devid}", self.root)
    }

    fn try_evaluate(&mut self, domid: u32, devid: u32) -> io::Result<()> {
        let be = self.backend(domid, devid);
        let Some(frontend) = self.store.read(&key(&be, "frontend"))? else {
            return self.forget(domid, devid);
        };
        if !self.devices.contains_key(&(domid, devid)) {
            tracing::info!("vbd3 {domid}/{devid}: new device, front end {frontend}");
            self.store
                .write(&[(key(&be, "max-ring-page-order"), "3".to_owned())])?;
            self.store.watch(&key(&frontend, "state"), FRONTEND_TOKEN)?;
            self.devices.insert(
                (domid, devid),
                Device {
                    frontend: frontend.clone(),
                    served: None,
                    connected: false,
                    state: 1,
                    frontend_seen: false,
                },
            );
        }
        if !self.find_tapdisk(domid, devid, &be)? {
            return Ok(());
        }
        match self.store.read(&key(&frontend, "state"))? {
            None if self
                .devices
                .get(&(domid, devid))
                .is_some_and(|device| device.frontend_seen) =>
            {
                tracing::info!("vbd3 {domid}/{devid}: front end gone, removing {be}");
                self.forget(domid, devid)?;
                self.store.remove(&be)
            }
            None => Ok(()),
            Some(state) => {
                if let Some(device) = self.devices.get_mut(&(domid, devid)) {
                    device.frontend_seen = true;
                }
                self.frontend_changed(domid, devid, &be, state.trim())
            }
        }
    }

    /// True once the device's tapdisk is known (after `hotplug-status` is `connected`).
    fn find_tapdisk(&mut self, domid: u32, devid: u32, be: &str) -> io::Result<bool> {
        if self
            .devices
            .get(&(domid, devid))
            .is_some_and(|d| d.served.is_some())
        {
            return Ok(true);
        }
        if self.store.read(&key(be, "hotplug-status"))?.as_deref() != Some("connected") {
            return Ok(false);
        }
        let Some(path) = self.store.read(&key(be, "physical-device-path"))? else {
            return Ok(false);
        };
        let (dir, pid, minor) = parse_nbd_socket(&path).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("physical-device-path {path:?} is not <ctl dir>/nbd<pid>.<minor>"),
            )
        })?;
        let info = self.tapdisks.disk_info(&dir, pid, minor)?;
        if info.sector_size % 512 != 0 || info.sectors == 0 {
            tracing::warn!(
                "vbd3 {domid}/{devid}: tapdisk {pid} minor {minor} reports {} sectors of {} bytes",
                info.sectors,
                info.sector_size
            );
        }
        self.store
            .write(&[(key(be, "kthread-pid"), pid.to_string())])?;
        tracing::info!("vbd3 {domid}/{devid}: served by tapdisk {pid} minor {minor}");
        if let Some(device) = self.devices.get_mut(&(domid, devid)) {
            device.served = Some(Served {
                dir,
                pid,
                minor,
                info,
            });
        }
        Ok(true)
    }

    fn set_state(&mut self, domid: u32, devid: u32, be: &str, state: u32) -> io::Result<()> {
        self.store.write(&[(key(be, "state"), state.to_string())])?;
        if let Some(device) = self.devices.get_mut(&(domid, devid)) {
            device.state = state;
        }
        Ok(())
    }

    fn frontend_changed(
        &mut self,
        domid: u32,
        devid: u32,
        be: &str,
        state: &str,
    ) -> io::Result<()> {
        let Some(device) = self.devices.get(&(domid, devid)) else {
            return Ok(());
        };
        let (ours, connected) = (device.state, device.connected);
        match state {
            "1" if ours != 2 => self.set_state(domid, devid, be, 2),
            "3" | "4" if !connected => self.connect(domid, devid, be),
            "5" if ours != 5 => self.set_state(domid, devid, be, 5),
            "6" => {
                if connected {
                    self.disconnect(domid, devid)?;
                }
                if ours != 6 {
                    self.set_state(domid, devid, be, 6)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn connect(&mut self, domid: u32, devid: u32, be: &str) -> io::Result<()> {
        let Some(device) = self.devices.get(&(domid, devid)) else {
            return Ok(());
        };
        let Some(served) = device.served.clone() else {
            return Ok(());
        };
        let fe = device.frontend.clone();
        let number = |store: &mut S, name: &str| -> io::Result<Option<u32>> {
            match store.read(&key(&fe, name))? {
                None => Ok(None),
                Some(text) => text.trim().parse().map(Some).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{fe}/{name} is {text:?}, not a number"),
                    )
                }),
            }
        };
        let order = number(&mut self.store, "ring-page-order")
            .unwrap_or(None)
            .unwrap_or(0);
        if order > blkif::abi::MAX_RING_ORDER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{fe}/ring-page-order is {order} (at most 3)"),
            ));
        }
        let mut gref = [0u32; 8];
        if order == 0 {
            gref[0] = number(&mut self.store, "ring-ref")?
                .ok_or_else(|| io::Error::other(format!("{fe}/ring-ref is missing")))?;
        } else {
            for (i, slot) in gref.iter_mut().enumerate().take(1 << order) {
                *slot = number(&mut self.store, &format!("ring-ref{i}"))?
                    .ok_or_else(|| io::Error::other(format!("{fe}/ring-ref{i} is missing")))?;
            }
        }
        let port = number(&mut self.store, "event-channel")?
            .ok_or_else(|| io::Error::other(format!("{fe}/event-channel is missing")))?;
        let protocol = self.store.read(&key(&fe, "protocol"))?;
        let abi = Abi::from_xenstore(protocol.as_deref()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{fe}/protocol {protocol:?} is not x86_32-abi or x86_64-abi"),
            )
        })?;
        let mut info = served.info.info;
        match self.store.read(&key(&fe, "device-type"))?.as_deref() {
            None | Some("disk") => {}
            Some("cdrom") => info |= VDISK_CDROM,
            Some(other) => {
                return Err(io::Error::new(
                    io::Error::from_raw_os_error(libc::EOPNOTSUPP).kind(),
                    format!("{fe}/device-type {other:?} (disk or cdrom)"),
                ))
            }
        }
        match self.store.read(&key(be, "mode"))?.as_deref() {
            Some("r") => info |= VDISK_READONLY,
            Some("w") | None => {}
            Some(other) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{be}/mode {other:?} (r or w)"),
                ))
            }
        }
        let polling = |store: &mut S, name: &str| {
            store
                .read(&key(be, name))
                .ok()
                .flatten()
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or(0)
        };
        let blkif = Blkif {
            domid,
            devid,
            gref,
            order,
            proto: abi.proto(),
            pool: String::new(),
            port,
            poll_duration: polling(&mut self.store, "polling-duration"),
            poll_idle_threshold: polling(&mut self.store, "polling-idle-threshold"),
        };
        match self
            .tapdisks
            .connect(&served.dir, served.pid, served.minor, &blkif)
        {
            Err(e) if errno(&e) != libc::EALREADY => return Err(e),
            _ => {}
        }
        let features = self.features;
        let flag = |on: bool| if on { "1" } else { "0" }.to_owned();
        let mut keys = vec![
            (key(be, "feature-barrier"), flag(features.barrier)),
            (key(be, "feature-flush-cache"), "1".to_owned()),
            (key(be, "feature-discard"), flag(features.discard)),
            (key(be, "sector-size"), served.info.sector_size.to_string()),
            (key(be, "sectors"), served.info.sectors.to_string()),
            (key(be, "info"), info.to_string()),
        ];
        if features.discard {
            keys.push((key(be, "discard-granularity"), "4096".to_owned()));
            keys.push((key(be, "discard-alignment"), "0".to_owned()));
            keys.push((key(be, "discard-secure"), "0".to_owned()));
        }
        if features.max_indirect_segments > 0 {
            keys.push((
                key(be, "feature-max-indirect-segments"),
                features.max_indirect_segments.to_string(),
            ));
        }
        keys.push((key(be, "state"), "4".to_owned()));
        self.store.write(&keys)?;
        if let Some(device) = self.devices.get_mut(&(domid, devid)) {
            device.connected = true;
            device.state = 4;
        }
        tracing::info!(
            "vbd3 {domid}/{devid}: connected (ring order {order}, {abi:?}, port {port}) to tapdisk {} minor {}",
            served.pid,
            served.minor
        );
        Ok(())
    }

    fn disconnect(&mut self, domid: u32, devid: u32) -> io::Result<()> {
        let Some(device) = self.devices.get_mut(&(domid, devid)) else {
            return Ok(());
        };
        let Some(served) = device.served.clone() else {
            return Ok(());
        };
        device.connected = false;
        match self
            .tapdisks
            .disconnect(&served.dir, served.pid, domid, devid)
        {
            Err(e) if !matches!(errno(&e), libc::ENODEV | libc::ESRCH | libc::ENOENT) => Err(e),
            _ => {
                tracing::info!("vbd3 {domid}/{devid}: disconnected");
                Ok(())
            }
        }
    }

    /// The device's back-end directory is gone: disconnect and forget it.
    fn forget(&mut self, domid: u32, devid: u32) -> io::Result<()> {
        let Some(device) = self.devices.get(&(domid, devid)) else {
            return Ok(());
        };
        let frontend = device.frontend.clone();
        let result = if device.connected {
            self.disconnect(domid, devid)
        } else {
            Ok(())
        };
        self.devices.remove(&(domid, devid));
        let _ = self.store.unwatch(&key(&frontend, "state"), FRONTEND_TOKEN);
        tracing::info!("vbd3 {domid}/{devid}: removed");
        result
    }
}
