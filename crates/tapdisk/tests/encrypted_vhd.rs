//! Encrypted VHDs end to end (issue 20): `vhd-util key -s` records a key's hash in a new
//! VHD; `tap-ctl open -E` (the key on stdin, as SM passes it) opens it; data written through
//! the NBD export with qemu-io reads back through it, lies on disk as XTS-AES ciphertext (the
//! C tapdisk's layout: decrypting the file's sectors with the key and the virtual sector
//! gives the data back), and the image is refused without the key (`EINVAL`) or with
//! another one (`ENOKEY`). A snapshot child (which inherits the keyhash) reads its parent's
//! data through the same key. Keys never show in replies or stats.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{require, run_ok, vhd_util_ok, Env};

/// A VBD made the way SM makes one (allocate, spawn, attach), not opened yet.
struct Vbd {
    pid: String,
    minor: String,
}

fn attach(env: &Env) -> Vbd {
    // allocate prints the marker path, .../tapdisk-MINOR.
    let marker = env.tap_ctl_ok(&["allocate"]);
    let (_, minor) = marker
        .trim()
        .rsplit_once("tapdisk-")
        .expect("a marker path");
    let minor = minor.to_owned();
    let pid = env.tap_ctl_ok(&["spawn"]).trim().to_owned();
    env.tap_ctl_ok(&["attach", "-p", &pid, "-m", &minor]);
    Vbd { pid, minor }
}

impl Vbd {
    /// `tap-ctl open -a vhd:PATH [-E]`, the key (if any) written to its stdin.
    fn open(&self, env: &Env, image: &Path, key: Option<&[u8]>) -> Output {
        self.open_with(env, image, key, &[])
    }

    /// [`Vbd::open`] with `extra` options.
    fn open_with(&self, env: &Env, image: &Path, key: Option<&[u8]>, extra: &[&str]) -> Output {
        let params = format!("vhd:{}", image.display());
        let mut args = vec!["open", "-p", &self.pid, "-m", &self.minor, "-a", &params];
        if key.is_some() {
            args.push("-E");
        }
        args.extend_from_slice(extra);
        let mut child = env
            .tap_ctl_cmd(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if let Some(key) = key {
            stdin.write_all(key).unwrap();
        }
        drop(stdin);
        child.wait_with_output().unwrap()
    }

    fn close(&self, env: &Env) {
        env.tap_ctl_ok(&["close", "-p", &self.pid, "-m", &self.minor]);
    }

    fn destroy(self, env: &Env) {
        env.tap_ctl_ok(&["detach", "-p", &self.pid, "-m", &self.minor]);
        env.tap_ctl_ok(&["free", "-m", &self.minor]);
    }

    fn uri(&self, env: &Env) -> String {
        env.nbd_uri(self.pid.parse().unwrap(), self.minor.parse().unwrap())
    }

    fn qemu_io(&self, env: &Env, commands: &[&str]) -> String {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &self.uri(env)]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        let out = run_ok(&mut cmd);
        assert!(
            !out.contains("error") && !out.contains("failed") && !out.contains("differ"),
            "qemu-io {commands:?}: {out}"
        );
        out
    }
}

fn new_encrypted_vhd(env: &Env, name: &str, key: &[u8]) -> PathBuf {
    let path = env.dir.path().join(name);
    let key_file = env.dir.path().join(format!("{name}.key"));
    std::fs::write(&key_file, key).unwrap();
    let p = path.display().to_string();
    vhd_util_ok(&["create", "-n", &p, "-s", "16"]);
    vhd_util_ok(&["key", "-s", "-n", &p, "-k", &key_file.display().to_string()]);
    path
}

/// The sectors the file holds at virtual sector `sector`, as stored (no decryption).
fn stored_sectors(path: &Path, sector: u64, count: usize) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap();
    let image = vhd::VhdImage::open(
        file,
        &path.display().to_string(),
        vhd::OpenOptions::read_only(),
    )
    .unwrap();
    let mut buf = vec![0u8; count * 512];
    image.read_sectors(sector, &mut buf).unwrap();
    buf
}

fn key_bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i).unwrap().wrapping_mul(7).wrapping_add(seed))
        .collect()
}

#[test]
fn written_and_read_back_through_tapdisk_with_the_key_only() {
    require("qemu-io");
    let env = Env::new();
    let key = key_bytes(3, 64);
    let image = new_encrypted_vhd(&env, "enc.vhd", &key);
    let vbd = attach(&env);

    // Without the key, with another key, with a key of a size XTS does not have: refused.
    let out = vbd.open(&env, &image, None);
    assert_eq!(out.status.code(), Some(libc::EINVAL), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("encrypted and no key was given"),
        "{stderr}"
    );
    let out = vbd.open(&env, &image, Some(&key_bytes(4, 64)));
    assert_eq!(out.status.code(), Some(libc::ENOKEY), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not match the image's keyhash"),
        "{stderr}"
    );
    let out = vbd.open(&env, &image, Some(&key_bytes(3, 48)));
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // With it: written through the export, read back.
    let out = vbd.open(&env, &image, Some(&key));
    assert!(out.status.success(), "{out:?}");
    vbd.qemu_io(
        &env,
        &[
            "write -P 0xab 0 1M",
            "write -P 0x5c 3145728 4096",
            "write -P 0x11 15728128 512",
        ],
    );
    vbd.qemu_io(
        &env,
        &[
            "read -P 0xab 0 1M",
            "read -P 0x5c 3145728 4096",
            "read -P 0x11 15728128 512",
            "read -P 0 1048576 2097152",
        ],
    );
    let stats = env.tap_ctl_ok(&["stats", "-p", &vbd.pid, "-m", &vbd.minor]);
    let key_hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!stats.contains(&key_hex[..16]), "{stats}");
    vbd.close(&env);

    // On disk: not the data, but its XTS-AES encryption under the virtual sector's tweak.
    let stored = stored_sectors(&image, 6144, 8);
    assert!(stored.iter().any(|&b| b != 0x5c));
    assert!(stored
        .chunks(512)
        .all(|s| s.iter().filter(|&&b| b == 0x5c).count() < 64));
    let cipher = vhd::crypt::SectorCipher::new(&key).unwrap();
    let mut plain = stored.clone();
    cipher.decrypt_sectors(6144, &mut plain);
    assert_eq!(plain, vec![0x5c; 4096]);
    let whole = std::fs::read(&image).unwrap();
    assert!(!whole.windows(512).any(|w| w == [0xab; 512]));

    // A secondary image would receive plaintext: refused at open and at unpause.
    let mirror = env.dir.path().join("mirror.vhd");
    vhd_util_ok(&["create", "-n", &mirror.display().to_string(), "-s", "16"]);
    let mirror_params = format!("vhd:{}", mirror.display());
    let out = vbd.open_with(&env, &image, Some(&key), &["-2", &mirror_params]);
    assert_eq!(out.status.code(), Some(libc::EOPNOTSUPP), "{out:?}");

    // A new open with the key reads the same data; pause and unpause reopen with it.
    let out = vbd.open(&env, &image, Some(&key));
    assert!(out.status.success(), "{out:?}");
    vbd.qemu_io(
        &env,
        &[
            "read -P 0xab 0 1M",
            "read -P 0x5c 3145728 4096",
            "read -P 0 4194304 1M",
        ],
    );
    let (p, m) = (vbd.pid.as_str(), vbd.minor.as_str());
    env.tap_ctl_ok(&["pause", "-p", p, "-m", m]);
    let stderr = env.tap_ctl_err(
        &["unpause", "-p", p, "-m", m, "-2", &mirror_params],
        libc::EOPNOTSUPP,
    );
    assert!(stderr.contains("encrypted"), "{stderr}");
    env.tap_ctl_ok(&["unpause", "-p", p, "-m", m]);
    vbd.qemu_io(
        &env,
        &["read -P 0x5c 3145728 4096", "write -P 0x66 8192 512"],
    );
    vbd.qemu_io(&env, &["read -P 0x66 8192 512"]);
    vbd.close(&env);

    // A snapshot child inherits the keyhash: the chain reads the parent's data and takes new
    // writes, both under the one key.
    let child = env.dir.path().join("child.vhd");
    vhd_util_ok(&[
        "snapshot",
        "-n",
        &child.display().to_string(),
        "-p",
        &image.display().to_string(),
    ]);
    let out = vbd.open(&env, &child, None);
    assert_eq!(out.status.code(), Some(libc::EINVAL), "{out:?}");
    let out = vbd.open(&env, &child, Some(&key));
    assert!(out.status.success(), "{out:?}");
    vbd.qemu_io(&env, &["write -P 0x77 512 512"]);
    vbd.qemu_io(
        &env,
        &[
            "read -P 0xab 0 512",
            "read -P 0x77 512 512",
            "read -P 0xab 1024 7168",
            "read -P 0x66 8192 512",
            "read -P 0xab 8704 1039872",
        ],
    );
    vbd.close(&env);
    let stored = stored_sectors(&child, 1, 1);
    assert_ne!(stored, vec![0x77; 512]);

    vbd.destroy(&env);
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

#[test]
fn a_key_for_a_plain_vhd_is_refused() {
    let env = Env::new();
    let image = env.dir.path().join("plain.vhd");
    vhd_util_ok(&["create", "-n", &image.display().to_string(), "-s", "4"]);
    let vbd = attach(&env);
    let out = vbd.open(&env, &image, Some(&key_bytes(1, 32)));
    assert_eq!(out.status.code(), Some(libc::EINVAL), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has no keyhash"), "{stderr}");
    let out = vbd.open(&env, &image, None);
    assert!(out.status.success(), "{out:?}");
    vbd.close(&env);
    vbd.destroy(&env);
}

fn vhd_util(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(common::vhd_util_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        // vhd-util may refuse before reading its stdin (EPIPE here).
        let _ = input.write_all(bytes);
    }
    drop(input);
    child.wait_with_output().unwrap()
}

#[test]
fn vhd_util_copy_and_key_round_trip() {
    require("qemu-io");
    let env = Env::new();
    let key = key_bytes(9, 32);
    let key_file = env.dir.path().join("copy.key");
    std::fs::write(&key_file, &key).unwrap();
    let key_path = key_file.display().to_string();
    let path = |name: &str| env.dir.path().join(name).display().to_string();

    // A plain image with data, written through tapdisk.
    let plain = path("plain.vhd");
    vhd_util_ok(&["create", "-n", &plain, "-s", "8"]);
    let vbd = attach(&env);
    assert!(vbd.open(&env, Path::new(&plain), None).status.success());
    vbd.qemu_io(
        &env,
        &["write -P 0x3c 2097152 65536", "write -P 0xd1 512 512"],
    );
    vbd.close(&env);

    // copy -k: an encrypted copy, whose keyhash vhd-util key checks and prints.
    let encrypted = path("encrypted.vhd");
    let out = vhd_util(
        &["copy", "-n", &plain, "-N", &encrypted, "-k", &key_path],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    vhd_util_ok(&["key", "-c", "-n", &encrypted, "-k", &key_path]);
    let hash = vhd_util_ok(&["key", "-C", "-k", &key_path]);
    let printed = vhd_util_ok(&["key", "-p", "-n", &encrypted]);
    assert_eq!(printed, format!("{} {}", "0".repeat(64), hash));
    let other_key = env.dir.path().join("other.key");
    std::fs::write(&other_key, key_bytes(10, 32)).unwrap();
    let out = vhd_util(
        &[
            "key",
            "-c",
            "-n",
            &encrypted,
            "-k",
            &other_key.display().to_string(),
        ],
        None,
    );
    assert!(!out.status.success(), "{out:?}");
    let stored = stored_sectors(Path::new(&encrypted), 4096, 1);
    assert_ne!(stored, vec![0x3c; 512]);

    // Read through tapdisk with the key: the same data, zeros elsewhere.
    let out = vbd.open(&env, Path::new(&encrypted), None);
    assert_eq!(out.status.code(), Some(libc::EINVAL), "{out:?}");
    assert!(vbd
        .open(&env, Path::new(&encrypted), Some(&key))
        .status
        .success());
    vbd.qemu_io(
        &env,
        &[
            "read -P 0x3c 2097152 65536",
            "read -P 0xd1 512 512",
            "read -P 0 0 512",
            "read -P 0 1024 2096128",
        ],
    );
    vbd.close(&env);

    // copy -E of the encrypted copy: the key (on stdin) must be the image's; the copy keeps
    // the keyhash and reads back the same through tapdisk.
    let again = path("again.vhd");
    let out = vhd_util(
        &["copy", "-n", &encrypted, "-N", &again, "-E"],
        Some(&key_bytes(10, 32)),
    );
    assert_eq!(out.status.code(), Some(libc::ENOKEY), "{out:?}");
    let _ = std::fs::remove_file(&again);
    let out = vhd_util(&["copy", "-n", &encrypted, "-N", &again, "-E"], Some(&key));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(vhd_util_ok(&["key", "-p", "-n", &again]), printed);
    assert!(vbd
        .open(&env, Path::new(&again), Some(&key))
        .status
        .success());
    vbd.qemu_io(
        &env,
        &["read -P 0x3c 2097152 65536", "read -P 0xd1 512 512"],
    );
    vbd.close(&env);

    // Keys of other sizes, and -k with -E, are refused before anything is written.
    let out = vhd_util(
        &["copy", "-n", &plain, "-N", &path("bad.vhd"), "-E"],
        Some(&[1; 20]),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unsupported keysize"));
    assert!(!Path::new(&path("bad.vhd")).exists());
    let out = vhd_util(
        &[
            "copy",
            "-n",
            &plain,
            "-N",
            &path("bad.vhd"),
            "-k",
            &key_path,
            "-E",
        ],
        Some(&key),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    vbd.destroy(&env);
}
