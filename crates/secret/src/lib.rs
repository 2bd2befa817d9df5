//! Encryption keys and what is derived from them, kept where they cannot leak: in pages of
//! their own ([`Locked`]: locked in RAM where the memory-lock limit allows, excluded from
//! core dumps, wiped in forked children, zeroed when dropped), never printed (`Debug` shows
//! the length only).
//!
//! [`Key`] holds the raw bytes of an XTS-AES key as tap-ctl reads it from stdin, tapdisk
//! receives it after an OPEN message and vhd-util reads it from a key file.

mod locked;

use std::fmt;
use std::io::{self, Read};
use std::os::fd::AsFd;

pub use locked::Locked;

/// The largest key a key source may hold, in bytes (the control protocol's limit).
pub const MAX_KEY_BYTES: usize = 128;

struct Material {
    len: usize,
    bytes: [u8; MAX_KEY_BYTES],
}

/// Raw key bytes (1 to [`MAX_KEY_BYTES`]) in locked, undumped memory.
pub struct Key(Locked<Material>);

impl Key {
    /// A key of `len` zero bytes, to be filled through [`Key::as_mut_bytes`]; `EINVAL` when
    /// `len` is 0 or above [`MAX_KEY_BYTES`].
    pub fn zeroed(len: usize) -> io::Result<Self> {
        if len == 0 || len > MAX_KEY_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a key is 1 to {MAX_KEY_BYTES} bytes, not {len}"),
            ));
        }
        Ok(Self(Locked::new(Material {
            len,
            bytes: [0; MAX_KEY_BYTES],
        })?))
    }

    /// A copy of `bytes` (tests and fuzzing; real keys are read straight into a [`Key`]).
    pub fn from_slice(bytes: &[u8]) -> io::Result<Self> {
        let mut key = Self::zeroed(bytes.len())?;
        key.as_mut_bytes().copy_from_slice(bytes);
        Ok(key)
    }

    /// Reads a whole key from `source` (stdin, a key file) up to its end: 1 to `max` bytes
    /// (at most [`MAX_KEY_BYTES`]), else `EINVAL` saying how long it was, never what it was.
    pub fn read_from(source: &mut impl Read, max: usize) -> io::Result<Self> {
        let max = max.min(MAX_KEY_BYTES);
        let mut key = Self::zeroed(MAX_KEY_BYTES)?;
        let mut len = 0;
        loop {
            let room = &mut key.0.bytes[len..];
            if room.is_empty() {
                break;
            }
            match source.read(room) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if len == 0 || len > max {
            let what = if len > max {
                format!("more than {max} bytes")
            } else {
                "empty".to_owned()
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the key is {what}"),
            ));
        }
        key.0.len = len;
        Ok(key)
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0.bytes[..self.0.len]
    }

    /// The key's bytes, to fill a key made by [`Key::zeroed`].
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        let len = self.0.len;
        &mut self.0.bytes[..len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len
    }

    /// Never true: a key has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// True when the key's pages are locked in RAM.
    pub fn is_locked(&self) -> bool {
        self.0.is_locked()
    }
}

/// A descriptor read directly, without the buffer `std::io::Stdin` puts in front of it
/// (which would keep a copy of a key read from stdin after the key itself is wiped).
#[derive(Debug)]
pub struct Unbuffered<F>(pub F);

impl<F: AsFd> Read for Unbuffered<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(rustix::io::read(&self.0, buf)?)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({} bytes, redacted)", self.0.len)
    }
}

impl PartialEq for Key {
    /// Compares every byte whatever the first difference (no early exit).
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .as_bytes()
                .iter()
                .zip(other.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

impl Eq for Key {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_whole_key_and_refuses_empty_or_long_ones() {
        let key = Key::read_from(&mut &[7u8; 64][..], 64).unwrap();
        assert_eq!(key.as_bytes(), &[7u8; 64]);
        assert_eq!(format!("{key:?}"), "Key(64 bytes, redacted)");
        let e = Key::read_from(&mut &[7u8; 65][..], 64).unwrap_err();
        assert_eq!(e.to_string(), "the key is more than 64 bytes");
        let e = Key::read_from(&mut &[][..], 64).unwrap_err();
        assert_eq!(e.to_string(), "the key is empty");
        assert!(Key::zeroed(0).is_err());
        assert!(Key::zeroed(MAX_KEY_BYTES + 1).is_err());
    }

    #[test]
    fn compares_by_content() {
        let a = Key::from_slice(b"abc").unwrap();
        assert_eq!(a, Key::from_slice(b"abc").unwrap());
        assert_ne!(a, Key::from_slice(b"abd").unwrap());
        assert_ne!(a, Key::from_slice(b"ab").unwrap());
    }

    #[test]
    fn locked_values_drop_once() {
        let counter = std::sync::Arc::new(());
        let locked = Locked::new(counter.clone()).unwrap();
        assert_eq!(std::sync::Arc::strong_count(&counter), 2);
        drop(locked);
        assert_eq!(std::sync::Arc::strong_count(&counter), 1);
    }
}
