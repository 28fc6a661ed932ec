//! POSIX shell quoting: the only place that makes shell words.

/// One shell word for `s`: single-quoted unless it is made only of characters
/// no shell treats specially.
pub fn quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        for (raw, quoted) in [
            ("plain/path-1.2_x", "plain/path-1.2_x"),
            ("", "''"),
            ("a b", "'a b'"),
            ("it's", r"'it'\''s'"),
            ("$HOME `x` \"y\" \\ *", r#"'$HOME `x` "y" \ *'"#),
        ] {
            assert_eq!(quote(raw), quoted);
        }
    }
}
