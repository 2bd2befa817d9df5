//! The per-VBD control operations: one request each to a running tapdisk.
//!
//! `attach`, `detach`, `open`, `close`, `pause`, `unpause`, `info` and `stats` address a VBD by
//! the tapdisk's pid and the minor; [`get_pid`] asks a tapdisk for its pid and [`list_vbds`]
//! fetches its LIST stream.

use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;
use zeroize::Zeroizing;

use tapdisk_proto::{
    encode_key, encode_log_path, encode_open_options, Body, ImageInfo, Message, MessageType,
    OpenFlags, Params, COOKIE_ALL, NO_PARENT_DEVNUM,
};

use crate::error::{Error, Result};
use crate::ipc::{request, Connection, LIST_STATS_TIMEOUT};
use crate::paths::{ControlDir, MAX_MINOR};

/// The cookie for `minor`, which must be within `0..=MAX_MINOR`.
pub(crate) fn cookie(minor: u32) -> Result<u16> {
    u16::try_from(minor)
        .ok()
        .filter(|_| minor <= MAX_MINOR)
        .ok_or_else(|| {
            Error::new(
                libc::EINVAL,
                format!("minor {minor} is outside 0..={MAX_MINOR}"),
            )
        })
}

/// What `open` (and `create`) asks tapdisk to open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenRequest {
    /// The image as `"type:/path"` (for example `"vhd:/srv/disk.vhd"` or `"aio:/dev/sdb"`).
    pub params: String,
    /// Plain flags such as [`OpenFlags::RDONLY`] and [`OpenFlags::NO_O_DIRECT`]. The flags
    /// implied by the fields below are added automatically.
    pub flags: OpenFlags,
    /// Stack on the parent chain of this already open minor (`-e`; adds `REUSE_PRT`).
    pub parent_minor: Option<u32>,
    /// Secondary image `"type:/path"` (`-2`; adds `SECONDARY`).
    pub secondary: Option<String>,
    /// Request timeout in seconds (`-t`); 0 = the daemon's default.
    pub request_timeout: u16,
    /// Changed-block log file (`-C`; adds `ADD_LOG` and sends the path after the message).
    pub log_path: Option<String>,
    /// Encryption key (`-E`; adds `OPEN_ENCRYPTED` and sends the key after the message),
    /// in locked memory.
    pub encryption_key: Option<Arc<secret::Key>>,
    /// Per-VBD open options, `key = value` lines (`-o`; a blktap-rs extension: adds
    /// `OPEN_OPTIONS` and sends the text after the message).
    pub options: Option<String>,
}

impl OpenRequest {
    /// A request to open `params` (`"type:/path"`) with no flags.
    pub fn new(params: impl Into<String>) -> Self {
        Self {
            params: params.into(),
            ..Self::default()
        }
    }

    /// The OPEN message for `minor` and the payload that follows it (wiped when dropped: it
    /// may hold the key).
    pub fn to_message(&self, minor: u32) -> Result<(Message, Zeroizing<Vec<u8>>)> {
        let mut flags = self.flags;
        let mut prt_devnum = NO_PARENT_DEVNUM;
        if let Some(parent) = self.parent_minor {
            flags |= OpenFlags::REUSE_PRT;
            prt_devnum = parent;
        }
        if self.secondary.is_some() {
            flags |= OpenFlags::SECONDARY;
        }
        // Room for every payload at once, so the key is never left behind by a reallocation.
        let mut trailer = Zeroizing::new(Vec::with_capacity(1024));
        if let Some(log) = &self.log_path {
            flags |= OpenFlags::ADD_LOG;
            let payload = encode_log_path(log)
                .map_err(|e| Error::new(libc::ENAMETOOLONG, format!("log path {log:?}: {e}")))?;
            trailer.extend_from_slice(&payload);
        }
        if let Some(key) = &self.encryption_key {
            flags |= OpenFlags::OPEN_ENCRYPTED;
            let payload = Zeroizing::new(
                encode_key(key.as_bytes())
                    .map_err(|e| Error::new(libc::EINVAL, format!("encryption key: {e}")))?,
            );
            trailer.extend_from_slice(&payload);
        }
        if let Some(options) = &self.options {
            flags |= OpenFlags::OPEN_OPTIONS;
            let payload = encode_open_options(options)
                .map_err(|e| Error::new(libc::E2BIG, format!("open options {options:?}: {e}")))?;
            trailer.extend_from_slice(&payload);
        }
        let params = Params {
            flags,
            devnum: minor,
            domid: 0,
            path: self.params.clone(),
            prt_devnum,
            req_timeout: self.request_timeout,
            secondary: self.secondary.clone().unwrap_or_default(),
        };
        let message = Message::new(MessageType::Open, cookie(minor)?, Body::Params(params));
        Ok((message, trailer))
    }
}

/// What `unpause` changes when it reopens the image chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumeRequest {
    /// A new `"type:/path"` to open instead of the old one (`-a`); `None` reopens the same.
    pub params: Option<String>,
    /// Secondary image (`-2`; adds `SECONDARY`).
    pub secondary: Option<String>,
    /// Changed-block log file (`-c`; adds `ADD_LOG` and sends the path after the message).
    pub log_path: Option<String>,
}

impl ResumeRequest {
    /// The RESUME message for `minor` and the payload that follows it.
    pub fn to_message(&self, minor: u32) -> Result<(Message, Vec<u8>)> {
        let mut flags = OpenFlags::default();
        if self.secondary.is_some() {
            flags |= OpenFlags::SECONDARY;
        }
        let mut trailer = Vec::new();
        if let Some(log) = &self.log_path {
            flags |= OpenFlags::ADD_LOG;
            let payload = encode_log_path(log)
                .map_err(|e| Error::new(libc::ENAMETOOLONG, format!("log path {log:?}: {e}")))?;
            trailer.extend_from_slice(&payload);
        }
        let params = Params {
            flags,
            devnum: 0,
            domid: 0,
            path: self.params.clone().unwrap_or_default(),
            // The C tap-ctl zeroes the whole message; a RESUME never
            // reuses a parent, and tapdisk ignores the field.
            prt_devnum: 0,
            req_timeout: 0,
            secondary: self.secondary.clone().unwrap_or_default(),
        };
        let message = Message::new(MessageType::Resume, cookie(minor)?, Body::Params(params));
        Ok((message, trailer))
    }
}

/// Sends a body-less request about `minor` and checks the reply.
fn simple(
    dir: &ControlDir,
    pid: u32,
    minor: u32,
    msg_type: MessageType,
    timeout: Option<Duration>,
) -> Result<Message> {
    let message = Message::new(msg_type, cookie(minor)?, Body::Empty);
    request(dir, pid, &message, &[], timeout)
}

/// Asks tapdisk `pid` to serve VBD `minor`'s NBD export on TCP as well (blktap-rs extension
/// `NBD_LISTEN`): `spec` is `ADDRESS tls=DIR` (TLS with `DIR/server-cert.pem` and
/// `DIR/server-key.pem`) or `ADDRESS plain`. Returns the bound address.
pub fn nbd_listen(dir: &ControlDir, pid: u32, minor: u32, spec: &str) -> Result<String> {
    let message = Message::new(
        MessageType::NbdListen,
        cookie(minor)?,
        Body::Text(spec.to_owned()),
    );
    let reply = request(dir, pid, &message, &[], None)?;
    match reply.body {
        Body::Text(address) => Ok(address),
        other => Err(Error::new(
            libc::EPROTO,
            format!(
                "tapdisk {pid} answered NBD_LISTEN with body {:?}",
                other.kind()
            ),
        )),
    }
}

/// The kernel block device serving VBD `minor` (`/dev/ublkbN`, `/dev/loopN`), or `None` when
/// it has none (NBD only, or a tapdisk without the BLOCK_DEVICE extension).
pub fn block_device(dir: &ControlDir, pid: u32, minor: u32) -> Result<Option<PathBuf>> {
    let reply = match simple(
        dir,
        pid,
        minor,
        MessageType::BlockDevice,
        Some(LIST_STATS_TIMEOUT),
    ) {
        Ok(reply) => reply,
        // A tapdisk that does not know the extension answers EINVAL.
        Err(e) if e.errno() == libc::EINVAL => return Ok(None),
        Err(e) => return Err(e),
    };
    match reply.body {
        Body::Text(path) if path.is_empty() => Ok(None),
        Body::Text(path) => Ok(Some(PathBuf::from(path))),
        other => Err(Error::new(
            libc::EPROTO,
            format!(
                "tapdisk {pid} answered BLOCK_DEVICE with body {:?}",
                other.kind()
            ),
        )),
    }
}

/// Asks the tapdisk listening on `ctl<id>` for its pid.
pub fn get_pid(dir: &ControlDir, id: u32) -> Result<u32> {
    get_pid_within(dir, id, LIST_STATS_TIMEOUT)
}

/// [`get_pid`], answered within `timeout`.
pub fn get_pid_within(dir: &ControlDir, id: u32, timeout: Duration) -> Result<u32> {
    let message = Message::new(MessageType::Pid, 0, Body::Empty);
    let reply = request(dir, id, &message, &[], Some(timeout))?;
    match reply.body {
        Body::Pid(pid) => u32::try_from(pid)
            .map_err(|_| Error::new(libc::EPROTO, format!("tapdisk {id} reported pid {pid}"))),
        other => Err(Error::new(
            libc::EPROTO,
            format!("tapdisk {id} answered PID with body {:?}", other.kind()),
        )),
    }
}

/// Creates VBD `minor` in tapdisk `pid` (tapdisk locks the minor's marker file).
pub fn attach(dir: &ControlDir, pid: u32, minor: u32) -> Result<()> {
    simple(dir, pid, minor, MessageType::Attach, None).map(drop)
}

/// Removes VBD `minor` from tapdisk `pid`; tapdisk exits after its last VBD is detached.
pub fn detach(dir: &ControlDir, pid: u32, minor: u32) -> Result<()> {
    detach_within(dir, pid, minor, None)
}

fn detach_within(dir: &ControlDir, pid: u32, minor: u32, timeout: Option<Duration>) -> Result<()> {
    simple(dir, pid, minor, MessageType::Detach, timeout).map(drop)
}

/// Opens an image on VBD `minor` of tapdisk `pid`; returns the image geometry.
pub fn open(dir: &ControlDir, pid: u32, minor: u32, req: &OpenRequest) -> Result<ImageInfo> {
    let (message, trailer) = req.to_message(minor)?;
    let reply = request(dir, pid, &message, &trailer, None)?;
    image_of(pid, reply)
}

/// Closes the image of VBD `minor` (FORCE_SHUTDOWN when `force`); `timeout` bounds the wait.
pub fn close(
    dir: &ControlDir,
    pid: u32,
    minor: u32,
    force: bool,
    timeout: Option<Duration>,
) -> Result<()> {
    let msg_type = if force {
        MessageType::ForceShutdown
    } else {
        MessageType::Close
    };
    simple(dir, pid, minor, msg_type, timeout).map(drop)
}

/// Pauses VBD `minor` (drains requests and closes the image chain); `timeout` bounds the wait.
pub fn pause(dir: &ControlDir, pid: u32, minor: u32, timeout: Option<Duration>) -> Result<()> {
    simple(dir, pid, minor, MessageType::Pause, timeout).map(drop)
}

/// Resumes a paused VBD, optionally on a different image.
pub fn unpause(dir: &ControlDir, pid: u32, minor: u32, req: &ResumeRequest) -> Result<()> {
    let (message, trailer) = req.to_message(minor)?;
    request(dir, pid, &message, &trailer, None).map(drop)
}

/// The geometry of the image open on VBD `minor` (DISK_INFO; also works while paused).
pub fn info(dir: &ControlDir, pid: u32, minor: u32) -> Result<ImageInfo> {
    let reply = simple(dir, pid, minor, MessageType::DiskInfo, None)?;
    image_of(pid, reply)
}

fn image_of(pid: u32, reply: Message) -> Result<ImageInfo> {
    match reply.body {
        Body::Image(image) => Ok(image),
        other => Err(Error::new(
            libc::EPROTO,
            format!(
                "tapdisk {pid} sent {} without image info ({:?})",
                reply.msg_type.name(),
                other.kind()
            ),
        )),
    }
}

/// The statistics text of VBD `minor` (`None`: of all VBDs) of tapdisk `pid`.
pub fn stats(dir: &ControlDir, pid: u32, minor: Option<u32>) -> Result<String> {
    let cookie = match minor {
        Some(minor) => cookie(minor)?,
        None => COOKIE_ALL,
    };
    let message = Message::new(MessageType::Stats, cookie, Body::Empty);
    let mut conn = Connection::connect(dir, pid, Some(LIST_STATS_TIMEOUT))?;
    conn.send(&message, &[])?;
    let reply = conn.receive_expected(MessageType::Stats, MessageType::StatsRsp)?;
    let length = match reply.body {
        Body::Stat(stat) => stat.length,
        other => {
            return Err(Error::new(
                libc::EPROTO,
                format!(
                    "tapdisk {pid} sent STATS_RSP without a length ({:?})",
                    other.kind()
                ),
            ))
        }
    };
    let length = usize::try_from(length).map_err(|_| {
        Error::new(
            libc::EPROTO,
            format!("tapdisk {pid} announced {length} bytes of stats"),
        )
    })?;
    let text = conn.receive_payload(length)?;
    // Image paths inside the text may not be UTF-8; keep the rest readable rather than fail.
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// One record of a tapdisk's LIST stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VbdEntry {
    /// The VBD's minor (as sent; -1 would mean unknown).
    pub minor: i32,
    /// `td_vbd_t` state bits (0 = running; 0x2a = paused).
    pub state: i32,
    /// `"type:/path"` of the open image, or empty when none is open.
    pub params: String,
}

/// The VBDs of tapdisk `pid`, in the order the daemon sent them (10 s timeout).
pub fn list_vbds(dir: &ControlDir, pid: u32) -> Result<Vec<VbdEntry>> {
    list_vbds_within(dir, pid, LIST_STATS_TIMEOUT)
}

/// [`list_vbds`], all of it received within `timeout`.
pub fn list_vbds_within(dir: &ControlDir, pid: u32, timeout: Duration) -> Result<Vec<VbdEntry>> {
    let message = Message::new(MessageType::List, COOKIE_ALL, Body::Empty);
    let mut conn = Connection::connect(dir, pid, Some(timeout))?;
    conn.send(&message, &[])?;
    let mut vbds = Vec::new();
    loop {
        let reply = conn.receive_expected(MessageType::List, MessageType::ListRsp)?;
        let entry = match reply.body {
            Body::List(entry) => entry,
            other => {
                return Err(Error::new(
                    libc::EPROTO,
                    format!(
                        "tapdisk {pid} sent LIST_RSP without a record ({:?})",
                        other.kind()
                    ),
                ))
            }
        };
        if entry.count <= 0 {
            return Ok(vbds);
        }
        vbds.push(VbdEntry {
            minor: entry.minor,
            state: entry.state,
            params: entry.path,
        });
    }
}

/// Closes, detaches and frees VBD `minor` of tapdisk `pid` (`tap-ctl destroy`); `timeout`
/// bounds close and detach together.
pub fn destroy(dir: &ControlDir, pid: u32, minor: u32, timeout: Option<Duration>) -> Result<()> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let left = || deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
    close(dir, pid, minor, false, left()).map_err(|e| e.within("closing"))?;
    detach_within(dir, pid, minor, left()).map_err(|e| e.within("detaching"))?;
    crate::alloc::free_settling(dir, minor).map_err(|e| e.within("freeing"))
}
