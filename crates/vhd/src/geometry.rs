//! CHS geometry of the VHD footer, computed as the VHD specification
//! describes, plus the tolerance for the maximum geometry (65535/16/255)
//! that qemu and Hyper-V record for sizes the CHS scheme cannot express.

/// Cylinders / heads / sectors-per-track as stored in the footer
/// (`C << 16 | H << 8 | S`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

/// The largest geometry the footer can hold: 65535 × 16 × 255.
pub const MAX_GEOMETRY: Geometry = Geometry {
    cylinders: 65535,
    heads: 16,
    sectors_per_track: 255,
};

impl Geometry {
    /// Decodes the packed footer field.
    pub fn from_u32(v: u32) -> Self {
        let [c_hi, c_lo, heads, sectors_per_track] = v.to_be_bytes();
        Self {
            cylinders: u16::from_be_bytes([c_hi, c_lo]),
            heads,
            sectors_per_track,
        }
    }

    /// Encodes into the packed footer field.
    pub fn to_u32(self) -> u32 {
        (u32::from(self.cylinders) << 16)
            | (u32::from(self.heads) << 8)
            | u32::from(self.sectors_per_track)
    }

    /// Sectors addressed by this geometry.
    pub fn sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    /// The geometry the VHD specification derives from a disk size in bytes
    /// (capped at 65535 × 16 × 255 sectors).
    pub fn for_size(bytes: u64) -> Self {
        let max = MAX_GEOMETRY.sectors();
        let total = (bytes / 512).min(max);
        let (spt, heads, cyl_times_heads) = if total >= 65535 * 16 * 63 {
            (255u64, 16u64, total / 255)
        } else {
            let mut spt = 17u64;
            let mut cth = total / spt;
            let mut heads = cth.div_ceil(1024).max(4);
            if cth >= heads * 1024 || heads > 16 {
                spt = 31;
                heads = 16;
                cth = total / spt;
            }
            if cth >= heads * 1024 {
                spt = 63;
                heads = 16;
                cth = total / spt;
            }
            (spt, heads, cth)
        };
        let cylinders = (cyl_times_heads / heads).min(65535);
        Self {
            cylinders: u16::try_from(cylinders).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(16),
            sectors_per_track: u8::try_from(spt).unwrap_or(255),
        }
    }

    /// Whether this geometry is acceptable for a disk of `bytes`: it must not
    /// address more than the disk holds, except for the maximum geometry,
    /// which qemu and Hyper-V write for exact sizes that CHS cannot express
    /// (the C `vhd-util check` wrongly rejects that).
    pub fn acceptable_for(self, bytes: u64) -> bool {
        self == MAX_GEOMETRY || self.sectors() * 512 <= bytes || self == Self::for_size(bytes)
    }
}

impl std::fmt::Display for Geometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.cylinders, self.heads, self.sectors_per_track
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        // 100 MiB = 204,800 sectors: 17 sectors/track, 12 heads, 1003 cylinders.
        let g = Geometry::for_size(100 << 20);
        assert_eq!(
            g,
            Geometry {
                cylinders: 1003,
                heads: 12,
                sectors_per_track: 17
            }
        );
        assert_eq!(g.to_u32(), 0x03eb_0c11);
        let big = Geometry::for_size(3 << 40);
        assert_eq!(big, MAX_GEOMETRY);
    }

    #[test]
    fn packing() {
        let g = Geometry::from_u32(0xffff_10ff);
        assert_eq!(g, MAX_GEOMETRY);
        assert_eq!(g.to_u32(), 0xffff_10ff);
    }

    #[test]
    fn max_geometry_is_accepted() {
        assert!(MAX_GEOMETRY.acceptable_for(1 << 30));
        let too_big = Geometry {
            cylinders: 1000,
            heads: 16,
            sectors_per_track: 63,
        };
        assert!(!too_big.acceptable_for(1 << 20));
    }
}
