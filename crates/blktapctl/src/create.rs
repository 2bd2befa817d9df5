//! `tap-ctl create`: allocate a minor, spawn a tapdisk, attach the minor and open the image,
//! undoing every completed step when a later one fails.

use std::path::{Path, PathBuf};

use rustix::process::{kill_process, Pid, Signal};

use crate::alloc::{allocate, free_settling};
use crate::error::Result;
use crate::ops::{attach, block_device, detach, open, OpenRequest};
use crate::paths::ControlDir;
use crate::spawn::spawn_with;
use tapdisk_proto::ImageInfo;

/// A VBD brought up by [`create_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedVbd {
    pub minor: u32,
    pub pid: u32,
    /// The minor's marker file (what `tap-ctl create` prints without a block device).
    pub marker: PathBuf,
    pub image: ImageInfo,
    /// The kernel block device serving the VBD, if it has one (printed instead).
    pub device: Option<PathBuf>,
}

/// Allocates a minor, spawns `tapdisk`, attaches the minor and opens `req` on it.
///
/// On failure everything done so far is undone (best effort; the first error is returned):
/// the new tapdisk is detached (it then exits) or, if attach never succeeded, terminated;
/// then the minor is freed.
pub fn create_with(dir: &ControlDir, tapdisk: &Path, req: &OpenRequest) -> Result<CreatedVbd> {
    let (minor, marker) = allocate(dir).map_err(|e| e.within("allocating a minor"))?;
    start_on_minor(dir, tapdisk, minor, marker, req, &req.params).inspect_err(|_| {
        let _ = free_settling(dir, minor);
    })
}

/// Spawns `tapdisk`, attaches the allocated `minor` and opens `req` on it: the steps `create`
/// and `recover` share. On failure the new tapdisk is detached (it then exits) or, if attach
/// never succeeded, terminated; the minor is left to the caller. `what` names the image in
/// the error.
pub(crate) fn start_on_minor(
    dir: &ControlDir,
    tapdisk: &Path,
    minor: u32,
    marker: PathBuf,
    req: &OpenRequest,
    what: &str,
) -> Result<CreatedVbd> {
    let pid = spawn_with(dir, tapdisk).map_err(|e| e.within("spawning tapdisk"))?;
    if let Err(e) = attach(dir, pid, minor) {
        terminate(pid);
        return Err(e.within(format!("attaching minor {minor} to tapdisk {pid}")));
    }
    match open(dir, pid, minor, req) {
        Ok(image) => Ok(CreatedVbd {
            minor,
            pid,
            marker,
            image,
            device: block_device(dir, pid, minor).unwrap_or(None),
        }),
        Err(e) => {
            if detach(dir, pid, minor).is_err() {
                terminate(pid);
            }
            Err(e.within(format!("opening {what} on minor {minor}")))
        }
    }
}

/// Sends SIGTERM to a tapdisk we started (errors ignored: it may already be gone).
fn terminate(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, Signal::TERM);
    }
}
