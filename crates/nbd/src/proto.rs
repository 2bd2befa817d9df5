//! Pure NBD protocol code: constants, the fixed newstyle handshake, option parsing and
//! option replies, request header parsing and validation, and reply encoding.
//!
//! Nothing here performs I/O or touches tokio: every function takes bytes (or decoded
//! values) and returns decoded values or appends encoded bytes to a caller's buffer. The
//! server module drives these functions over a socket; the fuzz targets and property tests
//! drive them over arbitrary input. All multi-byte integers on the wire are big-endian.

use std::fmt;

/// `"NBDMAGIC"`: first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`: newstyle magic sent by the server after [`NBDMAGIC`] and by the client in
/// front of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic in front of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic in front of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic in front of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic in front of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

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

/// Magic after `NBDMAGIC` in the old-style greeting.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Length of the old-style greeting.
pub const OLDSTYLE_GREETING_LEN: usize = 152;

/// Option: choose an export and enter transmission (no reply header).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS (unsupported here).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit extended headers (unsupported here).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success / end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one information item.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: option unknown to this server.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option error: syntactically invalid option.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: the server is shutting down.
/// Reply error: TLS must be negotiated first (`NBD_REP_ERR_TLS_REQD`).
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// Reply error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option error: a request is too big.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information item: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information item: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information item: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch into cache.
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status query.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (write zeroes): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (read): do not fragment the structured reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (block status): one extent is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (write zeroes): fail fast unless zeroing is cheap.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: final chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured chunk: no payload, final.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured chunk: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured chunk: zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured chunk: block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Reply chunk: block status with 64-bit extents (extended headers only).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Request magic with extended headers (64-bit lengths).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Reply chunk magic with extended headers.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
/// Length of an extended request or reply header.
pub const EXTENDED_HEADER_LEN: usize = 32;
/// Structured chunk: error without an offset.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Structured chunk: error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// NBD error: operation not permitted.
pub const EPERM: u32 = 1;
/// NBD error: input/output error.
pub const EIO: u32 = 5;
/// NBD error: out of memory.
pub const ENOMEM: u32 = 12;
/// NBD error: invalid argument.
pub const EINVAL: u32 = 22;
/// NBD error: no space left.
pub const ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const EOVERFLOW: u32 = 75;
/// NBD error: operation not supported.
pub const ENOTSUP: u32 = 95;
/// NBD error: server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Extent status flag of `base:allocation`: unallocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// Extent status flag of `base:allocation`: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// Name of the one metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id handed out for `base:allocation` by `NBD_OPT_SET_META_CONTEXT`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Size of the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Size of an option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Largest option payload accepted; a larger one ends the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest string (export name, query) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Request size limit used when an export reports `max_block == 0`.
pub const DEFAULT_MAX_BLOCK: u32 = 32 * 1024 * 1024;
/// Most extents sent in one block status reply.
pub const MAX_EXTENTS_PER_REPLY: usize = 1024;

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

/// Flags of a write-zeroes request, as passed to the export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteZeroesFlags {
    /// The client wants the range allocated (no hole punched).
    pub no_hole: bool,
    /// The client wants a fast failure (`ENOTSUP`) unless zeroing is cheap.
    pub fast: bool,
    /// Force unit access.
    pub fua: bool,
}

/// One extent of a block status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// `STATE_HOLE` | `STATE_ZERO`.
    pub flags: u32,
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

// ---------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------

/// The old-style greeting, after which transmission starts at once: `NBDMAGIC`, the
/// old-style magic, the size, 32 bits of flags (the transmission flags in the low 16 bits)
/// and 124 zero bytes. Old-style clients get simple replies only.
pub fn oldstyle_greeting(info: &ExportInfo) -> [u8; OLDSTYLE_GREETING_LEN] {
    let mut out = [0u8; OLDSTYLE_GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
    out[16..24].copy_from_slice(&info.size.to_be_bytes());
    out[24..28].copy_from_slice(&u32::from(info.transmission_flags(false)).to_be_bytes());
    out
}

/// The transmission session of an old-style connection (no options were negotiated).
pub fn oldstyle_session(info: &ExportInfo) -> Session {
    let (_, _, max) = info.block_sizes();
    Session {
        info: info.clone(),
        transmission_flags: info.transmission_flags(false),
        structured: false,
        base_allocation: None,
        max_request: max,
    }
}

/// The 18 bytes the server sends first: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES.
pub fn server_greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Client flags after validation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle.
    pub fixed_newstyle: bool,
    /// The client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// Parse the client's 32-bit flags; unknown bits are a violation that closes the
/// connection.
pub fn parse_client_flags(bytes: [u8; 4]) -> Result<ClientFlags, ProtoError> {
    let flags = u32::from_be_bytes(bytes);
    let known = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;
    if flags & !known != 0 {
        return Err(ProtoError::UnknownClientFlags {
            flags,
            unknown: flags & !known,
        });
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & CLIENT_FLAG_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & CLIENT_FLAG_NO_ZEROES != 0,
    })
}

/// Header of one client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number (`OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Parse a 16-byte option header, enforcing the magic and [`MAX_OPTION_LEN`].
    pub fn parse(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = u64::from_be_bytes(bytes[0..8].try_into().unwrap_or_default());
        if magic != IHAVEOPT {
            return Err(ProtoError::BadOptionMagic { found: magic });
        }
        let option = u32::from_be_bytes(bytes[8..12].try_into().unwrap_or_default());
        let length = u32::from_be_bytes(bytes[12..16].try_into().unwrap_or_default());
        if length > MAX_OPTION_LEN {
            return Err(ProtoError::OptionTooLong { option, length });
        }
        Ok(Self { option, length })
    }

    /// Encode (used by tests and clients).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO` (`go == false`) or `NBD_OPT_GO` (`go == true`).
    Info {
        /// Whether transmission starts after the reply.
        go: bool,
        /// Export name asked for.
        name: String,
        /// Information items the client asked for.
        requests: Vec<u16>,
    },
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT` (`set == false`) or `NBD_OPT_SET_META_CONTEXT`.
    MetaContext {
        /// Whether this selects (set) or only lists contexts.
        set: bool,
        /// Export name the query is about.
        name: String,
        /// Query strings.
        queries: Vec<String>,
    },
    /// An option this server answers with `NBD_REP_ERR_UNSUP` (including STARTTLS and
    /// extended headers).
    Unsupported(u32),
}

/// Why an option's data could not be decoded; answered with `NBD_REP_ERR_INVALID` (or
/// for `NBD_OPT_EXPORT_NAME`, which cannot be answered with an error, a disconnect).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionDataError {
    /// The data length does not fit the option's layout.
    #[error("option {option}: {what}")]
    Malformed {
        /// Option number.
        option: u32,
        /// What is wrong.
        what: &'static str,
    },
}

fn parse_string(bytes: &[u8], option: u32, what: &'static str) -> Result<String, OptionDataError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(OptionDataError::Malformed { option, what });
    }
    if bytes.contains(&0) {
        return Err(OptionDataError::Malformed { option, what });
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| OptionDataError::Malformed { option, what })
}

/// Read a u32-length-prefixed string at `*at`, advancing it.
fn take_prefixed_string(
    data: &[u8],
    at: &mut usize,
    option: u32,
    what: &'static str,
) -> Result<String, OptionDataError> {
    let malformed = OptionDataError::Malformed { option, what };
    let len = be_u32(data, *at).ok_or(malformed.clone())?;
    let len = usize::try_from(len).map_err(|_| malformed.clone())?;
    let start = at.checked_add(4).ok_or(malformed.clone())?;
    let end = start.checked_add(len).ok_or(malformed.clone())?;
    let raw = data.get(start..end).ok_or(malformed)?;
    *at = end;
    parse_string(raw, option, what)
}

/// Decode an option's data. Unknown options decode to [`OptionRequest::Unsupported`].
pub fn parse_option(option: u32, data: &[u8]) -> Result<OptionRequest, OptionDataError> {
    match option {
        OPT_EXPORT_NAME => Ok(OptionRequest::ExportName(parse_string(
            data,
            option,
            "export name is not a valid string (UTF-8, no NUL, at most 4096 bytes)",
        )?)),
        OPT_ABORT => Ok(OptionRequest::Abort),
        OPT_LIST => without_data(
            option,
            data,
            OptionRequest::List,
            "NBD_OPT_LIST must carry no data",
        ),
        OPT_INFO | OPT_GO => {
            let mut at = 0;
            let name = take_prefixed_string(
                data,
                &mut at,
                option,
                "export name length/contents do not fit the option data",
            )?;
            let count = be_u16(data, at).ok_or(OptionDataError::Malformed {
                option,
                what: "missing number of information requests",
            })?;
            at += 2;
            let rest = data.get(at..).unwrap_or_default();
            if rest.len() != usize::from(count) * 2 {
                return Err(OptionDataError::Malformed {
                    option,
                    what: "number of information requests does not match the data length",
                });
            }
            let requests = rest
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
                .collect();
            Ok(OptionRequest::Info {
                go: option == OPT_GO,
                name,
                requests,
            })
        }
        OPT_STRUCTURED_REPLY => without_data(
            option,
            data,
            OptionRequest::StructuredReply,
            "NBD_OPT_STRUCTURED_REPLY must carry no data",
        ),
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let mut at = 0;
            let name = take_prefixed_string(
                data,
                &mut at,
                option,
                "export name length/contents do not fit the option data",
            )?;
            let count = be_u32(data, at).ok_or(OptionDataError::Malformed {
                option,
                what: "missing number of queries",
            })?;
            at += 4;
            // Each query needs at least its 4-byte length, which bounds count by the data.
            let remaining = data.len().saturating_sub(at);
            let count = usize::try_from(count).unwrap_or(usize::MAX);
            if count > remaining / 4 {
                return Err(OptionDataError::Malformed {
                    option,
                    what: "number of queries exceeds the option data",
                });
            }
            let mut queries = Vec::with_capacity(count);
            for _ in 0..count {
                queries.push(take_prefixed_string(
                    data,
                    &mut at,
                    option,
                    "query length/contents do not fit the option data",
                )?);
            }
            if at != data.len() {
                return Err(OptionDataError::Malformed {
                    option,
                    what: "trailing bytes after the last query",
                });
            }
            Ok(OptionRequest::MetaContext {
                set: option == OPT_SET_META_CONTEXT,
                name,
                queries,
            })
        }
        other => Ok(OptionRequest::Unsupported(other)),
    }
}

/// `request` for an option that takes no data; `what` explains the error when it has some.
fn without_data(
    option: u32,
    data: &[u8],
    request: OptionRequest,
    what: &'static str,
) -> Result<OptionRequest, OptionDataError> {
    if data.is_empty() {
        Ok(request)
    } else {
        Err(OptionDataError::Malformed { option, what })
    }
}

/// Append one option reply (header and data) to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&wire_len(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Append an option error reply carrying a human-readable message.
pub fn encode_option_error(out: &mut Vec<u8>, option: u32, error: u32, message: &str) {
    encode_option_reply(out, option, error, message.as_bytes());
}

/// What the option phase does after one option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionOutcome {
    /// Send the replies and read the next option.
    Continue,
    /// Send the replies, then close the connection (after `NBD_OPT_ABORT`).
    Close,
    /// Send the replies, then enter the transmission phase with these parameters.
    Transmission(Session),
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
    /// Id of `base:allocation` when selected.
    pub base_allocation: Option<u32>,
    /// Largest request length accepted.
    pub max_request: u32,
}

/// State of the option phase of one connection: feed it options, send what it writes.
#[derive(Debug, Clone)]
pub struct Negotiation {
    export_name: String,
    info: ExportInfo,
    client: ClientFlags,
    structured: bool,
    base_allocation: Option<u32>,
    /// `NBD_OPT_EXTENDED_HEADERS` was acknowledged.
    extended: bool,
}

impl Negotiation {
    /// Start negotiating `info` (listed under `export_name`) with a client that sent
    /// `client` flags.
    pub fn new(export_name: &str, info: ExportInfo, client: ClientFlags) -> Self {
        Self {
            export_name: export_name.to_owned(),
            info,
            client,
            structured: false,
            base_allocation: None,
            extended: false,
        }
    }

    /// Whether extended headers (64-bit lengths, 32-byte headers) have been negotiated;
    /// they imply structured replies.
    pub fn extended_headers(&self) -> bool {
        self.extended
    }

    /// Whether structured replies have been negotiated so far.
    pub fn structured(&self) -> bool {
        self.structured
    }

    fn session(&self) -> Session {
        let (_, _, max) = self.info.block_sizes();
        Session {
            info: self.info.clone(),
            transmission_flags: self.info.transmission_flags(self.structured),
            structured: self.structured,
            base_allocation: if self.structured {
                self.base_allocation
            } else {
                None
            },
            max_request: max,
        }
    }

    /// Handle one option (header already validated by [`OptionHeader::parse`], `data` its
    /// payload). Replies are appended to `out`. An error means the connection must close
    /// without further replies.
    pub fn handle_option(
        &mut self,
        header: OptionHeader,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<OptionOutcome, ProtoError> {
        let option = header.option;
        if option == OPT_EXTENDED_HEADERS {
            if data.is_empty() {
                self.extended = true;
                self.structured = true;
                encode_option_reply(out, option, REP_ACK, &[]);
            } else {
                encode_option_error(
                    out,
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_EXTENDED_HEADERS must carry no data",
                );
            }
            return Ok(OptionOutcome::Continue);
        }
        let request = match parse_option(option, data) {
            Ok(request) => request,
            Err(OptionDataError::Malformed { what, .. }) => {
                if option == OPT_EXPORT_NAME {
                    return Err(ProtoError::BadExportName { reason: what });
                }
                encode_option_error(out, option, REP_ERR_INVALID, what);
                return Ok(OptionOutcome::Continue);
            }
        };
        match request {
            OptionRequest::ExportName(_) => {
                let session = self.session();
                out.extend_from_slice(&session.info.size.to_be_bytes());
                out.extend_from_slice(&session.transmission_flags.to_be_bytes());
                if !self.client.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Ok(OptionOutcome::Transmission(session))
            }
            OptionRequest::Abort => {
                encode_option_reply(out, option, REP_ACK, &[]);
                Ok(OptionOutcome::Close)
            }
            OptionRequest::List => {
                let mut item = Vec::with_capacity(4 + self.export_name.len());
                item.extend_from_slice(&wire_len(self.export_name.len()).to_be_bytes());
                item.extend_from_slice(self.export_name.as_bytes());
                encode_option_reply(out, option, REP_SERVER, &item);
                encode_option_reply(out, option, REP_ACK, &[]);
                Ok(OptionOutcome::Continue)
            }
            OptionRequest::Info { go, name, requests } => {
                self.encode_info(out, option, &name, &requests);
                encode_option_reply(out, option, REP_ACK, &[]);
                if go {
                    Ok(OptionOutcome::Transmission(self.session()))
                } else {
                    Ok(OptionOutcome::Continue)
                }
            }
            OptionRequest::StructuredReply => {
                self.structured = true;
                encode_option_reply(out, option, REP_ACK, &[]);
                Ok(OptionOutcome::Continue)
            }
            OptionRequest::MetaContext { set, queries, .. } => {
                if !self.structured {
                    encode_option_error(
                        out,
                        option,
                        REP_ERR_INVALID,
                        "metadata contexts need NBD_OPT_STRUCTURED_REPLY first",
                    );
                    return Ok(OptionOutcome::Continue);
                }
                let matches = if queries.is_empty() {
                    // An empty list asks for every context when listing, none when setting.
                    !set
                } else {
                    queries
                        .iter()
                        .any(|query| query == BASE_ALLOCATION || (!set && query == "base:"))
                };
                if set {
                    self.base_allocation = matches.then_some(BASE_ALLOCATION_ID);
                }
                if matches {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let mut item = Vec::with_capacity(4 + BASE_ALLOCATION.len());
                    item.extend_from_slice(&id.to_be_bytes());
                    item.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    encode_option_reply(out, option, REP_META_CONTEXT, &item);
                }
                encode_option_reply(out, option, REP_ACK, &[]);
                Ok(OptionOutcome::Continue)
            }
            OptionRequest::Unsupported(code) => {
                encode_option_error(out, code, REP_ERR_UNSUP, "option not supported");
                Ok(OptionOutcome::Continue)
            }
        }
    }

    /// NBD_INFO_EXPORT always; NBD_INFO_BLOCK_SIZE always (the spec lets a server send it
    /// unasked); NBD_INFO_NAME and NBD_INFO_DESCRIPTION only when requested.
    fn encode_info(&self, out: &mut Vec<u8>, option: u32, name: &str, requests: &[u16]) {
        let mut item = Vec::with_capacity(12);
        item.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        item.extend_from_slice(&self.info.size.to_be_bytes());
        item.extend_from_slice(&self.info.transmission_flags(self.structured).to_be_bytes());
        encode_option_reply(out, option, REP_INFO, &item);

        if requests.contains(&INFO_NAME) {
            // Every name is accepted; the canonical name is the configured one when the
            // client asked for the default export, else the name it used.
            let canonical = if name.is_empty() {
                self.export_name.as_str()
            } else {
                name
            };
            let mut item = Vec::with_capacity(2 + canonical.len());
            item.extend_from_slice(&INFO_NAME.to_be_bytes());
            item.extend_from_slice(canonical.as_bytes());
            encode_option_reply(out, option, REP_INFO, &item);
        }
        if requests.contains(&INFO_DESCRIPTION) {
            if let Some(description) = &self.info.description {
                let text = truncate_str(description, MAX_STRING_LEN);
                let mut item = Vec::with_capacity(2 + text.len());
                item.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                item.extend_from_slice(text.as_bytes());
                encode_option_reply(out, option, REP_INFO, &item);
            }
        }
        let (min, preferred, max) = self.info.block_sizes();
        let mut item = Vec::with_capacity(14);
        item.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        item.extend_from_slice(&min.to_be_bytes());
        item.extend_from_slice(&preferred.to_be_bytes());
        item.extend_from_slice(&max.to_be_bytes());
        encode_option_reply(out, option, REP_INFO, &item);
    }
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

// ---------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`), possibly unknown.
    pub command: u16,
    /// Opaque client cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (payload length for writes).
    pub length: u32,
}

impl RequestHeader {
    /// Parse a 28-byte request header; a wrong magic ends the connection.
    pub fn parse(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(bytes, 0).unwrap_or_default();
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadRequestMagic { found: magic });
        }
        Ok(Self {
            flags: be_u16(bytes, 4).unwrap_or_default(),
            command: be_u16(bytes, 6).unwrap_or_default(),
            cookie: be_u64(bytes, 8).unwrap_or_default(),
            offset: be_u64(bytes, 16).unwrap_or_default(),
            length: be_u32(bytes, 24).unwrap_or_default(),
        })
    }

    /// Encode (used by tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A validated command, ready to hand to the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// Send at most one data chunk (structured replies only).
        no_fragment: bool,
    },
    /// Write the `length`-byte payload that follows the header.
    Write {
        /// Byte offset.
        offset: u64,
        /// Payload length.
        length: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Flush.
    Flush,
    /// Trim.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// Flags for the export.
        flags: WriteZeroesFlags,
    },
    /// Cache (prefetch).
    Cache {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
    },
    /// Block status of `base:allocation`.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// Only one extent wanted.
        req_one: bool,
        /// Context id to answer with.
        context: u32,
    },
}

/// What the server does with one request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestAction {
    /// Run the command (for a write, after reading its payload).
    Execute(Command),
    /// Reply with `error` without running anything. `discard` payload bytes follow the
    /// header and must be read and dropped first (writes only).
    Reject {
        /// NBD error code.
        error: u32,
        /// Payload bytes to skip.
        discard: u32,
        /// Why, for logs and structured error messages.
        reason: &'static str,
    },
    /// `NBD_CMD_DISC`: finish in-flight requests, then close.
    Disconnect,
}

/// Whether `[offset, offset + length)` lies inside an export of `size` bytes.
pub fn in_bounds(offset: u64, length: u64, size: u64) -> bool {
    offset.checked_add(length).is_some_and(|end| end <= size)
}

/// Decide what to do with a request under the negotiated `session`. Never panics; the
/// only fatal case (a write too large to skip) is an error.
pub fn classify_request(
    session: &Session,
    header: &RequestHeader,
) -> Result<RequestAction, ProtoError> {
    let info = &session.info;
    let tflags = session.transmission_flags;
    let offset = header.offset;
    let length = header.length;
    let fua_ok = tflags & TFLAG_SEND_FUA != 0;
    let fua = header.flags & CMD_FLAG_FUA != 0;
    let reject = |error, reason| {
        Ok(RequestAction::Reject {
            error,
            discard: 0,
            reason,
        })
    };
    // FUA is valid on every command once negotiated; other flags only where documented.
    let allowed = |extra: u16| -> bool {
        let mut ok = extra;
        if fua_ok {
            ok |= CMD_FLAG_FUA;
        }
        header.flags & !ok == 0
    };
    let in_range = in_bounds(offset, u64::from(length), info.size);
    match header.command {
        CMD_DISC => Ok(RequestAction::Disconnect),
        CMD_WRITE => {
            // Payloads up to the 32 MiB default are always skipped to keep the stream in
            // sync, even when the export advertises a smaller maximum.
            let skippable = session.max_request.max(DEFAULT_MAX_BLOCK);
            if length > skippable {
                return Err(ProtoError::WriteTooLarge {
                    offset,
                    length,
                    limit: skippable,
                });
            }
            let error = if length > session.max_request {
                Some((EINVAL, "write larger than the maximum block size"))
            } else if !allowed(0) {
                Some((EINVAL, "unsupported or unnegotiated flags on NBD_CMD_WRITE"))
            } else if info.read_only {
                Some((EPERM, "export is read-only"))
            } else if !in_range {
                Some((ENOSPC, "write beyond the end of the export"))
            } else {
                None
            };
            Ok(match error {
                Some((error, reason)) => RequestAction::Reject {
                    error,
                    discard: length,
                    reason,
                },
                None => RequestAction::Execute(Command::Write {
                    offset,
                    length,
                    fua,
                }),
            })
        }
        CMD_READ => {
            let df_flag = if tflags & TFLAG_SEND_DF != 0 {
                CMD_FLAG_DF
            } else {
                0
            };
            if !allowed(df_flag) {
                reject(EINVAL, "unsupported or unnegotiated flags on NBD_CMD_READ")
            } else if length > session.max_request {
                reject(EINVAL, "read larger than the maximum block size")
            } else if !in_range {
                reject(EINVAL, "read beyond the end of the export")
            } else {
                Ok(RequestAction::Execute(Command::Read {
                    offset,
                    length,
                    no_fragment: header.flags & CMD_FLAG_DF != 0,
                }))
            }
        }
        CMD_FLUSH => {
            if tflags & TFLAG_SEND_FLUSH == 0 {
                reject(EINVAL, "NBD_CMD_FLUSH not negotiated")
            } else if !allowed(0) {
                reject(EINVAL, "unsupported flags on NBD_CMD_FLUSH")
            } else {
                Ok(RequestAction::Execute(Command::Flush))
            }
        }
        CMD_TRIM => {
            if info.read_only {
                reject(EPERM, "export is read-only")
            } else if tflags & TFLAG_SEND_TRIM == 0 {
                reject(EINVAL, "NBD_CMD_TRIM not negotiated")
            } else if !allowed(0) {
                reject(EINVAL, "unsupported flags on NBD_CMD_TRIM")
            } else if !in_range {
                reject(EINVAL, "trim beyond the end of the export")
            } else {
                Ok(RequestAction::Execute(Command::Trim {
                    offset,
                    length,
                    fua,
                }))
            }
        }
        CMD_WRITE_ZEROES => {
            let fast_flag = if tflags & TFLAG_SEND_FAST_ZERO != 0 {
                CMD_FLAG_FAST_ZERO
            } else {
                0
            };
            if info.read_only {
                reject(EPERM, "export is read-only")
            } else if tflags & TFLAG_SEND_WRITE_ZEROES == 0 {
                reject(EINVAL, "NBD_CMD_WRITE_ZEROES not negotiated")
            } else if !allowed(CMD_FLAG_NO_HOLE | fast_flag) {
                reject(EINVAL, "unsupported flags on NBD_CMD_WRITE_ZEROES")
            } else if !in_range {
                reject(ENOSPC, "write zeroes beyond the end of the export")
            } else {
                Ok(RequestAction::Execute(Command::WriteZeroes {
                    offset,
                    length,
                    flags: WriteZeroesFlags {
                        no_hole: header.flags & CMD_FLAG_NO_HOLE != 0,
                        fast: header.flags & CMD_FLAG_FAST_ZERO != 0,
                        fua,
                    },
                }))
            }
        }
        CMD_CACHE => {
            if tflags & TFLAG_SEND_CACHE == 0 {
                reject(EINVAL, "NBD_CMD_CACHE not negotiated")
            } else if !allowed(0) {
                reject(EINVAL, "unsupported flags on NBD_CMD_CACHE")
            } else if !in_range {
                reject(EINVAL, "cache beyond the end of the export")
            } else {
                Ok(RequestAction::Execute(Command::Cache { offset, length }))
            }
        }
        CMD_BLOCK_STATUS => match session.base_allocation {
            None => reject(EINVAL, "no metadata context negotiated"),
            Some(context) => {
                if !allowed(CMD_FLAG_REQ_ONE) {
                    reject(EINVAL, "unsupported flags on NBD_CMD_BLOCK_STATUS")
                } else if length == 0 || !in_range {
                    reject(EINVAL, "block status range empty or beyond the end")
                } else {
                    Ok(RequestAction::Execute(Command::BlockStatus {
                        offset,
                        length,
                        req_one: header.flags & CMD_FLAG_REQ_ONE != 0,
                        context,
                    }))
                }
            }
        },
        _ => reject(EINVAL, "unknown command"),
    }
}

// ---------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------

/// Map an I/O error from the export to an NBD error code.
pub fn nbd_error_from_io(error: &std::io::Error) -> u32 {
    const EDQUOT: i32 = 122;
    const EFBIG: i32 = 27;
    const EOPNOTSUPP_LINUX: i32 = 95;
    match error.raw_os_error() {
        Some(1) => EPERM,
        Some(5) => EIO,
        Some(12) => ENOMEM,
        Some(22) => EINVAL,
        Some(28) | Some(EDQUOT) | Some(EFBIG) => ENOSPC,
        Some(75) => EOVERFLOW,
        Some(EOPNOTSUPP_LINUX) => ENOTSUP,
        Some(108) => ESHUTDOWN,
        _ => match error.kind() {
            std::io::ErrorKind::PermissionDenied => EPERM,
            std::io::ErrorKind::InvalidInput => EINVAL,
            std::io::ErrorKind::OutOfMemory => ENOMEM,
            std::io::ErrorKind::Unsupported => ENOTSUP,
            std::io::ErrorKind::StorageFull => ENOSPC,
            _ => EIO,
        },
    }
}

/// A simple reply header.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Append a structured chunk header announcing `length` payload bytes.
pub fn encode_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Append a reply chunk header: structured (20 bytes) or, with `extended`, the 32-byte
/// extended header, which also carries the request's `offset` and a 64-bit payload length.
pub fn encode_reply_header(
    out: &mut Vec<u8>,
    extended: bool,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload_len: usize,
) {
    if extended {
        out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&(payload_len as u64).to_be_bytes());
    } else {
        encode_chunk_header(out, flags, kind, cookie, wire_len(payload_len));
    }
}

/// Append a final error chunk (structured or extended).
pub fn encode_error_reply(
    out: &mut Vec<u8>,
    extended: bool,
    cookie: u64,
    offset: u64,
    error: u32,
    message: &str,
) {
    let message = truncate_str(message, MAX_STRING_LEN);
    let message_len = u16::try_from(message.len()).unwrap_or(0);
    let message = if message_len == 0 { "" } else { message };
    encode_reply_header(
        out,
        extended,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        offset,
        6 + message.len(),
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&message_len.to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// An extended request header (`NBD_OPT_EXTENDED_HEADERS`): 32 bytes, 64-bit length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtendedRequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub command: u16,
    /// Client cookie.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Effect length (payload length for writes).
    pub length: u64,
}

impl ExtendedRequestHeader {
    /// Parse; a wrong magic is an error (the connection must close).
    pub fn parse(bytes: &[u8; EXTENDED_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if magic != EXTENDED_REQUEST_MAGIC {
            return Err(ProtoError::BadRequestMagic { found: magic });
        }
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(word)
        };
        Ok(Self {
            flags: u16::from_be_bytes([bytes[4], bytes[5]]),
            command: u16::from_be_bytes([bytes[6], bytes[7]]),
            cookie: u64_at(8),
            offset: u64_at(16),
            length: u64_at(24),
        })
    }

    /// Encode (client side; tests).
    pub fn encode(&self) -> [u8; EXTENDED_HEADER_LEN] {
        let mut out = [0u8; EXTENDED_HEADER_LEN];
        out[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..32].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// The compact header the classifier works on. Lengths beyond 32 bits are clamped,
    /// which keeps every answer right: such a READ is above the maximum block size (EINVAL),
    /// such a WRITE is too large to skip (disconnect), and BLOCK_STATUS may answer for less
    /// than asked. `None` for TRIM, WRITE_ZEROES and CACHE beyond 32 bits, which must be
    /// refused (EINVAL) rather than shortened.
    pub fn compact(&self) -> Option<RequestHeader> {
        let length = match u32::try_from(self.length) {
            Ok(length) => length,
            Err(_) if matches!(self.command, CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE) => {
                return None
            }
            Err(_) => u32::MAX,
        };
        Some(RequestHeader {
            flags: self.flags,
            command: self.command,
            cookie: self.cookie,
            offset: self.offset,
            length,
        })
    }
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Append a `NBD_REPLY_TYPE_NONE` chunk (always final).
pub fn encode_none_chunk(out: &mut Vec<u8>, cookie: u64) {
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// Append the header of an `OFFSET_DATA` chunk for `data_len` (> 0) bytes; the data
/// itself follows on the wire.
pub fn encode_offset_data_header(
    out: &mut Vec<u8>,
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) {
    encode_chunk_header(
        out,
        done_flag(done),
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len.saturating_add(8),
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Append an `OFFSET_HOLE` chunk for `hole_len` (> 0) zero bytes at `offset`.
pub fn encode_offset_hole(out: &mut Vec<u8>, cookie: u64, offset: u64, hole_len: u32, done: bool) {
    encode_chunk_header(out, done_flag(done), REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&hole_len.to_be_bytes());
}

/// Append a final `ERROR` chunk with a message (truncated to 4096 bytes).
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let message = truncate_str(message, MAX_STRING_LEN);
    let message_len = u16::try_from(message.len()).unwrap_or(0);
    let message = if message_len == 0 { "" } else { message };
    encode_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + u32::from(message_len),
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&message_len.to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// Turn the export's extents into block status descriptors for a query of `length`
/// bytes: zero-length extents are dropped, each descriptor fits in u32 and the sum never
/// exceeds `length`; at most `limit` descriptors (>= 1). Returns an empty list when the
/// export gave nothing usable.
pub fn clamp_extents(extents: &[Extent], length: u32, limit: usize) -> Vec<(u32, u32)> {
    let mut left = length;
    let mut out: Vec<(u32, u32)> = Vec::new();
    for extent in extents {
        if left == 0 {
            break;
        }
        let take = u32::try_from(extent.length.min(u64::from(left))).unwrap_or(left);
        if take == 0 {
            continue;
        }
        let full = out.len() >= limit.max(1);
        match out.last_mut() {
            Some(last) if last.1 == extent.flags => last.0 += take,
            _ if full => break,
            _ => out.push((take, extent.flags)),
        }
        left -= take;
    }
    out
}

/// Append a final `BLOCK_STATUS` chunk for `context` with `descriptors` (length, flags).
pub fn encode_block_status_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    context: u32,
    descriptors: &[(u32, u32)],
) {
    let length = 4u32.saturating_add(wire_len(descriptors.len()).saturating_mul(8));
    encode_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        length,
    );
    out.extend_from_slice(&context.to_be_bytes());
    for (len, flags) in descriptors {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

/// One piece of a structured read reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    /// Data bytes `range` of the read buffer, at export offset `offset`.
    Data {
        /// Export offset of the first byte.
        offset: u64,
        /// Range within the read buffer.
        range: std::ops::Range<usize>,
    },
    /// `length` zero bytes at export offset `offset`.
    Hole {
        /// Export offset of the first byte.
        offset: u64,
        /// Number of zero bytes.
        length: u32,
    },
}

/// Granularity at which a structured read reply turns zero runs into holes.
pub const HOLE_GRANULARITY: usize = 4096;

/// Compared against (a memcmp) to find all-zero blocks quickly.
static ZERO_BLOCK: [u8; HOLE_GRANULARITY] = [0; HOLE_GRANULARITY];

/// Split a read buffer into data and hole chunks: every `HOLE_GRANULARITY`-aligned (in
/// export offsets) all-zero block becomes part of a hole, everything else data. Adjacent
/// pieces of the same kind merge. An empty buffer gives no chunks.
pub fn split_read(offset: u64, data: &[u8]) -> Vec<ReadChunk> {
    let mut chunks: Vec<ReadChunk> = Vec::new();
    let granularity = HOLE_GRANULARITY as u64;
    let mut pos = 0usize;
    while pos < data.len() {
        let here = offset + pos as u64;
        // Bytes to the next aligned boundary (or a full block when aligned).
        let to_boundary = granularity - here % granularity;
        let step = usize::try_from(to_boundary)
            .unwrap_or(HOLE_GRANULARITY)
            .min(data.len() - pos);
        let block = &data[pos..pos + step];
        let is_hole = step == HOLE_GRANULARITY && block == ZERO_BLOCK.as_slice();
        match (chunks.last_mut(), is_hole) {
            (Some(ReadChunk::Hole { length, .. }), true) => {
                *length += u32::try_from(step).unwrap_or(0);
            }
            (Some(ReadChunk::Data { range, .. }), false) => range.end = pos + step,
            (_, true) => chunks.push(ReadChunk::Hole {
                offset: here,
                length: u32::try_from(step).unwrap_or(0),
            }),
            (_, false) => chunks.push(ReadChunk::Data {
                offset: here,
                range: pos..pos + step,
            }),
        }
        pos += step;
    }
    chunks
}

impl fmt::Display for OptionHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "option {} ({} bytes)", self.option, self.length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn full_info() -> ExportInfo {
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

    fn negotiation(no_zeroes: bool) -> Negotiation {
        Negotiation::new(
            "vbd",
            full_info(),
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes,
            },
        )
    }

    fn option(n: &mut Negotiation, option: u32, data: &[u8]) -> (OptionOutcome, Vec<u8>) {
        let mut out = Vec::new();
        let header = OptionHeader {
            option,
            length: u32::try_from(data.len()).unwrap(),
        };
        let outcome = n.handle_option(header, data, &mut out).unwrap();
        (outcome, out)
    }

    #[test]
    fn greeting_bytes() {
        assert_eq!(
            server_greeting().as_slice(),
            b"NBDMAGICIHAVEOPT\x00\x03".as_slice()
        );
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags([0, 0, 0, 3]),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(parse_client_flags([0, 0, 0, 0]), Ok(ClientFlags::default()));
        assert_eq!(
            parse_client_flags([0, 0, 0, 4]),
            Err(ProtoError::UnknownClientFlags {
                flags: 4,
                unknown: 4
            })
        );
    }

    #[test]
    fn option_header_parse_and_limits() {
        let bytes = *b"IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x0a";
        assert_eq!(
            OptionHeader::parse(&bytes),
            Ok(OptionHeader {
                option: 7,
                length: 10
            })
        );
        assert_eq!(OptionHeader::parse(&bytes).unwrap().encode(), bytes);
        let too_long = *b"IHAVEOPT\x00\x00\x00\x07\x00\x01\x00\x01";
        assert_eq!(
            OptionHeader::parse(&too_long),
            Err(ProtoError::OptionTooLong {
                option: 7,
                length: 0x1_0001
            })
        );
        let bad = *b"IHAVEOPX\x00\x00\x00\x07\x00\x00\x00\x00";
        assert!(matches!(
            OptionHeader::parse(&bad),
            Err(ProtoError::BadOptionMagic { .. })
        ));
    }

    #[test]
    fn export_name_reply_with_and_without_zeroes() {
        let (outcome, out) = option(&mut negotiation(true), OPT_EXPORT_NAME, b"x");
        assert!(matches!(outcome, OptionOutcome::Transmission(_)));
        let flags = 0x0d6du16; // HAS_FLAGS|FLUSH|FUA|TRIM|WRITE_ZEROES|MULTI_CONN|CACHE|FAST_ZERO
        let mut expected = vec![0, 0, 0, 1, 0, 0, 0, 0];
        expected.extend_from_slice(&flags.to_be_bytes());
        assert_eq!(out, expected);
        let (_, out) = option(&mut negotiation(false), OPT_EXPORT_NAME, b"");
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_eq!(&out[..10], expected.as_slice());
    }

    #[test]
    fn list_reply_bytes() {
        let (outcome, out) = option(&mut negotiation(true), OPT_LIST, &[]);
        assert_eq!(outcome, OptionOutcome::Continue);
        let expected: Vec<u8> = [
            &OPTION_REPLY_MAGIC.to_be_bytes()[..],
            &[0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 7, 0, 0, 0, 3],
            b"vbd",
            &OPTION_REPLY_MAGIC.to_be_bytes()[..],
            &[0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn abort_acks_and_closes() {
        let (outcome, out) = option(&mut negotiation(true), OPT_ABORT, &[]);
        assert_eq!(outcome, OptionOutcome::Close);
        let expected: Vec<u8> = [
            &OPTION_REPLY_MAGIC.to_be_bytes()[..],
            &[0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn unknown_option_is_unsupported() {
        let (outcome, out) = option(&mut negotiation(true), 99, b"junk");
        assert_eq!(outcome, OptionOutcome::Continue);
        assert_eq!(&out[8..16], &[0, 0, 0, 99, 0x80, 0, 0, 1]);
    }

    #[test]
    fn go_reply_items() {
        let mut n = negotiation(true);
        let data = [0, 0, 0, 1, b'a', 0, 2, 0, 1, 0, 2];
        let (outcome, out) = option(&mut n, OPT_GO, &data);
        let OptionOutcome::Transmission(session) = outcome else {
            panic!("GO must enter transmission");
        };
        assert!(!session.structured);
        assert_eq!(session.max_request, DEFAULT_MAX_BLOCK);
        // EXPORT item: 20-byte header + 12 bytes.
        let reply = |kind: u32, data: &[u8]| -> Vec<u8> {
            let mut v = Vec::new();
            encode_option_reply(&mut v, OPT_GO, kind, data);
            v
        };
        let expected: Vec<u8> = [
            reply(REP_INFO, &[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0x0d, 0x6d]),
            reply(REP_INFO, &[0, 1, b'a']),
            reply(REP_INFO, b"\x00\x02desc"),
            reply(REP_INFO, &[0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]),
            reply(REP_ACK, &[]),
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn structured_and_meta_context_negotiation() {
        let mut n = negotiation(true);
        let query = [
            &[0u8, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15][..],
            b"base:allocation",
        ]
        .concat();
        // Before structured replies: invalid.
        let (_, out) = option(&mut n, OPT_SET_META_CONTEXT, &query);
        assert_eq!(&out[12..16], &REP_ERR_INVALID.to_be_bytes());
        let (_, out) = option(&mut n, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(&out[12..16], &REP_ACK.to_be_bytes());
        let (_, out) = option(&mut n, OPT_SET_META_CONTEXT, &query);
        let mut expected = Vec::new();
        encode_option_reply(
            &mut expected,
            OPT_SET_META_CONTEXT,
            REP_META_CONTEXT,
            b"\x00\x00\x00\x01base:allocation",
        );
        encode_option_reply(&mut expected, OPT_SET_META_CONTEXT, REP_ACK, &[]);
        assert_eq!(out, expected);
        // Listing with no query lists base:allocation with id 0.
        let (_, out) = option(&mut n, OPT_LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&out[20..24], &[0, 0, 0, 0]);
        assert_eq!(&out[24..39], b"base:allocation");
        // Unknown context: just ACK.
        let other = [&[0u8, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5][..], b"x:foo"].concat();
        let (_, out) = option(&mut n, OPT_LIST_META_CONTEXT, &other);
        assert_eq!(out.len(), 20);
        let (outcome, _) = option(&mut n, OPT_GO, &[0, 0, 0, 0, 0, 0]);
        let OptionOutcome::Transmission(session) = outcome else {
            panic!("GO must enter transmission");
        };
        assert!(session.structured);
        assert_eq!(session.base_allocation, Some(BASE_ALLOCATION_ID));
        assert_ne!(session.transmission_flags & TFLAG_SEND_DF, 0);
    }

    #[test]
    fn malformed_options() {
        let mut n = negotiation(true);
        for (code, data) in [
            (OPT_GO, &[0u8, 0, 0, 5, b'a'][..]),
            (OPT_INFO, &[0, 0, 0, 0, 0, 1]),
            (OPT_INFO, &[0, 0, 0, 0, 0, 0, 0]),
            (OPT_LIST, &[1]),
            (OPT_STRUCTURED_REPLY, &[1]),
        ] {
            let (outcome, out) = option(&mut n, code, data);
            assert_eq!(outcome, OptionOutcome::Continue);
            assert_eq!(
                &out[12..16],
                &REP_ERR_INVALID.to_be_bytes(),
                "option {code}"
            );
        }
        let mut out = Vec::new();
        let header = OptionHeader {
            option: OPT_EXPORT_NAME,
            length: 2,
        };
        assert!(matches!(
            n.handle_option(header, &[0xff, 0xfe], &mut out),
            Err(ProtoError::BadExportName { .. })
        ));
    }

    #[test]
    fn request_header_roundtrip() {
        let bytes: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0,
            0, 0, 2, 0,
        ];
        let header = RequestHeader::parse(&bytes).unwrap();
        assert_eq!(
            header,
            RequestHeader {
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                length: 512,
            }
        );
        assert_eq!(header.encode(), bytes);
        let mut bad = bytes;
        bad[3] = 0x14;
        assert_eq!(
            RequestHeader::parse(&bad),
            Err(ProtoError::BadRequestMagic { found: 0x2560_9514 })
        );
    }

    fn session(info: ExportInfo) -> Session {
        let (_, _, max) = info.block_sizes();
        Session {
            transmission_flags: info.transmission_flags(false),
            info,
            structured: false,
            base_allocation: None,
            max_request: max,
        }
    }

    fn classify(
        session: &Session,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> RequestAction {
        classify_request(
            session,
            &RequestHeader {
                flags,
                command,
                cookie: 0,
                offset,
                length,
            },
        )
        .unwrap()
    }

    fn rejected_small_read(session: &Session) -> RequestAction {
        classify(session, CMD_READ, 0, 0, 2 << 20)
    }

    #[test]
    fn classification_rules() {
        let small = session(ExportInfo {
            max_block: 1 << 20,
            ..ExportInfo::new(64 << 20)
        });
        let rejected_small = classify(&small, CMD_WRITE, 0, 0, 2 << 20);
        assert!(matches!(
            rejected_small,
            RequestAction::Reject {
                error: EINVAL,
                discard: 0x20_0000,
                ..
            }
        ));
        assert_eq!(
            rejected_small_read(&small),
            RequestAction::Reject {
                error: EINVAL,
                discard: 0,
                reason: "read larger than the maximum block size"
            }
        );
        let s = session(ExportInfo::new(1 << 20));
        let rejected = |action: RequestAction| match action {
            RequestAction::Reject { error, discard, .. } => (error, discard),
            other => panic!("expected a rejection, got {other:?}"),
        };
        assert!(matches!(
            classify(&s, CMD_READ, 0, 0, 512),
            RequestAction::Execute(Command::Read { .. })
        ));
        assert_eq!(rejected(classify(&s, CMD_READ, 0, 1 << 20, 1)), (EINVAL, 0));
        assert_eq!(
            rejected(classify(&s, CMD_READ, CMD_FLAG_FUA, 0, 1)),
            (EINVAL, 0)
        );
        assert_eq!(
            rejected(classify(&s, CMD_WRITE, 0, (1 << 20) - 1, 2)),
            (ENOSPC, 2)
        );
        assert_eq!(
            rejected(classify(&s, CMD_WRITE, CMD_FLAG_FUA, 0, 2)),
            (EINVAL, 2)
        );
        assert_eq!(rejected(classify(&s, CMD_FLUSH, 0, 0, 0)), (EINVAL, 0));
        assert_eq!(rejected(classify(&s, 77, 0, 0, 0)), (EINVAL, 0));
        assert_eq!(
            classify(&s, CMD_DISC, 0xffff, 5, 5),
            RequestAction::Disconnect
        );
        assert_eq!(
            classify_request(
                &s,
                &RequestHeader {
                    flags: 0,
                    command: CMD_WRITE,
                    cookie: 0,
                    offset: 0,
                    length: DEFAULT_MAX_BLOCK + 1
                }
            ),
            Err(ProtoError::WriteTooLarge {
                offset: 0,
                length: DEFAULT_MAX_BLOCK + 1,
                limit: DEFAULT_MAX_BLOCK
            })
        );
        let ro = session(ExportInfo {
            read_only: true,
            can_trim: true,
            ..ExportInfo::new(1 << 20)
        });
        assert_eq!(rejected(classify(&ro, CMD_WRITE, 0, 0, 10)), (EPERM, 10));
        assert_eq!(rejected(classify(&ro, CMD_TRIM, 0, 0, 10)), (EPERM, 0));
        let full = session(full_info());
        assert!(matches!(
            classify(
                &full,
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
                0,
                10
            ),
            RequestAction::Execute(Command::WriteZeroes {
                flags: WriteZeroesFlags {
                    no_hole: true,
                    fast: true,
                    fua: true
                },
                ..
            })
        ));
        assert_eq!(
            rejected(classify(&full, CMD_BLOCK_STATUS, 0, 0, 10)),
            (EINVAL, 0)
        );
    }

    #[test]
    fn reply_encodings() {
        assert_eq!(
            simple_reply(0x1122_3344_5566_7788, EIO),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
        );
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 1, EINVAL, "bad");
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0,
                22, 0, 3, b'b', b'a', b'd'
            ]
        );
        out.clear();
        encode_offset_hole(&mut out, 2, 4096, 8192, true);
        assert_eq!(&out[4..8], &[0, 1, 0, 2]);
        assert_eq!(
            &out[16..],
            &[0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x20, 0]
        );
        out.clear();
        encode_block_status_chunk(&mut out, 3, 1, &[(512, 3), (1024, 0)]);
        assert_eq!(
            &out[16..],
            &[0, 0, 0, 20, 0, 0, 0, 1, 0, 0, 2, 0, 0, 0, 0, 3, 0, 0, 4, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn io_error_mapping() {
        let map = |code| nbd_error_from_io(&std::io::Error::from_raw_os_error(code));
        assert_eq!(map(1), EPERM);
        assert_eq!(map(28), ENOSPC);
        assert_eq!(map(122), ENOSPC);
        assert_eq!(map(95), ENOTSUP);
        assert_eq!(map(2), EIO);
        assert_eq!(map(108), ESHUTDOWN);
        assert_eq!(nbd_error_from_io(&std::io::Error::other("x")), EIO);
    }

    #[test]
    fn extended_headers_bytes() {
        let wire: [u8; 32] = [
            0x21, 0xe4, 0x1c, 0x71, 0x00, 0x01, 0x00, 0x04, // magic, FUA, TRIM
            0, 0, 0, 0, 0, 0, 0, 9, // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0, // offset 4096
            0, 0, 0, 2, 0, 0, 0, 0, // length 8 GiB
        ];
        let header = ExtendedRequestHeader::parse(&wire).unwrap();
        assert_eq!(
            header,
            ExtendedRequestHeader {
                flags: CMD_FLAG_FUA,
                command: CMD_TRIM,
                cookie: 9,
                offset: 4096,
                length: 8 << 30,
            }
        );
        assert_eq!(header.encode(), wire);
        assert_eq!(header.compact(), None, "a trim is never shortened");
        let status = ExtendedRequestHeader {
            command: CMD_BLOCK_STATUS,
            ..header
        };
        assert_eq!(status.compact().map(|h| h.length), Some(u32::MAX));
        let mut bad = wire;
        bad[0] = 0x25;
        assert!(ExtendedRequestHeader::parse(&bad).is_err());

        let mut out = Vec::new();
        encode_reply_header(&mut out, true, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 9, 4096, 0);
        assert_eq!(
            out,
            [
                0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        out.clear();
        encode_reply_header(&mut out, false, 0, REPLY_TYPE_OFFSET_DATA, 9, 4096, 520);
        assert_eq!(
            out,
            [0x66, 0x8e, 0x33, 0xef, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 2, 8]
        );
    }

    #[test]
    fn oldstyle_greeting_bytes() {
        let mut info = ExportInfo::new(0x1234_5678_9abc);
        info.can_flush = true;
        info.read_only = true;
        let greeting = oldstyle_greeting(&info);
        let mut expected = Vec::new();
        expected.extend_from_slice(b"NBDMAGIC");
        expected.extend_from_slice(&[0x00, 0x00, 0x42, 0x02, 0x81, 0x86, 0x12, 0x53]);
        expected.extend_from_slice(&[0, 0, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
        let flags = info.transmission_flags(false);
        assert_eq!(flags & TFLAG_READ_ONLY, TFLAG_READ_ONLY);
        expected.extend_from_slice(&u32::from(flags).to_be_bytes());
        expected.extend_from_slice(&[0u8; 124]);
        assert_eq!(greeting.to_vec(), expected);
        let session = oldstyle_session(&info);
        assert!(!session.structured);
        assert_eq!(session.base_allocation, None);
    }

    #[test]
    fn split_read_chunks() {
        let mut data = vec![0u8; 3 * 4096 + 100];
        data[4096 + 10] = 1;
        // Offset 100 is unaligned: first 3996 bytes are data (partial block).
        let chunks = split_read(100, &data);
        assert_eq!(
            chunks,
            vec![
                ReadChunk::Data {
                    offset: 100,
                    range: 0..3996 + 4096
                },
                ReadChunk::Hole {
                    offset: 8192,
                    length: 4096
                },
                ReadChunk::Data {
                    offset: 12288,
                    range: 3996 + 8192..data.len()
                },
            ]
        );
        assert!(split_read(0, &[]).is_empty());
    }

    #[test]
    fn clamp_extents_rules() {
        let extents = [
            Extent {
                length: 0,
                flags: 3,
            },
            Extent {
                length: 100,
                flags: 3,
            },
            Extent {
                length: 50,
                flags: 3,
            },
            Extent {
                length: u64::MAX,
                flags: 0,
            },
        ];
        assert_eq!(clamp_extents(&extents, 1000, 10), vec![(150, 3), (850, 0)]);
        assert_eq!(clamp_extents(&extents, 1000, 1), vec![(150, 3)]);
        assert_eq!(clamp_extents(&[], 1000, 1), vec![]);
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

    proptest! {
        #[test]
        fn option_phase_never_panics(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut n = negotiation(false);
            let mut rest = input.as_slice();
            let mut out = Vec::new();
            while rest.len() >= OPTION_HEADER_LEN {
                let (head, tail) = rest.split_at(OPTION_HEADER_LEN);
                let mut head: [u8; OPTION_HEADER_LEN] = head.try_into().unwrap();
                head[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
                let Ok(header) = OptionHeader::parse(&head) else { break };
                let len = usize::try_from(header.length).unwrap().min(tail.len());
                let (data, tail) = tail.split_at(len);
                match n.handle_option(header, data, &mut out) {
                    Ok(OptionOutcome::Continue) => {}
                    _ => break,
                }
                rest = tail;
            }
        }

        #[test]
        fn parse_option_never_panics(code in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_option(code, &data);
        }

        #[test]
        fn request_handling_never_panics(
            bytes in proptest::array::uniform28(any::<u8>()),
            size in any::<u64>(),
            structured in any::<bool>(),
            read_only in any::<bool>(),
        ) {
            let mut raw = bytes;
            raw[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            let header = RequestHeader::parse(&raw).unwrap();
            let mut info = full_info();
            info.size = size;
            info.read_only = read_only;
            let mut s = session(info);
            s.structured = structured;
            s.base_allocation = structured.then_some(1);
            match classify_request(&s, &header) {
                Ok(RequestAction::Execute(Command::Read { offset, length, .. })) => {
                    prop_assert!(in_bounds(offset, u64::from(length), size));
                    prop_assert!(length <= s.max_request);
                }
                Ok(RequestAction::Execute(Command::Write { offset, length, .. })) => {
                    prop_assert!(!read_only);
                    prop_assert!(in_bounds(offset, u64::from(length), size));
                }
                Ok(RequestAction::Reject { discard, .. }) => {
                    prop_assert!(discard == 0 || header.command == CMD_WRITE);
                    prop_assert!(discard <= s.max_request);
                }
                _ => {}
            }
        }

        #[test]
        fn split_read_covers_the_buffer(offset in any::<u64>(), data in proptest::collection::vec(0u8..2, 0..20000)) {
            let offset = offset % (1 << 40);
            let chunks = split_read(offset, &data);
            let mut covered = 0usize;
            for chunk in chunks {
                match chunk {
                    ReadChunk::Data { offset: at, range } => {
                        prop_assert_eq!(at, offset + covered as u64);
                        prop_assert_eq!(range.start, covered);
                        covered = range.end;
                    }
                    ReadChunk::Hole { offset: at, length } => {
                        prop_assert_eq!(at, offset + covered as u64);
                        let end = covered + length as usize;
                        prop_assert!(data[covered..end].iter().all(|&b| b == 0));
                        covered = end;
                    }
                }
            }
            prop_assert_eq!(covered, data.len());
        }
    }
}
