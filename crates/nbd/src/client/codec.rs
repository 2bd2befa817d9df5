//! The client's side of the NBD protocol, pure: what a client sends (client flags, options,
//! request headers) and how it reads what a server sends (greetings, option replies,
//! `NBD_INFO` items, simple replies, structured reply chunks). No I/O: the connection in
//! [`super`] reads exactly the byte counts these functions ask for and hands them the
//! bytes, and the fuzz target drives them over arbitrary input.
//!
//! Everything the server sends is untrusted: every length is checked against what was asked
//! for before anything is read or allocated, and anything unexpected is a
//! [`ClientProtoError`] naming the field, which ends the connection.
//!
//! The constants and the request header come from [`crate::proto`], which the server uses
//! too, so both sides share one description of the wire.

use std::ops::Range;

use crate::proto::{
    self, OptionHeader, RequestHeader, CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC,
    OLDSTYLE_GREETING_LEN, OLDSTYLE_MAGIC, OPTION_REPLY_MAGIC, OPT_EXPORT_NAME, REPLY_FLAG_DONE,
    REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE, REQUEST_HEADER_LEN, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC,
    STRUCTURED_HEADER_LEN, STRUCTURED_REPLY_MAGIC,
};

/// Bytes of the greeting read first: `NBDMAGIC` and the style's magic.
pub const GREETING_START_LEN: usize = 16;
/// Bytes of an old-style greeting after [`GREETING_START_LEN`]: size, flags, 124 zeros.
pub const OLDSTYLE_REST_LEN: usize = OLDSTYLE_GREETING_LEN - GREETING_START_LEN;
/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Largest option reply payload accepted (`NBD_REP_SERVER` and `NBD_REP_INFO` items and
/// error messages are far smaller).
pub const MAX_OPTION_REPLY_LEN: u32 = 64 * 1024;
/// Bytes of the `NBD_OPT_EXPORT_NAME` answer: size and transmission flags.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// Zero bytes that follow the `NBD_OPT_EXPORT_NAME` answer unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_PADDING: usize = 124;
/// Largest payload of a reply chunk that carries no read data (an error message, a hole);
/// longer ones are refused rather than buffered.
pub const MAX_CHUNK_META_LEN: u32 = 4096 + 64;

/// A server said something a client cannot accept; the connection ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientProtoError {
    /// The greeting did not start with `NBDMAGIC`.
    #[error("greeting magic is {found:#018x}, expected NBDMAGIC {NBDMAGIC:#018x}")]
    NotNbd {
        /// The first 8 bytes received.
        found: u64,
    },
    /// Neither the old-style magic nor `IHAVEOPT` followed `NBDMAGIC`.
    #[error("greeting style magic is {found:#018x}, expected old-style or IHAVEOPT")]
    UnknownStyle {
        /// Bytes 8..16 received.
        found: u64,
    },
    /// A field of a fixed layout holds a value the protocol does not allow.
    #[error("{what}")]
    Invalid {
        /// The field and what is wrong with it.
        what: String,
    },
    /// An option reply did not start with the option reply magic.
    #[error("option reply magic is {found:#018x}, expected {OPTION_REPLY_MAGIC:#018x}")]
    BadOptionReplyMagic {
        /// Magic as received.
        found: u64,
    },
    /// An option reply answers another option than the one sent.
    #[error("option reply is for option {found}, expected {expected}")]
    WrongOption {
        /// Option the reply names.
        found: u32,
        /// Option sent.
        expected: u32,
    },
    /// A length field is above what this client accepts.
    #[error("{what} announces {length} bytes, at most {limit} accepted")]
    TooLong {
        /// Which length.
        what: &'static str,
        /// Announced length.
        length: u64,
        /// The limit.
        limit: u64,
    },
    /// A reply did not start with a reply magic this connection can receive.
    #[error("reply magic is {found:#010x}, expected a simple or structured reply")]
    BadReplyMagic {
        /// Magic as received.
        found: u32,
    },
}

fn invalid(what: impl Into<String>) -> ClientProtoError {
    ClientProtoError::Invalid { what: what.into() }
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    let mut word = [0u8; 2];
    word.copy_from_slice(&bytes[at..at + 2]);
    u16::from_be_bytes(word)
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(word)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

// ---------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------

/// The handshake style a server greets with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GreetingStyle {
    /// Old style: [`OLDSTYLE_REST_LEN`] more bytes (size, flags, zeros), then transmission.
    Oldstyle,
    /// Newstyle: 2 bytes of handshake flags follow, then the option phase.
    Newstyle,
}

/// Reads the first [`GREETING_START_LEN`] bytes of a greeting.
pub fn parse_greeting_start(
    bytes: &[u8; GREETING_START_LEN],
) -> Result<GreetingStyle, ClientProtoError> {
    let magic = be_u64(bytes, 0);
    if magic != NBDMAGIC {
        return Err(ClientProtoError::NotNbd { found: magic });
    }
    match be_u64(bytes, 8) {
        OLDSTYLE_MAGIC => Ok(GreetingStyle::Oldstyle),
        IHAVEOPT => Ok(GreetingStyle::Newstyle),
        found => Err(ClientProtoError::UnknownStyle { found }),
    }
}

/// What an old-style greeting, or the answer to `NBD_OPT_EXPORT_NAME`, or `NBD_INFO_EXPORT`
/// says about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportFacts {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
}

/// Reads the rest of an old-style greeting: size, 32 bits of flags (transmission flags in
/// the low half), 124 reserved bytes (ignored).
pub fn parse_oldstyle_rest(bytes: &[u8; OLDSTYLE_REST_LEN]) -> ExportFacts {
    let flags = be_u32(bytes, 8);
    ExportFacts {
        size: be_u64(bytes, 0),
        // The high half holds no transmission flags; the C server sends 0 there.
        flags: u16::try_from(flags & 0xffff).unwrap_or_default(),
    }
}

/// The newstyle server's handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerFlags {
    /// The server speaks fixed newstyle (options get replies; unknown ones are refused).
    pub fixed_newstyle: bool,
    /// The server can leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// Reads the newstyle handshake flags.
pub fn parse_server_flags(bytes: [u8; 2]) -> ServerFlags {
    let flags = u16::from_be_bytes(bytes);
    ServerFlags {
        fixed_newstyle: flags & FLAG_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_NO_ZEROES != 0,
    }
}

/// The client flags to answer `server` with: every flag it offers that this client
/// understands (fixed newstyle, no zeroes).
pub fn client_flags(server: ServerFlags) -> [u8; 4] {
    let mut flags = 0;
    if server.fixed_newstyle {
        flags |= CLIENT_FLAG_FIXED_NEWSTYLE;
    }
    if server.no_zeroes {
        flags |= CLIENT_FLAG_NO_ZEROES;
    }
    u32::to_be_bytes(flags)
}

/// Appends option `option` with `data`.
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    let header = OptionHeader {
        option,
        length: u32::try_from(data.len()).unwrap_or(u32::MAX),
    };
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(data);
}

/// Appends `NBD_OPT_GO` (or, with `go == false`, `NBD_OPT_INFO`) for export `name`, asking
/// for the block size constraints.
pub fn encode_go(out: &mut Vec<u8>, go: bool, name: &str) {
    let mut data = Vec::with_capacity(8 + name.len());
    data.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    let option = if go { proto::OPT_GO } else { proto::OPT_INFO };
    encode_option(out, option, &data);
}

/// Appends `NBD_OPT_EXPORT_NAME` for export `name` (the last option: the server answers
/// with [`EXPORT_NAME_REPLY_LEN`] bytes and transmission starts).
pub fn encode_export_name(out: &mut Vec<u8>, name: &str) {
    encode_option(out, OPT_EXPORT_NAME, name.as_bytes());
}

/// The header of one option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// `REP_*`.
    pub reply_type: u32,
    /// Payload bytes that follow (at most [`MAX_OPTION_REPLY_LEN`]).
    pub length: u32,
}

impl OptionReplyHeader {
    /// True for the error replies (`REP_ERR_*`, high bit set).
    pub fn is_error(&self) -> bool {
        self.reply_type & (1 << 31) != 0
    }
}

/// Reads an option reply header that must answer `option`.
pub fn parse_option_reply_header(
    bytes: &[u8; OPTION_REPLY_HEADER_LEN],
    option: u32,
) -> Result<OptionReplyHeader, ClientProtoError> {
    let magic = be_u64(bytes, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(ClientProtoError::BadOptionReplyMagic { found: magic });
    }
    let found = be_u32(bytes, 8);
    if found != option {
        return Err(ClientProtoError::WrongOption {
            found,
            expected: option,
        });
    }
    let length = be_u32(bytes, 16);
    if length > MAX_OPTION_REPLY_LEN {
        return Err(ClientProtoError::TooLong {
            what: "option reply",
            length: u64::from(length),
            limit: u64::from(MAX_OPTION_REPLY_LEN),
        });
    }
    Ok(OptionReplyHeader {
        reply_type: be_u32(bytes, 12),
        length,
    })
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InfoItem {
    /// `NBD_INFO_EXPORT`.
    Export(ExportFacts),
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum request sizes.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Largest request payload.
        max: u32,
    },
    /// An item this client did not ask for and ignores (name, description, newer ones).
    Other(u16),
}

/// Reads the payload of an `NBD_REP_INFO` reply.
pub fn parse_info(data: &[u8]) -> Result<InfoItem, ClientProtoError> {
    if data.len() < 2 {
        return Err(invalid(
            "NBD_REP_INFO payload is shorter than its 2-byte type",
        ));
    }
    match be_u16(data, 0) {
        INFO_EXPORT => {
            if data.len() != 12 {
                return Err(invalid(format!(
                    "NBD_INFO_EXPORT is {} bytes, expected 12",
                    data.len()
                )));
            }
            Ok(InfoItem::Export(ExportFacts {
                size: be_u64(data, 2),
                flags: be_u16(data, 10),
            }))
        }
        INFO_BLOCK_SIZE => {
            if data.len() != 14 {
                return Err(invalid(format!(
                    "NBD_INFO_BLOCK_SIZE is {} bytes, expected 14",
                    data.len()
                )));
            }
            Ok(InfoItem::BlockSize {
                min: be_u32(data, 2),
                preferred: be_u32(data, 6),
                max: be_u32(data, 10),
            })
        }
        other => Ok(InfoItem::Other(other)),
    }
}

/// Reads the answer to `NBD_OPT_EXPORT_NAME`.
pub fn parse_export_name_reply(bytes: &[u8; EXPORT_NAME_REPLY_LEN]) -> ExportFacts {
    ExportFacts {
        size: be_u64(bytes, 0),
        flags: be_u16(bytes, 8),
    }
}

/// The text of an option error reply's payload, for messages (lossy, control characters
/// replaced).
pub fn error_text(data: &[u8]) -> String {
    String::from_utf8_lossy(data)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------

/// A request header to send.
pub fn encode_request(
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) -> [u8; REQUEST_HEADER_LEN] {
    RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    }
    .encode()
}

/// What the first 4 bytes of a reply say follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A simple reply: [`SIMPLE_REPLY_LEN`] bytes in all.
    Simple,
    /// A structured reply chunk: [`STRUCTURED_HEADER_LEN`] bytes of header in all.
    Chunk,
}

/// Reads a reply's magic; structured chunks are accepted only when `structured` replies
/// were negotiated.
pub fn parse_reply_magic(bytes: [u8; 4], structured: bool) -> Result<ReplyKind, ClientProtoError> {
    match u32::from_be_bytes(bytes) {
        SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
        STRUCTURED_REPLY_MAGIC if structured => Ok(ReplyKind::Chunk),
        found => Err(ClientProtoError::BadReplyMagic { found }),
    }
}

/// A simple reply: the request's error (0 = success) and cookie. For a successful read the
/// data follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// NBD error.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

/// Reads a whole simple reply header (magic included).
pub fn parse_simple_reply(bytes: &[u8; SIMPLE_REPLY_LEN]) -> SimpleReply {
    SimpleReply {
        error: be_u32(bytes, 4),
        cookie: be_u64(bytes, 8),
    }
}

/// The header of a structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// This is the request's last chunk.
    pub done: bool,
    /// `REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload bytes that follow.
    pub length: u32,
}

/// Reads a whole structured chunk header (magic included).
pub fn parse_chunk_header(bytes: &[u8; STRUCTURED_HEADER_LEN]) -> ChunkHeader {
    ChunkHeader {
        done: be_u16(bytes, 4) & REPLY_FLAG_DONE != 0,
        kind: be_u16(bytes, 6),
        cookie: be_u64(bytes, 8),
        length: be_u32(bytes, 16),
    }
}

/// What a chunk means for the request it answers, once its payload is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkMeaning {
    /// `OFFSET_DATA`: after the 8-byte offset, the payload's data belongs at `range` of the
    /// read buffer (read it straight there).
    Data {
        /// Where the data goes in the read buffer.
        range: Range<usize>,
    },
    /// `OFFSET_HOLE`: `range` of the read buffer reads as zeros.
    Hole {
        /// The zero range of the read buffer.
        range: Range<usize>,
    },
    /// `NONE`: nothing (a final chunk without data).
    Nothing,
    /// An error: the request fails with NBD error `error`.
    Error {
        /// NBD error code.
        error: u32,
        /// The server's message, if any.
        message: String,
    },
}

/// The request a chunk answers, for checking what the chunk claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkContext {
    /// The request is a read (data and hole chunks are allowed).
    pub read: bool,
    /// The request's offset.
    pub offset: u64,
    /// The request's length.
    pub length: u32,
}

/// How many payload bytes of a chunk must be read (and handed to [`parse_chunk`]) before
/// it can be understood: 8 for `OFFSET_DATA` (the offset; the data itself goes straight
/// into the buffer), the whole payload otherwise. Refuses types a request of `context`
/// cannot receive and lengths that cannot be right for their type.
pub fn chunk_prefix_len(
    header: &ChunkHeader,
    context: ChunkContext,
) -> Result<usize, ClientProtoError> {
    let bad_length = |expected: &str| {
        invalid(format!(
            "reply chunk type {} is {} bytes, expected {expected}",
            header.kind, header.length
        ))
    };
    match header.kind {
        REPLY_TYPE_NONE if header.length == 0 => Ok(0),
        REPLY_TYPE_NONE => Err(bad_length("0")),
        REPLY_TYPE_OFFSET_DATA if context.read => {
            if header.length <= 8 || header.length - 8 > context.length {
                return Err(bad_length("8 plus 1 to the read length"));
            }
            Ok(8)
        }
        REPLY_TYPE_OFFSET_HOLE if context.read && header.length == 12 => Ok(12),
        REPLY_TYPE_OFFSET_HOLE if context.read => Err(bad_length("12")),
        kind if kind & (1 << 15) != 0 => {
            if header.length < 6 || header.length > MAX_CHUNK_META_LEN {
                return Err(bad_length(&format!("6 to {MAX_CHUNK_META_LEN}")));
            }
            Ok(usize::try_from(header.length).unwrap_or(usize::MAX))
        }
        kind => Err(invalid(format!(
            "reply chunk type {kind} cannot answer this request (cookie {})",
            header.cookie
        ))),
    }
}

/// The buffer range of `len` bytes at export offset `at`, which must lie inside the request
/// of `context`.
fn range_in_request(
    at: u64,
    len: u64,
    context: ChunkContext,
    what: &str,
) -> Result<Range<usize>, ClientProtoError> {
    let start = at.checked_sub(context.offset);
    let end = start.and_then(|start| start.checked_add(len));
    match (start, end) {
        (Some(start), Some(end)) if end <= u64::from(context.length) && len > 0 => {
            let start = usize::try_from(start).map_err(|_| invalid(what.to_owned()))?;
            let end = usize::try_from(end).map_err(|_| invalid(what.to_owned()))?;
            Ok(start..end)
        }
        _ => Err(invalid(format!(
            "{what} of {len} bytes at offset {at} is outside the request ({} bytes at {})",
            context.length, context.offset
        ))),
    }
}

/// Interprets a chunk from its header and the first [`chunk_prefix_len`] bytes of its
/// payload.
pub fn parse_chunk(
    header: &ChunkHeader,
    prefix: &[u8],
    context: ChunkContext,
) -> Result<ChunkMeaning, ClientProtoError> {
    let expected = chunk_prefix_len(header, context)?;
    if prefix.len() != expected {
        return Err(invalid(format!(
            "reply chunk prefix is {} bytes, expected {expected}",
            prefix.len()
        )));
    }
    match header.kind {
        REPLY_TYPE_NONE => Ok(ChunkMeaning::Nothing),
        REPLY_TYPE_OFFSET_DATA => {
            let data_len = u64::from(header.length - 8);
            let range = range_in_request(be_u64(prefix, 0), data_len, context, "data chunk")?;
            Ok(ChunkMeaning::Data { range })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let len = u64::from(be_u32(prefix, 8));
            let range = range_in_request(be_u64(prefix, 0), len, context, "hole chunk")?;
            Ok(ChunkMeaning::Hole { range })
        }
        _ => {
            // Error chunks: error, message length, message, and for ERROR_OFFSET an offset.
            let error = be_u32(prefix, 0);
            let message_len = usize::from(be_u16(prefix, 4));
            let trailer = if header.kind == REPLY_TYPE_ERROR_OFFSET {
                8
            } else {
                0
            };
            let known = header.kind == REPLY_TYPE_ERROR || header.kind == REPLY_TYPE_ERROR_OFFSET;
            if known && 6 + message_len + trailer != prefix.len() {
                return Err(invalid(format!(
                    "error chunk of {} bytes holds a {message_len}-byte message",
                    prefix.len()
                )));
            }
            let message = prefix.get(6..6 + message_len).unwrap_or_default();
            Ok(ChunkMeaning::Error {
                // An error chunk must carry an error; 0 would claim success.
                error: if error == 0 { proto::EIO } else { error },
                message: error_text(message),
            })
        }
    }
}

/// The errno of an NBD error code: the protocol's codes are Linux's numbers; any other
/// value is reported as `EIO`.
pub fn errno_of_nbd_error(error: u32) -> i32 {
    match error {
        proto::EPERM
        | proto::EIO
        | proto::ENOMEM
        | proto::EINVAL
        | proto::ENOSPC
        | proto::EOVERFLOW
        | proto::ENOTSUP
        | proto::ESHUTDOWN => i32::try_from(error).unwrap_or(libc::EIO),
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        encode_block_status_chunk, encode_chunk_header, encode_error_chunk, encode_none_chunk,
        encode_offset_data_header, encode_offset_hole, encode_option_error, encode_option_reply,
        oldstyle_greeting, server_greeting, simple_reply, ClientFlags, ExportInfo, Negotiation,
        OptionOutcome, TlsPolicy, CMD_READ, CMD_WRITE, OPT_GO, OPT_STRUCTURED_REPLY, REP_ACK,
        REP_ERR_UNSUP, REP_INFO,
    };

    fn info() -> ExportInfo {
        ExportInfo {
            can_flush: true,
            ..ExportInfo::new(1 << 20)
        }
    }

    #[test]
    fn reads_both_greetings_the_server_writes() {
        let greeting = server_greeting();
        let start: [u8; 16] = greeting[..16].try_into().unwrap();
        assert_eq!(parse_greeting_start(&start), Ok(GreetingStyle::Newstyle));
        let flags = parse_server_flags([greeting[16], greeting[17]]);
        assert_eq!(
            flags,
            ServerFlags {
                fixed_newstyle: true,
                no_zeroes: true
            }
        );
        assert_eq!(client_flags(flags), [0, 0, 0, 3]);
        let old = oldstyle_greeting(&info());
        let start: [u8; 16] = old[..16].try_into().unwrap();
        assert_eq!(parse_greeting_start(&start), Ok(GreetingStyle::Oldstyle));
        let rest: [u8; OLDSTYLE_REST_LEN] = old[16..].try_into().unwrap();
        assert_eq!(
            parse_oldstyle_rest(&rest),
            ExportFacts {
                size: 1 << 20,
                flags: info().transmission_flags(false)
            }
        );
        let mut bad = start;
        bad[0] = b'X';
        assert!(matches!(
            parse_greeting_start(&bad),
            Err(ClientProtoError::NotNbd { .. })
        ));
        let mut bad = start;
        bad[15] ^= 1;
        assert!(matches!(
            parse_greeting_start(&bad),
            Err(ClientProtoError::UnknownStyle { .. })
        ));
        // A plain newstyle server (no flags): the client offers nothing either.
        assert_eq!(client_flags(parse_server_flags([0, 0])), [0; 4]);
    }

    /// Feeds what the client encodes to the server's state machine and parses its answer
    /// with the client's parsers: the two sides agree on every byte.
    #[test]
    fn options_round_trip_through_the_server_negotiation() {
        let client = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        };
        let mut server = Negotiation::new("tapdisk", info(), client, TlsPolicy::Plaintext);
        let mut sent = Vec::new();
        encode_option(&mut sent, OPT_STRUCTURED_REPLY, &[]);
        let header = OptionHeader::parse(sent[..16].try_into().unwrap()).unwrap();
        let mut answer = Vec::new();
        let outcome = server
            .handle_option(header, &sent[16..], &mut answer)
            .unwrap();
        assert_eq!(outcome, OptionOutcome::Continue);
        let reply =
            parse_option_reply_header(answer[..20].try_into().unwrap(), OPT_STRUCTURED_REPLY)
                .unwrap();
        assert_eq!(reply.reply_type, REP_ACK);
        assert_eq!(reply.length, 0);

        let mut sent = Vec::new();
        encode_go(&mut sent, true, "");
        let header = OptionHeader::parse(sent[..16].try_into().unwrap()).unwrap();
        let mut answer = Vec::new();
        let outcome = server
            .handle_option(header, &sent[16..], &mut answer)
            .unwrap();
        assert!(matches!(outcome, OptionOutcome::Transmission(s) if s.structured));
        let mut at = 0;
        let mut items = Vec::new();
        loop {
            let reply =
                parse_option_reply_header(answer[at..at + 20].try_into().unwrap(), OPT_GO).unwrap();
            at += 20;
            let data = &answer[at..at + reply.length as usize];
            at += data.len();
            if reply.reply_type == REP_ACK {
                break;
            }
            assert_eq!(reply.reply_type, REP_INFO);
            items.push(parse_info(data).unwrap());
        }
        assert_eq!(at, answer.len());
        assert_eq!(
            items[0],
            InfoItem::Export(ExportFacts {
                size: 1 << 20,
                flags: info().transmission_flags(true)
            })
        );
        assert!(items.contains(&InfoItem::BlockSize {
            min: 1,
            preferred: 4096,
            max: 32 << 20
        }));

        // The export name answer (the fallback when GO is refused).
        let mut server = Negotiation::new("tapdisk", info(), client, TlsPolicy::Plaintext);
        let mut sent = Vec::new();
        encode_export_name(&mut sent, "tapdisk_client");
        let header = OptionHeader::parse(sent[..16].try_into().unwrap()).unwrap();
        let mut answer = Vec::new();
        server
            .handle_option(header, &sent[16..], &mut answer)
            .unwrap();
        assert_eq!(answer.len(), EXPORT_NAME_REPLY_LEN);
        assert_eq!(
            parse_export_name_reply(answer[..10].try_into().unwrap()),
            ExportFacts {
                size: 1 << 20,
                flags: info().transmission_flags(false)
            }
        );
    }

    #[test]
    fn option_reply_headers_are_checked() {
        let mut answer = Vec::new();
        encode_option_error(&mut answer, OPT_GO, REP_ERR_UNSUP, "no GO here");
        let header = parse_option_reply_header(answer[..20].try_into().unwrap(), OPT_GO).unwrap();
        assert!(header.is_error());
        assert_eq!(error_text(&answer[20..]), "no GO here");
        assert_eq!(
            parse_option_reply_header(answer[..20].try_into().unwrap(), OPT_STRUCTURED_REPLY),
            Err(ClientProtoError::WrongOption {
                found: OPT_GO,
                expected: OPT_STRUCTURED_REPLY
            })
        );
        let mut long = Vec::new();
        encode_option_reply(&mut long, OPT_GO, REP_INFO, &[]);
        long[16..20].copy_from_slice(&(MAX_OPTION_REPLY_LEN + 1).to_be_bytes());
        assert!(matches!(
            parse_option_reply_header(long[..20].try_into().unwrap(), OPT_GO),
            Err(ClientProtoError::TooLong { .. })
        ));
        long[0] ^= 1;
        assert!(matches!(
            parse_option_reply_header(long[..20].try_into().unwrap(), OPT_GO),
            Err(ClientProtoError::BadOptionReplyMagic { .. })
        ));
        assert!(parse_info(&[0]).is_err());
        assert!(parse_info(&[0, 0, 1]).is_err());
        assert!(parse_info(&[0, 3, 1]).is_err());
        assert_eq!(parse_info(&[0, 2, b'x']), Ok(InfoItem::Other(2)));
    }

    #[test]
    fn requests_encode_as_the_server_parses_them() {
        let bytes = encode_request(CMD_WRITE, 1, 77, 4096, 512);
        let header = RequestHeader::parse(&bytes).unwrap();
        assert_eq!(
            header,
            RequestHeader {
                flags: 1,
                command: CMD_WRITE,
                cookie: 77,
                offset: 4096,
                length: 512
            }
        );
        let read = RequestHeader::parse(&encode_request(CMD_READ, 0, 1, 0, 8)).unwrap();
        assert_eq!(read.command, CMD_READ);
    }

    fn read_of(offset: u64, length: u32) -> ChunkContext {
        ChunkContext {
            read: true,
            offset,
            length,
        }
    }

    /// Splits one encoded chunk into its parsed header and payload.
    fn chunk(bytes: &[u8]) -> (ChunkHeader, Vec<u8>) {
        assert_eq!(
            parse_reply_magic(bytes[..4].try_into().unwrap(), true),
            Ok(ReplyKind::Chunk)
        );
        let header = parse_chunk_header(bytes[..20].try_into().unwrap());
        (header, bytes[20..].to_vec())
    }

    #[test]
    fn reply_chunks_the_server_writes_are_understood() {
        let context = read_of(8192, 8192);
        let mut out = Vec::new();
        encode_offset_data_header(&mut out, 9, 8192 + 512, 1024, false);
        let (header, payload) = chunk(&out);
        assert!(!header.done);
        assert_eq!(header.cookie, 9);
        assert_eq!(chunk_prefix_len(&header, context), Ok(8));
        assert_eq!(
            parse_chunk(&header, &payload, context),
            Ok(ChunkMeaning::Data { range: 512..1536 })
        );
        let mut out = Vec::new();
        encode_offset_hole(&mut out, 9, 8192 + 4096, 4096, true);
        let (header, payload) = chunk(&out);
        assert!(header.done);
        assert_eq!(
            parse_chunk(&header, &payload, context),
            Ok(ChunkMeaning::Hole { range: 4096..8192 })
        );
        let mut out = Vec::new();
        encode_none_chunk(&mut out, 3);
        let (header, payload) = chunk(&out);
        assert_eq!(
            parse_chunk(&header, &payload, context),
            Ok(ChunkMeaning::Nothing)
        );
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 3, proto::ENOSPC, "full");
        let (header, payload) = chunk(&out);
        assert_eq!(
            parse_chunk(&header, &payload, context),
            Ok(ChunkMeaning::Error {
                error: proto::ENOSPC,
                message: "full".into()
            })
        );
        let reply = simple_reply(5, proto::EIO);
        assert_eq!(
            parse_reply_magic(reply[..4].try_into().unwrap(), false),
            Ok(ReplyKind::Simple)
        );
        assert_eq!(
            parse_simple_reply(&reply),
            SimpleReply {
                error: proto::EIO,
                cookie: 5
            }
        );
    }

    #[test]
    fn reply_chunks_that_lie_are_refused() {
        let context = read_of(8192, 4096);
        // Data outside the request, or longer than it.
        for (offset, len) in [(0, 512), (8192 + 4096, 512), (8192 + 3584, 1024)] {
            let mut out = Vec::new();
            encode_offset_data_header(&mut out, 1, offset, len, true);
            let (header, payload) = chunk(&out);
            assert!(
                parse_chunk(&header, &payload[..8], context).is_err(),
                "{offset} {len}"
            );
        }
        let mut out = Vec::new();
        encode_offset_data_header(&mut out, 1, 8192, 8192, true);
        let (header, _) = chunk(&out);
        assert!(chunk_prefix_len(&header, context).is_err());
        // A hole of length 0 or past the end.
        for (offset, len) in [(8192, 0), (8192 + 2048, 4096), (u64::MAX, 1)] {
            let mut out = Vec::new();
            encode_offset_hole(&mut out, 1, offset, len, true);
            let (header, payload) = chunk(&out);
            assert!(
                parse_chunk(&header, &payload, context).is_err(),
                "{offset} {len}"
            );
        }
        // Data chunks cannot answer writes; block status was never asked for.
        let write = ChunkContext {
            read: false,
            ..context
        };
        let mut out = Vec::new();
        encode_offset_data_header(&mut out, 1, 8192, 512, true);
        assert!(chunk_prefix_len(&chunk(&out).0, write).is_err());
        let mut out = Vec::new();
        encode_block_status_chunk(&mut out, 1, 1, &[(512, 0)], true);
        assert!(chunk_prefix_len(&chunk(&out).0, context).is_err());
        // An error chunk whose message length disagrees with its size, or too long.
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 1, proto::EIO, "abc");
        out[24..26].copy_from_slice(&9u16.to_be_bytes());
        let (header, payload) = chunk(&out);
        assert!(parse_chunk(&header, &payload, context).is_err());
        let mut out = Vec::new();
        encode_chunk_header(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1, 1 << 20);
        assert!(chunk_prefix_len(&chunk(&out).0, context).is_err());
        // An error chunk claiming error 0 still fails the request.
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 1, 0, "");
        let (header, payload) = chunk(&out);
        assert!(matches!(
            parse_chunk(&header, &payload, context),
            Ok(ChunkMeaning::Error {
                error: proto::EIO,
                ..
            })
        ));
        // Structured replies only after they were negotiated.
        assert!(parse_reply_magic(out[..4].try_into().unwrap(), false).is_err());
        assert!(parse_reply_magic([0; 4], true).is_err());
    }

    #[test]
    fn nbd_errors_become_errnos() {
        assert_eq!(errno_of_nbd_error(proto::ENOSPC), libc::ENOSPC);
        assert_eq!(errno_of_nbd_error(proto::EPERM), libc::EPERM);
        assert_eq!(errno_of_nbd_error(proto::ESHUTDOWN), libc::ESHUTDOWN);
        assert_eq!(errno_of_nbd_error(9999), libc::EIO);
    }
}
