//! Machine operations, with the names and semantics of the NixOS test
//! driver's `Machine` (start, execute, succeed, wait_until_succeeds, …).
//! Starting and stopping QEMU is the runtime's job, reached through [`Vm`].

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backdoor::{data_shell_command, Alive, Output, Shell};
use super::log::{Log, Style};
use super::monitor::Monitor;
use super::qmp::Qmp;
use super::snapshot::Restore;
use super::{DriverError, Kind};
use crate::plan::qemu::DATA_PORT_NAME;
use crate::shell::quote;

/// NixOS's default for every wait and for `execute`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(900);

/// How long a guest may take from QEMU's start to its backdoor banner.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Pure: how long a booting machine may show no sign of life (nothing on
/// its serial console, no backdoor banner) before it is reported and
/// stopped. A guest started with `quiet` may print nothing until it is up,
/// and boots share the host's cores, so the limit grows with the machines
/// per core: under TCG a boot takes seconds of a core, with KVM a fraction.
pub fn boot_silence_limit(tcg: bool, machines: usize, cores: usize) -> Duration {
    let (floor, per_machine_per_core) = if tcg { (60, 10) } else { (20, 2) };
    let scaled = per_machine_per_core * machines as u64 / cores.max(1) as u64;
    Duration::from_secs(scaled.max(floor))
}

/// How long a stuck machine's QMP is waited for while it is reported.
const REPORT_QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// What the silence check in a boot wait gives back, to be told apart.
const SILENT: &str = "no sign of life";

/// How long the backdoor shell and then the data port's shell may take to
/// start the data port's shell and answer on it before the machine is
/// driven over the backdoor instead.
const DATA_SHELL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a Linux guest lists its virtio-serial ports with their names.
const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// How long QEMU may take to create its sockets after it starts.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// Copies go through the backdoor in pieces this big, so neither side holds
/// a whole large file in one command or one reply.
const COPY_IN_CHUNK: usize = 1024 * 1024;
const COPY_IN_RAW_CHUNK: usize = 4 * 1024 * 1024;
/// Out of the guest, smaller: QEMU drops console output while the host
/// reads too slowly (a loaded host), and a piece that lost bytes is fetched
/// again whole, so a small piece is likelier to come through on a retry.
const COPY_OUT_CHUNK: u64 = 1024 * 1024;
/// The most a copy out reserves on the guest's word of its size.
const RESERVE_AT_MOST: u64 = 1 << 30;

/// What the driver needs from whoever runs a machine's QEMU (the runtime).
pub trait Vm: Send {
    /// Starts QEMU; returns once the process runs, long before the guest boots.
    fn spawn(&mut self) -> anyhow::Result<()>;
    /// `None` while QEMU runs; once it has ended, how (status, stderr's tail).
    fn exited(&mut self) -> Option<String>;
    /// Stops QEMU at once and reaps it.
    fn kill(&mut self);
    /// Stops QEMU at once from any thread, without the machine (which a
    /// running command holds): the command then sees QEMU gone.
    fn killer(&self) -> Killer;
    /// Where QEMU puts `shell.sock` and `qmp.sock`.
    fn state_dir(&self) -> PathBuf;
    /// The serial console's log file (appended to while QEMU runs).
    fn serial_log(&self) -> PathBuf;
    /// The network has stopped for good: the machine cannot start again.
    fn retired(&self) -> bool;
    /// Starts QEMU waiting for a saved state (`-incoming defer`) instead of
    /// booting; only a real QEMU can.
    fn spawn_incoming(&mut self) -> anyhow::Result<()> {
        anyhow::bail!("this machine cannot be restored from a snapshot")
    }
    /// QEMU's process id while it runs, where known.
    fn pid(&self) -> Option<u32> {
        None
    }
}

/// Stops a machine's current QEMU from any thread.
pub type Killer = Arc<dyn Fn() + Send + Sync>;

/// `crash()` or `shutdown()` while another request holds the machine: QEMU
/// is stopped (or the guest told to power off) at once, and the request
/// that was running learns why it failed.
#[derive(Clone)]
pub struct Interrupt {
    kill: Killer,
    /// What was asked for, as the interrupted request's error says it.
    requested: Arc<std::sync::Mutex<Option<&'static str>>>,
}

impl Interrupt {
    fn note(&self, what: Option<&'static str>) {
        *self.requested.lock().unwrap_or_else(|e| e.into_inner()) = what;
    }

    pub fn crash(&self) {
        self.note(Some("crashed on request (crash())"));
        (self.kill)();
    }

    /// The guest is about to be told to power off (ACPI power button);
    /// `false` takes that back when it could not be told.
    pub fn powering_off(&self, yes: bool) {
        self.note(yes.then_some("shut down on request (shutdown())"));
    }
}

/// The next pause of a poll loop: fast at first, then about a second.
pub fn next_delay(previous: Duration) -> Duration {
    (previous * 2).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// The shell command for "something listens on `addr`:`port`". `nc -z`
/// (OpenBSD netcat, NixOS) first; busybox's nc has no `-z` but runs a
/// program once connected.
pub fn port_check(port: u16, addr: &str) -> String {
    let (a, p) = (quote(addr), port);
    format!("nc -z {a} {p} 2>/dev/null || nc -w 2 {a} {p} -e true 2>/dev/null")
}

pub struct Machine {
    pub name: String,
    vm: Box<dyn Vm>,
    running: bool,
    /// Started at least once: a machine that is not running now may have run.
    ever_started: bool,
    shell: Option<Shell>,
    /// The shell on the data port, once started for this boot: commands and
    /// copies go there rather than to `shell`.
    data: Option<Shell>,
    monitor: Arc<Monitor>,
    booted: bool,
    /// Whether the backdoor shell is bash, once known for this boot.
    shell_is_bash: Option<bool>,
    /// Why QEMU ended when nobody asked it to; commands fail until `start`.
    died: Option<String>,
    interrupt: Interrupt,
    /// See [`boot_silence_limit`].
    boot_silence: Duration,
    /// Serial console text not yet consumed by `wait_for_console_text`.
    console: String,
    console_offset: u64,
    out_dir: PathBuf,
    log: Arc<Log>,
    /// The next start loads this saved state instead of booting (once: a
    /// machine started again boots cold).
    restore: Option<Restore>,
    /// Whether commands may move to the data port (`vmlab snapshot` keeps
    /// them on the backdoor, so no data shell is saved).
    use_data_port: bool,
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

impl Machine {
    pub fn new(name: &str, interfaces: Vec<(String, u8)>, vm: Box<dyn Vm>, out_dir: &Path, log: Arc<Log>) -> Self {
        let interrupt = Interrupt { kill: vm.killer(), requested: Default::default() };
        let monitor = Arc::new(Monitor::new(name, interfaces, vm.state_dir().join("qmp.sock"), out_dir, log.clone()));
        Machine {
            name: name.to_string(),
            interrupt,
            boot_silence: boot_silence_limit(true, 1, 1),
            vm,
            running: false,
            ever_started: false,
            shell: None,
            data: None,
            monitor,
            booted: false,
            shell_is_bash: None,
            died: None,
            console: String::new(),
            console_offset: 0,
            out_dir: out_dir.to_path_buf(),
            log,
            restore: None,
            use_data_port: true,
        }
    }

    /// The next start restores `restore` instead of booting.
    pub fn restore_from(&mut self, restore: Restore) {
        self.restore = Some(restore);
    }

    /// Keeps commands on the backdoor console, off the data port.
    pub fn without_data_port(&mut self) {
        self.use_data_port = false;
    }

    fn say(&self, msg: &str) {
        self.log.write(Some(&self.name), msg, Style::Plain);
    }

    fn err(&self, kind: Kind, msg: impl std::fmt::Display) -> DriverError {
        DriverError::new(kind, format!("machine {}: {msg}", self.name))
    }

    /// Crashes or powers off the machine from any thread, even while it runs a command.
    pub fn interrupt(&self) -> Interrupt {
        self.interrupt.clone()
    }

    /// What [`Interrupt`] did since this was last asked.
    fn interrupted(&self) -> Option<&'static str> {
        self.interrupt.requested.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// How long a booting machine may show no sign of life.
    pub fn set_boot_silence(&mut self, limit: Duration) {
        self.boot_silence = limit;
    }

    pub fn ever_started(&self) -> bool {
        self.ever_started
    }

    pub fn is_up(&mut self) -> bool {
        self.running && self.vm.exited().is_none()
    }

    /// Starts QEMU if it is not running; does not wait for the guest to boot.
    pub fn start(&mut self) -> Result<(), DriverError> {
        if self.is_up() {
            return Ok(());
        }
        // A request still running when the test ended sees its machine gone.
        if self.vm.retired() {
            return Err(self.err(Kind::Machine, "the test is over: its network has stopped"));
        }
        self.say("starting");
        self.forget_process();
        self.died = None;
        self.console_offset = std::fs::metadata(self.vm.serial_log()).map(|m| m.len()).unwrap_or(0);
        self.console.clear();
        let restore = self.restore.take();
        let spawned = if restore.is_some() { self.vm.spawn_incoming() } else { self.vm.spawn() };
        spawned.map_err(|e| self.err(Kind::Harness, format!("cannot start: {e:#}")))?;
        self.running = true;
        self.ever_started = true;
        // At once: QEMU drops what the guest writes to the backdoor while no
        // client is connected, and the banner is written once.
        let shell = self.wait_for_socket(&self.vm.state_dir().join("shell.sock"))?;
        self.shell =
            Some(Shell::new(shell, &self.name).map_err(|e| self.err(Kind::Harness, format!("backdoor socket: {e}")))?);
        match restore {
            // Settled here, so that start_all() restores machines in parallel.
            Some(restore) => self.resume(restore).and_then(|()| self.settle_restored()),
            None => Ok(()),
        }
    }

    /// Loads the saved state into the QEMU just started; on failure QEMU is
    /// stopped and the restore stays pending, so that a later start fails
    /// the same way rather than boot cold unasked.
    fn resume(&mut self, restore: Restore) -> Result<(), DriverError> {
        let started = Instant::now();
        let pid = self.vm.pid().ok_or_else(|| "QEMU's process is unknown".to_owned());
        let argv = pid.and_then(|pid| {
            super::snapshot::qemu_argv(pid, &restore.session).map_err(|e| format!("cannot read its command line: {e}"))
        });
        match argv.and_then(|argv| super::snapshot::resume(&self.monitor, &restore, &argv)) {
            Ok(()) => {
                self.say(&format!("restored from {} ({})", restore.file.display(), secs(started.elapsed())));
                Ok(())
            }
            Err(why) => {
                let exit = self.vm.exited().map(|how| format!("; QEMU {how}")).unwrap_or_default();
                self.vm.kill();
                self.forget_process();
                let file = restore.file.display().to_string();
                self.restore = Some(restore);
                Err(self.err(Kind::Harness, format!("cannot restore it from {file}: {why}{exit}")))
            }
        }
    }

    /// Saves the booted machine's state into `file`, then stops it: QEMU's
    /// command line (session directory marked) and version, for the key.
    pub fn save_state(
        &mut self,
        file: &Path,
        compression: crate::runtime::manifest::Compression,
        session: &str,
    ) -> Result<(Vec<String>, String), DriverError> {
        self.wait_for_boot()?;
        let refuse = |m: &Self, why: String| m.err(Kind::Harness, format!("cannot be snapshotted: {why}"));
        super::snapshot::unsaved_files(&self.vm.state_dir()).map_err(|why| refuse(self, why))?;
        let pid = self.vm.pid().ok_or_else(|| refuse(self, "QEMU's process is unknown".into()))?;
        let argv = super::snapshot::qemu_argv(pid, session)
            .map_err(|e| refuse(self, format!("cannot read its command line: {e}")))?;
        let version = super::snapshot::qemu_version(&self.monitor)?;
        let started = Instant::now();
        super::snapshot::save(&self.monitor, file, compression)
            .map_err(|why| refuse(self, format!("QEMU cannot save it: {why}")))?;
        self.say(&format!("saved to {} ({})", file.display(), secs(started.elapsed())));
        self.release();
        Ok((argv, version))
    }

    /// Connects to a socket QEMU listens on, as soon as QEMU has made it.
    fn wait_for_socket(&mut self, path: &Path) -> Result<std::os::unix::net::UnixStream, DriverError> {
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        let mut delay = Duration::ZERO;
        loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    if let Some(how) = self.vm.exited() {
                        self.forget_process();
                        return Err(self.err(Kind::Harness, format!("QEMU ended before the guest came up: {how}")));
                    }
                    if Instant::now() >= deadline {
                        return Err(self.err(Kind::Harness, format!("QEMU did not open {}: {e}", path.display())));
                    }
                }
            }
            delay = next_delay(delay);
            std::thread::sleep(delay);
        }
    }

    fn forget_process(&mut self) {
        self.running = false;
        self.booted = false;
        self.shell_is_bash = None;
        self.shell = None;
        self.data = None;
        self.monitor.reset();
    }

    /// QEMU ended unexpectedly: remember why, so later commands say so.
    fn mark_dead(&mut self, error: DriverError) -> DriverError {
        if let Some(what) = self.interrupted() {
            // Asked for: the machine is stopped, not dead, and starts again on demand.
            self.vm.kill();
            self.forget_process();
            return self.err(Kind::Machine, format!("{what} while this ran"));
        }
        let how = self.vm.exited().unwrap_or_else(|| {
            self.vm.kill();
            "stopped (the backdoor broke)".into()
        });
        self.forget_process();
        let message = format!("{} — QEMU {how}", error.message);
        self.died = Some(message.clone());
        self.log.write(Some(&self.name), &message, Style::Bad);
        DriverError::new(Kind::Machine, message)
    }

    /// Starts the machine if needed and waits for its backdoor shell.
    pub fn wait_for_boot(&mut self) -> Result<(), DriverError> {
        self.wait_for_boot_within(BOOT_TIMEOUT)
    }

    /// [`Machine::wait_for_boot`] with a chosen limit (`vmlab up` waits as
    /// long as the machine runs: a guest without the backdoor just runs).
    pub fn wait_for_boot_within(&mut self, timeout: Duration) -> Result<(), DriverError> {
        if let Some(why) = &self.died {
            return Err(self.err(Kind::Machine, format!("died earlier ({why}); start() it again")));
        }
        self.start()?;
        if self.booted {
            return Ok(());
        }
        self.say("waiting for the guest to boot");
        let started = Instant::now();
        // Checked once: a machine that answers is only warned about.
        let mut silence = Some(self.boot_silence);
        loop {
            let (vm, name) = (&mut self.vm, &self.name);
            let serial = vm.serial_log();
            let mut alive = || match vm.exited() {
                None if silence.is_some_and(|s| started.elapsed() >= s)
                    && std::fs::metadata(&serial).map_or(true, |m| m.len() == 0) =>
                {
                    Err(DriverError::new(Kind::Machine, SILENT))
                }
                None => Ok(()),
                Some(how) => Err(DriverError::new(Kind::Harness, format!("machine {name}: QEMU {how}"))),
            };
            let shell = self.shell.as_mut().expect("a started machine has a shell");
            // Too far to represent (`Duration::MAX`): no deadline.
            let e = match shell.wait_for_banner(&mut alive, started.checked_add(timeout)) {
                Ok(()) => break,
                Err(e) if e.message == SILENT => {
                    let (report, stuck) = self.silence_report();
                    let limit = secs(silence.take().unwrap_or_default());
                    let what = format!(
                        "machine {}: no sign of life after {limit} (nothing on the serial console, no backdoor banner); {report}",
                        self.name
                    );
                    if !stuck {
                        self.log.write(Some(&self.name), &format!("warning: {what}; still waiting"), Style::Bad);
                        continue;
                    }
                    DriverError::new(Kind::Machine, what)
                }
                Err(e) => e,
            };
            let e = self.mark_dead(e);
            return Err(DriverError::harness(format!("the guest never came up: {}", e.message)));
        }
        self.booted = true;
        self.say(&format!("backdoor shell ready ({})", secs(started.elapsed())));
        self.open_data_channel()
    }

    /// A restored guest, before anything else runs there: its backdoor shell
    /// must answer (no banner comes after a restore), then its clock and
    /// random pool are put right, then the data port gets a new shell (the
    /// host end of its socket is new).
    fn settle_restored(&mut self) -> Result<(), DriverError> {
        let started = Instant::now();
        self.booted = true;
        let seed = super::snapshot::host_seed()
            .map_err(|e| self.err(Kind::Harness, format!("cannot read the host's random numbers: {e}")))?;
        let command = super::snapshot::after_restore_command(std::time::SystemTime::now(), &seed);
        let out = self.execute(&command, Some(DATA_SHELL_TIMEOUT))?;
        if out.status != 0 {
            let why = guest_says(&out);
            return Err(self.err(
                Kind::Harness,
                format!("after the restore, cannot set its clock or seed its random numbers: {why}"),
            ));
        }
        self.say(&format!("backdoor shell answers; clock set, random pool seeded ({})", secs(started.elapsed())));
        self.open_data_channel()
    }

    /// Moves commands and copies to a shell on the data port when the run
    /// script gave the machine one (`data.sock`) and the guest has it, and
    /// says which channel the machine uses and why. Anything that keeps the
    /// data port from working leaves the machine on the backdoor console;
    /// only the machine dying is an error.
    fn open_data_channel(&mut self) -> Result<(), DriverError> {
        if !self.use_data_port {
            return Ok(());
        }
        let channel = match self.start_data_shell()? {
            Ok((shell, device)) => {
                self.data = Some(shell);
                format!("the data port {device} ({DATA_PORT_NAME})")
            }
            Err(why) => format!("the backdoor console hvc0: {why}"),
        };
        self.say(&format!("commands and copies go over {channel}"));
        Ok(())
    }

    /// The data port's shell, answering, and its device; `Ok(Err(why))` when
    /// there is none to be had.
    fn start_data_shell(&mut self) -> Result<Result<(Shell, String), String>, DriverError> {
        let socket = self.vm.state_dir().join("data.sock");
        // Connected before the guest's shell opens the port: without a host
        // end, the shell would read end of file and exit.
        let stream = match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(s) => s,
            Err(e) => return Ok(Err(format!("the run script gives it no data port ({}: {e})", socket.display()))),
        };
        let mut shell = match Shell::data_port(stream, &self.name) {
            Ok(s) => s,
            Err(e) => return Ok(Err(format!("{}: {e}", socket.display()))),
        };
        let started = self.execute(&data_shell_command(VIRTIO_PORTS, DATA_PORT_NAME), Some(DATA_SHELL_TIMEOUT))?;
        if started.status != 0 {
            let why = String::from_utf8_lossy(&started.stderr).trim().to_string();
            return Ok(Err(format!("the guest cannot start a shell on it ({why}, exit code {})", started.status)));
        }
        let device = String::from_utf8_lossy(&started.stdout).trim().to_string();
        let (vm, name) = (&mut self.vm, &self.name);
        let mut alive = || match vm.exited() {
            None => Ok(()),
            Some(how) => Err(DriverError::new(Kind::Machine, format!("machine {name}: QEMU {how}"))),
        };
        match shell.run("true", Some(DATA_SHELL_TIMEOUT), &mut alive) {
            Ok(out) if out.status == 0 => Ok(Ok((shell, device))),
            Ok(out) => Ok(Err(format!("the shell on {device} answers with exit code {}", out.status))),
            Err(e) if vm.exited().is_some() => Err(self.mark_dead(e)),
            Err(e) => Ok(Err(format!("the shell on {device} does not answer ({})", e.message))),
        }
    }

    /// What can be learnt of a machine that shows no sign of life: whether
    /// QEMU answers at all, the guest's run state and where its CPU is; and
    /// whether it is stuck (QEMU silent, or the guest not running), which
    /// waiting longer cannot mend. A guest booted `quiet` on a crowded host
    /// may run and print nothing for long.
    fn silence_report(&mut self) -> (String, bool) {
        if self.monitor.connect(REPORT_QMP_TIMEOUT).is_err() {
            return (
                "QEMU does not answer on QMP: QEMU itself is stuck, before or without running the guest".into(),
                true,
            );
        }
        match self.monitor.state() {
            Ok((status, cpu)) => (format!("QEMU answers; the guest is {status}; CPU: {cpu}"), status != "running"),
            Err(e) => (format!("QEMU does not answer on QMP: {e}"), true),
        }
    }

    /// Runs a command: `(status, stdout, stderr)`; boots the machine first if needed.
    pub fn execute(&mut self, command: &str, timeout: Option<Duration>) -> Result<Output, DriverError> {
        self.with_shell(|shell, alive| shell.run(command, timeout, alive))
    }

    /// Boots the machine if needed and runs `f` on its backdoor; an error
    /// saying the machine is gone marks it dead.
    fn with_shell<T>(&mut self, f: impl FnOnce(&mut Shell, Alive) -> Result<T, DriverError>) -> Result<T, DriverError> {
        self.wait_for_boot()?;
        let (vm, name) = (&mut self.vm, &self.name);
        let mut alive = || match vm.exited() {
            None => Ok(()),
            Some(how) => Err(DriverError::new(Kind::Machine, format!("machine {name}: QEMU {how}"))),
        };
        let shell = match self.data.as_mut() {
            Some(data) => data,
            None => self.shell.as_mut().expect("a booted machine has a shell"),
        };
        match f(shell, &mut alive) {
            Ok(out) => Ok(out),
            Err(e) if e.kind == Kind::Machine => Err(self.mark_dead(e)),
            Err(e) => Err(e),
        }
    }

    /// `execute` with the command and its result in the log.
    fn logged(&mut self, what: &str, command: &str, timeout: Option<Duration>) -> Result<Output, DriverError> {
        let started = Instant::now();
        let out = self.execute(command, timeout)?;
        let style = if out.status == 0 { Style::Good } else { Style::Plain };
        let stopped = if out.timed_out { ", stopped at its timeout" } else { "" };
        let msg = format!("{what}{command} (exit {}{stopped}, {})", out.status, secs(started.elapsed()));
        self.log.write(Some(&self.name), &msg, style);
        Ok(out)
    }

    pub fn execute_logged(&mut self, command: &str, timeout: Option<Duration>) -> Result<Output, DriverError> {
        self.logged("$ ", command, timeout)
    }

    /// Runs each command, failing at the first non-zero status; the
    /// concatenated standard output.
    pub fn succeed(&mut self, commands: &[String], timeout: Option<Duration>) -> Result<Vec<u8>, DriverError> {
        let mut all = Vec::new();
        for command in commands {
            let out = self.logged("must succeed: ", command, timeout)?;
            if out.status != 0 {
                let err = String::from_utf8_lossy(&out.stderr);
                return Err(self.err(
                    Kind::Failed,
                    format!("command `{command}` failed (exit code {}){}", out.status, stderr_note(&err)),
                ));
            }
            all.extend(out.stdout);
        }
        Ok(all)
    }

    /// Like `succeed`, but each command must fail.
    pub fn fail(&mut self, commands: &[String], timeout: Option<Duration>) -> Result<Vec<u8>, DriverError> {
        let mut all = Vec::new();
        for command in commands {
            let out = self.logged("must fail: ", command, timeout)?;
            if out.status == 0 {
                return Err(self.err(Kind::Failed, format!("command `{command}` unexpectedly succeeded")));
            }
            all.extend(out.stdout);
        }
        Ok(all)
    }

    /// Calls `attempt` until it gives a value, pausing adaptively between
    /// tries; a timeout error names `what`.
    fn poll<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut attempt: impl FnMut(&mut Self, Duration) -> Result<Option<T>, DriverError>,
    ) -> Result<T, DriverError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut delay = Duration::ZERO;
        self.say(&format!("waiting for {what}"));
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
            if let Some(v) = attempt(self, left)? {
                self.log.write(
                    Some(&self.name),
                    &format!("done waiting for {what} ({})", secs(started.elapsed())),
                    Style::Good,
                );
                return Ok(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.err(Kind::Timeout, format!("timed out after {} waiting for {what}", secs(timeout))));
            }
            delay = next_delay(delay);
            std::thread::sleep(delay.min(deadline - now));
        }
    }

    /// Repeats `command` until its status is zero (`want_success`) or non-zero; its last output.
    pub fn wait_until(&mut self, command: &str, want_success: bool, timeout: Duration) -> Result<Vec<u8>, DriverError> {
        let what = format!("{} of `{command}`", if want_success { "success" } else { "failure" });
        self.poll(timeout, &what, |m, left| {
            let out = m.execute(command, Some(left))?;
            Ok(((out.status == 0) == want_success).then_some(out.stdout))
        })
    }

    fn wait_for_status(
        &mut self,
        command: &str,
        want_zero: bool,
        what: &str,
        timeout: Duration,
    ) -> Result<(), DriverError> {
        self.poll(timeout, what, |m, left| {
            Ok(((m.execute(command, Some(left))?.status == 0) == want_zero).then_some(()))
        })
    }

    pub fn wait_for_file(&mut self, path: &str, timeout: Duration) -> Result<(), DriverError> {
        self.wait_for_status(&format!("test -e {}", quote(path)), true, &format!("file {path}"), timeout)
    }

    pub fn wait_for_open_port(&mut self, port: u16, addr: &str, timeout: Duration) -> Result<(), DriverError> {
        self.wait_for_status(&port_check(port, addr), true, &format!("TCP port {port} on {addr}"), timeout)
    }

    pub fn wait_for_closed_port(&mut self, port: u16, addr: &str, timeout: Duration) -> Result<(), DriverError> {
        self.wait_for_status(&port_check(port, addr), false, &format!("TCP port {port} on {addr} to close"), timeout)
    }

    /// Waits for a systemd unit to be active; fails at once when it failed,
    /// or is inactive with no job pending, or the guest has no systemd.
    pub fn wait_for_unit(&mut self, unit: &str, user: Option<&str>, timeout: Duration) -> Result<(), DriverError> {
        if self.execute("command -v systemctl", None)?.status != 0 {
            return Err(self.err(
                Kind::Failed,
                format!("wait_for_unit({unit}) needs systemd, and this guest has no systemctl (wait for a port, a file or a command instead)"),
            ));
        }
        let systemctl = match user {
            None => "systemctl".to_string(),
            Some(u) => format!(
                "su -l {} -s /bin/sh -c 'XDG_RUNTIME_DIR=/run/user/$(id -u) systemctl --user \"$@\"' --",
                quote(u)
            ),
        };
        let show = format!("{systemctl} --no-pager show {} --property=ActiveState", quote(unit));
        let jobs = format!("{systemctl} list-jobs --full 2>&1");
        self.poll(timeout, &format!("unit {unit}"), |m, left| {
            let out = m.execute(&show, Some(left))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let state = text.trim().strip_prefix("ActiveState=").unwrap_or("").to_string();
            match state.as_str() {
                "active" => Ok(Some(())),
                "failed" => Err(m.err(Kind::Failed, format!("unit {unit} reached state \"failed\""))),
                "inactive" => {
                    let pending = m.execute(&jobs, Some(left))?;
                    if String::from_utf8_lossy(&pending.stdout).contains("No jobs") {
                        return Err(
                            m.err(Kind::Failed, format!("unit {unit} is inactive and there are no pending jobs"))
                        );
                    }
                    Ok(None)
                }
                _ => Ok(None),
            }
        })
    }

    /// Waits for `regex` to match the serial console output since the
    /// previous match (or since the machine started).
    pub fn wait_for_console_text(&mut self, regex: &str, timeout: Duration) -> Result<String, DriverError> {
        let re =
            regex::Regex::new(regex).map_err(|e| self.err(Kind::Request, format!("bad regular expression: {e}")))?;
        let path = self.vm.serial_log();
        self.poll(timeout, &format!("/{regex}/ on the console"), |m, _| {
            if let Ok(bytes) = std::fs::read(&path) {
                let new = bytes.get(m.console_offset as usize..).unwrap_or_default();
                m.console_offset += new.len() as u64;
                m.console += &String::from_utf8_lossy(new).replace('\r', "");
            }
            let found = re.find(&m.console).map(|f| (f.as_str().to_string(), f.end()));
            Ok(found.map(|(text, end)| {
                m.console.drain(..end);
                text
            }))
        })
    }

    /// Asks the guest to power off and waits for QEMU to exit.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<(), DriverError> {
        // Served now, after any power-off it asked for from outside the machine.
        self.interrupted();
        if !self.is_up() {
            return Ok(());
        }
        self.wait_for_boot()?;
        self.say("shutting down");
        self.send_to_shell("poweroff\n")?;
        self.wait_for_shutdown(timeout)
    }

    fn send_to_shell(&mut self, line: &str) -> Result<(), DriverError> {
        let vm = &mut self.vm;
        let mut alive = || match vm.exited() {
            None => Ok(()),
            Some(how) => Err(DriverError::new(Kind::Machine, how)),
        };
        let shell = self.shell.as_mut().expect("a booted machine has a shell");
        // QEMU exiting while we write is what we asked for.
        let _ = shell.send_raw(line, &mut alive);
        Ok(())
    }

    /// Waits for QEMU to exit, without causing it.
    pub fn wait_for_shutdown(&mut self, timeout: Duration) -> Result<(), DriverError> {
        if !self.running {
            return Ok(());
        }
        let how = self.poll(timeout, "the machine to power off", |m, _| Ok(m.vm.exited()))?;
        self.say(&format!("QEMU {how}"));
        self.forget_process();
        Ok(())
    }

    /// Stops QEMU at once, like pulling the power cord.
    pub fn crash(&mut self) -> Result<(), DriverError> {
        // Served now: a later failure is not this crash's doing.
        self.interrupted();
        if !self.running {
            return Ok(());
        }
        self.say("crashing (QEMU stopped at once)");
        self.vm.kill();
        self.forget_process();
        Ok(())
    }

    /// Reboots the guest: QEMU exits on the guest's reboot (`-no-reboot`)
    /// and is started again.
    pub fn reboot(&mut self, timeout: Duration) -> Result<(), DriverError> {
        self.wait_for_boot()?;
        self.say("rebooting");
        self.send_to_shell("reboot\n")?;
        self.wait_for_shutdown(timeout)?;
        self.start()
    }

    /// The QEMU-level side, which the driver reaches while a command holds
    /// the machine.
    pub fn monitor(&self) -> Arc<Monitor> {
        self.monitor.clone()
    }

    /// Starts the machine if needed and connects QMP.
    fn qmp(&mut self) -> Result<&Monitor, DriverError> {
        self.start()?;
        if !self.monitor.connected() {
            let socket = self.wait_for_socket(&self.vm.state_dir().join("qmp.sock"))?;
            self.monitor.adopt(Qmp::handshake(socket, &self.name)?);
        }
        Ok(&self.monitor)
    }

    pub fn send_monitor_command(&mut self, command: &str) -> Result<String, DriverError> {
        self.qmp()?.send_monitor_command(command)
    }

    pub fn set_links(&mut self, up: bool, interface: Option<&str>) -> Result<(), DriverError> {
        self.qmp()?.set_links(up, interface)
    }

    pub fn forward_port(&mut self, host_port: u16, guest_port: u16) -> Result<(), DriverError> {
        self.qmp()?.forward_port(host_port, guest_port)
    }

    pub fn screenshot(&mut self, name: &str) -> Result<PathBuf, DriverError> {
        self.qmp()?.screenshot(name)
    }

    /// Copies a host file or directory into the guest so that it is `dest`
    /// there (replacing what was at `dest`). Binary-safe: a tar stream,
    /// base64 in pieces through the backdoor.
    pub fn copy_to_vm(&mut self, source: &Path, dest: &str) -> Result<(), DriverError> {
        let started = Instant::now();
        let name =
            source.file_name().ok_or_else(|| self.err(Kind::Request, format!("cannot copy {}", source.display())))?;
        self.wait_for_boot()?;
        if self.data.is_some() {
            return self.stream_to_vm(source, dest, started);
        }
        let mut archive = Vec::new();
        let packed = super::copy::pack(source, &mut archive).map_err(|e| self.err(Kind::Request, format!("{e:#}")))?;
        self.warn_skipped(&source.display().to_string(), &packed.skipped);
        let tmp = format!("/tmp/vmlab-copy-in.{}", std::process::id());
        let staged = format!("{tmp}.tar");
        self.copy_step(&format!("rm -rf {t} {a}; mkdir -p {t}", t = quote(&tmp), a = quote(&staged)))?;
        if self.shell_is_bash()? {
            for piece in archive.chunks(COPY_IN_RAW_CHUNK) {
                self.append_raw(&staged, piece)?;
            }
        } else {
            for piece in archive.chunks(COPY_IN_CHUNK) {
                let data = super::base64::encode_lines(piece, 76);
                self.copy_step(&format!("base64 -d >> {} <<'VMLAB_DATA'\n{data}VMLAB_DATA", quote(&staged)))?;
            }
        }
        let name = name.to_string_lossy();
        let dest_q = quote(dest);
        self.copy_step(&format!(
            "tar -x -C {t} -f {a} && rm -rf {dest_q} && mkdir -p \"$(dirname {dest_q})\" && mv {item} {dest_q}; s=$?; rm -rf {t} {a}; exit $s",
            t = quote(&tmp),
            a = quote(&staged),
            item = quote(&format!("{tmp}/{name}")),
        ))?;
        self.say(&format!(
            "copied {} to {dest} ({} bytes, {})",
            source.display(),
            packed.bytes,
            secs(started.elapsed())
        ));
        Ok(())
    }

    /// Copies a guest file or directory to `<out>/<target_dir>/<its name>` on
    /// the host (NixOS's `copy_from_vm`); the host path.
    pub fn copy_from_vm(&mut self, source: &str, target_dir: &str) -> Result<PathBuf, DriverError> {
        let started = Instant::now();
        let src = Path::new(source);
        let name = src.file_name().ok_or_else(|| self.err(Kind::Request, format!("cannot copy {source}")))?.to_owned();
        let parent = src.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        self.wait_for_boot()?;
        if self.data.is_some() {
            return self.stream_from_vm(source, parent, &name, target_dir, started);
        }
        let archive = format!("/tmp/vmlab-copy-out.{}.tar", std::process::id());
        let a = quote(&archive);
        let size = self.copy_step(&format!(
            "tar -C {} -cf {a} {} && wc -c < {a}",
            quote(&parent.to_string_lossy()),
            quote(&name.to_string_lossy())
        ));
        let size: u64 = match size {
            Ok(out) => {
                String::from_utf8_lossy(&out).trim().parse().map_err(|_| self.err(Kind::Harness, "bad archive size"))?
            }
            Err(e) => {
                let _ = self.execute(&format!("rm -f {a}"), None);
                return Err(e);
            }
        };
        // The size is the guest's word: reserved up to a bound (untouched
        // pages cost nothing; growing by doubling would copy, and hold twice
        // the archive at its peak), and a piece that comes back empty ends
        // the copy (checked below).
        let mut data = Vec::with_capacity(size.min(RESERVE_AT_MOST) as usize);
        for i in 0.. {
            if data.len() as u64 >= size {
                break;
            }
            let piece = self.copy_step(&format!("dd if={a} bs={COPY_OUT_CHUNK} skip={i} count=1 2>/dev/null"))?;
            if piece.is_empty() {
                break;
            }
            data.extend(piece);
        }
        self.copy_step(&format!("rm -f {a}"))?;
        if data.len() as u64 != size {
            return Err(
                self.err(Kind::Harness, format!("copy of {source} came back with {} of {size} bytes", data.len()))
            );
        }
        self.unpack_copy(&data[..], size, source, target_dir, &name, started)
    }

    /// Unpacks the archive of `size` bytes a copy of `source` brought out
    /// as `<out>/<target_dir>/<name>`, under the copy policy.
    fn unpack_copy(
        &self,
        archive: impl std::io::Read,
        size: u64,
        source: &str,
        target_dir: &str,
        name: &std::ffi::OsStr,
        started: Instant,
    ) -> Result<PathBuf, DriverError> {
        let dir = self.out_dir.join(target_dir);
        let target = dir.join(name);
        let copied = super::copy::unpack(archive, &dir, name).map_err(|e| {
            // A guest sending what may not be unpacked fails the test; the host failing to write is vmlab's.
            let kind = if e.is::<super::copy::Refused>() { Kind::Failed } else { Kind::Harness };
            self.err(kind, format!("copying {source} to {}: {e:#}", target.display()))
        })?;
        self.warn_skipped(source, &copied.skipped);
        self.say(&format!(
            "copied {source} to {} ({size} bytes of tar, {})",
            target.display(),
            secs(started.elapsed())
        ));
        Ok(target)
    }

    /// [`Machine::copy_to_vm`] over the data port: the archive is made in an
    /// unnamed host file (memory stays flat) and streamed into `tar -x` in
    /// the guest.
    fn stream_to_vm(&mut self, source: &Path, dest: &str, started: Instant) -> Result<(), DriverError> {
        let name = source.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let mut archive = self.host_file()?;
        let packed = super::copy::pack(source, &mut archive).map_err(|e| self.err(Kind::Request, format!("{e:#}")))?;
        self.warn_skipped(&source.display().to_string(), &packed.skipped);
        let size = archive.seek(SeekFrom::End(0)).and_then(|size| archive.rewind().map(|()| size));
        let size =
            size.map_err(|e| self.err(Kind::Harness, format!("reading the archive of {}: {e}", source.display())))?;
        let out =
            self.with_shell(|shell, alive| shell.copy_in(&mut archive, size, &name, dest, DEFAULT_TIMEOUT, alive))?;
        if out.status != 0 {
            let why = guest_says(&out);
            return Err(self.err(Kind::Failed, format!("cannot copy {} to {dest}: {why}", source.display())));
        }
        self.say(&format!("copied {} to {dest} ({size} bytes of tar, {})", source.display(), secs(started.elapsed())));
        Ok(())
    }

    /// [`Machine::copy_from_vm`] over the data port: the guest's `tar`
    /// streams into an unnamed host file (memory stays flat), unpacked from
    /// there under the copy policy.
    fn stream_from_vm(
        &mut self,
        source: &str,
        parent: &Path,
        name: &std::ffi::OsStr,
        target_dir: &str,
        started: Instant,
    ) -> Result<PathBuf, DriverError> {
        let mut archive = self.host_file()?;
        let (parent, item) = (parent.to_string_lossy().into_owned(), name.to_string_lossy().into_owned());
        let out =
            self.with_shell(|shell, alive| shell.copy_out(&parent, &item, &mut archive, DEFAULT_TIMEOUT, alive))?;
        if out.status != 0 {
            return Err(self.err(Kind::Failed, format!("cannot copy {source} out of the guest: {}", guest_says(&out))));
        }
        let size = archive.stream_position().unwrap_or_default();
        archive.rewind().map_err(|e| self.err(Kind::Harness, format!("reading the copy of {source}: {e}")))?;
        self.unpack_copy(std::io::BufReader::new(archive), size, source, target_dir, name, started)
    }

    /// An unnamed file in the output directory, for an archive on its way:
    /// on disk, not in memory (a tmpfs /tmp would be memory).
    fn host_file(&self) -> Result<std::fs::File, DriverError> {
        std::fs::create_dir_all(&self.out_dir)
            .and_then(|()| tempfile::tempfile_in(&self.out_dir))
            .map_err(|e| self.err(Kind::Harness, format!("cannot make a file in {}: {e}", self.out_dir.display())))
    }

    /// Says which entries a copy left out (device nodes, FIFOs, sockets).
    fn warn_skipped(&self, source: &str, skipped: &[String]) {
        for entry in skipped {
            self.log.write(Some(&self.name), &format!("warning: copy of {source}: left out {entry}"), Style::Bad);
        }
    }

    /// Whether the backdoor shell is bash, which reads its input no further
    /// than the end of a command line (asked once per boot).
    fn shell_is_bash(&mut self) -> Result<bool, DriverError> {
        if let Some(known) = self.shell_is_bash {
            return Ok(known);
        }
        // Without a timeout, the command runs in a subshell of the backdoor
        // shell, where `$$` is the backdoor shell itself.
        let out = self.execute("readlink /proc/$$/exe", None)?;
        let known = out.status == 0 && String::from_utf8_lossy(&out.stdout).trim_end().ends_with("/bash");
        self.shell_is_bash = Some(known);
        Ok(known)
    }

    /// Appends `data` to a guest file through [`Shell::append_raw`].
    fn append_raw(&mut self, path: &str, data: &[u8]) -> Result<(), DriverError> {
        match self.with_shell(|shell, alive| shell.append_raw(path, data, DEFAULT_TIMEOUT, alive))? {
            0 => Ok(()),
            status => Err(self.err(Kind::Failed, format!("copy failed: writing {path} ended with status {status}"))),
        }
    }

    /// One step of a copy: must succeed; its standard output.
    fn copy_step(&mut self, command: &str) -> Result<Vec<u8>, DriverError> {
        let out = self.execute(command, Some(DEFAULT_TIMEOUT))?;
        if out.status != 0 {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(self.err(Kind::Failed, format!("copy failed (exit code {}){}", out.status, stderr_note(&err))));
        }
        Ok(out.stdout)
    }

    /// Stops QEMU if it runs (end of the test).
    pub fn release(&mut self) {
        if self.running {
            self.vm.kill();
            self.forget_process();
        }
    }
}

/// Pure: why a guest-side step failed, in the guest's words.
fn guest_says(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    match err.trim() {
        "" => format!("exit code {}, and the guest said nothing", out.status),
        said => format!("{said} (exit code {})", out.status),
    }
}

fn stderr_note(stderr: &str) -> String {
    let t = stderr.trim();
    if t.is_empty() {
        String::new()
    } else {
        let tail: Vec<&str> = t.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
        format!("; stderr: {}", tail.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_start_fast_and_settle_at_a_second() {
        let mut d = Duration::ZERO;
        let seq: Vec<u64> = (0..8)
            .map(|_| {
                d = next_delay(d);
                d.as_millis() as u64
            })
            .collect();
        assert_eq!(seq, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn the_boot_silence_limit_grows_with_machines_per_core() {
        // (tcg, machines, cores, seconds)
        let cases = [
            (true, 1, 2, 60),
            (true, 12, 2, 60),
            (true, 40, 2, 200),
            (true, 40, 16, 60),
            (true, 1, 0, 60),
            (false, 1, 2, 20),
            (false, 40, 2, 40),
        ];
        for (tcg, machines, cores, want) in cases {
            assert_eq!(boot_silence_limit(tcg, machines, cores), Duration::from_secs(want), "{tcg} {machines} {cores}");
        }
    }

    #[test]
    fn port_checks_quote_the_address() {
        assert_eq!(
            port_check(80, "localhost"),
            "nc -z localhost 80 2>/dev/null || nc -w 2 localhost 80 -e true 2>/dev/null"
        );
        assert!(port_check(1, "a b").starts_with("nc -z 'a b' 1 "));
    }
}

/// Machine operations against a local busybox "guest" (see `testing`).
#[cfg(test)]
mod local_tests {
    use super::*;
    use crate::driver::testing::{busybox_bin, LocalVm};

    struct Fixture {
        dir: tempfile::TempDir,
        m: Machine,
        qmp_log: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let bin = busybox_bin(dir.path());
        let vm = LocalVm::new(&dir.path().join("state"), &bin);
        let qmp_log = vm.qmp_log.clone();
        let log = Arc::new(Log::new(Box::new(std::io::sink()), false, None));
        let ifs = vec![("eth1".to_string(), 1), ("eth2".to_string(), 2)];
        let m = Machine::new("server", ifs, Box::new(vm), &dir.path().join("out"), log);
        Fixture { dir, m, qmp_log }
    }

    fn cmds(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn commands_boot_the_machine_and_check_their_status() {
        let mut f = fixture();
        assert!(!f.m.is_up());
        assert_eq!(f.m.succeed(&cmds(&["echo a", "echo b"]), None).unwrap(), b"a\nb\n");
        assert!(f.m.is_up());
        let e = f.m.succeed(&cmds(&["echo oops >&2; exit 4"]), None).unwrap_err();
        assert_eq!(e.kind, Kind::Failed);
        assert_eq!(e.message, "machine server: command `echo oops >&2; exit 4` failed (exit code 4); stderr: oops");
        assert_eq!(f.m.fail(&cmds(&["false"]), None).unwrap(), b"");
        assert_eq!(f.m.fail(&cmds(&["true"]), None).unwrap_err().kind, Kind::Failed);
        let out = f.m.execute_logged("echo x; exit 2", None).unwrap();
        assert_eq!((out.status, out.stdout), (2, b"x\n".to_vec()));
    }

    #[test]
    fn waits_poll_until_true_or_time_out() {
        let mut f = fixture();
        f.m.succeed(&cmds(&["(sleep 0.5; touch later) &"]), None).unwrap();
        f.m.wait_for_file("later", Duration::from_secs(30)).unwrap();
        assert_eq!(f.m.wait_until("test -e later && echo yes", true, Duration::from_secs(30)).unwrap(), b"yes\n");
        f.m.wait_until("test -e never", false, Duration::from_secs(30)).unwrap();
        let e = f.m.wait_until("test -e never", true, Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.kind, Kind::Timeout);
        assert!(e.message.contains("timed out after 1.00s waiting for success of `test -e never`"), "{e}");
    }

    #[test]
    fn ports_open_and_close() {
        let mut f = fixture();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        f.m.wait_for_open_port(port, "127.0.0.1", Duration::from_secs(30)).unwrap();
        drop(listener);
        f.m.wait_for_closed_port(port, "127.0.0.1", Duration::from_secs(30)).unwrap();
    }

    #[test]
    fn console_text_is_matched_once_each() {
        let mut f = fixture();
        f.m.start().unwrap();
        let log = f.dir.path().join("state/serial.log");
        std::fs::write(&log, "old line\n").unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut file = std::fs::OpenOptions::new().append(true).open(log).unwrap();
            writeln!(file, "login: ready 42\r\nlogin: ready 43").unwrap();
        });
        use std::io::Write;
        assert_eq!(f.m.wait_for_console_text(r"ready \d+", Duration::from_secs(30)).unwrap(), "ready 42");
        writer.join().unwrap();
        assert_eq!(f.m.wait_for_console_text(r"ready \d+", Duration::from_secs(30)).unwrap(), "ready 43");
        assert_eq!(f.m.wait_for_console_text("ready", Duration::from_secs(1)).unwrap_err().kind, Kind::Timeout);
        assert_eq!(f.m.wait_for_console_text("(", Duration::from_secs(1)).unwrap_err().kind, Kind::Request);
    }

    #[test]
    fn copies_in_and_out_are_exact() {
        let mut f = fixture();
        let src = f.dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        let mut x: u32 = 7;
        let big: Vec<u8> = (0..5 * 1024 * 1024 + 3)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        std::fs::write(src.join("big"), &big).unwrap();
        std::fs::write(src.join("sub/empty"), b"").unwrap();
        let guest = f.dir.path().join("guest/deep/copy");
        f.m.copy_to_vm(&src, &guest.display().to_string()).unwrap();
        assert!(std::fs::read(guest.join("big")).unwrap() == big);
        assert!(guest.join("sub/empty").exists());
        let back = f.m.copy_from_vm(&guest.display().to_string(), "fetched").unwrap();
        assert_eq!(back, f.dir.path().join("out/fetched/copy"));
        assert!(std::fs::read(back.join("big")).unwrap() == big);
        // A single file, into the output directory itself.
        let file = f.m.copy_from_vm(&guest.join("sub/empty").display().to_string(), "").unwrap();
        assert_eq!(file, f.dir.path().join("out/empty"));
        let e = f.m.copy_from_vm("/nonexistent/x", "").unwrap_err();
        assert_eq!(e.kind, Kind::Failed, "{e}");
    }

    #[test]
    fn a_machine_dying_mid_command_is_reported_until_restarted() {
        let mut f = fixture();
        f.m.succeed(&cmds(&["true"]), None).unwrap();
        // `$$`: the backdoor shell (the command runs in its subshell).
        let pid: i32 =
            String::from_utf8(f.m.succeed(&cmds(&["echo $$"]), None).unwrap()).unwrap().trim().parse().unwrap();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let e = f.m.execute("sleep 30", None).unwrap_err();
        killer.join().unwrap();
        assert_eq!(e.kind, Kind::Machine);
        assert!(e.message.starts_with("machine server: "), "{e}");
        let again = f.m.execute("true", None).unwrap_err();
        assert!(again.message.contains("died earlier"), "{again}");
        f.m.start().unwrap();
        assert_eq!(f.m.succeed(&cmds(&["echo back"]), None).unwrap(), b"back\n");
    }

    #[test]
    fn crash_and_shutdown_stop_the_machine_and_commands_restart_it() {
        let mut f = fixture();
        f.m.succeed(&cmds(&["true"]), None).unwrap();
        f.m.crash().unwrap();
        assert!(!f.m.is_up());
        assert_eq!(f.m.succeed(&cmds(&["echo again"]), None).unwrap(), b"again\n");
        // The local "guest" has no poweroff: the shell exits instead, as QEMU would.
        f.m.send_to_shell("exit\n").unwrap();
        f.m.wait_for_shutdown(Duration::from_secs(30)).unwrap();
        assert!(!f.m.is_up());
    }

    #[test]
    fn block_forward_and_monitor_go_through_qmp() {
        let mut f = fixture();
        f.m.set_links(false, None).unwrap();
        f.m.set_links(true, Some("eth2")).unwrap();
        assert_eq!(f.m.set_links(true, Some("eth5")).unwrap_err().kind, Kind::Request);
        f.m.forward_port(8080, 80).unwrap();
        f.m.send_monitor_command("info status").unwrap();
        let log = f.qmp_log.lock().unwrap().clone();
        let sent: Vec<String> = log.iter().skip(1).map(|r| format!("{} {}", r["execute"], r["arguments"])).collect();
        assert_eq!(
            sent,
            [
                r#""set_link" {"name":"vlan1","up":false}"#,
                r#""set_link" {"name":"vlan2","up":false}"#,
                r#""set_link" {"name":"vlan2","up":true}"#,
                r#""human-monitor-command" {"command-line":"hostfwd_add user tcp:127.0.0.1:8080-:80"}"#,
                r#""human-monitor-command" {"command-line":"info status"}"#,
            ]
        );
    }

    #[test]
    fn wait_for_unit_without_systemd_says_so() {
        let mut f = fixture();
        let e = f.m.wait_for_unit("nginx.service", None, Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind, Kind::Failed);
        assert!(e.message.contains("needs systemd"), "{e}");
    }
}
