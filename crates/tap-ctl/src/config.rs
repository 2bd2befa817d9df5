//! `tap-ctl`'s configuration: the environment variables it documents, read once in `main` and
//! passed to the command line parser and to the control library (which reads none itself).
//!
//! - `BLKTAP_CONTROL_DIR`: the control directory (default `/run/blktap-control`); passed on to
//!   the tapdisks it spawns.
//! - `BLKTAP_TAPDISK`: the tapdisk binary to spawn. Without it: `tapdisk` beside `tap-ctl`
//!   itself (a built tree works uninstalled), then `/usr/libexec/tapdisk`,
//!   `/usr/lib/blktap/tapdisk`, then the directories of `PATH`.
//! - `BLKTAP_BLOCK_DEVICE`: the block device `create`/`open` ask for when `-b` is not given
//!   (`auto`, `ublk`, `fuse`, `none`); without either, tapdisk's site configuration decides.
//!
//! tapdisk's own settings (`tapdisk.toml`, `TAPDISK_CONFIG`, `TAPDISK_LOG`) reach it through
//! the environment it inherits.

use std::ffi::OsString;
use std::path::PathBuf;

use blktapctl::paths::{CONTROL_DIR_ENV, DEFAULT_CONTROL_DIR};
use blktapctl::{ControlDir, Error};

/// Environment variable naming the tapdisk binary explicitly.
pub const TAPDISK_ENV: &str = "BLKTAP_TAPDISK";

/// Environment variable giving the default of `-b`.
pub const BLOCK_DEVICE_ENV: &str = "BLKTAP_BLOCK_DEVICE";

/// Fixed locations searched for tapdisk (after `$BLKTAP_TAPDISK` and tap-ctl's own
/// directory); `libblktapctl.so` searches the same.
pub use blktapctl::spawn::TAPDISK_LOCATIONS;

/// What `tap-ctl` runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The control directory.
    pub control_dir: ControlDir,
    /// `$BLKTAP_TAPDISK`, if set.
    pub tapdisk: Option<PathBuf>,
    /// Where to look for tapdisk without `$BLKTAP_TAPDISK`, in order.
    pub tapdisk_search: Vec<PathBuf>,
    /// `$BLKTAP_BLOCK_DEVICE`, if set: the default of `-b`.
    pub block_device: Option<String>,
}

impl Config {
    /// A configuration with `control_dir`, no explicit tapdisk or block device, and an empty
    /// search list.
    pub fn new(control_dir: ControlDir) -> Self {
        Self {
            control_dir,
            tapdisk: None,
            tapdisk_search: Vec::new(),
            block_device: None,
        }
    }

    /// Reads the process environment.
    pub fn from_environment() -> Self {
        Self::from_lookup(
            |name| std::env::var_os(name).filter(|value| !value.is_empty()),
            std::env::current_exe().ok(),
        )
    }

    /// Builds the configuration from `env` (variable name to value) and the path of the
    /// running executable.
    pub fn from_lookup(env: impl Fn(&str) -> Option<OsString>, exe: Option<PathBuf>) -> Self {
        let control_dir =
            env(CONTROL_DIR_ENV).map_or_else(|| PathBuf::from(DEFAULT_CONTROL_DIR), PathBuf::from);
        let beside_self = exe.and_then(|exe| exe.parent().map(|dir| dir.join("tapdisk")));
        let on_path: Vec<PathBuf> = env("PATH")
            .map(|path| {
                std::env::split_paths(&path)
                    .map(|dir| dir.join("tapdisk"))
                    .collect()
            })
            .unwrap_or_default();
        let mut config = Self::new(ControlDir::new(control_dir));
        config.tapdisk = env(TAPDISK_ENV).map(PathBuf::from);
        config.tapdisk_search = beside_self
            .into_iter()
            .chain(TAPDISK_LOCATIONS.iter().map(PathBuf::from))
            .chain(on_path)
            .collect();
        config.block_device =
            env(BLOCK_DEVICE_ENV).map(|value| value.to_string_lossy().into_owned());
        config
    }

    /// The tapdisk binary to spawn: `$BLKTAP_TAPDISK` (which must exist), else the first
    /// file of the search list. `ENOENT` when there is none.
    pub fn tapdisk(&self) -> Result<PathBuf, Error> {
        if let Some(explicit) = &self.tapdisk {
            if explicit.is_file() {
                return Ok(explicit.clone());
            }
            return Err(Error::new(
                libc::ENOENT,
                format!("{TAPDISK_ENV}={} does not name a file", explicit.display()),
            ));
        }
        self.tapdisk_search
            .iter()
            .find(|candidate| candidate.is_file())
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    libc::ENOENT,
                    format!(
                        "no tapdisk binary found (set {TAPDISK_ENV}, or install it beside tap-ctl, \
                         in {} or {}, or on PATH)",
                        TAPDISK_LOCATIONS[0], TAPDISK_LOCATIONS[1]
                    ),
                )
            })
            .map_err(|e| e.within("spawning tapdisk"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn defaults_without_environment() {
        let config = Config::from_lookup(env(&[]), Some(PathBuf::from("/opt/bt/tap-ctl")));
        assert_eq!(config.control_dir.root(), Path::new("/run/blktap-control"));
        assert_eq!(config.tapdisk, None);
        assert_eq!(config.block_device, None);
        assert_eq!(
            config.tapdisk_search,
            vec![
                PathBuf::from("/opt/bt/tapdisk"),
                PathBuf::from("/usr/libexec/tapdisk"),
                PathBuf::from("/usr/lib/blktap/tapdisk"),
            ]
        );
    }

    #[test]
    fn environment_variables() {
        let config = Config::from_lookup(
            env(&[
                (CONTROL_DIR_ENV, "/tmp/ctl"),
                (TAPDISK_ENV, "/nonexistent/tapdisk"),
                (BLOCK_DEVICE_ENV, "none"),
                ("PATH", "/a:/b"),
            ]),
            None,
        );
        assert_eq!(config.control_dir.root(), Path::new("/tmp/ctl"));
        assert_eq!(config.block_device.as_deref(), Some("none"));
        assert_eq!(
            config.tapdisk_search[2..],
            [PathBuf::from("/a/tapdisk"), PathBuf::from("/b/tapdisk")]
        );
        let error = config.tapdisk().unwrap_err();
        assert_eq!(error.errno(), libc::ENOENT);
        assert!(
            error
                .to_string()
                .contains("BLKTAP_TAPDISK=/nonexistent/tapdisk"),
            "{error}"
        );
    }

    #[test]
    fn tapdisk_is_the_first_existing_candidate() {
        let dir = tempfile::tempdir().unwrap();
        let found = dir.path().join("tapdisk");
        std::fs::write(&found, "").unwrap();
        let mut config = Config::new(ControlDir::new("/x"));
        config.tapdisk_search = vec![dir.path().join("missing"), found.clone()];
        assert_eq!(config.tapdisk().unwrap(), found);
        config.tapdisk_search.clear();
        assert_eq!(config.tapdisk().unwrap_err().errno(), libc::ENOENT);
        config.tapdisk = Some(found.clone());
        assert_eq!(config.tapdisk().unwrap(), found);
    }
}
