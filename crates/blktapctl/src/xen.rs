//! The requests tapback sends a tapdisk for a Xen guest's ring (`tap_ctl_connect_xenblkif`
//! and `tap_ctl_disconnect_xenblkif` in the C library).

use tapdisk_proto::{Blkif, Body, Message, MessageType};

use crate::error::{Error, Result};
use crate::ipc::request;
use crate::paths::ControlDir;

/// Connects VBD `minor` of tapdisk `pid` to the guest ring `blkif` describes
/// (XENBLKIF_CONNECT). `EALREADY` when that domain's device is already connected.
pub fn connect_xenblkif(dir: &ControlDir, pid: u32, minor: u32, blkif: &Blkif) -> Result<()> {
    let cookie = u16::try_from(minor)
        .map_err(|_| Error::new(libc::EINVAL, format!("minor {minor} is out of range")))?;
    let message = Message::new(
        MessageType::XenblkifConnect,
        cookie,
        Body::Blkif(blkif.clone()),
    );
    request(dir, pid, &message, &[], None).map(drop)
}

/// Disconnects device `devid` of guest `domid` from tapdisk `pid` (XENBLKIF_DISCONNECT;
/// `ENODEV` when it is not connected there).
pub fn disconnect_xenblkif(dir: &ControlDir, pid: u32, domid: u32, devid: u32) -> Result<()> {
    let blkif = Blkif {
        domid,
        devid,
        ..Blkif::default()
    };
    let message = Message::new(MessageType::XenblkifDisconnect, 0, Body::Blkif(blkif));
    request(dir, pid, &message, &[], None).map(drop)
}
