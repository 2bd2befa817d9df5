//! The transmission phase of one connection: requests in, replies out, on one task.
//!
//! The design aims at few system calls and no per-request thread hand-offs:
//! * requests are read from the socket in large buffered reads and parsed from the buffer;
//!   write payloads are copied from it (or, when large, read straight into the export's
//!   buffer);
//! * every admitted request becomes a future in one [`FuturesUnordered`] polled by the
//!   connection task itself, so an export that completes at once (page-cache hits) costs no
//!   wake-up; a request that waits (a paused disk, a slow device) only delays its own reply;
//!   every poll of the connection task is one [`Export::turn`], so an export can hand the
//!   I/O of all requests started in it to the kernel together;
//! * replies are encoded into the connection's [`Outbox`] and written with vectored writes:
//!   small replies and small read payloads are packed into one buffer, large payloads are
//!   written from the export's buffer without a copy, and everything queued goes out in one
//!   call (the `outbox` module holds those rules);
//! * *gathering* (UNIX sockets, unless the server is configured without it,
//!   [`gather_replies`](crate::ServerConfig::gather_replies)): finished replies are held
//!   back while the client still has plenty unread (more than a whole message of ours and a
//!   few replies besides; and only up to a few small replies), then sent as one message. The
//!   client is never kept waiting (when it reaches our last message, the held replies are on
//!   their way) and reads fewer, larger messages, which is cheaper for it and for us; a held
//!   reply goes out as soon as the client's backlog runs low (its reads wake us, see the
//!   `backlog` module). A client with a short queue (below about a dozen 4 KiB reads in
//!   flight) never has that much unread, so nothing waits. The thresholds are the outbox's
//!   ([`Outbox::may_gather`], [`outbox::plenty_unread`]); this loop decides when to look.
//!
//! Limits per connection: at most `max_requests_in_flight` requests admitted and not yet
//! answered, and a byte budget over payloads held in memory; reading pauses at either limit.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::backlog::PeerBacklog;
use crate::export::{Export, ExportBuffer};
use crate::outbox::{self, Done, Outbox};
use crate::proto::{
    self, Command, ExtendedRequestHeader, MetaContext, RequestAction, RequestHeader, Session,
};

/// Bytes of payload one connection may hold in memory at once (write payloads being read or
/// executed, read data until written). A request larger than this still runs, alone.
pub(crate) const BYTES_IN_FLIGHT: usize = 128 * 1024 * 1024;
/// Size of the receive buffer requests are parsed from.
const RX_BUFFER: usize = 256 * 1024;
/// Write payloads at least this large are read straight into the export's buffer.
const DIRECT_PAYLOAD: usize = 64 * 1024;

/// Whether the client has enough unread that replies may wait for company
/// ([`outbox::plenty_unread`]; `last_message`: bytes of our last write), and we can tell
/// when it reads more.
fn client_busy(backlog: &PeerBacklog, last_message: usize) -> bool {
    backlog
        .unread()
        .is_ok_and(|unread| outbox::plenty_unread(unread, last_message))
        && backlog.watch()
}

type RequestFuture<B> = Pin<Box<dyn Future<Output = Done<B>> + Send>>;

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
        for buf in self.outbox.take_returned() {
            self.export.recycle(buf);
        }
    }

    fn outstanding(&self) -> usize {
        self.running.len() + self.outbox.replies()
    }

    fn held_bytes(&self) -> usize {
        self.running_bytes + self.outbox.bytes()
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
            } => {
                let contexts = self.session.contexts.clone();
                Box::pin(async move {
                    let len = u64::from(length);
                    let mut results = Vec::with_capacity(contexts.len());
                    for context in contexts {
                        let result = match context {
                            MetaContext::BaseAllocation => export.block_status(offset, len).await,
                            MetaContext::Export(index) => {
                                export.context_status(index, offset, len).await
                            }
                        };
                        results.push((context.id(), result));
                    }
                    Done::BlockStatus {
                        cookie,
                        offset,
                        length,
                        req_one,
                        results,
                    }
                })
            }
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
    let export = Arc::clone(&conn.export);
    let end = {
        let mut turns = std::pin::pin!(run(
            &mut conn,
            backlog.as_ref(),
            &mut reader,
            &mut writer,
            shutdown,
        ));
        std::future::poll_fn(|cx| export.turn(|| turns.as_mut().poll(cx))).await
    };
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
