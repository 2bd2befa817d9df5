//! Errors of the FUSE + loop block device: each names the step and the path it failed on, and
//! maps to the errno the control protocol sends back.

use std::io;
use std::path::PathBuf;

/// A failure of the FUSE + loop block device.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// A system call on `path` failed.
    #[error("{step} {}: {source}", path.display())]
    Io {
        /// What was being done ("mounting FUSE at", "LOOP_CONFIGURE", ...).
        step: &'static str,
        /// The file, mount point or device concerned.
        path: PathBuf,
        /// The underlying error (its errno is what the caller gets).
        source: io::Error,
    },
    /// The VBD has no open disk to export.
    #[error("minor {minor}: no open disk to export")]
    NoDisk {
        /// The VBD's minor.
        minor: u16,
    },
    /// Something still uses the block device.
    #[error("{} is in use: {holder}", device.display())]
    Busy {
        /// The loop device.
        device: PathBuf,
        /// Who holds it (a mount, a process, a kernel holder).
        holder: String,
    },
}

impl FuseError {
    /// An [`FuseError::Io`] for `step` on `path`.
    pub fn io(step: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            step,
            path: path.into(),
            source,
        }
    }

    /// The errno this failure is reported with.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Self::NoDisk { .. } => libc::EINVAL,
            Self::Busy { .. } => libc::EBUSY,
        }
    }

    /// Logs the error (with its context) and returns it as the cause of an errno-carrying
    /// `io::Error`, which is what the control layer sends.
    pub fn into_logged_io(self, minor: u16) -> io::Error {
        tracing::error!(minor, "FUSE block device: {self}");
        crate::error::Error::with_source(self.errno(), "FUSE block device", self).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_and_message_name_the_context() {
        let error = FuseError::io(
            "mounting FUSE at",
            "/run/x/fuse1.2",
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert_eq!(error.errno(), libc::EACCES);
        assert!(error
            .to_string()
            .starts_with("mounting FUSE at /run/x/fuse1.2: "));
        let busy = FuseError::Busy {
            device: "/dev/loop7".into(),
            holder: "mounted".into(),
        };
        assert_eq!(busy.errno(), libc::EBUSY);
        assert_eq!(busy.to_string(), "/dev/loop7 is in use: mounted");
        assert_eq!(FuseError::NoDisk { minor: 3 }.errno(), libc::EINVAL);
    }
}
