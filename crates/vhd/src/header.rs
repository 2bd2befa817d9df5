//! The 1024-byte dynamic disk header ("cxsparse") with the parent UUID,
//! timestamp, UTF-16 parent name and the eight parent locator entries.

use crate::bytes::{all_zero, array, be32, be64, ones_complement_checksum, put32, put64};
use crate::error::FormatError;
use crate::locator::ParentLocator;

/// Size of the dynamic header on disk.
pub const HEADER_SIZE: usize = 1024;
/// Header cookie.
pub const HEADER_COOKIE: [u8; 8] = *b"cxsparse";
/// Header version 1.0.
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Default (and in practice required) block size: 2 MiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Number of parent locator slots.
pub const LOCATOR_SLOTS: usize = 8;
/// Byte offset of the first locator entry inside the header.
pub const LOCATOR_TABLE_OFFSET: usize = 576;
/// Bytes of the UTF-16 parent name field.
pub const PARENT_NAME_BYTES: usize = 512;

const S: &str = "dynamic header";

/// Decoded dynamic header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Next structure offset (all-ones).
    pub data_offset: u64,
    /// Absolute offset of the BAT.
    pub table_offset: u64,
    /// Header version (0x00010000).
    pub header_version: u32,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Block size in bytes (a power of two, ≥ 512).
    pub block_size: u32,
    /// Stored checksum.
    pub checksum: u32,
    /// UUID of the parent (all zero for a raw parent or no parent).
    pub parent_uuid: [u8; 16],
    /// Parent modification time (VHD seconds).
    pub parent_timestamp: u32,
    /// Reserved field at 60 (must be zero).
    pub reserved1: u32,
    /// Parent file name, UTF-16 big-endian, NUL padded.
    pub parent_name: [u8; PARENT_NAME_BYTES],
    /// Parent locator entries.
    pub locators: [ParentLocator; LOCATOR_SLOTS],
    /// Bytes 768..1024 (must be zero).
    pub reserved2: Vec<u8>,
}

impl DynamicHeader {
    /// A header for a fresh image.
    pub fn new(table_offset: u64, max_table_entries: u32, block_size: u32) -> Self {
        let mut h = Self {
            data_offset: u64::MAX,
            table_offset,
            header_version: HEADER_VERSION,
            max_table_entries,
            block_size,
            checksum: 0,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            reserved1: 0,
            parent_name: [0; PARENT_NAME_BYTES],
            locators: [ParentLocator::default(); LOCATOR_SLOTS],
            reserved2: vec![0; 256],
        };
        h.update_checksum();
        h
    }

    /// Parses and validates cookie, checksum, block size and BAT offset
    /// alignment. `base` is the absolute offset used in error messages.
    pub fn parse(b: &[u8], base: u64) -> Result<Self, FormatError> {
        if b.len() < HEADER_SIZE {
            return Err(FormatError::Truncated {
                structure: S,
                offset: base,
                needed: HEADER_SIZE,
                available: b.len(),
            });
        }
        let b = &b[..HEADER_SIZE];
        if b[..8] != HEADER_COOKIE {
            return Err(FormatError::field(
                S,
                "cookie",
                base,
                format!(
                    "expected \"cxsparse\", found {:?}",
                    String::from_utf8_lossy(&b[..8])
                ),
            ));
        }
        let mut locators = [ParentLocator::default(); LOCATOR_SLOTS];
        for (i, l) in locators.iter_mut().enumerate() {
            *l = ParentLocator::parse(
                &b[LOCATOR_TABLE_OFFSET + 24 * i..LOCATOR_TABLE_OFFSET + 24 * (i + 1)],
            );
        }
        let h = Self {
            data_offset: be64(b, 8),
            table_offset: be64(b, 16),
            header_version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            checksum: be32(b, 36),
            parent_uuid: array(b, 40),
            parent_timestamp: be32(b, 56),
            reserved1: be32(b, 60),
            parent_name: array(b, 64),
            locators,
            reserved2: b[768..HEADER_SIZE].to_vec(),
        };
        let computed = ones_complement_checksum(b, Some(36));
        if computed != h.checksum {
            return Err(FormatError::field(
                S,
                "checksum",
                base + 36,
                format!("stored {:#010x}, computed {computed:#010x}", h.checksum),
            ));
        }
        if !h.block_size.is_power_of_two() || h.block_size < 512 {
            return Err(FormatError::field(
                S,
                "block_size",
                base + 32,
                format!("{} is not a power of two ≥ 512", h.block_size),
            ));
        }
        if h.block_size > (256 << 20) {
            return Err(FormatError::field(
                S,
                "block_size",
                base + 32,
                format!("{} exceeds the supported 256 MiB", h.block_size),
            ));
        }
        if h.table_offset % 512 != 0 || h.table_offset < 512 {
            return Err(FormatError::field(
                S,
                "table_offset",
                base + 16,
                format!(
                    "{} is not a sector-aligned offset past the backup footer",
                    h.table_offset
                ),
            ));
        }
        Ok(h)
    }

    /// Serializes with the stored checksum.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..8].copy_from_slice(&HEADER_COOKIE);
        put64(&mut b, 8, self.data_offset);
        put64(&mut b, 16, self.table_offset);
        put32(&mut b, 24, self.header_version);
        put32(&mut b, 28, self.max_table_entries);
        put32(&mut b, 32, self.block_size);
        put32(&mut b, 36, self.checksum);
        b[40..56].copy_from_slice(&self.parent_uuid);
        put32(&mut b, 56, self.parent_timestamp);
        put32(&mut b, 60, self.reserved1);
        b[64..576].copy_from_slice(&self.parent_name);
        for (i, l) in self.locators.iter().enumerate() {
            let at = LOCATOR_TABLE_OFFSET + 24 * i;
            l.write(&mut b[at..at + 24]);
        }
        let n = self.reserved2.len().min(256);
        b[768..768 + n].copy_from_slice(&self.reserved2[..n]);
        b
    }

    /// Recomputes and stores the checksum.
    pub fn update_checksum(&mut self) {
        self.checksum = 0;
        self.checksum = ones_complement_checksum(&self.to_bytes(), Some(36));
    }

    /// Sectors per block.
    pub fn sectors_per_block(&self) -> u64 {
        u64::from(self.block_size) / 512
    }

    /// Bytes of the per-block sector bitmap, padded to a whole sector.
    pub fn bitmap_bytes(&self) -> u64 {
        crate::bitmap::bitmap_bytes(self.sectors_per_block())
    }

    /// Bytes of the BAT on disk, padded to a sector.
    pub fn bat_bytes(&self) -> u64 {
        crate::bytes::round_up(u64::from(self.max_table_entries) * 4, 512).max(512)
    }

    /// Decodes the UTF-16 big-endian parent name (up to the first NUL).
    pub fn parent_name(&self) -> Result<String, FormatError> {
        decode_utf16(&self.parent_name, true)
            .map_err(|reason| FormatError::field(S, "parent_name", 64, reason))
    }

    /// Stores `name` as UTF-16 big-endian; fails if it does not fit.
    pub fn set_parent_name(&mut self, name: &str) -> Result<(), FormatError> {
        let enc = encode_utf16(name, true);
        if enc.len() > PARENT_NAME_BYTES {
            return Err(FormatError::field(
                S,
                "parent_name",
                64,
                format!("{} bytes of UTF-16 exceed 512", enc.len()),
            ));
        }
        self.parent_name = [0; PARENT_NAME_BYTES];
        self.parent_name[..enc.len()].copy_from_slice(&enc);
        Ok(())
    }

    /// Whether the parent UUID is all zero (raw parent, or no parent).
    pub fn parent_uuid_is_null(&self) -> bool {
        all_zero(&self.parent_uuid)
    }

    /// Checks of `vhd-util check` on the header fields, C tool messages.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.header_version != HEADER_VERSION {
            return Err("invalid header version");
        }
        if self.data_offset != u64::MAX {
            return Err("invalid data offset");
        }
        if !self.block_size.is_power_of_two() {
            return Err("invalid block size");
        }
        if self.reserved1 != 0 || !all_zero(&self.reserved2) {
            return Err("invalid reserved bits");
        }
        Ok(())
    }
}

/// Decodes UTF-16 (big- or little-endian) up to the first NUL unit.
pub fn decode_utf16(b: &[u8], big_endian: bool) -> Result<String, String> {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| {
            if big_endian {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_le_bytes([c[0], c[1]])
            }
        })
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).map_err(|e| format!("invalid UTF-16: {e}"))
}

/// Encodes `s` as UTF-16 without a terminator.
pub fn encode_utf16(s: &str, big_endian: bool) -> Vec<u8> {
    s.encode_utf16()
        .flat_map(|u| {
            if big_endian {
                u.to_be_bytes()
            } else {
                u.to_le_bytes()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locator::PlatformCode;

    fn hand_built() -> [u8; 1024] {
        let mut b = [0u8; 1024];
        b[..8].copy_from_slice(b"cxsparse");
        b[8..16].copy_from_slice(&[0xff; 8]);
        b[16..24].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0x06, 0]); // 1536
        b[24..28].copy_from_slice(&[0, 1, 0, 0]);
        b[28..32].copy_from_slice(&[0, 0, 0, 50]);
        b[32..36].copy_from_slice(&[0, 0x20, 0, 0]);
        b[40..56].copy_from_slice(&[0xab; 16]);
        b[56..60].copy_from_slice(&[0, 0, 1, 0]);
        // parent name "p.vhd" in UTF-16BE
        for (i, c) in b"p.vhd".iter().enumerate() {
            b[64 + 2 * i + 1] = *c;
        }
        // locator 0: MACX, 1 sector, 19 bytes at 0x1000
        b[576..580].copy_from_slice(b"MacX");
        b[580..584].copy_from_slice(&[0, 0, 0, 1]);
        b[584..588].copy_from_slice(&[0, 0, 0, 19]);
        b[592..600].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0]);
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        b[36..40].copy_from_slice(&(!sum).to_be_bytes());
        b
    }

    #[test]
    fn parses_hand_built_header() {
        let b = hand_built();
        let h = DynamicHeader::parse(&b, 512).unwrap();
        assert_eq!(h.table_offset, 1536);
        assert_eq!(h.max_table_entries, 50);
        assert_eq!(h.block_size, 2 << 20);
        assert_eq!(h.sectors_per_block(), 4096);
        assert_eq!(h.bitmap_bytes(), 512);
        assert_eq!(h.bat_bytes(), 512);
        assert_eq!(h.parent_name().unwrap(), "p.vhd");
        assert_eq!(h.parent_timestamp, 256);
        assert_eq!(h.locators[0].platform(), Some(PlatformCode::Macx));
        assert_eq!(h.locators[0].data_offset, 4096);
        assert_eq!(h.to_bytes(), b);
        assert_eq!(h.validate(), Ok(()));
    }

    #[test]
    fn builder_matches_hand_built() {
        let mut h = DynamicHeader::new(1536, 50, 2 << 20);
        h.parent_uuid = [0xab; 16];
        h.parent_timestamp = 256;
        h.set_parent_name("p.vhd").unwrap();
        h.locators[0] = ParentLocator {
            code: PlatformCode::Macx.code(),
            data_space: 1,
            data_len: 19,
            reserved: 0,
            data_offset: 4096,
        };
        h.update_checksum();
        assert_eq!(h.to_bytes(), hand_built());
    }

    #[test]
    fn errors_name_field_and_offset() {
        let mut b = hand_built();
        b[36] ^= 0xff;
        let e = DynamicHeader::parse(&b, 512).unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains("548"), "{e}");
        let mut h = DynamicHeader::parse(&hand_built(), 0).unwrap();
        h.block_size = 3000;
        h.update_checksum();
        let e = DynamicHeader::parse(&h.to_bytes(), 512)
            .unwrap_err()
            .to_string();
        assert!(e.contains("block_size") && e.contains("544"), "{e}");
        h.block_size = 2 << 20;
        h.table_offset = 1537;
        h.update_checksum();
        let e = DynamicHeader::parse(&h.to_bytes(), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("table_offset"), "{e}");
        assert!(DynamicHeader::parse(&[0; 10], 0).is_err());
    }

    #[test]
    fn utf16_round_trip() {
        for be in [true, false] {
            let s = "dir/ünï 😀.vhd";
            assert_eq!(decode_utf16(&encode_utf16(s, be), be).unwrap(), s);
        }
        assert!(decode_utf16(&[0xd8, 0x00, 0x00, 0x41], true).is_err());
    }
}
