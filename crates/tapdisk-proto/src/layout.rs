//! Absolute byte offsets of every field of `tapdisk_message_t` (x86_64 layout) and the small
//! little-endian readers/writers used by the encoder and decoder.
//!
//! All offsets in this module are absolute, i.e. measured from the first byte of the 544-byte
//! message (the union starts at [`UNION`]). Keeping them in one place lets the error messages
//! name exactly where a bad field sits.

use crate::{DecodeError, EncodeError};

/// `uint16_t type`.
pub const TYPE: usize = 0;
/// `uint16_t cookie` (the minor number, or `0xFFFF` for "all").
pub const COOKIE: usize = 2;
/// Start of `union u` (8-byte aligned; bytes 4..8 are padding).
pub const UNION: usize = 8;

/// `pid_t tapdisk_pid`.
pub const PID: usize = UNION;

/// `image.sectors` (u64).
pub const IMAGE_SECTORS: usize = UNION;
/// `image.sector_size` (u32).
pub const IMAGE_SECTOR_SIZE: usize = UNION + 8;
/// `image.info` (u32).
pub const IMAGE_INFO: usize = UNION + 12;

/// `params.flags` (u32).
pub const PARAMS_FLAGS: usize = UNION;
/// `params.devnum` (u32).
pub const PARAMS_DEVNUM: usize = UNION + 4;
/// `params.domid` (u32).
pub const PARAMS_DOMID: usize = UNION + 8;
/// `params.path` (`char[256]`).
pub const PARAMS_PATH: usize = UNION + 12;
/// `params.prt_devnum` (u32).
pub const PARAMS_PRT_DEVNUM: usize = UNION + 268;
/// `params.req_timeout` (u16).
pub const PARAMS_REQ_TIMEOUT: usize = UNION + 272;
/// `params.secondary` (`char[256]`).
pub const PARAMS_SECONDARY: usize = UNION + 274;

/// `response.error` (i32, positive errno).
pub const RESPONSE_ERROR: usize = UNION;
/// `response.message` (`char[256]`).
pub const RESPONSE_MESSAGE: usize = UNION + 4;

/// `minors.count` (i32).
pub const MINORS_COUNT: usize = UNION;
/// `minors.list` (`int[63]`).
pub const MINORS_LIST: usize = UNION + 4;

/// `list.count` (i32).
pub const LIST_COUNT: usize = UNION;
/// `list.minor` (i32).
pub const LIST_MINOR: usize = UNION + 4;
/// `list.state` (i32).
pub const LIST_STATE: usize = UNION + 8;
/// `list.path` (`char[256]`).
pub const LIST_PATH: usize = UNION + 12;

/// `info.type` (u16).
pub const STAT_TYPE: usize = UNION;
/// `info.cookie` (u16).
pub const STAT_COOKIE: usize = UNION + 2;
/// `info.length` (`size_t`, u64 on x86_64).
pub const STAT_LENGTH: usize = UNION + 8;

/// `blkif.domid` (u32).
pub const BLKIF_DOMID: usize = UNION;
/// `blkif.devid` (u32).
pub const BLKIF_DEVID: usize = UNION + 4;
/// `blkif.gref` (`uint32_t[8]`).
pub const BLKIF_GREF: usize = UNION + 8;
/// `blkif.order` (u32).
pub const BLKIF_ORDER: usize = UNION + 40;
/// `blkif.proto` (u32).
pub const BLKIF_PROTO: usize = UNION + 44;
/// `blkif.pool` (`char[256]`).
pub const BLKIF_POOL: usize = UNION + 48;
/// `blkif.port` (u32).
pub const BLKIF_PORT: usize = UNION + 304;
/// `blkif.poll_duration` (u32).
pub const BLKIF_POLL_DURATION: usize = UNION + 308;
/// `blkif.poll_idle_threshold` (u32).
pub const BLKIF_POLL_IDLE_THRESHOLD: usize = UNION + 312;

/// `query.current_progress` (u64).
pub const QUERY_CURRENT: usize = UNION;
/// `query.total_progress` (u64).
pub const QUERY_TOTAL: usize = UNION + 8;
/// `query.status` (`char[256]`).
pub const QUERY_STATUS: usize = UNION + 16;

/// `u.string.text` (`char[256]`), used by the BLOCK_DEVICE_RSP extension.
pub const STRING_TEXT: usize = UNION;

/// Copies `N` bytes starting at `offset`. Callers only pass offsets from this module, which
/// all lie inside a `MESSAGE_SIZE` buffer, so the slice is always in range.
fn array<const N: usize>(buf: &[u8], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[offset..offset + N]);
    out
}

pub(crate) fn read_u16(buf: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(array(buf, offset))
}

pub(crate) fn read_u32(buf: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(array(buf, offset))
}

pub(crate) fn read_i32(buf: &[u8], offset: usize) -> i32 {
    i32::from_le_bytes(array(buf, offset))
}

pub(crate) fn read_u64(buf: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(array(buf, offset))
}

pub(crate) fn write_u16(buf: &mut [u8], offset: usize, value: u16) {
    buf[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn write_u32(buf: &mut [u8], offset: usize, value: u32) {
    buf[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn write_i32(buf: &mut [u8], offset: usize, value: i32) {
    buf[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn write_u64(buf: &mut [u8], offset: usize, value: u64) {
    buf[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

/// Reads a NUL-terminated C string from the `len`-byte field at `offset`. The field must
/// contain a NUL; bytes after the first NUL are ignored. The text must be valid UTF-8.
pub(crate) fn read_c_string(
    buf: &[u8],
    offset: usize,
    len: usize,
    field: &'static str,
) -> Result<String, DecodeError> {
    let bytes = &buf[offset..offset + len];
    let end = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or(DecodeError::UnterminatedString { field, offset })?;
    std::str::from_utf8(&bytes[..end])
        .map(str::to_owned)
        .map_err(|err| DecodeError::InvalidUtf8 {
            field,
            offset,
            byte_offset: offset + err.valid_up_to(),
        })
}

/// Writes `text` into the `len`-byte field at `offset` followed by a NUL; the rest of the
/// field is left as it is (the encoder starts from an all-zero buffer).
pub(crate) fn write_c_string(
    buf: &mut [u8],
    offset: usize,
    len: usize,
    text: &str,
    field: &'static str,
) -> Result<(), EncodeError> {
    let bytes = text.as_bytes();
    if let Some(position) = bytes.iter().position(|&b| b == 0) {
        return Err(EncodeError::InteriorNul {
            field,
            offset,
            position,
        });
    }
    if bytes.len() >= len {
        return Err(EncodeError::StringTooLong {
            field,
            offset,
            len: bytes.len(),
            max: len - 1,
        });
    }
    buf[offset..offset + bytes.len()].copy_from_slice(bytes);
    buf[offset + bytes.len()] = 0;
    Ok(())
}
