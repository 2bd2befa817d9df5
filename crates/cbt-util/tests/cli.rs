//! Drives the built `cbt-util` binary against log files whose bytes are spelled out from the
//! format facts (48-byte header: parent, child, consistent, padding, size; LSB-first bitmap of
//! 64 KiB blocks): every command, field and option SM uses, byte for byte, and the C tool's
//! messages and exit statuses for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cbt-util"))
        .args(args)
        .output()
        .expect("run cbt-util")
}

/// Runs `cbt-util`; returns (exit status, stdout, stderr).
fn status(args: &[&str]) -> (i32, Vec<u8>, String) {
    let out = run(args);
    (
        out.status.code().expect("exit status"),
        out.stdout,
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Runs `cbt-util` expecting success; returns stdout.
fn ok(args: &[&str]) -> Vec<u8> {
    let (code, out, err) = status(args);
    assert_eq!(code, 0, "cbt-util {args:?}: {err}");
    assert!(err.is_empty(), "cbt-util {args:?}: {err}");
    out
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}

const PARENT: &str = "00112233-4455-6677-8899-aabbccddeeff";
const PARENT_BYTES: [u8; 16] = [
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
];

/// A log of a 1 MiB + 1 byte disk (17 blocks: a 3-byte bitmap): parent [`PARENT`], child all
/// 0xee bytes, consistent 1, padding 0xdeadbeef, blocks 1, 8, 15 and 16 changed.
fn fixture() -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&PARENT_BYTES); // 0: parent
    bytes.extend_from_slice(&[0xee; 16]); // 16: child
    bytes.extend_from_slice(&[0x01, 0x00, 0x00, 0x00]); // 32: consistent = 1
    bytes.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]); // 36: padding
    bytes.extend_from_slice(&[0x01, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00]); // 40: size
    bytes.extend_from_slice(&[0x02, 0x81, 0x01]); // 48: bitmap
    bytes
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn create_writes_the_header_and_a_zero_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("x.cbtlog");
    // cbt.md's example: 64 GiB -> 1,048,576 blocks -> 131,072 bitmap bytes, 131,120 in all.
    assert!(ok(&["create", "-n", s(&log), "-s", "68719476736"]).is_empty());
    let bytes = std::fs::read(&log).unwrap();
    assert_eq!(bytes.len(), 131_120);
    let mut header = [0u8; 48];
    header[40..48].copy_from_slice(&68_719_476_736u64.to_le_bytes());
    assert_eq!(bytes[..48], header);
    assert!(bytes[48..].iter().all(|b| *b == 0));
    assert_eq!(text(ok(&["get", "-n", s(&log), "-s"])), "68719476736\n");
    assert_eq!(text(ok(&["get", "-n", s(&log), "-f"])), "0\n");
    assert_eq!(
        text(ok(&["get", "-n", s(&log), "-p"])),
        "00000000-0000-0000-0000-000000000000\n"
    );
    assert_eq!(
        text(ok(&["get", "-n", s(&log), "-c"])),
        "00000000-0000-0000-0000-000000000000\n"
    );
    // An existing file is overwritten (fopen "w+"), size as strtoull reads it.
    std::fs::write(&log, [0xffu8; 500]).unwrap();
    ok(&["create", "-n", s(&log), "-s", "65537junk"]);
    let mut expected = vec![0u8; 49];
    expected[40] = 0x01;
    expected[42] = 0x01;
    assert_eq!(std::fs::read(&log).unwrap(), expected);
}

#[test]
fn get_reads_every_field_of_a_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let log = write(dir.path(), "f.cbtlog", &fixture());
    assert_eq!(
        text(ok(&["get", "-n", s(&log), "-p"])),
        format!("{PARENT}\n")
    );
    assert_eq!(
        text(ok(&["get", "-n", s(&log), "-c"])),
        "eeeeeeee-eeee-eeee-eeee-eeeeeeeeeeee\n"
    );
    assert_eq!(text(ok(&["get", "-n", s(&log), "-f"])), "1\n");
    assert_eq!(text(ok(&["get", "-n", s(&log), "-s"])), "1048577\n");
    // The raw bitmap, no newline; options in any order, clustered or repeated.
    assert_eq!(ok(&["get", "-b", "-n", s(&log)]), [0x02, 0x81, 0x01]);
    assert_eq!(
        ok(&["get", "-bb", &format!("-n{}", s(&log))]),
        [0x02, 0x81, 0x01]
    );
    // A negative flag prints as a signed int.
    let mut negative = fixture();
    negative[32..36].copy_from_slice(&(-2i32).to_le_bytes());
    let log = write(dir.path(), "n.cbtlog", &negative);
    assert_eq!(text(ok(&["get", "-n", s(&log), "-f"])), "-2\n");
}

#[test]
fn set_changes_only_the_fields_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let log = write(dir.path(), "f.cbtlog", &fixture());
    let child = "0123abcd-0000-1111-2222-333344445555";
    ok(&["set", "-n", s(&log), "-c", child, "-f", "0"]);
    let mut expected = fixture();
    expected[16..32].copy_from_slice(&[
        0x01, 0x23, 0xab, 0xcd, 0x00, 0x00, 0x11, 0x11, 0x22, 0x22, 0x33, 0x33, 0x44, 0x44, 0x55,
        0x55,
    ]);
    expected[32] = 0;
    assert_eq!(std::fs::read(&log).unwrap(), expected);
    // SM clears a link with the zero UUID; a UUID that does not parse changes nothing.
    ok(&[
        "set",
        "-n",
        s(&log),
        "-p",
        "00000000-0000-0000-0000-000000000000",
    ]);
    expected[..16].fill(0);
    ok(&["set", "-n", s(&log), "-c", "not-a-uuid"]);
    assert_eq!(std::fs::read(&log).unwrap(), expected);
    // -f goes through atoi.
    ok(&["set", "-n", s(&log), "-f", "7x"]);
    expected[32] = 7;
    assert_eq!(std::fs::read(&log).unwrap(), expected);
}

#[test]
fn set_size_grows_the_bitmap_and_never_shrinks_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = write(dir.path(), "f.cbtlog", &fixture());
    // 2 MiB: 32 blocks, 4 bytes; the old bits stay, the new ones are clear.
    ok(&["set", "-n", s(&log), "-s", "2097152"]);
    let mut expected = fixture();
    expected[40..48].copy_from_slice(&2_097_152u64.to_le_bytes());
    expected.push(0x00);
    assert_eq!(std::fs::read(&log).unwrap(), expected);
    let (code, out, err) = status(&["set", "-n", s(&log), "-s", "1048576"]);
    assert_eq!(code, 22);
    assert!(out.is_empty());
    assert_eq!(err, "Size smaller than current file size (2097152)\n");
    assert_eq!(std::fs::read(&log).unwrap(), expected);
    // -s 0 counts as no field at all: a usage error.
    let (code, out, _) = status(&["set", "-n", s(&log), "-s", "0"]);
    assert_eq!(code, 22);
    assert!(text(out).starts_with("cbt-util set: "));
}

#[test]
fn coalesce_ors_the_parent_bitmap_into_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let parent = write(dir.path(), "p.cbtlog", &fixture());
    // A child of 2 MiB (4-byte bitmap) with blocks 0 and 31 changed, zero header links.
    let mut child_bytes = vec![0u8; 48];
    child_bytes[40..48].copy_from_slice(&2_097_152u64.to_le_bytes());
    child_bytes.extend_from_slice(&[0x01, 0x00, 0x00, 0x80]);
    let child = write(dir.path(), "c.cbtlog", &child_bytes);
    assert!(ok(&["coalesce", "-p", s(&parent), "-c", s(&child)]).is_empty());
    let mut expected = child_bytes.clone();
    expected[48..].copy_from_slice(&[0x03, 0x81, 0x01, 0x80]);
    assert_eq!(std::fs::read(&child).unwrap(), expected);
    assert_eq!(std::fs::read(&parent).unwrap(), fixture());
    // The other way round the parent's bitmap is longer: refused, no newline, as in C.
    let (code, _, err) = status(&["coalesce", "-p", s(&child), "-c", s(&parent)]);
    assert_eq!(code, 22);
    assert_eq!(err, "Parent bitmap larger than child bitmap,can't coalesce");
    assert_eq!(std::fs::read(&parent).unwrap(), fixture());
}

#[test]
fn extents_prints_the_changed_blocks_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let log = write(dir.path(), "f.cbtlog", &fixture());
    let k = 65536;
    let json = text(ok(&["extents", "-n", s(&log)]));
    let line = |offset: u64, length: u64, dirty: bool| {
        format!(
            "{{ \"offset\": {offset}, \"length\": {length}, \"type\": {}, \"description\": \"{}\" }}",
            u8::from(dirty),
            if dirty { "dirty" } else { "clean" }
        )
    };
    let expected = [
        line(0, k, false),
        line(k, k, true),
        line(2 * k, 6 * k, false),
        line(8 * k, k, true),
        line(9 * k, 6 * k, false),
        // Blocks 15 and 16; the disk ends 1 byte into block 16.
        line(15 * k, k + 1, true),
    ];
    assert_eq!(json, format!("[\n{}\n]\n", expected.join(",\n")));
}

#[test]
fn top_level_usage_and_odd_exit_statuses() {
    let usage = "usage: cbt-util COMMAND [OPTIONS]\nCOMMAND := { create | set | get | coalesce }\n";
    let (code, out, err) = status(&[]);
    assert_eq!((code, text(out), err.as_str()), (22, usage.to_owned(), ""));
    // An unknown command is reported, and exits 0.
    let (code, out, err) = status(&["frobnicate", "-n", "x"]);
    assert_eq!((code, text(out)), (0, usage.to_owned()));
    assert_eq!(err, "Invalid COMMAND frobnicate\n");
    let long = "g".repeat(25);
    assert_eq!(status(&[&long]).0, 0);
    // A command's -h prints its usage on stdout and exits EINVAL, as do usage errors.
    for args in [
        &["create", "-h"][..],
        &["get", "-h"],
        &["set", "-h"],
        &["coalesce", "-h"],
        &["extents", "-h"],
        &["create", "-n", "x"],
        &["create", "-s", "100"],
        &["create", "-n", "x", "-s", "abc"],
        &["get", "-n", "x"],
        &["get", "-n", "x", "-p", "-c"],
        &["set", "-n", "x"],
        &["coalesce", "-p", "x"],
        &["extents"],
    ] {
        let (code, out, _) = status(args);
        assert_eq!(code, 22, "{args:?}");
        let command = args[0];
        assert!(
            text(out).starts_with(&format!("cbt-util {command}: ")),
            "{args:?}"
        );
    }
    // getopt's complaint names the command, as argv[0] of the C command is its name.
    let (code, _, err) = status(&["get", "-x"]);
    assert_eq!(code, 22);
    assert_eq!(err, "get: invalid option -- 'x'\n");
    let (_, _, err) = status(&["create", "-n"]);
    assert_eq!(err, "create: option requires an argument -- 'n'\n");
}

#[test]
fn missing_and_truncated_files_fail_with_the_c_messages() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.cbtlog");
    for args in [
        vec!["get", "-n", s(&missing), "-f"],
        vec!["set", "-n", s(&missing), "-f", "1"],
        vec!["extents", "-n", s(&missing)],
    ] {
        let (code, _, err) = status(&args);
        assert_eq!(code, 2, "{args:?}");
        assert_eq!(
            err,
            format!(
                "Failed to open log file {}. No such file or directory\n",
                missing.display()
            )
        );
    }
    let short = write(dir.path(), "short.cbtlog", &fixture()[..40]);
    let (code, _, err) = status(&["get", "-n", s(&short), "-s"]);
    assert_eq!(code, 5);
    assert_eq!(
        err,
        format!(
            "Failed to read CBT metadata from file {}\n",
            short.display()
        )
    );
    // The header is there, the bitmap is not all there.
    let cut = write(dir.path(), "cut.cbtlog", &fixture()[..49]);
    assert_eq!(text(ok(&["get", "-n", s(&cut), "-s"])), "1048577\n");
    for args in [
        vec!["get", "-n", s(&cut), "-b"],
        vec!["extents", "-n", s(&cut)],
    ] {
        let (code, out, err) = status(&args);
        assert_eq!(code, 5, "{args:?}");
        assert!(out.is_empty());
        assert_eq!(
            err,
            format!("Failed to read bitmap from file {}\n", cut.display())
        );
    }
    // A header claiming an enormous disk is a short read, not a huge allocation.
    let mut huge = fixture();
    huge[40..48].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let huge = write(dir.path(), "huge.cbtlog", &huge);
    assert_eq!(status(&["get", "-n", s(&huge), "-b"]).0, 5);
    let (code, _, err) = status(&["coalesce", "-p", s(&cut), "-c", s(&huge)]);
    assert_eq!((code, err.as_str()), (5, "Failed to read bitmap\n"));
}
