//! Interoperability tests with real NBD clients (nbdinfo, qemu-img, qemu-io, nbdcopy, fio)
//! against an in-memory export. Each test skips with a message if its tool is absent.

mod common;

use std::sync::Arc;

use common::{have_tool, run_in, Harness, MemExport};
use nbd::ServerConfig;

fn config() -> ServerConfig {
    ServerConfig {
        export_name: "testdisk".into(),
        ..ServerConfig::default()
    }
}

#[test]
fn nbdinfo_reports_size_flags_and_list() {
    if !have_tool("nbdinfo") {
        return;
    }
    let export = Arc::new(MemExport::new(16 << 20));
    let harness = Harness::start(export, config());
    let uri = harness.uri();

    let (ok, out, err) = run_in(harness.dir.path(), "nbdinfo", &["--size", &uri]);
    assert!(ok, "nbdinfo --size failed: {err}");
    assert_eq!(out.trim(), (16u64 << 20).to_string());

    let (ok, _, err) = run_in(harness.dir.path(), "nbdinfo", &["--can", "flush", &uri]);
    assert!(ok, "nbdinfo --can flush said no: {err}");
    let (ok, _, _) = run_in(harness.dir.path(), "nbdinfo", &["--is", "read-only", &uri]);
    assert!(!ok, "export must not be read-only");

    let (ok, out, err) = run_in(harness.dir.path(), "nbdinfo", &["--list", &uri]);
    assert!(ok, "nbdinfo --list failed: {err}");
    assert!(
        out.contains("testdisk"),
        "list output lacks the export name: {out}"
    );

    let (ok, out, err) = run_in(harness.dir.path(), "nbdinfo", &["--json", &uri]);
    assert!(ok, "nbdinfo --json failed: {err}");
    for needle in [
        "\"can_flush\": true",
        "\"can_fua\": true",
        "\"can_trim\": true",
        "\"can_zero\": true",
        "\"can_fast_zero\": true",
        "\"can_cache\": true",
        "\"can_multi_conn\": true",
        "\"is_read_only\": false",
        "\"block_size_preferred\": 4096",
        "in-memory test disk",
    ] {
        assert!(out.contains(needle), "nbdinfo --json lacks {needle}: {out}");
    }
    harness.stop();
}

#[test]
fn nbdinfo_read_only_export() {
    if !have_tool("nbdinfo") {
        return;
    }
    let export = Arc::new(MemExport::new(1 << 20).with_info(|info| {
        info.read_only = true;
        info.can_flush = false;
    }));
    let harness = Harness::start(export, config());
    let uri = harness.uri();
    let (ok, _, err) = run_in(harness.dir.path(), "nbdinfo", &["--is", "read-only", &uri]);
    assert!(ok, "export must be read-only: {err}");
    let (ok, _, _) = run_in(harness.dir.path(), "nbdinfo", &["--can", "flush", &uri]);
    assert!(!ok, "flush must not be offered");
    let (ok, _, _) = run_in(harness.dir.path(), "nbdinfo", &["--can", "trim", &uri]);
    assert!(!ok, "trim must not be offered on a read-only export");
    harness.stop();
}

/// A deterministic, non-trivial pattern with some all-zero regions (to exercise holes).
fn pattern(size: usize) -> Vec<u8> {
    let mut data = vec![0u8; size];
    let mut state: u32 = 0x1234_5678;
    for (index, chunk) in data.chunks_mut(64 * 1024).enumerate() {
        if index % 3 == 1 {
            continue; // leave every third 64 KiB block zero
        }
        for byte in chunk.iter_mut() {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            *byte = state.to_le_bytes()[0];
        }
    }
    data
}

#[test]
fn qemu_img_convert_and_compare() {
    if !have_tool("qemu-img") {
        return;
    }
    let size = 8 << 20;
    let export = Arc::new(MemExport::new(size));
    let harness = Harness::start(Arc::clone(&export), config());
    let uri = harness.uri();
    let source = harness.dir.path().join("source.raw");
    let expected = pattern(size);
    std::fs::write(&source, &expected).unwrap();
    let source = common::path_str(&source).to_owned();

    // Upload into the export, then compare both ways.
    let (ok, _, err) = run_in(
        harness.dir.path(),
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &source, &uri],
    );
    assert!(ok, "qemu-img convert upload failed: {err}");
    assert!(
        export.snapshot() == expected,
        "export content differs after upload"
    );

    let (ok, out, err) = run_in(
        harness.dir.path(),
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &source, &uri],
    );
    assert!(ok, "qemu-img compare failed: {out} {err}");

    // Download back to a file.
    let copy = harness.dir.path().join("copy.raw");
    let copy_str = common::path_str(&copy).to_owned();
    let (ok, _, err) = run_in(
        harness.dir.path(),
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &copy_str],
    );
    assert!(ok, "qemu-img convert download failed: {err}");
    assert!(
        std::fs::read(&copy).unwrap() == expected,
        "downloaded copy differs"
    );

    // A change in the export is noticed by compare.
    export.data.lock().unwrap()[12345] ^= 0xff;
    let (ok, _, _) = run_in(
        harness.dir.path(),
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &source, &uri],
    );
    assert!(!ok, "qemu-img compare must notice a changed byte");
    harness.stop();
}

#[test]
fn qemu_io_pattern_write_read_zero_discard() {
    if !have_tool("qemu-io") {
        return;
    }
    let export = Arc::new(MemExport::new(4 << 20));
    let harness = Harness::start(Arc::clone(&export), config());
    let uri = harness.uri();
    let (ok, out, err) = run_in(
        harness.dir.path(),
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -f -P 0xcd 1m 128k",
            "-c",
            "read -P 0xcd 1m 128k",
            "-c",
            "write -z 1m 64k",
            "-c",
            "read -P 0 1m 64k",
            "-c",
            "read -P 0xcd 1088k 64k",
            "-c",
            "discard 0 64k",
            "-c",
            "flush",
        ],
    );
    assert!(ok, "qemu-io failed: {out} {err}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    let data = export.snapshot();
    assert!(
        data[..64 * 1024].iter().all(|&b| b == 0),
        "discard must zero the memory disk"
    );
    assert!(data[(1 << 20)..(1 << 20) + 65536].iter().all(|&b| b == 0));
    assert!(data[(1 << 20) + 65536..(1 << 20) + 131072]
        .iter()
        .all(|&b| b == 0xcd));
    assert!(export.flushes.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    harness.stop();
}

#[test]
fn nbdinfo_map_shows_holes_and_data() {
    if !have_tool("nbdinfo") {
        return;
    }
    let size = 1 << 20;
    let export = Arc::new(MemExport::new(size));
    export.data.lock().unwrap()[..65536].fill(7);
    let harness = Harness::start(export, config());
    let (ok, out, err) = run_in(harness.dir.path(), "nbdinfo", &["--map", &harness.uri()]);
    assert!(ok, "nbdinfo --map failed: {err}");
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 2, "expected data then hole: {out}");
    assert_eq!(&lines[0][..3], &["0", "65536", "0"], "{out}");
    assert_eq!(
        &lines[1][..3],
        &["65536", &(size - 65536).to_string(), "3"],
        "{out}"
    );
    harness.stop();
}

#[test]
fn nbdcopy_round_trip() {
    if !have_tool("nbdcopy") {
        return;
    }
    let size = 8 << 20;
    let export = Arc::new(MemExport::new(size));
    let harness = Harness::start(Arc::clone(&export), config());
    let uri = harness.uri();
    let source = harness.dir.path().join("in.raw");
    let expected = pattern(size);
    std::fs::write(&source, &expected).unwrap();
    let (ok, _, err) = run_in(
        harness.dir.path(),
        "nbdcopy",
        &[common::path_str(&source), &uri],
    );
    assert!(ok, "nbdcopy upload failed: {err}");
    assert!(
        export.snapshot() == expected,
        "export differs after nbdcopy upload"
    );
    let target = harness.dir.path().join("out.raw");
    let (ok, _, err) = run_in(
        harness.dir.path(),
        "nbdcopy",
        &[&uri, common::path_str(&target)],
    );
    assert!(ok, "nbdcopy download failed: {err}");
    assert!(
        std::fs::read(&target).unwrap() == expected,
        "nbdcopy download differs"
    );
    harness.stop();
}

#[test]
fn fio_randrw_verify() {
    if !have_tool("fio") {
        return;
    }
    let export = Arc::new(MemExport::new(16 << 20));
    let harness = Harness::start(export, config());
    let uri = harness.uri();
    let (ok, out, err) = run_in(
        harness.dir.path(),
        "fio",
        &[
            "--name=nbdtest",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=32",
            "--size=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=normal",
        ],
    );
    assert!(ok, "fio failed: {out} {err}");
    eprintln!("{out}");
    assert!(out.contains("err= 0"), "fio reported errors: {out}");
    assert!(!out.contains("verify:"), "fio verify problem: {out}");
    assert!(!err.contains("verify"), "fio verify problem: {err}");
    harness.stop();
}
