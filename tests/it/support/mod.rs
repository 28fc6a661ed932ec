//! Shared fixtures for the integration tests.
#![allow(dead_code)]

mod direct;
pub(crate) mod nix;
mod runs;
mod up;

pub(crate) use direct::{boot, Backdoor, Qemu};
pub(crate) use runs::*;
pub(crate) use up::*;

/// Only a hang reaches this: a healthy run takes seconds on a loaded machine.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(300);

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

/// The vmlab binary under test. It gets SIGTERM when the test's thread
/// ends (a killed or panicking test run), so a `vmlab test` or `vmlab up`
/// never outlives the tests and keeps its machines running.
pub fn vmlab() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmlab"));
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    cmd
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// Runs a command, returning its output; panics with stderr if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Processes whose command line or environment mentions `needle` (a session
/// directory, say), as pid and command line: how tests find their own QEMU
/// and vde_switch processes without touching those of concurrent runs.
pub fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let mentions = |bytes: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        // Unreadable: the process ended meanwhile.
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if mentions(&cmdline) || mentions(&environ) {
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// The default guest with the webserver example's rc script and pages, built
/// once for every test that boots it.
pub fn webserver_guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("webserver-guest");
        let example = repo_root().join("examples/webserver");
        let www = format!("{}:/var/www", example.join("www").display());
        let out = run(vmlab()
            .arg("guest")
            .arg("--out")
            .arg(&dir)
            .arg("--rc")
            .arg(example.join("rc.sh"))
            .args(["--add", &www]));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        dir
    })
}

/// A child's output, line by line, as it comes: what a test waits for.
pub struct Lines {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    /// Only a hang reaches this: a healthy run takes seconds on a loaded machine.
    const PATIENCE: Duration = Duration::from_secs(300);

    pub fn of(stream: impl Read + Send + 'static) -> Lines {
        Lines::merged(vec![(Box::new(stream), "")])
    }

    /// Several streams into one sequence, each line with its stream's prefix.
    pub fn merged(streams: Vec<(Box<dyn Read + Send>, &'static str)>) -> Lines {
        let (tx, rx) = mpsc::channel();
        for (stream, prefix) in streams {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(format!("{prefix}{line}")).is_err() {
                        return;
                    }
                }
            });
        }
        Lines { rx, seen: Vec::new() }
    }

    /// Reads until a line contains `needle`; returns that line.
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Self::PATIENCE;
        loop {
            if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            match self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => self.seen.push(line),
                Err(e) => panic!("no line with {needle:?} ({e}); output:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Everything, once the streams have ended.
    pub fn rest(mut self) -> String {
        self.seen.extend(self.rx.iter());
        self.seen.join("\n")
    }
}

/// A test that cannot run here says so and returns: visibly (straight to
/// standard error, past the test harness's capture of a passing test's
/// output), and never under CI=true, where a skip would hide a missing
/// install step: there it fails.
pub fn skip(why: &str) {
    assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "cannot skip under CI=true: {why}");
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {} ({why})", std::thread::current().name().unwrap_or("a test"));
}
