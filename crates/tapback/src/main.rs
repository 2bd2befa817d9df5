//! `tapback [-d] [-v] [-n NAME] [-b] [-s PATH]`: connects Xen guests' `vbd3` disks to their
//! tapdisks (see the library's documentation). It stays in the foreground and logs to
//! stderr (`-d` is accepted for the C tool's "debug: don't daemonise"; `-v` logs more).
//!
//! * `-n NAME`: the back-end type to serve (default `vbd3`): `/local/domain/<own domid>/
//!   backend/NAME`;
//! * `-b`: do not offer barriers (`feature-barrier` 0), as the C tool's `--nobarrier`;
//! * `-s PATH`: xenstored's socket (default: `/run/xenstored/socket`,
//!   `/var/run/xenstored/socket`, then `/dev/xen/xenbus`).
//!
//! Exit status: the errno of what failed (XenStore unreachable or gone).

use tapback::backend::{ControlSockets, Features, Store, Tapback};
use tapback::xenstore::Client;

const USAGE: &str = "usage: tapback [-d] [-v] [-n NAME] [-b] [-s XENSTORE-SOCKET]\n";

struct Options {
    name: String,
    verbose: bool,
    features: Features,
    socket: Option<String>,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        name: "vbd3".to_owned(),
        verbose: false,
        features: Features::default(),
        socket: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-d" | "--debug" => {}
            "-v" | "--verbose" => options.verbose = true,
            "-b" | "--nobarrier" => options.features.barrier = false,
            "-n" | "--name" => options.name = args.next().ok_or("-n needs a name")?,
            "-s" | "--socket" => options.socket = Some(args.next().ok_or("-s needs a path")?),
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
        }
    }
    Ok(options)
}

fn fail(what: &str, error: &std::io::Error) -> ! {
    eprintln!("tapback: {what}: {error}");
    std::process::exit(error.raw_os_error().unwrap_or(libc::EIO));
}

fn main() {
    let options = parse_args().unwrap_or_else(|message| {
        eprint!("tapback: {message}");
        std::process::exit(libc::EINVAL);
    });
    let level = if options.verbose { "debug" } else { "info" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .init();
    let mut client = Client::open(options.socket.as_deref())
        .unwrap_or_else(|e| fail("cannot reach XenStore", &e));
    let own = client
        .read("domid")
        .unwrap_or_else(|e| fail("reading domid", &e))
        .and_then(|id| id.trim().parse::<u32>().ok())
        .unwrap_or(0);
    let root = format!("/local/domain/{own}/backend/{}", options.name);
    let mut tapback = Tapback::new(client, ControlSockets, &root, options.features);
    tapback
        .start()
        .unwrap_or_else(|e| fail(&format!("watching {root}"), &e));
    tracing::info!("serving {root}");
    loop {
        let (path, token) = tapback
            .store()
            .next_event()
            .unwrap_or_else(|e| fail("XenStore connection", &e));
        tapback.handle_event(&path, &token);
    }
}
