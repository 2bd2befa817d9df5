//! Interoperability tests with real NBD clients (nbdinfo, qemu-img, qemu-io, nbdcopy, fio)
//! against an in-memory export. Each test skips with a message if its tool is absent.

mod common;

use std::sync::Arc;

use common::{have_tool, run, Harness, MemExport};
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

    let (ok, out, err) = run("nbdinfo", &["--size", &uri]);
    assert!(ok, "nbdinfo --size failed: {err}");
    assert_eq!(out.trim(), (16u64 << 20).to_string());

    let (ok, _, err) = run("nbdinfo", &["--can", "flush", &uri]);
    assert!(ok, "nbdinfo --can flush said no: {err}");
    let (ok, _, _) = run("nbdinfo", &["--is", "read-only", &uri]);
    assert!(!ok, "export must not be read-only");

    let (ok, out, err) = run("nbdinfo", &["--list", &uri]);
    assert!(ok, "nbdinfo --list failed: {err}");
    assert!(
        out.contains("testdisk"),
        "list output lacks the export name: {out}"
    );

    let (ok, out, err) = run("nbdinfo", &["--json", &uri]);
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
    let (ok, _, err) = run("nbdinfo", &["--is", "read-only", &uri]);
    assert!(ok, "export must be read-only: {err}");
    let (ok, _, _) = run("nbdinfo", &["--can", "flush", &uri]);
    assert!(!ok, "flush must not be offered");
    let (ok, _, _) = run("nbdinfo", &["--can", "trim", &uri]);
    assert!(!ok, "trim must not be offered on a read-only export");
    harness.stop();
}
