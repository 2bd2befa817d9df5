//! The recovery state file `<ctl dir>/vbd-<minor>` of a VBD served by ublk.
//!
//! Written (atomically: temporary file, then rename) once the device is live and removed when
//! the device is removed. When a tapdisk dies, the file stays behind with the device, and
//! `tap-ctl recover` without `-a` reopens the image it names. The format is text, one
//! `key=value` per line, `#` comments allowed:
//!
//! ```text
//! # blktap-rs ublk recovery state
//! version=1
//! minor=3
//! pid=4242
//! params=aio:/srv/disk.img
//! read_only=0
//! device=/dev/ublkb3
//! ```
//!
//! Unknown keys are ignored (later versions may add some); a missing or malformed required key
//! is an error naming the key and the line. A file left by a tapdisk that was never recovered is
//! simply overwritten by the next VBD opened on the same minor.

use std::io;
use std::path::{Path, PathBuf};

/// Version written in the `version=` line.
pub const STATE_VERSION: u32 = 1;

/// What a recovered tapdisk needs to know about the VBD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VbdState {
    /// The minor (and ublk device id).
    pub minor: u16,
    /// The tapdisk that served the device.
    pub pid: u32,
    /// `type:/path` of the image.
    pub params: String,
    /// Opened read-only.
    pub read_only: bool,
    /// The block device node.
    pub device: PathBuf,
}

/// Why a state file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A line is not `key=value`.
    #[error("line {line}: expected key=value, found {text:?}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A key's value is malformed.
    #[error("line {line}: bad value {value:?} for {key}")]
    Value {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: &'static str,
        /// The value.
        value: String,
    },
    /// A required key is absent.
    #[error("no {key}= line")]
    Missing {
        /// The key.
        key: &'static str,
    },
    /// The file was written by an unknown format version.
    #[error("unsupported version {version}")]
    Version {
        /// The version found.
        version: u32,
    },
}

/// Path of the state file of `minor` in `control_dir`.
pub fn state_path(control_dir: &Path, minor: u16) -> PathBuf {
    blktapctl::paths::ControlDir::new(control_dir).recovery_state_path(u32::from(minor))
}

impl VbdState {
    /// The file's text.
    pub fn to_text(&self) -> String {
        format!(
            "# blktap-rs ublk recovery state\nversion={STATE_VERSION}\nminor={}\npid={}\nparams={}\nread_only={}\ndevice={}\n",
            self.minor,
            self.pid,
            self.params,
            u8::from(self.read_only),
            self.device.display()
        )
    }

    /// Parses a file's text.
    pub fn parse(text: &str) -> Result<Self, StateError> {
        let mut version = None;
        let mut minor = None;
        let mut pid = None;
        let mut params = None;
        let mut read_only = None;
        let mut device = None;
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let Some((key, value)) = trimmed.split_once('=') else {
                return Err(StateError::Syntax {
                    line,
                    text: raw.to_owned(),
                });
            };
            let bad = |key: &'static str| StateError::Value {
                line,
                key,
                value: value.to_owned(),
            };
            match key.trim() {
                "version" => version = Some(value.parse::<u32>().map_err(|_| bad("version"))?),
                "minor" => minor = Some(value.parse::<u16>().map_err(|_| bad("minor"))?),
                "pid" => pid = Some(value.parse::<u32>().map_err(|_| bad("pid"))?),
                "params" => {
                    if !value.contains(':') || value.len() > tapdisk_proto::PATH_LEN - 1 {
                        return Err(bad("params"));
                    }
                    params = Some(value.to_owned());
                }
                "read_only" => {
                    read_only = Some(match value {
                        "0" => false,
                        "1" => true,
                        _ => return Err(bad("read_only")),
                    });
                }
                "device" => device = Some(PathBuf::from(value)),
                _ => {}
            }
        }
        let version = version.ok_or(StateError::Missing { key: "version" })?;
        if version != STATE_VERSION {
            return Err(StateError::Version { version });
        }
        Ok(Self {
            minor: minor.ok_or(StateError::Missing { key: "minor" })?,
            pid: pid.ok_or(StateError::Missing { key: "pid" })?,
            params: params.ok_or(StateError::Missing { key: "params" })?,
            read_only: read_only.unwrap_or(false),
            device: device.ok_or(StateError::Missing { key: "device" })?,
        })
    }

    /// Writes the state file of this VBD into `control_dir` (mode 0600), replacing any.
    pub fn write(&self, control_dir: &Path) -> io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = state_path(control_dir, self.minor);
        let temporary = control_dir.join(format!(".vbd-{}.{}", self.minor, std::process::id()));
        let result = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(self.to_text().as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        result.map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
    }

    /// Reads the state file of `minor` from `control_dir`. `ENOENT` when there is none,
    /// `EINVAL` when it is malformed (the message names the file and the line).
    pub fn read(control_dir: &Path, minor: u16) -> io::Result<Self> {
        let path = state_path(control_dir, minor);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))?;
        let state = Self::parse(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: {e}", path.display()),
            )
        })?;
        if state.minor != minor {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: records minor {}, expected {minor}",
                    path.display(),
                    state.minor
                ),
            ));
        }
        Ok(state)
    }
}

/// Removes the state file of `minor` (a missing file is fine).
pub fn remove_state(control_dir: &Path, minor: u16) -> io::Result<()> {
    match std::fs::remove_file(state_path(control_dir, minor)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VbdState {
        VbdState {
            minor: 3,
            pid: 4242,
            params: "aio:/srv/disk.img".to_owned(),
            read_only: false,
            device: PathBuf::from("/dev/ublkb3"),
        }
    }

    #[test]
    fn text_is_byte_exact() {
        assert_eq!(
            sample().to_text(),
            "# blktap-rs ublk recovery state\nversion=1\nminor=3\npid=4242\n\
             params=aio:/srv/disk.img\nread_only=0\ndevice=/dev/ublkb3\n"
        );
    }

    #[test]
    fn round_trip_and_tolerance() {
        assert_eq!(VbdState::parse(&sample().to_text()), Ok(sample()));
        let text = "\n# note\nversion=1\nfuture_key=whatever\nminor=3\npid=4242\n\
                    params=aio:/srv/disk.img\ndevice=/dev/ublkb3\n";
        assert_eq!(VbdState::parse(text), Ok(sample()));
        let read_only = sample().to_text().replace("read_only=0", "read_only=1");
        assert!(VbdState::parse(&read_only).unwrap().read_only);
        // A value may itself contain '='.
        let odd = sample().to_text().replace("disk.img", "a=b.img");
        assert_eq!(
            VbdState::parse(&odd).unwrap().params,
            "aio:/srv/a=b.img".to_owned()
        );
    }

    #[test]
    fn errors_name_line_and_key() {
        let text = sample().to_text().replace("pid=4242", "pid=forty");
        assert_eq!(
            VbdState::parse(&text),
            Err(StateError::Value {
                line: 4,
                key: "pid",
                value: "forty".to_owned()
            })
        );
        let text = sample().to_text().replace("minor=3", "minor 3");
        assert_eq!(
            VbdState::parse(&text),
            Err(StateError::Syntax {
                line: 3,
                text: "minor 3".to_owned()
            })
        );
        let text = sample().to_text().replace("params=aio:/srv/disk.img\n", "");
        assert_eq!(
            VbdState::parse(&text),
            Err(StateError::Missing { key: "params" })
        );
        let text = sample().to_text().replace("version=1", "version=7");
        assert_eq!(
            VbdState::parse(&text),
            Err(StateError::Version { version: 7 })
        );
        assert_eq!(
            VbdState::parse(""),
            Err(StateError::Missing { key: "version" })
        );
        let text = sample().to_text().replace("aio:/srv/disk.img", "nocolon");
        assert!(matches!(
            VbdState::parse(&text),
            Err(StateError::Value { key: "params", .. })
        ));
        let text = sample().to_text().replace("minor=3", "minor=70000");
        assert!(matches!(
            VbdState::parse(&text),
            Err(StateError::Value { key: "minor", .. })
        ));
        let text = sample().to_text().replace("read_only=0", "read_only=yes");
        assert!(matches!(
            VbdState::parse(&text),
            Err(StateError::Value {
                key: "read_only",
                ..
            })
        ));
    }

    #[test]
    fn write_read_remove() {
        let dir = tempfile::tempdir().unwrap();
        let state = sample();
        state.write(dir.path()).unwrap();
        let path = state_path(dir.path(), 3);
        assert_eq!(path, dir.path().join("vbd-3"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), state.to_text());
        assert_eq!(VbdState::read(dir.path(), 3).unwrap(), state);
        // Overwriting a stale file.
        let newer = VbdState { pid: 1, ..sample() };
        newer.write(dir.path()).unwrap();
        assert_eq!(VbdState::read(dir.path(), 3).unwrap().pid, 1);
        // A file recording another minor is refused.
        std::fs::copy(&path, state_path(dir.path(), 4)).unwrap();
        let error = VbdState::read(dir.path(), 4).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("vbd-4"), "{error}");
        remove_state(dir.path(), 3).unwrap();
        remove_state(dir.path(), 3).unwrap();
        let error = VbdState::read(dir.path(), 3).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        // Only the two files we made remain (no temporary left behind).
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vbd-4")]);
    }

    #[test]
    fn malformed_file_is_einval_like() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(state_path(dir.path(), 9), "garbage\n").unwrap();
        let error = VbdState::read(dir.path(), 9).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("line 1"), "{error}");
    }
}
