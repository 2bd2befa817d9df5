//! Drives the built `vhd-util` binary: command outputs and exit statuses,
//! chains, coalesce, resize, repair, modify, and crash injection (the
//! process aborts after N writes; afterwards `check` passes or `revert`
//! restores the old image). Crash injection needs a binary built with the
//! `crash-injection` feature, which the tests build themselves.

// Test images are a few MiB: sizes and offsets always fit in usize.
#![allow(clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use vhd::Chain;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vhd-util")
}

/// `vhd-util` built with the `crash-injection` feature (the shipped binary has no crash
/// hook), once per test run, in a target directory of its own.
fn crash_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("crash-injection");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "vhd-util", "--features"])
            .arg("crash-injection")
            .arg("--target-dir")
            .arg(&target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building vhd-util with crash injection");
        target.join("debug").join("vhd-util")
    })
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run vhd-util")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    assert!(
        o.status.success(),
        "vhd-util {args:?} failed ({:?}): {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn read_all(path: &Path) -> Vec<u8> {
    let chain = Chain::open(path, false).unwrap();
    let mut buf = vec![0u8; chain.leaf().virtual_size() as usize];
    chain.read(0, &mut buf).unwrap();
    buf
}

/// `dir/name` as `query -p` prints a parent: canonical and absolute.
fn abs(dir: &Path, name: &str) -> String {
    std::fs::canonicalize(dir.join(name))
        .unwrap()
        .display()
        .to_string()
}

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| seed.wrapping_add((i % 241) as u8)).collect()
}

fn write(path: &Path, sector: u64, data: &[u8]) {
    let mut c = Chain::open(path, true).unwrap();
    c.write(sector, data).unwrap();
}

#[test]
fn usage_errors_exit_einval() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(run(d.path(), &[]).status.code(), Some(22));
    assert_eq!(run(d.path(), &["bogus"]).status.code(), Some(22));
    assert_eq!(
        run(d.path(), &["create", "-n", "x.vhd"]).status.code(),
        Some(22)
    );
    assert_eq!(run(d.path(), &["query", "-q"]).status.code(), Some(22));
    let o = run(d.path(), &["query", "-n", "missing.vhd", "-v"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "error opening missing.vhd: -2\n"
    );
}

#[test]
fn create_query_set_scan() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(p, &["create", "-n", "a.vhd", "-s", "100", "-S", "1024"]);
    assert_eq!(ok(p, &["check", "-n", "a.vhd"]), "a.vhd is valid\n");
    assert_eq!(
        ok(
            p,
            &["query", "-n", "a.vhd", "-v", "-s", "-p", "-f", "-m", "-d", "-S", "-a"]
        ),
        "100\n5120\na.vhd has no parent\nhidden: 0\nmarker: 0\nchain depth: 1\n1024\n0\n"
    );
    ok(p, &["set", "-n", "a.vhd", "-f", "hidden", "-v", "1"]);
    ok(p, &["set", "-n", "a.vhd", "-f", "marker", "-v", "1"]);
    assert_eq!(
        ok(p, &["query", "-n", "a.vhd", "-f", "-m"]),
        "hidden: 1\nmarker: 1\n"
    );
    assert_eq!(ok(p, &["check", "-n", "a.vhd"]), "a.vhd is valid\n");
    assert_eq!(
        run(p, &["set", "-n", "a.vhd", "-f", "bogus", "-v", "1"])
            .status
            .code(),
        Some(22)
    );
    ok(p, &["snapshot", "-n", "b.vhd", "-p", "a.vhd"]);
    ok(p, &["create", "-n", "f.vhd", "-s", "4", "-r"]);
    // The parent as a canonical absolute path, though the child was named
    // relative to the current directory (SM parses it as a path).
    assert_eq!(
        ok(p, &["query", "-n", "b.vhd", "-p", "-d"]),
        format!("{}\nchain depth: 2\n", abs(p, "a.vhd"))
    );
    assert_eq!(
        ok(p, &["scan", "a.vhd", "b.vhd", "f.vhd"]),
        "vhd=a.vhd capacity=104857600 size=5120 hidden=1 parent=none\n\
         vhd=b.vhd capacity=104857600 size=5120 hidden=0 parent=a.vhd\n\
         vhd=f.vhd capacity=4194304 size=4194816 hidden=0 parent=none\n"
    );
    // -m is a glob over the file system; operands follow in their order.
    assert_eq!(
        ok(p, &["scan", "-p", "-m", "*.vhd", "b.vhd", "a.vhd"]),
        "vhd=a.vhd capacity=104857600 size=5120 hidden=1 parent=none\n   \
         vhd=b.vhd capacity=104857600 size=5120 hidden=0 parent=a.vhd\n\
         vhd=f.vhd capacity=4194304 size=4194816 hidden=0 parent=none\n"
    );
    assert_eq!(
        ok(p, &["scan", "f.vhd", "b.vhd"]),
        "vhd=f.vhd capacity=4194304 size=4194816 hidden=0 parent=none\n\
         vhd=b.vhd capacity=104857600 size=5120 hidden=0 parent=a.vhd\n"
    );
    // -a follows parents; -v prints full paths.
    let full = |n: &str| p.join(n).display().to_string();
    assert_eq!(
        ok(p, &["scan", "-a", "b.vhd"]),
        "vhd=b.vhd capacity=104857600 size=5120 hidden=0 parent=a.vhd\n\
         vhd=a.vhd capacity=104857600 size=5120 hidden=1 parent=none\n"
    );
    assert!(ok(p, &["scan", "-v", &full("b.vhd")])
        .starts_with(&format!("vhd={} capacity=", full("b.vhd"))));
    assert!(ok(p, &["scan", "-M", "a.vhd"]).contains(" marker=1 keyhash= parent=none"));
    std::fs::write(p.join("junk.vhd"), b"not a vhd").unwrap();
    let o = run(p, &["scan", "junk.vhd", "a.vhd"]);
    assert_eq!(o.status.code(), Some(22));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "vhd=junk.vhd scan-error=-22 error-message='opening file'\n"
    );
    // -c continues and exits 0; a missing operand fails before scanning.
    let o = run(p, &["scan", "-c", "junk.vhd", "a.vhd"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "vhd=junk.vhd scan-error=-22 error-message='opening file'\n\
         vhd=a.vhd capacity=104857600 size=5120 hidden=1 parent=none\n"
    );
    let o = run(p, &["scan", "a.vhd", "gone.vhd"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "vhd=gone.vhd scan-error=-2 error-message='failure scanning target'\nscan failed: -2\n"
    );
    assert_eq!(run(p, &["scan"]).status.code(), Some(22));
    std::fs::remove_file(p.join("junk.vhd")).unwrap();
    // -l VG: stand-in `vgs` and `lvs` print what lvm2 prints for a group
    // whose physical volume is the file "pv" (1 MiB before the first
    // extent, 4 MiB extents); volumes are read from it at their extents.
    // The images are made as files named like the device-mapper nodes of
    // volumes VHD-p (a copy of a.vhd) and VHD-c (its snapshot), so the
    // locators record what they record on LVHD.
    std::fs::copy(p.join("a.vhd"), p.join("VG_test-VHD--p")).unwrap();
    ok(
        p,
        &["snapshot", "-n", "VG_test-VHD--c", "-p", "VG_test-VHD--p"],
    );
    let bin_dir = p.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let pv = p.join("pv");
    let extent = |i: u64| (1 << 20) + i * (4 << 20);
    let place = |file: &str, to: u64| {
        let data = std::fs::read(p.join(file)).unwrap();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&pv)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &data, to).unwrap();
        f.set_len(extent(6)).unwrap();
    };
    place("VG_test-VHD--p", extent(2));
    place("VG_test-VHD--c", extent(4));
    place("f.vhd", extent(0));
    let pvn = pv.display();
    let script = |name: &str, body: String| {
        let path = bin_dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\ncat <<'EOF'\n{body}\nEOF\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    };
    script(
        "vgs",
        format!(
            r#"{{"report": [{{"vg": [{{"vg_name":"VG_test", "vg_extent_size":"4194304", "pv_name":"{pvn}", "pe_start":"1048576"}}]}}]}}"#
        ),
    );
    let seg = |lv: &str, size: u64, start: u64, len: u64, dev: String| {
        format!(
            r#"{{"lv_name":"{lv}", "lv_size":"{size}", "segtype":"linear", "seg_start":"{start}", "seg_size":"{len}", "devices":"{dev}"}}"#
        )
    };
    script(
        "lvs",
        format!(
            r#"{{"report": [{{"seg": [{}, {}, {}, {}, {}]}}]}}"#,
            seg("MGT", 4 << 20, 0, 4 << 20, format!("{pvn}(1)")),
            seg("VHD-c", 8 << 20, 0, 4 << 20, format!("{pvn}(4)")),
            seg("VHD-c", 8 << 20, 4 << 20, 4 << 20, format!("{pvn}(5)")),
            seg("VHD-f", 4 << 20, 0, 4 << 20, format!("{pvn}(0)")),
            seg("VHD-p", 4 << 20, 0, 4 << 20, format!("{pvn}(2)")),
        ),
    );
    let scan_l = |args: &[&str]| {
        Command::new(bin())
            .args(["scan", "-l", "VG_test"])
            .args(args)
            .current_dir(p)
            .env("PATH", format!("{}:/usr/bin:/bin", bin_dir.display()))
            .output()
            .unwrap()
    };
    // Dynamic images are read through their footer copy at offset 0; size
    // is the volume's; parents are named by volume. VHD-f is fixed (its
    // footer is not at the start): an error, passed over with -c.
    let o = scan_l(&["-f", "-m", "VHD-*", "-c"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "vhd=VHD-c capacity=104857600 size=8388608 hidden=0 parent=VHD-p\n\
         vhd=VHD-f scan-error=-22 error-message='invalid footer'\n\
         vhd=VHD-p capacity=104857600 size=4194304 hidden=1 parent=none\n"
    );
    assert_eq!(o.status.code(), Some(0));
    // -a adds the parent found among the group's volumes; -M the markers.
    let o = scan_l(&["-m", "VHD-c", "-a", "-M"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "vhd=VHD-c capacity=104857600 size=8388608 hidden=0 marker=0 keyhash= parent=VHD-p\n\
         vhd=VHD-p capacity=104857600 size=4194304 hidden=1 marker=1 keyhash= parent=none\n"
    );
    assert_eq!(o.status.code(), Some(0));
    let o = scan_l(&["-m", "VHD-f"]);
    assert_eq!(o.status.code(), Some(22));
    // A group lvm does not know: the C tool's lines on stderr, EINVAL.
    std::fs::write(
        bin_dir.join("vgs"),
        "#!/bin/sh\necho '  Volume group \"x\" not found' >&2\nexit 5\n",
    )
    .unwrap();
    let o = scan_l(&["-m", "VHD-*"]);
    assert_eq!(o.status.code(), Some(22));
    assert!(String::from_utf8_lossy(&o.stderr).contains("scan failed: -22"));
    // Depth limit.
    let o = run(
        p,
        &["snapshot", "-n", "c.vhd", "-p", "b.vhd", "-l", "2", "-e"],
    );
    assert_eq!(o.status.code(), Some(28));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "snapshot depth exceeded: current depth: 2, limit: 2\n"
    );
    ok(
        p,
        &["snapshot", "-n", "c.vhd", "-p", "b.vhd", "-l", "3", "-e"],
    );
    // A missing parent fails silently with its errno.
    let o = run(p, &["snapshot", "-n", "x.vhd", "-p", "missing.vhd"]);
    assert_eq!((o.status.code(), o.stdout.len()), (Some(2), 0));
}

#[test]
fn chain_coalesce_resize_modify_repair() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(p, &["create", "-n", "base.vhd", "-s", "16"]);
    write(&p.join("base.vhd"), 0, &pattern(1, 3 << 20));
    ok(p, &["snapshot", "-n", "child.vhd", "-p", "base.vhd"]);
    write(&p.join("child.vhd"), 100, &pattern(2, 5 << 20));
    let before = read_all(&p.join("child.vhd"));
    // Parents are named as found: canonical and absolute, like the C tool's.
    assert_eq!(
        ok(p, &["check", "-n", "child.vhd", "-p"]),
        format!("child.vhd is valid\n{} is valid\n", abs(p, "base.vhd"))
    );
    // Copy (flatten) and coalesce -o.
    ok(p, &["copy", "-n", "child.vhd", "-N", "flat.vhd"]);
    assert_eq!(read_all(&p.join("flat.vhd")), before);
    // Coalesce into the parent.
    let out = ok(p, &["coalesce", "-n", "child.vhd"]);
    assert_eq!(out, format!("Coalesced {} sectors", (5 << 20) / 512));
    assert_eq!(read_all(&p.join("base.vhd")), before);
    ok(p, &["check", "-n", "base.vhd"]);
    // Reparent the child onto the flat copy (same data).
    ok(p, &["modify", "-n", "child.vhd", "-p", "flat.vhd"]);
    assert_eq!(
        ok(p, &["query", "-n", "child.vhd", "-p"]),
        format!("{}\n", abs(p, "flat.vhd"))
    );
    ok(p, &["check", "-n", "child.vhd"]);
    assert_eq!(read_all(&p.join("child.vhd")), before);
    // Resize: journaled grows the BAT, fast needs -S.
    ok(
        p,
        &[
            "resize",
            "-n",
            "base.vhd",
            "-s",
            "600",
            "-j",
            "base.journal",
        ],
    );
    assert!(!p.join("base.journal").exists());
    ok(p, &["check", "-n", "base.vhd"]);
    assert_eq!(ok(p, &["query", "-n", "base.vhd", "-v"]), "600\n");
    assert_eq!(&read_all(&p.join("base.vhd"))[..before.len()], &before[..]);
    let o = run(p, &["resize", "-n", "flat.vhd", "-s", "600", "-f"]);
    assert_eq!(o.status.code(), Some(28));
    ok(p, &["create", "-n", "pre.vhd", "-s", "16", "-S", "64"]);
    ok(p, &["resize", "-n", "pre.vhd", "-s", "64", "-f"]);
    assert_eq!(ok(p, &["query", "-n", "pre.vhd", "-v"]), "64\n");
    // Fill allocates every block.
    ok(p, &["fill", "-n", "pre.vhd"]);
    assert_eq!(ok(p, &["query", "-n", "pre.vhd", "-a"]), "32\n");
    ok(p, &["check", "-n", "pre.vhd"]);
    // Repair a destroyed primary footer from the backup.
    let len = std::fs::metadata(p.join("flat.vhd")).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p.join("flat.vhd"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 512], len - 512).unwrap();
    drop(f);
    let o = run(p, &["check", "-n", "flat.vhd"]);
    assert_eq!(o.status.code(), Some(22));
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("primary footer invalid: invalid cookie\n")
    );
    ok(p, &["repair", "-n", "flat.vhd", "-b"]);
    ok(p, &["check", "-n", "flat.vhd"]);
    assert_eq!(read_all(&p.join("flat.vhd")), before);
    // modify -z drops all data.
    ok(p, &["modify", "-n", "flat.vhd", "-z"]);
    assert_eq!(ok(p, &["query", "-n", "flat.vhd", "-a"]), "0\n");
    // key: set, check, print, on an image without blocks (one that holds
    // data is refused, as by the C tool).
    std::fs::write(p.join("k"), [7u8; 32]).unwrap();
    let o = run(p, &["key", "-s", "-n", "pre.vhd", "-k", "k"]);
    assert_eq!(o.status.code(), Some(22));
    assert!(String::from_utf8_lossy(&o.stdout).contains("non-empty"));
    assert_eq!(ok(p, &["key", "-p", "-n", "pre.vhd"]), "none\n");
    ok(p, &["create", "-n", "enc.vhd", "-s", "16"]);
    ok(p, &["key", "-s", "-n", "enc.vhd", "-k", "k"]);
    ok(p, &["key", "-c", "-n", "enc.vhd", "-k", "k"]);
    std::fs::write(p.join("k2"), [8u8; 32]).unwrap();
    assert_eq!(
        run(p, &["key", "-c", "-n", "enc.vhd", "-k", "k2"])
            .status
            .code(),
        Some(22)
    );
    assert_eq!(ok(p, &["key", "-p", "-n", "enc.vhd"]).len(), 130);
}

fn copy_dir(files: &[&str], from: &Path, to: &Path) {
    for f in files {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Runs `args` in copies of the `setup` directory with the process aborted
/// after 0, 1, 2, ... writes until it completes. After each crash either
/// `files[0]` checks valid, or the journal (`journal`, relative to the
/// directory; `None` = the default `<image>.journal`) exists and `revert`
/// makes it valid again; then `verify(dir, maybe_new)` runs. Returns the
/// number of crash points and of reverts.
fn crash_loop(
    setup: &dyn Fn(&Path),
    files: &[&str],
    args: &[&str],
    journal: Option<&str>,
    verify: &dyn Fn(&Path, bool),
) -> (usize, usize) {
    let default_journal = format!("{}.journal", files[0]);
    let journal = journal.unwrap_or(&default_journal);
    let tmpl = tempfile::tempdir().unwrap();
    setup(tmpl.path());
    let mut reverts = 0;
    for n in 0..400 {
        let d = tempfile::tempdir().unwrap();
        copy_dir(files, tmpl.path(), d.path());
        let o = Command::new(crash_bin())
            .args(args)
            .current_dir(d.path())
            .env("VHD_UTIL_CRASH_AFTER_WRITES", n.to_string())
            .output()
            .unwrap();
        let crashed = !o.status.success();
        if !crashed {
            verify(d.path(), true);
            // Every earlier run crashed.
            return (n, reverts);
        }
        let reverted = if run(d.path(), &["check", "-n", files[0]]).status.success() {
            false
        } else {
            assert!(
                d.path().join(journal).exists(),
                "{args:?}: crash after {n} writes: invalid image, no journal"
            );
            ok(d.path(), &["revert", "-n", files[0], "-j", journal]);
            ok(d.path(), &["check", "-n", files[0]]);
            reverts += 1;
            true
        };
        verify(
            d.path(),
            !reverted
                && run(d.path(), &["query", "-n", files[0], "-v"])
                    .status
                    .success(),
        );
    }
    panic!("operation never completed");
}

#[test]
#[cfg(not(feature = "crash-injection"))]
fn the_shipped_binary_has_no_crash_hook() {
    let d = tempfile::tempdir().unwrap();
    ok(d.path(), &["create", "-n", "x.vhd", "-s", "4"]);
    let o = Command::new(bin())
        .args(["set", "-n", "x.vhd", "-f", "hidden", "-v", "1"])
        .current_dir(d.path())
        .env("VHD_UTIL_CRASH_AFTER_WRITES", "0")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(ok(d.path(), &["query", "-n", "x.vhd", "-f"]).contains("hidden: 1"));
}

#[test]
fn crash_injection_resize_and_coalesce() {
    let setup = |p: &Path| {
        ok(p, &["create", "-n", "base.vhd", "-s", "8"]);
        write(&p.join("base.vhd"), 0, &pattern(1, 3 << 20));
        ok(p, &["snapshot", "-n", "child.vhd", "-p", "base.vhd"]);
        write(&p.join("child.vhd"), 2048, &pattern(2, 4 << 20));
    };
    let tmpl = tempfile::tempdir().unwrap();
    setup(tmpl.path());
    let expected = read_all(&tmpl.path().join("child.vhd"));
    let base_expected = read_all(&tmpl.path().join("base.vhd"));
    let (crashes, reverts) = crash_loop(
        &setup,
        &["base.vhd", "child.vhd"],
        &["resize", "-n", "base.vhd", "-s", "300", "-j", "j"],
        Some("j"),
        &|d, _| {
            let data = read_all(&d.join("base.vhd"));
            assert_eq!(&data[..base_expected.len()], &base_expected[..]);
        },
    );
    assert!(
        crashes > 5 && reverts > 0,
        "crashes {crashes} reverts {reverts}"
    );
    let (crashes, _) = crash_loop(
        &setup,
        &["base.vhd", "child.vhd"],
        &["coalesce", "-n", "child.vhd"],
        None,
        &|d, _| {
            ok(d, &["check", "-n", "child.vhd", "-p"]);
            assert_eq!(read_all(&d.join("child.vhd")), expected);
        },
    );
    assert!(crashes > 5);
}

#[test]
fn crash_injection_set_modify_repair_fast_resize() {
    let setup = |p: &Path| {
        ok(p, &["create", "-n", "base.vhd", "-s", "8", "-S", "64"]);
        write(&p.join("base.vhd"), 0, &pattern(1, 3 << 20));
        ok(p, &["snapshot", "-n", "child.vhd", "-p", "base.vhd"]);
        write(&p.join("child.vhd"), 2048, &pattern(2, 4 << 20));
        std::fs::copy(p.join("base.vhd"), p.join("other-base.vhd")).unwrap();
    };
    let tmpl = tempfile::tempdir().unwrap();
    setup(tmpl.path());
    let child_data = read_all(&tmpl.path().join("child.vhd"));
    let base_data = read_all(&tmpl.path().join("base.vhd"));
    let files = ["child.vhd", "base.vhd", "other-base.vhd"];
    let base_first = ["base.vhd", "child.vhd"];
    let cases: Vec<(&[&str], &[&str], Option<&str>)> = vec![
        (
            &base_first,
            &["resize", "-n", "base.vhd", "-s", "64", "-f"],
            None,
        ),
        (
            &base_first,
            &["resize", "-n", "base.vhd", "-s", "32", "-f", "-j", "fast.j"],
            Some("fast.j"),
        ),
        (
            &base_first,
            &["set", "-n", "base.vhd", "-f", "hidden", "-v", "1"],
            None,
        ),
        (
            &files,
            &["modify", "-n", "child.vhd", "-p", "other-base.vhd"],
            None,
        ),
        (&base_first, &["repair", "-n", "base.vhd", "-b"], None),
    ];
    for (files, args, journal) in cases {
        let (crashes, reverts) = crash_loop(&setup, files, args, journal, &|d, _| {
            ok(d, &["check", "-n", "child.vhd", "-p"]);
            assert_eq!(read_all(&d.join("child.vhd")), child_data, "{args:?}");
            let base = read_all(&d.join("base.vhd"));
            assert_eq!(&base[..base_data.len()], &base_data[..], "{args:?}");
        });
        assert!(crashes > 3, "{args:?}: {crashes} crash points");
        if args[0] != "repair" {
            assert!(reverts > 0, "{args:?}: no revert needed");
        }
    }
}

fn bat_entry(path: &Path, block: usize) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let img = vhd::VhdImage::open(f, "x", vhd::OpenOptions::read_only()).unwrap();
    u64::from(img.bat().entries[block])
}

#[test]
fn check_data_and_stats_and_read_dumps() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(p, &["create", "-n", "base.vhd", "-s", "16"]);
    write(&p.join("base.vhd"), 0, &pattern(1, 3 << 20));
    ok(p, &["snapshot", "-n", "child.vhd", "-p", "base.vhd"]);
    let child_data = pattern(2, 5 << 20);
    write(&p.join("child.vhd"), 100, &child_data);

    // -s replaces "is valid" with allocation statistics, root first.
    assert_eq!(
        ok(p, &["check", "-n", "base.vhd", "-s"]),
        "base.vhd: secs allocated: 0x2000 secs written: 0x1800 (75.00%)\n"
    );
    assert_eq!(
        ok(p, &["check", "-n", "child.vhd", "-s", "-p"]),
        "base.vhd: secs allocated: 0x2000 secs written: 0x1800 (75.00%)\n\
         child.vhd: secs allocated: 0x3000 secs written: 0x2800 (83.33%) \
         secs not in parent: 0x1064 (40.98%) secs not in ancestors: 0x1064 (40.98%)\n"
    );
    assert_eq!(
        ok(p, &["check", "-n", "child.vhd", "-b"]),
        "child.vhd is valid\n"
    );
    assert_eq!(
        run(p, &["check", "-n", "child.vhd", "-b", "-B"])
            .status
            .code(),
        Some(22)
    );
    assert_eq!(
        ok(p, &["check", "-n", "child.vhd", "-B", "-I", "-t"]),
        "child.vhd is valid\n"
    );

    // read: translation, BAT, bitmap tests, extents, batmap, raw data.
    let b0 = bat_entry(&p.join("child.vhd"), 0) * 512;
    assert_eq!(
        ok(p, &["read", "-n", "child.vhd", "-t", "100"]),
        format!(
            "logical sector 100: block number: 0, sector offset: 100, file offset: {}\n",
            b0 + 512 + 100 * 512
        )
    );
    assert_eq!(
        ok(p, &["read", "-n", "child.vhd", "-b", "2", "-c", "2"]),
        format!(
            "block: 2: offset: {}\nblock: 3: offset: not allocated\n",
            bat_entry(&p.join("child.vhd"), 2) * 512
        )
    );
    assert_eq!(
        ok(p, &["read", "-n", "child.vhd", "-i", "99", "-c", "2", "-x"]),
        "block 0: sec: 0x63: 0\nblock 0: sec: 0x64: 1\n"
    );
    assert_eq!(
        ok(p, &["read", "-n", "child.vhd", "-e", "0", "-c", "8192"]),
        "100 8092\n"
    );
    assert_eq!(
        ok(
            p,
            &["read", "-n", "child.vhd", "-e", "0", "-c", "16384", "-x"]
        ),
        "0x64 0x2800\n"
    );
    let bitmap = run(p, &["read", "-n", "child.vhd", "-m", "0"]).stdout;
    assert_eq!(bitmap.len(), 512);
    assert_eq!((bitmap[11], bitmap[12], bitmap[13]), (0, 0x0f, 0xff));
    assert_eq!(
        ok(p, &["read", "-n", "child.vhd", "-d", "3"]),
        "block 3 not allocated\n"
    );
    let o = run(p, &["read", "-n", "child.vhd", "-j", "0", "-c", "2"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "batmap for block 0: 0\nbatmap for block 1: 1\n"
    );
    let map = run(p, &["read", "-n", "child.vhd", "-a"]).stdout;
    assert_eq!((map.len(), map[0]), (512, 0x40));
    assert_eq!(
        run(p, &["read", "-n", "child.vhd", "-B"]).stdout,
        vec![0xe0]
    );
    assert_eq!(
        run(p, &["read", "-n", "child.vhd", "-b", "8"])
            .status
            .code(),
        Some(34)
    );
    let raw = run(p, &["read", "-n", "child.vhd", "-r", "100", "-c", "2"]).stdout;
    assert_eq!(raw, child_data[..1024]);
    let raw = run(p, &["read", "-n", "child.vhd", "-R", "51210", "-c", "5"]).stdout;
    assert_eq!(raw, child_data[10..15]);
    // Through the chain: sector 0 comes from the parent.
    let raw = run(p, &["read", "-n", "child.vhd", "-r", "0", "-c", "1"]).stdout;
    assert_eq!(raw, pattern(1, 512));
    let block = run(p, &["read", "-n", "child.vhd", "-d", "1"]).stdout;
    assert_eq!(block.len(), 2 << 20);
    assert!(
        ok(p, &["read", "-n", "child.vhd", "-p"]).contains("       decoded name : ./base.vhd\n")
    );

    // Data where the bitmap says "not here": only -b notices.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p.join("child.vhd"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xaa], b0 + 512 + 3 * 512 + 17).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xbb], b0 + 512 + 7 * 512).unwrap();
    drop(f);
    assert_eq!(ok(p, &["check", "-n", "child.vhd"]), "child.vhd is valid\n");
    let o = run(p, &["check", "-n", "child.vhd", "-b"]);
    assert_eq!(o.status.code(), Some(22));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with(
        "sector 0x3 of block 0x0 has data where bitmap is clear\n\
         sector 0x7 of block 0x0 has data where bitmap is clear\n\
         child.vhd appears invalid; dumping metadata\n\
         VHD Footer Summary:\n"
    ));
}

#[test]
fn snapshot_skips_empty_parents_and_preallocates() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(p, &["create", "-n", "base.vhd", "-s", "16"]);
    write(&p.join("base.vhd"), 0, &pattern(1, 1 << 20));
    ok(p, &["snapshot", "-n", "mid.vhd", "-p", "base.vhd"]);
    // mid is empty: a snapshot of it links to base unless -e.
    ok(p, &["snapshot", "-n", "leaf.vhd", "-p", "mid.vhd"]);
    let parent = |leaf: &str| ok(p, &["query", "-n", leaf, "-p"]);
    assert_eq!(parent("leaf.vhd"), format!("{}\n", abs(p, "base.vhd")));
    ok(p, &["snapshot", "-n", "leaf-e.vhd", "-p", "mid.vhd", "-e"]);
    assert_eq!(parent("leaf-e.vhd"), format!("{}\n", abs(p, "mid.vhd")));
    // A non-empty differencing parent is linked as given.
    write(&p.join("mid.vhd"), 8, &pattern(2, 512));
    ok(p, &["snapshot", "-n", "leaf2.vhd", "-p", "mid.vhd"]);
    assert_eq!(parent("leaf2.vhd"), format!("{}\n", abs(p, "mid.vhd")));
    assert_eq!(
        ok(p, &["query", "-n", "leaf2.vhd", "-d"]),
        "chain depth: 3\n"
    );
    // Skipping keeps the size of the parent given, when the chain's differ.
    ok(p, &["snapshot", "-n", "grown.vhd", "-p", "base.vhd"]);
    ok(p, &["resize", "-n", "grown.vhd", "-s", "32", "-j", "g.j"]);
    ok(p, &["snapshot", "-n", "leaf3.vhd", "-p", "grown.vhd"]);
    assert_eq!(ok(p, &["query", "-n", "leaf3.vhd", "-v"]), "32\n");
    assert_eq!(parent("leaf3.vhd"), format!("{}\n", abs(p, "base.vhd")));
    ok(p, &["check", "-n", "leaf3.vhd", "-p"]);
    // An empty disk over a raw parent: the snapshot gets the raw parent.
    std::fs::write(p.join("raw.img"), vec![7u8; 4 << 20]).unwrap();
    ok(
        p,
        &["snapshot", "-n", "over-raw.vhd", "-p", "raw.img", "-m"],
    );
    ok(p, &["snapshot", "-n", "leaf4.vhd", "-p", "over-raw.vhd"]);
    assert_eq!(parent("leaf4.vhd"), format!("{}\n", abs(p, "raw.img")));
    assert_eq!(read_all(&p.join("leaf4.vhd")), vec![7u8; 4 << 20]);
    // -S preallocates metadata that resize -f grows into.
    ok(
        p,
        &[
            "snapshot", "-n", "pre.vhd", "-p", "base.vhd", "-S", "64", "-e",
        ],
    );
    assert_eq!(ok(p, &["query", "-n", "pre.vhd", "-S", "-v"]), "16\n64\n");
    ok(p, &["resize", "-n", "pre.vhd", "-s", "64", "-f"]);
    assert_eq!(ok(p, &["query", "-n", "pre.vhd", "-v"]), "64\n");
    ok(p, &["check", "-n", "pre.vhd", "-p"]);
    let o = run(p, &["resize", "-n", "pre.vhd", "-s", "66", "-f"]);
    assert_eq!(o.status.code(), Some(28));
    ok(p, &["create", "-n", "cre.vhd", "-s", "8", "-S", "40"]);
    ok(p, &["resize", "-n", "cre.vhd", "-s", "40", "-f"]);
    assert_eq!(ok(p, &["query", "-n", "cre.vhd", "-v", "-S"]), "40\n40\n");
    // query -S of a fixed disk is 0; query -s ignores space before the footer.
    ok(p, &["create", "-n", "fixed.vhd", "-s", "4", "-r"]);
    assert_eq!(
        ok(p, &["query", "-n", "fixed.vhd", "-S", "-s"]),
        "4194816\n0\n"
    );
    let before = ok(p, &["query", "-n", "cre.vhd", "-s"]);
    let len = std::fs::metadata(p.join("cre.vhd")).unwrap().len();
    ok(
        p,
        &[
            "modify",
            "-n",
            "cre.vhd",
            "-s",
            &(len + (1 << 20)).to_string(),
        ],
    );
    assert_eq!(ok(p, &["query", "-n", "cre.vhd", "-s"]), before);
    ok(p, &["check", "-n", "cre.vhd"]);
}

#[test]
fn modify_refuses_a_parent_loop_and_check_stops_at_one() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(p, &["create", "-n", "r.vhd", "-s", "16"]);
    ok(p, &["snapshot", "-e", "-n", "a.vhd", "-p", "r.vhd"]);
    ok(p, &["snapshot", "-e", "-n", "b.vhd", "-p", "a.vhd"]);
    ok(p, &["snapshot", "-e", "-n", "c.vhd", "-p", "b.vhd"]);
    std::os::unix::fs::symlink("c.vhd", p.join("link.vhd")).unwrap();
    // The image itself, its child, its grandchild, a grandchild through a symlink.
    for parent in ["a.vhd", "b.vhd", "c.vhd", "link.vhd"] {
        let o = run(p, &["modify", "-n", "a.vhd", "-p", parent]);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(40), "-p {parent}: {stdout}");
        assert!(stdout.contains("parent loop"), "-p {parent}: {stdout}");
        assert_eq!(
            ok(p, &["query", "-n", "a.vhd", "-p"]),
            format!("{}\n", abs(p, "r.vhd"))
        );
        assert!(
            !p.join("a.vhd.journal").exists(),
            "refused before journaling"
        );
    }
    // Skipping a level is no loop.
    ok(p, &["modify", "-n", "c.vhd", "-p", "a.vhd"]);
    assert_eq!(
        ok(p, &["query", "-n", "c.vhd", "-p"]),
        format!("{}\n", abs(p, "a.vhd"))
    );
    ok(p, &["check", "-n", "c.vhd", "-p"]);

    // A loop made behind modify's back (a file replaced under a parent's name): check -p
    // and query -d stop with ELOOP instead of walking it forever.
    ok(p, &["create", "-n", "z.vhd", "-s", "16"]);
    ok(p, &["modify", "-n", "a.vhd", "-p", "z.vhd"]);
    std::fs::rename(p.join("b.vhd"), p.join("z.vhd")).unwrap();
    // ...with the parent UUID a.vhd records made to match, as a forged image would.
    let uuid_of = |name: &str| {
        let file = std::fs::File::open(p.join(name)).unwrap();
        vhd::VhdImage::open(file, name, vhd::OpenOptions::read_only())
            .unwrap()
            .footer()
            .uuid
    };
    let b_uuid = uuid_of("z.vhd");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p.join("a.vhd"))
        .unwrap();
    let mut a = vhd::VhdImage::open(file, "a.vhd", vhd::OpenOptions::read_write()).unwrap();
    a.header_mut().unwrap().parent_uuid = b_uuid;
    a.write_header().unwrap();
    drop(a);
    let o = run(p, &["check", "-n", "a.vhd", "-p"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(40), "{stdout}");
    assert!(stdout.lines().count() < 10, "{stdout}");
    assert!(stdout.contains("parent loop"), "{stdout}");
    let o = run(p, &["query", "-n", "a.vhd", "-d"]);
    assert_eq!(
        o.status.code(),
        Some(40),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}
