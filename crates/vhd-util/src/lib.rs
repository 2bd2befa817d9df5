//! The commands of `vhd-util` and `td-util` (the two binaries of this
//! package share them): each takes its arguments, prints the C tools'
//! lines and returns the exit status (a positive errno, 0 on success).

pub mod commands;
mod dump;
mod getopt;
mod key;
mod lvm;
mod progress;
mod scan;
pub mod sigpipe;
pub mod td;

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

/// Runs `vhd-util` with `args` (without the program name); `--debug`
/// anywhere is accepted and ignored, as SM passes it.
pub fn vhd_util(mut args: Vec<String>) -> i32 {
    args.retain(|a| a != "--debug");
    let Some(cmd) = args.first().cloned() else {
        usage();
        return EINVAL;
    };
    let rest = &args[1..];
    match cmd.as_str() {
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
    }
}

/// The process exit code of a command status (its magnitude, at most 255).
pub fn exit_code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status.unsigned_abs().min(255)).unwrap_or(u8::MAX))
}
