//! Child processes that cannot outlive vmlab.
//!
//! Every child runs in its own process group with `PR_SET_PDEATHSIG=SIGKILL`
//! and is owned by a [`ChildGuard`] that kills the group and reaps it on drop.
//! The death signal covers SIGKILL of vmlab, which no destructor sees; it
//! reaches the direct child only, which is why run scripts `exec` QEMU, and
//! why a test script runs under a reaper ([`super::reaper`]).

use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::sync::{lock, wait, wait_timeout};
use anyhow::{Context, Result};

/// How long a child gets to exit after SIGTERM before its group gets SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// A running child process and its process group, killed and reaped on drop.
///
/// Safe to share between threads. The leader is reaped only by [`ChildGuard::stop`]
/// (an exit is observed without reaping), so its pid, which is also the group
/// id, cannot be reused while the guard may still signal the group.
pub struct ChildGuard {
    what: String,
    pid: libc::pid_t,
    /// The child leads its own process group, which is signalled as a whole;
    /// otherwise it shares vmlab's and only it is signalled.
    own_group: bool,
    exit: Arc<ExitCell>,
    /// `None` once reaped.
    child: Mutex<Option<Child>>,
}

#[derive(Default)]
struct ExitCell {
    status: Mutex<Option<ExitStatus>>,
    changed: Condvar,
}

impl ExitCell {
    fn set(&self, status: ExitStatus) {
        lock(&self.status).get_or_insert(status);
        self.changed.notify_all();
    }
}

impl ChildGuard {
    /// Spawns `cmd` in a new process group that dies with vmlab.
    /// `what` names the child in messages (e.g. `vde_switch for vlan 1`).
    pub fn spawn(cmd: Command, what: impl Into<String>) -> Result<ChildGuard> {
        Self::spawn_in(cmd, what.into(), true)
    }

    /// Spawns `cmd` in vmlab's own process group, so it can read the terminal
    /// and gets the terminal's Ctrl-C (an interactive prompt); it still dies
    /// with vmlab, but what it starts in the background is not tracked.
    pub fn spawn_in_foreground(cmd: Command, what: impl Into<String>) -> Result<ChildGuard> {
        Self::spawn_in(cmd, what.into(), false)
    }

    fn spawn_in(mut cmd: Command, what: String, own_group: bool) -> Result<ChildGuard> {
        if own_group {
            cmd.process_group(0);
        }
        die_with_parent(&mut cmd);
        let program = cmd.get_program().to_owned();
        let child = spawn_on_spawner_thread(cmd)
            .with_context(|| format!("cannot start {what} ({})", program.to_string_lossy()))?;
        let guard = ChildGuard {
            what,
            pid: child.id() as libc::pid_t,
            own_group,
            exit: Arc::default(),
            child: Mutex::new(Some(child)),
        };
        let (pid, exit) = (guard.pid, guard.exit.clone());
        super::spawn_thread(format!("wait-{pid}"), move || {
            // ECHILD means stop() reaped it first and recorded the status itself.
            if let Ok(status) = wait_without_reaping(pid) {
                exit.set(status);
            }
        })?;
        Ok(guard)
    }

    /// Runs `cmd` to its end under a guard (so it dies with vmlab), as
    /// `Command::output` does without one: no standard input, standard
    /// output and error collected.
    pub fn output(mut cmd: Command, what: impl Into<String>) -> Result<Output> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let guard = ChildGuard::spawn(cmd, what)?;
        let mut stderr = guard.take_stderr().expect("stderr is piped");
        let (sender, received) = mpsc::channel();
        super::spawn_thread(format!("stderr-{}", guard.pid), move || {
            let mut bytes = Vec::new();
            let _ = stderr.read_to_end(&mut bytes);
            let _ = sender.send(bytes);
        })?;
        let mut stdout = Vec::new();
        let read = guard.take_stdout().expect("stdout is piped").read_to_end(&mut stdout);
        read.with_context(|| format!("cannot read the output of {}", guard.what))?;
        let stderr = received.recv().unwrap_or_default();
        let status = guard.wait_exit(Duration::MAX).expect("waited without a limit");
        Ok(Output { status, stdout, stderr })
    }

    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Takes the child's standard output, when it was `Stdio::piped()`.
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        lock(&self.child).as_mut()?.stdout.take()
    }

    /// Takes the child's standard error, when it was `Stdio::piped()`.
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        lock(&self.child).as_mut()?.stderr.take()
    }

    /// Takes the child's standard input, when it was `Stdio::piped()`.
    pub fn take_stdin(&self) -> Option<ChildStdin> {
        lock(&self.child).as_mut()?.stdin.take()
    }

    /// The exit status, once the process has exited; never blocks.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *lock(&self.exit.status)
    }

    /// Waits until the process exits or `timeout` passes (`Duration::MAX`: no limit).
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = deadline_after(timeout);
        let mut status = lock(&self.exit.status);
        while status.is_none() {
            let Some(left) = deadline.map(|d| d.saturating_duration_since(Instant::now())) else {
                status = wait(&self.exit.changed, status);
                continue;
            };
            if left.is_zero() {
                break;
            }
            status = wait_timeout(&self.exit.changed, status, left);
        }
        *status
    }

    /// Calls `probe` until it yields a value, the process exits or the deadline
    /// passes (`None`: no deadline). Between calls it waits for the process's
    /// exit, 10 ms at first, backing off to 200 ms, so an exit ends the wait at once.
    pub fn poll_until<T>(&self, deadline: Option<Instant>, mut probe: impl FnMut() -> Option<T>) -> Poll<T> {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(200));
        loop {
            if let Some(status) = self.exit_status() {
                return Poll::Exited(status);
            }
            if let Some(value) = probe() {
                return Poll::Ready(value);
            }
            let pause = backoff.pause();
            let left = deadline.map_or(pause, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return Poll::TimedOut;
            }
            self.wait_exit(pause.min(left));
        }
    }

    /// Stops the whole process group: SIGTERM, up to `grace` to exit, then
    /// SIGKILL for whatever is left; reaps the leader. Idempotent.
    pub fn stop(&self, grace: Duration) -> ExitStatus {
        let mut child = lock(&self.child);
        if let Some(c) = child.as_mut() {
            if self.exit_status().is_none() {
                self.signal(libc::SIGTERM);
                self.wait_exit(grace);
            }
            // Also for a leader that already exited: its group may outlive it.
            self.signal(libc::SIGKILL);
            match c.wait() {
                Ok(status) => self.exit.set(status),
                Err(e) => eprintln!("warning: cannot reap {} (pid {}): {e}", self.what, self.pid),
            }
            *child = None;
        }
        drop(child);
        // Some after a successful reap; a failed one leaves only the signal we sent.
        self.exit_status().unwrap_or_else(|| ExitStatus::from_raw(libc::SIGKILL))
    }
}

/// Makes the process `cmd` starts get SIGKILL when the thread that spawns
/// it ends (for vmlab's children, the spawner thread, which lives as long as
/// vmlab), and start with no signal blocked.
pub(super) fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls, allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then no signal would come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            // The mask survives exec, and vmlab blocks the termination
            // signals (signals.rs): the child must not inherit that.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            let r = libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            Ok(())
        });
    }
}

/// How [`ChildGuard::poll_until`] ended.
#[derive(Debug)]
pub enum Poll<T> {
    Ready(T),
    Exited(ExitStatus),
    TimedOut,
}

/// Pure: "exited with status 1", "was killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => match super::signals::name(signal) {
            Some(name) => format!("was killed by signal {signal} ({name})"),
            None => format!("was killed by signal {signal}"),
        },
        (None, None) => format!("ended ({status})"),
    }
}

/// `timeout` from now; `None` (no deadline) when that is too far to represent.
pub fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(STOP_GRACE);
    }
}

impl ChildGuard {
    /// Signals the child's group, or the child alone when it shares vmlab's
    /// group; called before the child is reaped, so the id is still its own.
    fn signal(&self, signal: libc::c_int) {
        let target = if self.own_group { -self.pid } else { self.pid };
        // SAFETY: plain system call; ESRCH (already gone) is fine.
        unsafe { libc::kill(target, signal) };
    }
}

/// Blocks until `pid` exits, leaving it a zombie for `stop` to reap.
fn wait_without_reaping(pid: libc::pid_t) -> io::Result<ExitStatus> {
    loop {
        // SAFETY: siginfo_t is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: waitid succeeded for a child, so the SIGCHLD fields are set.
        let status = unsafe { info.si_status() };
        return Ok(ExitStatus::from_raw(wait_status(info.si_code, status)));
    }
}

/// The `wait(2)` status word that `waitid`'s `si_code`/`si_status` describe.
fn wait_status(code: libc::c_int, status: libc::c_int) -> libc::c_int {
    match code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => status | 0x80,
        _ => status,
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns on one thread that lives as long as vmlab: PR_SET_PDEATHSIG fires
/// when the *thread* that forked the child ends, so spawning from a
/// short-lived thread (a parallel start, a driver's request handler) would
/// kill the child with it.
fn spawn_on_spawner_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("vmlab-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the process spawner thread");
        tx
    });
    let (reply, answer) = mpsc::channel();
    spawner.send((cmd, reply)).expect("the spawner thread never exits");
    answer.recv().expect("the spawner thread always answers")
}

/// The back-off of every poll loop: pauses start at `first` and double up
/// to `most`. The caller chooses both by what a try costs: a connect to a
/// socket is cheap, a command in a guest is not.
pub struct Backoff {
    next: Duration,
    most: Duration,
}

impl Backoff {
    pub fn new(first: Duration, most: Duration) -> Backoff {
        Backoff { next: first, most }
    }

    /// The pause to take now.
    pub fn pause(&mut self) -> Duration {
        let now = self.next;
        self.next = (now * 2).min(self.most);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[test]
    fn wait_status_words() {
        let cases = [
            (libc::CLD_EXITED, 0, Some(0), None),
            (libc::CLD_EXITED, 3, Some(3), None),
            (libc::CLD_KILLED, libc::SIGKILL, None, Some(libc::SIGKILL)),
            (libc::CLD_DUMPED, libc::SIGSEGV, None, Some(libc::SIGSEGV)),
        ];
        for (code, status, exit, signal) in cases {
            let s = ExitStatus::from_raw(wait_status(code, status));
            assert_eq!((s.code(), s.signal()), (exit, signal), "code {code} status {status}");
        }
        assert!(ExitStatus::from_raw(wait_status(libc::CLD_DUMPED, libc::SIGSEGV)).core_dumped());
    }

    #[test]
    fn exit_descriptions() {
        let cases = [
            (wait_status(libc::CLD_EXITED, 0), "exited with status 0"),
            (wait_status(libc::CLD_EXITED, 1), "exited with status 1"),
            (wait_status(libc::CLD_KILLED, libc::SIGKILL), "was killed by signal 9 (SIGKILL)"),
            (wait_status(libc::CLD_DUMPED, libc::SIGSEGV), "was killed by signal 11 (SIGSEGV)"),
            (wait_status(libc::CLD_KILLED, libc::SIGUSR1), "was killed by signal 10"),
        ];
        for (raw, text) in cases {
            assert_eq!(describe_exit(ExitStatus::from_raw(raw)), text);
        }
    }

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]).stdin(Stdio::null());
        cmd
    }

    #[test]
    fn exit_status_is_observed_without_reaping() {
        let guard = ChildGuard::spawn(sh("exit 7"), "test child").unwrap();
        assert_eq!(guard.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()), Some(7));
        // Still a zombie: the pid (= group id) stays reserved until stop().
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", guard.pid())).unwrap();
        assert!(stat.contains(") Z "), "{stat}");
        assert_eq!(guard.stop(STOP_GRACE).code(), Some(7));
        assert!(!std::path::Path::new(&format!("/proc/{}", guard.pid())).exists());
    }

    #[test]
    fn stop_kills_the_whole_group() {
        // The grandchild is not exec'd into: only the group kill reaches it.
        let mut cmd = sh("sleep 1000 & echo $!; wait");
        cmd.stdout(Stdio::piped());
        let guard = ChildGuard::spawn(cmd, "test group").unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(guard.take_stdout().unwrap()), &mut line).unwrap();
        let grandchild: u32 = line.trim().parse().unwrap();
        assert!(guard.wait_exit(Duration::from_millis(1)).is_none());
        let status = guard.stop(STOP_GRACE);
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        // SIGKILL takes effect when the grandchild next runs: on a loaded
        // machine it can still be runnable for a moment.
        let stat = || std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
        let dead = |stat: &str| stat.is_empty() || stat.contains(") Z ");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !dead(&stat()) && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let last = stat();
        assert!(dead(&last), "grandchild survived: {last}");
    }

    #[test]
    fn a_foreground_child_shares_our_group_and_is_stopped_alone() {
        let guard = ChildGuard::spawn_in_foreground(sh("exec sleep 1000"), "test prompt").unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", guard.pid())).unwrap();
        // Fields after the command name: state, ppid, pgrp.
        let pgrp: i32 = stat.rsplit_once(") ").unwrap().1.split(' ').nth(2).unwrap().parse().unwrap();
        assert_eq!(pgrp, unsafe { libc::getpgrp() });
        assert_eq!(guard.stop(STOP_GRACE).signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn children_spawned_from_short_lived_threads_survive_them() {
        let guard = thread::spawn(|| ChildGuard::spawn(sh("exec sleep 1000"), "test sleeper").unwrap()).join().unwrap();
        assert!(guard.wait_exit(Duration::from_millis(200)).is_none(), "killed with its spawning thread");
        assert_eq!(guard.stop(STOP_GRACE).signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn polling_ends_on_exit_or_readiness_or_deadline() {
        let mut cmd = sh("read x; exit 4");
        cmd.stdin(Stdio::piped());
        let guard = ChildGuard::spawn(cmd, "test poller").unwrap();
        let mut calls = 0;
        let ready = guard.poll_until(deadline_after(Duration::from_secs(60)), || {
            calls += 1;
            (calls == 3).then_some("ready")
        });
        assert!(matches!(ready, Poll::Ready("ready")), "{ready:?}");
        let timed_out = guard.poll_until(Some(Instant::now()), || None::<()>);
        assert!(matches!(timed_out, Poll::TimedOut), "{timed_out:?}");
        drop(guard.take_stdin());
        let exited = guard.poll_until(None, || None::<()>);
        assert!(matches!(exited, Poll::Exited(s) if s.code() == Some(4)), "{exited:?}");
    }

    #[test]
    fn a_missing_program_is_an_error_naming_it() {
        let err = ChildGuard::spawn(Command::new("/nonexistent/qemu"), "machine x").err().unwrap();
        assert!(format!("{err:#}").starts_with("cannot start machine x (/nonexistent/qemu): "), "{err:#}");
    }
}
