//! Starting a tapdisk daemon and learning its pid (`tap-ctl spawn`). Which binary to run is
//! the caller's choice (`tap-ctl` finds it through its configuration).
//!
//! Handshake: tap-ctl runs `tapdisk` with no arguments, stdin from `/dev/null` and both stdout
//! and stderr on the write end of a pipe. The process it started forks and exits 0 at once; the
//! daemon child creates `<ctl dir>/ctl<pid>`, writes `"<ctl dir>/ctl<pid>\n"` to the pipe and
//! closes it. A startup failure is reported as `"tapdisk: <message>\n"` on the pipe and a
//! positive errno as exit status. A start killed by `SIGUSR1` is retried once (tapdisk can be
//! hit by a debug signal before it installs its handlers).

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::pipe::{pipe_with, PipeFlags};

use crate::error::{Error, Result};
use crate::paths::{parse_ctl_socket_name, ControlDir, CONTROL_DIR_ENV};

/// Where an installed tapdisk lives, in the order `tap-ctl` and `libblktapctl.so` look
/// (the packages install it at the first).
pub const TAPDISK_LOCATIONS: [&str; 2] = ["/usr/libexec/tapdisk", "/usr/lib/blktap/tapdisk"];

/// How long to wait for the daemon to report its control socket.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this much handshake output is kept (for error messages).
const MAX_HANDSHAKE_OUTPUT: usize = 4096;

/// Spawns the tapdisk binary at `tapdisk` with `BLKTAP_CONTROL_DIR` set to `dir`, waits for its
/// handshake and returns the daemon's pid.
pub fn spawn_with(dir: &ControlDir, tapdisk: &Path) -> Result<u32> {
    match spawn_once(dir, tapdisk) {
        Err(SpawnFailure::KilledByUsr1) => {
            spawn_once(dir, tapdisk).map_err(|failure| failure.into_error(tapdisk))
        }
        other => other.map_err(|failure| failure.into_error(tapdisk)),
    }
}

/// Why one spawn attempt failed.
enum SpawnFailure {
    /// The starter process died of `SIGUSR1`: worth one retry.
    KilledByUsr1,
    Other(Error),
}

impl SpawnFailure {
    fn into_error(self, tapdisk: &Path) -> Error {
        match self {
            Self::KilledByUsr1 => Error::new(
                libc::EINTR,
                format!("{} was killed by SIGUSR1 twice", tapdisk.display()),
            ),
            Self::Other(err) => err,
        }
    }
}

fn spawn_once(dir: &ControlDir, tapdisk: &Path) -> std::result::Result<u32, SpawnFailure> {
    let fail = |err: Error| SpawnFailure::Other(err);
    let (reader, writer) = pipe_with(PipeFlags::CLOEXEC)
        .map_err(|e| fail(Error::from_errno(e, "creating the tapdisk handshake pipe")))?;
    let reader = std::fs::File::from(reader);
    let writer_for_stderr = writer
        .try_clone()
        .map_err(|e| fail(Error::from_io(&e, "duplicating the tapdisk handshake pipe")))?;
    let mut command = Command::new(tapdisk);
    command
        .env(CONTROL_DIR_ENV, dir.root())
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(writer_for_stderr));
    let mut spawned = command.spawn();
    // ETXTBSY: the binary is still open for writing somewhere (being installed, or a file
    // descriptor inherited by a concurrent fork). It clears quickly; retry briefly.
    for _ in 0..20 {
        match &spawned {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(Duration::from_millis(25));
                spawned = command.spawn();
            }
            _ => break,
        }
    }
    // The Command owns our copies of the write end: drop it so EOF arrives when tapdisk closes.
    drop(command);
    let mut child = spawned.map_err(|e| {
        fail(Error::from_io(
            &e,
            format!("starting {}", tapdisk.display()),
        ))
    })?;
    let status = child.wait().map_err(|e| {
        fail(Error::from_io(
            &e,
            format!("waiting for {} (pid {})", tapdisk.display(), child.id()),
        ))
    })?;

    if let Some(signal) = status.signal() {
        if signal == libc::SIGUSR1 {
            return Err(SpawnFailure::KilledByUsr1);
        }
        return Err(fail(Error::new(
            libc::EINTR,
            format!("{} was killed by signal {signal}", tapdisk.display()),
        )));
    }
    let code = status.code().unwrap_or(libc::EIO);
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    if code != 0 {
        // Collect whatever it said before exiting; a read failure only loses the message.
        let output = read_handshake(&reader, deadline, false).unwrap_or_default();
        let message = failure_message(&output);
        return Err(fail(Error::new(
            code,
            format!(
                "{} failed to start (exit status {code}){message}",
                tapdisk.display()
            ),
        )));
    }
    let output = read_handshake(&reader, deadline, true).map_err(|err| {
        fail(err.within(format!(
            "reading the control socket path from {}",
            tapdisk.display()
        )))
    })?;
    parse_handshake(&output).map_err(fail)
}

/// `": <messages>"` built from the `tapdisk: ...` lines of failed-start output, or "".
fn failure_message(output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .map(|line| line.strip_prefix("tapdisk: ").unwrap_or(line).trim())
        .filter(|line| !line.is_empty())
        .collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!(": {}", lines.join("; "))
    }
}

/// Reads the pipe until EOF (or, with `stop_at_socket_line`, until a line naming a control
/// socket arrived), failing with `ETIMEDOUT` at `deadline`.
fn read_handshake(
    mut reader: &std::fs::File,
    deadline: Instant,
    stop_at_socket_line: bool,
) -> Result<String> {
    let mut collected = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        if stop_at_socket_line && has_socket_line(&collected) {
            break;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Error::new(
                libc::ETIMEDOUT,
                format!("no answer within {} s", HANDSHAKE_TIMEOUT.as_secs()),
            ));
        }
        let timeout = Timespec::try_from(remaining).unwrap_or(Timespec {
            tv_sec: 10,
            tv_nsec: 0,
        });
        let mut fds = [PollFd::from_borrowed_fd(reader.as_fd(), PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(Error::from_errno(e, "waiting on the handshake pipe")),
        }
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                let room = MAX_HANDSHAKE_OUTPUT.saturating_sub(collected.len());
                collected.extend_from_slice(&chunk[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::from_io(&e, "reading the handshake pipe")),
        }
    }
    Ok(String::from_utf8_lossy(&collected).into_owned())
}

fn has_socket_line(collected: &[u8]) -> bool {
    String::from_utf8_lossy(collected)
        .split_inclusive('\n')
        .any(|line| line.ends_with('\n') && socket_pid(line).is_some())
}

/// The pid in a `".../ctl<pid>"` line.
fn socket_pid(line: &str) -> Option<u32> {
    let path = Path::new(line.trim());
    path.file_name()?.to_str().and_then(parse_ctl_socket_name)
}

/// Extracts the daemon pid from the handshake output (`"<ctl dir>/ctl<pid>\n"`).
pub fn parse_handshake(output: &str) -> Result<u32> {
    if let Some(pid) = output.lines().find_map(socket_pid) {
        return Ok(pid);
    }
    let message = failure_message(output);
    Err(Error::new(
        libc::EIO,
        format!("tapdisk did not report its control socket{message}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    #[test]
    fn handshake_line_gives_the_pid() {
        assert_eq!(
            parse_handshake("/run/blktap-control/ctl4242\n").expect("pid"),
            4242
        );
        assert_eq!(parse_handshake("/tmp/x y/ctl7").expect("pid"), 7);
        let err = parse_handshake("tapdisk: cannot bind socket\n").expect_err("no pid");
        assert_eq!(err.errno(), libc::EIO);
        assert!(err.context().contains("cannot bind socket"), "{err}");
        assert!(parse_handshake("").is_err());
        assert!(parse_handshake("/run/blktap-control/ctlx\n").is_err());
    }

    /// Writes an executable shell script standing in for tapdisk.
    fn fake_tapdisk(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("tapdisk");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        let mut perms = std::fs::metadata(&path).expect("stat").permissions();
        perms.set_mode(0o755);
        std::fs::set_permissions(&path, perms).expect("chmod");
        path
    }

    #[test]
    fn spawn_reads_the_daemon_pid() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = ControlDir::new(tmp.path().join("ctl"));
        // Daemon-like: a background child reports its socket path after the starter exited.
        let script = fake_tapdisk(
            tmp.path(),
            r#"( sleep 0.2; echo "$BLKTAP_CONTROL_DIR/ctl31337" ) &
exit 0"#,
        );
        assert_eq!(spawn_with(&dir, &script).expect("spawn"), 31337);
    }

    #[test]
    fn spawn_failure_carries_exit_status_and_message() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = ControlDir::new(tmp.path().join("ctl"));
        let script = fake_tapdisk(tmp.path(), "echo 'tapdisk: control dir unusable'\nexit 13");
        let err = spawn_with(&dir, &script).expect_err("fails");
        assert_eq!(err.errno(), 13);
        assert!(err.context().contains("control dir unusable"), "{err}");
    }

    #[test]
    fn spawn_without_socket_line_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = ControlDir::new(tmp.path().join("ctl"));
        let script = fake_tapdisk(tmp.path(), "exit 0");
        assert_eq!(
            spawn_with(&dir, &script).expect_err("no line").errno(),
            libc::EIO
        );
    }

    #[test]
    fn spawn_killed_by_usr1_is_retried_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = ControlDir::new(tmp.path().join("ctl"));
        let flag = tmp.path().join("second-try");
        let script = fake_tapdisk(
            tmp.path(),
            &format!(
                r#"if [ -e '{flag}' ]; then echo "$BLKTAP_CONTROL_DIR/ctl99"; exit 0; fi
touch '{flag}'
kill -USR1 $$"#,
                flag = flag.display()
            ),
        );
        assert_eq!(spawn_with(&dir, &script).expect("second try works"), 99);
    }

    #[test]
    fn spawn_of_missing_binary_is_enoent() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = ControlDir::new(tmp.path().join("ctl"));
        let err = spawn_with(&dir, &tmp.path().join("nope")).expect_err("missing");
        assert_eq!(err.errno(), libc::ENOENT);
    }
}
