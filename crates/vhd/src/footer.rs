//! The 512-byte VHD footer (also the backup copy at offset 0 of dynamic and
//! differencing disks), including the tapdisk `hidden` byte at offset 85.

use crate::bytes::{all_zero, array, be32, be64, ones_complement_checksum, put32, put64};
use crate::error::FormatError;
use crate::geometry::Geometry;

/// Size of the footer on disk.
pub const FOOTER_SIZE: usize = 512;
/// Footer cookie.
pub const FOOTER_COOKIE: [u8; 8] = *b"conectix";
/// Cookie of a footer disabled during a journaled operation.
pub const POISON_COOKIE: [u8; 8] = *b"v_poison";
/// The "reserved" feature bit that must always be set.
pub const FEATURE_RESERVED: u32 = 0x2;
/// The "temporary" feature bit.
pub const FEATURE_TEMPORARY: u32 = 0x1;
/// File format version 1.0.
pub const FILE_FORMAT_VERSION: u32 = 0x0001_0000;
/// Creator version written by tapdisk 1.3 (batmap v1.2).
pub const TAP_CREATOR_VERSION: u32 = 0x0001_0003;
/// Creator application of tapdisk.
pub const TAP_CREATOR: [u8; 4] = *b"tap\0";
/// Creator host OS as libvhd writes it (0, unspecified).
pub const CREATOR_OS: u32 = 0;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 UTC).
pub const VHD_EPOCH_OFFSET: u64 = 946_684_800;

/// Disk type stored in the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Data at offset 0, footer at the end.
    Fixed,
    /// Sparse disk with BAT and no parent.
    Dynamic,
    /// Sparse disk whose absent sectors come from a parent.
    Differencing,
}

impl DiskType {
    /// Value of the footer `type` field.
    pub fn code(self) -> u32 {
        match self {
            Self::Fixed => 2,
            Self::Dynamic => 3,
            Self::Differencing => 4,
        }
    }

    /// Decodes the footer `type` field.
    pub fn from_code(v: u32) -> Option<Self> {
        match v {
            2 => Some(Self::Fixed),
            3 => Some(Self::Dynamic),
            4 => Some(Self::Differencing),
            _ => None,
        }
    }

    /// Whether the disk has a dynamic header and BAT.
    pub fn is_sparse(self) -> bool {
        !matches!(self, Self::Fixed)
    }
}

/// Decoded footer. `reserved` keeps bytes 86..512 so that a parse/serialize
/// round trip is byte-exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// True when the cookie was `v_poison` (disabled image).
    pub poisoned: bool,
    /// Feature bits (`FEATURE_RESERVED` must be set).
    pub features: u32,
    /// File format version (0x00010000).
    pub file_format_version: u32,
    /// Offset of the dynamic header, or all-ones for fixed disks.
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator application (`"tap\0"` for tapdisk, `"qemu"`, `"win "`…).
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: u32,
    /// Creator host OS.
    pub creator_os: u32,
    /// Size at creation.
    pub original_size: u64,
    /// Current virtual size in bytes.
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: Geometry,
    /// Raw disk type field (see [`DiskType::from_code`]).
    pub disk_type: u32,
    /// Checksum as stored.
    pub checksum: u32,
    /// Image UUID.
    pub uuid: [u8; 16],
    /// Saved-state flag.
    pub saved_state: u8,
    /// tapdisk/SM "hidden" flag (byte 85).
    pub hidden: u8,
    /// Bytes 86..512.
    pub reserved: Vec<u8>,
}

const S: &str = "footer";

impl Footer {
    /// A fresh footer as tapdisk writes it.
    pub fn new(disk_type: DiskType, size: u64, uuid: [u8; 16], timestamp: u32) -> Self {
        let mut f = Self {
            poisoned: false,
            features: FEATURE_RESERVED,
            file_format_version: FILE_FORMAT_VERSION,
            data_offset: if disk_type.is_sparse() { 512 } else { u64::MAX },
            timestamp,
            creator_app: TAP_CREATOR,
            creator_version: TAP_CREATOR_VERSION,
            creator_os: CREATOR_OS,
            original_size: size,
            current_size: size,
            geometry: Geometry::for_size(size),
            disk_type: disk_type.code(),
            checksum: 0,
            uuid,
            saved_state: 0,
            hidden: 0,
            reserved: vec![0; FOOTER_SIZE - 86],
        };
        f.checksum = f.compute_checksum();
        f
    }

    /// The decoded disk type, if the field is valid.
    pub fn kind(&self) -> Option<DiskType> {
        DiskType::from_code(self.disk_type)
    }

    /// Whether tapdisk created the image.
    pub fn created_by_tap(&self) -> bool {
        &self.creator_app[..3] == b"tap"
    }

    /// Whether the image should carry a tapdisk batmap (tap creator ≥ 1.1).
    pub fn expects_batmap(&self) -> bool {
        self.created_by_tap() && self.creator_version >= 0x0001_0001
    }

    /// Parses a footer, checking the cookie, the checksum and the disk type.
    /// `base` is the absolute offset used in error messages.
    pub fn parse(b: &[u8], base: u64) -> Result<Self, FormatError> {
        if b.len() < FOOTER_SIZE {
            return Err(FormatError::Truncated {
                structure: S,
                offset: base,
                needed: FOOTER_SIZE,
                available: b.len(),
            });
        }
        let b = &b[..FOOTER_SIZE];
        let cookie: [u8; 8] = array(b, 0);
        let poisoned = cookie == POISON_COOKIE;
        if cookie != FOOTER_COOKIE && !poisoned {
            return Err(FormatError::field(
                S,
                "cookie",
                base,
                format!(
                    "expected \"conectix\", found {:?}",
                    String::from_utf8_lossy(&cookie)
                ),
            ));
        }
        let f = Self::decode_unchecked(b, poisoned);
        let computed = f.compute_checksum();
        if computed != f.checksum && !f.legacy_hidden_checksum_ok() {
            return Err(FormatError::field(
                S,
                "checksum",
                base + 64,
                format!("stored {:#010x}, computed {computed:#010x}", f.checksum),
            ));
        }
        if f.kind().is_none() {
            return Err(FormatError::field(
                S,
                "type",
                base + 60,
                format!("unknown disk type {}", f.disk_type),
            ));
        }
        if f.kind() != Some(DiskType::Fixed) && f.data_offset == u64::MAX {
            return Err(FormatError::field(
                S,
                "data_offset",
                base + 16,
                "sparse disk without a dynamic header offset",
            ));
        }
        Ok(f)
    }

    fn decode_unchecked(b: &[u8], poisoned: bool) -> Self {
        Self {
            poisoned,
            features: be32(b, 8),
            file_format_version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: array(b, 28),
            creator_version: be32(b, 32),
            creator_os: be32(b, 36),
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            geometry: Geometry::from_u32(be32(b, 56)),
            disk_type: be32(b, 60),
            checksum: be32(b, 64),
            uuid: array(b, 68),
            saved_state: b[84],
            hidden: b[85],
            reserved: b[86..FOOTER_SIZE].to_vec(),
        }
    }

    /// tapdisk 0.1 and 1.1 set the hidden byte without updating the checksum.
    fn legacy_hidden_checksum_ok(&self) -> bool {
        if self.hidden == 0
            || !self.created_by_tap()
            || !(self.creator_version == 0x0000_0001 || self.creator_version == 0x0001_0001)
        {
            return false;
        }
        let mut copy = self.clone();
        copy.hidden = 0;
        copy.compute_checksum() == self.checksum
    }

    /// Serializes with the stored checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[..8].copy_from_slice(if self.poisoned {
            &POISON_COOKIE
        } else {
            &FOOTER_COOKIE
        });
        put32(&mut b, 8, self.features);
        put32(&mut b, 12, self.file_format_version);
        put64(&mut b, 16, self.data_offset);
        put32(&mut b, 24, self.timestamp);
        b[28..32].copy_from_slice(&self.creator_app);
        put32(&mut b, 32, self.creator_version);
        put32(&mut b, 36, self.creator_os);
        put64(&mut b, 40, self.original_size);
        put64(&mut b, 48, self.current_size);
        put32(&mut b, 56, self.geometry.to_u32());
        put32(&mut b, 60, self.disk_type);
        put32(&mut b, 64, self.checksum);
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        b[85] = self.hidden;
        let n = self.reserved.len().min(FOOTER_SIZE - 86);
        b[86..86 + n].copy_from_slice(&self.reserved[..n]);
        b
    }

    /// The checksum over the serialized footer (checksum field as zero).
    pub fn compute_checksum(&self) -> u32 {
        let mut copy = self.clone();
        copy.checksum = 0;
        ones_complement_checksum(&copy.to_bytes(), Some(64))
    }

    /// Recomputes and stores the checksum.
    pub fn update_checksum(&mut self) {
        self.checksum = self.compute_checksum();
    }

    /// Serializes after refreshing the checksum.
    pub fn to_bytes_checked(&mut self) -> [u8; FOOTER_SIZE] {
        self.update_checksum();
        self.to_bytes()
    }

    /// The field checks of `vhd-util check` (beyond what [`Footer::parse`]
    /// enforces). Returns the C tool's message on failure.
    pub fn validate(&self, now_vhd_time: u32) -> Result<(), &'static str> {
        if self.poisoned {
            return Err("invalid cookie");
        }
        if self.features & FEATURE_RESERVED == 0 {
            return Err("invalid 'reserved' feature");
        }
        if self.features & !(FEATURE_RESERVED | FEATURE_TEMPORARY) != 0 {
            return Err("invalid extra features");
        }
        if self.file_format_version != FILE_FORMAT_VERSION {
            return Err("invalid file format version");
        }
        let kind = self.kind().ok_or("invalid type")?;
        if kind == DiskType::Fixed && self.data_offset != u64::MAX {
            return Err("invalid data offset");
        }
        if u64::from(self.timestamp) > u64::from(now_vhd_time) + 1800 {
            return Err("creation time in future");
        }
        if self.created_by_tap() && self.creator_version > TAP_CREATOR_VERSION {
            return Err("unsupported tap creator version");
        }
        if !self.geometry.acceptable_for(self.current_size) {
            return Err("geometry too large");
        }
        if self.saved_state > 1 {
            return Err("invalid 'saved' state");
        }
        if self.hidden > 1 {
            return Err("invalid 'hidden' state");
        }
        if !all_zero(&self.reserved) {
            return Err("invalid 'reserved' bits");
        }
        Ok(())
    }
}

/// Current time in VHD seconds (since 2000-01-01 UTC), saturating.
pub fn vhd_now() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    unix_to_vhd_time(unix)
}

/// Converts Unix seconds to VHD seconds (saturating at both ends).
pub fn unix_to_vhd_time(unix: u64) -> u32 {
    u32::try_from(unix.saturating_sub(VHD_EPOCH_OFFSET)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A footer built byte by byte, independent of `to_bytes`.
    fn hand_built() -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..8].copy_from_slice(b"conectix");
        b[8..12].copy_from_slice(&[0, 0, 0, 2]);
        b[12..16].copy_from_slice(&[0, 1, 0, 0]);
        b[16..24].copy_from_slice(&[0, 0, 0, 0, 0, 0, 2, 0]);
        b[24..28].copy_from_slice(&[0x2a, 0, 0, 1]);
        b[28..32].copy_from_slice(b"tap\0");
        b[32..36].copy_from_slice(&[0, 1, 0, 3]);
        b[40..48].copy_from_slice(&[0, 0, 0, 0, 0x06, 0x40, 0, 0]); // 100 MiB
        b[48..56].copy_from_slice(&[0, 0, 0, 0, 0x06, 0x40, 0, 0]);
        b[56..60].copy_from_slice(&[0x03, 0xeb, 0x0c, 0x11]);
        b[60..64].copy_from_slice(&[0, 0, 0, 3]);
        b[68..84].copy_from_slice(&[0x11; 16]);
        b[85] = 1;
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        b[64..68].copy_from_slice(&(!sum).to_be_bytes());
        b
    }

    #[test]
    fn parses_hand_built_footer() {
        let b = hand_built();
        let f = Footer::parse(&b, 0).unwrap();
        assert_eq!(f.kind(), Some(DiskType::Dynamic));
        assert_eq!(f.current_size, 100 << 20);
        assert_eq!(f.data_offset, 512);
        assert_eq!(f.hidden, 1);
        assert_eq!(f.timestamp, 0x2a00_0001);
        assert!(f.created_by_tap());
        assert_eq!(f.to_bytes(), b);
        assert_eq!(f.validate(u32::MAX - 4000), Ok(()));
    }

    #[test]
    fn new_matches_hand_built() {
        let mut f = Footer::new(DiskType::Dynamic, 100 << 20, [0x11; 16], 0x2a00_0001);
        f.hidden = 1;
        assert_eq!(f.to_bytes_checked(), hand_built());
    }

    #[test]
    fn bad_checksum_names_offset() {
        let mut b = hand_built();
        b[64] ^= 1;
        let e = Footer::parse(&b, 1000).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        assert!(e.to_string().contains("1064"), "{e}");
    }

    #[test]
    fn bad_cookie_and_type() {
        let mut b = hand_built();
        b[0] = b'C';
        assert!(Footer::parse(&b, 0)
            .unwrap_err()
            .to_string()
            .contains("cookie"));
        let mut f = Footer::parse(&hand_built(), 0).unwrap();
        f.disk_type = 9;
        let b = f.to_bytes_checked();
        assert!(Footer::parse(&b, 0)
            .unwrap_err()
            .to_string()
            .contains("type"));
        assert!(Footer::parse(&b[..100], 0).is_err());
    }

    #[test]
    fn poisoned_footer_parses_as_disabled() {
        let mut f = Footer::parse(&hand_built(), 0).unwrap();
        f.poisoned = true;
        let b = f.to_bytes_checked();
        assert_eq!(&b[..8], b"v_poison");
        assert!(Footer::parse(&b, 0).unwrap().poisoned);
    }

    #[test]
    fn legacy_hidden_checksum() {
        let mut f = Footer::new(DiskType::Dynamic, 1 << 20, [1; 16], 5);
        f.creator_version = 0x0001_0001;
        f.update_checksum();
        f.hidden = 1; // old tapdisk did not refresh the checksum
        assert!(Footer::parse(&f.to_bytes(), 0).is_ok());
        f.creator_version = 0x0001_0003;
        f.hidden = 0;
        f.update_checksum();
        f.hidden = 1;
        assert!(Footer::parse(&f.to_bytes(), 0).is_err());
    }
}
