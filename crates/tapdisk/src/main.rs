//! The `tapdisk` executable: `tapdisk [-D] [-c FILE] [--print-config] [-h]`.
//!
//! Without `-D` it forks into the background (the parent exits once the daemon is ready or
//! has failed, with the daemon's status), creates its control socket `<ctl dir>/ctl<pid>` and
//! writes that path on its original standard output, which is how `tap-ctl spawn` learns the
//! pid; beside it, `<ctl dir>/nbdclient<pid>` receives sockets for `nbd:` images. With `-D`
//! it stays in the foreground and logs to stderr. On a startup failure (an invalid
//! configuration among them) it prints `tapdisk: <message>` on stderr and exits with the
//! errno. The configuration ([`tapdisk::config`]) is read here, once, and passed down.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tapdisk::config::{Config, Flags, USAGE};
use tapdisk::control::ControlServer;
use tapdisk::server::Tapdisk;
use tapdisk::sys;

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

/// Binds the socket at `path` (replacing a stale one) with root-only permissions.
fn bind_socket(path: PathBuf) -> io::Result<(std::os::unix::net::UnixListener, PathBuf)> {
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
fn run(flags: &Flags, config: Config, ready: &mut Option<sys::ReadyPipe>) -> Result<(), Failure> {
    let control_dir = config.control_dir.clone();
    create_control_dir(&control_dir)
        .map_err(|e| Failure::new(&format!("creating {}", control_dir.display()), &e))?;
    if !flags.foreground {
        *ready = Some(sys::daemonize().map_err(|e| Failure::new("daemonizing", &e))?);
    }
    let pid = std::process::id();
    if flags.foreground {
        tapdisk::logging::init_stderr(&config.log_filter);
    } else {
        tapdisk::logging::init_syslog(pid, &config.log_filter);
        std::env::set_current_dir("/").map_err(|e| Failure::new("chdir /", &e))?;
    }
    let paths = blktapctl::paths::ControlDir::new(&control_dir);
    let (listener, socket_path) = bind_socket(paths.ctl_socket_path(pid)).map_err(|e| {
        Failure::new(
            &format!("binding the control socket in {}", control_dir.display()),
            &e,
        )
    })?;
    let (nbd_client_listener, nbd_client_path) = bind_socket(paths.nbd_client_socket_path(pid))
        .map_err(|e| {
            let _ = std::fs::remove_file(&socket_path);
            Failure::new(
                &format!("binding the nbdclient socket in {}", control_dir.display()),
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
            let _ = std::fs::remove_file(&nbd_client_path);
            let _ = std::fs::remove_file(&socket_path);
            return Err(Failure::new("announcing the control socket", &e));
        }
        ready.report(0);
    }
    tracing::info!(
        "tapdisk {} started, control socket {}, configuration {}",
        env!("CARGO_PKG_VERSION"),
        socket_path.display(),
        config
            .file
            .as_ref()
            .map_or("built in".into(), |file| file.display().to_string())
    );

    runtime.block_on(async {
        let descriptors = sys::raise_open_file_limit();
        let mut config = config;
        config.nbd = config.nbd.within_descriptors(descriptors);
        tracing::info!(
            descriptors,
            "NBD connections: at most {} per VBD, {} per tapdisk",
            config.nbd.per_vbd,
            config.nbd.per_tapdisk
        );
        let tapdisk = Arc::new(Tapdisk::new(pid, Arc::new(config)));
        let control = Arc::new(ControlServer::new(tokio::runtime::Handle::current()));
        if let Err(e) = control.start(listener, Arc::clone(&tapdisk)) {
            tracing::error!("cannot start the control thread: {e}");
            return;
        }
        let receiver = match tokio::net::UnixListener::from_std(nbd_client_listener) {
            Ok(nbd_client) => Some(tokio::spawn(tapdisk.passed_sockets().receive(nbd_client))),
            Err(e) => {
                tracing::error!("nbdclient socket: {e}");
                None
            }
        };
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
            () = tapdisk.wait_for_exit() => false,
            () = terminated => true,
            _ = tokio::signal::ctrl_c() => true,
        };
        if signalled {
            tracing::info!("signal received: closing every VBD");
        }
        // Let in-progress control requests (e.g. the final DETACH) deliver their replies.
        control.drain(Duration::from_secs(2)).await;
        if let Some(receiver) = receiver {
            receiver.abort();
        }
        tapdisk.shutdown().await;
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    // The control socket goes last: whoever sees it gone may take the tapdisk for gone.
    let _ = std::fs::remove_file(&nbd_client_path);
    let _ = std::fs::remove_file(&socket_path);
    tracing::info!("tapdisk exiting");
    Ok(())
}

fn main() {
    // Output goes through write! with errors ignored: a closed stdout or stderr is no reason
    // to panic (SIGPIPE stays ignored, as in the C tapdisk).
    let flags = match Flags::parse(std::env::args().skip(1)) {
        Ok(flags) => flags,
        Err(error) => {
            let _ = write!(io::stderr(), "tapdisk: {error}\n{USAGE}");
            std::process::exit(libc::EINVAL);
        }
    };
    if flags.help {
        let _ = io::stdout().write_all(USAGE.as_bytes());
        std::process::exit(0);
    }
    let config = match Config::load(&flags) {
        Ok(config) => config,
        Err(error) => {
            let _ = writeln!(io::stderr(), "tapdisk: {error}");
            std::process::exit(error.errno());
        }
    };
    if flags.print_config {
        let _ = io::stdout().write_all(config.to_toml().as_bytes());
        std::process::exit(0);
    }
    let mut ready = None;
    if let Err(failure) = run(&flags, config, &mut ready) {
        let _ = writeln!(io::stderr(), "tapdisk: {}", failure.message);
        tracing::error!("{}", failure.message);
        if let Some(ready) = ready {
            ready.report(failure.errno);
        }
        std::process::exit(failure.errno);
    }
}
