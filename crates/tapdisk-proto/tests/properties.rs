//! Property tests: every valid message survives encode -> decode unchanged, and the decoder
//! never panics on arbitrary input (whatever it accepts re-encodes to the same message).

use proptest::prelude::*;
use tapdisk_proto::{
    body_kind, decode_key_size, decode_log_path, encode_key, encode_log_path, Blkif, Body,
    BodyKind, ImageInfo, ListEntry, Message, MessageType, Minors, OpenFlags, Params, Query,
    StatInfo, LOG_PATH_PAYLOAD_LEN, MAX_STATS_LENGTH, MESSAGE_SIZE,
};

/// A string that fits a 256-byte C field: no NUL, at most 255 bytes of UTF-8. Biased towards
/// both short ASCII and long multi-byte text so the length limit is exercised.
fn c_string() -> impl Strategy<Value = String> {
    let chars = prop_oneof![
        3 => proptest::char::range('\u{1}', '\u{7f}'),
        1 => any::<char>().prop_filter("no NUL", |c| *c != '\0'),
    ];
    proptest::collection::vec(chars, 0..=255).prop_map(|chars| {
        let mut text = String::new();
        for c in chars {
            if text.len() + c.len_utf8() > 255 {
                break;
            }
            text.push(c);
        }
        text
    })
}

fn params() -> impl Strategy<Value = Params> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        c_string(),
        any::<u32>(),
        any::<u16>(),
        c_string(),
    )
        .prop_map(
            |(flags, devnum, domid, path, prt_devnum, req_timeout, secondary)| Params {
                flags: OpenFlags(flags),
                devnum,
                domid,
                path,
                prt_devnum,
                req_timeout,
                secondary,
            },
        )
}

fn blkif() -> impl Strategy<Value = Blkif> {
    (
        (
            any::<u32>(),
            any::<u32>(),
            any::<[u32; 8]>(),
            0u32..=3,
            1u32..=3,
        ),
        (c_string(), any::<u32>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |((domid, devid, gref, order, proto), (pool, port, poll_duration, idle))| Blkif {
                domid,
                devid,
                gref,
                order,
                proto,
                pool,
                port,
                poll_duration,
                poll_idle_threshold: idle,
            },
        )
}

fn body(kind: BodyKind) -> BoxedStrategy<Body> {
    match kind {
        BodyKind::Empty => Just(Body::Empty).boxed(),
        BodyKind::Pid => any::<i32>().prop_map(Body::Pid).boxed(),
        BodyKind::Image => (any::<u64>(), any::<u32>(), any::<u32>())
            .prop_map(|(sectors, sector_size, info)| {
                Body::Image(ImageInfo {
                    sectors,
                    sector_size,
                    info,
                })
            })
            .boxed(),
        BodyKind::Params => params().prop_map(Body::Params).boxed(),
        BodyKind::Response => (0..=i32::MAX, c_string())
            .prop_map(|(error, message)| Body::Response { error, message })
            .boxed(),
        BodyKind::Minors => proptest::collection::vec(any::<i32>(), 0..=63)
            .prop_map(|list| {
                let count = i32::try_from(list.len()).expect("at most 63");
                Body::Minors(Minors { count, list })
            })
            .boxed(),
        BodyKind::List => (0..=i32::MAX, any::<i32>(), any::<i32>(), c_string())
            .prop_map(|(count, minor, state, path)| {
                Body::List(ListEntry {
                    count,
                    minor,
                    state,
                    path,
                })
            })
            .boxed(),
        BodyKind::Stat => (any::<u16>(), any::<u16>(), 0..=MAX_STATS_LENGTH)
            .prop_map(|(msg_type, cookie, length)| {
                Body::Stat(StatInfo {
                    msg_type,
                    cookie,
                    length,
                })
            })
            .boxed(),
        BodyKind::Blkif => blkif().prop_map(Body::Blkif).boxed(),
        BodyKind::Query => (any::<u64>(), any::<u64>(), c_string())
            .prop_map(|(current_progress, total_progress, status)| {
                Body::Query(Query {
                    current_progress,
                    total_progress,
                    status,
                })
            })
            .boxed(),
        BodyKind::Text => c_string().prop_map(Body::Text).boxed(),
    }
}

fn message() -> impl Strategy<Value = Message> {
    (
        proptest::sample::select(MessageType::ALL.to_vec()),
        any::<u16>(),
    )
        .prop_flat_map(|(msg_type, cookie)| {
            body(body_kind(msg_type)).prop_map(move |body| Message::new(msg_type, cookie, body))
        })
}

/// Decodes `bytes`; if accepted, the message must re-encode and decode to itself.
fn check_decode_is_stable(bytes: &[u8]) {
    if let Ok(message) = Message::decode(bytes) {
        let encoded = message.encode().expect("a decoded message must re-encode");
        assert_eq!(Message::decode(&encoded), Ok(message));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn valid_messages_round_trip(message in message()) {
        let wire = message.encode().expect("generated messages are valid");
        prop_assert_eq!(wire.len(), MESSAGE_SIZE);
        prop_assert_eq!(&wire[4..8], &[0u8; 4]);
        prop_assert_eq!(Message::decode(&wire), Ok(message));
    }

    #[test]
    fn decode_never_panics_on_full_size_noise(bytes in proptest::collection::vec(any::<u8>(), MESSAGE_SIZE)) {
        check_decode_is_stable(&bytes);
    }

    #[test]
    fn decode_never_panics_with_a_valid_type(
        type_number in 1u16..=36,
        mut bytes in proptest::collection::vec(any::<u8>(), MESSAGE_SIZE),
    ) {
        bytes[0..2].copy_from_slice(&type_number.to_le_bytes());
        check_decode_is_stable(&bytes);
    }

    #[test]
    fn decode_never_panics_on_any_length(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
        let result = Message::decode(&bytes);
        if bytes.len() != MESSAGE_SIZE {
            prop_assert!(result.is_err());
        }
        check_decode_is_stable(&bytes);
    }

    #[test]
    fn corrupted_valid_messages_never_panic(
        message in message(),
        flips in proptest::collection::vec((0usize..MESSAGE_SIZE, any::<u8>()), 1..8),
    ) {
        let mut wire = message.encode().expect("generated messages are valid");
        for (offset, value) in flips {
            wire[offset] = value;
        }
        check_decode_is_stable(&wire);
    }

    #[test]
    fn log_path_round_trip(path in c_string()) {
        let payload = encode_log_path(&path).expect("fits");
        prop_assert_eq!(decode_log_path(&payload), Ok(path));
    }

    #[test]
    fn log_path_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..=LOG_PATH_PAYLOAD_LEN + 4)) {
        let _ = decode_log_path(&bytes);
    }

    #[test]
    fn key_round_trip(key in proptest::collection::vec(any::<u8>(), 1..=128)) {
        let payload = encode_key(&key).expect("valid size");
        prop_assert_eq!(decode_key_size(payload[0]), Ok(key.len()));
        prop_assert_eq!(&payload[1..], &key[..]);
    }
}
