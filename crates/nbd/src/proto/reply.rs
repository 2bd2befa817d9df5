//! The reply side of the transmission phase: simple replies, structured reply chunks (data,
//! holes, errors, block status) and their extended-header form, the split of read data into
//! data and hole chunks, block status descriptors clamped to a query, and the NBD error an
//! I/O error maps to. Encoders append to a caller's buffer, so replies can be packed.

use super::{truncate_str, wire_len, MAX_STRING_LEN};

/// Magic in front of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Magic in front of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

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

/// Reply chunk magic with extended headers.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

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
/// Extent status flag of `qemu:dirty-bitmap:` contexts: the extent changed.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Size of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// Most extents sent in one block status reply.
pub const MAX_EXTENTS_PER_REPLY: usize = 1024;

/// One extent of a block status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// `STATE_HOLE` | `STATE_ZERO`.
    pub flags: u32,
}

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

/// Append a `BLOCK_STATUS` chunk for `context` with `descriptors` (length, flags); `done`
/// when it is the request's last chunk.
pub fn encode_block_status_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    context: u32,
    descriptors: &[(u32, u32)],
    done: bool,
) {
    let length = 4u32.saturating_add(wire_len(descriptors.len()).saturating_mul(8));
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    encode_chunk_header(out, flags, REPLY_TYPE_BLOCK_STATUS, cookie, length);
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
/// pieces of the same kind merge. An empty buffer gives no chunks. The chunks replace what
/// `chunks` held (a vector the caller keeps, so that a reply costs no allocation).
pub fn split_read_into(offset: u64, data: &[u8], chunks: &mut Vec<ReadChunk>) {
    chunks.clear();
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
}

#[cfg(test)]
mod tests {
    use crate::proto::*;
    use proptest::prelude::*;

    fn split_read(offset: u64, data: &[u8]) -> Vec<ReadChunk> {
        let mut chunks = Vec::new();
        split_read_into(offset, data, &mut chunks);
        chunks
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
        encode_block_status_chunk(&mut out, 3, 1, &[(512, 3), (1024, 0)], true);
        assert_eq!(&out[4..8], &[0, 1, 0, 5]);
        assert_eq!(
            &out[16..],
            &[0, 0, 0, 20, 0, 0, 0, 1, 0, 0, 2, 0, 0, 0, 0, 3, 0, 0, 4, 0, 0, 0, 0, 0]
        );
        // Not the last chunk of its request: no DONE flag.
        out.clear();
        encode_block_status_chunk(&mut out, 3, 2, &[(512, 1)], false);
        assert_eq!(&out[4..8], &[0, 0, 0, 5]);
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

    proptest! {
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
