//! The crypto layer of an encrypted image chain (`tap-ctl open -E`), between the image chain
//! and the drivers: [`ChainCipher::layer`] checks the chain's key against each image's
//! keyhash and wraps the images that have one in an [`EncryptedImage`], which decrypts what
//! the driver reads and encrypts what is written before the driver sees it. Drivers stay
//! unaware of encryption, and the engines still do all the I/O; the cipher itself is the
//! `vhd` crate's pure [`vhd::crypt`] (XTS-AES per 512-byte virtual sector, the C tapdisk's
//! tweak), so an image written here reads back through the C tapdisk and the other way round.
//!
//! As in the C stack, the key is the VBD's, applied to every image of the chain: an
//! encrypted image opened without a key is refused with `EINVAL`, a key that does not match
//! its keyhash with `ENOKEY`, a key given for a VHD without keyhash with `EINVAL`. Images of
//! other types (a raw parent) are used as they are. The key schedules live in locked pages
//! ([`secret::Locked`]); neither the key nor anything derived from it is ever logged.
//!
//! Fast zeroing and discard are not offered above an encrypted image: they would leave
//! zero bytes in the file, which decrypt to noise, so the VBD writes encrypted zeros instead.

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use secret::{Key, Locked};
use vhd::crypt::{check_key, SectorCipher};

use crate::driver::{
    Capabilities, DiskInfo, DiskType, DriverStats, ImageDriver, ParentLink, ReadOutcome, StatusRun,
    ZeroFlags, SECTOR_SIZE,
};
use crate::engine::IoFuture;
use crate::error::failure;
use crate::image::Below;
use crate::iobuf::IoBuf;

/// A chain's key and the cipher keyed with it, shared by the chain's encrypted images.
#[derive(Debug, Clone)]
pub struct ChainCipher {
    key: Arc<Key>,
    cipher: Arc<Locked<SectorCipher>>,
}

impl ChainCipher {
    /// The cipher for `key`: `EINVAL` unless it is 32 or 64 bytes (XTS-AES-128 or -256).
    pub fn new(key: Arc<Key>) -> io::Result<Self> {
        let cipher = SectorCipher::new(key.as_bytes())
            .map_err(|e| failure(e.errno(), format!("encryption key: {e}")))?;
        if !key.is_locked() {
            tracing::debug!("the encryption key could not be locked in memory (RLIMIT_MEMLOCK); it is kept out of core dumps");
        }
        Ok(Self {
            key,
            cipher: Arc::new(Locked::new(cipher)?),
        })
    }

    /// Puts the crypto layer above `driver` when the image is encrypted, after checking the
    /// key against its keyhash; `cipher` is the chain's (`None`: no key was given).
    pub fn layer(
        cipher: Option<&Self>,
        driver: Box<dyn ImageDriver>,
    ) -> io::Result<Box<dyn ImageDriver>> {
        let name = driver.path().display().to_string();
        match (driver.keyhash(), cipher) {
            (None, None) => Ok(driver),
            (None, Some(_)) if driver.disk_type() != DiskType::Vhd => Ok(driver),
            (None, Some(_)) => Err(failure(
                libc::EINVAL,
                format!("{name}: an encryption key was given, but the image has no keyhash (it is not encrypted)"),
            )),
            (Some(_), None) => Err(failure(
                libc::EINVAL,
                format!("{name}: the image is encrypted and no key was given (tap-ctl open -E)"),
            )),
            (Some(stored), Some(chain)) => {
                check_key(Some(&stored), chain.key.as_bytes())
                    .map_err(|e| failure(e.errno(), format!("{name}: {e}")))?;
                Ok(Box::new(EncryptedImage {
                    inner: driver,
                    cipher: chain.cipher.clone(),
                }))
            }
        }
    }
}

/// An encrypted image: its driver below, the chain's cipher around it.
#[derive(Debug)]
pub struct EncryptedImage {
    inner: Box<dyn ImageDriver>,
    cipher: Arc<Locked<SectorCipher>>,
}

/// The sector ranges of `0..total` not in `absent` (which the driver gives in order).
fn present(total: u64, absent: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut runs = Vec::new();
    let mut at = 0;
    for hole in absent {
        if hole.start > at {
            runs.push(at..hole.start.min(total));
        }
        at = at.max(hole.end);
    }
    if at < total {
        runs.push(at..total);
    }
    runs
}

fn byte_range(sectors: &Range<u64>) -> io::Result<Range<usize>> {
    let to_bytes = |s: u64| {
        usize::try_from(s * SECTOR_SIZE).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    };
    Ok(to_bytes(sectors.start)?..to_bytes(sectors.end)?)
}

impl ImageDriver for EncryptedImage {
    fn disk_type(&self) -> DiskType {
        self.inner.disk_type()
    }
    fn info(&self) -> DiskInfo {
        self.inner.info()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn parent(&self) -> Option<ParentLink> {
        self.inner.parent()
    }
    fn uuid(&self) -> Option<[u8; 16]> {
        self.inner.uuid()
    }
    fn keyhash(&self) -> Option<vhd::batmap::KeyHash> {
        self.inner.keyhash()
    }
    fn validate_parent(&self, parent: &dyn ImageDriver) -> io::Result<()> {
        self.inner.validate_parent(parent)
    }
    fn attach_below(&self, below: Below) {
        self.inner.attach_below(below);
    }
    fn read(&self, sector: u64, buf: IoBuf) -> IoFuture<'_, ReadOutcome> {
        Box::pin(async move {
            let total = buf.len() as u64 / SECTOR_SIZE;
            let mut outcome = self.inner.read(sector, buf).await?;
            for run in present(total, &outcome.absent) {
                let bytes = byte_range(&run)?;
                let data = outcome
                    .buf
                    .as_mut_slice()
                    .get_mut(bytes)
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
                self.cipher.decrypt_sectors(sector + run.start, data);
            }
            Ok(outcome)
        })
    }
    fn write(&self, sector: u64, buf: Arc<IoBuf>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if buf.len() as u64 % SECTOR_SIZE != 0 {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let mut sealed = IoBuf::copy_from(buf.as_slice());
            self.cipher.encrypt_sectors(sector, sealed.as_mut_slice());
            self.inner.write(sector, Arc::new(sealed)).await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.inner.flush()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            discard: false,
            write_zeroes: false,
            ..self.inner.capabilities()
        }
    }
    fn write_zeroes(&self, _sector: u64, _count: u64, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)) })
    }
    fn block_status(&self, sector: u64, count: u64) -> IoFuture<'_, Vec<StatusRun>> {
        self.inner.block_status(sector, count)
    }
    fn stats(&self) -> Option<DriverStats> {
        self.inner.stats()
    }
    fn release(&self) {
        self.inner.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_runs_are_what_absent_leaves() {
        let whole: Vec<Range<u64>> = std::iter::once(0..8).collect();
        assert_eq!(present(8, &[]), whole);
        assert_eq!(present(8, &whole), Vec::<Range<u64>>::new());
        assert_eq!(present(8, &[1..3, 5..6]), vec![0..1, 3..5, 6..8]);
        assert_eq!(
            present(8, &[0..2, 6..8]),
            std::iter::once(2..6).collect::<Vec<_>>()
        );
    }
}
