//! Interoperability with qemu (`qemu-img`, `qemu-io`) and libvhdi
//! (`vhdiinfo`): qemu-made images pass our check and read like
//! `qemu-img convert -O raw`; our images satisfy `qemu-img info/compare/map`
//! and `vhdiinfo`; a qemu write into a tapdisk image (which lands on the
//! batmap) is reported by `check` and refused for writing. Tests skip with
//! a note when a tool is not installed.

// Test images are a few MiB: sizes always fit in usize.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::Command;

use vhd::image::{OpenOptions, VhdImage};
use vhd::Chain;

fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok();
    if !found {
        eprintln!("note: {tool} not installed; skipping");
    }
    found
}

fn sh(dir: &Path, prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn vhd_util(dir: &Path, args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_vhd-util"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

fn read_all(path: &Path) -> Vec<u8> {
    let chain = Chain::open(path, false).unwrap();
    let mut buf = vec![0u8; chain.leaf().virtual_size() as usize];
    chain.read(0, &mut buf).unwrap();
    buf
}

#[test]
fn qemu_images_pass_check_and_read_identically() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    for (sub, force) in [
        ("dynamic", "off"),
        ("dynamic", "on"),
        ("fixed", "off"),
        ("fixed", "on"),
    ] {
        let name = format!("q-{sub}-{force}.vhd");
        let opts = format!("subformat={sub},force_size={force}");
        sh(
            p,
            "qemu-img",
            &["create", "-q", "-f", "vpc", "-o", &opts, &name, "21M"],
        );
        for (pat, off, len) in [
            ("0xab", "0", "64k"),
            ("0xcd", "3M", "2M"),
            ("0x11", "20M", "512"),
        ] {
            sh(
                p,
                "qemu-io",
                &[
                    "-f",
                    "vpc",
                    "-c",
                    &format!("write -P {pat} {off} {len}"),
                    &name,
                ],
            );
        }
        let (code, out) = vhd_util(p, &["check", "-n", &name]);
        assert_eq!(
            (code, out.as_str()),
            (0, format!("{name} is valid\n").as_str())
        );
        let raw = format!("{name}.raw");
        sh(
            p,
            "qemu-img",
            &["convert", "-f", "vpc", "-O", "raw", &name, &raw],
        );
        let expected = std::fs::read(p.join(&raw)).unwrap();
        let ours = read_all(&p.join(&name));
        assert_eq!(ours.len(), expected.len(), "{name}: size");
        assert!(
            ours == expected,
            "{name}: data differs from qemu-img convert"
        );
        // Our writes into a qemu dynamic image are read back by qemu.
        if sub == "dynamic" {
            let mut c = Chain::open(&p.join(&name), true).unwrap();
            c.write(8192, &[0x5a; 4096]).unwrap();
            drop(c);
            sh(
                p,
                "qemu-io",
                &["-f", "vpc", "-c", "read -P 0x5a 4M 4k", &name],
            );
            assert_eq!(vhd_util(p, &["check", "-n", &name]).0, 0);
        }
    }
}

#[test]
fn our_images_read_correctly_in_qemu_and_libvhdi() {
    if !have("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    assert_eq!(vhd_util(p, &["create", "-n", "dyn.vhd", "-s", "20"]).0, 0);
    assert_eq!(
        vhd_util(p, &["create", "-n", "fix.vhd", "-s", "20", "-r"]).0,
        0
    );
    let mut raw = vec![0u8; 20 << 20];
    for (i, b) in raw[(1 << 20)..(7 << 20) + 1024].iter_mut().enumerate() {
        *b = (i % 199) as u8 + 1;
    }
    std::fs::write(p.join("ref.raw"), &raw).unwrap();
    for name in ["dyn.vhd", "fix.vhd"] {
        let mut c = Chain::open(&p.join(name), true).unwrap();
        c.write(2048, &raw[(1 << 20)..(7 << 20) + 1024]).unwrap();
        drop(c);
        let info = sh(p, "qemu-img", &["info", "-f", "vpc", "--output=json", name]);
        assert!(info.contains("\"virtual-size\": 20971520"), "{info}");
        assert!(info.contains("\"format\": \"vpc\""), "{info}");
        let cmp = sh(
            p,
            "qemu-img",
            &["compare", "-f", "raw", "-F", "vpc", "ref.raw", name],
        );
        assert!(cmp.contains("identical"), "{cmp}");
        let map = sh(p, "qemu-img", &["map", "--output=json", "-f", "vpc", name]);
        assert!(map.contains("\"data\": true"), "{map}");
        if have("vhdiinfo") {
            let out = sh(p, "vhdiinfo", &[name]);
            assert!(out.contains("Media size"), "{out}");
            assert!(out.contains("20971520 bytes"), "{out}");
        }
    }
    // Differencing images: libvhdi sees the parent.
    assert_eq!(
        vhd_util(p, &["snapshot", "-n", "child.vhd", "-p", "dyn.vhd"]).0,
        0
    );
    if have("vhdiinfo") {
        let out = sh(p, "vhdiinfo", &["child.vhd"]);
        assert!(out.contains("Differential"), "{out}");
        assert!(out.contains("dyn.vhd"), "{out}");
    }
}

#[test]
fn qemu_write_into_tapdisk_image_is_detected() {
    if !have("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    assert_eq!(vhd_util(p, &["create", "-n", "t.vhd", "-s", "100"]).0, 0);
    assert_eq!(vhd_util(p, &["check", "-n", "t.vhd"]).0, 0);
    sh(
        p,
        "qemu-io",
        &["-f", "vpc", "-c", "write -P 0xee 0 1M", "t.vhd"],
    );
    let (code, out) = vhd_util(p, &["check", "-n", "t.vhd"]);
    assert_eq!(code, 22);
    assert!(
        out.starts_with("batmap is invalid: invalid cookie\n"),
        "{out}"
    );
    // Read-only access still works (qemu's data is readable) ...
    let data = read_all(&p.join("t.vhd"));
    assert!(data[..1 << 20].iter().all(|&b| b == 0xee));
    // ... but opening for writing is refused rather than trusting the batmap.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p.join("t.vhd"))
        .unwrap();
    let e = VhdImage::open(f, "t.vhd", OpenOptions::read_write()).unwrap_err();
    assert!(matches!(e, vhd::VhdError::BadBatmap { .. }), "{e}");
    let (code, _) = vhd_util(p, &["set", "-n", "t.vhd", "-f", "hidden", "-v", "1"]);
    assert_eq!(code, 22);
}
