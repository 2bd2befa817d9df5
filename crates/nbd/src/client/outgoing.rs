//! The client's send queue: requests waiting to go on the wire, in the order their cookies
//! were given out, and the vectored writes that send a whole batch of them at once.
//!
//! Requests never write the socket themselves. Each appends its header (and a payload it
//! lends as a slice, copied) to one packed buffer, or shares a payload it owns by reference
//! ([`Payload::Shared`]: sent straight from the caller's buffer, no copy), and the
//! connection's I/O task takes everything queued and sends it with as few `writev` calls
//! as it fits: requests made together (a guest's queue of writes arriving in one
//! message) leave in one message, and the server wakes once for all of them.

use std::io::{self, IoSlice};
use std::ops::Range;
use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::ExportBuffer;

/// Slices handed to one `writev` at most.
const MAX_SLICES: usize = 64;

/// A request's payload.
pub(crate) enum Payload<'a, B> {
    /// No payload.
    None,
    /// Bytes the caller lends only until the request is queued: copied.
    Borrowed(&'a [u8]),
    /// A range of a buffer the queue holds on to until it is sent.
    Shared(&'a Arc<B>, Range<usize>),
}

/// One piece of the byte stream to send.
enum Piece<B> {
    /// The next this many bytes of [`Outgoing::packed`].
    Packed(usize),
    /// A range of a shared buffer.
    Shared(Arc<B>, Range<usize>),
    /// A shared range of this length, sent: the buffer is let go at once, so its owner
    /// can reuse it when the reply comes while later pieces still wait for the socket.
    Sent(usize),
}

impl<B: ExportBuffer> Piece<B> {
    fn len(&self) -> usize {
        match self {
            Self::Packed(len) | Self::Sent(len) => *len,
            Self::Shared(_, range) => range.len(),
        }
    }
}

/// Requests queued for sending.
pub(crate) struct Outgoing<B> {
    /// Headers and copied payloads, back to back.
    packed: Vec<u8>,
    /// The stream to send, in order.
    pieces: Vec<Piece<B>>,
    /// The last request queued is `NBD_CMD_DISC`: shut the socket down once it is sent.
    pub(crate) closing: bool,
    /// How far sending got (kept here, so a [`Outgoing::send`] dropped between two writes
    /// resumes where it stopped): the first piece not completely written, where it starts
    /// in `packed` (when packed), and how many of its bytes are written.
    piece: usize,
    packed_at: usize,
    skip: usize,
}

impl<B> Default for Outgoing<B> {
    fn default() -> Self {
        Self {
            packed: Vec::new(),
            pieces: Vec::new(),
            closing: false,
            piece: 0,
            packed_at: 0,
            skip: 0,
        }
    }
}

impl<B: ExportBuffer> Outgoing<B> {
    /// Nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Forgets what was sent, keeping the allocations.
    pub(crate) fn clear(&mut self) {
        self.packed.clear();
        self.pieces.clear();
        self.closing = false;
        self.piece = 0;
        self.packed_at = 0;
        self.skip = 0;
    }

    fn pack(&mut self, bytes: &[u8]) {
        self.packed.extend_from_slice(bytes);
        match self.pieces.last_mut() {
            Some(Piece::Packed(len)) => *len += bytes.len(),
            _ => self.pieces.push(Piece::Packed(bytes.len())),
        }
    }

    /// Queues a request: its header, then its payload.
    pub(crate) fn push(&mut self, header: &[u8], payload: Payload<'_, B>) {
        self.pack(header);
        match payload {
            Payload::None => {}
            Payload::Borrowed(bytes) => {
                if !bytes.is_empty() {
                    self.pack(bytes);
                }
            }
            Payload::Shared(buf, range) => {
                if !range.is_empty() {
                    self.pieces.push(Piece::Shared(Arc::clone(buf), range));
                }
            }
        }
    }

    /// Writes everything queued to `writer`, then flushes it; each shared payload is let go
    /// as soon as it is written. Cancel-safe: dropped while waiting for the socket, a later
    /// call goes on where this one stopped.
    pub(crate) async fn send<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        writer: &mut W,
    ) -> io::Result<()> {
        while self.piece < self.pieces.len() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            let mut at = self.packed_at;
            let skip = self.skip;
            for (i, p) in self.pieces[self.piece..]
                .iter()
                .take(MAX_SLICES)
                .enumerate()
            {
                let bytes = match p {
                    Piece::Packed(len) => {
                        at += len;
                        &self.packed[at - len..at]
                    }
                    Piece::Shared(buf, range) => &buf.bytes()[range.clone()],
                    // Behind `piece`: never reached.
                    Piece::Sent(_) => &[],
                };
                slices[i] = IoSlice::new(if i == 0 { &bytes[skip..] } else { bytes });
                count += 1;
            }
            let written = if count == 1 {
                writer.write(&slices[0]).await?
            } else {
                writer.write_vectored(&slices[..count]).await?
            };
            if written == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            // Step over what was written.
            let mut left = skip + written;
            self.skip = 0;
            while let Some(p) = self.pieces.get_mut(self.piece) {
                let len = p.len();
                if left < len {
                    self.skip = left;
                    break;
                }
                left -= len;
                match p {
                    Piece::Packed(_) => self.packed_at += len,
                    Piece::Shared(..) => *p = Piece::Sent(len),
                    Piece::Sent(_) => {}
                }
                self.piece += 1;
            }
        }
        writer.flush().await
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A writer that takes at most `step` bytes per call, and records them.
    struct Trickle {
        step: usize,
        out: Vec<u8>,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            self.calls += 1;
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            slices: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for slice in slices {
                let take = slice.len().min(self.step - n);
                self.out.extend_from_slice(&slice[..take]);
                n += take;
                if n == self.step {
                    break;
                }
            }
            self.calls += 1;
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Three requests: a header alone, one with a copied payload, one with a shared one;
    /// and the bytes they must put on the wire.
    fn queue() -> (Outgoing<Vec<u8>>, Vec<u8>) {
        let shared = Arc::new((0..100u8).collect::<Vec<u8>>());
        let mut outgoing = Outgoing::default();
        outgoing.push(&[1; 28], Payload::None);
        outgoing.push(&[2; 28], Payload::Borrowed(&[3; 10]));
        outgoing.push(&[4; 28], Payload::Shared(&shared, 20..70));
        outgoing.push(&[5; 28], Payload::Shared(&shared, 0..0));
        let mut expected = vec![1; 28];
        expected.extend([2; 28]);
        expected.extend([3; 10]);
        expected.extend([4; 28]);
        expected.extend(20..70u8);
        expected.extend([5; 28]);
        (outgoing, expected)
    }

    #[tokio::test]
    async fn a_batch_goes_out_in_one_write_and_in_order() {
        let (mut outgoing, expected) = queue();
        // Headers and the copied payload share a piece: packed, shared, packed.
        assert_eq!(outgoing.pieces.len(), 3);
        let mut writer = Trickle {
            step: usize::MAX,
            out: Vec::new(),
            calls: 0,
        };
        outgoing.send(&mut writer).await.unwrap();
        assert_eq!(writer.out, expected);
        assert_eq!(writer.calls, 1);
    }

    #[tokio::test]
    async fn partial_writes_resume_where_they_stopped() {
        for step in [1, 7, 28, 29, 60, 93] {
            let (mut outgoing, expected) = queue();
            let mut writer = Trickle {
                step,
                out: Vec::new(),
                calls: 0,
            };
            outgoing.send(&mut writer).await.unwrap();
            assert_eq!(writer.out, expected, "step {step}");
            assert_eq!(writer.calls, expected.len().div_ceil(step), "step {step}");
        }
    }

    #[tokio::test]
    async fn more_pieces_than_one_writev_takes_and_sent_buffers_are_let_go() {
        let shared = Arc::new(vec![9u8; 8]);
        let mut outgoing: Outgoing<Vec<u8>> = Outgoing::default();
        let mut expected = Vec::new();
        for i in 0..100u8 {
            outgoing.push(&[i; 4], Payload::Shared(&shared, 0..8));
            expected.extend([i; 4]);
            expected.extend([9; 8]);
        }
        let mut writer = Trickle {
            step: usize::MAX,
            out: Vec::new(),
            calls: 0,
        };
        outgoing.send(&mut writer).await.unwrap();
        assert_eq!(writer.out, expected);
        assert_eq!(writer.calls, 200usize.div_ceil(MAX_SLICES));
        // Every shared payload was let go as soon as it was written.
        assert_eq!(Arc::strong_count(&shared), 1);
        outgoing.clear();
        assert!(outgoing.is_empty());
    }

    /// Takes `step` bytes on every second call and is not ready on the others.
    struct Stalling {
        inner: Trickle,
        ready: bool,
    }

    impl AsyncWrite for Stalling {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.ready = !self.ready;
            if !self.ready {
                return Poll::Pending;
            }
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            slices: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.ready = !self.ready;
            if !self.ready {
                return Poll::Pending;
            }
            Pin::new(&mut self.inner).poll_write_vectored(cx, slices)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_send_dropped_while_waiting_resumes_where_it_stopped() {
        let (mut outgoing, expected) = queue();
        let mut writer = Stalling {
            inner: Trickle {
                step: 9,
                out: Vec::new(),
                calls: 0,
            },
            ready: false,
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Each call writes once, then is dropped at its next wait (the last one finishes).
        let mut attempts = 0;
        loop {
            attempts += 1;
            let send = std::pin::pin!(outgoing.send(&mut writer));
            if let Poll::Ready(result) = send.poll(&mut cx) {
                result.unwrap();
                break;
            }
        }
        assert_eq!(writer.inner.out, expected);
        assert_eq!(attempts, expected.len().div_ceil(9));
    }

    #[tokio::test]
    async fn a_writer_taking_nothing_is_an_error() {
        let (mut outgoing, _) = queue();
        let mut writer = Trickle {
            step: 0,
            out: Vec::new(),
            calls: 0,
        };
        let error = outgoing.send(&mut writer).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WriteZero);
    }
}
