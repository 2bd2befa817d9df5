//! The encryption of tapdisk's encrypted VHDs (pure code over bytes).
//!
//! Data sectors are encrypted with XTS-AES (IEEE 1619), one 512-byte data unit per virtual
//! sector: a 32-byte key is XTS-AES-128 (two AES-128 keys), a 64-byte key XTS-AES-256. The
//! tweak of a sector is its *virtual* sector number (the guest's, not the file offset),
//! truncated to 32 bits, little-endian, zero-padded to 16 bytes: the "plain" IV of Linux's
//! `aes-xts-plain`, which the C tapdisk uses. Every image of a chain uses the same key at
//! the same virtual sector, so data moves between them (coalesce, copy) unchanged.
//!
//! Which key an image needs is recorded as a keyhash in its batmap header
//! ([`crate::batmap::KeyHash`]): SHA-256 of the 32-byte nonce followed by the key.

use aes::cipher::{generic_array::GenericArray, KeyInit};
use aes::{Aes128, Aes256};
use sha2::{Digest, Sha256};
use xts_mode::Xts128;

use crate::batmap::KeyHash;

/// Bytes per data unit (a VHD sector).
pub const DATA_UNIT: usize = 512;

/// Key sizes tapdisk accepts, in bytes: XTS-AES-128 and XTS-AES-256.
pub const KEY_SIZES: [usize; 2] = [32, 64];

/// Why a key cannot be used with an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is neither 32 nor 64 bytes.
    #[error("an XTS-AES key is 32 or 64 bytes (256 or 512 bits), not {0}")]
    Size(usize),
    /// The image records no keyhash.
    #[error("the image has no keyhash (it is not encrypted)")]
    NoKeyhash,
    /// SHA-256(nonce ‖ key) differs from the image's keyhash.
    #[error("the key does not match the image's keyhash")]
    Mismatch,
}

impl KeyError {
    /// The errno the C tapdisk gives: `ENOKEY` for a wrong key, else `EINVAL`.
    pub fn errno(self) -> i32 {
        match self {
            Self::Mismatch => 126,
            Self::Size(_) | Self::NoKeyhash => 22,
        }
    }
}

/// SHA-256 of `nonce` followed by `key`: what a keyhash records.
pub fn keyhash(nonce: &[u8; 32], key: &[u8]) -> [u8; 32] {
    let mut digest = Sha256::new();
    digest.update(nonce);
    digest.update(key);
    digest.finalize().into()
}

/// Checks `key` against an image's stored keyhash (`None` or a zero cookie: none recorded).
pub fn check_key(stored: Option<&KeyHash>, key: &[u8]) -> Result<(), KeyError> {
    let stored = stored
        .filter(|k| k.cookie != 0)
        .ok_or(KeyError::NoKeyhash)?;
    let computed = keyhash(&stored.nonce, key);
    let differs = computed
        .iter()
        .zip(&stored.hash)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if differs == 0 {
        Ok(())
    } else {
        Err(KeyError::Mismatch)
    }
}

/// The tweak of virtual sector `sector`: its low 32 bits, little-endian, then zeros.
pub fn sector_tweak(sector: u64) -> [u8; 16] {
    let mut tweak = [0u8; 16];
    tweak[..4].copy_from_slice(&(sector & 0xffff_ffff).to_le_bytes()[..4]);
    tweak
}

// Both key schedules inline, not boxed: a `SectorCipher` moved into locked memory takes
// them along.
#[allow(clippy::large_enum_variant)]
enum Xts {
    Aes128(Xts128<Aes128>),
    Aes256(Xts128<Aes256>),
}

/// XTS-AES over whole sectors, keyed once. The AES key schedules are wiped when dropped.
pub struct SectorCipher(Xts);

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bits = match self.0 {
            Xts::Aes128(_) => 128,
            Xts::Aes256(_) => 256,
        };
        write!(f, "SectorCipher(XTS-AES-{bits})")
    }
}

impl SectorCipher {
    /// A cipher for a 32-byte (XTS-AES-128) or 64-byte (XTS-AES-256) key.
    pub fn new(key: &[u8]) -> Result<Self, KeyError> {
        let half = key.len() / 2;
        let (k1, k2) = key.split_at(half);
        match key.len() {
            32 => Ok(Self(Xts::Aes128(Xts128::new(
                Aes128::new(GenericArray::from_slice(k1)),
                Aes128::new(GenericArray::from_slice(k2)),
            )))),
            64 => Ok(Self(Xts::Aes256(Xts128::new(
                Aes256::new(GenericArray::from_slice(k1)),
                Aes256::new(GenericArray::from_slice(k2)),
            )))),
            n => Err(KeyError::Size(n)),
        }
    }

    /// Encrypts one data unit (16 bytes or more) in place under `tweak`.
    pub fn encrypt_unit(&self, unit: &mut [u8], tweak: [u8; 16]) {
        let tweak = GenericArray::from(tweak);
        match &self.0 {
            Xts::Aes128(x) => x.encrypt_sector(unit, tweak.into()),
            Xts::Aes256(x) => x.encrypt_sector(unit, tweak.into()),
        }
    }

    /// Decrypts one data unit in place under `tweak`.
    pub fn decrypt_unit(&self, unit: &mut [u8], tweak: [u8; 16]) {
        let tweak = GenericArray::from(tweak);
        match &self.0 {
            Xts::Aes128(x) => x.decrypt_sector(unit, tweak.into()),
            Xts::Aes256(x) => x.decrypt_sector(unit, tweak.into()),
        }
    }

    /// Encrypts whole sectors in place, the first being virtual sector `first_sector`.
    /// `data.len()` must be a multiple of [`DATA_UNIT`] (a shorter tail is left as is).
    pub fn encrypt_sectors(&self, first_sector: u64, data: &mut [u8]) {
        for (sector, unit) in (first_sector..).zip(data.chunks_exact_mut(DATA_UNIT)) {
            self.encrypt_unit(unit, sector_tweak(sector));
        }
    }

    /// Decrypts whole sectors in place, the first being virtual sector `first_sector`.
    pub fn decrypt_sectors(&self, first_sector: u64, data: &mut [u8]) {
        for (sector, unit) in (first_sector..).zip(data.chunks_exact_mut(DATA_UNIT)) {
            self.decrypt_unit(unit, sector_tweak(sector));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tweak_is_the_low_32_bits_little_endian() {
        assert_eq!(sector_tweak(0)[..], [0; 16]);
        let t = sector_tweak(0x1_2345_6789);
        assert_eq!(t[..4], [0x89, 0x67, 0x45, 0x23]);
        assert_eq!(t[4..], [0; 12]);
    }

    #[test]
    fn key_sizes_and_checks() {
        assert_eq!(SectorCipher::new(&[1; 48]).unwrap_err(), KeyError::Size(48));
        let nonce = [9u8; 32];
        let stored = KeyHash {
            cookie: 1,
            nonce,
            hash: keyhash(&nonce, &[5; 32]),
        };
        assert_eq!(check_key(Some(&stored), &[5; 32]), Ok(()));
        assert_eq!(check_key(Some(&stored), &[6; 32]), Err(KeyError::Mismatch));
        assert_eq!(check_key(None, &[5; 32]), Err(KeyError::NoKeyhash));
        let unset = KeyHash {
            cookie: 0,
            ..stored
        };
        assert_eq!(check_key(Some(&unset), &[5; 32]), Err(KeyError::NoKeyhash));
        assert_eq!(KeyError::Mismatch.errno(), 126);
    }

    #[test]
    fn keyhash_is_sha256_of_nonce_then_key() {
        // SHA-256 of 32 zero bytes (zero nonce, empty key) is a published constant.
        assert_eq!(
            keyhash(&[0; 32], &[]),
            [
                0x66, 0x68, 0x7a, 0xad, 0xf8, 0x62, 0xbd, 0x77, 0x6c, 0x8f, 0xc1, 0x8b, 0x8e, 0x9f,
                0x8e, 0x20, 0x08, 0x97, 0x14, 0x85, 0x6e, 0xe2, 0x33, 0xb3, 0x90, 0x2a, 0x59, 0x1d,
                0x0d, 0x5f, 0x29, 0x25
            ]
        );
    }
}
