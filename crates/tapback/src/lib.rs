//! tapback: the XenStore side of Xen's `vbd3` disks.
//!
//! For every device under `/local/domain/<own domid>/backend/vbd3/<domid>/<devid>` it does
//! what the C tapback does: find the tapdisk serving it (from `physical-device-path`, the
//! VBD's NBD socket `<ctl dir>/nbd<pid>.<minor>`, once `hotplug-status` is `connected`),
//! follow the XenbusState handshake with the guest's front end, send tapdisk
//! `XENBLKIF_CONNECT` with the ring's grant references, order, ABI and event channel,
//! publish the disk's geometry and features, and `XENBLKIF_DISCONNECT` when the front end
//! closes or goes away.
//!
//! * [`xenstore`]: the xenstored wire protocol (a pure codec) and a small client over its
//!   UNIX socket (or `/dev/xen/xenbus`);
//! * [`backend`]: the per-device state machine, over a [`backend::Store`] and a
//!   [`backend::Tapdisks`] so that it can be tested without Xen;
//! * [`cli`]: the command line (its manual page is `docs/man/tapback.8`).

pub mod backend;
pub mod cli;
pub mod xenstore;
