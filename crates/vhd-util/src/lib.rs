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

/// Each command's getopt spec: the options it accepts, which vhd-util(8) documents (a unit
/// test compares the two).
pub const OPTION_SPECS: [(&str, &str); 15] = [
    ("create", "n:s:S:rh"),
    ("snapshot", "n:p:l:S:meh"),
    ("query", "n:vspfdSmaubh"),
    ("read", "n:pt:b:Bm:i:e:aj:d:c:r:R:xCh"),
    ("set", "n:f:v:h"),
    ("repair", "n:bh"),
    ("resize", "n:s:j:fh"),
    ("fill", "n:bf:t:Bh"),
    ("coalesce", "n:o:a:x:sph"),
    ("modify", "n:p:s:mzh"),
    ("scan", "m:fcl:pavMh"),
    ("check", "n:iItpbBsh"),
    ("revert", "n:j:h"),
    ("key", "Cscpn:k:H:N:h"),
    ("copy", "n:N:k:Eh"),
];

/// The getopt spec of `command` (one of [`OPTION_SPECS`]).
fn option_spec(command: &str) -> &'static str {
    OPTION_SPECS
        .iter()
        .find(|(name, _)| *name == command)
        .map_or("", |(_, spec)| spec)
}

fn usage() {
    println!("usage: vhd-util COMMAND [OPTIONS]");
    println!("COMMAND := {{ {} }}", COMMANDS.join(" | "));
}

/// What the binaries read from their environment at start and hand down to
/// the commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings {
    /// Crash injection for tests (`VHD_UTIL_CRASH_AFTER_WRITES=N`): the
    /// journaled commands (`set`, `repair`, `resize`, `coalesce`, `modify`)
    /// fail every mutating I/O call after the first N, then abort as if the
    /// process had been killed there. `None`: no injection. Only builds with
    /// the test-only cargo feature `crash-injection` honour it.
    pub crash_after_writes: Option<i64>,
}

impl Settings {
    /// The environment variable of [`Settings::crash_after_writes`].
    pub const CRASH_AFTER_WRITES_VAR: &'static str = "VHD_UTIL_CRASH_AFTER_WRITES";

    /// The settings given by `lookup` (variable name to value; the process
    /// environment in the binaries). A value that is not a number is
    /// ignored.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            crash_after_writes: lookup(Self::CRASH_AFTER_WRITES_VAR)
                .and_then(|v| v.trim().parse().ok()),
        }
    }

    /// What a binary of this build takes from `lookup`: [`Settings::from_lookup`] with the
    /// `crash-injection` feature, nothing otherwise (the shipped binaries read no variable).
    pub fn for_this_build(lookup: impl Fn(&str) -> Option<String>) -> Self {
        if cfg!(feature = "crash-injection") {
            Self::from_lookup(lookup)
        } else {
            Self::default()
        }
    }
}

/// Runs `vhd-util` with `args` (without the program name); `--debug`
/// anywhere is accepted and ignored, as SM passes it.
pub fn vhd_util(settings: &Settings, mut args: Vec<String>) -> i32 {
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
        "set" => commands::set(settings, rest),
        "repair" => commands::repair(settings, rest),
        "resize" => commands::resize(settings, rest),
        "fill" => commands::fill(rest),
        "coalesce" => commands::coalesce(settings, rest),
        "modify" => commands::modify(settings, rest),
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

#[cfg(test)]
mod tests {
    use super::{td, Settings, OPTION_SPECS};

    #[test]
    fn settings_come_from_the_lookup_given() {
        let none = Settings::from_lookup(|_| None);
        assert_eq!(none, Settings::default());
        let set = Settings::from_lookup(|name| {
            (name == Settings::CRASH_AFTER_WRITES_VAR).then(|| "7".to_string())
        });
        assert_eq!(set.crash_after_writes, Some(7));
        let junk = Settings::from_lookup(|_| Some("seven".to_string()));
        assert_eq!(junk.crash_after_writes, None);
    }

    #[test]
    fn manual_pages_document_exactly_the_accepted_options() {
        let pages = [
            (
                "vhd-util",
                include_str!("../../../docs/man/vhd-util.8"),
                &OPTION_SPECS[..],
            ),
            (
                "td-util",
                include_str!("../../../docs/man/td-util.8"),
                &td::OPTION_SPECS[..],
            ),
        ];
        for (tool, page, specs) in pages {
            if let Err(problems) = ::getopt::manual::check_page(page, specs, &['h']) {
                panic!("docs/man/{tool}.8 and the code disagree:\n{problems}");
            }
        }
    }
}
