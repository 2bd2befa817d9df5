//! The control library behind `tap-ctl` (the role of the C `libblktapctl`).
//!
//! [`paths`] names the files of the control directory shared with `tapdisk`.

pub mod paths;
