//! IntelliCache end to end: a VM's disk as SM stacks it with `allow_caching` (a read cache
//! of the golden image opened `-r` in its own tapdisk, the VM's local leaf above that VBD's
//! export with `-r -e MINOR -2 vhd:SHARED_LEAF`), read by qemu-img and fio over NBD. The
//! first pass fills the local caches from the shared images, the second is served locally,
//! as `tap-ctl stats` shows; with the local filesystem full the reads stay right. `-e` also
//! finds an export of the same tapdisk, and names a minor that has none.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{require, run_ok, vhd_util_ok, Env, Tmpfs};

const MIB: u64 = 1 << 20;

/// `len` random bytes in `dir/data.raw`.
fn random_data(dir: &Path, len: u64) -> PathBuf {
    let path = dir.join("data.raw");
    let mut data = Vec::new();
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .take(len)
        .read_to_end(&mut data)
        .unwrap();
    std::fs::write(&path, data).unwrap();
    path
}

/// A dynamic VHD of `len` bytes at `path` holding `data` (written through a tapdisk).
fn golden_image(env: &Env, path: &Path, len: u64, data: &Path) {
    let mib = (len / MIB).to_string();
    vhd_util_ok(&["create", "-n", &path.display().to_string(), "-s", &mib]);
    let (pid, minor) = env.create_params(&format!("vhd:{}", path.display()), &[]);
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        &data.display().to_string(),
        &env.nbd_uri(pid, minor),
    ]));
    env.destroy(pid, minor);
}

/// `vhd-util snapshot -n CHILD -p PARENT` as SM makes the cache files.
fn snapshot(child: &Path, parent: &Path) {
    let (child, parent) = (child.display().to_string(), parent.display().to_string());
    vhd_util_ok(&["snapshot", "-n", &child, "-p", &parent, "-e"]);
}

/// The read cache, the VM's local leaf and its shared leaf, as SM's `_setup_cache` makes
/// them: `<local>/gold.vhdcache` above `gold`, `<local>/vm.vhdcache` above it, and
/// `<shared>/vm.vhd` above `gold`. Returns (read cache, local leaf, shared leaf).
fn cache_files(gold: &Path, local: &Path, shared: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let read_cache = local.join("gold.vhdcache");
    let local_leaf = local.join("vm.vhdcache");
    let shared_leaf = shared.join("vm.vhd");
    snapshot(&read_cache, gold);
    snapshot(&local_leaf, &read_cache);
    snapshot(&shared_leaf, gold);
    (read_cache, local_leaf, shared_leaf)
}

/// Opens the read cache (`-r`) and the VM's disk above its export (`-r -e MINOR -2
/// vhd:SHARED_LEAF`), each in its own tapdisk: ((pid, minor) of the read cache, of the VM).
fn open_cached_disk(
    env: &Env,
    (read_cache, local_leaf, shared_leaf): &(PathBuf, PathBuf, PathBuf),
) -> ((u32, u32), (u32, u32)) {
    let parent = env.create_params(&format!("vhd:{}", read_cache.display()), &["-r"]);
    let prt = parent.1.to_string();
    let secondary = format!("vhd:{}", shared_leaf.display());
    let vm = env.create_params(
        &format!("vhd:{}", local_leaf.display()),
        &["-r", "-e", &prt, "-2", &secondary],
    );
    (parent, vm)
}

/// `qemu-img compare` of the raw `data` with the export of `vbd`: a whole-disk read.
fn compare(env: &Env, data: &Path, (pid, minor): (u32, u32)) {
    let out = run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &data.display().to_string(),
        &env.nbd_uri(pid, minor),
    ]));
    assert!(out.contains("Images are identical"), "{out}");
}

/// The export of `vbd` holds `data` outside the two ranges the full-filesystem test wrote
/// (1 MiB + 256 KiB and 20 MiB + 1 MiB): compared piece by piece with `qemu-io read -v`
/// would be slow, so the raw data is patched with the written patterns and compared whole.
fn compare_outside(env: &Env, data: &Path, vbd: (u32, u32)) {
    let mut expected = std::fs::read(data).unwrap();
    let at = |mib: u64| usize::try_from(mib * MIB).unwrap();
    expected[at(1)..at(1) + 256 * 1024].fill(0x3c);
    expected[at(20)..at(21)].fill(0x3d);
    let patched = data.with_extension("written");
    std::fs::write(&patched, expected).unwrap();
    compare(env, &patched, vbd);
}

/// The `local_cache` counters of a VBD's stats.
fn cache_stats(env: &Env, (pid, minor): (u32, u32)) -> serde_json::Value {
    let stats = env.stats_json(pid, minor);
    assert!(stats["local_cache"].is_object(), "{stats}");
    stats["local_cache"].clone()
}

fn counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} in {stats}"))
}

#[test]
fn a_second_pass_over_a_cached_disk_is_served_locally() {
    require("qemu-img");
    require("fio");
    let env = Env::new();
    let dir = env.dir.path();
    let len = 128 * MIB;
    let sectors = len / 512;
    let data = random_data(dir, len);
    let (shared, local) = (dir.join("sr"), dir.join("local-sr"));
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    let gold = shared.join("gold.vhd");
    golden_image(&env, &gold, len, &data);
    let files = cache_files(&gold, &local, &shared);
    let (parent, vm) = open_cached_disk(&env, &files);

    // First pass: everything comes from the shared images and is kept locally, in the VM's
    // leaf and in the read cache.
    compare(&env, &data, vm);
    let first = cache_stats(&env, vm);
    assert!(counter(&first, "misses") > 0, "{first}");
    assert_eq!(counter(&first, "shared_sectors"), sectors, "{first}");
    assert_eq!(counter(&first, "filled_sectors"), sectors, "{first}");
    let read_cache = cache_stats(&env, parent);
    assert_eq!(
        counter(&read_cache, "filled_sectors"),
        sectors,
        "{read_cache}"
    );

    // Second pass, and random reads as a running VM makes: all from the local leaf.
    compare(&env, &data, vm);
    run_ok(Command::new("fio").current_dir(dir).args([
        "--name=vm",
        "--ioengine=nbd",
        &format!("--uri={}", env.nbd_uri(vm.0, vm.1)),
        "--rw=randread",
        "--bssplit=4k/50:64k/50",
        "--iodepth=8",
        "--size=128m",
        "--io_size=32m",
    ]));
    let second = cache_stats(&env, vm);
    assert_eq!(
        counter(&second, "misses"),
        counter(&first, "misses"),
        "{second}"
    );
    assert_eq!(counter(&second, "shared_sectors"), sectors, "{second}");
    assert!(
        counter(&second, "hits") > counter(&first, "hits"),
        "{first} then {second}"
    );
    assert!(counter(&second, "local_sectors") >= sectors, "{second}");
    // The read cache saw nothing of the second pass.
    assert_eq!(cache_stats(&env, parent), read_cache);

    env.destroy(vm.0, vm.1);
    env.destroy(parent.0, parent.1);
    for file in [&files.0, &files.1, &gold] {
        vhd_util_ok(&["check", "-n", &file.display().to_string()]);
    }
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

#[test]
fn a_full_local_filesystem_leaves_reads_right() {
    require("qemu-img");
    let env = Env::new();
    let dir = env.dir.path();
    let len = 32 * MIB;
    let data = random_data(dir, len);
    let shared = dir.join("sr");
    std::fs::create_dir_all(&shared).unwrap();
    // The local SR: far too small for what the VM reads.
    let local = Tmpfs::mount(dir.join("local-sr"), "5m");
    let gold = shared.join("gold.vhd");
    golden_image(&env, &gold, len, &data);
    let files = cache_files(&gold, &local.0, &shared);
    let (parent, vm) = open_cached_disk(&env, &files);

    for _pass in 0..2 {
        compare(&env, &data, vm);
    }
    for vbd in [vm, parent] {
        let stats = cache_stats(&env, vbd);
        assert!(
            counter(&stats, "fill_errors") > 0 || !stats["filling"].as_bool().unwrap(),
            "{stats}"
        );
        assert!(counter(&stats, "filled_sectors") < len / 512, "{stats}");
    }
    // The second pass still needed the shared images.
    let stats = cache_stats(&env, vm);
    assert!(counter(&stats, "shared_sectors") > len / 512, "{stats}");
    // Guest writes still work: into the local leaf where it has room, else (a new block
    // the full filesystem cannot take) into the shared leaf, which mirrors them all.
    env.qemu_io(vm.0, vm.1, "write -P 0x3c 1M 256k");
    env.qemu_io(vm.0, vm.1, "write -P 0x3d 20M 1M");
    env.qemu_io(vm.0, vm.1, "read -P 0x3c 1M 256k");
    env.qemu_io(vm.0, vm.1, "read -P 0x3d 20M 1M");
    let redirected = env.stats_json(vm.0, vm.1)["FIXME_enospc_redirect_count"].clone();
    assert_eq!(redirected, 2048, "the write the local leaf could not take");
    compare_outside(&env, &data, vm);

    env.destroy(vm.0, vm.1);
    env.destroy(parent.0, parent.1);
    // The shared leaf, as a host without the cache sees it, has both writes.
    let shared_vm = env.create_params(&format!("vhd:{}", files.2.display()), &[]);
    env.qemu_io(shared_vm.0, shared_vm.1, "read -P 0x3c 1M 256k");
    env.qemu_io(shared_vm.0, shared_vm.1, "read -P 0x3d 20M 1M");
    compare_outside(&env, &data, shared_vm);
    env.destroy(shared_vm.0, shared_vm.1);
    for file in [&files.0, &files.1, &files.2] {
        vhd_util_ok(&["check", "-n", &file.display().to_string()]);
    }
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

#[test]
fn a_parent_export_in_the_same_tapdisk_and_a_missing_one() {
    require("qemu-io");
    let env = Env::new();
    let dir = env.dir.path();
    let gold = dir.join("gold.vhd");
    let data = random_data(dir, 8 * MIB);
    golden_image(&env, &gold, 8 * MIB, &data);
    let (local, shared) = (dir.join("local"), dir.join("shared"));
    std::fs::create_dir_all(&local).unwrap();
    std::fs::create_dir_all(&shared).unwrap();
    let (read_cache, local_leaf, _) = cache_files(&gold, &local, &shared);
    let (pid, parent_minor) = env.create_params(&format!("vhd:{}", read_cache.display()), &["-r"]);
    // A second minor of the same tapdisk stacks on the first one's export.
    let minor: u32 = env
        .tap_ctl_ok(&["allocate"])
        .trim()
        .rsplit_once("tapdisk-")
        .unwrap()
        .1
        .parse()
        .unwrap();
    let (p, m) = (pid.to_string(), minor.to_string());
    env.tap_ctl_ok(&["attach", "-p", &p, "-m", &m]);
    let params = format!("vhd:{}", local_leaf.display());
    // No VBD has minor 9999's export: ENOENT, naming it.
    let missing = env.tap_ctl_err(
        &["open", "-p", &p, "-m", &m, "-a", &params, "-e", "9999"],
        2,
    );
    assert!(missing.contains("9999"), "{missing}");
    let prt = parent_minor.to_string();
    env.tap_ctl_ok(&["open", "-p", &p, "-m", &m, "-a", &params, "-r", "-e", &prt]);
    compare(&env, &data, (pid, minor));
    compare(&env, &data, (pid, minor));
    let stats = cache_stats(&env, (pid, minor));
    assert_eq!(counter(&stats, "shared_sectors"), 8 * MIB / 512, "{stats}");
    env.destroy(pid, minor);
    env.destroy(pid, parent_minor);
    assert_eq!(env.leftovers(), Vec::<String>::new());
}
