//! Every command line XenServer's storage manager (SM) builds, as
//! `shared/reference/toolstack.md` lists them, run against our binaries and
//! parsed the way SM parses the output (its Python is quoted in comments
//! where the parsing is specific). Lines of features that are not built yet
//! assert today's refusal (exit 95 and a message) and name the issue that
//! turns them into success; whoever lands that issue flips the assertion.
//!
//! | command line (toolstack.md) | test |
//! |---|---|
//! | `tap-ctl allocate` (minor = trailing number), `spawn` (pid), `attach -p -m`, `open -p -m -a TYPE:PATH` with `-D` / `-R` | `tap_ctl_vbd_life_cycle` |
//! | `tap-ctl list` with `-p`, `-m`, `-t`, `-f`, combined; unknown pid: no line, exit 0 | `tap_ctl_vbd_life_cycle` |
//! | `tap-ctl stats -p -m` (first line through a JSON parser, `nbd_mirror_failed`) | `tap_ctl_vbd_life_cycle` |
//! | `tap-ctl pause`, `unpause -a vhd:NEWLEAF`, `unpause` (same path) | `tap_ctl_vbd_life_cycle` |
//! | `tap-ctl close -t 120 [-f]`, `detach`, `free -m`; NBD socket `<ctl dir>/nbd<pid>.<minor>` | `tap_ctl_vbd_life_cycle` |
//! | `tap-ctl open -C PATH.cbtlog`, `unpause -a vhd:NEWLEAF -c PATH.cbtlog` (CBT) | `crates/tapdisk/tests/cbt.rs` `storage_manager_forms_track_writes_across_a_snapshot` |
//! | `tap-ctl open -r`, `-r -e N -2 vhd:PATH`, `-e N -2 vhd:PATH -s` (IntelliCache: read cache, persistent and scratch local leaves, as `_setup_cache` builds them), `vhd-util snapshot -S MB -e` | `intellicache_open_forms` |
//! | `tap-ctl open -E` (key on stdin) | `encrypted_vhd.rs` |
//! | `tap-ctl unpause -a vhd:NEWLEAF -2 nbd:<dp>` (storage migration), `-2 null`; `nbd:unix:SOCK:exportname=NAME` images | `crates/tapdisk/tests/mirror.rs` (`storage_migration_mirror_with_a_copy_and_fio_verify`, `nbd_images_served_by_qemu_nbd_and_nbdkit`) |
//! | `tap-ctl commit -a PATH`, `query` (until concluded), `cancel -w` (XCP-ng qcow2 live commit) | `crates/tapdisk/tests/qcow2_commit.rs` (`commit_of_an_idle_disk_leaves_a_chain_qemu_accepts`, `cancelled_commit_keeps_the_leaf_and_says_so`) |
//! | `vhd-util create -n -s [-r] [-S]`, `snapshot -n -p [-m] [-e] [-S]` | `vhd_util_file_sr_lines` |
//! | `vhd-util query -n` with `-v -s -p -f -a -d -S`, `-vsafp`, `-vsaf`, `-vsafpu` | `vhd_util_file_sr_lines` |
//! | `vhd-util scan -f -m PATTERN [-a] [-c]` | `vhd_util_file_sr_lines` |
//! | `vhd-util scan -f -m PATTERN [-a] [-c] -l VG` | `crates/vhd-util/tests/cli.rs` `create_query_set_scan` (lvm2 stand-ins), `tests/vm/lvhd.sh` (real LVM, inactive volumes) |
//! | `vhd-util set -f hidden -v`, `modify -p [-m]`, `modify -s`, `modify -z`, `check [-i] [-B]`, `repair`, `coalesce`, `read -p`, `read -B` | `vhd_util_file_sr_lines` |
//! | `vhd-util resize -f`, `resize -j JOURNAL`, `revert -j`, `key -p`, `key -s -H` | `vhd_util_file_sr_lines` |
//! | LVHD on volumes: `create -S 2097152` on an existing device, `snapshot -S`, `set hidden`, `modify -s` after the volume grew and its last sector was zeroed, `modify -s` to shrink, `resize -j` with a journal device, `modify -p` | `vhd_util_lvhd_lines_on_block_devices` (loop devices), `tests/vm/lvhd.sh` (LVM) |
//! | `td-util create vhd MB PATH`, `snapshot vhd CHILD PARENT`, `query vhd -v|-p|-vpfb PATH` | `td_util_lines` |
//! | `cbt-util create/get/set/coalesce` | `crates/cbt-util/tests/cli.rs`, `crates/tapdisk/tests/cbt.rs` (the SM sequence around a snapshot) |

mod common;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{parse_list_line, process_alive, run_ok, vhd_util_bin, wait_for, Env};

const MIB: u64 = 1 << 20;

/// `vhd-util ARGS` with SM's `--debug` in front, in `dir`.
fn vhd_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(vhd_util_bin());
    cmd.arg("--debug").args(args).current_dir(dir);
    cmd
}

fn vhd_util(dir: &Path, args: &[&str]) -> Output {
    vhd_cmd(dir, args).output().unwrap()
}

/// `vhd-util`, asserting success; returns stdout.
fn vhd_ok(dir: &Path, args: &[&str]) -> String {
    run_ok(&mut vhd_cmd(dir, args))
}

/// `td-util ARGS` in `dir`.
fn td_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(vhd_util_bin().with_file_name("td-util"));
    cmd.args(args).current_dir(dir);
    cmd
}

fn td_util(dir: &Path, args: &[&str]) -> Output {
    td_cmd(dir, args).output().unwrap()
}

fn td_ok(dir: &Path, args: &[&str]) -> String {
    run_ok(&mut td_cmd(dir, args))
}

/// SM's `vhdutil.getVHDInfo`: `query -vsaf[p]`, one answer per line in the
/// order v, s, [p], f, a.
#[derive(Debug, PartialEq, Eq)]
struct VhdInfo {
    size_virt: u64,
    size_phys: u64,
    parent: Option<String>,
    hidden: u8,
    allocated_blocks: u64,
}

fn get_vhd_info(dir: &Path, path: &str, include_parent: bool) -> VhdInfo {
    let opts = if include_parent { "-vsafp" } else { "-vsaf" };
    let out = vhd_ok(dir, &["query", opts, "-n", path]);
    let fields: Vec<&str> = out.trim().split('\n').collect();
    let mut next = 2;
    let mut parent = None;
    if include_parent {
        if !fields[next].contains("no parent") {
            parent = Some(fields[next].to_string());
        }
        next += 1;
    }
    VhdInfo {
        size_virt: fields[0].parse::<u64>().unwrap() * MIB,
        size_phys: fields[1].parse().unwrap(),
        parent,
        hidden: fields[next].replace("hidden: ", "").parse().unwrap(),
        allocated_blocks: fields[next + 1].parse().unwrap(),
    }
}

/// SM's `vhdutil._parseVHDInfo` of one scan line: `key=value` words;
/// `scan-error` stops the parsing.
fn parse_scan_line(line: &str) -> HashMap<String, String> {
    let mut row = HashMap::new();
    for word in line.split_whitespace() {
        let (key, value) = word.split_once('=').expect("key=value");
        row.insert(key.to_string(), value.to_string());
        if key == "scan-error" {
            break;
        }
    }
    row
}

/// SM's `_getVHDParentNoCheck`: the first "decoded name :" line of `read
/// -p`, dashes halved, its last 40 characters.
fn parent_no_check(dir: &Path, path: &str) -> String {
    let out = vhd_ok(dir, &["read", "-p", "-n", path]);
    let line = out
        .lines()
        .find(|l| l.contains("decoded name :"))
        .expect("a decoded name");
    let value = line.split(':').nth(1).unwrap().trim().replace("--", "-");
    value[value.len().saturating_sub(40)..].to_string()
}

/// SM's `hasParent`: `Disk type : (\S+) hard disk` in `read -p`.
fn has_parent(dir: &Path, path: &str) -> bool {
    let out = vhd_ok(dir, &["read", "-p", "-n", path]);
    let kind = out
        .lines()
        .find_map(|l| l.strip_prefix("Disk type")?.split(':').nth(1))
        .expect("a disk type line")
        .trim()
        .strip_suffix(" hard disk")
        .expect("... hard disk")
        .to_string();
    assert!(kind == "Differencing" || kind == "Dynamic", "{kind}");
    kind == "Differencing"
}

/// `dir/name` as `query -p` prints a parent: canonical and absolute.
fn canonical(dir: &Path, name: &str) -> String {
    std::fs::canonicalize(dir.join(name))
        .unwrap()
        .display()
        .to_string()
}

/// A file's bytes at `offset`.
fn read_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

fn write_bytes(path: &Path, offset: u64, data: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(data, offset)
        .unwrap();
}

#[test]
fn tap_ctl_vbd_life_cycle() {
    let env = Env::new();
    let dir = env.dir.path();
    let leaf = dir.join("leaf.vhd");
    vhd_ok(dir, &["create", "-n", "leaf.vhd", "-s", "16"]);
    let raw = env.raw_image("cd.iso", 2 << 20, 5);

    // allocate prints the marker path; SM takes the minor from its end.
    let allocated = env.tap_ctl_ok(&["allocate"]);
    let digits: String = allocated
        .trim()
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let minor: u32 = digits.parse().unwrap();
    let pid: u32 = env.tap_ctl_ok(&["spawn"]).trim().parse().unwrap();
    let (p, m) = (pid.to_string(), minor.to_string());
    env.tap_ctl_ok(&["attach", "-p", &p, "-m", &m]);
    let params = format!("vhd:{}", leaf.display());
    env.tap_ctl_ok(&["open", "-p", &p, "-m", &m, "-a", &params, "-D"]);
    // The NBD socket SM links to, in the control directory.
    assert!(env.ctl_dir.join(format!("nbd{pid}.{minor}")).exists());

    // A second VBD, read-only, in its own tapdisk.
    let params2 = format!("aio:{}", raw.display());
    let (pid2, minor2) = env.sm_launch(&params2, &["-R"]);
    let (p2, m2) = (pid2.to_string(), minor2.to_string());

    // list, parsed per line as SM does (split(' ', 3), key=value).
    let list = |args: &[&str]| -> Vec<common::ListRow> {
        let mut all = vec!["list"];
        all.extend_from_slice(args);
        env.tap_ctl_ok(&all).lines().map(parse_list_line).collect()
    };
    let ours = common::ListRow {
        pid: Some(pid),
        minor: Some(minor),
        state: Some(0),
        args: Some(params.clone()),
    };
    assert!(list(&[]).contains(&ours));
    assert_eq!(list(&["-p", &p]), vec![ours.clone()]);
    assert_eq!(list(&["-m", &m]), vec![ours.clone()]);
    assert_eq!(list(&["-t", "vhd"]), vec![ours.clone()]);
    assert_eq!(
        list(&["-f", &leaf.display().to_string()]),
        vec![ours.clone()]
    );
    assert_eq!(list(&["-p", &p, "-m", &m]), vec![ours.clone()]);
    assert_eq!(
        list(&["-t", "aio", "-f", &raw.display().to_string()])[0].pid,
        Some(pid2)
    );
    // An unknown pid: no line, exit 0.
    assert_eq!(list(&["-p", "999999"]), vec![]);

    // stats: SM json.loads the first line; xapi reads nbd_mirror_failed.
    let stats = env.tap_ctl_ok(&["stats", "-p", &p, "-m", &m]);
    let first = stats.lines().next().unwrap();
    let json: serde_json::Value = serde_json::from_str(first).unwrap();
    assert_eq!(json["name"], params.as_str());
    assert_eq!(json["nbd_mirror_failed"], 0);

    // Snapshot path (tapdisk-pause): pause, snapshot, unpause onto the new leaf.
    env.tap_ctl_ok(&["pause", "-p", &p, "-m", &m]);
    assert_eq!(list(&["-m", &m])[0].state, Some(0x2a));
    vhd_ok(dir, &["snapshot", "-n", "leaf2.vhd", "-p", "leaf.vhd"]);
    let params_new = format!("vhd:{}", dir.join("leaf2.vhd").display());
    env.tap_ctl_ok(&["unpause", "-p", &p, "-m", &m, "-a", &params_new]);
    assert_eq!(
        list(&["-m", &m])[0].args.as_deref(),
        Some(params_new.as_str())
    );
    // Pause and unpause on the same path.
    env.tap_ctl_ok(&["pause", "-p", &p, "-m", &m]);
    env.tap_ctl_ok(&["unpause", "-p", &p, "-m", &m]);
    assert_eq!(list(&["-m", &m])[0].state, Some(0));

    // Teardown: close -t 120 (and -f), detach, free.
    env.tap_ctl_ok(&["close", "-p", &p, "-m", &m, "-t", "120"]);
    env.tap_ctl_ok(&["detach", "-p", &p, "-m", &m]);
    env.tap_ctl_ok(&["free", "-m", &m]);
    env.tap_ctl_ok(&["close", "-p", &p2, "-m", &m2, "-t", "120", "-f"]);
    env.tap_ctl_ok(&["detach", "-p", &p2, "-m", &m2]);
    env.tap_ctl_ok(&["free", "-m", &m2]);
    for pid in [pid, pid2] {
        assert!(wait_for(Duration::from_secs(5), || !process_alive(pid)));
    }
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

/// SM's teardown of one VBD: close -t 120, detach, free.
fn sm_shutdown(env: &Env, pid: u32, minor: u32) {
    let (p, m) = (pid.to_string(), minor.to_string());
    env.tap_ctl_ok(&["close", "-p", &p, "-m", &m, "-t", "120"]);
    env.tap_ctl_ok(&["detach", "-p", &p, "-m", &m]);
    env.tap_ctl_ok(&["free", "-m", &m]);
    assert!(wait_for(Duration::from_secs(5), || !process_alive(pid)));
}

/// IntelliCache as SM's `_setup_cache` builds it for a VM with `allow_caching`: a read
/// cache (an empty local snapshot of the shared golden image) opened with `-r` in its own
/// tapdisk, and per VDI a local leaf (a snapshot of the read cache) above that VBD's export:
/// persistent mode `-r -e N -2 vhd:SHARED_LEAF` (writes to both leaves), scratch mode
/// `-e N -2 vhd:SHARED_LEAF -s` (writes stay local).
#[test]
fn intellicache_open_forms() {
    common::require("qemu-io");
    let env = Env::new();
    let dir = env.dir.path();
    let (shared, local) = (dir.join("sr"), dir.join("local-sr"));
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    // The golden image, with data, and two VDIs on it.
    vhd_ok(&shared, &["create", "-n", "gold.vhd", "-s", "16"]);
    let gold = shared.join("gold.vhd");
    let (pid, minor) = env.create_params(&format!("vhd:{}", gold.display()), &[]);
    env.qemu_io(pid, minor, "write -P 0x5a 0 6M");
    env.destroy(pid, minor);
    vhd_ok(&shared, &["snapshot", "-n", "vdi1.vhd", "-p", "gold.vhd"]);
    vhd_ok(&shared, &["snapshot", "-n", "vdi2.vhd", "-p", "gold.vhd"]);
    // vhdutil.snapshot(read_cache_path, shared_target.path, False), then per VDI
    // vhdutil.snapshot(local_leaf_path, read_cache_path, False, msize=..., checkEmpty=False).
    let gold_path = gold.display().to_string();
    vhd_ok(
        &local,
        &["snapshot", "-n", "gold.vhdcache", "-p", &gold_path],
    );
    for vdi in ["vdi1", "vdi2"] {
        let name = format!("{vdi}.vhdcache");
        vhd_ok(
            &local,
            &[
                "snapshot",
                "-n",
                &name,
                "-p",
                "gold.vhdcache",
                "-S",
                "16",
                "-e",
            ],
        );
    }
    let (read_cache, leaf1, leaf2) = (
        local.join("gold.vhdcache"),
        local.join("vdi1.vhdcache"),
        local.join("vdi2.vhdcache"),
    );
    let secondary = |vdi: &str| format!("vhd:{}", shared.join(vdi).display());

    let vhd = |path: &Path| format!("vhd:{}", path.display());
    let (ppid, pminor) = env.sm_launch(&vhd(&read_cache), &["-r"]);
    let prt = pminor.to_string();
    let (pid1, minor1) = env.sm_launch(
        &vhd(&leaf1),
        &["-r", "-e", &prt, "-2", &secondary("vdi1.vhd")],
    );
    let (pid2, minor2) = env.sm_launch(
        &vhd(&leaf2),
        &["-e", &prt, "-2", &secondary("vdi2.vhd"), "-s"],
    );

    // Both VMs read the golden data: through the local leaves, the read cache's export.
    env.qemu_io(pid1, minor1, "read -P 0x5a 0 6M");
    env.qemu_io(pid2, minor2, "read -P 0x5a 0 6M");
    env.qemu_io(pid1, minor1, "read -P 0 6M 10M");
    let cache = env.stats_json(ppid, pminor)["local_cache"].clone();
    assert!(cache["filled_sectors"].as_u64().unwrap() > 0, "{cache}");
    assert!(
        cache["hits"].as_u64().unwrap() > 0,
        "the second VM hit the read cache: {cache}"
    );
    let leaf_stats = env.stats_json(pid1, minor1);
    assert!(
        leaf_stats["local_cache"]["filled_sectors"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(env.stats_json(pid2, minor2).get("local_cache").is_none());

    // Guest writes: persistent mode mirrors them to the shared leaf, scratch mode does not.
    env.qemu_io(pid1, minor1, "write -P 0x71 8M 1M");
    env.qemu_io(pid2, minor2, "write -P 0x72 8M 1M");
    // A snapshot's pause and unpause keep the leaf on the read cache's export.
    let (p1, m1) = (pid1.to_string(), minor1.to_string());
    env.tap_ctl_ok(&["pause", "-p", &p1, "-m", &m1]);
    env.tap_ctl_ok(&["unpause", "-p", &p1, "-m", &m1]);
    env.qemu_io(pid1, minor1, "read -P 0x5a 0 6M");
    env.qemu_io(pid1, minor1, "read -P 0x71 8M 1M");
    assert!(env.stats_json(pid1, minor1)["local_cache"].is_object());

    sm_shutdown(&env, pid1, minor1);
    sm_shutdown(&env, pid2, minor2);
    sm_shutdown(&env, ppid, pminor);
    // The shared leaves as any host sees them without the cache.
    for (vdi, at_8m) in [("vdi1.vhd", "0x71"), ("vdi2.vhd", "0")] {
        let (pid, minor) = env.create_params(&secondary(vdi), &[]);
        env.qemu_io(pid, minor, "read -P 0x5a 0 6M");
        env.qemu_io(pid, minor, &format!("read -P {at_8m} 8M 1M"));
        env.destroy(pid, minor);
    }
    // The golden image was only read; the local files are sound VHDs.
    vhd_ok(&shared, &["check", "-n", "gold.vhd"]);
    for file in [&read_cache, &leaf1, &leaf2] {
        vhd_ok(&local, &["check", "-n", &file.display().to_string()]);
    }
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

#[test]
fn vhd_util_file_sr_lines() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let full = |name: &str| canonical(dir, name);
    // create: dynamic with -S, fixed with -r.
    vhd_ok(
        dir,
        &["create", "-n", "base.vhd", "-s", "64", "-S", "2097152"],
    );
    vhd_ok(dir, &["create", "-n", "fixed.vhd", "-s", "8", "-r"]);
    assert_eq!(vhd_ok(dir, &["query", "-S", "-n", "base.vhd"]), "2097152\n");
    // Data in the base, then the VDI snapshot path: child over it.
    let chain = vhd::Chain::open(&dir.join("base.vhd"), true);
    let mut chain = chain.unwrap();
    chain.write(0, &[0x5a; 4 << 20]).unwrap();
    drop(chain);
    vhd_ok(
        dir,
        &[
            "snapshot",
            "-n",
            "child.vhd",
            "-p",
            "base.vhd",
            "-S",
            "2097152",
        ],
    );
    vhd_ok(
        dir,
        &["snapshot", "-n", "over-raw.vhd", "-p", "fixed.vhd", "-m"],
    );
    vhd_ok(
        dir,
        &["snapshot", "-n", "empty-ok.vhd", "-p", "child.vhd", "-e"],
    );

    // query, as getVHDInfo parses it.
    let info = get_vhd_info(dir, "child.vhd", true);
    assert_eq!(
        info,
        VhdInfo {
            size_virt: 64 * MIB,
            size_phys: info.size_phys,
            parent: Some(full("base.vhd")),
            hidden: 0,
            allocated_blocks: 0,
        }
    );
    let base = get_vhd_info(dir, "base.vhd", false);
    assert_eq!((base.parent, base.allocated_blocks), (None, 2));
    // -vsafpu (XCP-ng): the parent as recorded, then the same order.
    let out = vhd_ok(dir, &["query", "-vsafpu", "-n", "child.vhd"]);
    let fields: Vec<&str> = out.lines().collect();
    assert_eq!(fields.len(), 5, "{out}");
    assert_eq!(fields[2], "./base.vhd");
    // Single answers.
    assert_eq!(vhd_ok(dir, &["query", "-v", "-n", "child.vhd"]), "64\n");
    let phys: u64 = vhd_ok(dir, &["query", "-s", "-n", "base.vhd"])
        .trim()
        .parse()
        .unwrap();
    assert!(phys > 4 * MIB, "{phys}");
    assert_eq!(
        vhd_ok(dir, &["query", "-p", "-n", "base.vhd"]),
        "base.vhd has no parent\n"
    );
    assert_eq!(
        vhd_ok(dir, &["query", "-f", "-n", "base.vhd"]),
        "hidden: 0\n"
    );
    assert_eq!(vhd_ok(dir, &["query", "-a", "-n", "base.vhd"]), "2\n");
    let depth = vhd_ok(dir, &["query", "-d", "-n", "child.vhd"]);
    assert_eq!(depth.split(':').nth(1).unwrap().trim(), "2");

    // set hidden (getHidden parses the value after the last ':').
    vhd_ok(dir, &["set", "-n", "base.vhd", "-f", "hidden", "-v", "1"]);
    let hidden = vhd_ok(dir, &["query", "-f", "-n", "base.vhd"]);
    assert_eq!(hidden.rsplit(':').next().unwrap().trim(), "1");

    // scan -f -m PATTERN [-a] [-c], every line through _parseVHDInfo.
    let pattern = format!("{}/*.vhd", dir.display());
    let scan = vhd_ok(dir, &["scan", "-f", "-m", &pattern]);
    let rows: Vec<_> = scan.lines().map(parse_scan_line).collect();
    let child = rows.iter().find(|r| r["vhd"] == "child.vhd").unwrap();
    assert_eq!(child["parent"], "base.vhd");
    assert_eq!(child["capacity"], (64 * MIB).to_string());
    let base_row = rows.iter().find(|r| r["vhd"] == "base.vhd").unwrap();
    assert_eq!(
        (base_row["hidden"].as_str(), base_row["parent"].as_str()),
        ("1", "none")
    );
    let leaf_pattern = format!("{}/child.vhd", dir.display());
    let scan = vhd_ok(dir, &["scan", "-f", "-m", &leaf_pattern, "-a"]);
    let names: Vec<String> = scan
        .lines()
        .map(|l| parse_scan_line(l)["vhd"].clone())
        .collect();
    assert_eq!(names, ["child.vhd", "base.vhd"]);
    std::fs::write(dir.join("junk.vhd"), b"junk").unwrap();
    let out = vhd_util(dir, &["scan", "-f", "-m", &pattern]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "an unreadable image fails the scan"
    );
    let out = vhd_ok(dir, &["scan", "-f", "-m", &pattern, "-c"]);
    let junk = out
        .lines()
        .map(parse_scan_line)
        .find(|r| r["vhd"].ends_with("/junk.vhd"))
        .unwrap();
    assert_eq!(junk["scan-error"], "-22");
    std::fs::remove_file(dir.join("junk.vhd")).unwrap();

    // read -p: hasParent and the decoded name; read -B: the raw BAT bitmap.
    assert!(has_parent(dir, "child.vhd"));
    assert!(!has_parent(dir, "base.vhd"));
    assert_eq!(parent_no_check(dir, "child.vhd"), "./base.vhd");
    let bitmap = vhd_util(dir, &["read", "-B", "-n", "base.vhd"]).stdout;
    assert_eq!(bitmap, vec![0b1100_0000, 0, 0, 0]);
    // read -B of a fixed disk: no BAT, the C tool's line and EINVAL.
    let out = vhd_util(dir, &["read", "-B", "-n", "fixed.vhd"]);
    assert_eq!(out.status.code(), Some(libc::EINVAL));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Failed to get bat for fixed.vhd: -22\n"
    );

    // modify -p [-m]: reparent (the raw one on the fixed file).
    vhd_ok(dir, &["modify", "-n", "empty-ok.vhd", "-p", "base.vhd"]);
    assert_eq!(
        get_vhd_info(dir, "empty-ok.vhd", true).parent,
        Some(full("base.vhd"))
    );
    vhd_ok(
        dir,
        &["modify", "-n", "over-raw.vhd", "-p", "fixed.vhd", "-m"],
    );

    // check [-i] [-B], repair.
    for args in [
        &["check", "-n", "child.vhd"][..],
        &["check", "-n", "child.vhd", "-i"],
        &["check", "-n", "child.vhd", "-B"],
    ] {
        assert_eq!(vhd_ok(dir, args), "child.vhd is valid\n");
    }
    vhd_ok(dir, &["repair", "-n", "child.vhd"]);

    // modify -s (physical size) and -z (killData).
    let grown = info.size_phys + 8 * MIB;
    vhd_ok(
        dir,
        &["modify", "-n", "child.vhd", "-s", &grown.to_string()],
    );
    assert_eq!(
        std::fs::metadata(dir.join("child.vhd")).unwrap().len(),
        grown
    );
    vhd_ok(dir, &["check", "-n", "child.vhd"]);
    let mut chain = vhd::Chain::open(&dir.join("child.vhd"), true).unwrap();
    chain.write(8192, &[7; 4096]).unwrap();
    drop(chain);
    vhd_ok(dir, &["copy", "-n", "child.vhd", "-N", "scratch.vhd"]);
    vhd_ok(dir, &["modify", "-n", "scratch.vhd", "-z"]);
    assert_eq!(vhd_ok(dir, &["query", "-a", "-n", "scratch.vhd"]), "0\n");

    // coalesce: SM takes the number from "^Coalesced (\d+) sectors".
    let out = vhd_ok(dir, &["coalesce", "-n", "child.vhd"]);
    let n: u64 = out
        .strip_prefix("Coalesced ")
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(n, 8);

    // resize -f (fast, within -S) and -j JOURNAL; revert -j.
    vhd_ok(dir, &["resize", "-s", "128", "-n", "base.vhd", "-f"]);
    assert_eq!(vhd_ok(dir, &["query", "-v", "-n", "base.vhd"]), "128\n");
    vhd_ok(dir, &["create", "-n", "small.vhd", "-s", "4"]);
    vhd_ok(
        dir,
        &[
            "resize",
            "-s",
            "1024",
            "-n",
            "small.vhd",
            "-j",
            "small.journal",
        ],
    );
    assert_eq!(vhd_ok(dir, &["query", "-v", "-n", "small.vhd"]), "1024\n");
    assert!(!dir.join("small.journal").exists());
    // revert -j: an operation interrupted after journaling (made here with
    // the library), then the image damaged; revert restores it.
    let image = dir.join("small.vhd");
    let before = std::fs::read(&image).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let len = before.len() as u64;
    let footer = (vhd::journal::EntryKind::Footer, len - 512, 512);
    let txn = vhd::journal::Transaction::begin(
        &vhd::io::StdOpener,
        &dir.join("small.journal"),
        &file,
        [0; 16],
        &[footer],
    )
    .unwrap();
    drop(txn);
    file.write_all_at(&[0xee; 512], len - 512).unwrap();
    drop(file);
    vhd_ok(dir, &["revert", "-n", "small.vhd", "-j", "small.journal"]);
    assert_eq!(std::fs::read(&image).unwrap(), before);
    assert!(!dir.join("small.journal").exists());

    // key -p prints "NONCE HASH" (SM splits it), key -s -H sets a hash.
    vhd_ok(dir, &["create", "-n", "enc.vhd", "-s", "16"]);
    assert_eq!(vhd_ok(dir, &["key", "-p", "-n", "enc.vhd"]), "none\n");
    let hash = "4f".repeat(32);
    vhd_ok(dir, &["key", "-s", "-n", "enc.vhd", "-H", &hash]);
    let printed = vhd_ok(dir, &["key", "-p", "-n", "enc.vhd"]);
    let vals: Vec<&str> = printed.split_whitespace().collect();
    assert_eq!(vals, [&"0".repeat(64), &hash]);
    // A snapshot carries the key hash over.
    vhd_ok(dir, &["snapshot", "-n", "enc-child.vhd", "-p", "enc.vhd"]);
    assert_eq!(vhd_ok(dir, &["key", "-p", "-n", "enc-child.vhd"]), printed);
}

/// A loop device over a file of this test's (root only, as every test here).
struct Loop {
    dev: String,
    file: PathBuf,
}

impl Loop {
    fn new(file: PathBuf, size: u64) -> Self {
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        let dev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&file))
            .trim()
            .to_string();
        Self { dev, file }
    }

    /// Grows the device, as `lvextend` grows a volume.
    fn grow(&self, size: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.file)
            .unwrap()
            .set_len(size)
            .unwrap();
        run_ok(Command::new("losetup").args(["-c", &self.dev]));
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn vhd_util_lvhd_lines_on_block_devices() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // Volumes as SM makes them: sized for the metadata, not the data.
    let parent = Loop::new(dir.join("parent.lv"), 8 * MIB);
    let child = Loop::new(dir.join("child.lv"), 8 * MIB);
    let journal = Loop::new(dir.join("journal.lv"), 16 * MIB);
    let (p, c) = (parent.dev.as_str(), child.dev.as_str());

    // create -S 2097152 writes onto the existing device, footer at its end.
    vhd_ok(dir, &["create", "-n", p, "-s", "64", "-S", "2097152"]);
    let dev = Path::new(p);
    assert_eq!(read_bytes(dev, 8 * MIB - 512, 8), b"conectix");
    assert_eq!(read_bytes(dev, 0, 512), read_bytes(dev, 8 * MIB - 512, 512));
    assert_eq!(vhd_ok(dir, &["check", "-n", p]), format!("{p} is valid\n"));
    let info = get_vhd_info(dir, p, true);
    assert_eq!(
        (info.size_virt, info.parent, info.allocated_blocks),
        (64 * MIB, None, 0)
    );
    // The physical size is the end of the data (here the 2 TiB BAT) plus
    // the footer, not the volume's size.
    assert!(
        info.size_phys > 4 * MIB && info.size_phys < 8 * MIB,
        "{}",
        info.size_phys
    );

    // snapshot onto the child volume, then hide the parent (a journal in
    // /var/lib/vhd-util, which need not exist beforehand).
    vhd_ok(dir, &["snapshot", "-n", c, "-p", p, "-S", "2097152"]);
    assert_eq!(get_vhd_info(dir, c, true).parent.as_deref(), Some(p));
    vhd_ok(dir, &["set", "-n", p, "-f", "hidden", "-v", "1"]);
    assert_eq!(get_vhd_info(dir, p, false).hidden, 1);
    vhd_ok(dir, &["check", "-n", c, "-p"]);

    // Inflate: the volume grows, SM zeroes its last 512 bytes, then moves
    // the footer there (the open goes through the backup footer).
    child.grow(24 * MIB);
    write_bytes(Path::new(c), 24 * MIB - 512, &[0; 512]);
    vhd_ok(dir, &["modify", "-s", &(24 * MIB).to_string(), "-n", c]);
    assert_eq!(read_bytes(Path::new(c), 24 * MIB - 512, 8), b"conectix");
    vhd_ok(dir, &["check", "-n", c]);
    // Deflate: the footer moves to the new end; SM then shrinks the volume.
    let phys = get_vhd_info(dir, c, false).size_phys;
    let deflated = phys.div_ceil(4 * MIB) * 4 * MIB;
    vhd_ok(dir, &["modify", "-s", &deflated.to_string(), "-n", c]);
    child.grow(deflated);
    vhd_ok(dir, &["check", "-n", c]);
    assert_eq!(get_vhd_info(dir, c, true).parent.as_deref(), Some(p));

    // resize with a journal volume SM created (an existing device is a
    // valid journal; it is kept, not removed).
    vhd_ok(dir, &["resize", "-s", "128", "-n", c, "-j", &journal.dev]);
    assert_eq!(vhd_ok(dir, &["query", "-v", "-n", c]), "128\n");
    assert!(Path::new(&journal.dev).exists());
    vhd_ok(dir, &["check", "-n", c]);

    // modify -p on a volume: reparent onto the same parent (SM's relink).
    vhd_ok(dir, &["modify", "-p", p, "-n", c]);
    assert_eq!(get_vhd_info(dir, c, true).parent.as_deref(), Some(p));
    vhd_ok(dir, &["check", "-n", c, "-p"]);
}

#[test]
fn td_util_lines() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let full = |name: &str| canonical(dir, name);
    // create vhd MB PATH: a dynamic VHD like vhd-util create's.
    assert_eq!(td_ok(dir, &["create", "vhd", "100", "base.vhd"]), "");
    assert_eq!(
        vhd_ok(dir, &["check", "-n", "base.vhd"]),
        "base.vhd is valid\n"
    );
    // snapshot vhd CHILD PARENT.
    assert_eq!(td_ok(dir, &["snapshot", "vhd", "leaf.vhd", "base.vhd"]), "");
    // query vhd -v | -p | -vpfb: one answer per line, in that order.
    assert_eq!(td_ok(dir, &["query", "vhd", "-v", "leaf.vhd"]), "100\n");
    assert_eq!(
        td_ok(dir, &["query", "vhd", "-p", "leaf.vhd"]),
        format!("{}\n", full("base.vhd"))
    );
    assert_eq!(
        td_ok(dir, &["query", "vhd", "-p", "base.vhd"]),
        "base.vhd has no parent\n"
    );
    // -b reads the backup footer (the same answers on a healthy image).
    assert_eq!(
        td_ok(dir, &["query", "vhd", "-vpfb", "leaf.vhd"]),
        format!("100\n{}\nhidden: 0\n", full("base.vhd"))
    );
    // Failures: the C tool's lines and statuses.
    let out = td_util(dir, &["query", "vhd", "-v", "missing.vhd"]);
    assert_eq!(out.status.code(), Some(libc::ENOENT));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "failed opening missing.vhd: -2\n"
    );
    let out = td_util(dir, &["snapshot", "vhd", "x.vhd", "missing.vhd"]);
    assert_eq!(out.status.code(), Some(libc::ENOENT));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "File missing.vhd not found\n"
    );
    let out = td_util(dir, &["create", "vhd", "100", "base.vhd"]);
    assert_eq!(out.status.code(), Some(libc::EEXIST));
    assert_eq!(td_util(dir, &[]).status.code(), Some(255));
    assert_eq!(td_util(dir, &["bogus"]).status.code(), Some(255));
    assert_eq!(td_util(dir, &["query"]).status.code(), Some(255));
    assert_eq!(td_util(dir, &["query", "qcow"]).status.code(), Some(255));
    assert_eq!(
        td_util(dir, &["query", "vhd", "-v"]).status.code(),
        Some(libc::EINVAL)
    );
    // aio: a raw file made with -r, queried.
    td_ok(dir, &["create", "aio", "-r", "3", "raw.img"]);
    assert_eq!(
        std::fs::metadata(dir.join("raw.img")).unwrap().len(),
        3 * MIB
    );
    assert_eq!(
        td_ok(dir, &["query", "aio", "-vpf", "raw.img"]),
        "3\nraw.img has no parent\nhidden: 0\n"
    );
    assert_eq!(
        td_util(dir, &["create", "aio", "3", "sparse.img"])
            .status
            .code(),
        Some(libc::EINVAL)
    );
    // set vhd NAME hidden VALUE.
    td_ok(dir, &["set", "vhd", "base.vhd", "hidden", "1"]);
    assert_eq!(
        td_ok(dir, &["query", "vhd", "-f", "base.vhd"]),
        "hidden: 1\n"
    );
}
