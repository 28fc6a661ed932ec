//! One machine: its run script as a guarded process (the script `exec`s
//! QEMU) and its serial console. The backdoor and QMP are the driver's.

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::console::Console;
use super::process::{describe_exit, ChildGuard, STOP_GRACE};
use super::{log_tail, spawn_thread};
use crate::layout::SessionDir;
use crate::sync::lock;

/// A machine's QEMU as the runtime runs it: its run script under a
/// [`ChildGuard`], started again as needed, and its serial console.
pub struct VmProcess {
    name: String,
    script: PathBuf,
    env: Vec<(String, OsString)>,
    layout: SessionDir,
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
    /// Where this process's messages start in the (appended) QEMU log.
    qemu_log_offset: u64,
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

impl VmProcess {
    /// `env` is the run script's environment on top of vmlab's (docs/design.md).
    pub(crate) fn new(name: String, script: PathBuf, env: Vec<(String, OsString)>, layout: SessionDir) -> VmProcess {
        VmProcess {
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

    /// The serial console log; appended to across restarts.
    pub fn serial_log(&self) -> PathBuf {
        self.layout.serial_log(&self.name)
    }

    /// QEMU's standard error; appended to across restarts.
    pub fn qemu_log(&self) -> PathBuf {
        self.layout.qemu_log(&self.name)
    }

    /// The serial console; subscribe before [`VmProcess::start`] to see every line.
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

    /// [`VmProcess::start`] with more environment for the run script.
    fn start_with(&self, extra_env: &[(String, OsString)]) -> Result<()> {
        let mut current = lock(&self.current);
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
        *current = Some(Arc::new(Incarnation { guard, qemu_log_offset }));
        Ok(())
    }

    fn current(&self) -> Option<Arc<Incarnation>> {
        lock(&self.current).clone()
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
        drop(lock(&self.current));
        self.stop()
    }

    /// Stops QEMU at once (SIGKILL to its process group), like pulling the plug.
    pub fn kill(&self) -> Option<Exit> {
        let current = self.current()?;
        let status = current.guard.stop(Duration::ZERO);
        Some(self.exit(&current, status))
    }

    /// The network has stopped for good: the machine cannot start again.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    fn exit(&self, incarnation: &Incarnation, status: ExitStatus) -> Exit {
        Exit { status, stderr_tail: log_tail(&self.qemu_log(), incarnation.qemu_log_offset) }
    }
}

fn append(path: &std::path::Path) -> Result<File> {
    OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))
}
