//! Byte-exact fixtures for every message type. Each expected 544-byte buffer is assembled by
//! hand from the documented x86_64 offsets (never with the encoder), then the test checks
//! that `encode` produces exactly those bytes and `decode` gives the message back.

use tapdisk_proto::{
    body_kind, decode_key_size, decode_log_path, encode_key, encode_log_path, Blkif, Body,
    BodyKind, DecodeError, EncodeError, ImageInfo, ListEntry, Message, MessageType, Minors,
    OpenFlags, Params, Query, StatInfo, COOKIE_ALL, LOG_PATH_PAYLOAD_LEN, MESSAGE_SIZE,
};

type Wire = [u8; MESSAGE_SIZE];

/// A zeroed message with `type` at offset 0 and `cookie` at offset 2.
fn header(type_number: u16, cookie: u16) -> Wire {
    let mut wire = [0u8; MESSAGE_SIZE];
    wire[0..2].copy_from_slice(&type_number.to_le_bytes());
    wire[2..4].copy_from_slice(&cookie.to_le_bytes());
    wire
}

/// Copies `bytes` to absolute offset `offset`.
fn put(wire: &mut Wire, offset: usize, bytes: &[u8]) {
    wire[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// Asserts both directions: `encode(message) == fixture` and `decode(fixture) == message`.
fn assert_wire(message: &Message, fixture: &Wire) {
    let encoded = message.encode().expect("fixture message must encode");
    for (offset, (got, want)) in encoded.iter().zip(fixture.iter()).enumerate() {
        assert_eq!(
            got, want,
            "{}: byte at offset {offset} differs",
            message.msg_type
        );
    }
    assert_eq!(
        &Message::decode(fixture).expect("fixture must decode"),
        message
    );
}

#[test]
fn message_size_is_544() {
    assert_eq!(MESSAGE_SIZE, 544);
    assert_eq!(LOG_PATH_PAYLOAD_LEN, 256);
}

#[test]
fn every_type_number_and_name() {
    let expected: [(u16, &str); 40] = [
        (1, "ERROR"),
        (2, "RUNTIME_ERROR"),
        (3, "PID"),
        (4, "PID_RSP"),
        (5, "ATTACH"),
        (6, "ATTACH_RSP"),
        (7, "OPEN"),
        (8, "OPEN_RSP"),
        (9, "PAUSE"),
        (10, "PAUSE_RSP"),
        (11, "RESUME"),
        (12, "RESUME_RSP"),
        (13, "CLOSE"),
        (14, "CLOSE_RSP"),
        (15, "DETACH"),
        (16, "DETACH_RSP"),
        (17, "LIST_MINORS"),
        (18, "LIST_MINORS_RSP"),
        (19, "LIST"),
        (20, "LIST_RSP"),
        (21, "STATS"),
        (22, "STATS_RSP"),
        (23, "FORCE_SHUTDOWN"),
        (24, "XENBLKIF_CONNECT"),
        (25, "XENBLKIF_CONNECT_RSP"),
        (26, "XENBLKIF_DISCONNECT"),
        (27, "XENBLKIF_DISCONNECT_RSP"),
        (28, "DISK_INFO"),
        (29, "DISK_INFO_RSP"),
        (30, "EXIT"),
        (31, "COMMIT"),
        (32, "COMMIT_RSP"),
        (33, "QUERY_COMMIT_JOB"),
        (34, "QUERY_COMMIT_JOB_RSP"),
        (35, "CANCEL_COMMIT_JOB"),
        (36, "CANCEL_COMMIT_JOB_RSP"),
        (64, "BLOCK_DEVICE"),
        (65, "BLOCK_DEVICE_RSP"),
        (66, "NBD_LISTEN"),
        (67, "NBD_LISTEN_RSP"),
    ];
    for (number, name) in expected {
        let t = MessageType::from_u16(number).expect("known type");
        assert_eq!(t.name(), name);
        assert_eq!(t.to_string(), name);
        assert_eq!(t.as_u16(), number);
        assert_eq!(MessageType::try_from(number), Ok(t));
    }
    assert_eq!(MessageType::from_u16(0), None);
    assert_eq!(MessageType::from_u16(37), None);
    assert_eq!(MessageType::from_u16(63), None);
    assert_eq!(MessageType::from_u16(68), None);
    assert_eq!(MessageType::from_u16(u16::MAX), None);
    assert_eq!(
        MessageType::try_from(37),
        Err(DecodeError::UnknownType { value: 37 })
    );
}

/// Types whose union is unused: encode writes zeros and decode ignores those bytes.
const EMPTY_TYPES: [(u16, MessageType); 21] = [
    (3, MessageType::Pid),
    (5, MessageType::Attach),
    (6, MessageType::AttachRsp),
    (9, MessageType::Pause),
    (10, MessageType::PauseRsp),
    (12, MessageType::ResumeRsp),
    (13, MessageType::Close),
    (14, MessageType::CloseRsp),
    (15, MessageType::Detach),
    (17, MessageType::ListMinors),
    (19, MessageType::List),
    (21, MessageType::Stats),
    (23, MessageType::ForceShutdown),
    (25, MessageType::XenblkifConnectRsp),
    (27, MessageType::XenblkifDisconnectRsp),
    (28, MessageType::DiskInfo),
    (30, MessageType::Exit),
    (32, MessageType::CommitRsp),
    (33, MessageType::QueryCommitJob),
    (36, MessageType::CancelCommitJobRsp),
    (64, MessageType::BlockDevice),
];

#[test]
fn empty_body_types() {
    for (number, t) in EMPTY_TYPES {
        assert_eq!(body_kind(t), BodyKind::Empty, "{t}");
        let fixture = header(number, 0x1234);
        assert_wire(&Message::new(t, 0x1234, Body::Empty), &fixture);

        // Padding and union bytes are ignored for bodiless types.
        let mut noisy = fixture;
        for byte in &mut noisy[4..] {
            *byte = 0xA5;
        }
        assert_eq!(
            Message::decode(&noisy),
            Ok(Message::new(t, 0x1234, Body::Empty))
        );
    }
}

#[test]
fn list_and_stats_all_cookie() {
    let fixture = header(19, 0xFFFF);
    assert_wire(
        &Message::new(MessageType::List, COOKIE_ALL, Body::Empty),
        &fixture,
    );
    let fixture = header(21, 0xFFFF);
    assert_wire(
        &Message::new(MessageType::Stats, COOKIE_ALL, Body::Empty),
        &fixture,
    );
}

#[test]
fn error_fixture() {
    let mut fixture = header(1, 7);
    put(&mut fixture, 8, &19i32.to_le_bytes()); // ENODEV
    assert_wire(&Message::error(7, 19), &fixture);
}

#[test]
fn runtime_error_fixture() {
    let mut fixture = header(2, 3);
    put(&mut fixture, 8, &5i32.to_le_bytes());
    put(&mut fixture, 12, b"io failure");
    let message = Message::new(
        MessageType::RuntimeError,
        3,
        Body::Response {
            error: 5,
            message: "io failure".into(),
        },
    );
    assert_wire(&message, &fixture);
}

#[test]
fn detach_rsp_fixture() {
    let mut fixture = header(16, 2);
    put(&mut fixture, 8, &16i32.to_le_bytes()); // EBUSY
    let message = Message::new(
        MessageType::DetachRsp,
        2,
        Body::Response {
            error: 16,
            message: String::new(),
        },
    );
    assert_wire(&message, &fixture);
}

#[test]
fn pid_rsp_fixture() {
    let mut fixture = header(4, 0);
    put(&mut fixture, 8, &[0x39, 0x30, 0x00, 0x00]); // 12345
    assert_wire(
        &Message::new(MessageType::PidRsp, 0, Body::Pid(12345)),
        &fixture,
    );
}

fn params_fixture(type_number: u16) -> (Wire, Params) {
    let mut fixture = header(type_number, 5);
    put(&mut fixture, 8, &0x0000_0412u32.to_le_bytes()); // RDONLY | ADD_LOG | OPEN_ENCRYPTED
    put(&mut fixture, 12, &0x0000_0005u32.to_le_bytes());
    put(&mut fixture, 16, &0x0000_0021u32.to_le_bytes());
    put(&mut fixture, 20, b"vhd:/var/run/sr-mount/abc/disk.vhd");
    put(&mut fixture, 276, &[0xFF, 0xFF, 0xFF, 0xFF]);
    put(&mut fixture, 280, &[0x78, 0x00]); // 120 s
    put(&mut fixture, 282, b"nbd:/run/mirror.sock");
    let params = Params {
        flags: OpenFlags::RDONLY | OpenFlags::ADD_LOG | OpenFlags::OPEN_ENCRYPTED,
        devnum: 5,
        domid: 33,
        path: "vhd:/var/run/sr-mount/abc/disk.vhd".into(),
        prt_devnum: u32::MAX,
        req_timeout: 120,
        secondary: "nbd:/run/mirror.sock".into(),
    };
    (fixture, params)
}

#[test]
fn params_types_fixtures() {
    for (number, t) in [
        (7, MessageType::Open),
        (11, MessageType::Resume),
        (31, MessageType::Commit),
        (35, MessageType::CancelCommitJob),
    ] {
        let (fixture, params) = params_fixture(number);
        assert_wire(&Message::new(t, 5, Body::Params(params)), &fixture);
    }
}

#[test]
fn params_path_and_secondary_at_maximum_length() {
    let long_path = "p".repeat(255);
    let mut fixture = header(7, 1);
    put(&mut fixture, 20, long_path.as_bytes()); // NUL lands at 275, inside the field
    put(&mut fixture, 282, long_path.as_bytes()); // NUL at 537
    let message = Message::new(
        MessageType::Open,
        1,
        Body::Params(Params {
            path: long_path.clone(),
            secondary: long_path,
            ..Params::default()
        }),
    );
    assert_wire(&message, &fixture);
}

fn image_fixture(type_number: u16) -> Wire {
    let mut fixture = header(type_number, 9);
    put(
        &mut fixture,
        8,
        &[0x00, 0x00, 0x40, 0x06, 0x01, 0x00, 0x00, 0x00],
    ); // 0x1_0640_0000
    put(&mut fixture, 16, &[0x00, 0x02, 0x00, 0x00]); // 512
    put(&mut fixture, 20, &[0x05, 0x00, 0x00, 0x00]);
    fixture
}

#[test]
fn image_types_fixtures() {
    let image = ImageInfo {
        sectors: 0x1_0640_0000,
        sector_size: 512,
        info: 5,
    };
    assert_wire(
        &Message::new(MessageType::OpenRsp, 9, Body::Image(image)),
        &image_fixture(8),
    );
    assert_wire(
        &Message::new(MessageType::DiskInfoRsp, 9, Body::Image(image)),
        &image_fixture(29),
    );
}

#[test]
fn list_minors_rsp_fixture() {
    let mut fixture = header(18, 0);
    put(&mut fixture, 8, &3i32.to_le_bytes());
    put(&mut fixture, 12, &0i32.to_le_bytes());
    put(&mut fixture, 16, &4i32.to_le_bytes());
    put(&mut fixture, 20, &62i32.to_le_bytes());
    let message = Message::new(
        MessageType::ListMinorsRsp,
        0,
        Body::Minors(Minors {
            count: 3,
            list: vec![0, 4, 62],
        }),
    );
    assert_wire(&message, &fixture);

    // Slots beyond `count` are ignored on decode.
    let mut noisy = fixture;
    put(&mut noisy, 24, &[0xEE; 4]);
    assert_eq!(Message::decode(&noisy), Ok(message));

    // A full list: 63 entries ending at byte 8 + 4 + 63 * 4 = 264.
    let mut full = header(18, 0);
    put(&mut full, 8, &63i32.to_le_bytes());
    for index in 0..63usize {
        let minor = i32::try_from(index * 2).unwrap();
        put(&mut full, 12 + 4 * index, &minor.to_le_bytes());
    }
    let message = Message::new(
        MessageType::ListMinorsRsp,
        0,
        Body::Minors(Minors {
            count: 63,
            list: (0..63).map(|i| i * 2).collect(),
        }),
    );
    assert_wire(&message, &full);
}

#[test]
fn list_rsp_fixtures() {
    let mut fixture = header(20, 0xFFFF);
    put(&mut fixture, 8, &2i32.to_le_bytes());
    put(&mut fixture, 12, &4i32.to_le_bytes());
    put(&mut fixture, 16, &[0x02, 0x00, 0x00, 0x00]);
    put(&mut fixture, 20, b"aio:/dev/vg/lv");
    let message = Message::new(
        MessageType::ListRsp,
        COOKIE_ALL,
        Body::List(ListEntry {
            count: 2,
            minor: 4,
            state: 2,
            path: "aio:/dev/vg/lv".into(),
        }),
    );
    assert_wire(&message, &fixture);

    // The stream terminator: count 0, minor -1, empty path.
    let mut terminator = header(20, 0xFFFF);
    put(&mut terminator, 12, &[0xFF, 0xFF, 0xFF, 0xFF]);
    let message = Message::new(
        MessageType::ListRsp,
        COOKIE_ALL,
        Body::List(ListEntry {
            count: 0,
            minor: -1,
            state: 0,
            path: String::new(),
        }),
    );
    assert_wire(&message, &terminator);
}

#[test]
fn stats_rsp_fixture() {
    let mut fixture = header(22, 1);
    put(&mut fixture, 8, &[0x16, 0x00]); // info.type = STATS_RSP
    put(&mut fixture, 10, &[0x01, 0x00]);
    put(&mut fixture, 16, &[0x34, 0x12, 0x00, 0x00, 0, 0, 0, 0]);
    let message = Message::new(
        MessageType::StatsRsp,
        1,
        Body::Stat(StatInfo {
            msg_type: 22,
            cookie: 1,
            length: 0x1234,
        }),
    );
    assert_wire(&message, &fixture);
}

fn blkif_fixture(type_number: u16) -> (Wire, Blkif) {
    let mut fixture = header(type_number, 6);
    put(&mut fixture, 8, &7u32.to_le_bytes());
    put(&mut fixture, 12, &51712u32.to_le_bytes());
    for index in 0..8u32 {
        let offset = 16 + 4 * usize::try_from(index).unwrap();
        put(&mut fixture, offset, &(0x100 + index).to_le_bytes());
    }
    put(&mut fixture, 48, &2u32.to_le_bytes());
    put(&mut fixture, 52, &3u32.to_le_bytes());
    put(&mut fixture, 56, b"td-xenio-default");
    put(&mut fixture, 312, &[0x2A, 0x00, 0x00, 0x00]);
    put(&mut fixture, 316, &1000u32.to_le_bytes());
    put(&mut fixture, 320, &50u32.to_le_bytes());
    let blkif = Blkif {
        domid: 7,
        devid: 51712,
        gref: [0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x106, 0x107],
        order: 2,
        proto: 3,
        pool: "td-xenio-default".into(),
        port: 42,
        poll_duration: 1000,
        poll_idle_threshold: 50,
    };
    (fixture, blkif)
}

#[test]
fn blkif_types_fixtures() {
    for (number, t) in [
        (24, MessageType::XenblkifConnect),
        (26, MessageType::XenblkifDisconnect),
    ] {
        let (fixture, blkif) = blkif_fixture(number);
        assert_wire(&Message::new(t, 6, Body::Blkif(blkif)), &fixture);
    }
}

#[test]
fn query_commit_job_rsp_fixture() {
    let mut fixture = header(34, 8);
    put(&mut fixture, 8, &[0x00, 0x10, 0, 0, 0, 0, 0, 0]); // 4096
    put(&mut fixture, 16, &[0x00, 0x00, 0x10, 0, 0, 0, 0, 0]); // 1 MiB
    put(&mut fixture, 24, b"running");
    let message = Message::new(
        MessageType::QueryCommitJobRsp,
        8,
        Body::Query(Query {
            current_progress: 4096,
            total_progress: 1 << 20,
            status: "running".into(),
        }),
    );
    assert_wire(&message, &fixture);
}

#[test]
fn every_type_has_a_fixture_test() {
    let covered_elsewhere = [
        1, 2, 4, 7, 8, 11, 16, 18, 20, 22, 24, 26, 29, 31, 34, 35, 65, 66, 67,
    ];
    let mut all: Vec<u16> = EMPTY_TYPES.iter().map(|(n, _)| *n).collect();
    all.extend(covered_elsewhere);
    all.sort_unstable();
    assert_eq!(all, (1..=36).chain(64..=67).collect::<Vec<u16>>());
}

#[test]
fn block_device_rsp_carries_a_string() {
    // blktap-rs extension: type 65, the path in u.string.text at absolute offset 8.
    let mut fixture = header(65, 3);
    put(&mut fixture, 8, b"/dev/ublkb3");
    let message = Message::new(
        MessageType::BlockDeviceRsp,
        3,
        Body::Text("/dev/ublkb3".into()),
    );
    assert_wire(&message, &fixture);
    assert_eq!(body_kind(MessageType::BlockDeviceRsp), BodyKind::Text);
    let mut unterminated = header(65, 3);
    unterminated[8..8 + 256].fill(b'x');
    assert!(matches!(
        Message::decode(&unterminated),
        Err(DecodeError::UnterminatedString {
            field: "string.text",
            offset: 8
        })
    ));
}

#[test]
fn block_device_flags_are_outside_the_c_flags() {
    assert_eq!(OpenFlags::BLOCKDEV_MASK.bits() & OpenFlags::KNOWN.bits(), 0);
    assert_eq!(
        OpenFlags::BLOCKDEV_NONE | OpenFlags::BLOCKDEV_UBLK | OpenFlags::BLOCKDEV_FUSE,
        OpenFlags::BLOCKDEV_MASK
    );
}

#[test]
fn block_device_choice_bits_are_distinct_extensions() {
    let choice = [
        OpenFlags::BLOCKDEV_NONE,
        OpenFlags::BLOCKDEV_UBLK,
        OpenFlags::BLOCKDEV_FUSE,
        OpenFlags::BLOCKDEV_AUTO,
        OpenFlags::BLOCKDEV_CREATE_DEFAULT,
    ];
    let union = choice
        .iter()
        .fold(OpenFlags::empty(), |union, flag| union | *flag);
    assert_eq!(union, OpenFlags::BLOCKDEV_CHOICE);
    assert_eq!(union.bits().count_ones(), 5);
    for other in [
        OpenFlags::KNOWN,
        OpenFlags::BLOCKDEV_RECOVER,
        OpenFlags::OPEN_OPTIONS,
    ] {
        assert_eq!(union.bits() & other.bits(), 0);
    }
    assert_eq!(OpenFlags::BLOCKDEV_AUTO.bits(), 0x10_0000);
    assert_eq!(OpenFlags::BLOCKDEV_CREATE_DEFAULT.bits(), 0x20_0000);
    assert_eq!(OpenFlags::OPEN_OPTIONS.bits(), 0x40_0000);
}

#[test]
fn open_options_payload_round_trips() {
    let text = "ublk.queues = 4\nublk.user_copy = \"off\"";
    let payload = tapdisk_proto::encode_open_options(text).unwrap();
    assert_eq!(payload.len(), tapdisk_proto::OPEN_OPTIONS_PAYLOAD_LEN);
    assert_eq!(&payload[..text.len()], text.as_bytes());
    assert!(payload[text.len()..].iter().all(|b| *b == 0));
    assert_eq!(tapdisk_proto::decode_open_options(&payload).unwrap(), text);
    assert!(tapdisk_proto::encode_open_options(&"x".repeat(256)).is_err());
    assert!(tapdisk_proto::decode_open_options(&[b'x'; 256]).is_err());
    assert!(tapdisk_proto::decode_open_options(&payload[..255]).is_err());
}

#[test]
fn recover_flag_is_outside_the_c_flags_and_the_choice() {
    assert_eq!(OpenFlags::BLOCKDEV_RECOVER.bits(), 0x8_0000);
    assert_eq!(
        OpenFlags::BLOCKDEV_RECOVER.bits()
            & (OpenFlags::KNOWN.bits() | OpenFlags::BLOCKDEV_MASK.bits()),
        0
    );
}

#[test]
fn bytes_after_nul_are_ignored() {
    let (mut fixture, params) = params_fixture(7);
    put(&mut fixture, 200, b"garbage after the terminator");
    put(&mut fixture, 4, &[1, 2, 3, 4]); // header padding
    assert_eq!(
        Message::decode(&fixture),
        Ok(Message::new(MessageType::Open, 5, Body::Params(params)))
    );
}

#[test]
fn decode_rejects_bad_lengths() {
    let fixture = header(3, 0);
    assert_eq!(
        Message::decode(&fixture[..543]),
        Err(DecodeError::WrongLength {
            what: "control message",
            expected: 544,
            actual: 543
        })
    );
    assert!(Message::decode(&[]).is_err());
    let mut oversize = fixture.to_vec();
    oversize.push(0);
    let err = Message::decode(&oversize).unwrap_err();
    assert_eq!(
        err.to_string(),
        "control message is 545 bytes, expected exactly 544"
    );
    assert_eq!(err.errno(), 22);
}

#[test]
fn decode_rejects_unknown_types() {
    for number in [0u16, 37, 0x100, u16::MAX] {
        let err = Message::decode(&header(number, 0)).unwrap_err();
        assert_eq!(err, DecodeError::UnknownType { value: number });
        assert!(err.to_string().contains("offset 0"), "{err}");
    }
}

#[test]
fn decode_rejects_unterminated_strings() {
    let mut wire = header(7, 0);
    put(&mut wire, 20, &[b'x'; 256]);
    let err = Message::decode(&wire).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnterminatedString {
            field: "params.path",
            offset: 20
        }
    );
    assert_eq!(
        err.to_string(),
        "unterminated string in params.path at offset 20: no NUL within 256 bytes"
    );

    let mut wire = header(7, 0);
    put(&mut wire, 282, &[b'x'; 256]);
    assert_eq!(
        Message::decode(&wire),
        Err(DecodeError::UnterminatedString {
            field: "params.secondary",
            offset: 282
        })
    );

    for (number, field, offset) in [
        (1u16, "response.message", 12usize),
        (20, "list.path", 20),
        (24, "blkif.pool", 56),
        (34, "query.status", 24),
    ] {
        let mut wire = header(number, 0);
        // A valid blkif.proto; for the other types the string below overwrites it.
        put(&mut wire, 52, &1u32.to_le_bytes());
        put(&mut wire, offset, &[b'y'; 256]);
        assert_eq!(
            Message::decode(&wire),
            Err(DecodeError::UnterminatedString { field, offset }),
            "type {number}"
        );
    }
}

#[test]
fn decode_rejects_bad_utf8() {
    let mut wire = header(20, 0);
    put(&mut wire, 20, b"vhd:/a\xFFb");
    let err = Message::decode(&wire).unwrap_err();
    assert_eq!(
        err,
        DecodeError::InvalidUtf8 {
            field: "list.path",
            offset: 20,
            byte_offset: 26
        }
    );
    assert!(err.to_string().contains("list.path at offset 20"), "{err}");
}

#[test]
fn decode_rejects_impossible_values() {
    let cases: [(u16, usize, [u8; 4], &str, usize); 5] = [
        (20, 8, (-1i32).to_le_bytes(), "list.count", 8),
        (18, 8, (-1i32).to_le_bytes(), "minors.count", 8),
        (18, 8, 64i32.to_le_bytes(), "minors.count", 8),
        (1, 8, (-5i32).to_le_bytes(), "response.error", 8),
        (16, 8, (-16i32).to_le_bytes(), "response.error", 8),
    ];
    for (number, at, bytes, field, offset) in cases {
        let mut wire = header(number, 0);
        put(&mut wire, 52, &1u32.to_le_bytes()); // a valid blkif.proto by default
        put(&mut wire, at, &bytes);
        match Message::decode(&wire) {
            Err(DecodeError::OutOfRange {
                field: got_field,
                offset: got_offset,
                ..
            }) => {
                assert_eq!((got_field, got_offset), (field, offset), "type {number}");
            }
            other => panic!("type {number}: expected OutOfRange, got {other:?}"),
        }
    }

    // blkif.order and blkif.proto are the daemon's to judge (EINVAL for an order above 3,
    // EPROTONOSUPPORT for an unknown ABI, as the C tapdisk answers; DISCONNECT ignores them).
    for (at, value) in [(48, 4u32), (52, 0), (52, 4)] {
        let mut wire = header(24, 0);
        put(&mut wire, at, &value.to_le_bytes());
        assert!(
            Message::decode(&wire).is_ok(),
            "blkif field at {at} = {value}"
        );
    }

    let mut wire = header(22, 0);
    put(&mut wire, 16, &(64u64 * 1024 * 1024 + 1).to_le_bytes());
    let err = Message::decode(&wire).unwrap_err();
    assert_eq!(
        err.to_string(),
        "info.length at offset 16 is 67108865, allowed 0..=67108864 (64 MiB)"
    );
    put(&mut wire, 16, &(64u64 * 1024 * 1024).to_le_bytes());
    assert!(Message::decode(&wire).is_ok());
}

#[test]
fn encode_rejects_mismatched_body() {
    let err = Message::new(MessageType::Open, 0, Body::Empty)
        .encode()
        .unwrap_err();
    assert_eq!(
        err,
        EncodeError::BodyMismatch {
            msg_type: MessageType::Open,
            expected: BodyKind::Params,
            actual: BodyKind::Empty
        }
    );
    assert_eq!(err.to_string(), "OPEN carries a Params body, got Empty");
    assert!(Message::new(MessageType::Pause, 0, Body::Pid(1))
        .encode()
        .is_err());
}

#[test]
fn encode_rejects_strings_that_do_not_fit() {
    let params = Params {
        path: "p".repeat(256),
        ..Params::default()
    };
    let err = Message::new(MessageType::Open, 0, Body::Params(params))
        .encode()
        .unwrap_err();
    assert_eq!(
        err,
        EncodeError::StringTooLong {
            field: "params.path",
            offset: 20,
            len: 256,
            max: 255
        }
    );

    let params = Params {
        secondary: "a\0b".into(),
        ..Params::default()
    };
    let err = Message::new(MessageType::Resume, 0, Body::Params(params))
        .encode()
        .unwrap_err();
    assert_eq!(
        err,
        EncodeError::InteriorNul {
            field: "params.secondary",
            offset: 282,
            position: 1
        }
    );
}

#[test]
fn encode_rejects_bad_minors_and_ranges() {
    let too_many = Minors {
        count: 64,
        list: vec![0; 64],
    };
    assert_eq!(
        Message::new(MessageType::ListMinorsRsp, 0, Body::Minors(too_many)).encode(),
        Err(EncodeError::TooManyMinors { len: 64 })
    );
    let mismatch = Minors {
        count: 2,
        list: vec![1],
    };
    assert_eq!(
        Message::new(MessageType::ListMinorsRsp, 0, Body::Minors(mismatch)).encode(),
        Err(EncodeError::MinorsCountMismatch { count: 2, len: 1 })
    );
    assert!(Message::error(0, -22).encode().is_err());
    // blkif.order and blkif.proto are carried as they are: the daemon answers EINVAL or
    // EPROTONOSUPPORT, as the C tapdisk does.
    let blkif = Blkif {
        proto: 9,
        order: 9,
        ..Blkif::default()
    };
    let message = Message::new(MessageType::XenblkifConnect, 0, Body::Blkif(blkif));
    assert_eq!(
        Message::decode(&message.encode().unwrap()).unwrap(),
        message
    );
    let stat = StatInfo {
        length: u64::MAX,
        ..StatInfo::default()
    };
    assert!(Message::new(MessageType::StatsRsp, 0, Body::Stat(stat))
        .encode()
        .is_err());
}

#[test]
fn open_flags() {
    let mut flags = OpenFlags::default();
    assert!(flags.is_empty());
    flags.insert(OpenFlags::SHARED);
    flags |= OpenFlags::STANDBY;
    assert_eq!(flags.bits(), 0x101);
    assert!(flags.contains(OpenFlags::SHARED | OpenFlags::STANDBY));
    assert!(!flags.contains(OpenFlags::RDONLY));
    flags.remove(OpenFlags::SHARED);
    assert_eq!(flags, OpenFlags::STANDBY);
    let all = [
        (OpenFlags::SHARED, 0x001),
        (OpenFlags::RDONLY, 0x002),
        (OpenFlags::ADD_CACHE, 0x004),
        (OpenFlags::VHD_INDEX, 0x008),
        (OpenFlags::ADD_LOG, 0x010),
        (OpenFlags::ADD_LCACHE, 0x020),
        (OpenFlags::REUSE_PRT, 0x040),
        (OpenFlags::SECONDARY, 0x080),
        (OpenFlags::STANDBY, 0x100),
        (OpenFlags::NO_O_DIRECT, 0x200),
        (OpenFlags::OPEN_ENCRYPTED, 0x400),
    ];
    let union = all.iter().fold(OpenFlags::empty(), |acc, (flag, bits)| {
        assert_eq!(flag.bits(), *bits);
        acc | *flag
    });
    assert_eq!(union, OpenFlags::KNOWN);
    assert_eq!(OpenFlags(0x1801).unknown(), OpenFlags(0x1800));
}

#[test]
fn success_replies() {
    assert_eq!(
        MessageType::Open.success_reply(),
        Some(MessageType::OpenRsp)
    );
    assert_eq!(
        MessageType::ForceShutdown.success_reply(),
        Some(MessageType::CloseRsp)
    );
    assert_eq!(MessageType::OpenRsp.success_reply(), None);
    assert_eq!(MessageType::Exit.success_reply(), None);
}

#[test]
fn log_path_payload() {
    let payload = encode_log_path("/var/lib/cbt/disk.cbtlog").unwrap();
    let mut expected = [0u8; 256];
    expected[..24].copy_from_slice(b"/var/lib/cbt/disk.cbtlog");
    assert_eq!(payload, expected);
    assert_eq!(
        decode_log_path(&payload).unwrap(),
        "/var/lib/cbt/disk.cbtlog"
    );
    assert_eq!(
        decode_log_path(&payload[..255]),
        Err(DecodeError::WrongLength {
            what: "log path payload",
            expected: 256,
            actual: 255
        })
    );
    assert_eq!(
        decode_log_path(&[b'z'; 256]),
        Err(DecodeError::UnterminatedString {
            field: "log path",
            offset: 0
        })
    );
    assert!(encode_log_path(&"l".repeat(255)).is_ok());
    assert!(matches!(
        encode_log_path(&"l".repeat(256)),
        Err(EncodeError::StringTooLong {
            field: "log path",
            ..
        })
    ));
}

#[test]
fn key_payload() {
    assert_eq!(encode_key(&[0xAB, 0xCD]).unwrap(), vec![2, 0xAB, 0xCD]);
    let max = vec![7u8; 128];
    let payload = encode_key(&max).unwrap();
    assert_eq!(payload[0], 128);
    assert_eq!(&payload[1..], &max[..]);
    assert_eq!(encode_key(&[]), Err(EncodeError::KeyLength { len: 0 }));
    assert_eq!(
        encode_key(&[0; 129]),
        Err(EncodeError::KeyLength { len: 129 })
    );
    assert_eq!(decode_key_size(1), Ok(1));
    assert_eq!(decode_key_size(128), Ok(128));
    assert_eq!(decode_key_size(0), Err(DecodeError::KeySize { value: 0 }));
    assert_eq!(
        decode_key_size(129),
        Err(DecodeError::KeySize { value: 129 })
    );
    assert_eq!(decode_key_size(255).unwrap_err().errno(), 22);
}

#[test]
fn nbd_listen_carries_address_and_tls_directory() {
    // blktap-rs extension: type 66 request and 67 reply, the text in u.string.text at
    // absolute offset 8.
    let text = "127.0.0.1:10809 tls=/etc/blktap/pki";
    let mut fixture = header(66, 5);
    put(&mut fixture, 8, text.as_bytes());
    let message = Message::new(MessageType::NbdListen, 5, Body::Text(text.into()));
    assert_wire(&message, &fixture);
    let mut reply = header(67, 5);
    put(&mut reply, 8, b"127.0.0.1:10809");
    let message = Message::new(
        MessageType::NbdListenRsp,
        5,
        Body::Text("127.0.0.1:10809".into()),
    );
    assert_wire(&message, &reply);
    assert_eq!(body_kind(MessageType::NbdListen), BodyKind::Text);
    assert_eq!(
        MessageType::NbdListen.success_reply(),
        Some(MessageType::NbdListenRsp)
    );
}
