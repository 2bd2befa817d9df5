//! Pure decisions behind a ublk device: its settings (per VBD: queues, depth, largest
//! request, copy mode; daemon-wide tuning: thread placement), the feature flags negotiated
//! with the driver, and the block-layer parameters of a VBD. The values come from tapdisk's
//! configuration ([`crate::config`]), which checks their ranges.
//!
//! Nothing here touches the kernel, so every rule is unit-tested on machines without ublk.

use libublk::sys;
use serde::{Deserialize, Serialize};

use crate::driver::{Capabilities, DiskInfo, VDISK_READONLY};

/// Default number of queues (each one a thread serving its requests).
pub const DEFAULT_QUEUES: u16 = 2;
/// Default queue depth.
pub const DEFAULT_DEPTH: u16 = 64;
/// Default largest request, in KiB.
pub const DEFAULT_MAX_IO_KIB: u32 = 512;
/// Largest request the driver's buffer encoding allows, in KiB (`UBLK_IO_BUF_BITS` = 25).
pub const MAX_IO_KIB_LIMIT: u32 = 32 * 1024;
/// Most queues accepted (a thread each; the driver allows more).
pub const MAX_QUEUES: u16 = 64;
/// Deepest queue accepted.
pub const MAX_DEPTH: u16 = 4096;

/// Whether requests' data moves with `UBLK_F_USER_COPY` (`ublk.user_copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UserCopy {
    /// Use it when the driver advertises it.
    Auto,
    /// Never use it: plain copy through buffers registered with the driver.
    Off,
}

/// How a queue thread's VBD calls reach tapdisk's tokio runtime (`tuning.ublk_bridge`).
/// Neither blocks a tokio worker or the queue thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bridge {
    /// The call is polled on the queue thread, which has entered the runtime's context (for
    /// the blocking pool, timers and the io_uring engine); whoever completes the call's I/O
    /// elsewhere wakes the queue thread. A request the image serves at once (a page-cache
    /// read) never leaves the queue thread. The default.
    Inline,
    /// The call is spawned as a tokio task; its result comes back through a oneshot channel
    /// (two thread switches per request, kept for comparison).
    Spawn,
}

/// Which CPUs a queue thread runs on (`tuning.ublk_affinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// Any CPU tapdisk may use: the scheduler puts the queue thread beside the submitter or
    /// on an idle CPU. The default.
    Any,
    /// The CPUs the driver maps to the queue (libublk's pinning): with as many queues as
    /// CPUs, each queue thread shares one CPU with the processes that submit to it, and
    /// competes with the very process whose I/O it serves while other CPUs idle.
    Queue,
    /// Any CPU tapdisk may use except those the driver maps to the queue, where the
    /// processes submitting to it run: server and submitters never take each other's CPU
    /// (like [`Affinity::Any`] when the queue's CPUs are all there are). In the VM
    /// benchmark it was within the noise of [`Affinity::Any`] (ahead in three paired
    /// rounds of one run, behind in two of three of another).
    Other,
}

/// Settings of one ublk device: the VBD's own (queues, depth, largest request, copy mode,
/// compatibility link: site defaults, overridden per open) and tapdisk-wide tuning (bridge,
/// thread placement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UblkConfig {
    /// Hardware queues (one serving thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Largest request in bytes (a multiple of 4096).
    pub max_io_bytes: u32,
    /// Data transfer mode preference.
    pub user_copy: UserCopy,
    /// Create `/dev/xen/blktap-2/tapdev<minor>` links.
    pub compat_symlinks: bool,
    /// How VBD calls reach the runtime.
    pub bridge: Bridge,
    /// Where queue threads run.
    pub affinity: Affinity,
}

impl Default for UblkConfig {
    fn default() -> Self {
        Self {
            queues: DEFAULT_QUEUES,
            depth: DEFAULT_DEPTH,
            max_io_bytes: DEFAULT_MAX_IO_KIB * 1024,
            user_copy: UserCopy::Auto,
            compat_symlinks: false,
            bridge: Bridge::Inline,
            affinity: Affinity::Any,
        }
    }
}

/// What the driver and tapdisk agreed on for one new device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// `UBLK_F_*` flags to request in ADD_DEV.
    pub ctrl_flags: u64,
    /// Data moves with `pread`/`pwrite` on `/dev/ublkcN` (`UBLK_F_USER_COPY`).
    pub user_copy: bool,
    /// The device survives its tapdisk (`UBLK_F_USER_RECOVERY`).
    pub recovery: bool,
    /// Requests in flight when the tapdisk died are re-issued to the next one
    /// (`UBLK_F_USER_RECOVERY_REISSUE`); without it the driver fails them with an error.
    pub reissue: bool,
}

/// Chooses the device flags from the driver's `GET_FEATURES` answer (`None` when the driver
/// predates the command, Linux < 6.5: plain copy, no recovery).
///
/// - `UBLK_F_USER_COPY` when offered, unless `preference` turns it off;
/// - `UBLK_F_USER_RECOVERY` when offered, with `UBLK_F_USER_RECOVERY_REISSUE` when offered too
///   (never `UBLK_F_USER_RECOVERY_FAIL_IO`: requests must wait for the next tapdisk);
/// - `UBLK_F_CMD_IOCTL_ENCODE` when offered (the command encoding libublk speaks).
///
/// Zero copy and automatic buffer registration are not used: requests go through the VBD's
/// own aligned buffers, so the data is copied once either way.
pub fn negotiate(driver_features: Option<u64>, preference: UserCopy) -> Negotiated {
    let offered = driver_features.unwrap_or(0);
    let has = |flag: u32| offered & u64::from(flag) != 0;
    let user_copy = preference == UserCopy::Auto && has(sys::UBLK_F_USER_COPY);
    let recovery = has(sys::UBLK_F_USER_RECOVERY);
    let reissue = recovery && has(sys::UBLK_F_USER_RECOVERY_REISSUE);
    let mut ctrl_flags = 0u64;
    if user_copy {
        ctrl_flags |= u64::from(sys::UBLK_F_USER_COPY);
    }
    if recovery {
        ctrl_flags |= u64::from(sys::UBLK_F_USER_RECOVERY);
    }
    if reissue {
        ctrl_flags |= u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE);
    }
    if has(sys::UBLK_F_CMD_IOCTL_ENCODE) {
        ctrl_flags |= u64::from(sys::UBLK_F_CMD_IOCTL_ENCODE);
    }
    Negotiated {
        ctrl_flags,
        user_copy,
        recovery,
        reissue,
    }
}

/// A short description of device flags for logs, e.g. `user-copy,recovery,reissue`.
pub fn describe_flags(flags: u64) -> String {
    let names = [
        (sys::UBLK_F_USER_COPY, "user-copy"),
        (sys::UBLK_F_USER_RECOVERY, "recovery"),
        (sys::UBLK_F_USER_RECOVERY_REISSUE, "reissue"),
        (sys::UBLK_F_CMD_IOCTL_ENCODE, "ioctl-encode"),
        (sys::UBLK_F_URING_CMD_COMP_IN_TASK, "comp-in-task"),
    ];
    let listed: Vec<&str> = names
        .iter()
        .filter(|(flag, _)| flags & u64::from(*flag) != 0)
        .map(|(_, name)| *name)
        .collect();
    if listed.is_empty() {
        "plain-copy".to_owned()
    } else {
        listed.join(",")
    }
}

/// Largest discard or write-zeroes request the device advertises, in sectors.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// The block-layer parameters of a VBD's device: 512-byte logical and 4096-byte physical
/// blocks, a volatile write cache (so flushes reach the VBD) with FUA, read-only when the disk
/// is, and what the image chain's `capabilities` offer: discard when it deallocates (reading
/// back as zeros), write-zeroes when it zeroes without writing data (otherwise the kernel
/// zeroes by writing zero pages). A read-only disk offers neither.
pub fn device_params(
    disk: &DiskInfo,
    max_io_bytes: u32,
    capabilities: Capabilities,
) -> sys::ublk_params {
    let read_only = disk.info & VDISK_READONLY != 0;
    let mut attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    if read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    let mut params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 9,
            max_sectors: max_io_bytes >> 9,
            dev_sectors: disk.sectors,
            ..Default::default()
        },
        ..Default::default()
    };
    let discard = capabilities.discard && !read_only;
    let write_zeroes = capabilities.write_zeroes && !read_only;
    if discard || write_zeroes {
        // The kernel reads the discard parameters for both operations.
        params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        params.discard = sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: if discard { MAX_DISCARD_SECTORS } else { 0 },
            max_write_zeroes_sectors: if write_zeroes { MAX_DISCARD_SECTORS } else { 0 },
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        assert_eq!(
            UblkConfig::default(),
            UblkConfig {
                queues: 2,
                depth: 64,
                max_io_bytes: 512 * 1024,
                user_copy: UserCopy::Auto,
                compat_symlinks: false,
                bridge: Bridge::Inline,
                affinity: Affinity::Any,
            }
        );
    }

    const ALL_612: u64 = (sys::UBLK_F_URING_CMD_COMP_IN_TASK
        | sys::UBLK_F_NEED_GET_DATA
        | sys::UBLK_F_USER_RECOVERY
        | sys::UBLK_F_USER_RECOVERY_REISSUE
        | sys::UBLK_F_UNPRIVILEGED_DEV
        | sys::UBLK_F_CMD_IOCTL_ENCODE
        | sys::UBLK_F_USER_COPY
        | sys::UBLK_F_ZONED
        | sys::UBLK_F_USER_RECOVERY_FAIL_IO) as u64;

    #[test]
    fn negotiation_on_a_6_12_driver() {
        let agreed = negotiate(Some(ALL_612), UserCopy::Auto);
        assert_eq!(
            agreed,
            Negotiated {
                ctrl_flags: 0x80 | 0x08 | 0x10 | 0x40,
                user_copy: true,
                recovery: true,
                reissue: true,
            }
        );
        assert_eq!(
            describe_flags(agreed.ctrl_flags),
            "user-copy,recovery,reissue,ioctl-encode"
        );
    }

    #[test]
    fn negotiation_with_user_copy_off() {
        let agreed = negotiate(Some(ALL_612), UserCopy::Off);
        assert!(!agreed.user_copy);
        assert_eq!(agreed.ctrl_flags, 0x08 | 0x10 | 0x40);
    }

    #[test]
    fn negotiation_on_old_drivers() {
        // No GET_FEATURES (Linux < 6.5): nothing optional.
        let agreed = negotiate(None, UserCopy::Auto);
        assert_eq!(agreed.ctrl_flags, 0);
        assert!(!agreed.user_copy && !agreed.recovery && !agreed.reissue);
        assert_eq!(describe_flags(0), "plain-copy");
        // Recovery without reissue (6.1-era feature sets).
        let agreed = negotiate(Some(u64::from(sys::UBLK_F_USER_RECOVERY)), UserCopy::Auto);
        assert!(agreed.recovery && !agreed.reissue && !agreed.user_copy);
        assert_eq!(agreed.ctrl_flags, 0x08);
        // Reissue is meaningless without recovery.
        let agreed = negotiate(
            Some(u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE)),
            UserCopy::Auto,
        );
        assert_eq!(agreed.ctrl_flags, 0);
    }

    #[test]
    fn never_asks_for_fail_io_zero_copy_or_auto_registration() {
        let agreed = negotiate(Some(u64::MAX), UserCopy::Auto);
        for flag in [
            sys::UBLK_F_USER_RECOVERY_FAIL_IO,
            sys::UBLK_F_SUPPORT_ZERO_COPY,
            sys::UBLK_F_AUTO_BUF_REG,
            sys::UBLK_F_UNPRIVILEGED_DEV,
            sys::UBLK_F_NEED_GET_DATA,
        ] {
            assert_eq!(agreed.ctrl_flags & u64::from(flag), 0, "flag {flag:#x}");
        }
    }

    #[test]
    fn params_of_a_writable_disk_with_discard() {
        let disk = DiskInfo {
            sectors: 2048,
            sector_size: 512,
            info: 0,
        };
        let discard_only = Capabilities {
            discard: true,
            ..Capabilities::default()
        };
        let params = device_params(&disk, 512 * 1024, discard_only);
        assert_eq!(
            params.types,
            sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
        );
        assert_eq!(params.basic.attrs, 0x4 | 0x8);
        assert_eq!(params.basic.logical_bs_shift, 9);
        assert_eq!(params.basic.physical_bs_shift, 12);
        assert_eq!(params.basic.max_sectors, 1024);
        assert_eq!(params.basic.dev_sectors, 2048);
        assert_eq!(params.discard.discard_granularity, 4096);
        assert_eq!(params.discard.max_discard_sectors, MAX_DISCARD_SECTORS);
        assert_eq!(params.discard.max_discard_segments, 1);
        assert_eq!(params.discard.max_write_zeroes_sectors, 0);
    }

    #[test]
    fn params_follow_the_capabilities() {
        let disk = DiskInfo {
            sectors: 2048,
            sector_size: 512,
            info: 0,
        };
        // A VHD (or a raw file): discard and fast zeroing.
        let both = Capabilities {
            discard: true,
            write_zeroes: true,
            block_status: true,
        };
        let params = device_params(&disk, 4096, both);
        assert_eq!(params.discard.max_discard_sectors, MAX_DISCARD_SECTORS);
        assert_eq!(params.discard.max_write_zeroes_sectors, MAX_DISCARD_SECTORS);
        // Zeroing only (a chain whose leaf cannot deallocate): write-zeroes alone.
        let zero_only = Capabilities {
            write_zeroes: true,
            ..Capabilities::default()
        };
        let params = device_params(&disk, 4096, zero_only);
        assert_ne!(params.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
        assert_eq!(params.discard.max_discard_sectors, 0);
        assert_eq!(params.discard.max_write_zeroes_sectors, MAX_DISCARD_SECTORS);
        // Neither: no discard parameters at all.
        let params = device_params(&disk, 4096, Capabilities::default());
        assert_eq!(params.types, sys::UBLK_PARAM_TYPE_BASIC);
    }

    #[test]
    fn params_of_a_read_only_disk_never_discard() {
        let disk = DiskInfo {
            sectors: 8,
            sector_size: 512,
            info: VDISK_READONLY,
        };
        let all = Capabilities {
            discard: true,
            write_zeroes: true,
            block_status: true,
        };
        let params = device_params(&disk, 4096, all);
        assert_eq!(params.types, sys::UBLK_PARAM_TYPE_BASIC);
        assert_eq!(params.basic.attrs & sys::UBLK_ATTR_READ_ONLY, 1);
        assert_eq!(params.basic.max_sectors, 8);
    }
}
