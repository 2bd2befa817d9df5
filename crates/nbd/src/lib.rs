//! NBD (Network Block Device) protocol support for blktap-rs: the tapdisk daemon serves
//! every virtual disk over NBD on a UNIX socket with this crate.
//!
//! The crate's modules, from the bytes up:
//! * [`proto`] is pure code over bytes, one module per phase: the handshake (greetings,
//!   option parsing and replies, the [`proto::Negotiation`] state machine with its TLS
//!   policy), requests (header parsing and validation, [`proto::classify_request`]) and
//!   replies (simple replies and structured reply chunks). It does no I/O, so the fuzz
//!   targets and property tests drive it directly.
//! * [`export`] is the [`Export`] trait: the disk behind an export, as the server sees it.
//! * [`server`] is the tokio server: [`NbdServer`] accepts connections and runs the
//!   handshake with a timeout; the transmission phase (`transmission`) then serves many
//!   requests in flight per connection against the [`Export`], writing replies in completion
//!   order through the reply outbox (`outbox`: packing, zero-copy read data, gathering
//!   replies to a UNIX-socket client that still has plenty unread, probed by `backlog`).
//!
//! Supported: fixed newstyle negotiation with `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`,
//! `GO`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` / `SET_META_CONTEXT` (`base:allocation`);
//! commands `READ`, `WRITE` (+FUA), `DISC`, `FLUSH`, `TRIM`, `WRITE_ZEROES` (`NO_HOLE`,
//! `FAST_ZERO`), `CACHE` and `BLOCK_STATUS`; simple and structured replies (reads answered
//! with data and hole chunks). Also: the old-style handshake ([`Handshake::Oldstyle`]) and
//! connections handed over as file descriptors ([`NbdServer::start_fd_receiver`],
//! [`handover`]); TCP with required TLS ([`NbdServer::start_tcp`], [`tls::Tls`]).
//! Extended headers (`NBD_OPT_EXTENDED_HEADERS`: 64-bit lengths, 32-byte request and
//! reply headers, `BLOCK_STATUS_EXT`) when the client asks for them. Caps on live
//! connections, nested per export and per process, with a clear refusal beyond them
//! ([`limit`]).
//!
//! [`client`] is the other side: [`client::Client`] negotiates with a server (old style,
//! newstyle with `GO` or `EXPORT_NAME`, structured replies, TLS) and keeps many requests in
//! flight with a deadline each; its pure part, [`client::codec`], reads what servers send
//! with the same constants and headers as [`proto`].

mod backlog;
pub mod client;
pub mod export;
pub mod handover;
pub mod limit;
mod outbox;
pub mod proto;
pub mod server;
pub mod tls;
mod transmission;

pub use export::{Export, ExportBuffer};
pub use limit::ConnectionLimit;
pub use proto::{ExportInfo, Extent, WriteZeroesFlags};
pub use server::{Handshake, NbdServer, ServerConfig};
