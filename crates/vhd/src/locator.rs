//! Parent locator entries (24 bytes each in the dynamic header) and the
//! encoding of their payloads: `MACX` (UTF-8 `file://` URL), `W2KU` and
//! `W2RU` (UTF-16 little-endian absolute / relative Windows paths), and the
//! legacy `Wi2k`/`Wi2r` (ASCII) and `Mac ` (alias record, not decodable).

use crate::bytes::{be32, be64, put32, put64};
use crate::header::{decode_utf16, encode_utf16};

/// Platform code of a parent locator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlatformCode {
    /// Unused slot.
    None,
    /// Deprecated Windows relative path (ASCII).
    Wi2r,
    /// Deprecated Windows absolute path (ASCII).
    Wi2k,
    /// Windows relative path, UTF-16.
    W2ru,
    /// Windows absolute path, UTF-16.
    W2ku,
    /// Mac OS alias record.
    Mac,
    /// File URL, UTF-8.
    Macx,
}

impl PlatformCode {
    /// All known codes.
    pub const ALL: [Self; 7] = [
        Self::None,
        Self::Wi2r,
        Self::Wi2k,
        Self::W2ru,
        Self::W2ku,
        Self::Mac,
        Self::Macx,
    ];

    /// On-disk value.
    pub fn code(self) -> u32 {
        match self {
            Self::None => 0,
            Self::Wi2r => 0x5769_3272,
            Self::Wi2k => 0x5769_326B,
            Self::W2ru => 0x5732_7275,
            Self::W2ku => 0x5732_6B75,
            Self::Mac => 0x4D61_6320,
            Self::Macx => 0x4D61_6358,
        }
    }

    /// Decodes an on-disk value.
    pub fn from_code(v: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == v)
    }
}

/// A parent locator table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// Platform code (see [`PlatformCode`]).
    pub code: u32,
    /// Space reserved for the payload: sectors per the specification, but
    /// bytes when ≥ 512 and sector-aligned (written so by Microsoft tools).
    pub data_space: u32,
    /// Payload length in bytes.
    pub data_len: u32,
    /// Reserved (must be zero).
    pub reserved: u32,
    /// Absolute file offset of the payload.
    pub data_offset: u64,
}

impl ParentLocator {
    /// Decodes a 24-byte entry (the caller passes exactly 24 bytes).
    pub fn parse(b: &[u8]) -> Self {
        Self {
            code: be32(b, 0),
            data_space: be32(b, 4),
            data_len: be32(b, 8),
            reserved: be32(b, 12),
            data_offset: be64(b, 16),
        }
    }

    /// Encodes into a 24-byte slot.
    pub fn write(&self, b: &mut [u8]) {
        put32(b, 0, self.code);
        put32(b, 4, self.data_space);
        put32(b, 8, self.data_len);
        put32(b, 12, self.reserved);
        put64(b, 16, self.data_offset);
    }

    /// The decoded platform code.
    pub fn platform(&self) -> Option<PlatformCode> {
        PlatformCode::from_code(self.code)
    }

    /// Whether the slot is in use.
    pub fn is_used(&self) -> bool {
        self.code != 0
    }

    /// Bytes reserved on disk for the payload.
    pub fn space_bytes(&self) -> u64 {
        let s = u64::from(self.data_space);
        if s >= 512 && s % 512 == 0 {
            s
        } else {
            s * 512
        }
    }
}

/// Encodes a locator payload for `path` (as it should be recorded: relative
/// like `./parent.vhd` or absolute).
pub fn encode_payload(code: PlatformCode, path: &str) -> Option<Vec<u8>> {
    match code {
        PlatformCode::Macx => Some(format!("file://{path}").into_bytes()),
        PlatformCode::W2ku | PlatformCode::W2ru => {
            Some(encode_utf16(&path.replace('/', "\\"), false))
        }
        PlatformCode::Wi2k | PlatformCode::Wi2r => Some(path.replace('/', "\\").into_bytes()),
        PlatformCode::Mac | PlatformCode::None => None,
    }
}

/// Decodes a locator payload into a path with `/` separators. Fails on
/// undecodable text or codes without a path payload.
pub fn decode_payload(code: PlatformCode, data: &[u8]) -> Result<String, String> {
    let trimmed = |s: String| s.trim_end_matches('\0').to_string();
    let path = match code {
        PlatformCode::Macx => {
            let s = std::str::from_utf8(data).map_err(|e| format!("invalid UTF-8: {e}"))?;
            let s = trimmed(s.to_string());
            let rest = s
                .strip_prefix("file://")
                .ok_or_else(|| format!("MACX locator {s:?} is not a file:// URL"))?;
            percent_decode(rest)?
        }
        PlatformCode::W2ku | PlatformCode::W2ru => {
            let s = decode_utf16(data, false)?;
            s.replace('\\', "/")
        }
        PlatformCode::Wi2k | PlatformCode::Wi2r => {
            if !data.is_ascii() {
                return Err("legacy locator is not ASCII".into());
            }
            trimmed(String::from_utf8_lossy(data).replace('\\', "/"))
        }
        PlatformCode::Mac | PlatformCode::None => {
            return Err("locator has no path payload".into());
        }
    };
    if path.is_empty() {
        return Err("empty parent path".into());
    }
    Ok(path)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|e| format!("invalid UTF-8 after unescaping: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_bytes() {
        let l = ParentLocator {
            code: PlatformCode::W2ku.code(),
            data_space: 2,
            data_len: 40,
            reserved: 0,
            data_offset: 0x1234,
        };
        let mut b = [0u8; 24];
        l.write(&mut b);
        assert_eq!(
            b,
            [
                b'W', b'2', b'k', b'u', 0, 0, 0, 2, 0, 0, 0, 40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0x12, 0x34
            ]
        );
        assert_eq!(ParentLocator::parse(&b), l);
        assert_eq!(l.space_bytes(), 1024);
        let bytes_style = ParentLocator {
            data_space: 1024,
            ..l
        };
        assert_eq!(bytes_style.space_bytes(), 1024);
    }

    #[test]
    fn codes_are_ascii_tags() {
        assert_eq!(&PlatformCode::Macx.code().to_be_bytes(), b"MacX");
        assert_eq!(&PlatformCode::W2ru.code().to_be_bytes(), b"W2ru");
        assert_eq!(&PlatformCode::Wi2k.code().to_be_bytes(), b"Wi2k");
        assert_eq!(&PlatformCode::Mac.code().to_be_bytes(), b"Mac ");
        assert_eq!(PlatformCode::from_code(0x1234), None);
    }

    #[test]
    fn payloads() {
        let m = encode_payload(PlatformCode::Macx, "./p.vhd").unwrap();
        assert_eq!(m, b"file://./p.vhd");
        assert_eq!(decode_payload(PlatformCode::Macx, &m).unwrap(), "./p.vhd");
        let w = encode_payload(PlatformCode::W2ru, "./p.vhd").unwrap();
        assert_eq!(
            w,
            [b'.', 0, b'\\', 0, b'p', 0, b'.', 0, b'v', 0, b'h', 0, b'd', 0]
        );
        assert_eq!(decode_payload(PlatformCode::W2ru, &w).unwrap(), "./p.vhd");
        assert_eq!(
            decode_payload(PlatformCode::Macx, b"file:///a%20b.vhd").unwrap(),
            "/a b.vhd"
        );
        assert!(decode_payload(PlatformCode::Macx, b"http://x").is_err());
        assert!(decode_payload(PlatformCode::Macx, &[0xff, 0xfe]).is_err());
        assert!(decode_payload(PlatformCode::Mac, b"x").is_err());
        assert_eq!(
            decode_payload(PlatformCode::Wi2k, b"C:\\x.vhd\0\0").unwrap(),
            "C:/x.vhd"
        );
    }
}
