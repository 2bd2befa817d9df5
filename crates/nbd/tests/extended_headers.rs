//! Extended headers (`NBD_OPT_EXTENDED_HEADERS`): 32-byte requests with 64-bit lengths and
//! 32-byte reply chunks echoing the request offset, byte for byte.

mod common;

use std::sync::Arc;

use common::{Harness, MemExport};
use nbd::proto::{self, ExtendedRequestHeader, OptionHeader};
use nbd::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

async fn read_n(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).await.unwrap();
    buf
}

async fn option(stream: &mut UnixStream, option: u32, data: &[u8]) -> (u32, Vec<u8>) {
    let header = OptionHeader {
        option,
        length: u32::try_from(data.len()).unwrap(),
    };
    stream.write_all(&header.encode()).await.unwrap();
    stream.write_all(data).await.unwrap();
    let head = read_n(stream, 20).await;
    assert_eq!(head[0..8], proto::OPTION_REPLY_MAGIC.to_be_bytes());
    let reply_type = u32::from_be_bytes(head[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
    (reply_type, read_n(stream, len).await)
}

/// One extended reply header: (flags, type, cookie, offset, payload length).
async fn reply(stream: &mut UnixStream) -> (u16, u16, u64, u64, u64) {
    let head = read_n(stream, proto::EXTENDED_HEADER_LEN).await;
    assert_eq!(head[0..4], proto::EXTENDED_REPLY_MAGIC.to_be_bytes());
    let u64_at = |at: usize| u64::from_be_bytes(head[at..at + 8].try_into().unwrap());
    (
        u16::from_be_bytes(head[4..6].try_into().unwrap()),
        u16::from_be_bytes(head[6..8].try_into().unwrap()),
        u64_at(8),
        u64_at(16),
        u64_at(24),
    )
}

async fn request(stream: &mut UnixStream, command: u16, cookie: u64, offset: u64, length: u64) {
    let header = ExtendedRequestHeader {
        flags: 0,
        command,
        cookie,
        offset,
        length,
    };
    stream.write_all(&header.encode()).await.unwrap();
}

#[test]
fn extended_requests_and_replies() {
    let export = Arc::new(MemExport::new(1 << 20));
    let harness = Harness::start(Arc::clone(&export), ServerConfig::default());
    let socket = harness.socket.clone();
    harness.runtime.block_on(async move {
        let mut stream = UnixStream::connect(&socket).await.unwrap();
        read_n(&mut stream, proto::GREETING_LEN).await;
        let flags = proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES;
        stream.write_all(&flags.to_be_bytes()).await.unwrap();
        // Data on the option is refused; an empty one is acknowledged.
        let (refused, _) = option(&mut stream, proto::OPT_EXTENDED_HEADERS, &[1]).await;
        assert_eq!(refused, proto::REP_ERR_INVALID);
        let (ack, _) = option(&mut stream, proto::OPT_EXTENDED_HEADERS, &[]).await;
        assert_eq!(ack, proto::REP_ACK);
        // Metadata contexts work without NBD_OPT_STRUCTURED_REPLY (implied).
        let mut query = Vec::new();
        query.extend_from_slice(&0u32.to_be_bytes());
        query.extend_from_slice(&1u32.to_be_bytes());
        query.extend_from_slice(
            &u32::try_from(proto::BASE_ALLOCATION.len())
                .unwrap()
                .to_be_bytes(),
        );
        query.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
        let (context, data) = option(&mut stream, proto::OPT_SET_META_CONTEXT, &query).await;
        assert_eq!(context, proto::REP_META_CONTEXT);
        let context_id = u32::from_be_bytes(data[0..4].try_into().unwrap());
        let head = read_n(&mut stream, 20).await;
        assert_eq!(head[12..16], proto::REP_ACK.to_be_bytes());
        let (mut kind, _) = option(&mut stream, proto::OPT_GO, &[0; 6]).await;
        while kind != proto::REP_ACK {
            assert_eq!(kind, proto::REP_INFO);
            let head = read_n(&mut stream, 20).await;
            kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
            read_n(&mut stream, len).await;
        }

        // WRITE: 32-byte header, payload, one NONE chunk echoing the offset.
        request(&mut stream, proto::CMD_WRITE, 1, 8192, 4096).await;
        stream.write_all(&[0xa5; 4096]).await.unwrap();
        assert_eq!(
            reply(&mut stream).await,
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 1, 8192, 0)
        );
        // READ: one OFFSET_DATA chunk with a 64-bit payload length.
        request(&mut stream, proto::CMD_READ, 2, 8192, 4096).await;
        assert_eq!(
            reply(&mut stream).await,
            (
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                2,
                8192,
                4104
            )
        );
        let payload = read_n(&mut stream, 4104).await;
        assert_eq!(payload[0..8], 8192u64.to_be_bytes());
        assert!(payload[8..].iter().all(|b| *b == 0xa5));
        // A hole reads as an OFFSET_HOLE chunk.
        request(&mut stream, proto::CMD_READ, 3, 65536, 4096).await;
        assert_eq!(
            reply(&mut stream).await,
            (
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_HOLE,
                3,
                65536,
                12
            )
        );
        let payload = read_n(&mut stream, 12).await;
        assert_eq!(payload[0..8], 65536u64.to_be_bytes());
        assert_eq!(payload[8..12], 4096u32.to_be_bytes());
        // BLOCK_STATUS with a 64-bit length answers for what it can, in 64-bit extents.
        request(&mut stream, proto::CMD_BLOCK_STATUS, 4, 0, 1 << 40).await;
        let (flags, kind, cookie, offset, len) = reply(&mut stream).await;
        assert_eq!(
            (flags, kind, cookie, offset),
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, 4, 0),
            "a range beyond the end is refused"
        );
        read_n(&mut stream, usize::try_from(len).unwrap()).await;
        request(&mut stream, proto::CMD_BLOCK_STATUS, 5, 0, 1 << 20).await;
        let (_, kind, cookie, _, len) = reply(&mut stream).await;
        assert_eq!((kind, cookie), (proto::REPLY_TYPE_BLOCK_STATUS_EXT, 5));
        let payload = read_n(&mut stream, usize::try_from(len).unwrap()).await;
        assert_eq!(payload[0..4], context_id.to_be_bytes());
        let count = u32::from_be_bytes(payload[4..8].try_into().unwrap()) as usize;
        assert_eq!(payload.len(), 8 + 16 * count);
        let first = u64::from_be_bytes(payload[8..16].try_into().unwrap());
        assert_eq!(first, 65536, "the written block's 64 KiB map block is data");
        // TRIM longer than 32 bits: refused, not shortened.
        request(&mut stream, proto::CMD_TRIM, 6, 0, 1 << 33).await;
        let (_, kind, cookie, _, len) = reply(&mut stream).await;
        assert_eq!((kind, cookie), (proto::REPLY_TYPE_ERROR, 6));
        let payload = read_n(&mut stream, usize::try_from(len).unwrap()).await;
        assert_eq!(payload[0..4], proto::EINVAL.to_be_bytes());
        // FLUSH: NONE chunk.
        request(&mut stream, proto::CMD_FLUSH, 7, 0, 0).await;
        assert_eq!(
            reply(&mut stream).await,
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 7, 0, 0)
        );
        // A compact (28-byte) header is a protocol violation now: the server hangs up.
        let old = proto::RequestHeader {
            flags: 0,
            command: proto::CMD_READ,
            cookie: 8,
            offset: 0,
            length: 512,
        };
        stream.write_all(&old.encode()).await.unwrap();
        stream.write_all(&[0u8; 4]).await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    });
    harness.stop();
}
