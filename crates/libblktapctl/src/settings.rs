//! Where the library finds the control directory and the tapdisk binary.
//!
//! The C library compiles both in. This one starts from the same kind of defaults
//! ([`DEFAULT_CONTROL_DIR`], the first existing of [`TAPDISK_LOCATIONS`]) and lets a program
//! name others (`tap_ctl_set_control_dir`, `tap_ctl_set_tapdisk`: what the tests do to get a
//! control directory of their own). It reads no environment variable. The settings are
//! shared by every thread of the process.

use std::path::PathBuf;
use std::sync::{PoisonError, RwLock};

use blktapctl::paths::DEFAULT_CONTROL_DIR;
use blktapctl::spawn::TAPDISK_LOCATIONS;
use blktapctl::{ControlDir, Error, Result};

#[derive(Debug)]
struct Settings {
    control_dir: Option<PathBuf>,
    tapdisk: Option<PathBuf>,
}

static SETTINGS: RwLock<Settings> = RwLock::new(Settings {
    control_dir: None,
    tapdisk: None,
});

/// The control directory calls use from now on (`None`: the default).
pub fn set_control_dir(dir: Option<PathBuf>) {
    SETTINGS
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .control_dir = dir;
}

/// The tapdisk binary spawned from now on (`None`: the first installed one).
pub fn set_tapdisk(path: Option<PathBuf>) {
    SETTINGS
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .tapdisk = path;
}

/// The control directory in use.
pub fn control_dir() -> ControlDir {
    let settings = SETTINGS.read().unwrap_or_else(PoisonError::into_inner);
    ControlDir::new(
        settings
            .control_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_DIR)),
    )
}

/// The tapdisk binary to spawn: the one set, else the first of [`TAPDISK_LOCATIONS`] that
/// exists (`ENOENT` if none).
pub fn tapdisk() -> Result<PathBuf> {
    let chosen = SETTINGS
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .tapdisk
        .clone();
    if let Some(path) = chosen {
        return Ok(path);
    }
    TAPDISK_LOCATIONS
        .iter()
        .map(PathBuf::from)
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            Error::new(
                libc::ENOENT,
                format!(
                    "no tapdisk binary in {} or {} (tap_ctl_set_tapdisk names another)",
                    TAPDISK_LOCATIONS[0], TAPDISK_LOCATIONS[1]
                ),
            )
        })
}
