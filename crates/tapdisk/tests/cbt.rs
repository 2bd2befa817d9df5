//! Changed-block tracking end to end, through the real `tap-ctl`, `tapdisk`, `cbt-util` and
//! `vhd-util`: the storage manager's command forms (`open -D -C` on attach, `unpause -a -c`
//! at snapshot time), bad logs refused with the file named, fio's random writes (with
//! verification) leaving exactly the written blocks marked, `kill -9` during writes never
//! losing the mark of an acknowledged write, and the header (the consistent flag, the links)
//! left as SM set it after a clean close and after a crash.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    fio_nbd_verify, process_alive, require, run_ok, sibling_bin, vhd_util_ok, wait_for, Env, Lcg,
};
use nbd::proto;
use tapdisk_proto::{Body, Message, MessageType, OpenFlags, Params, MESSAGE_SIZE};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = cbt::BLOCK_SIZE;
/// A parent link SM might write into a log.
const PARENT_UUID: &str = "6f1c2a3b-0d4e-4f50-8a61-b7c8d9e0f123";

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs `cbt-util ARGS`, asserting success; returns stdout.
fn cbt_util(args: &[&str]) -> String {
    run_ok(Command::new(sibling_bin("cbt-util")).args(args))
}

/// A new log for a disk of `size` bytes, as `cbt-util create` writes it.
fn new_log(path: &Path, size: u64) {
    std::fs::write(path, cbt::LogFile::new(size).unwrap().to_bytes()).unwrap();
}

/// A raw image of `len` zero bytes (sparse: quick to make).
fn zero_image(env: &Env, name: &str, len: u64) -> std::path::PathBuf {
    let path = env.dir.path().join(name);
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    path
}

/// The blocks marked in the log at `path`.
fn marked(path: &Path) -> BTreeSet<u64> {
    let log = cbt::LogFile::parse(&std::fs::read(path).unwrap()).unwrap();
    (0..log.bitmap.blocks())
        .filter(|block| log.bitmap.is_set(*block))
        .collect()
}

/// The 48 header bytes of the log at `path`.
fn header_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()[..cbt::HEADER_LEN].to_vec()
}

/// `qemu-io -c COMMAND` on the NBD export of `pid`/`minor`.
fn qemu_io(env: &Env, pid: u32, minor: u32, command: &str) {
    env.qemu_io(pid, minor, command);
}

#[test]
fn storage_manager_forms_track_writes_across_a_snapshot() {
    require("qemu-io");
    let env = Env::new();
    let dir = env.dir.path();
    let (leaf, snap_leaf) = (dir.join("vdi.vhd"), dir.join("vdi-2.vhd"));
    let (log, snap_log) = (dir.join("vdi.cbtlog"), dir.join("snap.cbtlog"));
    let size = (64 * MIB).to_string();
    vhd_util_ok(&["create", "-n", s(&leaf), "-s", "64"]);
    // Enable CBT on a detached VDI, then attach it: what SM's VDI.py runs.
    cbt_util(&["create", "-n", s(&log), "-s", &size]);
    cbt_util(&["set", "-n", s(&log), "-f", "1"]);
    assert_eq!(cbt_util(&["get", "-n", s(&log), "-f"]), "1\n");
    cbt_util(&["set", "-n", s(&log), "-f", "0"]);
    let vhd = |path: &Path| format!("vhd:{}", path.display());
    let (pid, minor) = env.sm_launch(&vhd(&leaf), &["-D", "-C", s(&log)]);
    let (p, m) = (pid.to_string(), minor.to_string());
    qemu_io(&env, pid, minor, "write -P 0x11 1M 4k");
    // tap-ctl stats shows the log first, as the C stack's "log" image (sectors: 4k = 8).
    let stats = env.tap_ctl_ok(&["stats", "-p", &p, "-m", &m]);
    let images = &stats[stats.find("\"images\": [ ").unwrap()..];
    assert!(
        images.starts_with(&format!(
            "\"images\": [ {{ \"name\": \"{}\", \"hits\": [ 0, 8 ], \"fail\": [ 0, 0 ], \
             \"driver\": {{ \"type\": 9, \"name\": \"log\", \"status\": null }} }}, \
             {{ \"name\": \"{}\"",
            log.display(),
            leaf.display()
        )),
        "{stats}"
    );

    // The snapshot, inside pause/unpause: the log moves to the snapshot, a new one starts.
    env.tap_ctl_ok(&["pause", "-p", &p, "-m", &m]);
    std::fs::rename(&log, &snap_log).unwrap();
    cbt_util(&["set", "-n", s(&snap_log), "-f", "1"]);
    vhd_util_ok(&["snapshot", "-n", s(&snap_leaf), "-p", s(&leaf)]);
    cbt_util(&["create", "-n", s(&log), "-s", &size]);
    cbt_util(&["set", "-n", s(&log), "-f", "0"]);
    cbt_util(&["set", "-n", s(&log), "-p", PARENT_UUID]);
    let header_at_unpause = header_bytes(&log);
    let snap_header = header_bytes(&snap_log);
    env.tap_ctl_ok(&[
        "unpause",
        "-p",
        &p,
        "-m",
        &m,
        "-a",
        &vhd(&snap_leaf),
        "-c",
        s(&log),
    ]);
    // 64 KiB + 512 at 3 MiB: blocks 48 and 49.
    qemu_io(&env, pid, minor, "write -P 0x22 3M 65k");
    assert_eq!(marked(&snap_log), BTreeSet::from([16]));
    assert_eq!(marked(&log), BTreeSet::from([48, 49]));
    // What SM reads: the raw bitmap, block 16 is bit 0 of byte 2.
    let bitmap = Command::new(sibling_bin("cbt-util"))
        .args(["get", "-n", s(&snap_log), "-b"])
        .output()
        .unwrap()
        .stdout;
    assert_eq!(bitmap.len(), 128);
    assert_eq!(bitmap[2], 0x01);
    assert!(bitmap.iter().enumerate().all(|(i, b)| i == 2 || *b == 0));

    // An unpause without -c stops tracking, as in the C stack.
    env.tap_ctl_ok(&["pause", "-p", &p, "-m", &m]);
    env.tap_ctl_ok(&["unpause", "-p", &p, "-m", &m]);
    qemu_io(&env, pid, minor, "write -P 0x33 5M 4k");
    assert_eq!(marked(&log), BTreeSet::from([48, 49]));
    let stats = env.tap_ctl_ok(&["stats", "-p", &p, "-m", &m]);
    assert!(!stats.contains("\"name\": \"log\""), "{stats}");

    env.tap_ctl_ok(&["close", "-p", &p, "-m", &m]);
    env.tap_ctl_ok(&["detach", "-p", &p, "-m", &m]);
    env.tap_ctl_ok(&["free", "-m", &m]);
    // The header is the storage manager's, as in the C stack: after a clean close the
    // consistent flag is still the 0 SM set before the unpause (SM sets 1 after the
    // detach), the links and size are as SM left them, and the log tapdisk left at the
    // snapshot kept the header SM gave it.
    assert_eq!(header_bytes(&log), header_at_unpause);
    assert_eq!(header_bytes(&snap_log), snap_header);
    assert_eq!(cbt_util(&["get", "-n", s(&log), "-f"]), "0\n");
    assert_eq!(
        cbt_util(&["get", "-n", s(&log), "-p"]),
        format!("{PARENT_UUID}\n")
    );
    cbt_util(&["set", "-n", s(&log), "-f", "1"]);
    assert_eq!(cbt_util(&["get", "-n", s(&log), "-f"]), "1\n");
    assert_eq!(cbt_util(&["get", "-n", s(&log), "-s"]), format!("{size}\n"));
}

#[test]
fn bad_logs_are_refused_naming_the_file() {
    let env = Env::new();
    let image = env.raw_image("disk.img", usize::try_from(4 * MIB).unwrap(), 1);
    let log = env.dir.path().join("disk.cbtlog");
    let params = format!("aio:{}", image.display());
    let create =
        |log: &Path, errno: i32| env.tap_ctl_err(&["create", "-a", &params, "-C", s(log)], errno);
    // Missing: the open's errno, the file named.
    let missing = env.dir.path().join("missing.cbtlog");
    let err = create(&missing, libc::ENOENT);
    assert!(err.contains(s(&missing)), "{err}");
    // A FIFO is refused at once, never waited on.
    let fifo = env.dir.path().join("fifo.cbtlog");
    run_ok(Command::new("mkfifo").arg(&fifo));
    let err = create(&fifo, libc::EINVAL);
    assert!(
        err.contains(&format!("{}: a FIFO, not a regular file", fifo.display())),
        "{err}"
    );
    // Truncated header, truncated bitmap, another disk's log: EINVAL, the file named.
    std::fs::write(&log, [0u8; 30]).unwrap();
    let err = create(&log, libc::EINVAL);
    assert!(
        err.contains(s(&log)) && err.contains("shorter than the 48-byte CBT log header"),
        "{err}"
    );
    std::fs::write(&log, cbt::LogHeader::new(4 * MIB).encode()).unwrap();
    let err = create(&log, libc::EINVAL);
    assert!(err.contains("needs 56"), "{err}");
    new_log(&log, 8 * MIB);
    let err = create(&log, libc::EINVAL);
    assert!(
        err.contains("it tracks a disk of 8388608 bytes, this disk has 4194304"),
        "{err}"
    );
    // Nothing was left running by the failed creates.
    assert!(env.list().is_empty(), "{:?}", env.list());

    // A good log; then an unpause onto a bad one fails and leaves the VBD paused.
    new_log(&log, 4 * MIB);
    let (pid, minor) = env.create(&image, &["-C", s(&log)]);
    let (p, m) = (pid.to_string(), minor.to_string());
    env.tap_ctl_ok(&["pause", "-p", &p, "-m", &m]);
    let err = env.tap_ctl_err(
        &["unpause", "-p", &p, "-m", &m, "-c", s(&missing)],
        libc::ENOENT,
    );
    assert!(err.contains(s(&missing)), "{err}");
    let state = env.list()[0].state.unwrap();
    assert_ne!(state & 0x20, 0, "still paused: {state:#x}");
    env.tap_ctl_ok(&["unpause", "-p", &p, "-m", &m, "-c", s(&log)]);
    assert_eq!(env.list()[0].state, Some(0));
    env.destroy(pid, minor);
}

/// The 64 KiB blocks in which `before` and `after` differ.
fn changed_blocks(before: &[u8], after: &[u8]) -> BTreeSet<u64> {
    let block = usize::try_from(BLOCK).unwrap();
    before
        .chunks(block)
        .zip(after.chunks(block))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(index, _)| index as u64)
        .collect()
}

#[test]
fn fio_random_writes_leave_exactly_the_written_blocks_marked() {
    require("fio");
    let env = Env::new();
    let image = zero_image(&env, "disk.img", 64 * MIB);
    let before = std::fs::read(&image).unwrap();
    let log = env.dir.path().join("disk.cbtlog");
    new_log(&log, 64 * MIB);
    let (pid, minor) = env.create(&image, &["-C", s(&log)]);
    // 600 random 4 KiB writes in the middle 32 MiB (512 blocks, about two thirds of them
    // written), 16 in flight, read back and checked.
    fio_nbd_verify(
        env.dir.path(),
        &env.nbd_uri(pid, minor),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--offset=16M",
            "--size=32M",
            "--number_ios=600",
        ],
    );
    env.destroy(pid, minor);
    let changed = changed_blocks(&before, &std::fs::read(&image).unwrap());
    assert!(
        changed.len() > 200 && changed.len() < 500,
        "{}",
        changed.len()
    );
    assert!(changed.iter().all(|b| (256..768).contains(b)));
    assert_eq!(marked(&log), changed);
}

/// A write's byte offset and length.
type Write4k = (u64, u64);

/// Writes random 4 KiB blocks (some straddling two 64 KiB blocks) to the old-style socket
/// with up to 16 in flight until the connection dies; returns the (offset, length) of every
/// write issued and of every write acknowledged.
fn write_until_killed(socket: &Path, disk: u64, seed: u64) -> (Vec<Write4k>, Vec<Write4k>) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // Old-style greeting: magic, old-style magic, size, flags, 124 zeros.
    let mut greeting = [0u8; 152];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(greeting[16..24], disk.to_be_bytes());
    let mut random = Lcg(seed);
    let mut issued = Vec::new();
    let mut acknowledged = Vec::new();
    let data = vec![0x5au8; 4096];
    let mut in_flight = 0;
    loop {
        while in_flight < 16 {
            let offset = random.next(disk / 4096 - 1) * 4096 + random.next(2) * 2048;
            let header = proto::RequestHeader {
                flags: 0,
                command: proto::CMD_WRITE,
                cookie: issued.len() as u64,
                offset,
                length: 4096,
            };
            let mut request = header.encode().to_vec();
            request.extend_from_slice(&data);
            if stream.write_all(&request).is_err() {
                return (issued, acknowledged);
            }
            issued.push((offset, 4096));
            in_flight += 1;
        }
        let mut reply = [0u8; proto::SIMPLE_REPLY_LEN];
        if stream.read_exact(&mut reply).is_err() {
            return (issued, acknowledged);
        }
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(reply[8..16].try_into().unwrap());
        assert_eq!(error, 0);
        acknowledged.push(issued[usize::try_from(cookie).unwrap()]);
        in_flight -= 1;
    }
}

#[test]
fn kill_9_during_writes_never_loses_the_mark_of_an_acknowledged_write() {
    let env = Env::new();
    let disk = 64 * MIB;
    for round in 0..5u64 {
        let image = zero_image(&env, &format!("disk{round}.img"), disk);
        let log = env.dir.path().join(format!("disk{round}.cbtlog"));
        new_log(&log, disk);
        let header_at_open = header_bytes(&log);
        let (pid, minor) = env.create(&image, &["-C", s(&log)]);
        let socket = env.ctl_dir.join(format!("nbd-old{pid}.{minor}"));
        let writer = std::thread::spawn(move || write_until_killed(&socket, disk, round + 1));
        // Let some writes be acknowledged, a different number each round.
        std::thread::sleep(Duration::from_millis(150 + 70 * round));
        run_ok(Command::new("kill").args(["-9", &pid.to_string()]));
        let (issued, acknowledged) = writer.join().unwrap();
        assert!(wait_for(Duration::from_secs(5), || !process_alive(pid)));
        assert!(
            !acknowledged.is_empty(),
            "round {round}: nothing was acknowledged"
        );
        let blocks_of = |writes: &[Write4k]| -> BTreeSet<u64> {
            writes
                .iter()
                .flat_map(|(offset, len)| cbt::blocks_of(*offset, *len))
                .collect()
        };
        let marks = marked(&log);
        let missing: Vec<_> = blocks_of(&acknowledged)
            .difference(&marks)
            .copied()
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged but not marked: {missing:?}"
        );
        // Extra marks only ever come from writes that were issued.
        assert!(marks.is_subset(&blocks_of(&issued)), "round {round}");
        // A crash leaves the header as SM set it before the open: consistent 0, so SM's next
        // attach finds the log inconsistent (and resets CBT), as with the C stack.
        assert_eq!(header_bytes(&log), header_at_open, "round {round}");
        assert_eq!(cbt_util(&["get", "-n", s(&log), "-f"]), "0\n");
        // What the dead tapdisk left: its control socket and its minor.
        let _ = std::fs::remove_file(env.ctl_dir.join(format!("ctl{pid}")));
        let _ = env.tap_ctl(&["free", "-m", &minor.to_string()]);
    }
}

/// Sends `bytes` to tapdisk `pid`'s control socket, keeping the connection open, and reads
/// the one reply: (type, errno of an ERROR).
fn control_exchange(env: &Env, pid: u32, bytes: &[u8]) -> (MessageType, i32) {
    let mut stream = UnixStream::connect(env.ctl_dir.join(format!("ctl{pid}"))).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut reply = [0u8; MESSAGE_SIZE];
    stream.read_exact(&mut reply).unwrap();
    let reply = Message::decode(&reply).unwrap();
    match reply.body {
        Body::Response { error, .. } => (reply.msg_type, error),
        _ => (reply.msg_type, 0),
    }
}

#[test]
fn the_log_path_comes_first_after_the_message_and_waits_no_longer_than_any_read() {
    let env = Env::new();
    let image = zero_image(&env, "disk.img", 4 * MIB);
    let log = env.dir.path().join("disk.cbtlog");
    new_log(&log, 4 * MIB);
    let params = format!("aio:{}", image.display());
    // tap-ctl sends both trailers, the log path first, then the open options: both are read
    // (a bad option fails the open, a good one opens with the log).
    let err = env.tap_ctl_err(
        &[
            "create",
            "-a",
            &params,
            "-C",
            s(&log),
            "-o",
            "ublk.queues=0",
        ],
        libc::EINVAL,
    );
    assert!(err.contains("ublk.queues"), "{err}");
    let (pid, minor) = env.create(&image, &["-C", s(&log), "-o", "ublk.queues=4"]);
    let (p, m) = (pid.to_string(), minor.to_string());
    let stats = env.tap_ctl_ok(&["stats", "-p", &p, "-m", &m]);
    assert!(stats.contains("\"name\": \"log\""), "{stats}");
    env.tap_ctl_ok(&["close", "-p", &p, "-m", &m]);

    let open = |flags: OpenFlags| {
        Message::new(
            MessageType::Open,
            u16::try_from(minor).unwrap(),
            Body::Params(Params {
                flags: flags | OpenFlags::BLOCKDEV_NONE,
                devnum: minor,
                path: params.clone(),
                ..Params::default()
            }),
        )
        .encode()
        .unwrap()
        .to_vec()
    };
    let log_payload = tapdisk_proto::encode_log_path(s(&log)).unwrap();
    let options_payload = tapdisk_proto::encode_open_options("ublk.queues = 4").unwrap();
    // The trailers the other way round are refused.
    let mut swapped = open(OpenFlags::ADD_LOG | OpenFlags::OPEN_OPTIONS);
    swapped.extend_from_slice(&options_payload);
    swapped.extend_from_slice(&log_payload);
    assert_eq!(
        control_exchange(&env, pid, &swapped),
        (MessageType::Error, libc::EINVAL)
    );
    // A log path cut short and never finished: answered EINVAL after the control socket's
    // receive deadline, like any other incomplete request.
    let mut cut = open(OpenFlags::ADD_LOG);
    cut.extend_from_slice(&log_payload[..100]);
    let started = std::time::Instant::now();
    assert_eq!(
        control_exchange(&env, pid, &cut),
        (MessageType::Error, libc::EINVAL)
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    // The VBD is still closed and opens fine with the C order: message, log path.
    let mut good = open(OpenFlags::ADD_LOG);
    good.extend_from_slice(&log_payload);
    assert_eq!(control_exchange(&env, pid, &good).0, MessageType::OpenRsp);
    env.destroy(pid, minor);
}

/// Reads `n` bytes.
fn take(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    stream.read_exact(&mut bytes).unwrap();
    bytes
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().unwrap())
}

/// Sends option `option` with `data` and collects its replies up to the ACK: (type, data).
fn negotiate_option(stream: &mut UnixStream, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let header = proto::OptionHeader {
        option,
        length: u32::try_from(data.len()).unwrap(),
    };
    stream.write_all(&header.encode()).unwrap();
    stream.write_all(data).unwrap();
    let mut replies = Vec::new();
    loop {
        let head = take(stream, 20);
        let kind = be32(&head[12..16]);
        let data = take(stream, usize::try_from(be32(&head[16..20])).unwrap());
        if kind == proto::REP_ACK {
            return replies;
        }
        replies.push((kind, data));
    }
}

/// The runs of a map as `nbdinfo --map --json` (and `cbt-util extents`) print it:
/// (offset, length, type, description).
fn json_map(text: &str) -> Vec<(u64, u64, u64, String)> {
    let map: serde_json::Value = serde_json::from_str(text).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .map(|extent| {
            (
                extent["offset"].as_u64().unwrap(),
                extent["length"].as_u64().unwrap(),
                extent["type"].as_u64().unwrap(),
                extent["description"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

#[test]
fn the_running_disk_serves_its_changed_blocks_as_a_dirty_bitmap_context() {
    require("nbdinfo");
    require("qemu-io");
    let env = Env::new();
    let disk = 8 * MIB;
    let image = zero_image(&env, "disk.img", disk);
    let log = env.dir.path().join("disk.cbtlog");
    new_log(&log, disk);
    let (pid, minor) = env.create(&image, &["-C", s(&log)]);
    let uri = env.nbd_uri(pid, minor);
    // Blocks 16, 48 and 49, and 127 (the last) by a discard.
    qemu_io(&env, pid, minor, "write -P 0x11 1M 4k");
    qemu_io(&env, pid, minor, "write -P 0x22 3M 65k");
    qemu_io(&env, pid, minor, "discard 8128k 64k");
    let run = |offset: u64, length: u64, dirty: bool| {
        let (kind, description) = if dirty { (1, "dirty") } else { (0, "clean") };
        (offset, length, kind, description.to_owned())
    };
    let expected = vec![
        run(0, 16 * BLOCK, false),
        run(16 * BLOCK, BLOCK, true),
        run(17 * BLOCK, 31 * BLOCK, false),
        run(48 * BLOCK, 2 * BLOCK, true),
        run(50 * BLOCK, 77 * BLOCK, false),
        run(127 * BLOCK, BLOCK, true),
    ];
    let map = run_ok(Command::new("nbdinfo").args(["--map=qemu:dirty-bitmap:cbt", "--json", &uri]));
    assert_eq!(json_map(&map), expected);
    let contexts = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
    assert!(contexts.contains("\"qemu:dirty-bitmap:cbt\""), "{contexts}");
    // The same from the closed log, with cbt-util.
    let (p, m) = (pid.to_string(), minor.to_string());
    env.tap_ctl_ok(&["pause", "-p", &p, "-m", &m]);
    let closed = json_map(&cbt_util(&["extents", "-n", s(&log)]));
    assert_eq!(closed, expected);
    env.tap_ctl_ok(&["unpause", "-p", &p, "-m", &m, "-c", s(&log)]);

    // Both contexts in one request: a chunk for each, ids 1 and 2, DONE on the last.
    let mut stream = UnixStream::connect(env.nbd_socket(pid, minor)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    take(&mut stream, 18);
    let flags = proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES;
    stream.write_all(&flags.to_be_bytes()).unwrap();
    assert!(negotiate_option(&mut stream, proto::OPT_STRUCTURED_REPLY, &[]).is_empty());
    let mut query = 0u32.to_be_bytes().to_vec();
    query.extend_from_slice(&2u32.to_be_bytes());
    for name in [proto::BASE_ALLOCATION, "qemu:dirty-bitmap:cbt"] {
        query.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
        query.extend_from_slice(name.as_bytes());
    }
    let selected = negotiate_option(&mut stream, proto::OPT_SET_META_CONTEXT, &query);
    let ids: Vec<(u32, u32, Vec<u8>)> = selected
        .into_iter()
        .map(|(kind, data)| (kind, be32(&data), data[4..].to_vec()))
        .collect();
    assert_eq!(
        ids,
        [
            (proto::REP_META_CONTEXT, 1, b"base:allocation".to_vec()),
            (
                proto::REP_META_CONTEXT,
                2,
                b"qemu:dirty-bitmap:cbt".to_vec()
            ),
        ]
    );
    let mut go = 0u32.to_be_bytes().to_vec();
    go.extend_from_slice(&0u16.to_be_bytes());
    negotiate_option(&mut stream, proto::OPT_GO, &go);
    let request = proto::RequestHeader {
        flags: 0,
        command: proto::CMD_BLOCK_STATUS,
        cookie: 9,
        offset: 0,
        length: u32::try_from(4 * MIB).unwrap(),
    };
    stream.write_all(&request.encode()).unwrap();
    let mut chunks = Vec::new();
    loop {
        let head = take(&mut stream, 20);
        let flags = u16::from_be_bytes([head[4], head[5]]);
        let kind = u16::from_be_bytes([head[6], head[7]]);
        let payload = take(&mut stream, usize::try_from(be32(&head[16..20])).unwrap());
        assert_eq!(kind, proto::REPLY_TYPE_BLOCK_STATUS);
        let descriptors: Vec<(u32, u32)> = payload[4..]
            .chunks(8)
            .map(|d| (be32(&d[..4]), be32(&d[4..])))
            .collect();
        chunks.push((flags, be32(&payload), descriptors));
        if flags & proto::REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    let k = u32::try_from(BLOCK).unwrap();
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    assert_eq!((chunks[0].0, chunks[0].1), (0, 1));
    assert_eq!(
        chunks[1],
        (
            proto::REPLY_FLAG_DONE,
            2,
            vec![(16 * k, 0), (k, 1), (31 * k, 0), (2 * k, 1), (14 * k, 0)]
        )
    );

    // Tracking stopped (an unpause without -c): the connection that selected the context
    // gets EINVAL for it; new connections are not offered it, and asking for it anyway
    // selects nothing.
    env.tap_ctl_ok(&["pause", "-p", &p, "-m", &m]);
    env.tap_ctl_ok(&["unpause", "-p", &p, "-m", &m]);
    let request = proto::RequestHeader {
        cookie: 10,
        ..request
    };
    stream.write_all(&request.encode()).unwrap();
    let head = take(&mut stream, 20);
    let payload = take(&mut stream, usize::try_from(be32(&head[16..20])).unwrap());
    assert_eq!(
        u16::from_be_bytes([head[6], head[7]]),
        proto::REPLY_TYPE_ERROR
    );
    assert_ne!(
        u16::from_be_bytes([head[4], head[5]]) & proto::REPLY_FLAG_DONE,
        0
    );
    assert_eq!(be32(&payload), proto::EINVAL);
    drop(stream);
    let out = Command::new("nbdinfo")
        .args(["--map=qemu:dirty-bitmap:cbt", &uri])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let contexts = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
    assert!(!contexts.contains("qemu:dirty-bitmap:cbt"), "{contexts}");
    env.destroy(pid, minor);
}
