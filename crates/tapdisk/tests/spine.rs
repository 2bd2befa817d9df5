//! End-to-end tests of the spine: `tap-ctl` driving real `tapdisk` daemons, disks read and
//! written over the NBD export by qemu-img, qemu-io and fio.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{fio_nbd_verify, process_alive, require, run_ok, wait_for, Env};

const MIB: usize = 1 << 20;

#[test]
fn create_list_stats_destroy() {
    let env = Env::new();
    let image = env.raw_image("disk.img", 8 * MIB, 0);
    let (pid, minor) = env.create(&image, &[]);
    assert!(process_alive(pid));

    let rows = env.list();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].state, Some(0));
    assert_eq!(
        rows[0].args.as_deref(),
        Some(format!("aio:{}", image.display()).as_str())
    );
    assert!(env.nbd_socket(pid, minor).exists());

    // Filters.
    let by_pid = env.tap_ctl_ok(&["list", "-p", &pid.to_string()]);
    assert_eq!(by_pid.lines().count(), 1);
    let none = env.tap_ctl_ok(&["list", "-m", &(minor + 1).to_string()]);
    assert_eq!(none.trim(), "");
    let by_type = env.tap_ctl_ok(&["list", "-t", "aio"]);
    assert_eq!(by_type.lines().count(), 1);
    let by_file = env.tap_ctl_ok(&["list", "-f", &image.display().to_string()]);
    assert_eq!(by_file.lines().count(), 1);

    let stats = env.tap_ctl_ok(&["stats", "-p", &pid.to_string(), "-m", &minor.to_string()]);
    assert!(stats.starts_with("{ \"name\": \"aio:"), "{stats}");
    assert!(stats.contains("\"images\": [ { \"name\": "), "{stats}");
    assert!(
        stats.contains("\"driver\": { \"type\": 0, \"name\": \"aio\""),
        "{stats}"
    );
    assert!(stats.contains("\"reqs_outstanding\": 0"), "{stats}");

    env.destroy(pid, minor);
    assert!(
        wait_for(Duration::from_secs(5), || !process_alive(pid)),
        "tapdisk {pid} still running"
    );
    assert_eq!(env.leftovers(), Vec::<String>::new());
    assert_eq!(env.tap_ctl_ok(&["list"]).trim(), "");
}

#[test]
fn single_steps_allocate_spawn_attach_open_close_detach_free() {
    let env = Env::new();
    let image = env.raw_image("disk.img", 4 * MIB, 7);
    let marker = env.tap_ctl_ok(&["allocate"]);
    assert_eq!(
        marker.trim(),
        env.ctl_dir.join("tapdisk/tapdisk-0").display().to_string()
    );
    let pid = env
        .tap_ctl_ok(&["spawn"])
        .trim()
        .parse::<u32>()
        .expect("spawn prints the pid");
    assert!(process_alive(pid));
    let (p, m) = (pid.to_string(), "0".to_string());

    // A tapdisk with no VBD, and a minor with no tapdisk: both listed.
    let rows = env.list();
    assert!(
        rows.iter().any(|r| r.pid == Some(pid) && r.minor.is_none()),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|r| r.minor == Some(0) && r.pid.is_none()),
        "{rows:?}"
    );

    // Attached, not opened yet: state 0, as the C tapdisk lists it.
    env.tap_ctl_ok(&["attach", "-p", &p, "-m", &m]);
    let rows = env.list();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].pid, rows[0].minor, rows[0].state),
        (Some(pid), Some(0), Some(0))
    );

    // free refuses while the tapdisk holds the marker lock.
    let out = env.tap_ctl(&["free", "-m", "0"]);
    assert!(!out.status.success());

    let params = format!("aio:{}", image.display());
    env.tap_ctl_ok(&["open", "-p", &p, "-m", &m, "-a", &params]);
    assert_eq!(env.list()[0].state, Some(0));
    assert!(env.nbd_socket(pid, 0).exists());

    env.tap_ctl_ok(&["close", "-p", &p, "-m", &m]);
    assert!(!env.nbd_socket(pid, 0).exists());
    assert_eq!(env.list()[0].state, Some(0x2));
    env.tap_ctl_ok(&["detach", "-p", &p, "-m", &m]);
    assert!(wait_for(Duration::from_secs(5), || !process_alive(pid)));
    env.tap_ctl_ok(&["free", "-m", &m]);
    assert_eq!(env.leftovers(), Vec::<String>::new());
}

#[test]
fn nbd_export_compares_equal_and_writes_reach_the_file() {
    require("qemu-img");
    require("qemu-io");
    let env = Env::new();
    let image = env.raw_image("disk.img", 16 * MIB, 3);
    let (pid, minor) = env.create(&image, &[]);
    let uri = env.nbd_uri(pid, minor);

    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&image)
            .arg(&uri),
    );
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0xa5 1M 256k",
        "-c",
        "write -P 0x5a 4096 512",
        "-c",
        "flush",
    ]));
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-r"])
            .arg(&image)
            .args(["-c", "read -P 0xa5 1M 256k", "-c", "read -P 0x5a 4096 512"]),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&image)
            .arg(&uri),
    );
    env.destroy(pid, minor);
}

#[test]
fn fio_verify_at_queue_depth_32() {
    require("fio");
    let env = Env::new();
    let image = env.raw_image("disk.img", 32 * MIB, 0);
    let (pid, minor) = env.create(&image, &[]);
    let job = ["--rw=randrw", "--bs=4k", "--iodepth=32", "--size=32M"];
    fio_nbd_verify(env.dir.path(), &env.nbd_uri(pid, minor), &job);
    env.destroy(pid, minor);
}

#[test]
fn pause_holds_io_and_unpause_switches_files() {
    require("qemu-io");
    let env = Env::new();
    let first = env.raw_image("a.img", 4 * MIB, 0);
    let second = env.raw_image("b.img", 4 * MIB, 100);
    let bigger = env.raw_image("c.img", 8 * MIB, 0);
    let (pid, minor) = env.create(&first, &[]);
    let (p, m) = (pid.to_string(), minor.to_string());
    let uri = env.nbd_uri(pid, minor);

    env.tap_ctl_ok(&["pause", "-p", &p, "-m", &m]);
    assert_eq!(env.list()[0].state, Some(0x2a));
    // I/O waits while paused...
    let mut reader = Command::new("qemu-io")
        .args(["-f", "raw", "-r", &uri, "-c", "read -P 100 0 512"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        reader.try_wait().unwrap().is_none(),
        "a read completed while the disk was paused"
    );

    // ...a file of another size is refused and the disk stays paused and intact...
    let bigger_params = format!("aio:{}", bigger.display());
    let stderr = env.tap_ctl_err(
        &["unpause", "-p", &p, "-m", &m, "-a", &bigger_params],
        libc::EMEDIUMTYPE,
    );
    assert!(
        stderr.contains("has 16384 sectors"),
        "the daemon's explanation reaches the user: {stderr}"
    );
    let row = &env.list()[0];
    assert_eq!(row.state.map(|s| s & 0x20), Some(0x20), "{row:?}");
    assert_eq!(
        row.args.as_deref(),
        Some(format!("aio:{}", first.display()).as_str())
    );
    assert!(reader.try_wait().unwrap().is_none());

    // ...and one of the same size is served once unpaused (sector 0 of b.img holds 100).
    let second_params = format!("aio:{}", second.display());
    env.tap_ctl_ok(&["unpause", "-p", &p, "-m", &m, "-a", &second_params]);
    let status = reader.wait().unwrap();
    assert!(status.success(), "the held read failed after unpause");
    let row = &env.list()[0];
    assert_eq!(row.state, Some(0));
    assert_eq!(row.args.as_deref(), Some(second_params.as_str()));

    // Pause and unpause without -a keeps the current file.
    env.tap_ctl_ok(&["pause", "-p", &p, "-m", &m]);
    env.tap_ctl_ok(&["unpause", "-p", &p, "-m", &m]);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-r", &uri, "-c", "read -P 101 512 512"]));
    env.destroy(pid, minor);
}

#[test]
fn failure_paths_leak_nothing() {
    let env = Env::new();
    // Open of a missing file: ENOENT, and create undoes every step.
    let missing = env.dir.path().join("missing.img");
    let params = format!("aio:{}", missing.display());
    let stderr = env.tap_ctl_err(&["create", "-a", &params], libc::ENOENT);
    assert!(
        stderr.contains(&missing.display().to_string()),
        "the missing file is named: {stderr}"
    );
    assert!(
        wait_for(Duration::from_secs(5), || env.tapdisk_pids().is_empty()),
        "a tapdisk was left running"
    );
    assert_eq!(env.leftovers(), Vec::<String>::new());

    // An unknown image type: ENOSYS, as the C tapdisk answers (was ENOENT, changed for issue
    // 23), nothing left behind.
    env.tap_ctl_err(&["create", "-a", "bogus:/x"], libc::ENOSYS);
    assert!(wait_for(Duration::from_secs(5), || env
        .tapdisk_pids()
        .is_empty()));
    assert_eq!(env.leftovers(), Vec::<String>::new());

    // Spawn failure: the tapdisk binary cannot run.
    let image = env.raw_image("disk.img", MIB, 0);
    let params = format!("aio:{}", image.display());
    let out = env
        .tap_ctl_cmd(&["create", "-a", &params])
        .env("BLKTAP_TAPDISK", "/nonexistent/tapdisk")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
    assert_eq!(env.leftovers(), Vec::<String>::new());

    // Attach to a minor another tapdisk holds: EBUSY, and the second tapdisk is not harmed.
    let (pid, minor) = env.create(&image, &[]);
    let other = env.tap_ctl_ok(&["spawn"]).trim().parse::<u32>().unwrap();
    env.tap_ctl_err(
        &["attach", "-p", &other.to_string(), "-m", &minor.to_string()],
        libc::EBUSY,
    );
    // Attach twice in the same tapdisk: EEXIST.
    env.tap_ctl_err(
        &["attach", "-p", &pid.to_string(), "-m", &minor.to_string()],
        libc::EEXIST,
    );
    // Open on an unattached minor: EINVAL (as tapdisk).
    env.tap_ctl_err(
        &["open", "-p", &other.to_string(), "-m", "77", "-a", &params],
        libc::EINVAL,
    );
    // Detach while open: EBUSY.
    env.tap_ctl_err(
        &["detach", "-p", &pid.to_string(), "-m", &minor.to_string()],
        libc::EBUSY,
    );
    env.destroy(pid, minor);
    // The idle tapdisk goes away on SIGTERM and removes its socket.
    run_ok(Command::new("kill").arg(other.to_string()));
    assert!(wait_for(Duration::from_secs(5), || !process_alive(other)));
    assert!(
        wait_for(Duration::from_secs(5), || env.leftovers().is_empty()),
        "{:?}",
        env.leftovers()
    );
}

#[test]
fn fifty_create_destroy_cycles_leave_nothing_behind() {
    let env = Env::new();
    let image = env.raw_image("disk.img", MIB, 0);
    let mut pids = Vec::new();
    for _ in 0..50 {
        let (pid, minor) = env.create(&image, &[]);
        assert_eq!(minor, 0, "the lowest free minor is reused");
        env.destroy(pid, minor);
        pids.push(pid);
    }
    assert!(wait_for(Duration::from_secs(10), || pids
        .iter()
        .all(|pid| !process_alive(*pid))));
    assert_eq!(env.leftovers(), Vec::<String>::new());
    assert_eq!(env.tap_ctl_ok(&["list"]).trim(), "");
}
