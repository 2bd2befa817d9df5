//! The request side of the transmission phase: request headers (compact 28-byte ones and,
//! after `NBD_OPT_EXTENDED_HEADERS`, 32-byte extended ones with 64-bit lengths) and their
//! validation against the negotiated [`Session`]: [`classify_request`] decides whether a
//! request runs, is refused with an NBD error (and how much payload to skip), or ends the
//! connection.

use super::{be_u16, be_u32, be_u64, ProtoError, Session, DEFAULT_MAX_BLOCK, EXTENDED_HEADER_LEN};
use super::{EINVAL, ENOSPC, EPERM};
use super::{
    TFLAG_SEND_CACHE, TFLAG_SEND_DF, TFLAG_SEND_FAST_ZERO, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA,
    TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES,
};

/// Magic in front of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;

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

/// Request magic with extended headers (64-bit lengths).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;

/// Size of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;

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
    /// Block status, for every context the session selected.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// Only one extent wanted (per context).
        req_one: bool,
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
        CMD_BLOCK_STATUS => {
            if session.contexts.is_empty() {
                reject(EINVAL, "no metadata context negotiated")
            } else if !allowed(CMD_FLAG_REQ_ONE) {
                reject(EINVAL, "unsupported flags on NBD_CMD_BLOCK_STATUS")
            } else if length == 0 || !in_range {
                reject(EINVAL, "block status range empty or beyond the end")
            } else {
                Ok(RequestAction::Execute(Command::BlockStatus {
                    offset,
                    length,
                    req_one: header.flags & CMD_FLAG_REQ_ONE != 0,
                }))
            }
        }
        _ => reject(EINVAL, "unknown command"),
    }
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

#[cfg(test)]
mod tests {
    use crate::proto::tests::full_info;
    use crate::proto::*;
    use proptest::prelude::*;

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
            contexts: Vec::new(),
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

    proptest! {
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
            if structured {
                s.contexts = vec![MetaContext::BaseAllocation];
            }
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
    }
}
