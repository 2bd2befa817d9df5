//! tapdisk: the daemon that serves virtual block devices (VBDs) from disk images.
//!
//! Data flows one way: a **frontend** ([`frontend`], e.g. the NBD export) submits requests
//! to a **VBD** ([`vbd`]), which passes them to its **image chain** ([`image`]) of format
//! **drivers** ([`driver`]), which do file I/O through an **I/O engine** ([`engine`]).
//! The **control socket** ([`control`]) receives `tap-ctl`'s messages and hands them to the
//! process state ([`server`]), which creates, opens, pauses and closes VBDs, and runs live
//! commits of qcow2 chains ([`commit`]). The configuration ([`config`]) is read once by
//! `main` and passed down.

pub mod changelog;
pub mod commit;
pub mod config;
pub mod control;
pub mod crypt;
pub mod driver;
pub mod engine;
pub mod error;
pub mod frontend;
pub mod image;
pub mod iobuf;
pub mod lcache;
pub mod logging;
pub mod secondary;
pub mod server;
pub mod stats;
pub mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod vbd;
