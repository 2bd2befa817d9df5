//! The single error type of the control library: an errno plus a description of what failed.
//!
//! `tap-ctl` exits with the errno (a positive value, as the C tool does), so every failure in
//! the library is reduced to one errno. The context string says what was being attempted, naming
//! the path, pid or minor involved.

use std::fmt;

/// Result alias used throughout the library.
pub type Result<T> = std::result::Result<T, Error>;

/// A failed control operation: a positive errno and what was being done when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    errno: i32,
    context: String,
}

impl Error {
    /// An error with a positive `errno` (a non-positive value is replaced by `EIO`).
    pub fn new(errno: i32, context: impl Into<String>) -> Self {
        let errno = if errno > 0 { errno } else { libc::EIO };
        Self {
            errno,
            context: context.into(),
        }
    }

    /// Converts an I/O error, keeping its OS errno (timeouts become `ETIMEDOUT`).
    pub fn from_io(err: &std::io::Error, context: impl Into<String>) -> Self {
        Self::new(io_errno(err), context)
    }

    /// Converts a rustix errno.
    pub fn from_errno(err: rustix::io::Errno, context: impl Into<String>) -> Self {
        Self::new(err.raw_os_error(), context)
    }

    /// The positive errno (what `tap-ctl` exits with).
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// What was being done when the error happened.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// The same errno with `outer` prepended to the context (`"<outer>: <context>"`).
    #[must_use]
    pub fn within(self, outer: impl fmt::Display) -> Self {
        Self {
            errno: self.errno,
            context: format!("{outer}: {}", self.context),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, strerror(self.errno))
    }
}

impl std::error::Error for Error {}

/// The errno behind an I/O error; timeouts map to `ETIMEDOUT`, anything without one to `EIO`.
pub(crate) fn io_errno(err: &std::io::Error) -> i32 {
    match err.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => libc::ETIMEDOUT,
        std::io::ErrorKind::UnexpectedEof => libc::EPIPE,
        _ => err.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// The C library's description of `errno` (e.g. `"No such file or directory"`).
pub fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(cut) => text[..cut].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_drops_the_os_error_suffix() {
        assert_eq!(strerror(libc::ENOENT), "No such file or directory");
        assert_eq!(strerror(libc::EOPNOTSUPP), "Operation not supported");
    }

    #[test]
    fn display_is_context_then_strerror() {
        let err = Error::new(libc::EBUSY, "freeing minor 3");
        assert_eq!(err.to_string(), "freeing minor 3: Device or resource busy");
        assert_eq!(err.errno(), libc::EBUSY);
        let outer = err.within("destroy");
        assert_eq!(outer.context(), "destroy: freeing minor 3");
    }

    #[test]
    fn non_positive_errno_becomes_eio_and_timeouts_become_etimedout() {
        assert_eq!(Error::new(0, "x").errno(), libc::EIO);
        assert_eq!(Error::new(-2, "x").errno(), libc::EIO);
        let timeout = std::io::Error::from(std::io::ErrorKind::WouldBlock);
        assert_eq!(Error::from_io(&timeout, "x").errno(), libc::ETIMEDOUT);
        let missing = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(Error::from_io(&missing, "x").errno(), libc::ENOENT);
    }
}
