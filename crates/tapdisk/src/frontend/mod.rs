//! Frontends: the ways a VBD's requests arrive.
//!
//! Each frontend turns its protocol's requests into calls on [`crate::vbd::Vbd`] and is one
//! [`Frontend`] in its VBD's list (see `server.rs`):
//! - [`nbd`]: the per-VBD NBD export at `<ctl dir>/nbd<pid>.<minor>` (always on), and TCP
//!   listeners added by `NBD_LISTEN`;
//! - a kernel block device, chosen per VBD at open ([`BlockDeviceChoice`]): [`ublk`]
//!   (`/dev/ublkbN`, the in-tree successor of the blktap2 driver) or, where the kernel has no
//!   ublk, [`fuse`] (the disk as a single FUSE file attached to a loop device, `/dev/loopN`).
//!
//! [`holders`] answers "who holds this device" for every kernel-device frontend.

pub mod fuse;
pub mod holders;
pub mod nbd;
pub mod ublk;

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blktapctl::paths::ControlDir;
use tapdisk_proto::OpenFlags;

use crate::engine::IoFuture;
use crate::error::failure;
use crate::vbd::Vbd;
use holders::Holder;

/// Which kernel block device serves a VBD (the `BLOCKDEV_*` open flags; `tap-ctl -b`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockDeviceChoice {
    /// ublk if the kernel has it, else FUSE + loop; an error if neither is available.
    Auto,
    /// NBD only.
    None,
    /// ublk, or fail.
    Ublk,
    /// FUSE + loop, or fail.
    Fuse,
}

impl BlockDeviceChoice {
    /// The choice encoded in open flags; `EINVAL` when more than one is set.
    pub fn from_flags(flags: OpenFlags) -> io::Result<Self> {
        let bits = flags.bits() & OpenFlags::BLOCKDEV_MASK.bits();
        match bits {
            0 => Ok(Self::Auto),
            b if b == OpenFlags::BLOCKDEV_NONE.bits() => Ok(Self::None),
            b if b == OpenFlags::BLOCKDEV_UBLK.bits() => Ok(Self::Ublk),
            b if b == OpenFlags::BLOCKDEV_FUSE.bits() => Ok(Self::Fuse),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

/// What every frontend of a VBD is started with.
#[derive(Debug, Clone)]
pub struct FrontendContext {
    /// The VBD to serve (open: its disk information and capabilities are known).
    pub vbd: Arc<Vbd>,
    /// Its minor.
    pub minor: u16,
    /// This tapdisk's pid.
    pub pid: u32,
    /// The control directory (for socket names, mount points and state files).
    pub control_dir: ControlDir,
    /// `type:/path` of the image (for names and logs).
    pub params: String,
}

/// A running frontend of one VBD: one way its requests arrive (the NBD sockets, a TCP
/// listener, a kernel block device, later a Xen blkif ring). A VBD slot holds a list of them;
/// CLOSE stops them all, newest first.
///
/// A frontend submits everything through [`Vbd`] (so a pause holds it and the counters count
/// it) and offers only what [`Vbd::capabilities`] says the image chain really does (discard,
/// fast zeroing, block status). It is started by its kind's [`StartFrontend::start`].
pub trait Frontend: Send + Sync + fmt::Debug {
    /// Short name of the kind, for logs: `nbd`, `nbd-tcp`, `ublk`, `fuse`.
    fn kind(&self) -> &'static str;

    /// The kernel block device node this frontend serves (`/dev/ublkb3`, `/dev/loop0`), if
    /// it is one. Shown by `tap-ctl stats` as `blockdev` and answered to `BLOCK_DEVICE`.
    fn device(&self) -> Option<&Path> {
        None
    }

    /// Who holds the frontend right now (a mount, an open descriptor, a stacked device), or
    /// `None` when a non-forced [`Frontend::stop`] may remove it. Frontends nothing can hold
    /// (sockets: clients are simply disconnected) keep the default, `None`.
    fn holder(&self) -> IoFuture<'_, Option<Holder>> {
        Box::pin(async { Ok(None) })
    }

    /// Stops serving and removes what the frontend created (device, sockets, links). Unless
    /// `force`, fails with `EBUSY` while something holds it, and then changes nothing: the
    /// frontend keeps working. Forced, it always goes (in-use devices fail their I/O).
    fn stop(&mut self, force: bool) -> IoFuture<'_, ()>;

    /// What the frontend adds to `tap-ctl stats`.
    fn stats(&self) -> FrontendStats {
        FrontendStats {
            blockdev: self.device().map(Path::to_path_buf),
        }
    }
}

/// Starting one kind of [`Frontend`] (a separate trait so that running frontends of every
/// kind fit in one list of `Box<dyn Frontend>`).
pub trait StartFrontend: Frontend + Sized {
    /// What this kind needs besides the VBD: socket settings, device settings, an address.
    type Settings: Send;

    /// Starts serving `context.vbd`; on failure nothing is left behind.
    fn start(
        context: &FrontendContext,
        settings: Self::Settings,
    ) -> impl Future<Output = io::Result<Self>> + Send;
}

/// A frontend's part of `tap-ctl stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontendStats {
    /// The kernel block device it serves, if any.
    pub blockdev: Option<PathBuf>,
}

/// Starts the block device `choice` asks for; `Ok(None)` for [`BlockDeviceChoice::None`].
pub async fn start_block_device(
    choice: BlockDeviceChoice,
    context: &FrontendContext,
    ublk: ublk::UblkStart,
) -> io::Result<Option<Box<dyn Frontend>>> {
    let kind = match choice {
        BlockDeviceChoice::None => return Ok(None),
        BlockDeviceChoice::Auto if ublk::available() => BlockDeviceChoice::Ublk,
        BlockDeviceChoice::Auto if fuse::available() => BlockDeviceChoice::Fuse,
        BlockDeviceChoice::Auto => {
            return Err(failure(
                libc::ENODEV,
                "no block device possible: neither ublk (/dev/ublk-control) nor FUSE (/dev/fuse) \
                 is available; open with block device 'none' for an NBD-only disk",
            ));
        }
        other => other,
    };
    let device: Box<dyn Frontend> = match kind {
        BlockDeviceChoice::Ublk => Box::new(ublk::UblkDevice::start(context, ublk).await?),
        _ => Box::new(fuse::FuseBlockDevice::start(context, ()).await?),
    };
    Ok(Some(device))
}
