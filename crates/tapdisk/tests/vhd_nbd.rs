//! End-to-end tests of the `vhd` driver through the NBD export: VBDs created with
//! `tap-ctl create -a vhd:/path`, exercised by fio (randrw with crc32c verification), qemu-io
//! (writes, discards, write-zeroes) mirrored onto a raw model compared with `qemu-img compare`,
//! and `nbdinfo --map` checked against the model's allocation; chains built live with
//! pause / `vhd-util snapshot` / unpause; bad images refused at create.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fio_nbd_verify, require, run_ok, vhd_util_ok, Env, Lcg};

const MIB: u64 = 1 << 20;
/// Virtual size of the test disks.
const DISK: u64 = 64 * MIB;

/// `vhd-util create` of a dynamic disk of `mib` MiB.
fn create_vhd(path: &Path, mib: u64) {
    vhd_util_ok(&[
        "create",
        "-n",
        &path.display().to_string(),
        "-s",
        &mib.to_string(),
    ]);
}

fn vhd_params(path: &Path) -> String {
    format!("vhd:{}", path.display())
}

/// Asserts `vhd-util check` accepts the image.
fn check_vhd(path: &Path) {
    let out = vhd_util_ok(&["check", "-n", &path.display().to_string()]);
    assert!(out.contains("is valid"), "{}: {out}", path.display());
}

/// Runs fio's nbd engine, randrw with crc32c verification, and asserts it reports no error.
fn fio_verify(env: &Env, pid: u32, minor: u32, name: &str, size: &str) {
    eprintln!("fio verify: {name}");
    let size = format!("--size={size}");
    let job = [
        "--rw=randrw",
        "--bsrange=4k-128k",
        "--iodepth=16",
        &size,
        "--randrepeat=0",
    ];
    fio_nbd_verify(env.dir.path(), &env.nbd_uri(pid, minor), &job);
}

/// Allocation of one sector as NBD block status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alloc {
    Data,
    Hole,
}

/// What the disk should hold: bytes and per-sector allocation.
struct Model {
    bytes: Vec<u8>,
    alloc: Vec<Alloc>,
}

fn span(offset: u64, len: u64) -> std::ops::Range<usize> {
    let start = usize::try_from(offset).unwrap();
    start..start + usize::try_from(len).unwrap()
}

fn sectors(offset: u64, len: u64) -> std::ops::Range<usize> {
    span(offset / 512, len / 512)
}

impl Model {
    fn new() -> Self {
        Self {
            bytes: vec![0; usize::try_from(DISK).unwrap()],
            alloc: vec![Alloc::Hole; usize::try_from(DISK / 512).unwrap()],
        }
    }

    /// `count` random qemu-io commands (sector aligned; writes, discards, write-zeroes with
    /// and without unmap) applied to the model as the leaf image (`has_parent` or not) serves
    /// them: deallocation in an image without parent leaves holes, above a parent it leaves
    /// present zeros (data).
    fn random_ops(&mut self, rng: &mut Lcg, count: usize, has_parent: bool) -> Vec<String> {
        let mut commands = Vec::new();
        for _ in 0..count {
            let kind = rng.next(10);
            // Mostly small, sometimes whole 2 MiB blocks (block allocation and freeing).
            let (offset, len) = if rng.next(6) == 0 {
                let block = rng.next(DISK / (2 * MIB));
                (block * 2 * MIB, 2 * MIB)
            } else {
                let len = (1 + rng.next(256)) * 512;
                (rng.next((DISK - len) / 512) * 512, len)
            };
            match kind {
                0..=5 => {
                    let pattern = 1 + rng.next(254);
                    commands.push(format!("write -P {pattern} {offset} {len}"));
                    self.bytes[span(offset, len)].fill(u8::try_from(pattern).unwrap());
                    self.alloc[sectors(offset, len)].fill(Alloc::Data);
                }
                6 | 7 => {
                    commands.push(format!("discard {offset} {len}"));
                    self.zero(offset, len, !has_parent);
                }
                8 => {
                    commands.push(format!("write -z {offset} {len}"));
                    self.zero(offset, len, false);
                }
                _ => {
                    commands.push(format!("write -z -u {offset} {len}"));
                    self.zero(offset, len, !has_parent);
                }
            }
        }
        commands
    }

    fn zero(&mut self, offset: u64, len: u64, hole: bool) {
        self.bytes[span(offset, len)].fill(0);
        let state = if hole { Alloc::Hole } else { Alloc::Data };
        for alloc in &mut self.alloc[sectors(offset, len)] {
            // Above a parent, sectors other images hold stay data (masked by zeros).
            if hole || *alloc == Alloc::Hole {
                *alloc = state;
            }
        }
    }

    fn write_raw(&self, path: &Path) {
        std::fs::write(path, &self.bytes).unwrap();
    }
}

/// Runs qemu-io commands against the export.
fn qemu_io(env: &Env, pid: u32, minor: u32, commands: &[String]) {
    for chunk in commands.chunks(64) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &env.nbd_uri(pid, minor)]);
        for command in chunk {
            cmd.args(["-c", command]);
        }
        let out = run_ok(&mut cmd);
        assert!(
            !out.contains("error") && !out.contains("failed"),
            "qemu-io: {out}"
        );
    }
}

/// The export's allocation per sector, from `nbdinfo --map --json`.
fn nbd_map(env: &Env, pid: u32, minor: u32) -> Vec<Alloc> {
    let out = run_ok(Command::new("nbdinfo").args(["--map", "--json", &env.nbd_uri(pid, minor)]));
    let mut map = Vec::new();
    for line in out.lines().filter(|l| l.contains("\"offset\"")) {
        let field = |name: &str| -> u64 {
            let at = line.find(&format!("\"{name}\": ")).unwrap() + name.len() + 4;
            line[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let (offset, length, kind) = (field("offset"), field("length"), field("type"));
        assert_eq!(offset, map.len() as u64 * 512, "{out}");
        let state = if kind & 1 == 1 {
            Alloc::Hole
        } else {
            Alloc::Data
        };
        map.extend(std::iter::repeat_n(
            state,
            usize::try_from(length / 512).unwrap(),
        ));
    }
    map
}

fn assert_map_matches(env: &Env, pid: u32, minor: u32, model: &Model) {
    let map = nbd_map(env, pid, minor);
    assert_eq!(map.len(), model.alloc.len());
    if let Some(first) = (0..map.len()).find(|i| map[*i] != model.alloc[*i]) {
        panic!(
            "nbdinfo --map differs from the model at sector {first}: {:?} vs {:?}",
            map[first], model.alloc[first]
        );
    }
}

fn assert_export_equals(env: &Env, pid: u32, minor: u32, model: &Model, name: &str) {
    let raw = env.dir.path().join(name);
    model.write_raw(&raw);
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &env.nbd_uri(pid, minor),
        &raw.display().to_string(),
    ]));
}

/// Pause, `vhd-util snapshot -n <child> -p <leaf>`, unpause onto the child (what a toolstack
/// does to snapshot a running disk).
fn live_snapshot(env: &Env, pid: u32, minor: u32, leaf: &Path, child: &Path) {
    let (p, m) = (pid.to_string(), minor.to_string());
    env.tap_ctl_ok(&["pause", "-p", &p, "-m", &m]);
    vhd_util_ok(&[
        "snapshot",
        "-n",
        &child.display().to_string(),
        "-p",
        &leaf.display().to_string(),
    ]);
    env.tap_ctl_ok(&["unpause", "-p", &p, "-m", &m, "-a", &vhd_params(child)]);
}

#[test]
fn fio_randrw_verifies_on_a_dynamic_vhd() {
    require("fio");
    let env = Env::new();
    let image = env.dir.path().join("disk.vhd");
    create_vhd(&image, 64);
    let (pid, minor) = env.create_params(&vhd_params(&image), &["-b", "none"]);
    fio_verify(&env, pid, minor, "dynamic", "48M");
    let stats = env.tap_ctl_ok(&["stats", "-p", &pid.to_string(), "-m", &minor.to_string()]);
    assert!(
        stats.contains("\"driver\": { \"type\": 4, \"name\": \"vhd\""),
        "{stats}"
    );
    env.destroy(pid, minor);
    check_vhd(&image);
}

#[test]
fn three_deep_chain_matches_a_raw_model_and_its_allocation_map() {
    require("qemu-io");
    require("qemu-img");
    require("nbdinfo");
    require("fio");
    let env = Env::new();
    let paths: Vec<PathBuf> = ["base.vhd", "mid.vhd", "leaf.vhd"]
        .iter()
        .map(|name| env.dir.path().join(name))
        .collect();
    create_vhd(&paths[0], DISK / MIB);
    let (pid, minor) = env.create_params(&vhd_params(&paths[0]), &["-b", "none"]);
    let mut model = Model::new();
    let mut rng = Lcg(7);
    for (level, path) in paths.iter().enumerate() {
        if level > 0 {
            live_snapshot(&env, pid, minor, &paths[level - 1], path);
        }
        let commands = model.random_ops(&mut rng, 120, level > 0);
        qemu_io(&env, pid, minor, &commands);
        assert_export_equals(&env, pid, minor, &model, &format!("model{level}.raw"));
        assert_map_matches(&env, pid, minor, &model);
        assert!(model.alloc.contains(&Alloc::Hole) && model.alloc.contains(&Alloc::Data));
    }
    let rows = env.list();
    assert_eq!(
        rows[0].args.as_deref(),
        Some(vhd_params(&paths[2]).as_str())
    );
    // fio over the 3-deep chain (its writes land in the leaf).
    fio_verify(&env, pid, minor, "chain", "32M");
    env.destroy(pid, minor);
    for path in &paths {
        check_vhd(path);
    }
}

#[test]
fn x_chain_file_opens_the_listed_images() {
    require("qemu-io");
    let env = Env::new();
    let base = env.dir.path().join("base.vhd");
    let leaf = env.dir.path().join("leaf.vhd");
    create_vhd(&base, 16);
    vhd_util_ok(&[
        "snapshot",
        "-n",
        &leaf.display().to_string(),
        "-p",
        &base.display().to_string(),
    ]);
    let chain = env.dir.path().join("disk.chain");
    std::fs::write(&chain, format!("vhd:{}\n", leaf.display())).unwrap();
    let (pid, minor) = env.create_params(&format!("x-chain:{}", chain.display()), &["-b", "none"]);
    qemu_io(&env, pid, minor, &["write -P 9 0 64k".to_string()]);
    let stats = env.tap_ctl_ok(&["stats", "-p", &pid.to_string(), "-m", &minor.to_string()]);
    assert!(
        stats.contains("leaf.vhd") && stats.contains("base.vhd"),
        "{stats}"
    );
    env.destroy(pid, minor);
    check_vhd(&leaf);
}

#[test]
fn corrupt_images_and_missing_parents_are_refused_at_create() {
    let env = Env::new();
    let good = env.dir.path().join("good.vhd");
    create_vhd(&good, 16);
    let mut bytes = std::fs::read(&good).unwrap();
    // A broken dynamic header checksum.
    bytes[512 + 36] ^= 0xff;
    let bad = env.dir.path().join("bad.vhd");
    std::fs::write(&bad, &bytes).unwrap();
    let stderr = env.tap_ctl_err(
        &["create", "-a", &vhd_params(&bad), "-b", "none"],
        libc::EINVAL,
    );
    assert!(!stderr.is_empty());
    // Not a VHD at all.
    let raw = env.raw_image("raw.img", 1 << 20, 1);
    env.tap_ctl_err(
        &["create", "-a", &vhd_params(&raw), "-b", "none"],
        libc::EINVAL,
    );
    // A child whose parent is gone.
    let parent = env.dir.path().join("parent.vhd");
    let child = env.dir.path().join("child.vhd");
    create_vhd(&parent, 16);
    vhd_util_ok(&[
        "snapshot",
        "-n",
        &child.display().to_string(),
        "-p",
        &parent.display().to_string(),
    ]);
    std::fs::remove_file(&parent).unwrap();
    env.tap_ctl_err(
        &["create", "-a", &vhd_params(&child), "-b", "none"],
        libc::ENOENT,
    );
    assert!(env.list().is_empty(), "{:?}", env.list());
}

/// Issue 19, item 1: a BAT entry pointing into metadata (here the sectors of the footer)
/// must not be served: reads would return the footer as disk data and guest writes would
/// overwrite it. `tap-ctl create` fails with EINVAL and names the entry; `vhd-util check`
/// keeps its own message.
#[test]
fn image_whose_bat_points_at_the_footer_is_refused_at_create() {
    require("qemu-io");
    let env = Env::new();
    let image = env.dir.path().join("trap.vhd");
    create_vhd(&image, 64);
    let (pid, minor) = env.create_params(&vhd_params(&image), &["-b", "none"]);
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &env.nbd_uri(pid, minor),
        "-c",
        "write -P 7 0 2M",
    ]));
    env.destroy(pid, minor);
    check_vhd(&image);
    // BAT entry 1 (at byte 1536 + 4) := (file size / 512) - 2, the footer's sectors.
    let mut bytes = std::fs::read(&image).unwrap();
    let footer_sector = u32::try_from(bytes.len() / 512 - 2).unwrap();
    bytes[1540..1544].copy_from_slice(&footer_sector.to_be_bytes());
    std::fs::write(&image, &bytes).unwrap();
    let out = Command::new(common::vhd_util_bin())
        .args(["check", "-n", &image.display().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("block 1 (offset"),
        "{text}"
    );
    assert!(text.contains("clobbers footer"), "{text}");
    for extra in [&["-b", "none"][..], &["-b", "none", "-R"][..]] {
        let mut args = vec!["create", "-a"];
        let params = vhd_params(&image);
        args.push(&params);
        args.extend_from_slice(extra);
        let stderr = env.tap_ctl_err(&args, libc::EINVAL);
        assert!(
            stderr.contains("block 1")
                && stderr.contains(&format!("sector {footer_sector:#x}"))
                && stderr.contains("footer"),
            "{stderr}"
        );
    }
    assert!(env.list().is_empty(), "{:?}", env.list());
    assert_eq!(
        std::fs::read(&image).unwrap(),
        bytes,
        "the image was not touched"
    );
}

#[test]
fn image_whose_batmap_qemu_overwrote_is_refused_for_writing_only() {
    require("qemu-io");
    let env = Env::new();
    let image = env.dir.path().join("trap.vhd");
    create_vhd(&image, 16);
    // qemu's vpc driver puts its first new block right after the BAT, over tapdisk's batmap.
    run_ok(Command::new("qemu-io").args([
        "-f",
        "vpc",
        &image.display().to_string(),
        "-c",
        "write -P 7 0 4k",
    ]));
    env.tap_ctl_err(
        &["create", "-a", &vhd_params(&image), "-b", "none"],
        libc::EINVAL,
    );
    let (pid, minor) = env.create_params(&vhd_params(&image), &["-b", "none", "-R"]);
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-r",
        &env.nbd_uri(pid, minor),
        "-c",
        "read -P 7 0 4k",
    ]));
    assert!(out.contains("read 4096/4096"), "{out}");
    env.destroy(pid, minor);
}
