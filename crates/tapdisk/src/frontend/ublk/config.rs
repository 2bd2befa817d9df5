//! Pure decisions behind a ublk device: the settings read from the environment, the feature
//! flags negotiated with the driver, and the block-layer parameters of a VBD.
//!
//! Nothing here touches the kernel, so every rule is unit-tested on machines without ublk.

use libublk::sys;

use crate::driver::{Capabilities, DiskInfo, VDISK_READONLY};

/// Environment variable: hardware queues per device (default [`DEFAULT_QUEUES`]).
pub const QUEUES_ENV: &str = "TAPDISK_UBLK_QUEUES";
/// Environment variable: requests in flight per queue (default [`DEFAULT_DEPTH`]).
pub const DEPTH_ENV: &str = "TAPDISK_UBLK_DEPTH";
/// Environment variable: largest request in KiB (default [`DEFAULT_MAX_IO_KIB`]).
pub const MAX_IO_ENV: &str = "TAPDISK_UBLK_MAX_IO_KIB";
/// Environment variable: `auto` (default) uses `UBLK_F_USER_COPY` when the driver has it,
/// `off` forces the plain copy mode (buffers registered with the driver).
pub const USER_COPY_ENV: &str = "TAPDISK_UBLK_USER_COPY";
/// Environment variable: `inline` (default) or `spawn`, see [`Bridge`].
pub const BRIDGE_ENV: &str = "TAPDISK_UBLK_BRIDGE";
/// Environment variable: `any` (default), `queue` or `other`, see [`Affinity`].
pub const AFFINITY_ENV: &str = "TAPDISK_UBLK_AFFINITY";
/// Environment variable: `1` creates `/dev/xen/blktap-2/tapdev<minor>` links to the device.
pub const COMPAT_SYMLINKS_ENV: &str = "BLKTAP_COMPAT_SYMLINKS";

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

/// Whether requests' data moves with `UBLK_F_USER_COPY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserCopy {
    /// Use it when the driver advertises it.
    Auto,
    /// Never use it: plain copy through buffers registered with the driver.
    Off,
}

/// How a queue thread's VBD calls reach tapdisk's tokio runtime. Neither blocks a tokio
/// worker or the queue thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Which CPUs a queue thread runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Settings of the ublk devices this tapdisk creates.
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

/// A setting in the environment that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}={value:?}: {reason}")]
pub struct ConfigError {
    /// The variable's name.
    pub variable: &'static str,
    /// Its value.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

fn number_in<T>(
    variable: &'static str,
    value: &str,
    range: std::ops::RangeInclusive<T>,
    reason: &'static str,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd,
{
    value
        .trim()
        .parse::<T>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| ConfigError {
            variable,
            value: value.to_owned(),
            reason,
        })
}

fn switch(variable: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim() {
        "1" | "yes" | "on" | "true" => Ok(true),
        "" | "0" | "no" | "off" | "false" => Ok(false),
        _ => Err(ConfigError {
            variable,
            value: value.to_owned(),
            reason: "expected 1 or 0",
        }),
    }
}

impl UblkConfig {
    /// Reads the settings from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup` (variable name to value); unset variables keep
    /// their defaults.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        if let Some(value) = lookup(QUEUES_ENV) {
            config.queues = number_in(QUEUES_ENV, &value, 1..=MAX_QUEUES, "expected 1 to 64")?;
        }
        if let Some(value) = lookup(DEPTH_ENV) {
            config.depth = number_in(DEPTH_ENV, &value, 1..=4096, "expected 1 to 4096")?;
        }
        if let Some(value) = lookup(MAX_IO_ENV) {
            let kib = number_in(
                MAX_IO_ENV,
                &value,
                4..=MAX_IO_KIB_LIMIT,
                "expected a multiple of 4 from 4 to 32768",
            )?;
            if kib % 4 != 0 {
                return Err(ConfigError {
                    variable: MAX_IO_ENV,
                    value,
                    reason: "expected a multiple of 4 from 4 to 32768",
                });
            }
            config.max_io_bytes = kib * 1024;
        }
        if let Some(value) = lookup(USER_COPY_ENV) {
            config.user_copy = match value.trim() {
                "" | "auto" | "1" | "on" => UserCopy::Auto,
                "off" | "0" => UserCopy::Off,
                _ => {
                    return Err(ConfigError {
                        variable: USER_COPY_ENV,
                        value,
                        reason: "expected auto or off",
                    })
                }
            };
        }
        if let Some(value) = lookup(BRIDGE_ENV) {
            config.bridge = match value.trim() {
                "" | "inline" => Bridge::Inline,
                "spawn" => Bridge::Spawn,

                _ => {
                    return Err(ConfigError {
                        variable: BRIDGE_ENV,
                        value,
                        reason: "expected inline or spawn",
                    })
                }
            };
        }
        if let Some(value) = lookup(AFFINITY_ENV) {
            config.affinity = match value.trim() {
                "" | "any" => Affinity::Any,
                "queue" => Affinity::Queue,
                "other" => Affinity::Other,
                _ => {
                    return Err(ConfigError {
                        variable: AFFINITY_ENV,
                        value,
                        reason: "expected any, queue or other",
                    })
                }
            };
        }
        if let Some(value) = lookup(COMPAT_SYMLINKS_ENV) {
            config.compat_symlinks = switch(COMPAT_SYMLINKS_ENV, &value)?;
        }
        Ok(config)
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
/// - `UBLK_F_USER_COPY` when offered, unless the configuration turns it off;
/// - `UBLK_F_USER_RECOVERY` when offered, with `UBLK_F_USER_RECOVERY_REISSUE` when offered too
///   (never `UBLK_F_USER_RECOVERY_FAIL_IO`: requests must wait for the next tapdisk);
/// - `UBLK_F_CMD_IOCTL_ENCODE` when offered (the command encoding libublk speaks).
///
/// Zero copy and automatic buffer registration are not used: requests go through the VBD's
/// own aligned buffers, so the data is copied once either way.
pub fn negotiate(driver_features: Option<u64>, config: &UblkConfig) -> Negotiated {
    let offered = driver_features.unwrap_or(0);
    let has = |flag: u32| offered & u64::from(flag) != 0;
    let user_copy = config.user_copy == UserCopy::Auto && has(sys::UBLK_F_USER_COPY);
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
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn defaults_without_environment() {
        let config = UblkConfig::from_lookup(lookup(&[])).unwrap();
        assert_eq!(
            config,
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

    #[test]
    fn environment_overrides() {
        let config = UblkConfig::from_lookup(lookup(&[
            (QUEUES_ENV, "4"),
            (DEPTH_ENV, " 128 "),
            (MAX_IO_ENV, "1024"),
            (USER_COPY_ENV, "off"),
            (COMPAT_SYMLINKS_ENV, "1"),
            (BRIDGE_ENV, "spawn"),
            (AFFINITY_ENV, "queue"),
        ]))
        .unwrap();
        assert_eq!(config.queues, 4);
        assert_eq!(config.depth, 128);
        assert_eq!(config.max_io_bytes, 1 << 20);
        assert_eq!(config.user_copy, UserCopy::Off);
        assert!(config.compat_symlinks);
        assert_eq!(config.bridge, Bridge::Spawn);
        assert_eq!(config.affinity, Affinity::Queue);
        let other = UblkConfig::from_lookup(lookup(&[(AFFINITY_ENV, "other")])).unwrap();
        assert_eq!(other.affinity, Affinity::Other);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (variable, value) in [
            (QUEUES_ENV, "0"),
            (QUEUES_ENV, "65"),
            (QUEUES_ENV, "two"),
            (DEPTH_ENV, "0"),
            (DEPTH_ENV, "4097"),
            (DEPTH_ENV, "-1"),
            (MAX_IO_ENV, "6"),
            (MAX_IO_ENV, "65536"),
            (USER_COPY_ENV, "maybe"),
            (COMPAT_SYMLINKS_ENV, "2"),
            (BRIDGE_ENV, "thread"),
            (AFFINITY_ENV, "cpu0"),
        ] {
            let error = UblkConfig::from_lookup(lookup(&[(variable, value)])).unwrap_err();
            assert_eq!(error.variable, variable);
            assert_eq!(error.value, value);
            assert!(error.to_string().starts_with(&format!("{variable}=")));
        }
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
        let agreed = negotiate(Some(ALL_612), &UblkConfig::default());
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
        let config = UblkConfig {
            user_copy: UserCopy::Off,
            ..UblkConfig::default()
        };
        let agreed = negotiate(Some(ALL_612), &config);
        assert!(!agreed.user_copy);
        assert_eq!(agreed.ctrl_flags, 0x08 | 0x10 | 0x40);
    }

    #[test]
    fn negotiation_on_old_drivers() {
        // No GET_FEATURES (Linux < 6.5): nothing optional.
        let agreed = negotiate(None, &UblkConfig::default());
        assert_eq!(agreed.ctrl_flags, 0);
        assert!(!agreed.user_copy && !agreed.recovery && !agreed.reissue);
        assert_eq!(describe_flags(0), "plain-copy");
        // Recovery without reissue (6.1-era feature sets).
        let agreed = negotiate(
            Some(u64::from(sys::UBLK_F_USER_RECOVERY)),
            &UblkConfig::default(),
        );
        assert!(agreed.recovery && !agreed.reissue && !agreed.user_copy);
        assert_eq!(agreed.ctrl_flags, 0x08);
        // Reissue is meaningless without recovery.
        let agreed = negotiate(
            Some(u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE)),
            &UblkConfig::default(),
        );
        assert_eq!(agreed.ctrl_flags, 0);
    }

    #[test]
    fn never_asks_for_fail_io_zero_copy_or_auto_registration() {
        let agreed = negotiate(Some(u64::MAX), &UblkConfig::default());
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
