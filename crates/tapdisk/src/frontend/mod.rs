//! Frontends: the ways a VBD's requests arrive.
//!
//! Each frontend turns its protocol's requests into calls on [`crate::vbd::Vbd`]. Today there
//! is the per-VBD NBD export; the ublk block device and the FUSE file export plug in here.

pub mod nbd;
