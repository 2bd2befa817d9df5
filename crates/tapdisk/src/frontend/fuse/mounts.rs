//! Mount table reading (`/proc/self/mountinfo`), unmounting, and aborting a FUSE connection.

use std::io;
use std::path::{Path, PathBuf};

use rustix::mount::{unmount, UnmountFlags};

use super::error::FuseError;

/// One line of `/proc/self/mountinfo` (the fields this module needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Device number of the mounted filesystem, `(major, minor)`; for FUSE the minor is the
    /// connection's number under `/sys/fs/fuse/connections`.
    pub device: (u32, u32),
    /// Where it is mounted (octal escapes decoded).
    pub mount_point: PathBuf,
    /// Filesystem type, e.g. `fuse.tapdisk`.
    pub fs_type: String,
    /// Mount source, e.g. `tapdisk`.
    pub source: String,
}

/// Decodes mountinfo's `\ooo` escapes (space, tab, newline, backslash).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], escaped) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&out),
    ))
}

/// Parses one mountinfo line; `None` for a malformed one.
fn parse_line(line: &str) -> Option<MountEntry> {
    // id parent major:minor root mount-point options [optional...] - type source super-options
    let (before, after) = line.split_once(" - ")?;
    let fields: Vec<&str> = before.split(' ').collect();
    let (major, minor) = fields.get(2)?.split_once(':')?;
    let mount_point = unescape(fields.get(4)?);
    let mut rest = after.split(' ');
    let fs_type = rest.next()?.to_owned();
    let source = rest.next().unwrap_or_default().to_owned();
    Some(MountEntry {
        device: (major.parse().ok()?, minor.parse().ok()?),
        mount_point,
        fs_type,
        source,
    })
}

/// Parses mountinfo text, skipping malformed lines.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// The current mount table.
pub fn mount_table() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| parse_mountinfo(&text))
        .unwrap_or_default()
}

/// The topmost mount on `path`, if any.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mount_table()
        .into_iter()
        .rev()
        .find(|entry| entry.mount_point == path)
}

/// Writes `1` to `/sys/fs/fuse/connections/<n>/abort` when the fusectl filesystem is mounted:
/// every pending and future request of that FUSE connection fails with `ENOTCONN`.
pub fn abort_connection(connection: u32) -> bool {
    let abort = format!("/sys/fs/fuse/connections/{connection}/abort");
    std::fs::write(&abort, b"1").is_ok()
}

/// How an unmount went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Nothing was mounted there.
    NotMounted,
    /// Unmounted at once.
    Clean,
    /// Busy: detached from the tree (`MNT_DETACH`); the kernel finishes when the last user
    /// goes, and the FUSE connection was aborted if fusectl allowed it.
    Lazy,
}

/// Unmounts every mount stacked on `path`: plainly, or lazily (and aborting the FUSE
/// connection) when busy.
pub fn unmount_all(path: &Path) -> Result<Unmounted, FuseError> {
    let mut outcome = Unmounted::NotMounted;
    while let Some(entry) = mount_at(path) {
        match unmount(path, UnmountFlags::empty()) {
            Ok(()) => {
                if outcome == Unmounted::NotMounted {
                    outcome = Unmounted::Clean;
                }
            }
            Err(rustix::io::Errno::BUSY) => {
                unmount(path, UnmountFlags::DETACH)
                    .map_err(|e| FuseError::io("lazily unmounting", path, io::Error::from(e)))?;
                if entry.fs_type.starts_with("fuse") && !abort_connection(entry.device.1) {
                    tracing::warn!(
                        "{} was busy and is detached lazily; FUSE connection {} ends with its \
                         last user (mount fusectl on /sys/fs/fuse/connections to abort it)",
                        path.display(),
                        entry.device.1
                    );
                }
                outcome = Unmounted::Lazy;
            }
            // Gone meanwhile.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => break,
            Err(e) => return Err(FuseError::io("unmounting", path, io::Error::from(e))),
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
61 22 0:52 / /run/blktap\\040control/fuse812.3 rw,nosuid,nodev,noatime shared:30 - fuse.tapdisk tapdisk rw,user_id=0,group_id=0
62 1 7:3 / /mnt/disk rw,relatime - ext4 /dev/loop3 rw
this line is not mountinfo
";

    #[test]
    fn parses_fields_and_escapes() {
        let entries = parse_mountinfo(SAMPLE);
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries[1],
            MountEntry {
                device: (0, 52),
                mount_point: PathBuf::from("/run/blktap control/fuse812.3"),
                fs_type: "fuse.tapdisk".into(),
                source: "tapdisk".into(),
            }
        );
        assert_eq!(entries[2].device, (7, 3));
        assert_eq!(entries[2].source, "/dev/loop3");
    }

    #[test]
    fn unescape_keeps_plain_backslashes() {
        assert_eq!(unescape("a\\134b\\011c"), PathBuf::from("a\\b\tc"));
        assert_eq!(unescape("tail\\"), PathBuf::from("tail\\"));
        assert_eq!(unescape("bad\\9xx"), PathBuf::from("bad\\9xx"));
    }

    #[test]
    fn the_current_table_has_the_root() {
        assert!(mount_table()
            .iter()
            .any(|e| e.mount_point == Path::new("/")));
    }
}
