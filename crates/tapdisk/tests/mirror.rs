//! Storage live migration end to end, with two tapdisks as on two hosts: the destination
//! serves an empty disk, a connected socket pair is handed over exactly as xapi does (one end
//! to the destination's `nbdserver<pid>.<minor>`, the other to the source's
//! `nbdclient<pid>`, both with the datapath id), and the source VBD is unpaused with
//! `-2 nbd:<id>`. Then: fio verifying on the source while the old data is copied to the
//! destination, `qemu-img compare` identical at the end; the mirror surviving SM's
//! pause/unpause and going away with `-2 null`; a destination killed or hung mid-run (the
//! guest's I/O goes on, `nbd_mirror_failed` becomes 1); a standby secondary taking over a
//! leaf on a full filesystem; an `nbd:` image as a VBD's only image, over TLS to another
//! tapdisk, and from qemu-nbd (newstyle, structured replies) and nbdkit (old style; TLS
//! required on TCP); an `nbd:` image reconnecting to a restarted server.

mod common;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    fio_nbd_verify, make_certificates, require, run_ok, vhd_util_ok, wait_for, ChildGuard, Env,
    Tmpfs,
};

const MIB: usize = 1 << 20;

/// Hands a connected socket pair over as xapi's storage migration does: one end to the
/// destination VBD's old-style fd receiver, the other to the source tapdisk's
/// `nbdclient<pid>`, both under `id`.
fn hand_over(env: &Env, destination: (u32, u32), source_pid: u32, id: &str) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let receivers = [
        env.ctl_dir
            .join(format!("nbdserver{}.{}", destination.0, destination.1)),
        env.ctl_dir.join(format!("nbdclient{source_pid}")),
    ];
    for (receiver, end) in receivers.iter().zip([&ours, &theirs]) {
        let helper = std::os::unix::net::UnixStream::connect(receiver).unwrap();
        nbd::handover::send_stream(&helper, id, end.as_fd()).unwrap();
    }
}

fn stats(env: &Env, (pid, minor): (u32, u32)) -> serde_json::Value {
    env.stats_json(pid, minor)
}

fn mirror_failed(env: &Env, vbd: (u32, u32)) -> u64 {
    stats(env, vbd)["nbd_mirror_failed"].as_u64().unwrap()
}

/// The driver names of the images `tap-ctl stats` lists, in order.
fn drivers(env: &Env, vbd: (u32, u32)) -> Vec<String> {
    stats(env, vbd)["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|image| image["driver"]["name"].as_str().unwrap().to_owned())
        .collect()
}

fn pause(env: &Env, (pid, minor): (u32, u32)) {
    env.tap_ctl_ok(&["pause", "-p", &pid.to_string(), "-m", &minor.to_string()]);
}

fn unpause(env: &Env, (pid, minor): (u32, u32), extra: &[&str]) {
    let (pid, minor) = (pid.to_string(), minor.to_string());
    let mut args = vec!["unpause", "-p", &pid, "-m", &minor];
    args.extend_from_slice(extra);
    env.tap_ctl_ok(&args);
}

/// `qemu-img compare` of two raw images (files or NBD URIs): identical?, and what it said.
fn compare_raw(a: impl AsRef<std::ffi::OsStr>, b: impl AsRef<std::ffi::OsStr>) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn compare(env: &Env, a: (u32, u32), b: (u32, u32)) -> (bool, String) {
    compare_raw(env.nbd_uri(a.0, a.1), env.nbd_uri(b.0, b.1))
}

/// fio writing and verifying 4-64 KiB blocks over `size` of `uri` at about `rate` bytes
/// per second (fio's `rate_iops` counts in smallest blocks, so a byte rate it is).
fn spawn_fio(env: &Env, uri: &str, size: &str, rate: &str) -> ChildGuard {
    let child = Command::new("fio")
        .current_dir(env.dir.path())
        .args([
            "--name=guest",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=8",
            &format!("--size={size}"),
            &format!("--rate={rate}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ChildGuard(Some(child))
}

/// Waits for fio and asserts it saw no error and no bad block.
fn fio_clean(mut fio: ChildGuard) {
    let child: Child = fio.0.take().unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = &stdout[stdout.find('{').expect("fio JSON output")..];
    assert!(json.contains("\"error\" : 0"), "{json}");
    assert!(!json.contains("verify: bad"), "{json}");
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A file of `mib` MiB in the test's directory whose every MiB holds different bytes
/// (quicker to make than [`Env::raw_image`] in a debug build).
fn image(env: &Env, name: &str, mib: usize) -> PathBuf {
    use std::io::Write;
    let path = env.dir.path().join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    let mut chunk = vec![0u8; MIB];
    for i in 0..mib {
        for (page, bytes) in chunk.chunks_mut(4096).enumerate() {
            bytes.fill(u8::try_from((i * 7 + page) % 251).unwrap());
        }
        file.write_all(&chunk).unwrap();
    }
    path
}

#[test]
fn storage_migration_mirror_with_a_copy_and_fio_verify() {
    require("fio");
    require("qemu-img");
    require("qemu-io");
    let env = Env::new();
    let dir = env.dir.path();
    let file = |name: &str| dir.join(name).display().to_string();
    // The source: the VM's disk, a VHD holding data.
    let (src_base, src_leaf) = (file("src-base.vhd"), file("src-leaf.vhd"));
    vhd_util_ok(&["create", "-n", &src_base, "-s", "32"]);
    let source = env.create_params(&format!("vhd:{src_base}"), &["-b", "none"]);
    let old = image(&env, "old.img", 32);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&old)
            .arg(env.nbd_uri(source.0, source.1)),
    );
    // The destination: an empty leaf over an empty base, as xapi's receive_start makes it,
    // and a tapdisk on the base for the copy.
    let (dst_base, dst_leaf) = (file("dst-base.vhd"), file("dst-leaf.vhd"));
    vhd_util_ok(&["create", "-n", &dst_base, "-s", "32"]);
    vhd_util_ok(&["snapshot", "-n", &dst_leaf, "-p", &dst_base]);
    let destination = env.create_params(&format!("vhd:{dst_leaf}"), &["-b", "none"]);
    // xapi: hand the connection over, snapshot the source (SM pauses it, snapshots, and
    // unpauses onto the new leaf with the mirror).
    hand_over(&env, destination, source.0, "vbd/7/xvda");
    pause(&env, source);
    vhd_util_ok(&["snapshot", "-n", &src_leaf, "-p", &src_base]);
    unpause(
        &env,
        source,
        &["-a", &format!("vhd:{src_leaf}"), "-2", "nbd:vbd/7/xvda"],
    );
    assert_eq!(drivers(&env, source), ["vhd", "nbd", "vhd"]);
    assert_eq!(mirror_failed(&env, source), 0);

    // The guest writes and verifies while the snapshot is copied to the destination's base.
    let fio = spawn_fio(&env, &env.nbd_uri(source.0, source.1), "24M", "8m");
    let copier = env.create_params(&format!("vhd:{dst_base}"), &["-b", "none"]);
    std::thread::sleep(Duration::from_millis(300));
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "vpc", "-O", "raw", &src_base])
            .arg(env.nbd_uri(copier.0, copier.1)),
    );
    fio_clean(fio);
    env.destroy(copier.0, copier.1);
    assert_eq!(mirror_failed(&env, source), 0);
    let written = stats(&env, source)["images"][1]["hits"][1]
        .as_u64()
        .unwrap();
    assert!(written > 0, "no write reached the mirror");
    // The destination's chain is read again with the copied base: the same disk.
    pause(&env, destination);
    unpause(&env, destination, &[]);
    let (same, text) = compare(&env, source, destination);
    assert!(same, "source and destination differ: {text}");
    assert!(text.contains("identical"), "{text}");

    // SM snapshots during the migration: the mirror comes back with every unpause.
    pause(&env, source);
    unpause(&env, source, &[]);
    assert_eq!(drivers(&env, source), ["vhd", "nbd", "vhd"]);
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 1M 3M"])
            .arg(env.nbd_uri(source.0, source.1)),
    );
    assert!(compare(&env, source, destination).0);
    // The end of the migration: -2 null removes the mirror.
    pause(&env, source);
    unpause(&env, source, &["-2", "null"]);
    assert_eq!(drivers(&env, source), ["vhd", "vhd"]);
    assert_eq!(mirror_failed(&env, source), 0);
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x6b 0 1M"])
            .arg(env.nbd_uri(source.0, source.1)),
    );
    assert!(!compare(&env, source, destination).0, "no longer mirrored");
    env.destroy(source.0, source.1);
    env.destroy(destination.0, destination.1);
}

/// A source mirroring to a destination, with the guest writing; returns both VBDs and fio.
fn mirrored_pair(env: &Env) -> ((u32, u32), (u32, u32), ChildGuard) {
    let source = env.create(&image(env, "src.img", 32), &["-b", "none"]);
    let destination = env.create(&image(env, "dst.img", 32), &["-b", "none"]);
    hand_over(env, destination, source.0, "vbd/3/xvdb");
    pause(env, source);
    unpause(env, source, &["-2", "nbd:vbd/3/xvdb"]);
    assert_eq!(drivers(env, source), ["aio", "nbd"]);
    let fio = spawn_fio(env, &env.nbd_uri(source.0, source.1), "24M", "6m");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(mirror_failed(env, source), 0);
    (source, destination, fio)
}

#[test]
fn a_destination_that_dies_stops_the_mirror_not_the_guest() {
    require("fio");
    let env = Env::new();
    let (source, destination, fio) = mirrored_pair(&env);
    run_ok(Command::new("kill").args(["-9", &destination.0.to_string()]));
    fio_clean(fio);
    assert!(wait_for(Duration::from_secs(10), || mirror_failed(
        &env, source
    ) == 1));
    // The failed mirror is no longer listed, written, or re-opened.
    assert_eq!(drivers(&env, source), ["aio"]);
    pause(&env, source);
    unpause(&env, source, &[]);
    assert_eq!(mirror_failed(&env, source), 1);
    assert_eq!(drivers(&env, source), ["aio"]);
    // -2 null clears the flag.
    pause(&env, source);
    unpause(&env, source, &["-2", "null"]);
    assert_eq!(mirror_failed(&env, source), 0);
    env.destroy(source.0, source.1);
}

/// Resumes a stopped process when dropped (so a failing test leaves none behind).
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[test]
fn a_hung_destination_is_caught_by_the_request_timeout() {
    require("fio");
    let env = Env::new();
    env.site_config("[nbd_client]\nrequest_timeout = 2\n");
    let (source, destination, fio) = mirrored_pair(&env);
    run_ok(Command::new("kill").args(["-STOP", &destination.0.to_string()]));
    let stopped = Stopped(destination.0);
    fio_clean(fio);
    assert_eq!(mirror_failed(&env, source), 1);
    let listed = stats(&env, source)["images"].as_array().unwrap().len();
    assert_eq!(listed, 1, "the mirror is no longer listed");
    drop(stopped);
    env.destroy(source.0, source.1);
    env.destroy(destination.0, destination.1);
}

#[test]
fn a_standby_takes_over_when_the_leaf_fills_its_filesystem() {
    require("fio");
    let env = Env::new();
    let small = Tmpfs::mount(env.dir.path().join("small"), "4m");
    let leaf = small.0.join("leaf.img");
    std::fs::File::create(&leaf)
        .unwrap()
        .set_len(32 * MIB as u64)
        .unwrap();
    let spare = env.dir.path().join("spare.img");
    std::fs::File::create(&spare)
        .unwrap()
        .set_len(32 * MIB as u64)
        .unwrap();
    let vbd = env.create_params(
        &format!("aio:{}", leaf.display()),
        &[
            "-b",
            "none",
            "-2",
            &format!("aio:{}", spare.display()),
            "-s",
        ],
    );
    assert_eq!(drivers(&env, vbd), ["aio"], "a standby is not listed");
    let uri = env.nbd_uri(vbd.0, vbd.1);
    let job = [
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=8",
        "--size=24M",
        "--randseed=7",
    ];
    fio_nbd_verify(env.dir.path(), &uri, &job);
    let stats = stats(&env, vbd);
    let redirected = stats["FIXME_enospc_redirect_count"].as_u64().unwrap();
    assert!(redirected > 0, "{stats}");
    assert_eq!(stats["images"][0]["name"], path_str(&spare));
    assert_eq!(stats["nbd_mirror_failed"], 0);
    // Across a pause the disk still reads as written.
    pause(&env, vbd);
    unpause(&env, vbd, &[]);
    let mut verify = job.to_vec();
    verify.push("--verify_only");
    fio_nbd_verify(env.dir.path(), &uri, &verify);
    env.destroy(vbd.0, vbd.1);
    drop(small);
}

#[test]
fn an_nbd_export_served_as_a_vbd_over_tls() {
    require("openssl");
    require("qemu-io");
    let env = Env::new();
    let pki = env.dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    make_certificates(&pki);
    env.site_config(&format!(
        "[nbd_client]\ntls_certificates = \"{}\"\n",
        pki.display()
    ));
    let remote = env.create(&image(&env, "remote.img", 16), &["-b", "none"]);
    let address = env
        .tap_ctl_ok(&[
            "nbd-listen",
            "-p",
            &remote.0.to_string(),
            "-m",
            &remote.1.to_string(),
            "-l",
            "127.0.0.1:0",
            "-T",
            path_str(&pki),
        ])
        .trim()
        .to_owned();
    let port = address.rsplit_once(':').unwrap().1;
    let local = env.create_params(&format!("nbd:localhost:{port}"), &["-b", "none"]);
    let stats = stats(&env, local);
    let nbd = &stats["images"][0]["driver"];
    assert_eq!(nbd["type"], 15);
    assert_eq!(nbd["status"]["nbd"]["tls"], true);
    assert_eq!(nbd["status"]["nbd"]["handshake"], "go");
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x42 64k 128k"])
            .arg(env.nbd_uri(local.0, local.1)),
    );
    let (same, text) = compare(&env, local, remote);
    assert!(same, "{text}");
    env.destroy(local.0, local.1);
    // Without the certificate authorities, the TLS-only server is refused with a reason.
    env.site_config("");
    let error = env.tap_ctl_err(
        &[
            "create",
            "-b",
            "none",
            "-a",
            &format!("nbd:127.0.0.1:{port}"),
        ],
        libc::EACCES,
    );
    assert!(error.contains("requires TLS"), "{error}");
    env.destroy(remote.0, remote.1);
}

/// Starts `program ARGS` as an NBD server and waits until `ready` holds.
fn start_server(program: &str, args: &[&str], ready: impl FnMut() -> bool) -> ChildGuard {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let server = ChildGuard(Some(child));
    assert!(
        wait_for(Duration::from_secs(10), ready),
        "{program} did not come up"
    );
    server
}

/// A TCP port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `"nbd"` status of a VBD's first image in `tap-ctl stats`, after checking the image is
/// an `nbd:` one (type 15).
fn nbd_status(env: &Env, vbd: (u32, u32)) -> serde_json::Value {
    let stats = stats(env, vbd);
    let driver = &stats["images"][0]["driver"];
    assert_eq!(driver["type"], 15, "{stats}");
    driver["status"]["nbd"].clone()
}

/// Asserts `qemu-img compare` finds raw `file` and the export at `uri` identical.
fn assert_same(file: &Path, uri: &str) {
    let (same, text) = compare_raw(file, uri);
    assert!(same, "{text}");
}

/// Checks that VBD `vbd` reads as `file` does, then writes through it and finds the bytes in
/// `file` (and nothing else changed) once the VBD is gone.
fn served_as_file(env: &Env, vbd: (u32, u32), file: &Path) {
    let before = std::fs::read(file).unwrap();
    assert_same(file, &env.nbd_uri(vbd.0, vbd.1));
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 1M 192k", "-c", "flush"])
            .arg(env.nbd_uri(vbd.0, vbd.1)),
    );
    env.destroy(vbd.0, vbd.1);
    let written = MIB..MIB + 192 * 1024;
    let after = std::fs::read(file).unwrap();
    assert!(after[written.clone()].iter().all(|&b| b == 0x5a));
    assert_eq!(after[..written.start], before[..written.start]);
    assert_eq!(after[written.end..], before[written.end..]);
}

#[test]
fn nbd_images_served_by_qemu_nbd_and_nbdkit() {
    require("qemu-nbd");
    require("nbdkit");
    require("qemu-io");
    require("openssl");
    let env = Env::new();

    // qemu-nbd, newstyle with an export name, as SM spells the locator: NBD_OPT_GO and
    // structured replies (the file's last 2 MiB a hole, read back as hole chunks).
    let file = image(&env, "qemu.img", 4);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(6 * MIB as u64)
        .unwrap();
    let socket = env.dir.path().join("qemu.sock");
    let _qemu = start_server(
        "qemu-nbd",
        &[
            "-f",
            "raw",
            "-t",
            "-x",
            "disk",
            "-k",
            path_str(&socket),
            path_str(&file),
        ],
        || socket.exists(),
    );
    let vbd = env.create_params(
        &format!("nbd:unix:{}:exportname=disk", socket.display()),
        &["-b", "none"],
    );
    let status = nbd_status(&env, vbd);
    assert_eq!(status["handshake"], "go", "{status}");
    assert_eq!(status["structured"], true, "{status}");
    served_as_file(&env, vbd, &file);

    // nbdkit, old style, the locator a plain socket path. Read-only: nbdkit 1.32 advertises
    // FLUSH and FUA in its old-style greeting but refuses both (qemu-io sees the same).
    let file = image(&env, "oldstyle.img", 4);
    let socket = env.dir.path().join("oldstyle.sock");
    let _oldstyle = start_server(
        "nbdkit",
        &[
            "-f",
            "-o",
            "-r",
            "-U",
            path_str(&socket),
            "file",
            path_str(&file),
        ],
        || socket.exists(),
    );
    let vbd = env.create_params(&format!("nbd:{}", socket.display()), &["-b", "none", "-R"]);
    let status = nbd_status(&env, vbd);
    assert_eq!(status["handshake"], "oldstyle", "{status}");
    assert_eq!(status["structured"], false, "{status}");
    assert_same(&file, &env.nbd_uri(vbd.0, vbd.1));
    env.destroy(vbd.0, vbd.1);

    // nbdkit requiring TLS on TCP: the client upgrades with the site's authorities.
    let pki = env.dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    make_certificates(&pki);
    env.site_config(&format!(
        "[nbd_client]\ntls_certificates = \"{}\"\n",
        pki.display()
    ));
    let file = image(&env, "tls.img", 4);
    let port = free_port().to_string();
    let _tls = start_server(
        "nbdkit",
        &[
            "-f",
            "-i",
            "127.0.0.1",
            "-p",
            &port,
            "--tls=require",
            &format!("--tls-certificates={}", pki.display()),
            "file",
            path_str(&file),
        ],
        || std::net::TcpStream::connect(("127.0.0.1", port.parse().unwrap())).is_ok(),
    );
    let vbd = env.create_params(&format!("nbd:localhost:{port}"), &["-b", "none"]);
    let status = nbd_status(&env, vbd);
    assert_eq!(status["tls"], true, "{status}");
    assert_eq!(status["structured"], true, "{status}");
    served_as_file(&env, vbd, &file);
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

#[test]
fn an_nbd_image_reconnects_to_a_restarted_server() {
    require("qemu-nbd");
    require("qemu-io");
    let env = Env::new();
    let file = image(&env, "restart.img", 4);
    let socket = env.dir.path().join("restart.sock");
    let serve = || {
        let _ = std::fs::remove_file(&socket);
        start_server(
            "qemu-nbd",
            &["-f", "raw", "-t", "-k", path_str(&socket), path_str(&file)],
            || socket.exists(),
        )
    };
    let server = serve();
    let vbd = env.create_params(&format!("nbd:unix:{}", socket.display()), &["-b", "none"]);
    // The server goes away; a guest write waits (EAGAIN, retried every second by the VBD)
    // until it is back, then completes on a new connection.
    drop(server);
    let writer = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x3c 2M 64k"])
        .arg(env.nbd_uri(vbd.0, vbd.1))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut writer = ChildGuard(Some(writer));
    std::thread::sleep(Duration::from_secs(2));
    let _server = serve();
    let out = writer.0.take().unwrap().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = nbd_status(&env, vbd);
    assert_eq!(status["connected"], true, "{status}");
    assert_eq!(status["reconnects"], 1, "{status}");
    env.destroy(vbd.0, vbd.1);
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes[2 * MIB..2 * MIB + 65536].iter().all(|&b| b == 0x3c));
}
