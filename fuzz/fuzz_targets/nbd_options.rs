//! Fuzz target for the NBD option phase: the input is one byte choosing the TLS policy (low
//! bit set: TLS required, as on the TCP listener; clear: plaintext, as on the UNIX sockets),
//! then the byte stream a client sends after the server greeting (client flags, then option
//! headers and data). Feeding it through the pure parsers and the negotiation state machine
//! must never panic, every reply the server would send must be a well-formed option reply
//! (or the EXPORT_NAME answer), and under the TLS-required policy nothing but an error, the
//! STARTTLS acknowledgement or the ABORT acknowledgement is sent before TLS starts, and
//! transmission is never reached without it.
#![no_main]

use nbd::proto::{
    parse_client_flags, ExportInfo, Negotiation, OptionHeader, OptionOutcome, TlsPolicy,
    OPTION_HEADER_LEN, OPTION_REPLY_MAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_STARTTLS, REP_ACK,
    REP_ERR_INVALID, REP_ERR_TLS_REQD,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&knobs, data)) = data.split_first() else {
        return;
    };
    let Some((flags, mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Ok(client) = parse_client_flags(*flags) else {
        return;
    };
    let policy = if knobs & 1 != 0 {
        TlsPolicy::Required
    } else {
        TlsPolicy::Plaintext
    };
    // TLS is still to be started (the policy requires it and no STARTTLS was acknowledged).
    let mut before_tls = policy == TlsPolicy::Required;
    let mut info = ExportInfo::new(1 << 30);
    info.can_flush = true;
    info.can_trim = true;
    info.description = Some("fuzz".into());
    info.meta_contexts = vec!["qemu:dirty-bitmap:cbt".into()];
    let mut negotiation = Negotiation::new("fuzz", info, client, policy);
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
                let reply = u32::from_be_bytes(out[at + 12..at + 16].try_into().unwrap());
                if before_tls {
                    let allowed = match reply {
                        REP_ACK => matches!(header.option, OPT_STARTTLS | OPT_ABORT),
                        REP_ERR_TLS_REQD => header.option != OPT_STARTTLS,
                        REP_ERR_INVALID => header.option == OPT_STARTTLS,
                        _ => false,
                    };
                    assert!(
                        allowed,
                        "reply {reply:#x} to option {} before TLS",
                        header.option
                    );
                }
                let len = u32::from_be_bytes(out[at + 16..at + 20].try_into().unwrap());
                at += 20 + usize::try_from(len).unwrap();
            }
            assert_eq!(at, out.len());
        }
        match outcome {
            OptionOutcome::Continue => {}
            // The server upgrades the stream here; the options that follow come inside TLS.
            OptionOutcome::StartTls => {
                assert!(before_tls, "STARTTLS accepted twice or without the policy");
                before_tls = false;
            }
            OptionOutcome::Transmission(_) => {
                assert!(!before_tls, "transmission reached before the required TLS");
                return;
            }
            OptionOutcome::Close => return,
        }
    }
});
