//! Fuzz target for the tap-ctl <-> tapdisk control message decoder: decoding arbitrary bytes
//! must never panic, and any accepted message must re-encode and decode to itself. The
//! trailing log-path, key-size and open-options payload decoders are exercised on the same
//! input.
#![no_main]

use tapdisk_proto::{
    decode_key_size, decode_log_path, decode_open_options, Message, LOG_PATH_PAYLOAD_LEN,
    OPEN_OPTIONS_PAYLOAD_LEN,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::decode(data) {
        let encoded = message
            .encode()
            .expect("a decoded message must encode again");
        let again = Message::decode(&encoded).expect("an encoded message must decode");
        assert_eq!(again, message);
    }
    if let Some(payload) = data.get(..LOG_PATH_PAYLOAD_LEN) {
        let _ = decode_log_path(payload);
    }
    if let Some(payload) = data.get(..OPEN_OPTIONS_PAYLOAD_LEN) {
        if let Ok(text) = decode_open_options(payload) {
            let encoded = tapdisk_proto::encode_open_options(&text)
                .expect("decoded options must encode again");
            assert_eq!(decode_open_options(&encoded).ok(), Some(text));
        }
    }
    if let Some(&size) = data.first() {
        let _ = decode_key_size(size);
    }
});
