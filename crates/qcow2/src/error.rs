//! The one error type of the crate: what is wrong, where (structure, field, byte offset), and
//! the errno a caller reports for it.

/// A qcow2 structure is invalid, or uses a feature this crate does not implement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Qcow2Error {
    /// A buffer is shorter than the structure it should hold.
    #[error("{structure} at offset {offset}: need {needed} bytes, have {available}")]
    Truncated {
        /// The structure ("header", "header extension", ...).
        structure: &'static str,
        /// Its byte offset in the file.
        offset: u64,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// A field holds a value the format does not allow.
    #[error("{structure} field `{field}` at offset {offset}: {reason}")]
    Field {
        /// The structure ("header", "L2 table", "refcount table", ...).
        structure: &'static str,
        /// The field.
        field: &'static str,
        /// Byte offset of the field (or of the table entry) in the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The image uses a feature that is not implemented; it is refused rather than misread.
    #[error("unsupported qcow2 feature: {feature}")]
    Unsupported {
        /// The feature, named for the operator.
        feature: String,
    },
    /// A compressed cluster cannot be decompressed.
    #[error("compressed cluster at host offset {offset}: {reason}")]
    Compressed {
        /// Host offset of the compressed data.
        offset: u64,
        /// What went wrong.
        reason: String,
    },
}

impl Qcow2Error {
    /// Shorthand for [`Qcow2Error::Field`].
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

    /// Shorthand for [`Qcow2Error::Unsupported`].
    pub fn unsupported(feature: impl Into<String>) -> Self {
        Self::Unsupported {
            feature: feature.into(),
        }
    }

    /// The errno reported for this error: `EOPNOTSUPP` for unimplemented features, `EIO`
    /// for undecodable compressed data, `EINVAL` for invalid structures.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Unsupported { .. } => libc::EOPNOTSUPP,
            Self::Compressed { .. } => libc::EIO,
            Self::Truncated { .. } | Self::Field { .. } => libc::EINVAL,
        }
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Qcow2Error>;
