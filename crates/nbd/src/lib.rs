//! NBD (Network Block Device) protocol support for blktap-rs: the tapdisk daemon serves
//! every virtual disk over NBD on a UNIX socket with this crate.
//!
//! The crate is split in two:
//! * [`proto`] is pure code over bytes: protocol constants, the fixed newstyle handshake
//!   (option parsing, option replies, a [`proto::Negotiation`] state machine), request
//!   header parsing and validation ([`proto::classify_request`]) and reply encoding
//!   (simple replies and structured reply chunks). It does no I/O, so the fuzz targets and
//!   property tests drive it directly.
//! * [`server`] is the tokio server: [`NbdServer`] accepts connections, runs the handshake
//!   with a timeout, then serves many requests in flight per connection against an
//!   [`Export`] (the disk), writing replies in completion order.
//!
//! Supported: fixed newstyle negotiation with `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`,
//! `GO`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` / `SET_META_CONTEXT` (`base:allocation`);
//! commands `READ`, `WRITE` (+FUA), `DISC`, `FLUSH`, `TRIM`, `WRITE_ZEROES` (`NO_HOLE`,
//! `FAST_ZERO`), `CACHE` and `BLOCK_STATUS`; simple and structured replies (reads answered
//! with data and hole chunks). Also: the old-style handshake ([`Handshake::Oldstyle`]) and
//! connections handed over as file descriptors ([`NbdServer::start_fd_receiver`],
//! [`handover`]); TCP with required TLS ([`NbdServer::start_tcp`], [`tls::Tls`]).
//! Extended headers (`NBD_OPT_EXTENDED_HEADERS`: 64-bit lengths, 32-byte request and
//! reply headers, `BLOCK_STATUS_EXT`) when the client asks for them.

mod backlog;
pub mod handover;
pub mod proto;
pub mod server;
pub mod tls;
mod transmission;

pub use server::{
    Export, ExportBuffer, ExportInfo, Extent, Handshake, NbdServer, ServerConfig, WriteZeroesFlags,
};
