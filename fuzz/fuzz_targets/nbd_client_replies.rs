//! Fuzz target for what an NBD server sends a client (tapdisk's `nbd:` images): arbitrary
//! bytes are read as a greeting, option replies with their `NBD_INFO` items, and a stream of
//! simple and structured replies to a read whose offset and length the input chooses, the
//! way the client's reader consumes them. Nothing may panic, and every data or hole range a
//! chunk is accepted with must lie inside the read's buffer.
#![no_main]

use nbd::client::codec::{
    chunk_prefix_len, parse_chunk, parse_chunk_header, parse_greeting_start, parse_info,
    parse_oldstyle_rest, parse_option_reply_header, parse_reply_magic, parse_server_flags,
    parse_simple_reply, ChunkContext, ChunkMeaning, GreetingStyle, ReplyKind, GREETING_START_LEN,
    OLDSTYLE_REST_LEN, OPTION_REPLY_HEADER_LEN,
};
use nbd::proto::{OPT_GO, SIMPLE_REPLY_LEN, STRUCTURED_HEADER_LEN};

/// Takes `n` bytes off the front of `data`.
fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Some(head)
}

fn handshake(data: &mut &[u8]) -> Option<()> {
    let start: [u8; GREETING_START_LEN] = take(data, GREETING_START_LEN)?.try_into().ok()?;
    match parse_greeting_start(&start) {
        Ok(GreetingStyle::Oldstyle) => {
            let rest: [u8; OLDSTYLE_REST_LEN] = take(data, OLDSTYLE_REST_LEN)?.try_into().ok()?;
            let _ = parse_oldstyle_rest(&rest);
        }
        Ok(GreetingStyle::Newstyle) => {
            let flags = take(data, 2)?;
            let _ = parse_server_flags([flags[0], flags[1]]);
        }
        Err(_) => {}
    }
    // Option replies to GO until one is refused.
    loop {
        let header: [u8; OPTION_REPLY_HEADER_LEN] =
            take(data, OPTION_REPLY_HEADER_LEN)?.try_into().ok()?;
        let Ok(reply) = parse_option_reply_header(&header, OPT_GO) else {
            return Some(());
        };
        let payload = take(data, usize::try_from(reply.length).ok()?)?;
        let _ = parse_info(payload);
    }
}

fn replies(data: &mut &[u8], context: ChunkContext) -> Option<()> {
    let buffer_len = usize::try_from(context.length).ok()?;
    loop {
        let magic: [u8; 4] = take(data, 4)?.try_into().ok()?;
        match parse_reply_magic(magic, true).ok()? {
            ReplyKind::Simple => {
                let mut bytes = [0u8; SIMPLE_REPLY_LEN];
                bytes[..4].copy_from_slice(&magic);
                bytes[4..].copy_from_slice(take(data, SIMPLE_REPLY_LEN - 4)?);
                let reply = parse_simple_reply(&bytes);
                if reply.error == 0 {
                    take(data, buffer_len)?;
                }
            }
            ReplyKind::Chunk => {
                let mut bytes = [0u8; STRUCTURED_HEADER_LEN];
                bytes[..4].copy_from_slice(&magic);
                bytes[4..].copy_from_slice(take(data, STRUCTURED_HEADER_LEN - 4)?);
                let header = parse_chunk_header(&bytes);
                let Ok(prefix_len) = chunk_prefix_len(&header, context) else {
                    return Some(());
                };
                let prefix = take(data, prefix_len)?;
                match parse_chunk(&header, prefix, context) {
                    Ok(ChunkMeaning::Data { range }) => {
                        assert!(range.start < range.end && range.end <= buffer_len);
                        assert_eq!(range.len() as u64 + 8, u64::from(header.length));
                        take(data, range.len())?;
                    }
                    Ok(ChunkMeaning::Hole { range }) => {
                        assert!(range.start < range.end && range.end <= buffer_len);
                    }
                    Ok(ChunkMeaning::Error { error, .. }) => assert_ne!(error, 0),
                    Ok(ChunkMeaning::Nothing) | Err(_) => {}
                }
            }
        }
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let Some(knobs) = take(&mut data, 13) else {
        return;
    };
    let context = ChunkContext {
        read: knobs[0] & 1 != 0,
        offset: u64::from_be_bytes(knobs[1..9].try_into().unwrap()),
        // Up to 64 KiB, so inputs can cover whole reads.
        length: u32::from_be_bytes(knobs[9..13].try_into().unwrap()) % (64 * 1024 + 1),
    };
    if knobs[0] & 2 != 0 {
        let _ = handshake(&mut data);
    } else {
        let _ = replies(&mut data, context);
    }
});
