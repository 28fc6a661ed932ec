//! POSIX shell words: the only place that quotes anything for a shell.

use std::borrow::Cow;
use std::fmt;

/// Quotes `s` as one shell word; words made only of safe characters stay bare
/// so the emitted scripts read like hand-written ones.
pub fn quote(s: &str) -> Cow<'_, str> {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("'{}'", s.replace('\'', r"'\''")))
    }
}

/// One shell word made of literal text and variable expansions, e.g.
/// `path=` + `$state` + `/shell.sock`, rendered `path="$state"/shell.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var(String),
}

impl Word {
    pub fn lit(s: impl Into<String>) -> Word {
        Word(vec![Part::Lit(s.into())])
    }

    /// An expansion of the shell variable `name` (a valid identifier, chosen by vmlab).
    pub fn var(name: impl Into<String>) -> Word {
        Word(vec![Part::Var(name.into())])
    }

    /// This word followed by literal text.
    pub fn then(mut self, s: impl Into<String>) -> Word {
        self.0.push(Part::Lit(s.into()));
        self
    }

    /// This word followed by a variable expansion.
    pub fn then_var(mut self, name: impl Into<String>) -> Word {
        self.0.push(Part::Var(name.into()));
        self
    }

    /// The word as the shell expands it, each variable's value given by
    /// `value`: for running QEMU with the options of a run script but
    /// without the script (tests/it/guest.rs).
    pub fn expand(&self, value: impl Fn(&str) -> String) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Part::Lit(s) => s.clone(),
                Part::Var(name) => value(name),
            })
            .collect()
    }
}

impl From<&str> for Word {
    fn from(s: &str) -> Word {
        Word::lit(s)
    }
}

impl From<String> for Word {
    fn from(s: String) -> Word {
        Word::lit(s)
    }
}

impl fmt::Display for Word {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.iter().all(|p| matches!(p, Part::Lit(s) if s.is_empty())) {
            return f.write_str("''");
        }
        for part in &self.0 {
            match part {
                Part::Lit(s) if s.is_empty() => {}
                Part::Lit(s) => f.write_str(&quote(s))?,
                Part::Var(name) => write!(f, "\"${name}\"")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn quoting_table() {
        for (input, want) in [
            ("plain", "plain"),
            ("/nix/store/abc-x/bin/run", "/nix/store/abc-x/bin/run"),
            ("a,b=c:d@e%f+g", "a,b=c:d@e%f+g"),
            ("", "''"),
            ("two words", "'two words'"),
            ("it's", r"'it'\''s'"),
            ("$HOME", "'$HOME'"),
            ("`x`", "'`x`'"),
            ("a\nb", "'a\nb'"),
            ("*", "'*'"),
            ("~", "'~'"),
            ("\\", "'\\'"),
            ("\"", "'\"'"),
        ] {
            assert_eq!(quote(input), want, "quoting {input:?}");
        }
    }

    #[test]
    fn words_render_expansions_in_double_quotes() {
        assert_eq!(Word::lit("x y").to_string(), "'x y'");
        assert_eq!(Word::var("state").to_string(), "\"$state\"");
        let w = Word::lit("path=").then_var("state").then("/shell sock");
        assert_eq!(w.to_string(), "path=\"$state\"'/shell sock'");
        assert_eq!(Word::lit("").to_string(), "''");
        assert_eq!(w.expand(|v| format!("<{v}>")), "path=<state>/shell sock");
    }

    /// The real check: sh reads back exactly the string that was quoted.
    #[test]
    fn sh_reads_back_every_quoted_string() {
        let nasty =
            ["", "a b", "it's", "'", "''", "$(true)", "`id`", "a\nb", "\\n", "*", "-n", "\"$x\"", "é ü", "a\tb"];
        let script: String = nasty.iter().map(|s| format!("printf '%s\\0' {}\n", quote(s))).collect();
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        let got: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().split_terminator('\0').collect();
        assert_eq!(got, nasty);
        let word = Word::lit("pre fix=").then_var("v").then("'s");
        let out = Command::new("sh").arg("-c").arg(format!("v='a b'; printf '%s' {word}")).output().unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "pre fix=a b's");
    }
}
