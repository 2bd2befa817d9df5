//! `vhd-util key`: compute, set, check and print the keyhash stored in the
//! batmap header (cookie, 32-byte nonce, SHA-256 of nonce ‖ key).
//!
//! Output as the C tool's: `-p` prints `NONCE HASH` (hex, one space; `none`
//! without a keyhash), which is what XenServer's storage manager splits;
//! `-C` prints the hash alone. The nonce is `-N`'s, else all zeros (so
//! `-s -H HASH` stores exactly the hash a toolstack computed). `-s` refuses
//! an image that already holds blocks (EINVAL), as the C tool does.

use std::path::Path;

use vhd::batmap::KeyHash;
use vhd::image::{OpenOptions, VhdImage};
use vhd::io::{Opener, StdOpener};

use crate::getopt::getopt;

const EINVAL: i32 = 22;
const U: &str = "usage: vhd-util key [-C -k KEYPATH [-N NONCE]] | [-s -n NAME (-k KEYPATH | -H HASH) [-N NONCE]] | [-c -n NAME -k KEYPATH] | [-p -n NAME] [-h help]";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn read_key(path: &str) -> Result<secret::Key, i32> {
    let mut file = std::fs::File::open(path).map_err(|e| {
        println!("failed to read key {path}: {e}");
        e.raw_os_error().unwrap_or(5)
    })?;
    secret::Key::read_from(&mut file, secret::MAX_KEY_BYTES).map_err(|e| {
        println!("failed to read key {path}: {e}");
        e.raw_os_error().unwrap_or(EINVAL)
    })
}

/// Reads an XTS-AES key (32 or 64 bytes, the whole of `source`) for `copy -E/-k`; on
/// failure prints the C tool's message (the size, never the bytes) and gives exit status 1.
pub fn read_xts_key(source: &mut impl std::io::Read, what: &str) -> Result<secret::Key, i32> {
    match secret::Key::read_from(source, 64) {
        Ok(key) if vhd::crypt::KEY_SIZES.contains(&key.len()) => Ok(key),
        Ok(key) => {
            eprintln!(
                "Unsupported keysize, use either 256 bit or 512 bit key ({what}: {} bytes)",
                key.len()
            );
            Err(1)
        }
        Err(e) => {
            eprintln!("Unsupported keysize, use either 256 bit or 512 bit key ({what}: {e})");
            Err(1)
        }
    }
}

/// [`read_xts_key`] from the file at `path`.
pub fn read_key_file(path: &str) -> Result<secret::Key, i32> {
    let mut file = std::fs::File::open(path).map_err(|e| {
        println!("Failed to open key file {path}: {e}");
        e.raw_os_error().unwrap_or(5)
    })?;
    read_xts_key(&mut file, path)
}

fn keyhash(nonce: [u8; 32], key: &[u8]) -> [u8; 32] {
    vhd::crypt::keyhash(&nonce, key)
}

fn open(name: &str, writable: bool) -> Result<VhdImage<std::fs::File>, i32> {
    let f = StdOpener.open(Path::new(name), writable).map_err(|e| {
        println!("error opening {name}: -{}", e.raw_os_error().unwrap_or(5));
        e.raw_os_error().unwrap_or(5)
    })?;
    let opts = if writable {
        OpenOptions::read_write()
    } else {
        OpenOptions {
            inspect: true,
            ..OpenOptions::read_only()
        }
    };
    VhdImage::open(f, name, opts).map_err(|e| {
        println!("error opening {name}: -{}", e.errno());
        e.errno()
    })
}

/// Runs the `key` command.
pub fn run(args: &[String]) -> i32 {
    let p = match getopt(args, crate::option_spec("key")) {
        Ok(p) if !p.has('h') => p,
        Ok(_) => {
            println!("{U}");
            return 0;
        }
        Err(_) => {
            println!("{U}");
            return EINVAL;
        }
    };
    let nonce = match p.value('N') {
        Some(n) => match unhex32(n) {
            Some(v) => v,
            None => {
                println!("invalid nonce {n}");
                return EINVAL;
            }
        },
        None => [0; 32],
    };
    let r = if p.has('C') {
        let Some(k) = p.value('k') else {
            println!("{U}");
            return EINVAL;
        };
        read_key(k).map(|key| println!("{}", hex(&keyhash(nonce, key.as_bytes()))))
    } else if p.has('s') {
        let Some(name) = p.value('n') else {
            println!("{U}");
            return EINVAL;
        };
        let hash = match (p.value('k'), p.value('H')) {
            (Some(k), None) => match read_key(k) {
                Ok(key) => keyhash(nonce, key.as_bytes()),
                Err(e) => return e,
            },
            (None, Some(h)) => match unhex32(h) {
                Some(v) => v,
                None => {
                    println!("invalid hash {h}");
                    return EINVAL;
                }
            },
            _ => {
                println!("{U}");
                return EINVAL;
            }
        };
        open(name, true).and_then(|mut img| {
            // As the C tool: a keyhash names the key of data still to be
            // written, so it cannot be set under blocks already there.
            if img.bat().allocated_count() > 0 {
                println!("can't save key hashes for non-empty vhds");
                return Err(EINVAL);
            }
            img.set_keyhash(KeyHash {
                cookie: 1,
                nonce,
                hash,
            })
            .and_then(|()| img.sync())
            .map_err(|e| {
                println!("error setting keyhash: -{}", e.errno());
                e.errno()
            })
        })
    } else if p.has('c') {
        let (Some(name), Some(k)) = (p.value('n'), p.value('k')) else {
            println!("{U}");
            return EINVAL;
        };
        let key = match read_key(k) {
            Ok(k) => k,
            Err(e) => return e,
        };
        open(name, false).and_then(|img| match img.keyhash() {
            Some(kh) if kh.cookie != 0 && keyhash(kh.nonce, key.as_bytes()) == kh.hash => Ok(()),
            Some(kh) if kh.cookie != 0 => {
                println!("key does not match");
                Err(EINVAL)
            }
            _ => {
                println!("{name} has no keyhash");
                Err(EINVAL)
            }
        })
    } else if p.has('p') {
        let Some(name) = p.value('n') else {
            println!("{U}");
            return EINVAL;
        };
        open(name, false).map(|img| match img.keyhash() {
            Some(kh) if kh.cookie == 1 => println!("{} {}", hex(&kh.nonce), hex(&kh.hash)),
            _ => println!("none"),
        })
    } else {
        println!("{U}");
        return EINVAL;
    };
    match r {
        Ok(()) => 0,
        Err(e) => e,
    }
}
