//! Errors that carry both an errno and a message for the operator.
//!
//! The control protocol answers a failed request with a positive errno (what `tap-ctl` exits
//! with) and, in `response.message`, up to 255 bytes of text. [`failure`] builds an
//! `io::Error` holding both; [`errno_of`] and [`message_of`] take them apart again. Plain
//! errno errors (`io::Error::from_raw_os_error`) keep working everywhere.

use std::io;

/// An errno with a human-readable explanation (e.g. which file or field is wrong).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// Positive errno.
    pub errno: i32,
    /// What went wrong, for the operator.
    pub message: String,
}

/// An `io::Error` carrying `errno` and `message`; its kind matches the errno.
pub fn failure(errno: i32, message: impl Into<String>) -> io::Error {
    let kind = io::Error::from_raw_os_error(errno).kind();
    io::Error::new(
        kind,
        Failure {
            errno,
            message: message.into(),
        },
    )
}

/// The errno of an error: its OS code, the errno of a [`Failure`], else `EIO`.
pub fn errno_of(error: &io::Error) -> i32 {
    error
        .raw_os_error()
        .or_else(|| error.get_ref()?.downcast_ref::<Failure>().map(|f| f.errno))
        .unwrap_or(libc::EIO)
}

/// The operator message of a [`Failure`] (empty for a bare errno).
pub fn message_of(error: &io::Error) -> String {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Failure>())
        .map(|f| f.message.clone())
        .unwrap_or_default()
}

/// Adds `context` in front of the message of `error`, keeping its errno. (The errno's own
/// text is not repeated: `tap-ctl` prints it after the message.)
pub fn with_context(error: io::Error, context: impl std::fmt::Display) -> io::Error {
    let message = message_of(&error);
    let errno = errno_of(&error);
    if message.is_empty() {
        failure(errno, context.to_string())
    } else {
        failure(errno, format!("{context}: {message}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_keep_errno_and_message() {
        let error = failure(libc::EMEDIUMTYPE, "size changed");
        assert_eq!(errno_of(&error), libc::EMEDIUMTYPE);
        assert_eq!(message_of(&error), "size changed");
        let plain = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(errno_of(&plain), libc::ENOENT);
        assert_eq!(message_of(&plain), "");
        assert_eq!(errno_of(&io::Error::other("x")), libc::EIO);
        let wrapped = with_context(plain, "/a.img");
        assert_eq!(errno_of(&wrapped), libc::ENOENT);
        assert_eq!(message_of(&wrapped), "/a.img");
        let twice = with_context(wrapped, "vhd:/a.img");
        assert_eq!(message_of(&twice), "vhd:/a.img: /a.img");
    }
}
