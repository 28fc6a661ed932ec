//! What `vmlab test NETWORK SCRIPT` (src/commands/test.rs) is made of: the
//! script and how it ran, the verdict, the log and the JUnit report
//! (docs/testing.md). The verdict and the report's contents are pure
//! ([`verdict`], [`junit_cases`]); the rest starts threads and writes files.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::control::Driver;
use super::log::{printable, Log, Style, Subtest};
use super::Kind;
use super::{atomic, junit};
use crate::runtime::process::{describe_exit, ChildGuard};
use crate::runtime::signals;
use crate::runtime::{spawn_thread, Network};
use crate::sync::lock;
use crate::{EXIT_FAILED, EXIT_HARNESS, EXIT_OK};

/// How a test script is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// A `.py` file: python3 with the client preloaded and the machines bound.
    Python(PathBuf),
    /// Anything else, executed as is.
    Executable(PathBuf),
}

impl Script {
    /// Pure: the kind of script a path names.
    pub fn of(path: &Path) -> Script {
        match path.extension() {
            Some(ext) if ext == "py" => Script::Python(path.to_owned()),
            _ => Script::Executable(path.to_owned()),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        match self {
            Script::Python(p) | Script::Executable(p) => p,
        }
    }
}

/// How the test ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The script exited (or the prompt was left).
    Exited(ExitStatus),
    /// The global timeout fired while these driver requests ran.
    TimedOut { after: Duration, steps: Vec<String> },
    /// A termination signal stopped the test.
    Signal(libc::c_int),
}

/// The exit status and, for a test that did not pass, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub code: u8,
    pub failure: Option<String>,
}

/// Pure: the verdict from how the test ended, the kind of the last error a
/// client was given, the subtests that failed, and the script's last line
/// on standard error (where scripts and vmlab's clients say why they failed).
pub fn verdict(
    ending: &Ending,
    last_error: Option<Kind>,
    failed_subtests: &[&str],
    last_words: Option<&str>,
) -> Verdict {
    let fail = |code: u8, why: String| Verdict { code, failure: Some(why) };
    match ending {
        Ending::Exited(status) if status.success() && failed_subtests.is_empty() => {
            Verdict { code: EXIT_OK, failure: None }
        }
        Ending::Exited(status) if status.success() => fail(
            EXIT_FAILED,
            format!("the script exited with status 0, but subtests failed: {}", failed_subtests.join(", ")),
        ),
        Ending::Exited(status) => {
            // The script cannot tell a harness error from a failed check; the driver can.
            let code = if last_error == Some(Kind::Harness) { EXIT_HARNESS } else { EXIT_FAILED };
            let why = match last_words {
                Some(words) => format!("the script {}: {words}", describe_exit(*status)),
                None => format!("the script {}", describe_exit(*status)),
            };
            fail(code, why)
        }
        Ending::TimedOut { after, steps } => {
            let running = if steps.is_empty() {
                "no machine operation was running (the script itself was busy)".to_string()
            } else {
                format!("running: {}", steps.join("; "))
            };
            fail(EXIT_FAILED, format!("global timeout: the test ran out of its {} s; {running}", after.as_secs_f64()))
        }
        Ending::Signal(signal) => {
            fail(EXIT_HARNESS, format!("stopped by {}", signals::name(*signal).unwrap_or("a signal")))
        }
    }
}

/// Pure: the JUnit test cases: every subtest, then the main script (its log is the whole log).
pub fn junit_cases(
    subtests: &[Subtest],
    main: &str,
    duration: Duration,
    verdict: &Verdict,
    all: &str,
) -> Vec<junit::Case> {
    let mut cases: Vec<junit::Case> = subtests
        .iter()
        .map(|s| junit::Case {
            name: s.name.clone(),
            duration: s.duration,
            failure: s.failure.clone(),
            log: s.log.clone(),
        })
        .collect();
    cases.push(junit::Case {
        name: main.to_string(),
        duration,
        failure: verdict.failure.clone(),
        log: all.to_string(),
    });
    cases
}

/// Checks the script exists and can run, before anything starts; an
/// absolute path, since the script may change directory.
pub(crate) fn resolve_script(path: &Path) -> Result<Script> {
    let meta = std::fs::metadata(path).with_context(|| format!("test script {path:?}"))?;
    if !meta.is_file() {
        bail!("test script {path:?} is not a file");
    }
    let absolute = std::fs::canonicalize(path).with_context(|| format!("cannot resolve {path:?}"))?;
    let script = Script::of(&absolute);
    if matches!(script, Script::Executable(_)) && meta.permissions().mode() & 0o111 == 0 {
        bail!("test script {path:?} is not executable (chmod +x it, or name a Python script *.py)");
    }
    Ok(script)
}

pub(crate) enum Event {
    Signal(libc::c_int),
    Exited(ExitStatus),
}

/// Where the reports go.
pub(crate) struct Reports {
    pub out: PathBuf,
    pub junit: PathBuf,
    pub suite: String,
    pub main: String,
}

impl Reports {
    /// Closes what is open and writes the reports: copies of `logs` (files
    /// elsewhere), the JUnit report, and the log file to disk. Only then is
    /// the verdict said: a run whose reports are not safe ends with the
    /// error saying which and why (exit 2) instead.
    pub(crate) fn finish(&self, log: &Log, verdict: &Verdict, logs: &[PathBuf]) -> Result<()> {
        log.close_open_subtests(verdict.failure.as_deref());
        let took = log.elapsed();
        for from in logs {
            atomic::copy(from, &self.out.join(from.file_name().unwrap_or_default()))?;
        }
        let (subtests, all) = log.records();
        let xml = junit::render(&self.suite, &junit_cases(&subtests, &self.main, took, verdict, &all), took);
        if let Some(dir) = self.junit.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {dir:?}"))?;
        }
        atomic::write(&self.junit, xml.as_bytes())?;
        log.sync_file()?;
        match (&verdict.failure, verdict.code) {
            (None, _) => log.write(None, &format!("test passed ({:.2}s)", took.as_secs_f64()), Style::Good),
            (Some(why), EXIT_FAILED) => log.write(None, &format!("test failed: {why}"), Style::Bad),
            (Some(why), _) => log.write(None, &format!("harness error: {why}"), Style::Bad),
        }
        Ok(())
    }
}

/// Takes the output directory for this run until vmlab ends (an flock,
/// which goes with the process, however it ends), or says another run has it.
pub(crate) fn lock_out_dir(dir: &Path) -> Result<File> {
    let file = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    // SAFETY: plain system call on a descriptor the File owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            bail!("output directory {} is in use by another vmlab test", dir.display());
        }
        return Err(e).with_context(|| format!("cannot lock {}", dir.display()));
    }
    Ok(file)
}

/// Waits for the script to end, a signal or the global timeout.
pub(crate) fn wait_for_end(
    events: &mpsc::Receiver<Event>,
    limit: Option<Duration>,
    driver: &Driver,
    interactive: bool,
) -> Ending {
    let started = Instant::now();
    loop {
        let event = match limit {
            None => events.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            Some(limit) => events.recv_timeout(limit.saturating_sub(started.elapsed())),
        };
        match event {
            Ok(Event::Exited(status)) => return Ending::Exited(status),
            // At the prompt, Ctrl-C interrupts the statement (Python has it too), not the test.
            Ok(Event::Signal(libc::SIGINT)) if interactive => {}
            Ok(Event::Signal(signal)) => return Ending::Signal(signal),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Ending::TimedOut { after: limit.unwrap_or_default(), steps: driver.running_steps() }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("the signal thread never ends"),
        }
    }
}

/// `VMLAB_VLANS`: the network's vlan numbers, space-separated (the Python
/// client's `vlans` and `vlanN` globals).
pub(crate) fn vlans_env(vlans: &[u8]) -> String {
    vlans.iter().map(u8::to_string).collect::<Vec<_>>().join(" ")
}

/// The script's PATH: vmlab's own directory first, so shell scripts reach
/// the client subcommands of this very vmlab.
pub(crate) fn script_path() -> Result<std::ffi::OsString> {
    let exe = std::env::current_exe().context("cannot find the vmlab executable")?;
    let mut dirs: Vec<PathBuf> = exe.parent().map(Path::to_path_buf).into_iter().collect();
    dirs.extend(std::env::var_os("PATH").iter().flat_map(std::env::split_paths));
    std::env::join_paths(dirs).context("a PATH entry contains ':'")
}

/// Serial console lines go to the log, dimmed on a terminal.
pub(crate) fn log_console(name: &str, lines: mpsc::Receiver<String>, log: Arc<Log>) -> Result<()> {
    let name = name.to_string();
    spawn_thread(format!("log-{name}"), move || {
        for line in lines {
            log.write(Some(&name), &format!("# {}", printable(&line)), Style::Serial);
        }
    })
}

/// The script's standard output and error, line by line into the log.
pub(crate) struct Said {
    last_stderr_line: Arc<Mutex<Option<String>>>,
    done: mpsc::Receiver<()>,
}

impl Said {
    /// The last non-blank line the script wrote on standard error, once both
    /// streams are closed (or a moment has passed: should a process the
    /// reaper could not kill still hold them open).
    pub(crate) fn last_words(self) -> Option<String> {
        for _ in 0..2 {
            let _ = self.done.recv_timeout(Duration::from_secs(2));
        }
        lock(&self.last_stderr_line).clone()
    }
}

pub(crate) fn capture_output(child: &ChildGuard, log: Arc<Log>) -> Result<Said> {
    let last = Arc::new(Mutex::new(None));
    let (done, finished) = mpsc::channel();
    /// A stream, whether it is standard error, and its reader thread's name.
    type Stream<'a> = (Option<Box<dyn Read + Send>>, bool, &'a str);
    let streams: [Stream; 2] = [
        (child.take_stdout().map(|s| Box::new(s) as Box<dyn Read + Send>), false, "script-stdout"),
        (child.take_stderr().map(|s| Box::new(s) as Box<dyn Read + Send>), true, "script-stderr"),
    ];
    for (stream, is_stderr, thread) in streams {
        let Some(stream) = stream else { continue };
        let (log, last, done) = (log.clone(), last.clone(), done.clone());
        spawn_thread(thread.into(), move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
                log.info(None, &line);
                if is_stderr && !line.trim().is_empty() {
                    *lock(&last) = Some(line.trim().to_string());
                }
            }
            let _ = done.send(());
        })?;
    }
    Ok(Said { last_stderr_line: last, done: finished })
}

/// Each machine's serial console log and QEMU messages, those there are.
pub(crate) fn machine_logs(network: &Network) -> Vec<PathBuf> {
    network.machines().iter().flat_map(|m| [m.serial_log(), m.qemu_log()]).filter(|log| log.exists()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn exited(code: i32) -> Ending {
        Ending::Exited(ExitStatus::from_raw(code << 8))
    }

    #[test]
    fn scripts_are_python_by_extension_only() {
        assert_eq!(Script::of(Path::new("/t/test.py")), Script::Python("/t/test.py".into()));
        for other in ["/t/test.sh", "/t/test", "/t/py", "/t/test.py.sh"] {
            assert_eq!(Script::of(Path::new(other)), Script::Executable(other.into()));
        }
    }

    #[test]
    fn verdicts() {
        let fails = |code: u8, why: &str| Verdict { code, failure: Some(why.to_string()) };
        let timed_out = |steps: &[&str]| Ending::TimedOut {
            after: Duration::from_secs(20),
            steps: steps.iter().map(|s| s.to_string()).collect(),
        };
        let said = Some("error: machine server: command `false` failed (exit code 1)");
        /// How the script ended, the kind of its last error, the failed subtests, what it said last.
        type Case<'a> = (Ending, Option<Kind>, &'a [&'a str], Option<&'a str>, Verdict);
        let cases: Vec<Case> = vec![
            (exited(0), None, &[], None, Verdict { code: 0, failure: None }),
            // A failure the script caught and handled does not fail the test.
            (exited(0), Some(Kind::Failed), &[], said, Verdict { code: 0, failure: None }),
            (exited(0), None, &["a", "b"], None, fails(1, "the script exited with status 0, but subtests failed: a, b")),
            (exited(1), Some(Kind::Failed), &[], said, fails(1, "the script exited with status 1: error: machine server: command `false` failed (exit code 1)")),
            (exited(3), None, &[], None, fails(1, "the script exited with status 3")),
            (exited(1), Some(Kind::Machine), &[], None, fails(1, "the script exited with status 1")),
            (exited(1), Some(Kind::Harness), &[], None, fails(2, "the script exited with status 1")),
            (Ending::Exited(ExitStatus::from_raw(libc::SIGKILL)), None, &[], None, fails(1, "the script was killed by signal 9 (SIGKILL)")),
            (timed_out(&["server: wait_for_file path=/x"]), None, &[], None, fails(1, "global timeout: the test ran out of its 20 s; running: server: wait_for_file path=/x")),
            (timed_out(&[]), None, &[], None, fails(1, "global timeout: the test ran out of its 20 s; no machine operation was running (the script itself was busy)")),
            (Ending::Signal(libc::SIGTERM), None, &[], None, fails(2, "stopped by SIGTERM")),
        ];
        for (ending, last, failed, words, want) in cases {
            assert_eq!(verdict(&ending, last, failed, words), want, "{ending:?} {last:?} {failed:?}");
        }
    }

    #[test]
    fn an_output_directory_is_one_runs_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let held = lock_out_dir(out).unwrap();
        let in_use = format!("output directory {} is in use by another vmlab test", out.display());
        assert_eq!(format!("{:#}", lock_out_dir(out).unwrap_err()), in_use);
        drop(held);
        drop(lock_out_dir(out).unwrap());
        let missing = out.join("missing");
        let no_dir = format!("cannot open {}: No such file or directory (os error 2)", missing.display());
        assert_eq!(format!("{:#}", lock_out_dir(&missing).unwrap_err()), no_dir);
    }

    #[test]
    fn junit_has_each_subtest_then_the_script() {
        let sub = |name: &str, failure: Option<&str>| Subtest {
            name: name.into(),
            duration: Duration::from_secs(1),
            failure: failure.map(str::to_string),
            log: format!("{name} log\n"),
        };
        let verdict = Verdict { code: 1, failure: Some("boom".into()) };
        let cases = junit_cases(
            &[sub("a", None), sub("b", Some("boom"))],
            "test.py",
            Duration::from_secs(5),
            &verdict,
            "all\n",
        );
        let summary: Vec<(&str, Option<&str>, &str)> =
            cases.iter().map(|c| (c.name.as_str(), c.failure.as_deref(), c.log.as_str())).collect();
        assert_eq!(
            summary,
            [("a", None, "a log\n"), ("b", Some("boom"), "b log\n"), ("test.py", Some("boom"), "all\n")]
        );
        assert_eq!(cases[2].duration, Duration::from_secs(5));
    }
}
