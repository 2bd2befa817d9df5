//! VHD images as Xen's tapdisk and `vhd-util` use them.
//!
//! * Pure format code (no I/O): [`footer`], [`header`], [`locator`],
//!   [`bat`], [`bitmap`], [`batmap`], [`geometry`].
//! * The core (no I/O): [`metadata::Metadata`], the in-memory model of an
//!   open image that validates its layout, maps sectors and hands out
//!   [`plan`]s for writes, allocation, discard and write-zeroes, in the
//!   crash-safe order; executors run them.
//! * Images over a small positional I/O trait ([`io::BlockFile`]):
//!   [`image::VhdImage`] (the synchronous executor: open, reads, writes,
//!   discard), [`chain::Chain`] (parents through locators), [`create`].
//! * Maintenance: [`check`], [`journal`], [`ops`] (coalesce, resize,
//!   fill, repair, modify, copy).
#![forbid(unsafe_code)]

pub mod bat;
pub mod batmap;
pub mod bitmap;
mod bytes;
pub mod chain;
pub mod check;
pub mod create;
pub mod crypt;
pub mod error;
pub mod footer;
pub mod geometry;
pub mod header;
pub mod image;
pub mod io;
pub mod journal;
pub mod locator;
pub mod metadata;
pub mod ops;
pub mod plan;

pub use bytes::ones_complement_checksum;
pub use chain::Chain;
pub use error::{FormatError, Result, VhdError};
pub use footer::{DiskType, Footer};
pub use image::{Extent, OpenOptions, VhdImage};
pub use io::BlockFile;
