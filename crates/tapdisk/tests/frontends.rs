//! The frontend seam in process: the NBD frontend started through `StartFrontend` over a VBD
//! on the shared fake image (`tapdisk::testing`), checked by real clients (nbdinfo, qemu-io).
//! The export offers exactly what the VBD's capabilities say; an injected read failure
//! reaches the client as an error and the export lives on; a stop removes its sockets.

mod common;

use std::process::{Command, Output};
use std::sync::Arc;

use blktapctl::paths::ControlDir;
use tapdisk::driver::Capabilities;
use tapdisk::frontend::nbd::{NbdFrontend, NbdSettings};
use tapdisk::frontend::{Frontend, FrontendContext, StartFrontend};
use tapdisk::testing::{fake_vbd, FakeImage};
use tapdisk::vbd::DEFAULT_REQUEST_TIMEOUT;

use common::require;

/// Runs a client off the runtime's threads (the export is served on them).
async fn client(command: &'static str, args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || Command::new(command).args(&args).output().unwrap())
        .await
        .unwrap()
}

/// `nbdinfo --can WHAT`: true (exit 0) or false (exit 2).
async fn can(uri: &str, what: &str) -> bool {
    let out = client("nbdinfo", vec!["--can".into(), what.into(), uri.into()]).await;
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        other => panic!("nbdinfo --can {what}: {other:?}"),
    }
}

/// Serves `image` as minor 9 of pid 1 in `dir`; returns the frontend and its URI.
async fn serve(dir: &tempfile::TempDir, image: FakeImage) -> (NbdFrontend, String) {
    let context = FrontendContext {
        vbd: Arc::new(fake_vbd(image, DEFAULT_REQUEST_TIMEOUT)),
        minor: 9,
        pid: 1,
        control_dir: ControlDir::new(dir.path()),
        params: "aio:/fake".into(),
        nbd_connections: nbd::ConnectionLimit::new("this disk", 128),
    };
    let frontend = NbdFrontend::start(&context, NbdSettings::default())
        .await
        .unwrap();
    let uri = format!(
        "nbd+unix:///?socket={}",
        dir.path().join("nbd1.9").display()
    );
    (frontend, uri)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_offers_what_the_capabilities_say() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let (mut plain, uri) = serve(&dir, FakeImage::new(2048)).await;
    assert!(!can(&uri, "trim").await);
    assert!(!can(&uri, "fast-zero").await);
    assert!(can(&uri, "zero").await, "zeroing always works, by writing");
    assert!(can(&uri, "flush").await);
    plain.stop(false).await.unwrap();

    let all = Capabilities {
        discard: true,
        write_zeroes: true,
        block_status: true,
    };
    let (mut capable, uri) = serve(&dir, FakeImage::new(2048).with_capabilities(all)).await;
    assert!(can(&uri, "trim").await);
    assert!(can(&uri, "fast-zero").await);
    capable.stop(false).await.unwrap();

    let read_only = FakeImage::new(2048).with_capabilities(all).read_only();
    let (mut read_only, uri) = serve(&dir, read_only).await;
    assert!(!can(&uri, "write").await);
    assert!(!can(&uri, "trim").await);
    read_only.stop(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_failures_reach_the_client_and_the_export_lives_on() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let image = FakeImage::new(2048).holding(&[0x5a; 4096]);
    let faults = image.faults();
    let (mut frontend, uri) = serve(&dir, image).await;
    let read = |pattern: &str| {
        vec![
            "-f".into(),
            "raw".into(),
            "-r".into(),
            "-c".into(),
            format!("read -P {pattern} 0 4096"),
            uri.clone(),
        ]
    };
    faults.fail_reads(1, libc::EIO);
    let failed = client("qemu-io", read("0x5a")).await;
    let said = String::from_utf8_lossy(&failed.stdout).into_owned()
        + &String::from_utf8_lossy(&failed.stderr);
    assert!(said.contains("Input/output error"), "{said}");
    let ok = client("qemu-io", read("0x5a")).await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&ok.stdout).contains("Pattern verification failed"),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    // Nothing holds an NBD export; stopping removes every socket.
    assert_eq!(frontend.kind(), "nbd");
    assert!(frontend.device().is_none());
    assert!(frontend.holder().await.unwrap().is_none());
    let sockets: Vec<_> = frontend.sockets().map(|s| s.to_path_buf()).collect();
    assert_eq!(sockets.len(), 4);
    assert!(sockets.iter().all(|s| s.exists()));
    frontend.stop(false).await.unwrap();
    assert!(sockets.iter().all(|s| !s.exists()));
}
