//! Nothing a test script starts outlives it.
//!
//! A process group does not hold what leaves it (`setsid`), and a parent-death
//! signal reaches only the direct child, so the script runs under a reaper:
//! vmlab itself, re-executed as the hidden subcommand `vmlab reap -- SCRIPT…`.
//! The reaper is a child subreaper, so whatever the script leaves behind (a
//! child it does not wait for, a double fork, a new session) becomes the
//! reaper's child when its parent dies. When the script exits, the reaper
//! kills every descendant left; when vmlab stops the test (SIGTERM) or dies
//! (the reaper's parent-death signal is SIGTERM too, which it handles), it
//! gives them SIGTERM and the script [`STOP_GRACE`] to exit, then kills them.
//! It reaps them all, then exits as the script did.

use std::ffi::OsString;
use std::ops::Deref;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::process::{die_with_parent, ChildGuard, STOP_GRACE};
use super::signals::BlockedSignals;

/// A test script running under its reaper; stopped (with all it started) on drop.
pub struct Reaped {
    guard: ChildGuard,
}

impl Reaped {
    /// Runs `script` under a reaper in a new process group, with standard
    /// input from /dev/null and standard output and error piped (taken with
    /// [`ChildGuard::take_stdout`] and [`ChildGuard::take_stderr`]).
    pub fn spawn(script: &Command, what: impl Into<String>) -> Result<Reaped> {
        let (mut cmd, pipe) = under_reaper(script)?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let guard = ChildGuard::spawn(cmd, what)?;
        Self::started(guard, pipe)
    }

    /// Runs `script` under a reaper in vmlab's process group, on its terminal
    /// (the Python prompt: see [`ChildGuard::spawn_in_foreground`]).
    pub fn spawn_in_foreground(script: &Command, what: impl Into<String>) -> Result<Reaped> {
        let (cmd, pipe) = under_reaper(script)?;
        let guard = ChildGuard::spawn_in_foreground(cmd, what)?;
        Self::started(guard, pipe)
    }

    /// Waits for the reaper's word that the script started: a script that
    /// cannot start (a bad interpreter line) is vmlab's error to report, not
    /// a failed test.
    fn started(guard: ChildGuard, (mut read, write): StartPipe) -> Result<Reaped> {
        // The reaper has its own copy now: the read end sees the end of the reaper's.
        drop(write);
        let mut word = String::new();
        std::io::Read::read_to_string(&mut read, &mut word).context("reading the reaper's start pipe")?;
        match word.trim() {
            STARTED => Ok(Reaped { guard }),
            "" => anyhow::bail!("vmlab reap ended before it started the script"),
            why => anyhow::bail!("{why}"),
        }
    }

    /// Stops the script and all it started; the script's exit status.
    /// Idempotent.
    pub fn stop(&self) -> ExitStatus {
        // The reaper gives the script STOP_GRACE after SIGTERM, then kills and
        // reaps the rest: it gets as long again for that before it is killed.
        self.guard.stop(2 * STOP_GRACE)
    }
}

impl Deref for Reaped {
    type Target = ChildGuard;

    fn deref(&self) -> &ChildGuard {
        &self.guard
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The file descriptor on which the reaper says whether the script started.
const START_FD: libc::c_int = 3;
/// What it says when it did; anything else says why not.
const STARTED: &str = "started";
/// Tells the reaper that START_FD is its start pipe (`vmlab reap` run by
/// hand has none, and its descriptor 3 may be anything).
const START_VAR: &str = "VMLAB_REAP_START_FD";

/// The reaper's start pipe: read end, write end.
type StartPipe = (std::fs::File, std::os::fd::OwnedFd);

/// `script` under `vmlab reap`: the same program, arguments, environment and
/// working directory; and the reaper's start pipe, whose write end it gets
/// as [`START_FD`].
fn under_reaper(script: &Command) -> Result<(Command, StartPipe)> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors, both close-on-exec.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot make the reaper's start pipe");
    }
    // SAFETY: both are fresh descriptors owned here alone.
    let (read, write) = unsafe { (std::fs::File::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) };
    // The running vmlab, even when its file was replaced since it started.
    let mut cmd = Command::new("/proc/self/exe");
    let raw = write.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; it leaves START_FD open across exec.
    unsafe {
        cmd.pre_exec(move || match libc::dup2(raw, START_FD) {
            -1 => Err(std::io::Error::last_os_error()),
            _ => Ok(()),
        });
    }
    cmd.arg0("vmlab").arg("reap").arg("--").arg(script.get_program()).args(script.get_args());
    for (key, value) in script.get_envs() {
        match value {
            Some(value) => cmd.env(key, value),
            None => cmd.env_remove(key),
        };
    }
    if let Some(dir) = script.get_current_dir() {
        cmd.current_dir(dir);
    }
    cmd.env(START_VAR, START_FD.to_string());
    Ok((cmd, (read, write)))
}

/// `vmlab reap -- PROGRAM ARGS…`: the reaper's side (see the module's comment).
pub fn reap_command(command: &[OsString]) -> Result<ExitCode> {
    let (program, args) = command.split_first().expect("clap requires a program");
    // First, while this is the only thread: a signal that comes before the
    // loop below waits for it is kept, not acted on.
    let signals = BlockedSignals::block(&[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT])?;
    // SAFETY: plain system calls on this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reap: cannot become a child subreaper");
    }
    // Until now vmlab's death was SIGKILL (ChildGuard): nothing was started
    // yet. From now on it is a signal to act on.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reap: cannot set the parent-death signal");
    }
    let mut start = (std::env::var(START_VAR).as_deref() == Ok("3")).then(|| {
        // SAFETY: vmlab gave this process START_FD as its start pipe: owned
        // here, and close-on-exec so the script never holds it.
        unsafe {
            libc::fcntl(START_FD, libc::F_SETFD, libc::FD_CLOEXEC);
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(START_FD)
        }
    });
    let mut say = |word: &str| {
        if let Some(pipe) = start.as_mut() {
            let _ = std::io::Write::write_all(pipe, word.as_bytes());
        }
    };
    let mut cmd = Command::new(program);
    cmd.args(args).env_remove(START_VAR);
    // Should the reaper itself be killed, the script goes with it.
    die_with_parent(&mut cmd);
    let script = match cmd.spawn() {
        Ok(script) => script,
        Err(e) => {
            // ENOENT for a file that exists: the kernel could not find its interpreter.
            let hint = if e.kind() == std::io::ErrorKind::NotFound && std::path::Path::new(program).exists() {
                " (the interpreter its #! line names)"
            } else {
                ""
            };
            let why = format!("cannot start {}: {e}{hint}", program.to_string_lossy());
            say(&why);
            anyhow::bail!("{why}");
        }
    };
    say(STARTED);
    drop(start);
    let mut reaper = Reaper { script: script.id() as libc::pid_t, status: None };
    // SIGINT, SIGHUP and SIGQUIT come from the terminal to the whole
    // foreground group, the prompt included: the prompt answers them.
    loop {
        match signals.wait() {
            libc::SIGCHLD => {
                reaper.reap();
                if reaper.status.is_some() {
                    break;
                }
            }
            libc::SIGTERM => {
                reaper.signal_descendants(libc::SIGTERM);
                let deadline = Instant::now() + STOP_GRACE;
                while reaper.status.is_none() && signals.wait_until(deadline).is_some() {
                    reaper.reap();
                }
                break;
            }
            _ => {}
        }
    }
    reaper.kill_all();
    Ok(exit_as(reaper.status.unwrap_or(ExitStatus::from_raw(libc::SIGKILL))))
}

struct Reaper {
    script: libc::pid_t,
    /// The script's, once reaped.
    status: Option<ExitStatus>,
}

impl Reaper {
    /// Reaps every child that has ended; false when no child is left.
    fn reap(&mut self) -> bool {
        loop {
            let mut raw = 0;
            // SAFETY: plain system call.
            match unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) } {
                0 => return true,
                // ECHILD: none left (WNOHANG cannot be interrupted).
                -1 => return false,
                pid if pid == self.script => self.status = Some(ExitStatus::from_raw(raw)),
                _ => {}
            }
        }
    }

    fn signal_descendants(&self, signal: libc::c_int) {
        let me = std::process::id() as libc::pid_t;
        for pid in descendants(&process_table(), me) {
            // SAFETY: plain system call; ESRCH (gone meanwhile) is fine.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Kills and reaps every descendant, again until none is left: one that
    /// forks while it is killed leaves an orphan, which becomes our child.
    fn kill_all(&mut self) {
        loop {
            self.signal_descendants(libc::SIGKILL);
            if !self.reap() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Ends this process as `status` says the script ended: with its exit code,
/// or killed by its signal (without a core dump of the reaper).
fn exit_as(status: ExitStatus) -> ExitCode {
    if let Some(signal) = status.signal() {
        let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: plain system calls on this process and plain data.
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            libc::signal(signal, libc::SIG_DFL);
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(signal);
        }
        // A signal whose default is not to end the process: as a shell says it.
        return ExitCode::from(128u8.wrapping_add(signal as u8));
    }
    ExitCode::from(status.code().unwrap_or(1) as u8)
}

/// Every process as (pid, parent pid), from /proc; those that end while it
/// is read are left out.
fn process_table() -> Vec<(libc::pid_t, libc::pid_t)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            Some((pid, parent_in_stat(&stat)?))
        })
        .collect()
}

/// Pure: the parent pid in a /proc/PID/stat line; the command name before it
/// is in parentheses and may hold any character, parentheses too.
fn parent_in_stat(stat: &str) -> Option<libc::pid_t> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Pure: `root`'s descendants in a table of (pid, parent pid), parents first.
fn descendants(table: &[(libc::pid_t, libc::pid_t)], root: libc::pid_t) -> Vec<libc::pid_t> {
    let mut found = vec![root];
    let mut next = 0;
    while let Some(&parent) = found.get(next) {
        for &(pid, _) in table.iter().filter(|&&(_, ppid)| ppid == parent) {
            if !found.contains(&pid) {
                found.push(pid);
            }
        }
        next += 1;
    }
    found.split_off(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_in_stat_lines() {
        let cases = [
            ("42 (sleep) S 7 42 42 0 -1", Some(7)),
            ("42 (a) b) S 9 42 42 0 -1", Some(9)),
            ("42 (tab\tand space ) R 1 1", Some(1)),
            ("42 (cut", None),
            ("", None),
        ];
        for (stat, parent) in cases {
            assert_eq!(parent_in_stat(stat), parent, "{stat:?}");
        }
    }

    #[test]
    fn descendants_are_found_through_every_generation() {
        let table = [(1, 0), (10, 1), (11, 10), (12, 10), (13, 12), (20, 1), (21, 20), (30, 30)];
        let cases: [(libc::pid_t, &[libc::pid_t]); 5] = [
            (10, &[11, 12, 13]),
            (12, &[13]),
            (13, &[]),
            (1, &[10, 20, 11, 12, 21, 13]),
            // A table read while processes come and go may be odd; the walk still ends.
            (30, &[]),
        ];
        for (root, want) in cases {
            assert_eq!(descendants(&table, root), want, "{root}");
        }
    }

    #[test]
    fn the_script_runs_under_vmlab_reap_as_it_would_alone() {
        let mut script = Command::new("python3");
        script.args(["-c", "pass"]).env("KEPT", "1").env_remove("GONE").current_dir("/tmp");
        let (cmd, _pipe) = under_reaper(&script).unwrap();
        assert_eq!(cmd.get_program(), "/proc/self/exe");
        assert_eq!(cmd.get_args().collect::<Vec<_>>(), ["reap", "--", "python3", "-c", "pass"]);
        let mut envs: Vec<_> = cmd.get_envs().collect();
        envs.sort();
        assert_eq!(
            envs,
            [("GONE".as_ref(), None), ("KEPT".as_ref(), Some("1".as_ref())), (START_VAR.as_ref(), Some("3".as_ref()))]
        );
        assert_eq!(cmd.get_current_dir(), Some("/tmp".as_ref()));
    }
}
