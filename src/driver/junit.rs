//! JUnit XML, the report CI systems read: one testsuite, one testcase per
//! subtest plus one for the main script. Pure: records in, text out.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub name: String,
    pub duration: Duration,
    /// The failure message, when the case failed.
    pub failure: Option<String>,
    /// The log written during the case (the failure's text, or system-out).
    pub log: String,
}

/// Escapes text for XML content and attribute values; characters XML 1.0
/// cannot carry at all (most control characters) become U+FFFD.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// `wall` is the suite's time: the cases overlap (subtests run inside the
/// whole script's case, and nest), so their sum would count time twice.
pub fn render(suite: &str, cases: &[Case], wall: Duration) -> String {
    let failures = cases.iter().filter(|c| c.failure.is_some()).count();
    let total = wall.as_secs_f64();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out +=
        &format!("<testsuites tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{total:.3}\">\n", cases.len());
    out += &format!(
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"0\" time=\"{total:.3}\">\n",
        escape(suite),
        cases.len()
    );
    for case in cases {
        out += &format!(
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">\n",
            escape(suite),
            escape(&case.name),
            case.duration.as_secs_f64()
        );
        match &case.failure {
            Some(message) => {
                out += &format!("      <failure message=\"{}\">{}</failure>\n", escape(message), escape(&case.log))
            }
            None => out += &format!("      <system-out>{}</system-out>\n", escape(&case.log)),
        }
        out += "    </testcase>\n";
    }
    out += "  </testsuite>\n</testsuites>\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        for (raw, escaped) in [
            ("plain", "plain"),
            ("a<b>&\"c\"'", "a&lt;b&gt;&amp;&quot;c&quot;&apos;"),
            ("tab\tnl\ncr\r", "tab\tnl\ncr\r"),
            ("bell\x07esc\x1b[0m", "bell\u{fffd}esc\u{fffd}[0m"),
            ("ünïcödé ✓", "ünïcödé ✓"),
        ] {
            assert_eq!(escape(raw), escaped);
        }
    }

    #[test]
    fn one_testcase_each_with_failures_counted_and_carried() {
        let cases = vec![
            Case { name: "boots".into(), duration: Duration::from_millis(1500), failure: None, log: "ok <1>\n".into() },
            Case {
                name: "fetch \"page\"".into(),
                duration: Duration::from_millis(250),
                failure: Some("command `curl` failed (exit code 7)".into()),
                log: "server: must succeed: curl & co\n".into(),
            },
        ];
        let xml = render("web<server>", &cases, Duration::from_millis(1600));
        assert!(xml.contains("<testsuites tests=\"2\" failures=\"1\" errors=\"0\" time=\"1.600\">"), "{xml}");
        assert!(xml.contains("<testsuite name=\"web&lt;server&gt;\" tests=\"2\" failures=\"1\" errors=\"0\" skipped=\"0\" time=\"1.600\">"), "{xml}");
        assert!(xml.contains("<testcase classname=\"web&lt;server&gt;\" name=\"boots\" time=\"1.500\">\n      <system-out>ok &lt;1&gt;\n</system-out>"));
        assert!(xml.contains("name=\"fetch &quot;page&quot;\" time=\"0.250\">\n      <failure message=\"command `curl` failed (exit code 7)\">server: must succeed: curl &amp; co\n</failure>"));
        assert_eq!(xml.matches("<testcase ").count(), 2);
        assert_eq!(xml.matches("</testcase>").count(), 2);
    }
}
