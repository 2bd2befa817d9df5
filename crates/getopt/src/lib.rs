//! A small getopt(3) work-alike, so the tools that replace C ones (`tap-ctl`, `cbt-util`)
//! accept exactly what the C tools accepted.
//!
//! Supported: clustered flags (`-RD`), attached values (`-p123`), detached values (`-p 123`,
//! even when the value starts with `-`), `--` ending the options, and GNU-style permutation
//! (non-option arguments anywhere are skipped). The spec string uses getopt's syntax: a letter
//! followed by `:` takes a value.

pub mod manual;

use std::fmt;

/// Why an argument could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetoptError {
    /// The letter is not in the spec.
    Unknown(char),
    /// The letter needs a value and none followed.
    MissingValue(char),
}

impl fmt::Display for GetoptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(c) => write!(f, "invalid option -- '{c}'"),
            Self::MissingValue(c) => write!(f, "option requires an argument -- '{c}'"),
        }
    }
}

/// One parsed option: its letter and value (for letters that take one).
pub type Opt = (char, Option<String>);

/// Iterates over the options of `args` (the arguments after the command name).
#[derive(Debug)]
pub struct Getopt<'a> {
    args: &'a [String],
    spec: &'a str,
    /// Index of the argument being parsed.
    index: usize,
    /// Byte offset inside a clustered argument (0 = start a new argument).
    offset: usize,
    done: bool,
}

impl<'a> Getopt<'a> {
    /// Parses `args` against `spec` (for example `"p:m:ft:h"`).
    pub fn new(args: &'a [String], spec: &'a str) -> Self {
        Self {
            args,
            spec,
            index: 0,
            offset: 0,
            done: false,
        }
    }

    /// Whether `letter` is in the spec, and whether it takes a value.
    fn lookup(&self, letter: char) -> Option<bool> {
        if letter == ':' {
            return None;
        }
        let at = self.spec.find(letter)?;
        Some(self.spec[at + letter.len_utf8()..].starts_with(':'))
    }
}

impl Iterator for Getopt<'_> {
    type Item = Result<Opt, GetoptError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.offset == 0 {
            // Find the next option argument, skipping (permuting) the others.
            loop {
                let arg = self.args.get(self.index)?;
                if arg == "--" {
                    self.done = true;
                    return None;
                }
                if arg.len() > 1 && arg.starts_with('-') {
                    self.offset = 1;
                    break;
                }
                self.index += 1;
            }
        }
        let arg = &self.args[self.index];
        let letter = arg[self.offset..].chars().next()?;
        self.offset += letter.len_utf8();
        let rest = &arg[self.offset..];
        let mut next_arg = self.index + usize::from(rest.is_empty());
        let result = match self.lookup(letter) {
            None => Err(GetoptError::Unknown(letter)),
            Some(false) => Ok((letter, None)),
            Some(true) if !rest.is_empty() => {
                next_arg = self.index + 1;
                Ok((letter, Some(rest.to_owned())))
            }
            Some(true) => match self.args.get(self.index + 1) {
                Some(value) => {
                    next_arg = self.index + 2;
                    Ok((letter, Some(value.clone())))
                }
                None => Err(GetoptError::MissingValue(letter)),
            },
        };
        if next_arg != self.index {
            self.index = next_arg;
            self.offset = 0;
        }
        if result.is_err() {
            self.done = true;
        }
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], spec: &str) -> Vec<Result<Opt, GetoptError>> {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        Getopt::new(&args, spec).collect()
    }

    fn opt(c: char, v: Option<&str>) -> Result<Opt, GetoptError> {
        Ok((c, v.map(str::to_owned)))
    }

    #[test]
    fn attached_and_detached_values() {
        assert_eq!(
            parse(&["-p123", "-m", "4"], "p:m:"),
            [opt('p', Some("123")), opt('m', Some("4"))]
        );
    }

    #[test]
    fn clusters_and_values_inside_clusters() {
        assert_eq!(
            parse(&["-RD", "-Rp7", "-Da", "vhd:/x"], "a:RDp:"),
            [
                opt('R', None),
                opt('D', None),
                opt('R', None),
                opt('p', Some("7")),
                opt('D', None),
                opt('a', Some("vhd:/x")),
            ]
        );
    }

    #[test]
    fn value_may_start_with_a_dash() {
        assert_eq!(parse(&["-m", "-1"], "m:"), [opt('m', Some("-1"))]);
    }

    #[test]
    fn non_options_are_skipped_and_double_dash_ends() {
        assert_eq!(
            parse(&["junk", "-f", "-", "more", "-t", "9", "--", "-f"], "ft:"),
            [opt('f', None), opt('t', Some("9"))]
        );
    }

    #[test]
    fn errors_stop_parsing() {
        assert_eq!(parse(&["-x", "-f"], "f"), [Err(GetoptError::Unknown('x'))]);
        assert_eq!(parse(&["-p"], "p:"), [Err(GetoptError::MissingValue('p'))]);
        assert_eq!(parse(&["--long"], "lo"), [Err(GetoptError::Unknown('-'))]);
        assert_eq!(parse(&["-:"], "p:"), [Err(GetoptError::Unknown(':'))]);
    }

    #[test]
    fn error_messages_match_getopt() {
        assert_eq!(
            GetoptError::Unknown('x').to_string(),
            "invalid option -- 'x'"
        );
        assert_eq!(
            GetoptError::MissingValue('p').to_string(),
            "option requires an argument -- 'p'"
        );
    }
}
