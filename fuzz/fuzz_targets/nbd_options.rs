//! Fuzz target for the NBD option phase: the input is the byte stream a client sends after
//! the server greeting (client flags, then option headers and data). Feeding it through
//! the pure parsers and the negotiation state machine must never panic, and every reply
//! the server would send must be a well-formed option reply (or the EXPORT_NAME answer).
#![no_main]

use nbd::proto::{
    parse_client_flags, ExportInfo, Negotiation, OptionHeader, OptionOutcome, OPTION_HEADER_LEN,
    OPTION_REPLY_MAGIC, OPT_EXPORT_NAME,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((flags, mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Ok(client) = parse_client_flags(*flags) else {
        return;
    };
    let mut info = ExportInfo::new(1 << 30);
    info.can_flush = true;
    info.can_trim = true;
    info.description = Some("fuzz".into());
    let mut negotiation = Negotiation::new("fuzz", info, client);
    let mut out = Vec::new();
    while let Some((head, tail)) = rest.split_first_chunk::<OPTION_HEADER_LEN>() {
        let Ok(header) = OptionHeader::parse(head) else {
            return;
        };
        let Ok(len) = usize::try_from(header.length) else {
            return;
        };
        let Some(option_data) = tail.get(..len) else {
            return;
        };
        rest = &tail[len..];
        out.clear();
        let outcome = match negotiation.handle_option(header, option_data, &mut out) {
            Ok(outcome) => outcome,
            Err(_) => return,
        };
        if header.option != OPT_EXPORT_NAME {
            // Every reply is magic, option, type, length, data; the lengths add up exactly.
            let mut at = 0;
            while at < out.len() {
                assert_eq!(out[at..at + 8], OPTION_REPLY_MAGIC.to_be_bytes());
                let len = u32::from_be_bytes(out[at + 16..at + 20].try_into().unwrap());
                at += 20 + usize::try_from(len).unwrap();
            }
            assert_eq!(at, out.len());
        }
        if outcome != OptionOutcome::Continue {
            return;
        }
    }
});
