//! The control library behind `tap-ctl` (the role of the C `libblktapctl`).
//!
//! * [`paths`] names the files of the control directory shared with `tapdisk`;
//! * [`alloc`] hands out minors as marker files (reclaiming those a dead tapdisk left),
//!   [`marker`] tells who holds one;
//! * [`spawn`](mod@spawn) starts a tapdisk and waits for its control socket;
//! * [`ipc`] is the control-socket client, [`ops`] the per-VBD requests built on it;
//! * [`list`](mod@list) joins minors, tapdisks and VBDs for `tap-ctl list`;
//! * [`create`](mod@create) strings allocate + spawn + attach + open together, undoing on failure;
//! * [`recover`](mod@recover) gives a block device whose tapdisk died a new tapdisk;
//! * [`xen`] connects and disconnects Xen guests' rings (what tapback sends).
//!
//! Every operation takes a [`ControlDir`], and those that start a tapdisk the path of the
//! binary: the caller chooses both (`tap-ctl` from its configuration); the library reads no
//! environment. Every failure is an [`Error`]: an errno and what was being done.

pub mod alloc;
pub mod commit;
pub mod create;
pub mod error;
pub mod ipc;
pub mod list;
pub mod marker;
pub mod ops;
pub mod paths;
pub mod recover;
pub mod spawn;
pub mod xen;

pub use alloc::{allocate, allocated_minors, free, free_settling};
pub use commit::CommitStatus;
pub use create::{create_with, CreatedVbd};
pub use error::{strerror, Error, Result};
pub use list::{find_minor, find_pid, list, list_pid, ListFilter, ListRow};
pub use ops::{
    attach, block_device, close, destroy, detach, get_pid, info, list_vbds, nbd_listen, open,
    pause, stats, unpause, OpenRequest, ResumeRequest, VbdEntry,
};
pub use paths::ControlDir;
pub use recover::recover_with;
pub use spawn::spawn_with;
pub use tapdisk_proto::{Blkif, ImageInfo, ImageLocator, ImageSpec, OpenFlags};
pub use xen::{connect_xenblkif, disconnect_xenblkif};
