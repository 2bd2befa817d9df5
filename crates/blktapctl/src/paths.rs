//! Well-known filesystem locations shared by `tap-ctl` and `tapdisk`.
//!
//! Everything lives under one control directory, `/run/blktap-control` by default
//! ([`DEFAULT_CONTROL_DIR`]). `tap-ctl` takes another from the environment variable
//! [`CONTROL_DIR_ENV`] and passes it to the tapdisks it spawns the same way, so tests (and
//! several independent stacks on one host) can run side by side without touching each other.
//! Callers name the directory explicitly with a [`ControlDir`].

use std::path::{Path, PathBuf};

/// Environment variable naming the control directory (read by `tap-ctl` and `tapdisk` in
/// their configuration; set by [`crate::spawn_with`] for the daemon it starts).
pub const CONTROL_DIR_ENV: &str = "BLKTAP_CONTROL_DIR";

/// The control directory when nothing names another.
pub const DEFAULT_CONTROL_DIR: &str = "/run/blktap-control";

/// Highest minor number `allocate` hands out (inclusive), as in the C stack.
pub const MAX_MINOR: u32 = 16383;

/// Parses the pid out of a control socket file name (`ctl<pid>`).
pub fn parse_ctl_socket_name(name: &str) -> Option<u32> {
    pid_after(name, "ctl")
}

/// The decimal pid that is all of `name` after `prefix`.
fn pid_after(name: &str, prefix: &str) -> Option<u32> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The per-tapdisk sockets of the control directory, by file-name prefix: the control
/// socket `ctl<pid>` and each VBD's NBD sockets `<prefix><pid>.<minor>`.
const NBD_SOCKET_PREFIXES: [&str; 4] = ["nbdserver-new", "nbdserver", "nbd-old", "nbd"];

/// The pid of the tapdisk that created socket `name` in the control directory: `ctl<pid>`,
/// `nbdclient<pid>`, `nbd<pid>.<minor>`, `nbd-old<pid>.<minor>`, `nbdserver<pid>.<minor>` or
/// `nbdserver-new<pid>.<minor>`.
pub fn parse_socket_owner(name: &str) -> Option<u32> {
    if let Some(pid) = parse_ctl_socket_name(name).or_else(|| pid_after(name, "nbdclient")) {
        return Some(pid);
    }
    let rest = NBD_SOCKET_PREFIXES
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))?;
    let (pid, minor) = rest.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(minor) {
        return None;
    }
    pid.parse().ok()
}

/// The pid and minor of a VBD's NBD socket name, `nbd<pid>.<minor>` (the one an `-e MINOR`
/// open looks for: the C stack's glob `nbd[0-9]*.<minor>`).
pub fn parse_nbd_socket_name(name: &str) -> Option<(u32, u32)> {
    let (pid, minor) = name.strip_prefix("nbd")?.split_once('.')?;
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    Some((number(pid)?, number(minor)?))
}

/// Parses the minor out of a marker file name (`tapdisk-<minor>`).
pub fn parse_marker_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("tapdisk-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|minor| *minor <= MAX_MINOR)
}

/// One control directory, passed explicitly through the library (tests running in parallel
/// threads each name their own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlDir {
    root: PathBuf,
}

impl ControlDir {
    /// A control directory rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The control directory itself (`<ctl dir>`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory holding the per-minor marker files (`<ctl dir>/tapdisk`).
    pub fn marker_dir(&self) -> PathBuf {
        self.root.join("tapdisk")
    }

    /// Marker file of one minor: `<ctl dir>/tapdisk/tapdisk-<minor>`.
    pub fn marker_path(&self, minor: u32) -> PathBuf {
        self.marker_dir().join(format!("tapdisk-{minor}"))
    }

    /// Control socket of one tapdisk process: `<ctl dir>/ctl<pid>`.
    pub fn ctl_socket_path(&self, pid: u32) -> PathBuf {
        self.root.join(format!("ctl{pid}"))
    }

    /// Where a tapdisk receives sockets for its `nbd:` images (storage migration):
    /// `<ctl dir>/nbdclient<pid>`.
    pub fn nbd_client_socket_path(&self, pid: u32) -> PathBuf {
        self.root.join(format!("nbdclient{pid}"))
    }

    /// NBD (fixed newstyle) socket of one VBD: `<ctl dir>/nbd<pid>.<minor>`.
    pub fn nbd_socket_path(&self, pid: u32, minor: u32) -> PathBuf {
        self.root.join(format!("nbd{pid}.{minor}"))
    }

    /// Recovery state of a ublk device: `<ctl dir>/vbd-<minor>`. While it exists the device
    /// outlives its tapdisk and waits for `tap-ctl recover`.
    pub fn recovery_state_path(&self, minor: u32) -> PathBuf {
        self.root.join(format!("vbd-{minor}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_socket_and_marker_names() {
        assert_eq!(parse_ctl_socket_name("ctl1234"), Some(1234));
        assert_eq!(parse_ctl_socket_name("ctl"), None);
        assert_eq!(parse_ctl_socket_name("ctl12x"), None);
        assert_eq!(parse_ctl_socket_name("nbd12.3"), None);
        assert_eq!(parse_nbd_socket_name("nbd12.3"), Some((12, 3)));
        assert_eq!(parse_nbd_socket_name("nbd-old12.3"), None);
        assert_eq!(parse_nbd_socket_name("nbdserver12.3"), None);
        assert_eq!(parse_nbd_socket_name("nbd12.3x"), None);
        assert_eq!(parse_nbd_socket_name("nbd.3"), None);
        assert_eq!(parse_nbd_socket_name("nbdclient12"), None);
        assert_eq!(parse_marker_name("tapdisk-0"), Some(0));
        assert_eq!(parse_marker_name("tapdisk-16383"), Some(16383));
        assert_eq!(parse_marker_name("tapdisk-16384"), None);
        assert_eq!(parse_marker_name("tapdisk-"), None);
        assert_eq!(parse_marker_name("tapdisk--1"), None);
        assert_eq!(parse_socket_owner("ctl42"), Some(42));
        assert_eq!(parse_socket_owner("nbd42.0"), Some(42));
        assert_eq!(parse_socket_owner("nbd-old42.7"), Some(42));
        assert_eq!(parse_socket_owner("nbdserver42.7"), Some(42));
        assert_eq!(parse_socket_owner("nbdserver-new42.16383"), Some(42));
        assert_eq!(parse_socket_owner("nbdclient42"), Some(42));
        assert_eq!(parse_socket_owner("nbdclient"), None);
        assert_eq!(parse_socket_owner("nbdclient42.0"), None);
        assert_eq!(parse_socket_owner("nbd42"), None);
        assert_eq!(parse_socket_owner("nbd42.x"), None);
        assert_eq!(parse_socket_owner("fuse42.0"), None);
        assert_eq!(parse_socket_owner("vbd-3"), None);
    }

    #[test]
    fn explicit_control_dir_names_its_files() {
        let dir = ControlDir::new("/x/ctl");
        assert_eq!(dir.root(), Path::new("/x/ctl"));
        assert_eq!(dir.marker_dir(), Path::new("/x/ctl/tapdisk"));
        assert_eq!(dir.marker_path(7), Path::new("/x/ctl/tapdisk/tapdisk-7"));
        assert_eq!(dir.ctl_socket_path(42), Path::new("/x/ctl/ctl42"));
        assert_eq!(dir.nbd_socket_path(42, 7), Path::new("/x/ctl/nbd42.7"));
        assert_eq!(
            dir.nbd_client_socket_path(42),
            Path::new("/x/ctl/nbdclient42")
        );
    }
}
