//! qcow2 against qemu: images made by `qemu-img`/`qemu-io` (every cluster size from 512 B to
//! 2 MiB, version 2 and 3, extended L2 entries, compressed with zlib and zstd, backing chains
//! of qcow2 and raw images) read identically through our NBD export (`qemu-img compare`); the
//! same writes applied through our export and by qemu directly to a copy give images that
//! `qemu-img check` finds clean (no leak either) and `qemu-img compare` finds identical;
//! NBD block status through our export maps data where qemu's own map of the chain does;
//! discards through our export read back as zeros; encrypted images and external data files
//! are refused by name; a dirty image is repaired, a corrupt one served read-only only; a
//! 16 TiB chain serves its last bytes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{require, run_ok, Env};

const MIB: u64 = 1 << 20;

/// Runs `qemu-io` with the given commands on `target`, failing on error.
fn qemu_io(format: &str, target: &str, commands: &[String]) {
    let mut cmd = Command::new("qemu-io");
    // `-d unmap`: qemu-io ignores `discard` commands otherwise.
    cmd.args(["-f", format, "-d", "unmap"]);
    for command in commands {
        cmd.args(["-c", command]);
    }
    cmd.arg(target);
    let out = run_ok(&mut cmd);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {commands:?} on {target}: {out}"
    );
}

fn qemu_img(args: &[&str]) -> String {
    run_ok(Command::new("qemu-img").args(args))
}

/// `qemu-img check` exit status and output.
fn check(path: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The byte ranges `qemu-img map` reports as data (merged), for `target` opened as `format`:
/// over our NBD export this is our block status as qemu's NBD client reads it.
fn data_ranges(format: &str, target: &str) -> Vec<(u64, u64)> {
    let json = qemu_img(&["map", "--output=json", "-f", format, target]);
    let extents: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for extent in extents {
        if extent["data"] != serde_json::Value::Bool(true) {
            continue;
        }
        let start = extent["start"].as_u64().unwrap();
        let end = start + extent["length"].as_u64().unwrap();
        match ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => ranges.push((start, end)),
        }
    }
    ranges
}

fn compare(a: &str, a_format: &str, b: &str) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-f", a_format, "-F", "raw", a, b])
        .status()
        .unwrap()
        .success()
}

/// Pattern writes spread over a disk of `size` bytes, some cluster aligned, most not.
fn scattered_writes(size: u64, seed: u64) -> Vec<String> {
    let mut rng = common::Lcg(seed);
    let mut commands = Vec::new();
    for i in 0..24 {
        let sectors = 1 + rng.next(if i % 4 == 0 { 512 } else { 24 });
        let sector = rng.next(size / 512 - sectors);
        commands.push(format!(
            "write -P {} {} {}",
            0x20 + i,
            sector * 512,
            sectors * 512
        ));
    }
    commands.push(format!("write -z {} {}", size / 4, size / 8));
    commands
}

struct Case {
    name: String,
    /// Options for `qemu-img create -o`.
    options: String,
    /// Compress the image with `qemu-img convert -c` using this type.
    compress: Option<&'static str>,
    /// Backing chain below the image: "qcow2", "raw" or "qcow2,raw".
    backing: Option<&'static str>,
}

fn case(name: &str, options: &str) -> Case {
    Case {
        name: name.to_owned(),
        options: options.to_owned(),
        compress: None,
        backing: None,
    }
}

/// Builds the case's image in `dir` with qemu; returns its path.
fn build(dir: &Path, case: &Case, size: u64) -> PathBuf {
    let size_arg = size.to_string();
    let mut backing_file: Option<(PathBuf, &str)> = None;
    if let Some(kinds) = case.backing {
        for (level, kind) in kinds.split(',').rev().enumerate() {
            let path = dir.join(format!("base{level}.{kind}"));
            let mut args = vec!["create", "-q", "-f", kind];
            let name;
            if let Some((below, below_kind)) = &backing_file {
                name = below.display().to_string();
                args.extend(["-b", &name, "-F", below_kind]);
            }
            let path_arg = path.display().to_string();
            args.extend([path_arg.as_str(), size_arg.as_str()]);
            qemu_img(&args);
            qemu_io(
                kind,
                &path_arg,
                &scattered_writes(size, 1000 + level as u64),
            );
            backing_file = Some((path, kind));
        }
    }
    let path = dir.join(format!("{}.qcow2", case.name));
    let path_arg = path.display().to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &case.options];
    let below;
    if let Some((file, kind)) = &backing_file {
        below = file.display().to_string();
        args.extend(["-b", &below, "-F", kind]);
    }
    args.extend([path_arg.as_str(), size_arg.as_str()]);
    qemu_img(&args);
    let mut writes = scattered_writes(size, 7);
    // A long run of one cluster size apart, and a zeroed range over data.
    writes.push(format!("write -P 0x77 {} {}", MIB, 2 * MIB));
    writes.push(format!("write -z {} {}", MIB + 4096, 8192));
    qemu_io("qcow2", &path_arg, &writes);
    if let Some(kind) = case.compress {
        let raw = dir.join("plain.qcow2");
        std::fs::rename(&path, &raw).unwrap();
        let raw_arg = raw.display().to_string();
        let mut options = case.options.clone();
        options.push_str(&format!(",compression_type={kind}"));
        qemu_img(&[
            "convert", "-q", "-c", "-f", "qcow2", "-O", "qcow2", "-o", &options, &raw_arg,
            &path_arg,
        ]);
        let info = qemu_img(&["info", &path_arg]);
        assert!(
            info.contains(&format!("compression type: {kind}")),
            "{info}"
        );
    }
    path
}

fn run_case(case: &Case) {
    let env = Env::new();
    let size = 12 * MIB;
    let image = build(env.dir.path(), case, size);
    let reference = env.dir.path().join("reference.qcow2");
    std::fs::copy(&image, &reference).unwrap();
    let (pid, minor) = env.create_params(&format!("qcow2:{}", image.display()), &[]);
    let uri = env.nbd_uri(pid, minor);
    let image_arg = image.display().to_string();
    assert!(
        compare(&image_arg, "qcow2", &uri),
        "{}: qemu and our export read differently",
        case.name
    );
    assert_eq!(
        data_ranges("raw", &uri),
        data_ranges("qcow2", &image_arg),
        "{}: our block status differs from qemu's map",
        case.name
    );
    // The same writes through us and by qemu on the reference copy; a discard through us
    // (NBD TRIM, reading back as zeros) is a zeroing write for qemu.
    let mut writes = scattered_writes(size, 99);
    writes.push(format!("write -P 0x5a {} {}", size - MIB, MIB));
    let mut ours = writes.clone();
    let mut theirs = writes;
    for (offset, len) in [(3 * MIB, MIB), (5 * MIB + 1536, 300 * 1024)] {
        ours.push(format!("discard {offset} {len}"));
        theirs.push(format!("write -z {offset} {len}"));
    }
    ours.push("flush".to_owned());
    theirs.push("flush".to_owned());
    qemu_io("raw", &uri, &ours);
    qemu_io("qcow2", &reference.display().to_string(), &theirs);
    assert!(
        compare(&reference.display().to_string(), "qcow2", &uri),
        "{}: our export differs from qemu's result after the writes",
        case.name
    );
    let exported = data_ranges("raw", &uri);
    env.destroy(pid, minor);
    assert_eq!(
        exported,
        data_ranges("qcow2", &image_arg),
        "{}: our block status differs from qemu's map of what we wrote",
        case.name
    );
    let (status, report) = check(&image);
    assert_eq!(status, 0, "{}: qemu-img check: {report}", case.name);
    let same = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(&image)
        .arg(&reference)
        .status()
        .unwrap();
    assert!(
        same.success(),
        "{}: the image differs from qemu's",
        case.name
    );
}

#[test]
fn qemu_images_of_every_cluster_size_read_and_write_like_qemu() {
    require("qemu-img");
    require("qemu-io");
    for bits in 9..=21 {
        let size = 1u64 << bits;
        run_case(&case(
            &format!("v3-{size}"),
            &format!("cluster_size={size}"),
        ));
    }
    for size in [512u64, 4096, 65536] {
        run_case(&case(
            &format!("v2-{size}"),
            &format!("compat=0.10,cluster_size={size}"),
        ));
    }
    for order in [1u32, 8, 64] {
        run_case(&case(
            &format!("refcount-{order}"),
            &format!("refcount_bits={order}"),
        ));
    }
}

#[test]
fn extended_l2_images() {
    require("qemu-img");
    for size in [16384u64, 65536, 2 * MIB] {
        run_case(&case(
            &format!("extl2-{size}"),
            &format!("extended_l2=on,cluster_size={size}"),
        ));
    }
    run_case(&Case {
        backing: Some("qcow2"),
        ..case("extl2-chain", "extended_l2=on,cluster_size=65536")
    });
}

#[test]
fn compressed_images() {
    require("qemu-img");
    for kind in ["zlib", "zstd"] {
        for options in ["cluster_size=65536", "cluster_size=4096", "compat=0.10"] {
            if kind == "zstd" && options == "compat=0.10" {
                continue; // zstd needs version 3
            }
            run_case(&Case {
                compress: Some(kind),
                ..case(&format!("compressed-{kind}"), options)
            });
        }
    }
}

#[test]
fn backing_chains_of_qcow2_and_raw() {
    require("qemu-img");
    for (name, chain, options) in [
        ("over-qcow2", "qcow2", "cluster_size=65536"),
        ("over-raw", "raw", "cluster_size=65536"),
        ("over-qcow2-raw", "qcow2,raw", "cluster_size=4096"),
        ("v2-over-qcow2", "qcow2", "compat=0.10"),
        ("small-clusters-over-big", "qcow2", "cluster_size=512"),
    ] {
        run_case(&Case {
            backing: Some(chain),
            ..case(name, options)
        });
    }
}

#[test]
fn the_xcpng_hidden_extension_survives_our_writes() {
    require("qemu-img");
    let env = Env::new();
    let image = env.dir.path().join("hidden.qcow2");
    // 512-byte clusters: 10 MiB of writes outgrow the refcount table, so its offset and
    // size in the header are rewritten.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        &image.display().to_string(),
        "10M",
    ]);
    // What SM's setHidden writes: type "vate", length 8, flag byte, over the end marker.
    let mut bytes = std::fs::read(&image).unwrap();
    let end = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    let mut at = end;
    while u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) != 0 {
        let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        at += 8 + len.div_ceil(8) * 8;
    }
    bytes[at..at + 4].copy_from_slice(&0x7661_7465u32.to_be_bytes());
    bytes[at + 4..at + 8].copy_from_slice(&8u32.to_be_bytes());
    bytes[at + 8] = 1;
    std::fs::write(&image, &bytes).unwrap();
    let prefix = bytes[..at + 32].to_vec();
    let (pid, minor) = env.create_params(&format!("qcow2:{}", image.display()), &[]);
    let uri = env.nbd_uri(pid, minor);
    // Enough writes to grow the refcount structures (which rewrites header fields).
    qemu_io("raw", &uri, &["write -P 1 0 10M".to_owned()]);
    env.destroy(pid, minor);
    let after = std::fs::read(&image).unwrap();
    assert_eq!(&after[..48], &prefix[..48]);
    assert_ne!(&after[48..60], &prefix[48..60], "the refcount table moved");
    assert_eq!(&after[60..at + 32], &prefix[60..]);
    assert_eq!(check(&image).0, 0);
}

#[test]
fn a_dirty_image_gets_its_refcounts_rebuilt_before_our_writes() {
    require("qemu-img");
    require("qemu-io");
    let env = Env::new();
    let image = env.dir.path().join("dirty.qcow2");
    let image_arg = image.display().to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,cluster_size=4096",
        &image_arg,
        "12M",
    ]);
    // qemu with lazy refcounts, aborted: refcounts stale, dirty bit set.
    let aborted = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -c 0; exec qemu-io -f qcow2 -c 'write -P 0x31 0 3M' \
             -c 'write -P 0x32 5M 1M' -c abort '{image_arg}'"
        ))
        .output()
        .unwrap();
    assert!(!aborted.status.success());
    assert_eq!(std::fs::read(&image).unwrap()[79] & 1, 1, "dirty bit set");
    assert_eq!(check(&image).0, 2, "stale refcounts are corruptions");
    // qemu's own repair of a copy, as the reference.
    let reference = env.dir.path().join("reference.qcow2");
    std::fs::copy(&image, &reference).unwrap();
    let reference_arg = reference.display().to_string();
    qemu_img(&["check", "-q", "-r", "all", &reference_arg]);
    let (pid, minor) = env.create_params(&format!("qcow2:{image_arg}"), &[]);
    let uri = env.nbd_uri(pid, minor);
    let mut writes = scattered_writes(12 * MIB, 5);
    writes.push("flush".to_owned());
    qemu_io("raw", &uri, &writes);
    qemu_io("qcow2", &reference_arg, &writes);
    env.destroy(pid, minor);
    assert_eq!(
        std::fs::read(&image).unwrap()[79] & 1,
        0,
        "dirty bit cleared"
    );
    let (status, report) = check(&image);
    assert_eq!(status, 0, "qemu-img check: {report}");
    let same = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(&image)
        .arg(&reference)
        .status()
        .unwrap();
    assert!(same.success(), "the image differs from qemu's");
}

#[test]
fn encryption_and_external_data_files_are_refused_by_name() {
    require("qemu-img");
    let env = Env::new();
    let dir = env.dir.path();
    let encrypted = dir.join("luks.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                "secret,id=s0,data=secret",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s0",
            ])
            .arg(&encrypted)
            .arg("4M"),
    );
    let external = dir.join("external.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("data_file={}", dir.join("data.raw").display()))
            .arg(&external)
            .arg("4M"),
    );
    for (image, what) in [
        (&encrypted, "encryption (LUKS"),
        (&external, "external data file"),
    ] {
        for extra in [&[][..], &["-R"][..]] {
            let mut args = vec!["create", "-a"];
            let params = format!("qcow2:{}", image.display());
            args.push(&params);
            args.extend_from_slice(extra);
            let err = env.tap_ctl_err(&args, libc::EOPNOTSUPP);
            assert!(err.contains(what), "{err}");
        }
    }
}

/// Beyond VHD's 2 TiB: a 16 TiB disk (SM's largest qcow2) and a snapshot child of it, as SM
/// makes them, serve writes across the 2 TiB mark and at the last megabyte; qemu reads them
/// back through the chain and finds both images clean.
#[test]
fn a_16_tib_disk_and_its_snapshot_serve_their_last_bytes() {
    require("qemu-img");
    require("qemu-io");
    require("nbdinfo");
    let env = Env::new();
    let (tib, size) = (1u64 << 40, 16u64 << 40);
    let base = env.dir.path().join("base.qcow2");
    let child = env.dir.path().join("child.qcow2");
    let (base_arg, child_arg) = (base.display().to_string(), child.display().to_string());
    qemu_img(&["create", "-q", "-f", "qcow2", &base_arg, "16T"]);
    let (pid, minor) = env.create_params(&format!("qcow2:{base_arg}"), &[]);
    let uri = env.nbd_uri(pid, minor);
    let info = run_ok(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(info.trim(), size.to_string());
    qemu_io(
        "raw",
        &uri,
        &[
            format!("write -P 0x61 {} {}", 2 * tib - 4096, 8192),
            format!("write -P 0x62 {} {MIB}", size - MIB),
            "flush".to_owned(),
        ],
    );
    env.destroy(pid, minor);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "-o",
        "cluster_size=65536",
        &child_arg,
    ]);
    let (pid, minor) = env.create_params(&format!("qcow2:{child_arg}"), &[]);
    let uri = env.nbd_uri(pid, minor);
    qemu_io(
        "raw",
        &uri,
        &[
            format!("read -P 0x61 {} {}", 2 * tib - 4096, 8192),
            format!("write -P 0x63 {} {}", size - 4096, 4096),
            format!("write -P 0x64 {} {}", 3 * tib, 4096),
            "flush".to_owned(),
        ],
    );
    env.destroy(pid, minor);
    for image in [&base, &child] {
        let (status, report) = check(image);
        assert_eq!(status, 0, "{}: {report}", image.display());
    }
    qemu_io(
        "qcow2",
        &child_arg,
        &[
            format!("read -P 0x61 {} {}", 2 * tib - 4096, 8192),
            format!("read -P 0x62 {} {}", size - MIB, MIB - 4096),
            format!("read -P 0x63 {} {}", size - 4096, 4096),
            format!("read -P 0x64 {} {}", 3 * tib, 4096),
            format!("read -P 0 {} {}", 3 * tib + 4096, 4096),
        ],
    );
}

/// An image whose corrupt bit is set (as qemu leaves one after catching inconsistent
/// metadata) is refused for writing with an error saying so and how to repair it, and is
/// served read-only as qemu serves it.
#[test]
fn a_corrupt_image_is_served_read_only_only() {
    require("qemu-img");
    require("qemu-io");
    let env = Env::new();
    let image = env.dir.path().join("corrupt.qcow2");
    let image_arg = image.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &image_arg, "4M"]);
    qemu_io("qcow2", &image_arg, &["write -P 0x41 0 64k".to_owned()]);
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[79] |= 2;
    std::fs::write(&image, &bytes).unwrap();
    let params = format!("qcow2:{image_arg}");
    let err = env.tap_ctl_err(&["create", "-a", &params], libc::EOPNOTSUPP);
    assert!(
        err.contains("marked corrupt") && err.contains("qemu-img check -r all"),
        "{err}"
    );
    let (pid, minor) = env.create_params(&params, &["-R"]);
    let uri = env.nbd_uri(pid, minor);
    let out = run_ok(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x41 0 64k",
        "-c",
        "read -P 0 64k 64k",
        &uri,
    ]));
    assert!(!out.contains("fail"), "{out}");
    env.destroy(pid, minor);
    assert_eq!(std::fs::read(&image).unwrap(), bytes, "nothing written");
}
