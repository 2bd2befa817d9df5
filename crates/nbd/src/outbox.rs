//! The reply outbox of one connection: finished requests in, bytes for the socket out.
//!
//! Replies are encoded as requests finish ([`Outbox::finish`]) into a queue of pieces that
//! one vectored write sends ([`Outbox::slices`], [`Outbox::advance`]):
//! * protocol bytes, status replies and read data up to `COPY_LIMIT` (32 KiB) are packed
//!   into one buffer, closed at `PACK_LIMIT` (512 KiB) and then a new one started (emptied
//!   buffers are kept for reuse);
//! * larger read data is queued as a range of the export's own buffer, without a copy (one
//!   read split into several data chunks shares the buffer);
//! * at most `MAX_IOVECS` (64) pieces go into one write;
//! * read buffers are handed back for the export to reuse as soon as nothing refers to them:
//!   at once when their data was copied, once written otherwise.
//!
//! Gathering (`transmission` holds finished replies back while a UNIX-socket client still
//! has plenty unread): worth it only while the outbox holds read data in fewer than
//! `GATHER_REPLIES` (16) replies and under `GATHER_BYTES` (32 KiB) ([`Outbox::may_gather`]),
//! and only while the client has at least `GATHER_UNREAD_FLOOR` (48 KiB) unread and more than
//! our last message plus `GATHER_UNREAD_MARGIN` (16 KiB) ([`plenty_unread`]).
//!
//! Pure code: no I/O, no tokio; the transmission loop does the writing.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::sync::Arc;

use crate::export::ExportBuffer;
use crate::proto::{self, Extent, ReadChunk};

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

/// Whether a client with `unread` bytes not yet read (socket buffer memory) has enough left
/// that replies may wait for company: at least `GATHER_UNREAD_FLOOR`, and more than our last
/// message (`last_message` bytes) plus `GATHER_UNREAD_MARGIN`.
#[inline]
pub(crate) fn plenty_unread(unread: usize, last_message: usize) -> bool {
    unread >= GATHER_UNREAD_FLOOR.max(last_message + GATHER_UNREAD_MARGIN)
}

/// A finished request, ready to be encoded.
pub(crate) enum Done<B> {
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
        /// Each selected context's id and answer, in id order.
        results: Vec<(u32, io::Result<Vec<Extent>>)>,
    },
}

impl<B> Done<B> {
    /// Payload bytes this request held while it ran (a read's data is then counted by the
    /// outbox until written).
    pub(crate) fn held(&self) -> usize {
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
pub(crate) struct Outbox<B> {
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
    /// The chunks of the read reply being encoded (kept to reuse its allocation).
    chunks: Vec<ReadChunk>,
    /// Structured replies were negotiated.
    structured: bool,
    /// Extended headers were negotiated (every reply is an extended chunk).
    extended: bool,
}

impl<B: ExportBuffer> Outbox<B> {
    pub(crate) fn new(structured: bool, extended: bool) -> Self {
        Self {
            structured: structured || extended,
            extended,
            pieces: VecDeque::new(),
            front_written: 0,
            replies: 0,
            bytes: 0,
            spare: Vec::new(),
            returned: Vec::new(),
            chunks: Vec::new(),
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
    pub(crate) fn may_gather(&self) -> bool {
        self.bytes > 0 && self.replies < GATHER_REPLIES && self.bytes < GATHER_BYTES
    }

    /// Nothing is waiting for the socket.
    pub(crate) fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Replies queued since the outbox was last empty (they count as requests in flight).
    pub(crate) fn replies(&self) -> usize {
        self.replies
    }

    /// Read payload bytes queued since the outbox was last empty (they count against the
    /// connection's payload budget).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Read buffers the outbox is done with, for the export to reuse.
    pub(crate) fn take_returned(&mut self) -> std::vec::Drain<'_, B> {
        self.returned.drain(..)
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
    pub(crate) fn slices(&self) -> ([IoSlice<'_>; MAX_IOVECS], usize) {
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
    pub(crate) fn advance(&mut self, mut written: usize) {
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

    pub(crate) fn error(&mut self, cookie: u64, offset: u64, error: u32, message: &str) {
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
        let mut chunks = std::mem::take(&mut self.chunks);
        if no_fragment {
            chunks.clear();
            chunks.push(ReadChunk::Data {
                offset,
                range: 0..len,
            });
        } else {
            proto::split_read_into(offset, buf.bytes(), &mut chunks);
        }
        if small {
            self.read_chunks(cookie, offset, &chunks, buf.bytes(), None);
            self.returned.push(buf);
        } else {
            let buf = Arc::new(buf);
            self.read_chunks(cookie, offset, &chunks, buf.bytes(), Some(&buf));
            self.give_back(buf);
        }
        self.chunks = chunks;
    }

    /// Queues the chunks of a structured read reply; data ranges are copied from `bytes`,
    /// or queued from `shared` (the same bytes) when given and large.
    fn read_chunks(
        &mut self,
        cookie: u64,
        offset: u64,
        chunks: &[ReadChunk],
        bytes: &[u8],
        shared: Option<&Arc<B>>,
    ) {
        let last = chunks.len().saturating_sub(1);
        for (index, chunk) in chunks.iter().enumerate() {
            let done = index == last;
            match *chunk {
                ReadChunk::Data {
                    offset: at,
                    ref range,
                } => {
                    let range = range.clone();
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

    /// One context's chunk of a block status reply; `done` for the request's last.
    fn block_status(
        &mut self,
        cookie: u64,
        offset: u64,
        context: u32,
        descriptors: &[(u32, u32)],
        done: bool,
    ) {
        let count = u32::try_from(descriptors.len()).unwrap_or(u32::MAX);
        if self.extended {
            self.chunk_header(
                done,
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
            proto::encode_block_status_chunk(self.packed(), cookie, context, descriptors, done);
        }
        if done {
            self.replies += 1;
        }
    }

    pub(crate) fn finish(&mut self, done: Done<B>) {
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
                results,
            } => {
                let limit = if req_one {
                    1
                } else {
                    proto::MAX_EXTENTS_PER_REPLY
                };
                // Every context answers, or the request fails as a whole.
                let mut chunks = Vec::with_capacity(results.len());
                for (context, result) in results {
                    let extents = match result {
                        Ok(extents) => extents,
                        Err(error) => return self.io_error(cookie, offset, &error),
                    };
                    let descriptors = proto::clamp_extents(&extents, length, limit);
                    if descriptors.is_empty() {
                        return self.error(
                            cookie,
                            offset,
                            proto::EIO,
                            &format!("export gave no extents for offset {offset} length {length}"),
                        );
                    }
                    chunks.push((context, descriptors));
                }
                let last = chunks.len().saturating_sub(1);
                for (index, (context, descriptors)) in chunks.iter().enumerate() {
                    self.block_status(cookie, offset, *context, descriptors, index == last);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EIO_RAW: i32 = 5;

    fn status(cookie: u64, result: io::Result<()>) -> Done<Vec<u8>> {
        Done::Status {
            cookie,
            offset: 4096,
            held: 0,
            result,
        }
    }

    fn read(cookie: u64, offset: u64, data: Vec<u8>, no_fragment: bool) -> Done<Vec<u8>> {
        Done::Read {
            cookie,
            offset,
            length: data.len(),
            no_fragment,
            result: Ok(data),
        }
    }

    /// Bytes 1, 2, 3, ... (never a zero block, so never a hole).
    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from(i % 251 + 1).unwrap())
            .collect()
    }

    /// Every queued byte, in order, as the next write would send it (and then more).
    fn queued(outbox: &Outbox<Vec<u8>>) -> Vec<u8> {
        let mut all = Vec::new();
        let (slices, count) = outbox.slices();
        for slice in &slices[..count] {
            all.extend_from_slice(slice);
        }
        all
    }

    /// Writes everything, as many vectored writes as it takes; returns the bytes.
    fn write_all(outbox: &mut Outbox<Vec<u8>>) -> Vec<u8> {
        let mut all = Vec::new();
        while !outbox.is_empty() {
            let chunk = queued(outbox);
            outbox.advance(chunk.len());
            all.extend_from_slice(&chunk);
        }
        all
    }

    #[test]
    fn status_replies_are_packed_into_one_buffer() {
        let mut outbox = Outbox::new(false, false);
        outbox.finish(status(1, Ok(())));
        outbox.finish(status(2, Err(io::Error::from_raw_os_error(EIO_RAW))));
        outbox.finish(status(3, Ok(())));
        assert_eq!(outbox.slices().1, 1);
        assert_eq!(outbox.replies(), 3);
        assert_eq!(outbox.bytes(), 0);
        let expected = [
            proto::simple_reply(1, 0),
            proto::simple_reply(2, proto::EIO),
            proto::simple_reply(3, 0),
        ]
        .concat();
        assert_eq!(write_all(&mut outbox), expected);
        assert_eq!(outbox.replies(), 0);
    }

    #[test]
    fn small_reads_are_copied_and_their_buffer_returned_at_once() {
        let mut outbox = Outbox::new(false, false);
        let data = pattern(COPY_LIMIT);
        outbox.finish(read(7, 0, data.clone(), false));
        assert_eq!(
            outbox.take_returned().count(),
            1,
            "copied: buffer back at once"
        );
        assert_eq!(outbox.slices().1, 1);
        assert_eq!((outbox.replies(), outbox.bytes()), (1, COPY_LIMIT));
        let expected = [&proto::simple_reply(7, 0)[..], &data].concat();
        assert_eq!(write_all(&mut outbox), expected);
        assert_eq!((outbox.replies(), outbox.bytes()), (0, 0));
    }

    #[test]
    fn large_reads_are_sent_from_the_export_buffer_and_returned_once_written() {
        let mut outbox = Outbox::new(false, false);
        let data = pattern(COPY_LIMIT + 512);
        outbox.finish(read(8, 0, data.clone(), false));
        assert_eq!(outbox.take_returned().count(), 0, "still queued");
        let (slices, count) = outbox.slices();
        assert_eq!(count, 2, "header packed, data from the export's buffer");
        assert_eq!(&slices[0][..], &proto::simple_reply(8, 0)[..]);
        assert_eq!(&slices[1][..], &data[..]);
        // A partial write: the header and 100 bytes of data.
        outbox.advance(proto::SIMPLE_REPLY_LEN + 100);
        let (slices, count) = outbox.slices();
        assert_eq!(count, 1);
        assert_eq!(&slices[0][..], &data[100..]);
        assert_eq!(outbox.take_returned().count(), 0);
        assert_eq!((outbox.replies(), outbox.bytes()), (1, data.len()));
        outbox.advance(data.len() - 100);
        assert!(outbox.is_empty());
        assert_eq!(outbox.take_returned().count(), 1, "written: buffer back");
        assert_eq!((outbox.replies(), outbox.bytes()), (0, 0));
    }

    #[test]
    fn structured_reads_become_data_and_hole_chunks() {
        let mut outbox = Outbox::new(true, false);
        let mut data = pattern(3 * 4096);
        data[4096..8192].fill(0);
        outbox.finish(read(9, 1 << 20, data.clone(), false));
        let mut expected = Vec::new();
        proto::encode_offset_data_header(&mut expected, 9, 1 << 20, 4096, false);
        expected.extend_from_slice(&data[..4096]);
        proto::encode_offset_hole(&mut expected, 9, (1 << 20) + 4096, 4096, false);
        proto::encode_offset_data_header(&mut expected, 9, (1 << 20) + 8192, 4096, true);
        expected.extend_from_slice(&data[8192..]);
        assert_eq!(write_all(&mut outbox), expected);

        // NBD_CMD_FLAG_DF: one data chunk, zeros and all.
        outbox.finish(read(10, 0, data.clone(), true));
        let mut expected = Vec::new();
        proto::encode_offset_data_header(&mut expected, 10, 0, 3 * 4096, true);
        expected.extend_from_slice(&data);
        assert_eq!(write_all(&mut outbox), expected);

        // An empty read is one final NONE chunk.
        outbox.finish(read(11, 0, Vec::new(), false));
        let mut expected = Vec::new();
        proto::encode_none_chunk(&mut expected, 11);
        assert_eq!(write_all(&mut outbox), expected);
        assert_eq!(outbox.take_returned().count(), 3);
    }

    #[test]
    fn a_large_structured_read_shares_its_buffer_between_chunks() {
        let mut outbox = Outbox::new(true, false);
        let mut data = pattern(4 * COPY_LIMIT);
        data[2 * COPY_LIMIT..2 * COPY_LIMIT + 4096].fill(0);
        outbox.finish(read(12, 0, data.clone(), false));
        // data header, data, hole chunk + data header, data
        assert_eq!(outbox.slices().1, 4);
        assert_eq!(outbox.take_returned().count(), 0);
        let written = write_all(&mut outbox);
        assert_eq!(outbox.take_returned().count(), 1, "one buffer, back once");
        let mut expected = Vec::new();
        let hole = 2 * COPY_LIMIT;
        let hole_len = 4096u32;
        let first = u32::try_from(hole).unwrap();
        proto::encode_offset_data_header(&mut expected, 12, 0, first, false);
        expected.extend_from_slice(&data[..hole]);
        proto::encode_offset_hole(&mut expected, 12, hole as u64, hole_len, false);
        let rest = hole + 4096;
        let rest_len = u32::try_from(data.len() - rest).unwrap();
        proto::encode_offset_data_header(&mut expected, 12, rest as u64, rest_len, true);
        expected.extend_from_slice(&data[rest..]);
        assert_eq!(written, expected);
    }

    #[test]
    fn a_short_read_from_the_export_is_an_eio_error() {
        let mut outbox = Outbox::new(true, false);
        outbox.finish(Done::Read {
            cookie: 13,
            offset: 512,
            length: 4096,
            no_fragment: false,
            result: Ok(vec![0; 512]),
        });
        assert_eq!(outbox.take_returned().count(), 1);
        let mut expected = Vec::new();
        proto::encode_error_chunk(
            &mut expected,
            13,
            proto::EIO,
            "export returned 512 bytes for a 4096-byte read at offset 512",
        );
        assert_eq!(write_all(&mut outbox), expected);
        // Failed requests answer with the errno's NBD error and the error's text.
        outbox.finish(Done::Read {
            cookie: 14,
            offset: 0,
            length: 512,
            no_fragment: false,
            result: Err(io::Error::from_raw_os_error(28)),
        });
        let mut expected = Vec::new();
        let message = io::Error::from_raw_os_error(28).to_string();
        proto::encode_error_chunk(&mut expected, 14, proto::ENOSPC, &message);
        assert_eq!(write_all(&mut outbox), expected);
    }

    #[test]
    fn extended_replies_echo_the_offset() {
        let mut outbox = Outbox::new(false, true);
        outbox.finish(status(15, Ok(())));
        let mut expected = Vec::new();
        proto::encode_reply_header(
            &mut expected,
            true,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_NONE,
            15,
            4096,
            0,
        );
        assert_eq!(expected.len(), proto::EXTENDED_HEADER_LEN);
        assert_eq!(write_all(&mut outbox), expected);

        outbox.finish(Done::BlockStatus {
            cookie: 16,
            offset: 0,
            length: 8192,
            req_one: false,
            results: vec![(
                1,
                Ok(vec![
                    Extent {
                        length: 4096,
                        flags: 0,
                    },
                    Extent {
                        length: 1 << 40,
                        flags: proto::STATE_HOLE | proto::STATE_ZERO,
                    },
                ]),
            )],
        });
        let mut expected = Vec::new();
        proto::encode_reply_header(
            &mut expected,
            true,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_BLOCK_STATUS_EXT,
            16,
            0,
            8 + 2 * 16,
        );
        expected.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]); // context, count
        expected.extend_from_slice(&4096u64.to_be_bytes());
        expected.extend_from_slice(&0u64.to_be_bytes());
        expected.extend_from_slice(&4096u64.to_be_bytes()); // clamped to the query
        expected.extend_from_slice(&3u64.to_be_bytes());
        assert_eq!(write_all(&mut outbox), expected);
    }

    #[test]
    fn block_status_replies() {
        let mut outbox = Outbox::new(true, false);
        let extents = vec![
            Extent {
                length: 512,
                flags: 3,
            },
            Extent {
                length: 512,
                flags: 0,
            },
        ];
        let answer = |req_one, result| Done::BlockStatus {
            cookie: 17,
            offset: 0,
            length: 1024,
            req_one,
            results: vec![(1, result)],
        };
        outbox.finish(answer(true, Ok(extents.clone())));
        let mut expected = Vec::new();
        proto::encode_block_status_chunk(&mut expected, 17, 1, &[(512, 3)], true);
        assert_eq!(write_all(&mut outbox), expected);
        outbox.finish(answer(false, Ok(extents)));
        let mut expected = Vec::new();
        proto::encode_block_status_chunk(&mut expected, 17, 1, &[(512, 3), (512, 0)], true);
        assert_eq!(write_all(&mut outbox), expected);
        outbox.finish(answer(false, Ok(Vec::new())));
        let mut expected = Vec::new();
        let message = "export gave no extents for offset 0 length 1024";
        proto::encode_error_chunk(&mut expected, 17, proto::EIO, message);
        assert_eq!(write_all(&mut outbox), expected);
    }

    #[test]
    fn block_status_answers_every_context_done_on_the_last() {
        let mut outbox = Outbox::new(true, false);
        let one = |flags| {
            Ok(vec![Extent {
                length: 1024,
                flags,
            }])
        };
        let answer = |results| Done::BlockStatus {
            cookie: 18,
            offset: 0,
            length: 1024,
            req_one: false,
            results,
        };
        outbox.finish(answer(vec![(1, one(0)), (2, one(proto::STATE_DIRTY))]));
        let mut expected = Vec::new();
        proto::encode_block_status_chunk(&mut expected, 18, 1, &[(1024, 0)], false);
        proto::encode_block_status_chunk(&mut expected, 18, 2, &[(1024, 1)], true);
        assert_eq!(write_all(&mut outbox), expected);
        // One context failing fails the request as a whole: one error chunk, nothing else.
        let failed = Err(io::Error::from_raw_os_error(EIO_RAW));
        outbox.finish(answer(vec![(1, one(0)), (2, failed)]));
        let mut expected = Vec::new();
        let message = io::Error::from_raw_os_error(EIO_RAW).to_string();
        proto::encode_error_chunk(&mut expected, 18, proto::EIO, &message);
        assert_eq!(write_all(&mut outbox), expected);
    }

    #[test]
    fn a_packed_buffer_closes_at_the_pack_limit() {
        let mut outbox = Outbox::new(false, false);
        let replies = PACK_LIMIT / proto::SIMPLE_REPLY_LEN + 1;
        for cookie in 0..replies {
            outbox.finish(status(cookie as u64, Ok(())));
        }
        let (slices, count) = outbox.slices();
        assert_eq!(count, 2);
        assert_eq!(slices[0].len(), PACK_LIMIT);
        assert_eq!(slices[1].len(), proto::SIMPLE_REPLY_LEN);
    }

    #[test]
    fn one_write_takes_at_most_max_iovecs_pieces() {
        let mut outbox = Outbox::new(false, false);
        let reads = MAX_IOVECS; // a packed header and a data piece each
        for cookie in 0..reads {
            outbox.finish(read(cookie as u64, 0, pattern(COPY_LIMIT + 1), false));
        }
        let (slices, count) = outbox.slices();
        assert_eq!(count, MAX_IOVECS);
        let sent: usize = slices[..count].iter().map(|slice| slice.len()).sum();
        outbox.advance(sent);
        assert_eq!(outbox.slices().1, MAX_IOVECS);
        assert_eq!(outbox.take_returned().count(), MAX_IOVECS / 2);
        assert_eq!(write_all(&mut outbox).len(), sent);
        assert_eq!(outbox.take_returned().count(), MAX_IOVECS / 2);
    }

    #[test]
    fn an_emptied_packed_buffer_is_reused() {
        let mut outbox = Outbox::new(false, false);
        outbox.finish(status(1, Ok(())));
        write_all(&mut outbox);
        let spare = outbox.spare.as_ptr();
        assert!(outbox.spare.capacity() >= 64 * 1024);
        outbox.finish(status(2, Ok(())));
        assert_eq!(outbox.slices().0[0].as_ptr(), spare);
        assert_eq!(outbox.spare.capacity(), 0, "taken for the new reply");
    }

    #[test]
    fn gathering_needs_read_data_in_few_small_replies() {
        let mut outbox = Outbox::new(false, false);
        assert!(!outbox.may_gather(), "nothing queued");
        outbox.finish(status(1, Ok(())));
        assert!(
            !outbox.may_gather(),
            "status replies alone are not worth holding"
        );
        outbox.finish(read(2, 0, pattern(4096), false));
        assert!(outbox.may_gather());
        // 32 KiB of read data is a whole message buffer: send it.
        for cookie in 3..9 {
            outbox.finish(read(cookie, 0, pattern(4096), false));
            assert!(outbox.may_gather(), "{} bytes", outbox.bytes());
        }
        outbox.finish(read(9, 0, pattern(4096), false));
        assert_eq!(outbox.bytes(), GATHER_BYTES);
        assert!(!outbox.may_gather());
        write_all(&mut outbox);
        // ...and so are 16 replies.
        for cookie in 0..GATHER_REPLIES - 1 {
            outbox.finish(read(cookie as u64, 0, pattern(512), false));
        }
        assert!(outbox.may_gather());
        outbox.finish(read(99, 0, pattern(512), false));
        assert!(!outbox.may_gather());
    }

    #[test]
    fn gathering_needs_plenty_unread() {
        assert!(plenty_unread(GATHER_UNREAD_FLOOR, 0));
        assert!(!plenty_unread(GATHER_UNREAD_FLOOR - 1, 0));
        // Our last message was large: the client must have all of it and the margin left.
        let last = 40 * 1024;
        assert!(!plenty_unread(last + GATHER_UNREAD_MARGIN - 1, last));
        assert!(plenty_unread(last + GATHER_UNREAD_MARGIN, last));
    }

    #[test]
    fn done_counts_the_payload_it_held() {
        assert_eq!(read(1, 0, vec![0; 4096], false).held(), 4096);
        let write = Done::<Vec<u8>>::Status {
            cookie: 1,
            offset: 0,
            held: 512,
            result: Ok(()),
        };
        assert_eq!(write.held(), 512);
    }
}
