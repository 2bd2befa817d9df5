//! `tap-ctl`: the command-line front end of the blktap control library.
//!
//! See [`cli`] for the command set and its compatibility rules with the C tool, and
//! [`config`] for the environment variables it reads (once, here).

mod cli;
mod config;

use std::io::{IsTerminal, Write};

fn main() {
    let argv: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    let config = config::Config::from_environment();
    let action = cli::parse(&argv, &config);
    let stdout = std::io::stdout();
    let stdout_is_tty = stdout.is_terminal();
    let mut out = stdout.lock();
    let mut err = std::io::stderr().lock();
    // Unbuffered: `open -E` reads the key from stdin, and no copy of it may stay behind.
    let mut stdin = secret::Unbuffered(std::io::stdin());
    let mut io = cli::Io {
        input: &mut stdin,
        out: &mut out,
        err: &mut err,
        stdout_is_tty,
    };
    let status = cli::run(action, &config, &mut io);
    let _ = out.flush();
    drop(out);
    std::process::exit(status);
}
