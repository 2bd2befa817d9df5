//! qcow2 images: the format as pure code over bytes.
//!
//! - [`header`]: the header (versions 2 and 3), header extensions (unknown ones kept byte for
//!   byte) and the backing file name; refusal of unimplemented features by name;
//! - [`layout`]: geometry derived from the header;
//! - [`entry`]: L1 and L2 entries (standard, zero, compressed, extended with subclusters);
//! - [`refcount`]: refcount block entries of every width;
//! - [`compress`]: decompression of compressed clusters (zlib, zstd);
//! - [`meta`]: the metadata of an open image and the I/O-free planner of reads, allocating
//!   writes, zeroing and refcount updates, in a crash-safe order;
//! - [`image`]: a synchronous executor of those plans over any [`image::Storage`] (tests,
//!   tools), with [`image::create`] for new images;
//! - [`check`]: a refcount consistency check (what `qemu-img check` verifies), for tests, and
//!   the rebuild of the refcounts of an image whose dirty bit is set.
//!
//! The tapdisk driver (`crates/tapdisk/src/driver/qcow2.rs`) is the asynchronous executor.

pub mod check;
pub mod compress;
pub mod entry;
pub mod error;
pub mod header;
pub mod image;
pub mod layout;
pub mod meta;
pub mod refcount;

pub use error::{Qcow2Error, Result};
pub use header::Header;
pub use meta::{Metadata, Need, Plan};
