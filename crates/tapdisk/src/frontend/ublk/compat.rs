//! blktap2-compatible names: `/dev/xen/blktap-2/tapdev<minor>` as a symbolic link to the
//! VBD's block device, for tools that expect the old driver's names. Opt-in
//! (`block_device.compat_symlinks` in tapdisk's configuration, or `tap-ctl create/open -o
//! block_device.compat_symlinks=true`); removed when the device is.

use std::io;
use std::path::{Path, PathBuf};

/// Directory of the blktap2 device nodes.
pub const COMPAT_DIR: &str = "/dev/xen/blktap-2";

/// Path of the compatibility link of `minor` in `dir`.
pub fn link_path(dir: &Path, minor: u16) -> PathBuf {
    dir.join(format!("tapdev{minor}"))
}

/// Creates (or replaces) the link `dir/tapdev<minor>` pointing at `device`, creating `dir`.
pub fn create_link(dir: &Path, minor: u16, device: &Path) -> io::Result<PathBuf> {
    let link = link_path(dir, minor);
    let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", link.display()));
    std::fs::create_dir_all(dir).map_err(context)?;
    match std::fs::symlink_metadata(&link) {
        Ok(meta) if meta.file_type().is_symlink() => {
            std::fs::remove_file(&link).map_err(context)?
        }
        Ok(_) => {
            return Err(context(io::Error::from_raw_os_error(libc::EEXIST)));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(context(e)),
    }
    std::os::unix::fs::symlink(device, &link).map_err(context)?;
    Ok(link)
}

/// Removes the link of `minor` in `dir` if it still points at `device` (a link some other
/// device took over since is left alone).
pub fn remove_link(dir: &Path, minor: u16, device: &Path) -> io::Result<()> {
    let link = link_path(dir, minor);
    match std::fs::read_link(&link) {
        Ok(target) if target == device => std::fs::remove_file(&link),
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::InvalidInput
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_replace_and_remove() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("xen").join("blktap-2");
        let link = create_link(&dir, 5, Path::new("/dev/ublkb5")).unwrap();
        assert_eq!(link, dir.join("tapdev5"));
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            PathBuf::from("/dev/ublkb5")
        );
        // A stale link is replaced.
        create_link(&dir, 5, Path::new("/dev/loop0")).unwrap();
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            PathBuf::from("/dev/loop0")
        );
        // Removal only takes our own link.
        remove_link(&dir, 5, Path::new("/dev/ublkb5")).unwrap();
        assert!(std::fs::symlink_metadata(&link).is_ok());
        remove_link(&dir, 5, Path::new("/dev/loop0")).unwrap();
        assert!(std::fs::symlink_metadata(&link).is_err());
        remove_link(&dir, 5, Path::new("/dev/loop0")).unwrap();
    }

    #[test]
    fn a_regular_file_is_never_replaced() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("tapdev1"), "x").unwrap();
        let error = create_link(root.path(), 1, Path::new("/dev/ublkb1")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert!(error.to_string().contains("tapdev1"), "{error}");
        remove_link(root.path(), 1, Path::new("/dev/ublkb1")).unwrap();
        assert!(root.path().join("tapdev1").exists());
    }
}
