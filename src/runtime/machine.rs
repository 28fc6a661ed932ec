//! One machine: its run script as a guarded process (the script `exec`s
//! QEMU), its serial console, and its backdoor connection.

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::console::Console;
use super::process::{deadline_after, describe_exit, ChildGuard, Poll, STOP_GRACE};
use super::session::Layout;
use super::{log_tail, spawn_thread};

/// What the guest prints on its virtio console (hvc0) once a root shell reads
/// from it: the NixOS test-instrumentation contract, kept by vmlab's guest.
pub const BACKDOOR_BANNER: &str = "Spawning backdoor root shell...";

/// How often a wait for the backdoor banner looks at its deadline.
const READ_SLICE: Duration = Duration::from_millis(200);

/// Longest line kept while looking for the banner; a guest printing megabytes
/// without a newline must not grow memory.
const MAX_LINE: usize = 4096;

pub struct Machine {
    name: String,
    script: PathBuf,
    env: Vec<(String, OsString)>,
    layout: Layout,
    console: Console,
    /// The latest QEMU process, running or exited; `None` before the first start.
    current: Mutex<Option<Arc<Incarnation>>>,
    /// Set, under `current`'s lock, when the network stops: a request still
    /// running then (a wait that sees its machine die) must not start it again.
    retired: AtomicBool,
}

/// One QEMU process of a machine.
struct Incarnation {
    guard: ChildGuard,
    started: Instant,
    /// Where this process's messages start in the (appended) QEMU log.
    qemu_log_offset: u64,
    backdoor: Mutex<Backdoor>,
    backdoor_changed: Condvar,
}

#[derive(Default)]
struct Backdoor {
    /// Some thread is connecting or reading the banner; others wait for it.
    connecting: bool,
    /// Connected; after the banner once `ready_after` is set.
    stream: Option<UnixStream>,
    /// Time from start to the banner.
    ready_after: Option<Duration>,
}

/// How a machine's QEMU ended: its status and the tail of its standard error.
#[derive(Debug, Clone)]
pub struct Exit {
    pub status: ExitStatus,
    /// "; its standard error ended with:\n  …", ready to end a message.
    pub stderr_tail: String,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", describe_exit(self.status), self.stderr_tail)
    }
}

impl Machine {
    /// `env` is the run script's environment on top of vmlab's (docs/design.md).
    pub(crate) fn new(name: String, script: PathBuf, env: Vec<(String, OsString)>, layout: Layout) -> Machine {
        Machine {
            name,
            script,
            env,
            layout,
            console: Console::default(),
            current: Mutex::new(None),
            retired: AtomicBool::new(false),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `VMLAB_STATE_DIR`: the sockets QEMU creates live here.
    pub fn state_dir(&self) -> PathBuf {
        self.layout.state_dir(&self.name)
    }

    pub fn shell_socket(&self) -> PathBuf {
        self.layout.shell_socket(&self.name)
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.layout.qmp_socket(&self.name)
    }

    /// The serial console log; appended to across restarts.
    pub fn serial_log(&self) -> PathBuf {
        self.layout.serial_log(&self.name)
    }

    /// QEMU's standard error; appended to across restarts.
    pub fn qemu_log(&self) -> PathBuf {
        self.layout.qemu_log(&self.name)
    }

    /// The serial console; subscribe before [`Machine::start`] to see every line.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// Starts QEMU through the machine's run script and returns at once; the
    /// guest boots in the background. A machine whose QEMU exited may be
    /// started again.
    pub fn start(&self) -> Result<()> {
        self.start_with(&[])
    }

    /// Starts QEMU waiting for a saved state to be loaded over QMP
    /// (`-incoming defer`, through `QEMU_OPTS`, after the caller's own)
    /// instead of booting the guest.
    pub fn start_incoming(&self) -> Result<()> {
        let mut opts = std::env::var_os("QEMU_OPTS").unwrap_or_default();
        opts.push(" -incoming defer");
        self.start_with(&[("QEMU_OPTS".to_owned(), opts)])
    }

    /// [`Machine::start`] with more environment for the run script.
    fn start_with(&self, extra_env: &[(String, OsString)]) -> Result<()> {
        let mut current = self.current.lock().unwrap();
        if self.retired.load(Ordering::SeqCst) {
            bail!("machine {:?} cannot start: its network has stopped", self.name);
        }
        if let Some(previous) = current.take() {
            if previous.guard.exit_status().is_none() {
                *current = Some(previous);
                bail!("machine {:?} is already running", self.name);
            }
            previous.guard.stop(STOP_GRACE);
        }
        let serial_log = append(&self.serial_log())?;
        let qemu_log = append(&self.qemu_log())?;
        let qemu_log_offset =
            qemu_log.metadata().with_context(|| format!("cannot stat {}", self.qemu_log().display()))?.len();
        let mut cmd = Command::new(&self.script);
        cmd.envs(self.env.iter().chain(extra_env).map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(qemu_log);
        let guard = ChildGuard::spawn(cmd, format!("machine {:?}", self.name))?;
        let serial = guard.take_stdout().expect("stdout is piped");
        let console = self.console.clone();
        spawn_thread(format!("console-{}", self.name), move || console.pump(serial, serial_log))?;
        *current = Some(Arc::new(Incarnation {
            guard,
            started: Instant::now(),
            qemu_log_offset,
            backdoor: Mutex::default(),
            backdoor_changed: Condvar::new(),
        }));
        Ok(())
    }

    fn current(&self) -> Option<Arc<Incarnation>> {
        self.current.lock().unwrap().clone()
    }

    /// QEMU's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.current().filter(|i| i.guard.exit_status().is_none()).map(|i| i.guard.pid())
    }

    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Waits up to `timeout` (`Duration::MAX`: no limit) for QEMU to exit;
    /// `None` when it was never started or still runs.
    pub fn wait_exit(&self, timeout: Duration) -> Option<Exit> {
        let current = self.current()?;
        let status = current.guard.wait_exit(timeout)?;
        Some(self.exit(&current, status))
    }

    /// Stops QEMU: SIGTERM to its process group, SIGKILL after a grace period.
    /// Returns how it ended (also when it had exited by itself); `None` when never started.
    pub fn stop(&self) -> Option<Exit> {
        let current = self.current()?;
        let status = current.guard.stop(STOP_GRACE);
        Some(self.exit(&current, status))
    }

    /// Stops QEMU for good: later starts fail.
    pub fn retire(&self) -> Option<Exit> {
        self.retired.store(true, Ordering::SeqCst);
        // Taking the lock waits out a start that is under way, so it is stopped below.
        drop(self.current.lock().unwrap());
        self.stop()
    }

    /// Stops QEMU at once (SIGKILL to its process group), like pulling the plug.
    pub fn kill(&self) -> Option<Exit> {
        let current = self.current()?;
        let status = current.guard.stop(Duration::ZERO);
        Some(self.exit(&current, status))
    }

    fn exit(&self, incarnation: &Incarnation, status: ExitStatus) -> Exit {
        Exit { status, stderr_tail: log_tail(&self.qemu_log(), incarnation.qemu_log_offset) }
    }

    /// Waits until the guest's backdoor shell is up: connects to the backdoor
    /// socket and reads the virtio console up to [`BACKDOOR_BANNER`]. Returns
    /// the time from start to the banner. The connection stays with the
    /// machine for [`Machine::take_backdoor`]. Several threads may wait at once;
    /// one connects. Fails at once when QEMU exits.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Duration> {
        let deadline = deadline_after(timeout);
        let current = self.current().with_context(|| format!("machine {:?} is not started", self.name))?;
        let mut backdoor = current.backdoor.lock().unwrap();
        loop {
            if let Some(status) = current.guard.exit_status() {
                let exit = self.exit(&current, status);
                bail!(match backdoor.ready_after {
                    Some(_) => format!("machine {:?} is not running: it {exit}", self.name),
                    None => self.not_up(&exit),
                });
            }
            if let Some(after) = backdoor.ready_after {
                return Ok(after);
            }
            if !backdoor.connecting {
                break;
            }
            backdoor = self.wait_for_other_connector(&current, backdoor, deadline, timeout)?;
        }
        backdoor.connecting = true;
        let stream = backdoor.stream.take();
        drop(backdoor);
        let result = self.connect_and_read_banner(&current, stream, deadline, timeout);
        let mut backdoor = current.backdoor.lock().unwrap();
        backdoor.connecting = false;
        let outcome = match result {
            Ok(stream) => {
                backdoor.stream = Some(stream);
                Ok(*backdoor.ready_after.insert(current.started.elapsed()))
            }
            Err((stream, e)) => {
                // A later wait goes on reading this connection: the banner is printed once.
                backdoor.stream = stream;
                Err(e)
            }
        };
        current.backdoor_changed.notify_all();
        outcome
    }

    fn wait_for_other_connector<'a>(
        &self,
        current: &'a Incarnation,
        backdoor: MutexGuard<'a, Backdoor>,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<MutexGuard<'a, Backdoor>> {
        let Some(deadline) = deadline else {
            return Ok(current.backdoor_changed.wait(backdoor).unwrap());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("machine {:?}: no backdoor shell after {timeout:?}", self.name);
        }
        Ok(current.backdoor_changed.wait_timeout(backdoor, left).unwrap().0)
    }

    /// On failure, hands back the connection if there was one.
    fn connect_and_read_banner(
        &self,
        current: &Incarnation,
        stream: Option<UnixStream>,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<UnixStream, (Option<UnixStream>, anyhow::Error)> {
        let not_up = |status| anyhow::anyhow!(self.not_up(&self.exit(current, status)));
        let socket = self.shell_socket();
        let stream = match stream {
            Some(s) => s,
            None => match current.guard.poll_until(deadline, || UnixStream::connect(&socket).ok()) {
                Poll::Ready(s) => s,
                Poll::Exited(status) => return Err((None, not_up(status))),
                Poll::TimedOut => {
                    let e = anyhow::anyhow!(
                        "machine {:?}: {} accepts no connection after {timeout:?}",
                        self.name,
                        socket.display()
                    );
                    return Err((None, e));
                }
            },
        };
        match self.read_banner(current, &stream, deadline, timeout) {
            Ok(()) => Ok(stream),
            Err(Stopped::Exited(status)) => Err((None, not_up(status))),
            Err(Stopped::Failed(e)) => Err((Some(stream), e)),
        }
    }

    fn not_up(&self, exit: &Exit) -> String {
        let Exit { status, stderr_tail } = exit;
        format!("machine {:?} {} before its backdoor shell was up{stderr_tail}", self.name, describe_exit(*status))
    }

    fn read_banner(
        &self,
        current: &Incarnation,
        stream: &UnixStream,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<(), Stopped> {
        let failed = |e: io::Error| {
            Stopped::Failed(anyhow::Error::new(e).context(format!("machine {:?}: cannot read its backdoor", self.name)))
        };
        stream.set_read_timeout(Some(READ_SLICE)).map_err(failed)?;
        let mut line = Vec::new();
        let mut byte = [0u8];
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Stopped::Failed(anyhow::anyhow!(
                    "machine {:?}: no backdoor shell after {timeout:?} (the guest did not print {BACKDOOR_BANNER:?} on its virtio console)",
                    self.name
                )));
            }
            match (&*stream).read(&mut byte) {
                // QEMU closes the socket when it exits.
                Ok(0) => match current.guard.wait_exit(STOP_GRACE) {
                    Some(status) => return Err(Stopped::Exited(status)),
                    None => {
                        return Err(Stopped::Failed(anyhow::anyhow!(
                            "machine {:?}: its backdoor socket was closed",
                            self.name
                        )))
                    }
                },
                Ok(_) if byte[0] == b'\n' => {
                    if is_banner(&line) {
                        stream.set_read_timeout(None).map_err(failed)?;
                        return Ok(());
                    }
                    line.clear();
                }
                Ok(_) if line.len() < MAX_LINE => line.push(byte[0]),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(failed(e)),
            }
        }
    }

    /// The backdoor connection after [`Machine::wait_ready`], positioned just
    /// after the banner line; handed out once per QEMU process.
    pub fn take_backdoor(&self) -> Option<UnixStream> {
        let current = self.current()?;
        let mut backdoor = current.backdoor.lock().unwrap();
        backdoor.ready_after?;
        backdoor.stream.take()
    }
}

/// How the test driver runs a machine: QEMU is the runtime's, the backdoor
/// and QMP connections are the driver's, so a machine the driver drives is
/// never passed to [`Machine::wait_ready`] (QEMU accepts one backdoor client).
impl crate::driver::machine::Vm for Arc<Machine> {
    fn spawn(&mut self) -> Result<()> {
        self.start()
    }

    fn exited(&mut self) -> Option<String> {
        self.wait_exit(Duration::ZERO).map(|exit| exit.to_string())
    }

    fn kill(&mut self) {
        Machine::kill(self);
    }

    fn killer(&self) -> crate::driver::machine::Killer {
        let machine = self.clone();
        Arc::new(move || {
            Machine::kill(&machine);
        })
    }

    fn state_dir(&self) -> PathBuf {
        Machine::state_dir(self)
    }

    fn serial_log(&self) -> PathBuf {
        Machine::serial_log(self)
    }

    fn retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    fn spawn_incoming(&mut self) -> Result<()> {
        self.start_incoming()
    }

    fn pid(&self) -> Option<u32> {
        Machine::pid(self)
    }
}

enum Stopped {
    Exited(ExitStatus),
    Failed(anyhow::Error),
}

fn append(path: &std::path::Path) -> Result<File> {
    OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))
}

/// Pure: whether a virtio console line (without `\n`) is the backdoor banner;
/// bytes before it on the line (a partial line written before the shell
/// started) do not matter.
fn is_banner(line: &[u8]) -> bool {
    String::from_utf8_lossy(line).trim_end_matches('\r').ends_with(BACKDOOR_BANNER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_lines() {
        let cases: [(&[u8], bool); 6] = [
            (b"Spawning backdoor root shell...", true),
            (b"Spawning backdoor root shell...\r", true),
            (b"connecting to host...", false),
            (b"Spawning backdoor root shell", false),
            (b"\x1b[0mSpawning backdoor root shell...", true),
            (b"Spawning backdoor root shell... now", false),
        ];
        for (line, expected) in cases {
            assert_eq!(is_banner(line), expected, "{:?}", String::from_utf8_lossy(line));
        }
    }
}
