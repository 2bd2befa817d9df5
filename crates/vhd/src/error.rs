//! Error types: [`FormatError`] for pure parsing of on-disk structures and
//! [`VhdError`] for operations on image files.

use std::path::PathBuf;

/// A structure failed to parse or validate. Every variant names the
/// structure, the field and the byte offset (absolute in the file when the
/// caller supplied the structure's base offset, else relative to it).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// A buffer was shorter than the structure needs.
    #[error("{structure} at offset {offset}: need {needed} bytes, have {available}")]
    Truncated {
        /// Structure name ("footer", "dynamic header", ...).
        structure: &'static str,
        /// Offset of the structure.
        offset: u64,
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// A field holds a value that is not allowed.
    #[error("{structure} field `{field}` at offset {offset}: {reason}")]
    Field {
        /// Structure name.
        structure: &'static str,
        /// Field name.
        field: &'static str,
        /// Byte offset of the field.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
}

impl FormatError {
    /// Shorthand for [`FormatError::Field`].
    pub fn field(
        structure: &'static str,
        field: &'static str,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Self::Field {
            structure,
            field,
            offset,
            reason: reason.into(),
        }
    }
}

/// Errors of image-level operations.
#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    /// An I/O call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (names the path or offset).
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// On-disk metadata is malformed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The footer cookie is `v_poison`: a journaled operation is in progress
    /// or was interrupted (use `vhd-util revert`).
    #[error("{path}: image is disabled by an unfinished journaled operation")]
    Disabled {
        /// The image.
        path: String,
    },
    /// The requested size or offset needs physical offsets beyond the
    /// 2 TiB (2^32 sectors) limit of 32-bit BAT entries.
    #[error("{what}: {bytes} bytes exceeds the VHD physical limit of 2 TiB")]
    TooLarge {
        /// What exceeded the limit.
        what: String,
        /// The offending size in bytes.
        bytes: u64,
    },
    /// An argument is out of range or inconsistent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The operation is not supported on this image.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A parent image could not be located.
    #[error("parent of {child} not found: {reason}")]
    ParentNotFound {
        /// The child image.
        child: String,
        /// Why.
        reason: String,
    },
    /// The parent UUID recorded in a child does not match the parent.
    #[error("parent {parent} of {child} has a different UUID than recorded")]
    ParentUuidMismatch {
        /// The child.
        child: String,
        /// The parent path.
        parent: PathBuf,
    },
    /// A sector range lies outside the virtual disk.
    #[error("sectors {sector}..{end} out of range: disk has {total} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// One past the last sector.
        end: u64,
        /// Sectors in the disk.
        total: u64,
    },
    /// The image is open read-only.
    #[error("{0}: image opened read-only")]
    ReadOnly(String),
    /// The tapdisk batmap is missing or corrupt on an image that must have
    /// one; writing would trust garbage.
    #[error("{path}: batmap is invalid ({reason}); refusing to open for writing")]
    BadBatmap {
        /// The image.
        path: String,
        /// What is wrong with the batmap.
        reason: String,
    },
    /// Not enough room (depth limit, fast-resize limit).
    #[error("{0}")]
    NoSpace(String),
    /// A key cannot be used with an image (wrong size, no keyhash, another key's hash).
    #[error("{path}: {source}")]
    Key {
        /// The image whose keyhash the key was checked against.
        path: String,
        /// What is wrong with the key.
        source: crate::crypt::KeyError,
    },
    /// The target already exists.
    #[error("{0} already exists")]
    Exists(String),
    /// Following parents comes back to an image already on the way (or goes deeper than any
    /// real chain): the chain is a loop.
    #[error("parent loop: {0}")]
    ParentLoop(String),
}

impl VhdError {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno value the C tools would return for this error (positive).
    pub fn errno(&self) -> i32 {
        const EIO: i32 = 5;
        const ENOENT: i32 = 2;
        const EEXIST: i32 = 17;
        const EINVAL: i32 = 22;
        const ENOSPC: i32 = 28;
        const EROFS: i32 = 30;
        const EFBIG: i32 = 27;
        const ENOSYS: i32 = 38;
        const ELOOP: i32 = 40;
        match self {
            Self::Io { source, .. } => source.raw_os_error().unwrap_or(EIO),
            Self::Format(_)
            | Self::InvalidArgument(_)
            | Self::ParentUuidMismatch { .. }
            | Self::OutOfRange { .. }
            | Self::BadBatmap { .. }
            | Self::Disabled { .. } => EINVAL,
            Self::TooLarge { .. } => EFBIG,
            Self::Unsupported(_) => ENOSYS,
            Self::ParentNotFound { .. } => ENOENT,
            Self::ReadOnly(_) => EROFS,
            Self::NoSpace(_) => ENOSPC,
            Self::Exists(_) => EEXIST,
            Self::ParentLoop(_) => ELOOP,
            Self::Key { source, .. } => source.errno(),
        }
    }
}

/// Result alias for image operations.
pub type Result<T, E = VhdError> = std::result::Result<T, E>;
