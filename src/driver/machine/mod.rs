//! Machine operations, with the names and semantics of the NixOS test
//! driver's `Machine` (start, execute, succeed, wait_until_succeeds, …).
//! Starting and stopping QEMU is the runtime's job, reached through [`Vm`].

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::log::{Log, Style};
use super::monitor::Monitor;
use super::qmp::Qmp;
use super::snapshot::Restore;
use super::vm::{Killer, Vm};
use super::{DriverError, Kind};
use crate::driver::backdoor::{Alive, Output, Shell};
use crate::layout;
use crate::runtime::process::Backoff;
use crate::runtime::stderr_ending;
use crate::shell::quote;
use crate::sync::lock;

mod commands;
mod copies;
mod data_channel;
#[cfg(test)]
mod local_tests;
mod qemu;
mod snapshots;

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

/// How long QEMU may take to create its sockets after it starts.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

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
        *lock(&self.requested) = what;
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

/// How a machine's poll loops pause: each try is a connect or a command in
/// the guest, so fast at first, then about a second.
fn backoff() -> Backoff {
    Backoff::new(Duration::from_millis(50), Duration::from_secs(1))
}

/// Whether QEMU still runs, as the backdoor checks while it waits: an error
/// naming the machine once QEMU has ended.
fn qemu_alive(vm: &mut dyn Vm, name: &str) -> Result<(), DriverError> {
    match vm.exited() {
        None => Ok(()),
        Some(how) => Err(DriverError::new(Kind::Machine, format!("machine {name}: QEMU {how}"))),
    }
}

/// A machine as a test drives it: its QEMU (a [`Vm`]), the backdoor shell
/// and data port, and QMP.
pub struct DrivenMachine {
    pub name: String,
    vm: Box<dyn Vm>,
    running: bool,
    /// Started at least once: a machine that is not running now may have run.
    ever_started: bool,
    shell: Option<Shell>,
    /// The shell on the data port, once started for this boot: commands and
    /// copies go there rather than to `shell`.
    data: Option<data_channel::DataShell>,
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

impl DrivenMachine {
    pub fn new(name: &str, interfaces: Vec<(String, u8)>, vm: Box<dyn Vm>, out_dir: &Path, log: Arc<Log>) -> Self {
        let interrupt = Interrupt { kill: vm.killer(), requested: Default::default() };
        let monitor =
            Arc::new(Monitor::new(name, interfaces, vm.state_dir().join(layout::QMP_SOCKET), out_dir, log.clone()));
        DrivenMachine {
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
        lock(&self.interrupt.requested).take()
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
        // Taken only once QEMU runs: a start that fails before must not
        // leave the next one to boot cold.
        let spawned = if self.restore.is_some() { self.vm.spawn_incoming() } else { self.vm.spawn() };
        spawned.map_err(|e| self.err(Kind::Harness, format!("cannot start: {e:#}")))?;
        self.running = true;
        self.ever_started = true;
        // At once: QEMU drops what the guest writes to the backdoor while no
        // client is connected, and the banner is written once.
        let shell = self.wait_for_socket(&self.vm.state_dir().join(layout::SHELL_SOCKET))?;
        self.shell =
            Some(Shell::new(shell, &self.name).map_err(|e| self.err(Kind::Harness, format!("backdoor socket: {e}")))?);
        match self.restore.take() {
            // Settled here, so that start_all() restores machines in parallel.
            Some(restore) => self.resume(restore).and_then(|()| self.settle_restored()),
            None => Ok(()),
        }
    }

    /// Connects to a socket QEMU listens on, as soon as QEMU has made it.
    fn wait_for_socket(&mut self, path: &Path) -> Result<std::os::unix::net::UnixStream, DriverError> {
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        let mut backoff = backoff();
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
            std::thread::sleep(backoff.pause());
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

    /// [`DrivenMachine::wait_for_boot`] with a chosen limit (`vmlab up` waits as
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
            let mut alive = || match qemu_alive(&mut **vm, name) {
                // Before the backdoor is up, QEMU's end is the harness's problem.
                Err(e) => Err(DriverError::new(Kind::Harness, e.message)),
                Ok(())
                    if silence.is_some_and(|s| started.elapsed() >= s)
                        && std::fs::metadata(&serial).map_or(true, |m| m.len() == 0) =>
                {
                    Err(DriverError::new(Kind::Machine, SILENT))
                }
                Ok(()) => Ok(()),
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
        let (vm, name) = (&mut self.vm, &self.name);
        let mut alive = || qemu_alive(&mut **vm, name);
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

    /// Stops QEMU if it runs (end of the test).
    pub fn release(&mut self) {
        if self.running {
            self.vm.kill();
            self.forget_process();
        }
    }
}

/// A failed command's standard error, to end its error message.
fn stderr_note(stderr: &str) -> String {
    stderr_ending(stderr, NOTE_LINES).unwrap_or_default()
}

/// The most lines of a failed command's standard error its error message quotes.
const NOTE_LINES: usize = 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_start_fast_and_settle_at_a_second() {
        let mut b = backoff();
        let seq: Vec<u64> = (0..8).map(|_| b.pause().as_millis() as u64).collect();
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
}
