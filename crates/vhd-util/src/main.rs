//! `vhd-util`: the VHD maintenance tool of blktap, with the same commands,
//! options, output lines and exit statuses (exit status = errno; usage
//! errors exit with EINVAL, 22). Messages go to stdout like the C tool's.

mod commands;
mod dump;
mod getopt;
mod key;
mod progress;
mod scan;
mod sigpipe;

use std::process::ExitCode;

const EINVAL: i32 = 22;

const COMMANDS: &[&str] = &[
    "create", "snapshot", "query", "read", "set", "repair", "resize", "fill", "coalesce", "modify",
    "scan", "check", "revert", "key", "copy",
];

fn usage() {
    println!("usage: vhd-util COMMAND [OPTIONS]");
    println!("COMMAND := {{ {} }}", COMMANDS.join(" | "));
}

fn main() -> ExitCode {
    sigpipe::terminate_on_broken_pipe();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.retain(|a| a != "--debug");
    let Some(cmd) = args.first().cloned() else {
        usage();
        return code(EINVAL);
    };
    let rest = &args[1..];
    let status = match cmd.as_str() {
        "create" => commands::create(rest),
        "snapshot" => commands::snapshot(rest),
        "query" => commands::query(rest),
        "read" => commands::read(rest),
        "set" => commands::set(rest),
        "repair" => commands::repair(rest),
        "resize" => commands::resize(rest),
        "fill" => commands::fill(rest),
        "coalesce" => commands::coalesce(rest),
        "modify" => commands::modify(rest),
        "scan" => commands::scan(rest),
        "check" => commands::check(rest),
        "revert" => commands::revert(rest),
        "key" => commands::key(rest),
        "copy" => commands::copy(rest),
        "-h" | "--help" | "help" => {
            usage();
            0
        }
        _ => {
            usage();
            EINVAL
        }
    };
    code(status)
}

fn code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status.unsigned_abs().min(255)).unwrap_or(u8::MAX))
}
