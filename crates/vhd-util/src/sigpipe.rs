//! A closed output pipe ends `vhd-util` and `td-util` quietly, as it ends the C tools.
//!
//! Rust programs start with `SIGPIPE` ignored, so writing to a pipe whose reader has gone
//! fails with `EPIPE`, and `println!` turns that into a panic with a backtrace
//! (`vhd-util check -n x.vhd | head -1`). The C tool keeps the default disposition: the
//! kernel ends it with `SIGPIPE`, silently. Restoring that default is the one thing this
//! module does, and the only `unsafe` of the crate.

/// Restores the default action of `SIGPIPE` (terminate, no message). Call it first in `main`,
/// before any thread exists.
pub fn terminate_on_broken_pipe() {
    // SAFETY: `signal` with `SIG_DFL` installs no handler, so no code of ours ever runs in
    // signal context; called at the start of `main`, no other thread can race the change.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
