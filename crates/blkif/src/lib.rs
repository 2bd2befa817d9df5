//! The Xen block interface ("blkif") a guest's `xen-blkfront` speaks, as pure code.
//!
//! A guest shares a ring of `1 << order` pages with its back-end and signals it through an
//! event channel; requests name guest memory by grant references. This crate has no I/O:
//!
//! * [`abi`]: the three ring ABIs (native, x86_32, x86_64), their geometry and the byte
//!   layouts of requests and responses;
//! * [`ring`]: the back end's side of the shared ring over a [`ring::RingMemory`] (consuming
//!   requests, producing responses, the notification and final-check rules of Xen's
//!   `io/ring.h`);
//! * [`request`]: turning one request, copied out of the ring, into a validated
//!   [`request::Request`] or the error response it deserves (indirect descriptors are fetched
//!   through a [`grant::GrantCopy`]);
//! * [`grant`]: grant copies between guest pages and local buffers, as a trait;
//! * [`sim`]: a simulated guest (memory, grant table, a front-end ring driver) for tests and
//!   fuzzing off Xen.
//!
//! Facts (layouts, rules) come from Xen's public headers `io/blkif.h`, `io/ring.h` and
//! `grant_table.h`, as summarised in the project's reference notes.

pub mod abi;
pub mod grant;
pub mod request;
pub mod ring;
pub mod sim;

/// Bytes in a guest page (and a grant).
pub const PAGE_SIZE: usize = 4096;
/// Bytes in a blkif sector (the unit of every sector number, whatever the disk's sector size).
pub const SECTOR_SIZE: u64 = 512;
/// Sectors in a page.
pub const SECTORS_PER_PAGE: u8 = 8;
