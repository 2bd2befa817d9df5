//! Checks a manual page against the options a command accepts, so the roff pages kept in
//! `docs/man/` and the getopt specs the tools parse with cannot drift apart (the tools keep
//! the C tools' hand-made usage texts, so the pages are written by hand too, and each tool
//! has a unit test calling [`check_page`]).
//!
//! Page conventions: every command is a subsection (`.SS NAME`), and each option it takes is
//! a tagged paragraph whose tag starts with the option (`.TP` then `.B \-R`, `.BI \-p " pid"`
//! or `.BR \-b " auto|..."`). Options outside any subsection belong to the section (`.SH
//! OPTIONS`).

use std::collections::{BTreeMap, BTreeSet};

/// The option letters a getopt spec accepts.
pub fn spec_letters(spec: &str) -> BTreeSet<char> {
    spec.chars().filter(|&c| c != ':').collect()
}

/// The short options documented in `page`, by subsection (or section) name; every
/// subsection has an entry, with options or without.
pub fn documented_options(page: &str) -> BTreeMap<String, BTreeSet<char>> {
    let mut found: BTreeMap<String, BTreeSet<char>> = BTreeMap::new();
    let mut heading = String::new();
    let mut tag_next = false;
    for line in page.lines() {
        if let Some(name) = line
            .strip_prefix(".SH ")
            .or_else(|| line.strip_prefix(".SS "))
        {
            heading = name.trim().trim_matches('"').replace("\\-", "-");
            tag_next = false;
            if line.starts_with(".SS ") {
                found.entry(heading.clone()).or_default();
            }
        } else if line == ".TP" {
            tag_next = true;
        } else if tag_next {
            tag_next = false;
            let text = line
                .split_once(' ')
                .filter(|(font, _)| matches!(*font, ".B" | ".BI" | ".BR"))
                .map_or(line, |(_, rest)| rest)
                .trim_start_matches("\\fB");
            if let Some(letter) = text
                .strip_prefix("\\-")
                .and_then(|rest| rest.chars().next())
            {
                if letter != '\\' {
                    found.entry(heading.clone()).or_default().insert(letter);
                }
            }
        }
    }
    found
}

/// Checks that `page` documents, for every `(command, spec)` of `specs`, exactly the letters
/// of `spec` except those in `everywhere` (documented once, e.g. `-h`) in its own
/// subsection, and no options for a command not in `specs`. The error lists every
/// difference.
pub fn check_page(page: &str, specs: &[(&str, &str)], everywhere: &[char]) -> Result<(), String> {
    let mut documented = documented_options(page);
    let mut problems = Vec::new();
    for (command, spec) in specs {
        let mut accepted = spec_letters(spec);
        accepted.retain(|letter| !everywhere.contains(letter));
        let Some(written) = documented.remove(*command) else {
            problems.push(format!("{command}: no subsection"));
            continue;
        };
        let show = |letters: BTreeSet<&char>| {
            letters
                .iter()
                .map(|l| format!("-{l}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let missing = show(accepted.difference(&written).collect());
        let extra = show(written.difference(&accepted).collect());
        if !missing.is_empty() {
            problems.push(format!("{command}: accepted but not documented: {missing}"));
        }
        if !extra.is_empty() {
            problems.push(format!("{command}: documented but not accepted: {extra}"));
        }
    }
    documented.retain(|heading, letters| heading != "OPTIONS" && !letters.is_empty());
    for heading in documented.keys() {
        problems.push(format!(
            "{heading}: options documented for no known command"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#".SH OPTIONS
.TP
.B \-h
help
.SH COMMANDS
.SS open
.TP
.BI \-p " pid"
the pid
.TP
.B \-R
read-only
.TP
.B FILE
not an option
.SS nbd\-listen
.TP
.BR \-P
plain
"#;

    #[test]
    fn finds_options_by_subsection() {
        let found = documented_options(PAGE);
        assert_eq!(found["OPTIONS"], BTreeSet::from(['h']));
        assert_eq!(found["open"], BTreeSet::from(['p', 'R']));
        assert_eq!(found["nbd-listen"], BTreeSet::from(['P']));
        assert_eq!(spec_letters("p:Rh"), BTreeSet::from(['p', 'R', 'h']));
    }

    #[test]
    fn check_names_every_difference() {
        let specs = [("open", "p:Rh"), ("nbd-listen", "P")];
        assert_eq!(check_page(PAGE, &specs, &['h']), Ok(()));
        let error = check_page(PAGE, &[("open", "p:m:h"), ("close", "")], &['h']).unwrap_err();
        assert_eq!(
            error,
            "open: accepted but not documented: -m\n\
             open: documented but not accepted: -R\n\
             close: no subsection\n\
             nbd-listen: options documented for no known command"
        );
    }
}
