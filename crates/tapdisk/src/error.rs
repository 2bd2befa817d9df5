//! One error carrier for the daemon: an errno, what was being done, and the error that caused
//! it.
//!
//! The control protocol answers a failed request with a positive errno (what `tap-ctl` exits
//! with) and, in `response.message`, up to 255 bytes of text for the operator. [`Error`] holds
//! the errno, a context ("opening vhd:/a.vhd", "ublk: ADD_DEV") and its cause as the source
//! chain ([`std::error::Error::source`]). The daemon's I/O paths speak `io::Result`, so an
//! [`Error`] travels inside an `io::Error` ([`failure`], [`with_context`], or `?` on a
//! `Result<_, Error>`); [`errno_of`] and [`message_of`] read it back out. Plain errno errors
//! (`io::Error::from_raw_os_error`) keep working everywhere and carry no message: `tap-ctl`
//! prints the errno's own text after the message.

use std::fmt;
use std::io;

/// The cause of an [`Error`].
type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An errno, what was being done, and why it failed.
#[derive(Debug)]
pub struct Error {
    errno: i32,
    context: String,
    source: Option<Source>,
}

impl Error {
    /// `errno` with an explanation and no further cause.
    pub fn new(errno: i32, context: impl Into<String>) -> Self {
        Self {
            errno,
            context: context.into(),
            source: None,
        }
    }

    /// `errno` while doing `context`, caused by `source`.
    pub fn with_source(errno: i32, context: impl Into<String>, source: impl Into<Source>) -> Self {
        Self {
            errno,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// The positive errno sent back.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The text for the operator: this context, then those of the causes (joined by `": "`),
    /// down to the first cause that is not an `Error`, whose text ends it unless it is a bare
    /// errno (`tap-ctl` prints that one itself).
    pub fn message(&self) -> String {
        let cause = self.source.as_deref().map(cause_text).unwrap_or_default();
        match (self.context.is_empty(), cause.is_empty()) {
            (_, true) => self.context.clone(),
            (true, false) => cause,
            (false, false) => format!("{}: {cause}", self.context),
        }
    }
}

/// The operator's text of a cause (see [`Error::message`]).
fn cause_text(cause: &(dyn std::error::Error + Send + Sync + 'static)) -> String {
    if let Some(ours) = cause.downcast_ref::<Error>() {
        return ours.message();
    }
    if let Some(io) = cause.downcast_ref::<io::Error>() {
        return match io.get_ref() {
            Some(inner) => match inner.downcast_ref::<Error>() {
                Some(ours) => ours.message(),
                None => inner.to_string(),
            },
            // A bare errno: its text is the errno's.
            None if io.raw_os_error().is_some() => String::new(),
            None => io.to_string(),
        };
    }
    cause.to_string()
}

impl fmt::Display for Error {
    /// The whole explanation ([`Error::message`]), so that logging an `io::Error` carrying
    /// one shows every layer.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

impl From<Error> for io::Error {
    /// An `io::Error` of the errno's kind carrying `error`.
    fn from(error: Error) -> Self {
        let kind = io::Error::from_raw_os_error(error.errno).kind();
        io::Error::new(kind, error)
    }
}

/// An `io::Error` carrying `errno` and `message`; its kind matches the errno.
pub fn failure(errno: i32, message: impl Into<String>) -> io::Error {
    Error::new(errno, message).into()
}

/// The errno of an error: its OS code, the errno of an [`Error`] inside, else `EIO`.
pub fn errno_of(error: &io::Error) -> i32 {
    error
        .raw_os_error()
        .or_else(|| Some(error.get_ref()?.downcast_ref::<Error>()?.errno))
        .unwrap_or(libc::EIO)
}

/// The operator message of an error carrying an [`Error`] (empty for a bare errno or any
/// other error).
pub fn message_of(error: &io::Error) -> String {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
        .map(Error::message)
        .unwrap_or_default()
}

/// `error` as the cause of doing `context`, keeping its errno. (The errno's own text is not
/// repeated: `tap-ctl` prints it after the message.)
pub fn with_context(error: io::Error, context: impl fmt::Display) -> io::Error {
    Error::with_source(errno_of(&error), context.to_string(), error).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

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

    #[test]
    fn the_source_chain_is_kept() {
        let root = io::Error::from_raw_os_error(libc::EACCES);
        let inner = with_context(root, "opening /a.img");
        let outer = with_context(inner, "open vhd:/a.img");
        assert_eq!(errno_of(&outer), libc::EACCES);
        // Walk the chain: outer Error -> io::Error(inner Error) -> io::Error(EACCES).
        let ours = outer.get_ref().unwrap().downcast_ref::<Error>().unwrap();
        let inner = ours.source().unwrap().downcast_ref::<io::Error>().unwrap();
        let inner = inner.get_ref().unwrap().downcast_ref::<Error>().unwrap();
        assert_eq!(inner.context, "opening /a.img");
        let root = inner.source().unwrap().downcast_ref::<io::Error>().unwrap();
        assert_eq!(root.raw_os_error(), Some(libc::EACCES));
        // A cause that is not ours ends the message with its own text.
        let parse = "x".parse::<u32>().unwrap_err();
        let error = Error::with_source(libc::EINVAL, "ublk.queues", parse);
        assert_eq!(
            error.message(),
            "ublk.queues: invalid digit found in string"
        );
        assert_eq!(error.to_string(), error.message());
        let other = with_context(io::Error::other("device gone"), "STOP_DEV");
        assert_eq!(message_of(&other), "STOP_DEV: device gone");
        assert_eq!(errno_of(&other), libc::EIO);
    }
}
