//! tapback's command line: the C tapback's options that apply to a daemon which stays in the
//! foreground (`-d`, `-v`, `-n`, `-b`, each also in its long form) and `-s` for xenstored's
//! socket. [`OPTIONS`] is the one table the parser reads; the tests check the manual page,
//! `docs/man/tapback.8`, against what [`parse`] accepts.

use crate::backend::Features;

/// The usage text `-h` prints.
pub const USAGE: &str = "usage: tapback [-d] [-v] [-n NAME] [-b] [-s XENSTORE-SOCKET]\n";

/// Every option: its letter, its long name, and whether it takes a value.
pub const OPTIONS: [(char, &str, bool); 6] = [
    ('d', "debug", false),
    ('v', "verbose", false),
    ('n', "name", true),
    ('b', "nobarrier", false),
    ('s', "socket", true),
    ('h', "help", false),
];

/// What tapback runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The back-end type served: `/local/domain/<own domid>/backend/NAME`.
    pub name: String,
    /// Log debug messages too.
    pub verbose: bool,
    /// What is offered to front ends.
    pub features: Features,
    /// xenstored's socket (`None`: the usual places, then `/dev/xen/xenbus`).
    pub socket: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            name: "vbd3".to_owned(),
            verbose: false,
            features: Features::default(),
            socket: None,
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Serve XenStore with these options.
    Run(Options),
    /// Print [`USAGE`] and exit.
    Help,
}

/// Parses the arguments after the program name. The error is the message to print (it ends
/// with the usage).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let mut options = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let known = OPTIONS.iter().find(|(letter, long, _)| {
            arg.strip_prefix("--") == Some(*long) || arg == format!("-{letter}")
        });
        let Some(&(letter, _, takes_value)) = known else {
            return Err(format!("unknown argument '{arg}'\n{USAGE}"));
        };
        let value = if takes_value {
            Some(
                args.next()
                    .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))?,
            )
        } else {
            None
        };
        match (letter, value) {
            ('v', _) => options.verbose = true,
            ('b', _) => options.features.barrier = false,
            ('n', Some(name)) => options.name = name,
            ('s', Some(socket)) => options.socket = Some(socket),
            ('h', _) => return Ok(Command::Help),
            // -d: the C tool's "debug: stay in the foreground", which tapback always does.
            _ => {}
        }
    }
    Ok(Command::Run(options))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|arg| (*arg).to_owned()).collect()
    }

    /// Whether `flag` parses, alone or with a value.
    fn accepts(flag: &str) -> bool {
        parse(args(&[flag])).is_ok() || parse(args(&[flag, "value"])).is_ok()
    }

    #[test]
    fn parses_short_and_long_options() {
        assert_eq!(parse(args(&[])), Ok(Command::Run(Options::default())));
        let Ok(Command::Run(options)) = parse(args(&[
            "-d",
            "--verbose",
            "-n",
            "vbd",
            "--nobarrier",
            "-s",
            "/x",
        ])) else {
            panic!("not parsed");
        };
        assert_eq!(options.name, "vbd");
        assert!(options.verbose);
        assert!(!options.features.barrier);
        assert_eq!(options.socket.as_deref(), Some("/x"));
        assert_eq!(parse(args(&["-v", "--help"])), Ok(Command::Help));
    }

    #[test]
    fn rejects_what_it_does_not_know() {
        for bad in [&["-x"][..], &["--bogus"], &["-n"], &["-vb"], &["vbd3"]] {
            let error = parse(args(bad)).unwrap_err();
            assert!(error.ends_with(USAGE), "{bad:?}: {error}");
        }
        assert!(parse(args(&["--socket"]))
            .unwrap_err()
            .starts_with("--socket needs a value"));
    }

    #[test]
    fn manual_page_documents_exactly_the_accepted_options() {
        let page = include_str!("../../../docs/man/tapback.8");
        let documented = getopt::manual::documented_options(page)
            .remove("OPTIONS")
            .unwrap_or_default();
        for letter in ('a'..='z').chain('A'..='Z').chain('0'..='9') {
            let accepted = accepts(&format!("-{letter}"));
            assert_eq!(accepted, documented.contains(&letter), "-{letter}");
        }
        // Every long option the page's OPTIONS section names (`\-\-name`) is accepted, and
        // the table's long names are exactly those.
        let section = page
            .split_once(".SH OPTIONS\n")
            .and_then(|(_, rest)| rest.split_once("\n.SH "))
            .map_or("", |(section, _)| section);
        let long_on_page: std::collections::BTreeSet<String> = section
            .split("\\-\\-")
            .skip(1)
            .map(|rest| {
                rest.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect()
            })
            .collect();
        for long in &long_on_page {
            assert!(
                accepts(&format!("--{long}")),
                "--{long} documented but not accepted"
            );
        }
        let accepted: std::collections::BTreeSet<String> = OPTIONS
            .iter()
            .map(|(_, long, _)| (*long).to_owned())
            .collect();
        assert_eq!(long_on_page, accepted);
    }
}
