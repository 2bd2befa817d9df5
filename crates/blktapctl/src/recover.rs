//! `tap-ctl recover`: give a block device whose tapdisk died a new tapdisk.
//!
//! A ublk device created with user recovery outlives a tapdisk killed by a signal: the kernel
//! holds its requests until another process takes over. Recovery is `create` minus the
//! allocation: the minor (and its marker file) still exist, so spawn a tapdisk, attach the
//! minor and open with [`OpenFlags::BLOCKDEV_RECOVER`], which makes tapdisk re-attach to the
//! existing device instead of adding one. With an empty `params`, tapdisk reopens the image
//! the dead tapdisk recorded. On failure the new tapdisk is detached (or terminated) but the
//! minor is kept: the device still exists and may be recovered again.

use std::path::Path;

use crate::create::{start_on_minor, CreatedVbd};
use crate::error::{Error, Result};
use crate::ops::OpenRequest;
use crate::paths::ControlDir;
use tapdisk_proto::OpenFlags;

/// Spawns `tapdisk`, attaches `minor` and reopens its image with the recover flag.
/// `ENOENT` when the minor is not allocated; `EBUSY` (from attach) while a live tapdisk
/// still holds it.
pub fn recover_with(
    dir: &ControlDir,
    tapdisk: &Path,
    minor: u32,
    req: &OpenRequest,
) -> Result<CreatedVbd> {
    let marker = dir.marker_path(minor);
    if !marker.exists() {
        return Err(Error::new(
            libc::ENOENT,
            format!(
                "minor {minor} is not allocated ({} is missing)",
                marker.display()
            ),
        ));
    }
    let mut request = req.clone();
    request.flags |= OpenFlags::BLOCKDEV_RECOVER;
    let shown = if request.params.is_empty() {
        "the recorded image".to_owned()
    } else {
        request.params.clone()
    };
    start_on_minor(dir, tapdisk, minor, marker, &request, &shown)
        .map_err(|e| e.within(format!("recovering minor {minor}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unallocated_minor_is_enoent_and_spawns_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dir = ControlDir::new(root.path());
        // A tapdisk path that does not exist proves nothing was spawned.
        let error = recover_with(
            &dir,
            Path::new("/nonexistent/tapdisk"),
            3,
            &OpenRequest::default(),
        )
        .unwrap_err();
        assert_eq!(error.errno(), libc::ENOENT);
        assert!(
            error.to_string().contains("minor 3 is not allocated"),
            "{error}"
        );
    }
}
