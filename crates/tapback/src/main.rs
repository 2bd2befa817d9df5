//! `tapback [-d] [-v] [-n NAME] [-b] [-s PATH]`: connects Xen guests' `vbd3` disks to their
//! tapdisks (see the library's documentation). It stays in the foreground and logs to
//! stderr (`-d` is accepted for the C tool's "debug: don't daemonise"; `-v` logs more);
//! the options are parsed by [`tapback::cli`], documented in tapback(8).
//!
//! * `-n NAME`: the back-end type to serve (default `vbd3`): `/local/domain/<own domid>/
//!   backend/NAME`;
//! * `-b`: do not offer barriers (`feature-barrier` 0), as the C tool's `--nobarrier`;
//! * `-s PATH`: xenstored's socket (default: `/run/xenstored/socket`,
//!   `/var/run/xenstored/socket`, then `/dev/xen/xenbus`).
//!
//! Exit status: the errno of what failed (XenStore unreachable or gone).

use std::io::IsTerminal;

use tapback::backend::{ControlSockets, Store, Tapback};
use tapback::cli::{self, Command};
use tapback::xenstore::Client;

fn fail(what: &str, error: &std::io::Error) -> ! {
    eprintln!("tapback: {what}: {error}");
    std::process::exit(error.raw_os_error().unwrap_or(libc::EIO));
}

fn main() {
    let options = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Run(options)) => options,
        Ok(Command::Help) => {
            print!("{}", cli::USAGE);
            return;
        }
        Err(message) => {
            eprint!("tapback: {message}");
            std::process::exit(libc::EINVAL);
        }
    };
    let level = if options.verbose { "debug" } else { "info" };
    // Under systemd, stderr goes to the journal: no colour codes there.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
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
