//! The NBD frontend: a VBD exported at `<ctl dir>/nbd<pid>.<minor>` (new-style), with the C
//! stack's companions `nbd-old<pid>.<minor>` (old-style) and the fd receivers
//! `nbdserver-new<pid>.<minor>` / `nbdserver<pid>.<minor>` that serve a client socket passed
//! over `SCM_RIGHTS` (storage migration).
//!
//! The protocol lives in the `nbd` crate; this module only adapts a [`Vbd`] to its
//! [`nbd::Export`] trait. Every connection's requests go through the same VBD queue, so all
//! clients see each other's writes, and pausing the VBD holds every connection's requests.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd::{
    Export, ExportBuffer, ExportInfo, Extent, Handshake, NbdServer, ServerConfig, WriteZeroesFlags,
};

use super::{Frontend, FrontendContext, StartFrontend};
use crate::driver::{Allocation, ZeroFlags, SECTOR_SIZE};
use crate::engine::uring::SubmitBatch;
use crate::engine::IoFuture;
use crate::iobuf::IoBuf;
use crate::vbd::Vbd;

/// Caps on NBD connections (see [`nbd::limit`]; the site file's `[nbd]` section): clients
/// beyond them are refused with an NBD error (newstyle) or closed (old-style), so parked
/// clients cannot take every descriptor of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    /// Connections per VBD, over all its sockets and TCP listeners.
    pub per_vbd: usize,
    /// Connections per tapdisk, over all its VBDs.
    pub per_tapdisk: usize,
}

impl Default for ConnectionCaps {
    fn default() -> Self {
        Self {
            per_vbd: 128,
            per_tapdisk: 1024,
        }
    }
}

/// Descriptors kept for everything but NBD connections: the control socket and its
/// connections, image files, block devices, io_uring, logging.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// Descriptors one NBD connection may hold: its socket and, on UNIX sockets, two
/// duplicates for reply gathering.
pub const DESCRIPTORS_PER_CONNECTION: u64 = 3;

impl ConnectionCaps {
    /// These caps, lowered so that every connection fits in `descriptors` (the process's
    /// `RLIMIT_NOFILE`) with [`RESERVED_DESCRIPTORS`] to spare.
    #[must_use]
    pub fn within_descriptors(self, descriptors: u64) -> Self {
        let room = descriptors.saturating_sub(RESERVED_DESCRIPTORS) / DESCRIPTORS_PER_CONNECTION;
        let room = usize::try_from(room).unwrap_or(usize::MAX);
        Self {
            per_vbd: self.per_vbd.min(room),
            per_tapdisk: self.per_tapdisk.min(room),
        }
    }
}

/// The metadata context of a tracked disk's changed-block log: flag 1 (`STATE_DIRTY`) for
/// the 64 KiB blocks written since the log was created. Named as qemu names its dirty
/// bitmaps, so qemu's and libnbd's tools read it (`nbdinfo --map=qemu:dirty-bitmap:cbt`).
pub const CBT_CONTEXT: &str = "qemu:dirty-bitmap:cbt";

/// Largest request the export accepts (advertised as the maximum block size).
pub const MAX_REQUEST_BYTES: u32 = 32 << 20;

/// Bytes read per request by `NBD_CMD_CACHE`.
const CHUNK_BYTES: u64 = 1 << 20;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Sector number of a byte range that must be sector-aligned.
fn aligned_sectors(offset: u64, len: u64) -> io::Result<(u64, u64)> {
    if offset % SECTOR_SIZE != 0 || len % SECTOR_SIZE != 0 {
        return Err(einval());
    }
    Ok((offset / SECTOR_SIZE, len / SECTOR_SIZE))
}

/// Bytes of idle buffers kept per export.
const POOL_MAX_BYTES: usize = 64 << 20;
/// Idle buffers kept per export.
const POOL_MAX_BUFFERS: usize = 1024;

/// Idle I/O buffers, reused by later requests of the same size: a fresh aligned buffer
/// costs an allocation and zeroing (page faults too, when large) on every request, a reused
/// one neither. Reused buffers are not zeroed again: a read overwrites all of its buffer
/// and a write payload is filled from the socket before use.
#[derive(Debug, Default)]
struct BufferPool {
    idle: std::sync::Mutex<IdleBuffers>,
}

#[derive(Debug, Default)]
struct IdleBuffers {
    buffers: Vec<IoBuf>,
    bytes: usize,
}

impl BufferPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdleBuffers> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self, len: usize) -> IoBuf {
        {
            let mut idle = self.lock();
            // The most recently returned buffers are the likeliest to be in the CPU cache.
            if let Some(index) = idle.buffers.iter().rposition(|buf| buf.len() == len) {
                let buf = idle.buffers.swap_remove(index);
                idle.bytes -= len;
                return buf;
            }
        }
        IoBuf::zeroed(len)
    }

    fn give(&self, buf: IoBuf) {
        let len = buf.len();
        let mut idle = self.lock();
        if idle.buffers.len() < POOL_MAX_BUFFERS && idle.bytes + len <= POOL_MAX_BYTES {
            idle.bytes += len;
            idle.buffers.push(buf);
        }
    }
}

/// A VBD seen through the NBD `Export` trait.
#[derive(Debug)]
pub struct VbdExport {
    vbd: Arc<Vbd>,
    info: ExportInfo,
    pool: BufferPool,
}

impl VbdExport {
    /// Wraps an open VBD; its size and mode are fixed for the export's lifetime (resume refuses
    /// size changes).
    pub fn new(vbd: Arc<Vbd>, name: &str) -> io::Result<Self> {
        let disk = vbd.disk_info().ok_or_else(einval)?;
        let read_only = disk.info & crate::driver::VDISK_READONLY != 0;
        let capabilities = vbd.capabilities();
        let info = ExportInfo {
            size: disk.sectors * SECTOR_SIZE,
            read_only,
            can_flush: true,
            can_trim: capabilities.discard && !read_only,
            // Zeroing always works (by writing zeros if need be); fast only where the image
            // zeroes without writing data.
            can_write_zeroes: !read_only,
            can_fast_zero: capabilities.write_zeroes && !read_only,
            // CACHE reads the range through the VBD.
            can_cache: true,
            // Every connection goes through the one VBD queue, and FLUSH flushes the image.
            can_multi_conn: true,
            min_block: u32::try_from(SECTOR_SIZE).unwrap_or(512),
            preferred_block: 4096,
            max_block: MAX_REQUEST_BYTES,
            description: Some(name.to_owned()),
            meta_contexts: Vec::new(),
        };
        Ok(Self {
            vbd,
            info,
            pool: BufferPool::default(),
        })
    }
}

/// The NBD server reads and writes straight from and into the VBD's aligned buffers.
impl ExportBuffer for IoBuf {
    fn bytes(&self) -> &[u8] {
        self.as_slice()
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Export for VbdExport {
    type Buffer = IoBuf;

    fn info(&self) -> ExportInfo {
        let mut info = self.info.clone();
        // Connections made while the disk is tracked may ask for its changed blocks.
        if self.vbd.chain().is_some_and(|chain| chain.log().is_some()) {
            info.meta_contexts.push(CBT_CONTEXT.to_owned());
        }
        info
    }

    fn buffer(&self, len: usize) -> IoBuf {
        self.pool.take(len)
    }

    fn recycle(&self, buf: IoBuf) {
        self.pool.give(buf);
    }

    fn turn<R>(&self, turn: impl FnOnce() -> R) -> R {
        // The requests one poll of the connection started reach the engine's rings with
        // one `io_uring_enter` each.
        SubmitBatch::around(turn)
    }

    async fn read(&self, offset: u64, buf: IoBuf) -> io::Result<IoBuf> {
        let (sector, _) = aligned_sectors(offset, buf.len() as u64)?;
        self.vbd.read(sector, buf).await
    }

    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> io::Result<()> {
        let (sector, _) = aligned_sectors(offset, data.len() as u64)?;
        let data = Arc::new(data);
        let result = self.vbd.write_shared(sector, Arc::clone(&data)).await;
        if let Ok(buf) = Arc::try_unwrap(data) {
            self.pool.give(buf);
        }
        result?;
        if fua {
            self.vbd.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.vbd.flush().await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        // TRIM is advisory: discard the whole sectors inside the range.
        let first = offset.div_ceil(SECTOR_SIZE);
        let end = offset.saturating_add(len) / SECTOR_SIZE;
        if end > first {
            self.vbd.discard(first, end - first).await?;
        }
        if fua {
            self.vbd.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteZeroesFlags) -> io::Result<()> {
        let (sector, count) = aligned_sectors(offset, len)?;
        let zero_flags = ZeroFlags {
            may_deallocate: !flags.no_hole,
        };
        match self.vbd.write_zeroes(sector, count, zero_flags).await {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                if flags.fast {
                    // The client prefers to know zeroing would be as slow as writing.
                    return Err(e);
                }
                self.vbd.fill_zeroes(sector, count).await?;
            }
            other => other?,
        }
        if flags.fua {
            self.vbd.flush().await?;
        }
        Ok(())
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        // Read the whole sectors covering the range through the VBD, dropping the data.
        let first = offset / SECTOR_SIZE * SECTOR_SIZE;
        let end = offset.saturating_add(len).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let mut at = first;
        while at < end {
            let step = (end - at).min(CHUNK_BYTES);
            let bytes = usize::try_from(step).map_err(|_| einval())?;
            self.vbd
                .read(at / SECTOR_SIZE, IoBuf::zeroed(bytes))
                .await?;
            at += step;
        }
        Ok(())
    }

    async fn context_status(
        &self,
        context: usize,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<Extent>> {
        // The changed-block log is the only context of our own.
        if context != 0 {
            return Err(einval());
        }
        let extents = self.vbd.changed_extents(offset, len).await?;
        Ok(extents
            .into_iter()
            .map(|extent| Extent {
                length: extent.length,
                flags: if extent.changed {
                    nbd::proto::STATE_DIRTY
                } else {
                    0
                },
            })
            .collect())
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        // Round outwards to whole sectors; extents are reported in bytes.
        let first = offset / SECTOR_SIZE;
        let end = offset.saturating_add(len).div_ceil(SECTOR_SIZE);
        let runs = self.vbd.block_status(first, end - first).await?;
        let mut extents = Vec::with_capacity(runs.len());
        let mut at = first * SECTOR_SIZE;
        for run in runs {
            let run_end = at + run.sectors * SECTOR_SIZE;
            let length = run_end.min(offset + len) - at.max(offset);
            let flags = match run.state {
                Allocation::Data => 0,
                Allocation::Zero | Allocation::Absent => 3,
            };
            if length > 0 {
                extents.push(Extent { length, flags });
            }
            at = run_end;
        }
        Ok(extents)
    }
}

/// The sockets of one VBD's export, as the C tapdisk names them (`<suffix>` is
/// `<pid>.<minor>`): `nbd<suffix>` new-style, `nbd-old<suffix>` old-style, and the fd
/// receivers `nbdserver-new<suffix>` (new-style) and `nbdserver<suffix>` (old-style).
const SOCKETS: [(&str, Handshake, bool); 4] = [
    ("nbd", Handshake::Newstyle, false),
    ("nbd-old", Handshake::Oldstyle, false),
    ("nbdserver-new", Handshake::Newstyle, true),
    ("nbdserver", Handshake::Oldstyle, true),
];

/// The running NBD export of one VBD on its UNIX sockets: one server per socket, all over
/// the same VBD.
#[derive(Debug)]
pub struct NbdFrontend {
    servers: Vec<(NbdServer, PathBuf)>,
}

/// How the UNIX-socket export serves its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdSettings {
    /// Gather small read replies while the client has plenty unread
    /// ([`ServerConfig::gather_replies`]); a tuning switch, on by default.
    pub gather_replies: bool,
}

impl Default for NbdSettings {
    fn default() -> Self {
        Self {
            gather_replies: true,
        }
    }
}

/// How an operator asked for a TCP listener (`NBD_LISTEN`'s text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpListen {
    /// Address to bind (port 0 picks a free port).
    pub address: SocketAddr,
    /// Directory with `server-cert.pem` and `server-key.pem`; `None` only when plaintext
    /// was asked for explicitly.
    pub tls_dir: Option<PathBuf>,
}

impl TcpListen {
    /// Parses `ADDRESS tls=DIR` or `ADDRESS plain`; anything else (including an address
    /// alone: plaintext must be explicit) is `EINVAL`.
    pub fn parse(text: &str) -> io::Result<Self> {
        let mut words = text.split_whitespace();
        let address = words
            .next()
            .and_then(|word| word.parse::<SocketAddr>().ok())
            .ok_or_else(einval)?;
        let mode = words.next().ok_or_else(einval)?;
        if words.next().is_some() {
            return Err(einval());
        }
        let tls_dir = match mode {
            "plain" => None,
            _ => Some(PathBuf::from(
                mode.strip_prefix("tls=")
                    .filter(|dir| !dir.is_empty())
                    .ok_or_else(einval)?,
            )),
        };
        Ok(Self { address, tls_dir })
    }
}

/// Binds a UNIX listener at `path` (replacing a stale file) with mode 0600.
fn bind(path: &Path) -> io::Result<tokio::net::UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}

impl StartFrontend for NbdFrontend {
    type Settings = NbdSettings;

    /// Serves the VBD on `<dir>/nbd<pid>.<minor>` (new-style) and on its siblings in the same
    /// directory: the old-style export `nbd-old<pid>.<minor>` and the fd receivers
    /// `nbdserver-new<pid>.<minor>` and `nbdserver<pid>.<minor>`. Must run inside the tokio
    /// runtime.
    async fn start(context: &FrontendContext, settings: NbdSettings) -> io::Result<Self> {
        let name = context.params.as_str();
        let export = Arc::new(VbdExport::new(Arc::clone(&context.vbd), name)?);
        let dir = context.control_dir.root();
        let suffix = format!("{}.{}", context.pid, context.minor);
        let mut servers = Vec::with_capacity(SOCKETS.len());
        for (prefix, handshake, receiver) in SOCKETS {
            let path = dir.join(format!("{prefix}{suffix}"));
            let listener = match bind(&path) {
                Ok(listener) => listener,
                Err(e) => {
                    // Undo what was started (synchronously: the servers stop on drop).
                    for (_, path) in servers.drain(..) {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(crate::error::with_context(
                        e,
                        format!("cannot start the NBD export at {}", path.display()),
                    ));
                }
            };
            let config = ServerConfig {
                export_name: name.to_owned(),
                handshake,
                gather_replies: settings.gather_replies,
                connection_limit: Some(Arc::clone(&context.nbd_connections)),
                ..ServerConfig::default()
            };
            let export = Arc::clone(&export);
            let server = if receiver {
                NbdServer::start_fd_receiver(listener, export, config)
            } else {
                NbdServer::start(listener, export, config)
            };
            servers.push((server, path));
        }
        Ok(Self { servers })
    }
}

impl NbdFrontend {
    /// The socket paths served.
    pub fn sockets(&self) -> impl Iterator<Item = &Path> {
        self.servers.iter().map(|(_, path)| path.as_path())
    }
}

impl Frontend for NbdFrontend {
    fn kind(&self) -> &'static str {
        "nbd"
    }

    /// Stops accepting, drops every connection and removes the socket files.
    fn stop(&mut self, _force: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            for (server, path) in self.servers.drain(..) {
                server.shutdown().await;
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(socket = %path.display(), "cannot remove NBD socket: {e}");
                }
            }
            Ok(())
        })
    }
}

/// The VBD's export on one TCP address (new-style; TLS required unless plaintext was asked
/// for), added by `NBD_LISTEN` and stopped with the VBD.
#[derive(Debug)]
pub struct NbdTcpFrontend {
    server: Option<NbdServer>,
    address: SocketAddr,
}

impl NbdTcpFrontend {
    /// The bound address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl StartFrontend for NbdTcpFrontend {
    type Settings = TcpListen;

    /// Binds `listen.address` and serves the VBD there. Must run inside the tokio runtime.
    async fn start(context: &FrontendContext, listen: TcpListen) -> io::Result<Self> {
        let tls = match &listen.tls_dir {
            Some(dir) => Some(
                nbd::tls::Tls::from_dir(dir)
                    .map_err(|e| crate::error::failure(libc::EINVAL, format!("NBD TLS: {e}")))?,
            ),
            None => {
                tracing::warn!(address = %listen.address, "NBD export on plaintext TCP, as asked");
                None
            }
        };
        let export = Arc::new(VbdExport::new(Arc::clone(&context.vbd), &context.params)?);
        let listener = std::net::TcpListener::bind(listen.address)?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let config = ServerConfig {
            export_name: context.params.clone(),
            tls,
            connection_limit: Some(Arc::clone(&context.nbd_connections)),
            ..ServerConfig::default()
        };
        let server = NbdServer::start_tcp(listener, export, config);
        tracing::info!(%address, tls = listen.tls_dir.is_some(), "NBD export on TCP");
        Ok(Self {
            server: Some(server),
            address,
        })
    }
}

impl Frontend for NbdTcpFrontend {
    fn kind(&self) -> &'static str {
        "nbd-tcp"
    }

    fn stop(&mut self, _force: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if let Some(server) = self.server.take() {
                server.shutdown().await;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Capabilities;
    use crate::testing::{fake_vbd, FakeImage};
    use crate::vbd::DEFAULT_REQUEST_TIMEOUT;

    #[test]
    fn export_flags_follow_the_capabilities() {
        let info = |image: FakeImage| {
            let vbd = Arc::new(fake_vbd(image, DEFAULT_REQUEST_TIMEOUT));
            VbdExport::new(vbd, "x").unwrap().info()
        };
        let all = Capabilities {
            discard: true,
            write_zeroes: true,
            block_status: true,
        };
        let none = info(FakeImage::new(8));
        assert!(!none.can_trim && !none.can_fast_zero && !none.read_only);
        // Zeroing always works (by writing zeros if need be).
        assert!(none.can_write_zeroes && none.can_flush && none.can_multi_conn);
        assert_eq!(none.size, 8 * 512);
        let both = info(FakeImage::new(8).with_capabilities(all));
        assert!(both.can_trim && both.can_fast_zero && both.can_write_zeroes);
        let read_only = info(FakeImage::new(8).with_capabilities(all).read_only());
        assert!(read_only.read_only);
        assert!(!read_only.can_trim && !read_only.can_fast_zero && !read_only.can_write_zeroes);
    }

    #[test]
    fn buffers_are_reused_by_size_within_limits() {
        let pool = BufferPool::default();
        let small = pool.take(4096);
        let small_at = small.as_slice().as_ptr();
        pool.give(small);
        let large = pool.take(1 << 20);
        pool.give(large);
        // Same size: the idle buffer comes back; another size gets a fresh one.
        assert_eq!(pool.take(4096).as_slice().as_ptr(), small_at);
        assert_eq!(pool.take(8192).len(), 8192);
        // The pool keeps at most POOL_MAX_BYTES of idle buffers.
        for _ in 0..(POOL_MAX_BYTES >> 20) + 4 {
            pool.give(IoBuf::zeroed(1 << 20));
        }
        assert!(pool.lock().bytes <= POOL_MAX_BYTES);
    }

    #[test]
    fn caps_leave_descriptors_for_the_control_plane() {
        let caps = ConnectionCaps::default();
        assert_eq!(caps.within_descriptors(1 << 20), caps);
        // ulimit -n 1024: 256 kept, 768 / 3 = 256 connections.
        let tight = caps.within_descriptors(1024);
        assert_eq!(tight.per_tapdisk, 256);
        assert_eq!(tight.per_vbd, 128);
        assert_eq!(caps.within_descriptors(100).per_tapdisk, 0);
    }

    #[test]
    fn listen_specs() {
        let tls = TcpListen::parse("127.0.0.1:10809 tls=/etc/pki/nbd").unwrap();
        assert_eq!(tls.address, "127.0.0.1:10809".parse().unwrap());
        assert_eq!(tls.tls_dir, Some(PathBuf::from("/etc/pki/nbd")));
        let plain = TcpListen::parse("[::1]:0 plain").unwrap();
        assert_eq!(plain.tls_dir, None);
        for bad in [
            "",
            "127.0.0.1:1",
            "localhost:1 plain",
            "127.0.0.1:1 tls=",
            "1.2.3.4:5 tls=/a b",
        ] {
            let error = TcpListen::parse(bad).unwrap_err();
            assert_eq!(error.raw_os_error(), Some(libc::EINVAL), "{bad:?}");
        }
    }
}
