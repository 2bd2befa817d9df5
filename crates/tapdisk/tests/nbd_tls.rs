//! The NBD export on TCP, opt-in per disk with `tap-ctl nbd-listen`: TLS with X.509
//! certificates (a CA made here with the openssl CLI) checked with nbdinfo over `nbds://`,
//! plaintext clients refused by a TLS listener, and plaintext only when asked for.

mod common;

use std::process::Command;

use common::{make_certificates, require, run_ok, Env};

const MIB: usize = 1 << 20;

#[test]
fn tls_listener_serves_nbds_and_refuses_plaintext() {
    require("nbdinfo");
    require("openssl");
    let env = Env::new();
    let pki = env.dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    make_certificates(&pki);
    // The client side needs only the CA.
    let client_pki = env.dir.path().join("client-pki");
    std::fs::create_dir(&client_pki).unwrap();
    std::fs::copy(pki.join("ca-cert.pem"), client_pki.join("ca-cert.pem")).unwrap();

    let image = env.raw_image("disk.img", 4 * MIB, 0);
    let (pid, minor) = env.create(&image, &[]);
    let (p, m) = (pid.to_string(), minor.to_string());
    let address = env.tap_ctl_ok(&[
        "nbd-listen",
        "-p",
        &p,
        "-m",
        &m,
        "-l",
        "127.0.0.1:0",
        "-T",
        pki.to_str().unwrap(),
    ]);
    let port = address
        .trim()
        .rsplit_once(':')
        .expect("bound address printed")
        .1
        .to_owned();
    let uri = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        client_pki.display()
    );
    let info = run_ok(Command::new("nbdinfo").args(["--json", &uri]));
    assert!(info.contains("\"export-size\": 4194304"), "{info}");
    assert!(info.contains("\"can_flush\": true"), "{info}");
    let map = run_ok(Command::new("nbdinfo").args(["--map", &uri]));
    assert!(map.contains("4194304"), "{map}");

    // A plaintext client gets nothing.
    let plain = Command::new("nbdinfo")
        .arg(format!("nbd://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plaintext client was served");

    // Plaintext TCP only when asked for explicitly.
    env.tap_ctl_err(
        &["nbd-listen", "-p", &p, "-m", &m, "-l", "127.0.0.1:0"],
        libc_einval(),
    );
    let plain_address =
        env.tap_ctl_ok(&["nbd-listen", "-p", &p, "-m", &m, "-l", "127.0.0.1:0", "-P"]);
    let info = run_ok(
        Command::new("nbdinfo").args(["--size", &format!("nbd://{}/", plain_address.trim())]),
    );
    assert_eq!(info.trim(), "4194304");

    // A certificate directory without certificates: EINVAL, nothing listening.
    let empty = env.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    env.tap_ctl_err(
        &[
            "nbd-listen",
            "-p",
            &p,
            "-m",
            &m,
            "-l",
            "127.0.0.1:0",
            "-T",
            empty.to_str().unwrap(),
        ],
        libc_einval(),
    );
    env.destroy(pid, minor);
}

fn libc_einval() -> i32 {
    22
}
