//! The control library behind `tap-ctl` (the role of the C `libblktapctl`).
//!
//! [`paths`] names the files of the control directory shared with `tapdisk`; [`alloc`] hands
//! out minors as marker files; [`spawn`] starts a tapdisk and waits for its control socket.
//! Every operation takes a [`ControlDir`] so callers choose the directory explicitly;
//! [`ControlDir::from_env`] gives the default one.

pub mod alloc;
pub mod error;
pub mod paths;
pub mod spawn;

pub use alloc::{allocate, allocated_minors, free};
pub use error::{strerror, Error, Result};
pub use paths::ControlDir;
pub use spawn::{find_tapdisk, spawn, spawn_with};
