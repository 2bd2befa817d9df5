//! Fuzz target for NBD transmission requests: arbitrary bytes are parsed as request headers
//! (compact, or extended 64-bit ones when the first byte's top bit says so) and classified
//! against a session derived from the input. Parsing and classification must never panic,
//! accepted headers must re-encode to the same bytes, and an executed read or write must lie
//! inside the export.
#![no_main]

use nbd::proto::{
    classify_request, in_bounds, Command, ExportInfo, ExtendedRequestHeader, RequestAction,
    RequestHeader, Session, DEFAULT_MAX_BLOCK, EXTENDED_HEADER_LEN, REQUEST_HEADER_LEN,
};

/// Checks what the classifier decided about one header.
fn check(session: &Session, header: &RequestHeader) {
    match classify_request(session, header) {
        Ok(RequestAction::Execute(Command::Read { offset, length, .. }))
        | Ok(RequestAction::Execute(Command::Write { offset, length, .. })) => {
            assert!(in_bounds(offset, u64::from(length), session.info.size));
            assert!(length <= session.max_request);
        }
        Ok(RequestAction::Reject { discard, .. }) => {
            assert!(discard <= session.max_request.max(DEFAULT_MAX_BLOCK));
        }
        _ => {}
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&knobs, mut rest)) = data.split_first() else {
        return;
    };
    let mut info = ExportInfo::new(u64::from(knobs) << 20);
    info.read_only = knobs & 1 != 0;
    info.can_flush = knobs & 2 != 0;
    info.can_trim = knobs & 4 != 0;
    info.can_write_zeroes = knobs & 8 != 0;
    info.can_fast_zero = knobs & 16 != 0;
    info.can_cache = knobs & 32 != 0;
    let structured = knobs & 64 != 0;
    let (_, _, max_request) = info.block_sizes();
    let session = Session {
        transmission_flags: info.transmission_flags(structured),
        info,
        structured,
        contexts: if structured {
            vec![nbd::proto::MetaContext::BaseAllocation]
        } else {
            Vec::new()
        },
        max_request,
    };
    if knobs & 128 != 0 {
        while let Some((raw, tail)) = rest.split_first_chunk::<EXTENDED_HEADER_LEN>() {
            rest = tail;
            let Ok(header) = ExtendedRequestHeader::parse(raw) else {
                continue;
            };
            assert_eq!(&header.encode(), raw);
            if let Some(compact) = header.compact() {
                check(&session, &compact);
            }
        }
        return;
    }
    while let Some((raw, tail)) = rest.split_first_chunk::<REQUEST_HEADER_LEN>() {
        rest = tail;
        let Ok(header) = RequestHeader::parse(raw) else {
            continue;
        };
        assert_eq!(&header.encode(), raw);
        check(&session, &header);
    }
});
