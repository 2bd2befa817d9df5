//! Frontends: the ways a VBD's requests arrive.
//!
//! Each frontend turns its protocol's requests into calls on [`crate::vbd::Vbd`] and is one
//! [`Frontend`] in its VBD's list (see `server.rs`):
//! - [`nbd`]: the per-VBD NBD export at `<ctl dir>/nbd<pid>.<minor>` (always on), and TCP
//!   listeners added by `NBD_LISTEN`;
//! - a kernel block device, chosen per VBD at open ([`BlockDeviceChoice`]): [`ublk`]
//!   (`/dev/ublkbN`, the in-tree successor of the blktap2 driver) or, where the kernel has no
//!   ublk, [`fuse`] (the disk as a single FUSE file attached to a loop device, `/dev/loopN`);
//! - [`blkif`]: Xen guests' shared rings (`vbd3`), one frontend per ring, added by
//!   tapback's `XENBLKIF_CONNECT`.
//!
//! [`holders`] answers "who holds this device" for every kernel-device frontend.

pub mod blkif;
pub mod fuse;
pub mod holders;
pub mod nbd;
pub mod ublk;

use std::any::Any;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
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

/// The block device a VBD gets when its OPEN does not choose one (`block_device.open` and
/// `block_device.create` in tapdisk's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDeviceDefaults {
    /// For an OPEN without any choice bit: what C clients (libxl, the C `tap-ctl`) and
    /// `tap-ctl open` without `-b` send, and so every open the storage manager makes. Built
    /// in: none, as the v4 C stack, where a VBD has no kernel device of its own.
    pub open: BlockDeviceChoice,
    /// For an OPEN with [`OpenFlags::BLOCKDEV_CREATE_DEFAULT`]: `tap-ctl create` without
    /// `-b`. Built in: auto, so `create` prints a device.
    pub create: BlockDeviceChoice,
}

impl Default for BlockDeviceDefaults {
    fn default() -> Self {
        Self {
            open: BlockDeviceChoice::None,
            create: BlockDeviceChoice::Auto,
        }
    }
}

impl BlockDeviceChoice {
    /// The choice encoded in open flags, with `defaults` where the flags leave it to the
    /// site; `EINVAL` when more than one choice bit is set.
    pub fn from_flags(flags: OpenFlags, defaults: &BlockDeviceDefaults) -> io::Result<Self> {
        let bits = flags.bits() & OpenFlags::BLOCKDEV_CHOICE.bits();
        match bits {
            0 => Ok(defaults.open),
            b if b == OpenFlags::BLOCKDEV_CREATE_DEFAULT.bits() => Ok(defaults.create),
            b if b == OpenFlags::BLOCKDEV_AUTO.bits() => Ok(Self::Auto),
            b if b == OpenFlags::BLOCKDEV_NONE.bits() => Ok(Self::None),
            b if b == OpenFlags::BLOCKDEV_UBLK.bits() => Ok(Self::Ublk),
            b if b == OpenFlags::BLOCKDEV_FUSE.bits() => Ok(Self::Fuse),
            _ => Err(failure(
                libc::EINVAL,
                format!("open flags {bits:#x} choose more than one block device"),
            )),
        }
    }

    /// Whether `flags` choose a block device themselves (`tap-ctl -b`,
    /// `$BLKTAP_BLOCK_DEVICE`) rather than leave it to the site's defaults (C clients,
    /// `tap-ctl open` and `create` without a choice). Only such a choice fails an open
    /// when the device cannot be made.
    pub fn chosen_by(flags: OpenFlags) -> bool {
        let bits = flags.bits() & OpenFlags::BLOCKDEV_CHOICE.bits();
        bits != 0 && bits != OpenFlags::BLOCKDEV_CREATE_DEFAULT.bits()
    }

    /// The name used by `tap-ctl -b` and the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::None => "none",
            Self::Ublk => "ublk",
            Self::Fuse => "fuse",
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
    /// The cap on the VBD's NBD connections (all its sockets and TCP listeners together),
    /// itself inside the tapdisk's cap.
    pub nbd_connections: Arc<::nbd::ConnectionLimit>,
}

/// A running frontend of one VBD: one way its requests arrive (the NBD sockets, a TCP
/// listener, a kernel block device, a Xen guest's blkif ring). A VBD slot holds a list of
/// them; CLOSE stops them all, newest first.
///
/// A frontend submits everything through [`Vbd`] (so a pause holds it and the counters count
/// it) and offers only what [`Vbd::capabilities`] says the image chain really does (discard,
/// fast zeroing, block status). It is started by its kind's [`StartFrontend::start`].
pub trait Frontend: AsAny + Send + Sync + fmt::Debug {
    /// Short name of the kind, for logs: `nbd`, `nbd-tcp`, `ublk`, `fuse`, `blkif`.
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
            ..FrontendStats::default()
        }
    }
}

/// Any frontend as [`Any`], so that the handler of a kind's own control messages (say
/// `XENBLKIF_DISCONNECT`) can find the frontends of that kind in a VBD's list
/// ([`downcast`]). Implemented for every frontend type.
pub trait AsAny {
    /// `self` as [`Any`].
    fn as_any(&self) -> &dyn Any;
}

impl<T: Frontend + 'static> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `frontend` as a `T`, if it is one.
pub fn downcast<T: Frontend + 'static>(frontend: &dyn Frontend) -> Option<&T> {
    frontend.as_any().downcast_ref::<T>()
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
    /// A connected Xen guest ring's counters (`"xenbus"`).
    pub xenbus: Option<crate::stats::XenbusStats>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_bits_and_site_defaults() {
        let built_in = BlockDeviceDefaults::default();
        let choose = |flags: OpenFlags, defaults: &BlockDeviceDefaults| {
            BlockDeviceChoice::from_flags(flags, defaults).unwrap()
        };
        // C clients and `tap-ctl open` without -b: none, as the C stack.
        assert_eq!(
            choose(OpenFlags::RDONLY, &built_in),
            BlockDeviceChoice::None
        );
        // `tap-ctl create` without -b: auto.
        assert_eq!(
            choose(OpenFlags::BLOCKDEV_CREATE_DEFAULT, &built_in),
            BlockDeviceChoice::Auto
        );
        // Explicit choices win over any site default.
        let site = BlockDeviceDefaults {
            open: BlockDeviceChoice::Ublk,
            create: BlockDeviceChoice::None,
        };
        assert_eq!(choose(OpenFlags::empty(), &site), BlockDeviceChoice::Ublk);
        assert_eq!(
            choose(OpenFlags::BLOCKDEV_CREATE_DEFAULT, &site),
            BlockDeviceChoice::None
        );
        for (flag, choice) in [
            (OpenFlags::BLOCKDEV_AUTO, BlockDeviceChoice::Auto),
            (OpenFlags::BLOCKDEV_NONE, BlockDeviceChoice::None),
            (OpenFlags::BLOCKDEV_UBLK, BlockDeviceChoice::Ublk),
            (OpenFlags::BLOCKDEV_FUSE, BlockDeviceChoice::Fuse),
        ] {
            assert_eq!(choose(flag, &site), choice);
            assert_eq!(choose(flag | OpenFlags::NO_O_DIRECT, &built_in), choice);
            assert!(BlockDeviceChoice::chosen_by(flag | OpenFlags::RDONLY));
        }
        // Left to the site: a missing device does not fail the open.
        assert!(!BlockDeviceChoice::chosen_by(OpenFlags::RDONLY));
        assert!(!BlockDeviceChoice::chosen_by(
            OpenFlags::BLOCKDEV_CREATE_DEFAULT
        ));
        let two = BlockDeviceChoice::from_flags(
            OpenFlags::BLOCKDEV_AUTO | OpenFlags::BLOCKDEV_NONE,
            &built_in,
        )
        .unwrap_err();
        assert_eq!(crate::error::errno_of(&two), libc::EINVAL);
    }
}
