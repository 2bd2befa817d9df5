//! The tapdisk batmap extension: a 512-byte `tdbatmap` header placed right
//! after the padded BAT, then a bitmap with one bit per block (MSB first)
//! saying "this block is completely allocated". The header also carries the
//! SM marker byte and the encryption keyhash.

use crate::bytes::{array, be32, be64, put32, put64};
use crate::error::FormatError;

/// Header size.
pub const BATMAP_HEADER_SIZE: usize = 512;
/// Header cookie.
pub const BATMAP_COOKIE: [u8; 8] = *b"tdbatmap";
/// Batmap version 1.2 (current; unsigned checksum).
pub const BATMAP_VERSION: u32 = 0x0001_0002;
/// Batmap version 1.1 (checksum summed signed bytes).
pub const BATMAP_VERSION_1_1: u32 = 0x0001_0001;

const S: &str = "batmap header";

/// The keyhash stored in the batmap header (65 bytes at 29).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyHash {
    /// Non-zero when a hash is set.
    pub cookie: u8,
    /// Nonce mixed with the key.
    pub nonce: [u8; 32],
    /// SHA-256 of nonce ‖ key.
    pub hash: [u8; 32],
}

/// Decoded batmap header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatmapHeader {
    /// Absolute offset of the map.
    pub batmap_offset: u64,
    /// Map size in sectors.
    pub batmap_size: u32,
    /// Version.
    pub batmap_version: u32,
    /// Checksum of the map bytes.
    pub checksum: u32,
    /// SM marker byte.
    pub marker: u8,
    /// Encryption keyhash.
    pub keyhash: KeyHash,
    /// Bytes 94..512.
    pub reserved: Vec<u8>,
}

impl BatmapHeader {
    /// A header for a map of `size_sectors` at `batmap_offset`.
    pub fn new(batmap_offset: u64, size_sectors: u32) -> Self {
        Self {
            batmap_offset,
            batmap_size: size_sectors,
            batmap_version: BATMAP_VERSION,
            checksum: 0,
            marker: 0,
            keyhash: KeyHash::default(),
            reserved: vec![0; BATMAP_HEADER_SIZE - 94],
        }
    }

    /// Parses, checking the cookie and version. `base` is the absolute
    /// offset used in error messages.
    pub fn parse(b: &[u8], base: u64) -> Result<Self, FormatError> {
        if b.len() < BATMAP_HEADER_SIZE {
            return Err(FormatError::Truncated {
                structure: S,
                offset: base,
                needed: BATMAP_HEADER_SIZE,
                available: b.len(),
            });
        }
        if b[..8] != BATMAP_COOKIE {
            return Err(FormatError::field(
                S,
                "cookie",
                base,
                format!(
                    "expected \"tdbatmap\", found {:?}",
                    String::from_utf8_lossy(&b[..8])
                ),
            ));
        }
        let h = Self {
            batmap_offset: be64(b, 8),
            batmap_size: be32(b, 16),
            batmap_version: be32(b, 20),
            checksum: be32(b, 24),
            marker: b[28],
            keyhash: KeyHash {
                cookie: b[29],
                nonce: array(b, 30),
                hash: array(b, 62),
            },
            reserved: b[94..BATMAP_HEADER_SIZE].to_vec(),
        };
        if h.batmap_version > BATMAP_VERSION {
            return Err(FormatError::field(
                S,
                "batmap_version",
                base + 20,
                format!("unsupported version {:#010x}", h.batmap_version),
            ));
        }
        if h.batmap_size == 0 {
            return Err(FormatError::field(S, "batmap_size", base + 16, "size zero"));
        }
        if h.batmap_offset == 0 || h.batmap_offset % 512 != 0 {
            return Err(FormatError::field(
                S,
                "batmap_offset",
                base + 8,
                format!("{} is not a non-zero sector offset", h.batmap_offset),
            ));
        }
        Ok(h)
    }

    /// Serializes.
    pub fn to_bytes(&self) -> [u8; BATMAP_HEADER_SIZE] {
        let mut b = [0u8; BATMAP_HEADER_SIZE];
        b[..8].copy_from_slice(&BATMAP_COOKIE);
        put64(&mut b, 8, self.batmap_offset);
        put32(&mut b, 16, self.batmap_size);
        put32(&mut b, 20, self.batmap_version);
        put32(&mut b, 24, self.checksum);
        b[28] = self.marker;
        b[29] = self.keyhash.cookie;
        b[30..62].copy_from_slice(&self.keyhash.nonce);
        b[62..94].copy_from_slice(&self.keyhash.hash);
        let n = self.reserved.len().min(BATMAP_HEADER_SIZE - 94);
        b[94..94 + n].copy_from_slice(&self.reserved[..n]);
        b
    }

    /// Map bytes on disk.
    pub fn map_bytes(&self) -> u64 {
        u64::from(self.batmap_size) * 512
    }
}

/// Sectors of batmap needed for `blocks` BAT entries (at least one).
pub fn batmap_sectors(blocks: u32) -> u32 {
    u32::try_from(u64::from(blocks).div_ceil(8).div_ceil(512).max(1)).unwrap_or(u32::MAX)
}

/// The batmap checksum: one's complement of the byte sum of the map.
/// Version 1.1 summed bytes as signed chars, later versions unsigned.
pub fn batmap_checksum(map: &[u8], version: u32) -> u32 {
    let mut sum: u32 = 0;
    for &b in map {
        let v = if version == BATMAP_VERSION_1_1 {
            // sign-extend as the 1.1 writer did
            u32::from_ne_bytes(i32::from(i8::from_ne_bytes([b])).to_ne_bytes())
        } else {
            u32::from(b)
        };
        sum = sum.wrapping_add(v);
    }
    !sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_exact() {
        let mut b = [0u8; 512];
        b[..8].copy_from_slice(b"tdbatmap");
        b[8..16].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0x0a, 0]); // 2560
        b[16..20].copy_from_slice(&[0, 0, 0, 1]);
        b[20..24].copy_from_slice(&[0, 1, 0, 2]);
        b[24..28].copy_from_slice(&[0xff, 0xff, 0xff, 0xfe]);
        b[28] = 1;
        b[29] = 1;
        b[30] = 0xaa;
        b[93] = 0xbb;
        let h = BatmapHeader::parse(&b, 2048).unwrap();
        assert_eq!(h.batmap_offset, 2560);
        assert_eq!(h.batmap_size, 1);
        assert_eq!(h.marker, 1);
        assert_eq!(h.keyhash.nonce[0], 0xaa);
        assert_eq!(h.keyhash.hash[31], 0xbb);
        assert_eq!(h.to_bytes(), b);
        let mut map = vec![0u8; 512];
        map[0] = 1;
        assert_eq!(batmap_checksum(&map, BATMAP_VERSION), 0xffff_fffe);
    }

    #[test]
    fn signed_legacy_checksum() {
        let map = [0x80u8, 0x01];
        assert_eq!(batmap_checksum(&map, BATMAP_VERSION), !0x81);
        assert_eq!(
            batmap_checksum(&map, BATMAP_VERSION_1_1),
            !(0xffff_ff80u32.wrapping_add(1))
        );
    }

    #[test]
    fn rejects_bad_fields() {
        let mut h = BatmapHeader::new(2560, 1);
        let mut b = h.to_bytes();
        b[0] = b'x';
        assert!(BatmapHeader::parse(&b, 2048)
            .unwrap_err()
            .to_string()
            .contains("cookie"));
        h.batmap_version = 0x0002_0000;
        let e = BatmapHeader::parse(&h.to_bytes(), 2048)
            .unwrap_err()
            .to_string();
        assert!(e.contains("batmap_version") && e.contains("2068"), "{e}");
        assert_eq!(batmap_sectors(50), 1);
        assert_eq!(batmap_sectors(4097), 2);
    }
}
