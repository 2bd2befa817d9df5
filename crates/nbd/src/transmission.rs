//! The transmission phase of one connection: requests in, replies out, on one task.
//!
//! The design aims at few system calls and no per-request thread hand-offs:
//! * requests are read from the socket in large buffered reads and parsed from the buffer;
//!   write payloads are copied from it (or, when large, read straight into the export's
//!   buffer);
//! * every admitted request becomes a future in one [`FuturesUnordered`] polled by the
//!   connection task itself, so an export that completes at once (page-cache hits) costs no
//!   wake-up; a request that waits (a paused disk, a slow device) only delays its own reply;
//! * replies are encoded into an outbox and written with vectored writes: small replies and
//!   small read payloads are packed into one buffer, large payloads are written from the
//!   export's buffer without a copy, and everything queued goes out in one call.
//!
//! * *gathering* (UNIX sockets, unless the server is configured without it,
//!   [`gather_replies`](crate::ServerConfig::gather_replies)): finished replies are held
//!   back while the client still has plenty unread (more than a whole message of ours and a
//!   few replies besides; and only up to a few small replies), then sent as one message. The
//!   client is never kept waiting (when it reaches our last message, the held replies are on
//!   their way) and reads fewer, larger messages, which is cheaper for it and for us; a held
//!   reply goes out as soon as the client's backlog runs low (its reads wake us, see the
//!   `backlog` module). A client with a short queue (below about a dozen 4 KiB reads in
//!   flight) never has that much unread, so nothing waits.
//!
//! Limits per connection: at most `max_requests_in_flight` requests admitted and not yet
//! answered, and a byte budget over payloads held in memory; reading pauses at either limit.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::backlog::PeerBacklog;
use crate::export::{Export, ExportBuffer};
use crate::proto::Extent;
use crate::proto::{
    self, Command, ExtendedRequestHeader, ReadChunk, RequestAction, RequestHeader, Session,
};

/// Bytes of payload one connection may hold in memory at once (write payloads being read or
/// executed, read data until written). A request larger than this still runs, alone.
pub(crate) const BYTES_IN_FLIGHT: usize = 128 * 1024 * 1024;
/// Size of the receive buffer requests are parsed from.
const RX_BUFFER: usize = 256 * 1024;
/// Write payloads at least this large are read straight into the export's buffer.
const DIRECT_PAYLOAD: usize = 64 * 1024;
/// Read payloads up to this size are copied into the packed reply buffer.
const COPY_LIMIT: usize = 32 * 1024;
/// A packed reply buffer is closed at this size and a new one started.
const PACK_LIMIT: usize = 512 * 1024;
/// Most buffers handed to one vectored write.
const MAX_IOVECS: usize = 64;
/// Replies are gathered only while the client has this much unread (socket buffer memory,
/// which counts a message until it is read to the end): more than one whole message of ours
/// (at most `GATHER_BYTES` and one reply) plus a few replies to read while a held one goes
/// out. A client with a short queue never gets there, so nothing of it waits...
const GATHER_UNREAD_FLOOR: usize = 48 * 1024;
/// ...and more than our last message plus this (the kernel's overhead per buffer and a few
/// replies), so that the client has at least that whole message left to read.
const GATHER_UNREAD_MARGIN: usize = 16 * 1024;
/// ...and only until this many replies or payload bytes are waiting (32 KiB: what Linux
/// puts in one message buffer of a UNIX socket).
const GATHER_REPLIES: usize = 16;
const GATHER_BYTES: usize = 32 * 1024;

/// Whether the client has enough unread that replies may wait for company (see
/// `GATHER_UNREAD_FLOOR`; `last_message`: bytes of our last write).
fn client_busy(backlog: &PeerBacklog, last_message: usize) -> bool {
    backlog
        .unread()
        .is_ok_and(|unread| unread >= GATHER_UNREAD_FLOOR.max(last_message + GATHER_UNREAD_MARGIN))
        && backlog.watch()
}

type RequestFuture<B> = Pin<Box<dyn Future<Output = Done<B>> + Send>>;

/// A finished request, ready to be encoded.
enum Done<B> {
    Status {
        cookie: u64,
        /// The request's offset (echoed by extended reply headers).
        offset: u64,
        /// Payload bytes the request held (a write's data).
        held: usize,
        result: io::Result<()>,
    },
    Read {
        cookie: u64,
        offset: u64,
        length: usize,
        no_fragment: bool,
        result: io::Result<B>,
    },
    BlockStatus {
        cookie: u64,
        offset: u64,
        length: u32,
        req_one: bool,
        context: u32,
        result: io::Result<Vec<Extent>>,
    },
}

impl<B> Done<B> {
    /// Payload bytes this request held while it ran (a read's data is then counted by the
    /// outbox until written).
    fn held(&self) -> usize {
        match self {
            Done::Read { length, .. } => *length,
            Done::Status { held, .. } => *held,
            Done::BlockStatus { .. } => 0,
        }
    }
}

/// One piece of the outgoing byte stream.
enum Piece<B> {
    /// Protocol bytes and small payloads, packed.
    Packed(Vec<u8>),
    /// `range` of a read buffer (shared when one read yields several data chunks).
    Data(Arc<B>, Range<usize>),
}

impl<B: ExportBuffer> Piece<B> {
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Packed(bytes) => bytes,
            Piece::Data(buf, range) => buf.bytes().get(range.clone()).unwrap_or_default(),
        }
    }
}

/// Replies waiting for the socket.
struct Outbox<B> {
    pieces: VecDeque<Piece<B>>,
    /// Bytes of the front piece already written.
    front_written: usize,
    /// Replies and payload bytes queued since the outbox was last empty.
    replies: usize,
    bytes: usize,
    /// An emptied packed buffer kept for reuse.
    spare: Vec<u8>,
    /// Read buffers no longer needed, to hand back to the export.
    returned: Vec<B>,
    /// Structured replies were negotiated.
    structured: bool,
    /// Extended headers were negotiated (every reply is an extended chunk).
    extended: bool,
}

impl<B: ExportBuffer> Outbox<B> {
    fn new(structured: bool, extended: bool) -> Self {
        Self {
            structured: structured || extended,
            extended,
            pieces: VecDeque::new(),
            front_written: 0,
            replies: 0,
            bytes: 0,
            spare: Vec::new(),
            returned: Vec::new(),
        }
    }

    /// Keeps `buf` for the export if nothing else refers to it any more.
    fn give_back(&mut self, buf: Arc<B>) {
        if let Ok(buf) = Arc::try_unwrap(buf) {
            self.returned.push(buf);
        }
    }

    /// Whether the outbox holds read data, in few and small enough replies to wait for more
    /// (status replies alone are a few bytes each: a client would need hundreds in flight
    /// to have `GATHER_UNREAD_FLOOR` of them unread).
    fn may_gather(&self) -> bool {
        self.bytes > 0 && self.replies < GATHER_REPLIES && self.bytes < GATHER_BYTES
    }

    fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The packed buffer at the back, started if need be.
    fn packed(&mut self) -> &mut Vec<u8> {
        let reuse =
            !matches!(self.pieces.back(), Some(Piece::Packed(bytes)) if bytes.len() < PACK_LIMIT);
        if reuse {
            let mut fresh = std::mem::take(&mut self.spare);
            fresh.clear();
            if fresh.capacity() == 0 {
                fresh.reserve(64 * 1024);
            }
            self.pieces.push_back(Piece::Packed(fresh));
        }
        match self.pieces.back_mut() {
            Some(Piece::Packed(bytes)) => bytes,
            // Just ensured above.
            _ => unreachable!("outbox back is a packed buffer"),
        }
    }

    fn data(&mut self, buf: &Arc<B>, range: Range<usize>) {
        if range.len() <= COPY_LIMIT {
            let bytes = buf.bytes().get(range).unwrap_or_default();
            self.packed().extend_from_slice(bytes);
        } else {
            self.pieces.push_back(Piece::Data(Arc::clone(buf), range));
        }
    }

    /// The queued bytes as I/O slices, at most `MAX_IOVECS`.
    fn slices(&self) -> ([IoSlice<'_>; MAX_IOVECS], usize) {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let mut count = 0;
        for (index, piece) in self.pieces.iter().take(MAX_IOVECS).enumerate() {
            let bytes = piece.bytes();
            let bytes = if index == 0 {
                bytes.get(self.front_written..).unwrap_or_default()
            } else {
                bytes
            };
            slices[count] = IoSlice::new(bytes);
            count += 1;
        }
        (slices, count)
    }

    /// Drops `written` bytes from the front.
    fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let Some(front) = self.pieces.front() else {
                break;
            };
            let left = front.bytes().len() - self.front_written;
            if written < left {
                self.front_written += written;
                return;
            }
            written -= left;
            self.front_written = 0;
            match self.pieces.pop_front() {
                Some(Piece::Packed(bytes)) if bytes.capacity() <= 2 * PACK_LIMIT => {
                    self.spare = bytes;
                }
                Some(Piece::Data(buf, _)) => self.give_back(buf),
                _ => {}
            }
        }
        if self.pieces.is_empty() {
            self.replies = 0;
            self.bytes = 0;
        }
    }

    /// A successful reply without data.
    fn success(&mut self, cookie: u64, offset: u64) {
        if self.extended {
            let extended = self.extended;
            proto::encode_reply_header(
                self.packed(),
                extended,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                cookie,
                offset,
                0,
            );
        } else {
            self.packed()
                .extend_from_slice(&proto::simple_reply(cookie, 0));
        }
        self.replies += 1;
    }

    fn error(&mut self, cookie: u64, offset: u64, error: u32, message: &str) {
        if self.structured {
            let extended = self.extended;
            proto::encode_error_reply(self.packed(), extended, cookie, offset, error, message);
        } else {
            self.packed()
                .extend_from_slice(&proto::simple_reply(cookie, error));
        }
        self.replies += 1;
    }

    fn io_error(&mut self, cookie: u64, offset: u64, error: &io::Error) {
        self.error(
            cookie,
            offset,
            proto::nbd_error_from_io(error),
            &error.to_string(),
        );
    }

    fn chunk_header(&mut self, done: bool, kind: u16, cookie: u64, offset: u64, len: usize) {
        let extended = self.extended;
        let flags = if done { proto::REPLY_FLAG_DONE } else { 0 };
        proto::encode_reply_header(self.packed(), extended, flags, kind, cookie, offset, len);
    }

    fn read(&mut self, cookie: u64, offset: u64, buf: B, no_fragment: bool) {
        let len = buf.bytes().len();
        self.bytes += len;
        self.replies += 1;
        // Small reads are copied into the packed buffer whole, so their buffer goes back to
        // the export at once; only large ones are shared with the outbox until written.
        let small = len <= COPY_LIMIT;
        if !self.structured {
            self.packed()
                .extend_from_slice(&proto::simple_reply(cookie, 0));
            if small {
                self.packed().extend_from_slice(buf.bytes());
                self.returned.push(buf);
            } else {
                let buf = Arc::new(buf);
                self.data(&buf, 0..len);
                self.give_back(buf);
            }
            return;
        }
        if len == 0 {
            self.chunk_header(true, proto::REPLY_TYPE_NONE, cookie, offset, 0);
            self.returned.push(buf);
            return;
        }
        let chunks = if no_fragment {
            vec![ReadChunk::Data {
                offset,
                range: 0..len,
            }]
        } else {
            proto::split_read(offset, buf.bytes())
        };
        if small {
            self.read_chunks(cookie, offset, chunks, buf.bytes(), None);
            self.returned.push(buf);
        } else {
            let buf = Arc::new(buf);
            self.read_chunks(cookie, offset, chunks, buf.bytes(), Some(&buf));
            self.give_back(buf);
        }
    }

    /// Queues the chunks of a structured read reply; data ranges are copied from `bytes`,
    /// or queued from `shared` (the same bytes) when given and large.
    fn read_chunks(
        &mut self,
        cookie: u64,
        offset: u64,
        chunks: Vec<ReadChunk>,
        bytes: &[u8],
        shared: Option<&Arc<B>>,
    ) {
        let last = chunks.len().saturating_sub(1);
        for (index, chunk) in chunks.into_iter().enumerate() {
            let done = index == last;
            match chunk {
                ReadChunk::Data { offset: at, range } => {
                    self.chunk_header(
                        done,
                        proto::REPLY_TYPE_OFFSET_DATA,
                        cookie,
                        offset,
                        8 + range.len(),
                    );
                    self.packed().extend_from_slice(&at.to_be_bytes());
                    match shared {
                        Some(buf) => self.data(buf, range),
                        None => {
                            let data = bytes.get(range).unwrap_or_default();
                            self.packed().extend_from_slice(data);
                        }
                    }
                }
                ReadChunk::Hole { offset: at, length } => {
                    self.chunk_header(done, proto::REPLY_TYPE_OFFSET_HOLE, cookie, offset, 12);
                    let out = self.packed();
                    out.extend_from_slice(&at.to_be_bytes());
                    out.extend_from_slice(&length.to_be_bytes());
                }
            }
        }
    }

    fn block_status(&mut self, cookie: u64, offset: u64, context: u32, descriptors: &[(u32, u32)]) {
        let count = u32::try_from(descriptors.len()).unwrap_or(u32::MAX);
        if self.extended {
            self.chunk_header(
                true,
                proto::REPLY_TYPE_BLOCK_STATUS_EXT,
                cookie,
                offset,
                8 + 16 * descriptors.len(),
            );
            let out = self.packed();
            out.extend_from_slice(&context.to_be_bytes());
            out.extend_from_slice(&count.to_be_bytes());
            for &(length, flags) in descriptors {
                out.extend_from_slice(&u64::from(length).to_be_bytes());
                out.extend_from_slice(&u64::from(flags).to_be_bytes());
            }
        } else {
            proto::encode_block_status_chunk(self.packed(), cookie, context, descriptors);
        }
        self.replies += 1;
    }

    fn finish(&mut self, done: Done<B>) {
        match done {
            Done::Status {
                cookie,
                offset,
                result,
                ..
            } => match result {
                Ok(()) => self.success(cookie, offset),
                Err(error) => self.io_error(cookie, offset, &error),
            },
            Done::Read {
                cookie,
                offset,
                length,
                no_fragment,
                result,
            } => match result {
                Ok(buf) if buf.bytes().len() == length => {
                    self.read(cookie, offset, buf, no_fragment);
                }
                Ok(buf) => {
                    self.error(
                        cookie,
                        offset,
                        proto::EIO,
                        &format!(
                            "export returned {} bytes for a {length}-byte read at offset {offset}",
                            buf.bytes().len()
                        ),
                    );
                    self.returned.push(buf);
                }
                Err(error) => self.io_error(cookie, offset, &error),
            },
            Done::BlockStatus {
                cookie,
                offset,
                length,
                req_one,
                context,
                result,
            } => match result {
                Ok(extents) => {
                    let limit = if req_one {
                        1
                    } else {
                        proto::MAX_EXTENTS_PER_REPLY
                    };
                    let descriptors = proto::clamp_extents(&extents, length, limit);
                    if descriptors.is_empty() {
                        self.error(
                            cookie,
                            offset,
                            proto::EIO,
                            &format!("export gave no extents for offset {offset} length {length}"),
                        );
                    } else {
                        self.block_status(cookie, offset, context, &descriptors);
                    }
                }
                Err(error) => self.io_error(cookie, offset, &error),
            },
        }
    }
}

/// Where the request parser stands in the byte stream.
enum Incoming<B> {
    /// Expecting a request header.
    Header,
    /// Filling the payload of an admitted write.
    Payload {
        cookie: u64,
        offset: u64,
        fua: bool,
        buf: B,
        filled: usize,
    },
    /// Skipping the payload of a rejected write.
    Skip { left: usize },
}

/// Bytes received and not yet parsed.
struct Rx {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Rx {
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, count: usize) {
        self.start += count;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Free space to read into, moving pending bytes to the front when the tail is short.
    fn space(&mut self) -> &mut [u8] {
        if self.buf.len() - self.end < proto::REQUEST_HEADER_LEN * 4 && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }
}

/// What stopped the request parser.
enum Parsed {
    /// Needs more bytes from the socket.
    NeedBytes,
    /// The next request must wait for a request slot or payload budget.
    Throttled,
    /// `NBD_CMD_DISC`: stop reading.
    Disconnect,
}

/// One connection's transmission state.
struct Connection<E: Export> {
    export: Arc<E>,
    session: Session,
    /// Extended headers: 32-byte requests with 64-bit lengths, extended reply chunks.
    extended: bool,
    max_requests: usize,
    running: FuturesUnordered<RequestFuture<E::Buffer>>,
    /// Payload bytes of running requests.
    running_bytes: usize,
    incoming: Incoming<E::Buffer>,
    rx: Rx,
    outbox: Outbox<E::Buffer>,
}

impl<E: Export> Connection<E> {
    /// Hands buffers the outbox is done with back to the export.
    fn recycle(&mut self) {
        for buf in self.outbox.returned.drain(..) {
            self.export.recycle(buf);
        }
    }

    fn outstanding(&self) -> usize {
        self.running.len() + self.outbox.replies
    }

    fn held_bytes(&self) -> usize {
        self.running_bytes + self.outbox.bytes
    }

    /// Whether a request carrying `bytes` of payload may start now.
    fn admits(&self, bytes: usize) -> bool {
        if self.outstanding() >= self.max_requests {
            return false;
        }
        bytes == 0 || self.held_bytes() == 0 || self.held_bytes() + bytes <= BYTES_IN_FLIGHT
    }

    /// Parses and starts as many requests as the buffered bytes and the limits allow.
    fn parse(&mut self) -> Result<Parsed, String> {
        loop {
            match &mut self.incoming {
                Incoming::Skip { left } => {
                    let take = (*left).min(self.rx.pending().len());
                    self.rx.consume(take);
                    *left -= take;
                    if *left > 0 {
                        return Ok(Parsed::NeedBytes);
                    }
                    self.incoming = Incoming::Header;
                }
                Incoming::Payload { buf, filled, .. } => {
                    let target = buf.bytes_mut();
                    let take = (target.len() - *filled).min(self.rx.pending().len());
                    target[*filled..*filled + take]
                        .copy_from_slice(&self.rx.buf[self.rx.start..self.rx.start + take]);
                    *filled += take;
                    self.rx.consume(take);
                    if *filled < target.len() {
                        return Ok(Parsed::NeedBytes);
                    }
                    let Incoming::Payload {
                        cookie,
                        offset,
                        fua,
                        buf,
                        ..
                    } = std::mem::replace(&mut self.incoming, Incoming::Header)
                    else {
                        unreachable!("matched a payload above");
                    };
                    self.start_write(cookie, offset, fua, buf);
                }
                Incoming::Header => {
                    let header_len = if self.extended {
                        proto::EXTENDED_HEADER_LEN
                    } else {
                        proto::REQUEST_HEADER_LEN
                    };
                    let Some(raw) = self.rx.pending().get(..header_len) else {
                        return Ok(Parsed::NeedBytes);
                    };
                    let header = if self.extended {
                        let raw: &[u8; proto::EXTENDED_HEADER_LEN] =
                            raw.try_into().map_err(|_| "short header".to_owned())?;
                        let wide = ExtendedRequestHeader::parse(raw).map_err(|e| e.to_string())?;
                        match wide.compact() {
                            Some(header) => header,
                            None => {
                                if !self.admits(0) {
                                    return Ok(Parsed::Throttled);
                                }
                                self.rx.consume(header_len);
                                self.outbox.error(
                                    wide.cookie,
                                    wide.offset,
                                    proto::EINVAL,
                                    "length above 32 bits for a command without data",
                                );
                                continue;
                            }
                        }
                    } else {
                        let raw: &[u8; proto::REQUEST_HEADER_LEN] =
                            raw.try_into().map_err(|_| "short header".to_owned())?;
                        RequestHeader::parse(raw).map_err(|e| e.to_string())?
                    };
                    let action = proto::classify_request(&self.session, &header)
                        .map_err(|e| e.to_string())?;
                    let data_len = match &action {
                        RequestAction::Execute(
                            Command::Read { length, .. } | Command::Write { length, .. },
                        ) => usize::try_from(*length).unwrap_or(usize::MAX),
                        _ => 0,
                    };
                    if !self.admits(data_len) {
                        return Ok(Parsed::Throttled);
                    }
                    self.rx.consume(header_len);
                    match action {
                        RequestAction::Disconnect => return Ok(Parsed::Disconnect),
                        RequestAction::Reject {
                            error,
                            discard,
                            reason,
                        } => {
                            tracing::debug!(
                                command = header.command,
                                offset = header.offset,
                                length = header.length,
                                error,
                                reason,
                                "NBD request rejected"
                            );
                            self.outbox
                                .error(header.cookie, header.offset, error, reason);
                            if discard > 0 {
                                self.incoming = Incoming::Skip {
                                    left: usize::try_from(discard).unwrap_or(usize::MAX),
                                };
                            }
                        }
                        RequestAction::Execute(Command::Write { offset, fua, .. }) => {
                            let buf = self.export.buffer(data_len);
                            self.running_bytes += data_len;
                            self.incoming = Incoming::Payload {
                                cookie: header.cookie,
                                offset,
                                fua,
                                buf,
                                filled: 0,
                            };
                        }
                        RequestAction::Execute(command) => {
                            self.start(header.cookie, command, data_len);
                        }
                    }
                }
            }
        }
    }

    fn start_write(&mut self, cookie: u64, offset: u64, fua: bool, buf: E::Buffer) {
        let export = Arc::clone(&self.export);
        let held = buf.bytes().len();
        self.running.push(Box::pin(async move {
            let result = export.write(offset, buf, fua).await;
            Done::Status {
                cookie,
                offset,
                held,
                result,
            }
        }));
    }

    fn start(&mut self, cookie: u64, command: Command, data_len: usize) {
        let export = Arc::clone(&self.export);
        let future: RequestFuture<E::Buffer> = match command {
            Command::Read {
                offset,
                length: _,
                no_fragment,
            } => {
                let buf = export.buffer(data_len);
                self.running_bytes += data_len;
                Box::pin(async move {
                    let result = export.read(offset, buf).await;
                    Done::Read {
                        cookie,
                        offset,
                        length: data_len,
                        no_fragment,
                        result,
                    }
                })
            }
            Command::Write { .. } => {
                // Writes start from `start_write` once their payload is in.
                return;
            }
            Command::Flush => Box::pin(async move {
                Done::Status {
                    cookie,
                    offset: 0,
                    held: 0,
                    result: export.flush().await,
                }
            }),
            Command::Trim {
                offset,
                length,
                fua,
            } => Box::pin(async move {
                Done::Status {
                    cookie,
                    offset,
                    held: 0,
                    result: export.trim(offset, u64::from(length), fua).await,
                }
            }),
            Command::WriteZeroes {
                offset,
                length,
                flags,
            } => Box::pin(async move {
                Done::Status {
                    cookie,
                    offset,
                    held: 0,
                    result: export.write_zeroes(offset, u64::from(length), flags).await,
                }
            }),
            Command::Cache { offset, length } => Box::pin(async move {
                Done::Status {
                    cookie,
                    offset,
                    held: 0,
                    result: export.cache(offset, u64::from(length)).await,
                }
            }),
            Command::BlockStatus {
                offset,
                length,
                req_one,
                context,
            } => Box::pin(async move {
                Done::BlockStatus {
                    cookie,
                    offset,
                    length,
                    req_one,
                    context,
                    result: export.block_status(offset, u64::from(length)).await,
                }
            }),
        };
        self.running.push(future);
    }
}

/// How the connection ended.
enum End {
    /// Client disconnected cleanly (`NBD_CMD_DISC` or end of stream between requests).
    Graceful,
    /// Protocol violation or I/O error.
    Broken(String),
    /// Server shutdown.
    Shutdown,
}

/// Serves requests on `stream` until the client leaves, breaks the protocol, or the server
/// shuts down.
pub(crate) async fn serve<E, S>(
    export: Arc<E>,
    session: Session,
    extended: bool,
    max_requests: usize,
    backlog: Option<PeerBacklog>,
    stream: S,
    shutdown: &mut watch::Receiver<bool>,
) where
    E: Export,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let outbox = Outbox::new(session.structured, extended);
    let mut conn = Connection {
        export,
        session,
        extended,
        max_requests: max_requests.max(1),
        running: FuturesUnordered::new(),
        running_bytes: 0,
        incoming: Incoming::Header,
        rx: Rx {
            buf: vec![0u8; RX_BUFFER],
            start: 0,
            end: 0,
        },
        outbox,
    };
    let end = run(
        &mut conn,
        backlog.as_ref(),
        &mut reader,
        &mut writer,
        shutdown,
    )
    .await;
    match end {
        End::Graceful => {
            let _ = writer.shutdown().await;
        }
        End::Broken(reason) => tracing::debug!(%reason, "NBD connection closed"),
        End::Shutdown => tracing::debug!("NBD connection closed by server shutdown"),
    }
}

async fn run<E, R, W>(
    conn: &mut Connection<E>,
    backlog: Option<&PeerBacklog>,
    reader: &mut R,
    writer: &mut W,
    shutdown: &mut watch::Receiver<bool>,
) -> End
where
    E: Export,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reading = true;
    // The parser waits for a request slot or payload budget.
    let mut throttled = false;
    // Something changed that may let the parser make progress.
    let mut parse_again = false;
    // One future for the whole connection: a fresh `changed()` per request would register
    // and unregister a waiter every time.
    let mut shutdown_signal = shutdown.clone();
    let stopped = async move {
        let _ = shutdown_signal.wait_for(|stopping| *stopping).await;
    };
    tokio::pin!(stopped);
    // Gathering: the client's backlog as last seen, and whether it may have changed since
    // (on its own it only shrinks: looked at again after our writes, after its requests
    // and when it has read more).
    let mut busy = false;
    let mut recheck = true;
    let mut last_message = 0;
    loop {
        if *shutdown.borrow() {
            return End::Shutdown;
        }
        if reading && parse_again {
            parse_again = false;
            match conn.parse() {
                Ok(Parsed::NeedBytes) => throttled = false,
                Ok(Parsed::Throttled) => throttled = true,
                Ok(Parsed::Disconnect) => reading = false,
                Err(reason) => return End::Broken(reason),
            }
        }
        if !reading && conn.running.is_empty() && conn.outbox.is_empty() {
            return End::Graceful;
        }
        let direct = match &conn.incoming {
            Incoming::Payload { buf, filled, .. } => buf.bytes().len() - *filled >= DIRECT_PAYLOAD,
            _ => false,
        };
        let may_read = reading && !throttled;
        let gathering = match backlog {
            Some(backlog) if conn.outbox.may_gather() => {
                if recheck {
                    busy = client_busy(backlog, last_message);
                    recheck = false;
                }
                busy
            }
            _ => false,
        };
        let may_write = !conn.outbox.is_empty() && !gathering;
        tokio::select! {
            biased;
            Some(done) = conn.running.next(), if !conn.running.is_empty() => {
                conn.running_bytes = conn.running_bytes.saturating_sub(done.held());
                conn.outbox.finish(done);
                conn.recycle();
                parse_again |= throttled;
            }
            written = write_some(writer, &conn.outbox), if may_write => {
                match written {
                    Ok(0) => return End::Broken("socket closed while writing replies".into()),
                    Ok(count) => {
                        conn.outbox.advance(count);
                        conn.recycle();
                        parse_again |= throttled;
                        recheck = true;
                        last_message = count;
                    }
                    Err(error) => return End::Broken(format!("writing replies: {error}")),
                }
            }
            received = read_some(reader, &mut conn.incoming, &mut conn.rx, direct), if may_read => {
                match received {
                    Ok(0) => {
                        let clean = matches!(conn.incoming, Incoming::Header)
                            && conn.rx.start == conn.rx.end;
                        if !clean {
                            return End::Broken("stream ended inside a request".into());
                        }
                        reading = false;
                    }
                    Ok(_) => {
                        parse_again = true;
                        recheck = true;
                    }
                    Err(error) => return End::Broken(format!("reading requests: {error}")),
                }
            }
            // Replies held back: the client's next read may let them go.
            () = client_read_more(backlog), if gathering => recheck = true,
            // Checked at the top of every turn, polled here only when idle.
            () = &mut stopped => return End::Shutdown,
        }
    }
}

/// Completes when the client has read more ([`PeerBacklog::read_more`]); never without a
/// probe.
async fn client_read_more(backlog: Option<&PeerBacklog>) {
    match backlog {
        Some(backlog) => backlog.read_more().await,
        None => std::future::pending().await,
    }
}

async fn write_some<W, B>(writer: &mut W, outbox: &Outbox<B>) -> io::Result<usize>
where
    W: AsyncWrite + Unpin,
    B: ExportBuffer,
{
    let (slices, count) = outbox.slices();
    if count == 1 {
        writer.write(&slices[0]).await
    } else {
        writer.write_vectored(&slices[..count]).await
    }
}

async fn read_some<R, B>(
    reader: &mut R,
    incoming: &mut Incoming<B>,
    rx: &mut Rx,
    direct: bool,
) -> io::Result<usize>
where
    R: AsyncRead + Unpin,
    B: ExportBuffer,
{
    if direct {
        if let Incoming::Payload { buf, filled, .. } = incoming {
            let n = reader.read(&mut buf.bytes_mut()[*filled..]).await?;
            *filled += n;
            return Ok(n);
        }
    }
    let space = rx.space();
    if space.is_empty() {
        // Never reached while the parser makes progress; refuse rather than mistake an
        // empty read for the end of the stream.
        return Err(io::Error::other("receive buffer full of unparsed bytes"));
    }
    let n = reader.read(space).await?;
    rx.end += n;
    Ok(n)
}
