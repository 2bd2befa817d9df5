//! Hostile clients and leftovers (issue 19): every binary with its output pipe closed, `tap-ctl
//! list` with a tapdisk that does not answer, markers and sockets left by `kill -9`, image
//! opens that would block, idle control and NBD connections, and a soak test that keeps
//! control requests fast while hundreds of NBD and control clients misbehave.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use common::*;

/// Runs `cmd` with its stdout a pipe whose reading end is already closed; returns its exit
/// status and stderr.
fn run_into_closed_pipe(cmd: &mut Command) -> (std::process::ExitStatus, String) {
    let (reader, writer) = rustix::pipe::pipe().unwrap();
    drop(reader);
    let out = cmd
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_closed_output_pipe_ends_every_binary_quietly() {
    let env = Env::new();
    let image = env.dir.path().join("x.vhd");
    vhd_util_ok(&["create", "-n", image.to_str().unwrap(), "-s", "16"]);
    let image = image.to_str().unwrap();

    // vhd-util dies of SIGPIPE without a word, as the C tool does.
    for args in [
        vec!["check", "-n", image],
        vec![],
        vec!["read", "-p", "-n", image],
    ] {
        let (status, stderr) = run_into_closed_pipe(Command::new(vhd_util_bin()).args(&args));
        assert_eq!(
            status.signal(),
            Some(libc::SIGPIPE),
            "vhd-util {args:?}: {status:?} {stderr}"
        );
        assert!(stderr.is_empty(), "vhd-util {args:?}: {stderr}");
    }
    // tap-ctl and tapdisk keep SIGPIPE ignored (their sockets need EPIPE, not a signal) and
    // shrug off the failed write.
    for args in [vec![], vec!["list"], vec!["allocate"]] {
        let (status, stderr) = run_into_closed_pipe(&mut env.tap_ctl_cmd(&args));
        assert_eq!(status.code(), Some(0), "tap-ctl {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "tap-ctl {args:?}: {stderr}");
    }
    let (status, stderr) = run_into_closed_pipe(Command::new(tapdisk_bin()).arg("-h"));
    assert_eq!(status.code(), Some(0), "tapdisk -h: {stderr}");
    assert!(stderr.is_empty(), "tapdisk -h: {stderr}");
}

/// Sends `signal` to `pid`.
fn signal(pid: u32, signal: &str) {
    run_ok(Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]));
}

#[test]
fn list_names_a_stopped_tapdisk_keeps_its_rows_and_fails() {
    let env = Env::new();
    let (stopped, stopped_minor) = env.create(&env.raw_image("a.img", 1 << 20, 1), &[]);
    let (healthy, healthy_minor) = env.create(&env.raw_image("b.img", 1 << 20, 2), &[]);
    signal(stopped, "STOP");
    let start = std::time::Instant::now();
    let out = env.tap_ctl(&["list"]);
    let took = start.elapsed();
    signal(stopped, "CONT");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "list with a stopped tapdisk: {took:.2?}, exit {:?}",
        out.status.code()
    );
    assert_eq!(out.status.code(), Some(libc::ETIMEDOUT), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("tapdisk {stopped} did not answer")),
        "{stderr}"
    );
    let rows: Vec<ListRow> = stdout.lines().map(parse_list_line).collect();
    // The stopped tapdisk's minor is not shown as free: its row names the pid.
    assert!(
        rows.contains(&ListRow {
            pid: Some(stopped),
            minor: Some(stopped_minor),
            ..ListRow::default()
        }),
        "{stdout}"
    );
    assert!(
        !rows
            .iter()
            .any(|r| r.minor == Some(stopped_minor) && r.pid.is_none()),
        "{stdout}"
    );
    // The healthy one is listed in full.
    assert!(
        rows.iter()
            .any(|r| r.pid == Some(healthy) && r.minor == Some(healthy_minor) && r.args.is_some()),
        "{stdout}"
    );
    assert!(took < std::time::Duration::from_secs(30), "{took:?}");

    // Questions that the stopped tapdisk cannot affect still succeed.
    signal(stopped, "STOP");
    let by_pid = env.tap_ctl(&["list", "-p", &healthy.to_string()]);
    let by_minor = env.tap_ctl(&["list", "-m", &healthy_minor.to_string()]);
    signal(stopped, "CONT");
    assert_eq!(by_pid.status.code(), Some(0));
    assert_eq!(
        by_minor.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&by_minor.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&by_minor.stdout).lines().count(), 1);
    env.destroy(stopped, stopped_minor);
    env.destroy(healthy, healthy_minor);
}

#[test]
fn kill_9_leftovers_are_shown_stale_and_reclaimed() {
    let env = Env::new();
    // An allocated minor nobody attached yet is not stale and is never reclaimed.
    let allocated = env.tap_ctl_ok(&["allocate"]);
    let killed: Vec<(u32, u32)> = (0..5u8)
        .map(|round| {
            env.create(
                &env.raw_image(&format!("k{round}.img"), 1 << 20, round),
                &[],
            )
        })
        .collect();
    for (pid, _) in &killed {
        signal(*pid, "KILL");
        assert!(wait_for(std::time::Duration::from_secs(10), || {
            !process_alive(*pid)
        }));
    }
    let before = env.leftovers();
    println!("after 5 kill -9: {} files: {before:?}", before.len());
    // Each: its marker, ctl<pid>, nbdclient<pid> and the four NBD sockets of its minor.
    assert_eq!(before.len(), 1 + 5 * 7, "{before:?}");

    let out = env.tap_ctl(&["list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for (pid, minor) in &killed {
        assert!(
            stderr.contains(&format!("minor {minor} is stale: tapdisk {pid} died")),
            "{stderr}"
        );
    }
    // Rows stay what SM parses: an allocated minor without a tapdisk.
    let rows: Vec<ListRow> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(parse_list_line)
        .collect();
    assert_eq!(rows.len(), 6, "{rows:?}");
    assert!(rows.iter().all(|r| r.pid.is_none()));

    // The next create reclaims every stale marker and socket and reuses the lowest minor.
    let (pid, minor) = env.create(&env.raw_image("new.img", 1 << 20, 9), &[]);
    assert_eq!(minor, killed[0].1);
    let after = env.leftovers();
    println!("after the next create: {} files: {after:?}", after.len());
    let mut expected = vec![
        format!("ctl{pid}"),
        format!("nbdclient{pid}"),
        format!("nbd{pid}.{minor}"),
        format!("nbd-old{pid}.{minor}"),
        format!("nbdserver{pid}.{minor}"),
        format!("nbdserver-new{pid}.{minor}"),
        format!("tapdisk-{minor}"),
        allocated.trim().rsplit('/').next().unwrap().to_owned(),
    ];
    expected.sort();
    assert_eq!(after, expected);
    env.destroy(pid, minor);
}

#[test]
fn a_fifo_is_refused_at_once() {
    let env = Env::new();
    let (pid, minor) = env.create(&env.raw_image("a.img", 1 << 20, 1), &[]);
    let fifo = env.dir.path().join("fifo");
    run_ok(Command::new("mkfifo").arg(&fifo));
    let spare = env.tap_ctl_ok(&["allocate"]);
    let spare = spare.trim().rsplit('-').next().unwrap().to_owned();
    let (pid_s, minor_s) = (pid.to_string(), minor.to_string());
    env.tap_ctl_ok(&["attach", "-p", &pid_s, "-m", &spare]);
    let start = std::time::Instant::now();
    let params = format!("aio:{}", fifo.display());
    let stderr = env.tap_ctl_err(
        &["open", "-R", "-p", &pid_s, "-m", &spare, "-a", &params],
        libc::EINVAL,
    );
    println!("open of a FIFO: refused in {:.2?}", start.elapsed());
    let expected = format!(
        "{}: a FIFO, not a regular file or block device",
        fifo.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    let params = format!("vhd:{}", fifo.display());
    let stderr = env.tap_ctl_err(
        &["open", "-R", "-p", &pid_s, "-m", &spare, "-a", &params],
        libc::EINVAL,
    );
    assert!(stderr.contains("a FIFO, not a regular file"), "{stderr}");
    let params = format!("x-chain:{}", fifo.display());
    let stderr = env.tap_ctl_err(
        &["open", "-p", &pid_s, "-m", &spare, "-a", &params],
        libc::EINVAL,
    );
    assert!(stderr.contains("a FIFO, not a regular file"), "{stderr}");
    // The other minor never noticed.
    env.tap_ctl_ok(&["pause", "-p", &pid_s, "-m", &minor_s]);
    env.tap_ctl_ok(&["unpause", "-p", &pid_s, "-m", &minor_s]);
    env.tap_ctl_ok(&["detach", "-p", &pid_s, "-m", &spare]);
    env.destroy(pid, minor);
}

/// Resumes a stopped process when dropped (so a failing test never leaves it stopped).
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

#[test]
fn a_blocked_open_holds_only_its_minor_and_abandoned_requests_are_not_applied() {
    if !std::path::Path::new("/dev/fuse").exists()
        || !std::path::Path::new("/dev/loop-control").exists()
    {
        eprintln!("skipped: needs /dev/fuse and /dev/loop-control for a file whose open blocks");
        return;
    }
    let env = Env::new();
    // A file whose open(2) blocks: the FUSE file of a tapdisk that is stopped.
    let served = format!("aio:{}", env.raw_image("s.img", 1 << 20, 1).display());
    env.tap_ctl_ok(&["create", "-a", &served, "-b", "fuse"]);
    let row = env
        .list()
        .into_iter()
        .find(|row| row.args.as_deref() == Some(served.as_str()))
        .expect("the FUSE-backed VBD is listed");
    let (server, server_minor) = (row.pid.unwrap(), row.minor.unwrap());
    let fuse_file = env.ctl_dir.join(format!("fuse{server}.{server_minor}"));
    assert!(fuse_file.exists());
    let (pid, minor) = env.create(&env.raw_image("a.img", 1 << 20, 2), &[]);
    let (pid_s, minor_s) = (pid.to_string(), minor.to_string());
    let spare = env.tap_ctl_ok(&["allocate"]);
    let spare = spare.trim().rsplit('-').next().unwrap().to_owned();
    env.tap_ctl_ok(&["attach", "-p", &pid_s, "-m", &spare]);

    signal(server, "STOP");
    let resume = Resume(server);
    let blocked = format!("aio:{}", fuse_file.display());
    let mut stuck_open = env
        .tap_ctl_cmd(&[
            "open", "-D", "-R", "-p", &pid_s, "-m", &spare, "-a", &blocked,
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Queued behind it on the same minor: an open of a plain image, whose client gives up.
    let plain = format!("aio:{}", env.raw_image("b.img", 1 << 20, 3).display());
    let mut queued_open = env
        .tap_ctl_cmd(&["open", "-p", &pid_s, "-m", &spare, "-a", &plain])
        .spawn()
        .unwrap();

    // Another minor of the same tapdisk changes state as if nothing were going on.
    let start = std::time::Instant::now();
    env.tap_ctl_ok(&["pause", "-p", &pid_s, "-m", &minor_s, "-t", "10"]);
    let paused_in = start.elapsed();
    env.tap_ctl_ok(&["unpause", "-p", &pid_s, "-m", &minor_s]);
    println!("pause of another minor during a blocked open: {paused_in:.2?}");
    assert!(
        paused_in < std::time::Duration::from_secs(5),
        "{paused_in:?}"
    );
    assert!(
        queued_open.try_wait().unwrap().is_none(),
        "the queued open waits its turn"
    );
    assert!(
        stuck_open.try_wait().unwrap().is_none(),
        "the open is blocked"
    );

    // Both clients give up: neither open may take effect later.
    queued_open.kill().unwrap();
    queued_open.wait().unwrap();
    stuck_open.kill().unwrap();
    stuck_open.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(resume);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let rows = env.list();
    let spare_row = rows
        .iter()
        .find(|r| r.minor == Some(spare.parse().unwrap()))
        .expect("the spare minor is listed");
    assert_eq!(
        spare_row.args, None,
        "an abandoned open was applied: {rows:?}"
    );
    assert_eq!(spare_row.pid, Some(pid));
    let row = rows.iter().find(|r| r.minor == Some(minor)).unwrap();
    assert_eq!(row.state, Some(0), "{rows:?}");
    // The minor is free for a real open now.
    env.tap_ctl_ok(&["open", "-p", &pid_s, "-m", &spare, "-a", &plain]);
    env.tap_ctl_ok(&["close", "-p", &pid_s, "-m", &spare]);
    env.tap_ctl_ok(&["detach", "-p", &pid_s, "-m", &spare]);
    env.destroy(pid, minor);
    env.destroy(server, server_minor);
}

/// Opens `count` connections to `socket` that send `partial` bytes and then nothing.
fn idle_clients(
    socket: &std::path::Path,
    count: usize,
    partial: usize,
) -> Vec<std::os::unix::net::UnixStream> {
    (0..count)
        .map(|_| {
            let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
            std::io::Write::write_all(&mut stream, &vec![0u8; partial]).unwrap();
            stream
        })
        .collect()
}

#[test]
fn idle_control_connections_do_not_slow_the_control_plane() {
    let env = Env::new();
    let (pid, minor) = env.create(&env.raw_image("a.img", 1 << 20, 1), &[]);
    let ctl = env.ctl_dir.join(format!("ctl{pid}"));
    // Silent ones, and ones that stop half-way through their request.
    let mut idle = idle_clients(&ctl, 100, 0);
    idle.extend(idle_clients(&ctl, 50, 100));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let start = std::time::Instant::now();
    env.tap_ctl_ok(&["list"]);
    let list = start.elapsed();
    let start = std::time::Instant::now();
    env.tap_ctl_ok(&["stats", "-p", &pid.to_string(), "-m", &minor.to_string()]);
    let stats = start.elapsed();
    let start = std::time::Instant::now();
    env.tap_ctl_ok(&["pause", "-p", &pid.to_string(), "-m", &minor.to_string()]);
    env.tap_ctl_ok(&["unpause", "-p", &pid.to_string(), "-m", &minor.to_string()]);
    let pause = start.elapsed();
    println!(
        "with 150 idle control connections: list {list:.2?}, stats {stats:.2?}, pause+unpause {pause:.2?}"
    );
    for (what, took) in [("list", list), ("stats", stats), ("pause", pause)] {
        assert!(
            took < std::time::Duration::from_secs(2),
            "{what} took {took:?}"
        );
    }
    drop(idle);
    env.destroy(pid, minor);
}

/// A newstyle NBD client that negotiates `NBD_OPT_GO` and then parks: the connection, or
/// the server's error message.
fn nbd_park(socket: &std::path::Path) -> Result<std::os::unix::net::UnixStream, String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 18];
    stream
        .read_exact(&mut greeting)
        .map_err(|e| e.to_string())?;
    let mut hello = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
    hello.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    hello.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    hello.extend_from_slice(&6u32.to_be_bytes());
    hello.extend_from_slice(&[0u8; 6]); // empty name, no info requests
    stream.write_all(&hello).map_err(|e| e.to_string())?;
    loop {
        let mut header = [0u8; 20];
        stream.read_exact(&mut header).map_err(|e| e.to_string())?;
        let kind = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        stream.read_exact(&mut data).map_err(|e| e.to_string())?;
        match kind {
            1 => return Ok(stream),
            kind if kind & 0x8000_0000 != 0 => {
                return Err(format!("{kind:#x}: {}", String::from_utf8_lossy(&data)))
            }
            _ => {}
        }
    }
}

#[test]
fn parked_nbd_clients_are_capped_and_the_control_plane_keeps_its_descriptors() {
    let env = Env::new();
    let image = format!("aio:{}", env.raw_image("a.img", 1 << 20, 1).display());
    // The setting: a 1024-descriptor soft limit (hard 4096, which tapdisk takes).
    let template = env.tap_ctl_cmd(&["create", "-a", &image]);
    let mut create = Command::new("prlimit");
    create
        .arg("--nofile=1024:4096")
        .arg(template.get_program())
        .args(template.get_args());
    for (key, value) in template.get_envs() {
        if let Some(value) = value {
            create.env(key, value);
        }
    }
    let out = run_ok(&mut create);
    let minor: u32 = out.trim().rsplit('-').next().unwrap().parse().unwrap();
    let pid = env
        .list()
        .into_iter()
        .find(|r| r.minor == Some(minor))
        .unwrap()
        .pid
        .unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(
        open_files.split_whitespace().nth(3) == Some("4096"),
        "soft limit raised: {open_files}"
    );

    let socket = env.nbd_socket(pid, minor);
    let start = std::time::Instant::now();
    let mut parked = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..502 {
        match nbd_park(&socket) {
            Ok(stream) => parked.push(stream),
            Err(message) => refused.push(message),
        }
    }
    println!(
        "502 clients: {} parked, {} refused in {:.2?}; first refusal: {:?}",
        parked.len(),
        refused.len(),
        start.elapsed(),
        refused.first()
    );
    assert_eq!(parked.len(), 128, "the per-VBD default");
    assert!(
        refused
            .iter()
            .all(|m| m.contains("too many connections to minor")),
        "{refused:?}"
    );
    // A real client prints the reason (libnbd keeps server messages to its debug output).
    let info = Command::new("qemu-img")
        .args(["info", &env.nbd_uri(pid, minor)])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&info.stderr);
    assert!(!info.status.success());
    assert!(
        said.contains("server reported: too many connections"),
        "qemu-img said: {said}"
    );
    // Old-style clients beyond the cap are closed cleanly.
    let mut old =
        std::os::unix::net::UnixStream::connect(env.ctl_dir.join(format!("nbd-old{pid}.{minor}")))
            .unwrap();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut old, &mut rest).unwrap();
    assert!(rest.is_empty());
    // The control plane answers at once.
    let start = std::time::Instant::now();
    env.tap_ctl_ok(&["stats", "-p", &pid.to_string(), "-m", &minor.to_string()]);
    env.tap_ctl_ok(&["list"]);
    println!(
        "control with 128 parked and 374 refused clients: {:.2?}",
        start.elapsed()
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(2));
    // Places free up as clients leave.
    parked.truncate(100);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(nbd_park(&socket).is_ok());
    drop(parked);
    env.destroy(pid, minor);
}

#[test]
fn soak_control_stays_fast_among_hundreds_of_idle_slow_and_reconnecting_clients() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let env = Env::new();
    let (pid, minor) = env.create(&env.raw_image("a.img", 4 << 20, 1), &[]);
    let (pid_s, minor_s) = (pid.to_string(), minor.to_string());
    let nbd = env.nbd_socket(pid, minor);
    let ctl = env.ctl_dir.join(format!("ctl{pid}"));

    // Idle: NBD clients parked after GO (beyond the cap they are refused), control clients
    // that never send. Slow: NBD clients silent in the handshake, control clients that stop
    // half-way through their request.
    let parked: Vec<_> = (0..200).filter_map(|_| nbd_park(&nbd).ok()).collect();
    let slow_nbd = idle_clients(&nbd, 100, 0);
    let idle_ctl = idle_clients(&ctl, 100, 0);
    let slow_ctl = idle_clients(&ctl, 100, 300);
    // Reconnecting: NBD clients negotiating, holding on a moment and leaving, control
    // clients sending half a request and leaving, in a loop.
    const HOLD_MS: u64 = 20;
    let stop = Arc::new(AtomicBool::new(false));
    let reconnects = Arc::new(AtomicUsize::new(0));
    let churn: Vec<_> = (0..48)
        .map(|i| {
            let (stop, reconnects) = (Arc::clone(&stop), Arc::clone(&reconnects));
            let (nbd, ctl) = (nbd.clone(), ctl.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let client = if i % 3 == 0 {
                        idle_clients(&ctl, 1, 100).pop()
                    } else {
                        nbd_park(&nbd).ok()
                    };
                    std::thread::sleep(Duration::from_millis(HOLD_MS));
                    drop(client);
                    reconnects.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let mut timings: Vec<(&str, Duration)> = Vec::new();
    let soak_start = Instant::now();
    while soak_start.elapsed() < Duration::from_secs(8) {
        for (what, args) in [
            ("list", vec!["list"]),
            ("stats", vec!["stats", "-p", &pid_s, "-m", &minor_s]),
            ("pause", vec!["pause", "-p", &pid_s, "-m", &minor_s]),
            ("unpause", vec!["unpause", "-p", &pid_s, "-m", &minor_s]),
        ] {
            let start = Instant::now();
            env.tap_ctl_ok(&args);
            timings.push((what, start.elapsed()));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for thread in churn {
        thread.join().unwrap();
    }
    let mut all: Vec<Duration> = timings.iter().map(|(_, t)| *t).collect();
    all.sort();
    let median = all[all.len() / 2];
    let slowest = timings.iter().max_by_key(|(_, t)| *t).unwrap();
    println!(
        "soak: {} parked NBD, 100 slow NBD, 100 idle + 100 slow control, 48 reconnecting \
         ({} reconnects in {:.1?}): {} control requests, median {median:.2?}, slowest {} {:.2?}",
        parked.len(),
        reconnects.load(Ordering::Relaxed),
        soak_start.elapsed(),
        timings.len(),
        slowest.0,
        slowest.1
    );
    assert_eq!(parked.len(), 128);
    assert!(slowest.1 < Duration::from_secs(3), "{timings:?}");
    assert!(median < Duration::from_millis(500), "{timings:?}");
    drop((parked, slow_nbd, idle_ctl, slow_ctl));
    env.destroy(pid, minor);
}
