//! `cbt-util`: the changed-block-tracking log tool of blktap, with the C tool's commands
//! (`create`, `get`, `set`, `coalesce`), options, output and exit statuses, which the storage
//! manager parses; and `extents`, which prints a log's changed extents as JSON.
//!
//! Exit statuses follow the C tool, odd ones included: no command prints the usage and exits
//! `EINVAL` (22); an unknown command (or a name of 25 characters or more) says `Invalid
//! COMMAND <name>` on stderr, prints the usage on stdout and exits 0; a command's `-h` prints
//! its usage and exits `EINVAL`.

mod args;
mod commands;

use std::io::Write;
use std::process::ExitCode;

use commands::Io;

/// The C tool's commands, as its usage lists them.
const COMMANDS: [&str; 4] = ["create", "set", "get", "coalesce"];

fn print_usage(out: &mut dyn Write) {
    let _ = writeln!(out, "usage: cbt-util COMMAND [OPTIONS]");
    let _ = writeln!(out, "COMMAND := {{ {} }}", COMMANDS.join(" | "));
}

/// Runs the command line `argv` (without the program name); returns the exit status.
fn run(argv: &[String], io: &mut Io<'_>) -> i32 {
    let Some((name, args)) = argv.split_first() else {
        print_usage(io.out);
        return 22;
    };
    match name.as_str() {
        "create" => commands::create(args, io),
        "get" => commands::get(args, io),
        "set" => commands::set(args, io),
        "coalesce" => commands::coalesce(args, io),
        "extents" => commands::extents(args, io),
        _ => {
            let _ = writeln!(io.err, "Invalid COMMAND {name}");
            print_usage(io.out);
            0
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let (mut out, mut err) = (stdout.lock(), stderr.lock());
    let status = run(
        &argv,
        &mut Io {
            out: &mut out,
            err: &mut err,
        },
    );
    let _ = out.flush();
    ExitCode::from(u8::try_from(status).unwrap_or(u8::MAX))
}
