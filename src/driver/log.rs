//! The test log: machine-prefixed lines on the terminal (colour only on a
//! TTY, `NO_COLOR` respected), the same lines plain in a log file, and the
//! subtest records the JUnit report is made from.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::DriverError;
use crate::sync::lock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Plain,
    /// A command's or wait's result that went well.
    Good,
    /// A failure.
    Bad,
    /// A subtest heading.
    Heading,
    /// A line from a machine's serial console.
    Serial,
}

/// One line as shown: `[elapsed] indent machine: message`, with ANSI colour when asked.
pub fn format_line(
    elapsed: Duration,
    depth: usize,
    machine: Option<&str>,
    msg: &str,
    style: Style,
    color: bool,
) -> String {
    let indent = "  ".repeat(depth);
    let time = format!("[{:7.2}s]", elapsed.as_secs_f64());
    if !color {
        return match machine {
            Some(m) => format!("{time} {indent}{m}: {msg}"),
            None => format!("{time} {indent}{msg}"),
        };
    }
    let (on, off) = match style {
        Style::Plain => ("", ""),
        Style::Good => ("\x1b[32m", "\x1b[0m"),
        Style::Bad => ("\x1b[1;31m", "\x1b[0m"),
        Style::Heading => ("\x1b[1m", "\x1b[0m"),
        Style::Serial => ("\x1b[2m", "\x1b[0m"),
    };
    let prefix = machine.map(|m| format!("\x1b[36m{m}\x1b[0m: ")).unwrap_or_default();
    format!("\x1b[2m{time}\x1b[0m {indent}{prefix}{on}{msg}{off}")
}

/// A console line made safe to show: terminal escape sequences (a guest
/// shell's prompt asks for the cursor position) are dropped, other control
/// characters become U+FFFD.
pub fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters final-byte; other escapes: ESC and one character.
                if chars.next_if_eq(&'[').is_some() {
                    while chars.next().is_some_and(|c| !('@'..='~').contains(&c)) {}
                } else {
                    chars.next();
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Whether to colour a stream: a terminal, and `NO_COLOR` unset or empty.
pub fn want_color(is_tty: bool, no_color: Option<&str>) -> bool {
    is_tty && no_color.map_or(true, str::is_empty)
}

/// A finished subtest, for the reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Subtest {
    pub name: String,
    pub duration: Duration,
    pub failure: Option<String>,
    /// The plain log lines written while it was open.
    pub log: String,
}

struct Open {
    name: String,
    started: Instant,
    log: String,
}

/// The log file, written as the test goes: the first error writing it ends
/// the writing, and is kept to be said.
pub struct LogFile {
    path: PathBuf,
    file: File,
    error: Option<String>,
}

impl LogFile {
    pub fn create(path: &Path) -> anyhow::Result<LogFile> {
        let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(LogFile { path: path.to_owned(), file, error: None })
    }

    /// Appends a line; the error, the first time one comes.
    fn line(&mut self, line: &str) -> Option<String> {
        if self.error.is_some() {
            return None;
        }
        let e = writeln!(self.file, "{line}").err()?;
        let error = format!("cannot write {}: {e}", self.path.display());
        self.error = Some(error.clone());
        Some(error)
    }

    /// All that was written is on disk (a full disk may say so only now), or why not.
    fn sync(&self) -> anyhow::Result<()> {
        if let Some(error) = &self.error {
            bail!("{error}");
        }
        self.file.sync_all().with_context(|| format!("cannot write {}", self.path.display()))
    }
}

struct Inner {
    term: Box<dyn Write + Send>,
    file: Option<LogFile>,
    open: Vec<Open>,
    done: Vec<Subtest>,
    /// Everything, plain: the main script's JUnit log.
    all: String,
}

pub struct Log {
    inner: Mutex<Inner>,
    color: bool,
    start: Instant,
    /// Whether serial console lines reach the terminal (NixOS's
    /// `serial_stdout_on/off`); the log file and the reports keep them.
    serial_shown: AtomicBool,
}

impl Log {
    pub fn new(term: Box<dyn Write + Send>, color: bool, file: Option<LogFile>) -> Self {
        Log {
            inner: Mutex::new(Inner { term, file, open: Vec::new(), done: Vec::new(), all: String::new() }),
            color,
            start: Instant::now(),
            serial_shown: AtomicBool::new(true),
        }
    }

    /// Logs to standard error, coloured when it is a terminal.
    pub fn stderr(file: Option<LogFile>) -> Self {
        let color = want_color(std::io::stderr().is_terminal(), std::env::var("NO_COLOR").ok().as_deref());
        Self::new(Box::new(std::io::stderr()), color, file)
    }

    pub fn write(&self, machine: Option<&str>, msg: &str, style: Style) {
        let elapsed = self.start.elapsed();
        let mut inner = lock(&self.inner);
        let depth = inner.open.len();
        let shown = format_line(elapsed, depth, machine, msg, style, self.color);
        let plain = format_line(elapsed, depth, machine, msg, style, false);
        // A terminal or file that went away must not stop the test.
        if style != Style::Serial || self.serial_shown() {
            let _ = writeln!(inner.term, "{shown}");
        }
        let failed = inner.file.as_mut().and_then(|f| f.line(&plain));
        for open in inner.open.iter_mut() {
            open.log += &plain;
            open.log.push('\n');
        }
        inner.all += &plain;
        inner.all.push('\n');
        drop(inner);
        if let Some(error) = failed {
            // Once: the file takes no more lines.
            self.write(None, &format!("warning: {error}; the log file ends here"), Style::Bad);
        }
    }

    /// What the log file has is on disk, or why it is not (said as it happened).
    pub fn sync_file(&self) -> anyhow::Result<()> {
        let inner = lock(&self.inner);
        inner.file.as_ref().map_or(Ok(()), LogFile::sync)
    }

    pub fn show_serial(&self, on: bool) {
        self.serial_shown.store(on, Ordering::Relaxed);
    }

    pub fn serial_shown(&self) -> bool {
        self.serial_shown.load(Ordering::Relaxed)
    }

    pub fn info(&self, machine: Option<&str>, msg: &str) {
        self.write(machine, msg, Style::Plain);
    }

    pub fn subtest_begin(&self, name: &str) {
        self.write(None, &format!("subtest: {name}"), Style::Heading);
        let mut inner = lock(&self.inner);
        inner.open.push(Open { name: name.to_string(), started: Instant::now(), log: String::new() });
    }

    /// Closes the innermost subtest, failed when `failure` is given.
    pub fn subtest_end(&self, failure: Option<String>) -> Result<Subtest, DriverError> {
        let open = {
            let mut inner = lock(&self.inner);
            inner.open.pop().ok_or_else(|| DriverError::request("subtest_end: no subtest is open"))?
        };
        let duration = open.started.elapsed();
        let secs = duration.as_secs_f64();
        match &failure {
            None => self.write(None, &format!("subtest {} passed ({secs:.2}s)", open.name), Style::Good),
            Some(f) => self.write(None, &format!("subtest {} failed ({secs:.2}s): {f}", open.name), Style::Bad),
        }
        let done = Subtest { name: open.name, duration, failure, log: open.log };
        lock(&self.inner).done.push(done.clone());
        Ok(done)
    }

    /// Closes subtests left open (a script that ended inside one): failed
    /// with `failure` when the test failed, else passed.
    pub fn close_open_subtests(&self, failure: Option<&str>) {
        while self.subtest_end(failure.map(str::to_string)).is_ok() {}
    }

    /// Finished subtests, in the order they ended, and the whole plain log.
    pub fn records(&self) -> (Vec<Subtest>, String) {
        let inner = lock(&self.inner);
        (inner.done.clone(), inner.all.clone())
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn lines_are_prefixed_indented_and_coloured_only_when_asked() {
        let t = Duration::from_millis(1500);
        assert_eq!(format_line(t, 0, Some("server"), "hi", Style::Good, false), "[   1.50s] server: hi");
        assert_eq!(format_line(t, 2, None, "hi", Style::Bad, false), "[   1.50s]     hi");
        let c = format_line(t, 1, Some("server"), "hi", Style::Bad, true);
        assert!(c.contains("\x1b[36mserver\x1b[0m: \x1b[1;31mhi\x1b[0m") && c.contains("   "), "{c:?}");
        assert!(format_line(t, 0, Some("s"), "boot", Style::Serial, true).contains("\x1b[2mboot"));
    }

    #[test]
    fn console_lines_lose_escape_sequences_and_control_characters() {
        for (raw, shown) in [
            ("server:/# \x1b[6n", "server:/# "),
            ("\x1b[1;32mgreen\x1b[0m text", "green text"),
            ("bell\x07 tab\t \x1bc reset", "bell\u{fffd} tab\t  reset"),
            ("unfinished \x1b[12", "unfinished "),
            ("ünïcödé", "ünïcödé"),
        ] {
            assert_eq!(printable(raw), shown, "{raw:?}");
        }
    }

    #[test]
    fn colour_needs_a_tty_and_no_no_color() {
        let table = [(true, None, true), (true, Some(""), true), (true, Some("1"), false), (false, None, false)];
        for (tty, nc, want) in table {
            assert_eq!(want_color(tty, nc), want, "{tty} {nc:?}");
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn nested_subtests_collect_their_own_lines() {
        let sink = Sink::default();
        let log = Log::new(Box::new(sink.clone()), false, None);
        log.info(None, "before");
        log.subtest_begin("outer");
        log.info(Some("server"), "in outer");
        log.subtest_begin("inner");
        log.info(Some("client"), "in inner");
        let inner = log.subtest_end(Some("boom".into())).unwrap();
        let outer = log.subtest_end(None).unwrap();
        assert!(log.subtest_end(None).is_err());
        assert_eq!(inner.failure.as_deref(), Some("boom"));
        assert!(inner.log.contains("client: in inner") && !inner.log.contains("in outer"));
        assert!(outer.log.contains("server: in outer") && outer.log.contains("client: in inner"));
        assert!(outer.log.contains("subtest inner failed"));
        let (done, all) = log.records();
        assert_eq!(done.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["inner", "outer"]);
        assert!(all.contains("before"));
        let term = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(term.contains("]     client: in inner"), "{term}");
    }

    #[test]
    fn serial_lines_leave_the_terminal_but_stay_in_the_log_while_switched_off() {
        let sink = Sink::default();
        let dir = tempfile::tempdir().unwrap();
        let log = Log::new(Box::new(sink.clone()), false, Some(LogFile::create(&dir.path().join("log")).unwrap()));
        log.write(Some("s"), "# one", Style::Serial);
        log.show_serial(false);
        log.write(Some("s"), "# two", Style::Serial);
        log.info(Some("s"), "said while off");
        log.show_serial(true);
        log.write(Some("s"), "# three", Style::Serial);
        let term = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(
            term.contains("# one")
                && !term.contains("# two")
                && term.contains("said while off")
                && term.contains("# three"),
            "{term}"
        );
        let file = std::fs::read_to_string(dir.path().join("log")).unwrap();
        assert!(file.contains("# one") && file.contains("# two") && file.contains("# three"), "{file}");
        assert!(log.records().1.contains("# two"));
        log.sync_file().unwrap();
    }

    /// A full disk, as /dev/full has it.
    #[test]
    fn a_log_file_that_cannot_be_written_is_said_once_and_then_again_at_the_end() {
        let sink = Sink::default();
        let log = Log::new(Box::new(sink.clone()), false, Some(LogFile::create(Path::new("/dev/full")).unwrap()));
        log.info(Some("s"), "one");
        log.info(Some("s"), "two");
        let error = "cannot write /dev/full: No space left on device (os error 28)";
        let warning = format!("warning: {error}; the log file ends here");
        let term = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = term.lines().map(|l| l.split_once("] ").unwrap().1).collect();
        assert_eq!(lines, ["s: one", &warning, "s: two"]);
        assert!(log.records().1.contains(&warning));
        assert_eq!(format!("{:#}", log.sync_file().unwrap_err()), error);
    }
}
