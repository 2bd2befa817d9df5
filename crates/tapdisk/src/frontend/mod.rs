//! Frontends: the ways a VBD's requests arrive.
//!
//! Each frontend turns its protocol's requests into calls on [`crate::vbd::Vbd`]:
//! - [`nbd`]: the per-VBD NBD export at `<ctl dir>/nbd<pid>.<minor>` (always on);
//! - a kernel block device, chosen per VBD at open ([`BlockDeviceChoice`]): [`ublk`]
//!   (`/dev/ublkbN`, the in-tree successor of the blktap2 driver) or, where the kernel has no
//!   ublk, [`fuse`] (the disk as a single FUSE file attached to a loop device, `/dev/loopN`).

pub mod fuse;
pub mod nbd;
pub mod ublk;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tapdisk_proto::OpenFlags;

use crate::engine::IoFuture;
use crate::vbd::Vbd;

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

/// What a block-device frontend needs to know about its VBD.
#[derive(Debug, Clone)]
pub struct BlockDeviceContext {
    /// The VBD to serve.
    pub vbd: Arc<Vbd>,
    /// Its minor.
    pub minor: u16,
    /// This tapdisk's pid.
    pub pid: u32,
    /// The control directory (for mount points and state files).
    pub control_dir: PathBuf,
    /// `type:/path` of the image (for names and logs).
    pub params: String,
}

/// A running kernel block device of one VBD.
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// The device node, e.g. `/dev/ublkb3` or `/dev/loop0`.
    fn path(&self) -> &Path;
    /// Removes the device. Unless `force`, fails with `EBUSY` while something holds it open,
    /// and the device keeps working.
    fn stop(&mut self, force: bool) -> IoFuture<'_, ()>;
}

/// Starts the block device `choice` asks for; `Ok(None)` for [`BlockDeviceChoice::None`].
pub async fn start_block_device(
    choice: BlockDeviceChoice,
    context: BlockDeviceContext,
) -> io::Result<Option<Box<dyn BlockDevice>>> {
    let kind = match choice {
        BlockDeviceChoice::None => return Ok(None),
        BlockDeviceChoice::Auto if ublk::available() => BlockDeviceChoice::Ublk,
        BlockDeviceChoice::Auto if fuse::available() => BlockDeviceChoice::Fuse,
        BlockDeviceChoice::Auto => {
            tracing::error!(
                minor = context.minor,
                "no block device possible: neither ublk (/dev/ublk-control) nor FUSE (/dev/fuse) is available; \
                 open with block device 'none' for an NBD-only disk"
            );
            return Err(io::Error::from_raw_os_error(libc::ENODEV));
        }
        other => other,
    };
    let device = match kind {
        BlockDeviceChoice::Ublk => ublk::start(context).await?,
        _ => fuse::start(context).await?,
    };
    Ok(Some(device))
}
