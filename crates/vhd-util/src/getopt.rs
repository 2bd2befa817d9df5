//! A small POSIX-style option parser (`getopt` semantics: clustered short
//! flags, `-xVALUE` or `-x VALUE` arguments, `--` ends options, remaining
//! operands returned in order).

/// Parsed options: `(letter, value)` pairs in order, then operands.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Options in command-line order.
    pub opts: Vec<(char, Option<String>)>,
    /// Non-option arguments.
    pub operands: Vec<String>,
}

impl Parsed {
    /// Whether flag `c` was given.
    pub fn has(&self, c: char) -> bool {
        self.opts.iter().any(|(o, _)| *o == c)
    }
    /// The last value of option `c`.
    pub fn value(&self, c: char) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(o, _)| *o == c)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Parses `args` against `spec` (letters, `:` after one that takes a value).
/// Returns the offending letter on an unknown option or missing value.
pub fn getopt(args: &[String], spec: &str) -> Result<Parsed, char> {
    let takes = |c: char| -> Option<bool> {
        let i = spec.find(c)?;
        Some(spec[i + c.len_utf8()..].starts_with(':'))
    };
    let mut p = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            p.operands.extend(args[i + 1..].iter().cloned());
            break;
        }
        if a.len() < 2 || !a.starts_with('-') {
            p.operands.push(a.clone());
            i += 1;
            continue;
        }
        let chars: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            match takes(c) {
                None => return Err(c),
                Some(false) => {
                    p.opts.push((c, None));
                    j += 1;
                }
                Some(true) => {
                    let rest: String = chars[j + 1..].iter().collect();
                    if !rest.is_empty() {
                        p.opts.push((c, Some(rest)));
                    } else {
                        i += 1;
                        let v = args.get(i).ok_or(c)?;
                        p.opts.push((c, Some(v.clone())));
                    }
                    j = chars.len();
                }
            }
        }
        i += 1;
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_string()).collect()
    }

    #[test]
    fn parses_like_getopt() {
        let p = getopt(&s(&["-n", "a.vhd", "-vs", "-Sx", "f1"]), "n:vsS:").unwrap();
        assert_eq!(p.value('n'), Some("a.vhd"));
        assert!(p.has('v') && p.has('s'));
        assert_eq!(p.value('S'), Some("x"));
        assert_eq!(p.operands, vec!["f1"]);
        assert_eq!(getopt(&s(&["-q"]), "n:").unwrap_err(), 'q');
        assert_eq!(getopt(&s(&["-n"]), "n:").unwrap_err(), 'n');
    }
}
