//! Pure NBD protocol code, one module per phase of a connection:
//!
//! * `handshake`: the greetings (fixed newstyle and old style), client flags, option parsing
//!   and option replies, and [`Negotiation`], the option-phase state machine (including the
//!   TLS-required policy, [`TlsPolicy`]);
//! * `request`: transmission request headers (compact and extended) and their validation
//!   against the negotiated [`Session`] ([`classify_request`]);
//! * `reply`: simple replies, structured and extended reply chunks, read splitting into data
//!   and hole chunks, block status descriptors, and the mapping of I/O errors to NBD errors.
//!
//! This module holds what the phases share: the export's facts ([`ExportInfo`]) and the
//! transmission flags they give, the [`Session`] negotiation hands to transmission, the
//! protocol violations that end a connection ([`ProtoError`]), and big-endian field helpers.
//! Every item of the phase modules is re-exported here, so callers name them `proto::X`.
//!
//! Nothing here performs I/O or touches tokio: every function takes bytes (or decoded
//! values) and returns decoded values or appends encoded bytes to a caller's buffer. The
//! server module drives these functions over a socket; the fuzz targets and property tests
//! drive them over arbitrary input. All multi-byte integers on the wire are big-endian.

mod handshake;
mod reply;
mod request;

pub use handshake::*;
pub use reply::*;
pub use request::*;

/// Transmission flag: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the medium is rotational (never set by this server).
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported on reads.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see a consistent export.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Length of an extended request or reply header.
pub const EXTENDED_HEADER_LEN: usize = 32;

/// Largest string (export name, query) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Request size limit used when an export reports `max_block == 0`.
pub const DEFAULT_MAX_BLOCK: u32 = 32 * 1024 * 1024;

/// Facts about an export that drive negotiation and request validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Writes, trims and write-zeroes are refused with `EPERM`.
    pub read_only: bool,
    /// The export honours flush (and FUA).
    pub can_flush: bool,
    /// The export implements trim.
    pub can_trim: bool,
    /// The export implements write-zeroes.
    pub can_write_zeroes: bool,
    /// The export implements the fast-zero flag of write-zeroes.
    pub can_fast_zero: bool,
    /// The export implements cache (prefetch).
    pub can_cache: bool,
    /// Connections share one consistent view (flush on one is visible on all).
    pub can_multi_conn: bool,
    /// Minimum block size (power of two, 1..=64 KiB).
    pub min_block: u32,
    /// Preferred block size (power of two, >= min_block).
    pub preferred_block: u32,
    /// Largest request payload (multiple of min_block); 0 means the 32 MiB default.
    pub max_block: u32,
    /// Human-readable description sent as `NBD_INFO_DESCRIPTION` when asked for.
    pub description: Option<String>,
    /// Metadata contexts the export answers itself besides `base:allocation`
    /// (`Export::context_status`), e.g. `qemu:dirty-bitmap:NAME`.
    pub meta_contexts: Vec<String>,
}

impl ExportInfo {
    /// A writable export of `size` bytes without optional features, with block sizes
    /// 1 / 4096 / 32 MiB.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            read_only: false,
            can_flush: false,
            can_trim: false,
            can_write_zeroes: false,
            can_fast_zero: false,
            can_cache: false,
            can_multi_conn: false,
            min_block: 1,
            preferred_block: 4096,
            max_block: DEFAULT_MAX_BLOCK,
            description: None,
            meta_contexts: Vec::new(),
        }
    }

    /// Block size constraints (min, preferred, max) made consistent with the spec: min is a
    /// power of two in 1..=64 KiB, preferred a power of two >= min (and >= 512), max a
    /// multiple of min and >= preferred. Out-of-range values fall back to defaults.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let min = if self.min_block.is_power_of_two() && self.min_block <= 64 * 1024 {
            self.min_block
        } else {
            1
        };
        let preferred = if self.preferred_block.is_power_of_two()
            && self.preferred_block >= min
            && self.preferred_block >= 512
        {
            self.preferred_block
        } else {
            4096.max(min)
        };
        let max = if self.max_block == 0 {
            DEFAULT_MAX_BLOCK
        } else {
            self.max_block
        };
        let max = if max % min == 0 && max >= preferred {
            max
        } else {
            // Round the default up to a multiple of min; DEFAULT_MAX_BLOCK already is one
            // (min <= 64 KiB divides 32 MiB), and it is >= any valid preferred below 32 MiB.
            DEFAULT_MAX_BLOCK.max(preferred)
        };
        (min, preferred, max)
    }

    /// Transmission flags describing this export truthfully. `structured` says whether
    /// structured replies were negotiated (needed for `NBD_FLAG_SEND_DF`).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS;
        let writable = !self.read_only;
        if self.read_only {
            flags |= TFLAG_READ_ONLY;
        }
        if self.can_flush {
            flags |= TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
        }
        if self.can_trim && writable {
            flags |= TFLAG_SEND_TRIM;
        }
        if self.can_write_zeroes && writable {
            flags |= TFLAG_SEND_WRITE_ZEROES;
            if self.can_fast_zero {
                flags |= TFLAG_SEND_FAST_ZERO;
            }
        }
        if self.can_cache {
            flags |= TFLAG_SEND_CACHE;
        }
        if self.can_multi_conn {
            flags |= TFLAG_CAN_MULTI_CONN;
        }
        if structured {
            flags |= TFLAG_SEND_DF;
        }
        flags
    }
}

/// Parameters of the transmission phase fixed by negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The export as described to the client.
    pub info: ExportInfo,
    /// Transmission flags sent to the client.
    pub transmission_flags: u16,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The metadata contexts selected, in id order (BLOCK_STATUS answers for each).
    pub contexts: Vec<MetaContext>,
    /// Largest request length accepted.
    pub max_request: u32,
}

/// A protocol violation that ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The client set handshake flags this server did not offer.
    #[error("client flags {flags:#010x} contain unknown bits {unknown:#010x}")]
    UnknownClientFlags {
        /// Flags as received.
        flags: u32,
        /// The bits not understood.
        unknown: u32,
    },
    /// An option header did not start with IHAVEOPT.
    #[error("option header magic is {found:#018x}, expected IHAVEOPT {IHAVEOPT:#018x}")]
    BadOptionMagic {
        /// Magic as received.
        found: u64,
    },
    /// An option carried more data than the server accepts.
    #[error("option {option} announces {length} bytes of data, limit is {MAX_OPTION_LEN}")]
    OptionTooLong {
        /// Option number.
        option: u32,
        /// Announced data length.
        length: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` cannot be refused with a reply, so a bad name closes.
    #[error("NBD_OPT_EXPORT_NAME name is invalid: {reason}")]
    BadExportName {
        /// Why the name was refused.
        reason: &'static str,
    },
    /// A request header did not start with the request magic.
    #[error("request magic is {found:#010x}, expected {REQUEST_MAGIC:#010x}")]
    BadRequestMagic {
        /// Magic as received.
        found: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` before the TLS the server requires (it has no error reply).
    #[error("client asked for an export before starting the required TLS")]
    TlsRequired,
    /// A write payload is too large to read, so the stream cannot be resynchronised.
    #[error("write of {length} bytes at offset {offset} exceeds the request limit {limit}")]
    WriteTooLarge {
        /// Offset of the write.
        offset: u64,
        /// Announced payload length.
        length: u32,
        /// The server's limit.
        limit: u32,
    },
}

fn be_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let raw = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(raw.try_into().ok()?))
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(raw.try_into().ok()?))
}

fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let raw = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(raw.try_into().ok()?))
}

/// Length of a buffer or string as a u32 wire field.
fn wire_len(len: usize) -> u32 {
    // Callers only pass lengths bounded by MAX_STRING_LEN, MAX_EXTENTS_PER_REPLY or the
    // request limit, all far below u32::MAX; saturate rather than panic regardless.
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Longest prefix of `text` of at most `max` bytes ending on a char boundary.
fn truncate_str(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An export with every optional feature, shared by the phase modules' tests.
    pub(super) fn full_info() -> ExportInfo {
        ExportInfo {
            can_flush: true,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            can_cache: true,
            can_multi_conn: true,
            description: Some("desc".into()),
            ..ExportInfo::new(0x1_0000_0000)
        }
    }

    #[test]
    fn block_size_sanitising() {
        let mut info = ExportInfo::new(1);
        assert_eq!(info.block_sizes(), (1, 4096, DEFAULT_MAX_BLOCK));
        info.min_block = 3;
        info.preferred_block = 100;
        info.max_block = 7;
        assert_eq!(info.block_sizes(), (1, 4096, DEFAULT_MAX_BLOCK));
        info.min_block = 512;
        info.preferred_block = 65536;
        info.max_block = 2 << 20;
        assert_eq!(info.block_sizes(), (512, 65536, 2 << 20));
    }
}
