//! The `tapdisk` executable: `tapdisk [-D] [-h]`.
//!
//! Without `-D` it forks into the background (the parent exits once the daemon is ready or
//! has failed, with the daemon's status), creates its control socket `<ctl dir>/ctl<pid>` and
//! writes that path on its original standard output, which is how `tap-ctl spawn` learns the
//! pid. With `-D` it stays in the foreground and logs to stderr. On a startup failure it
//! prints `tapdisk: <message>` on stderr and exits with the errno.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tapdisk::control::ControlServer;
use tapdisk::server::Tapdisk;
use tapdisk::sys;

const USAGE: &str = "usage: tapdisk [-D] [-h]\n  -D  do not daemonize: stay in the foreground and log to stderr\n  -h  show this help\n";

/// Startup options.
struct Options {
    foreground: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options { foreground: false };
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "-D" => options.foreground = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(options)
}

/// A startup failure: message and errno.
struct Failure {
    errno: i32,
    message: String,
}

impl Failure {
    fn new(context: &str, error: &io::Error) -> Self {
        Self {
            errno: error.raw_os_error().unwrap_or(libc::EIO),
            message: format!("{context}: {error}"),
        }
    }
}

fn create_control_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
}

/// Binds `<dir>/ctl<pid>` with root-only permissions.
fn bind_control_socket(
    dir: &Path,
    pid: u32,
) -> io::Result<(std::os::unix::net::UnixListener, PathBuf)> {
    let path = blktapctl::paths::ControlDir::new(dir).ctl_socket_path(pid);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok((listener, path))
}

/// Points stdin, stdout and stderr at /dev/null (after the spawner has its answer).
fn detach_stdio() -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    rustix::stdio::dup2_stdin(&null)?;
    rustix::stdio::dup2_stdout(&null)?;
    rustix::stdio::dup2_stderr(&null)?;
    Ok(())
}

/// Runs the daemon. After forking, `ready` holds the pipe the waiting parent listens on.
fn run(options: &Options, ready: &mut Option<sys::ReadyPipe>) -> Result<(), Failure> {
    let control_dir = blktapctl::paths::control_dir();
    create_control_dir(&control_dir)
        .map_err(|e| Failure::new(&format!("creating {}", control_dir.display()), &e))?;
    if !options.foreground {
        *ready = Some(sys::daemonize().map_err(|e| Failure::new("daemonizing", &e))?);
    }
    let pid = std::process::id();
    if options.foreground {
        tapdisk::logging::init_stderr();
    } else {
        tapdisk::logging::init_syslog(pid);
        std::env::set_current_dir("/").map_err(|e| Failure::new("chdir /", &e))?;
    }
    let (listener, socket_path) = bind_control_socket(&control_dir, pid).map_err(|e| {
        Failure::new(
            &format!("binding the control socket in {}", control_dir.display()),
            &e,
        )
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tapdisk")
        .build()
        .map_err(|e| Failure::new("starting the runtime", &e))?;

    // The spawner reads this line to learn our pid.
    let mut stdout = io::stdout();
    let announced = writeln!(stdout, "{}", socket_path.display()).and_then(|()| stdout.flush());
    if let Some(ready) = ready.take() {
        if let Err(e) = announced.and_then(|()| detach_stdio()) {
            ready.report(e.raw_os_error().unwrap_or(libc::EIO));
            let _ = std::fs::remove_file(&socket_path);
            return Err(Failure::new("announcing the control socket", &e));
        }
        ready.report(0);
    }
    tracing::info!(
        "tapdisk {} started, control socket {}",
        env!("CARGO_PKG_VERSION"),
        socket_path.display()
    );

    runtime.block_on(async {
        let tapdisk = Arc::new(Tapdisk::new(pid, control_dir));
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!("control socket: {e}");
                return;
            }
        };
        let control = ControlServer::new();
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match terminate.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let signalled = tokio::select! {
            () = control.run(listener, Arc::clone(&tapdisk)) => false,
            () = tapdisk.wait_for_exit() => false,
            () = terminated => true,
            _ = tokio::signal::ctrl_c() => true,
        };
        if signalled {
            tracing::info!("signal received: closing every VBD");
        }
        // Let in-progress control requests (e.g. the final DETACH) deliver their replies.
        control.drain(Duration::from_secs(2)).await;
        tapdisk.shutdown().await;
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    let _ = std::fs::remove_file(&socket_path);
    tracing::info!("tapdisk exiting");
    Ok(())
}

fn main() {
    let options = match parse_args() {
        Ok(options) => options,
        Err(message) => {
            eprint!("tapdisk: {message}\n{USAGE}");
            std::process::exit(libc::EINVAL);
        }
    };
    let mut ready = None;
    if let Err(failure) = run(&options, &mut ready) {
        eprintln!("tapdisk: {}", failure.message);
        tracing::error!("{}", failure.message);
        if let Some(ready) = ready {
            ready.report(failure.errno);
        }
        std::process::exit(failure.errno);
    }
}
