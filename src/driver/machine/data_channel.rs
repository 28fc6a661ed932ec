//! The data port: a second shell on a virtio-serial port, faster and
//! lossless, that commands and copies move to when the guest has it.

use super::{qemu_alive, DrivenMachine, DATA_SHELL_TIMEOUT};
use crate::driver::backdoor::{data_shell_command, stop_command, Alive, Shell, Signal};
use crate::driver::DriverError;
use crate::layout;
use crate::plan::qemu::DATA_PORT_NAME;

/// Where a Linux guest lists its virtio-serial ports with their names.
const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// The shell on the data port, and its PID in the guest, by which the
/// backdoor shell stops a command that runs past its timeout.
pub(super) struct DataShell {
    pub shell: Shell,
    pub pid: u32,
}

/// Sends `signal` to the command the data port's shell `pid` runs, and all
/// it started, from the backdoor shell (idle while the data port carries
/// the commands).
pub(super) fn stop(backdoor: &mut Shell, pid: u32, signal: Signal, alive: Alive) -> Result<(), DriverError> {
    let out = backdoor.run(&stop_command(pid, signal), Some(DATA_SHELL_TIMEOUT), alive, None)?;
    if out.status == 0 {
        return Ok(());
    }
    Err(DriverError::harness(format!(
        "cannot stop the command at its timeout (exit code {}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

impl DrivenMachine {
    /// Moves commands and copies to a shell on the data port when the run
    /// script gave the machine one (`data.sock`) and the guest has it, and
    /// says which channel the machine uses and why. Anything that keeps the
    /// data port from working leaves the machine on the backdoor console;
    /// only the machine dying is an error.
    pub(super) fn open_data_channel(&mut self) -> Result<(), DriverError> {
        if !self.use_data_port {
            return Ok(());
        }
        let channel = self.choose_channel()?;
        self.say(&format!("commands and copies go over {channel}"));
        Ok(())
    }

    /// Starts the data port's shell and keeps it when it answers; the
    /// channel that commands go over, and why when it is the console. A data
    /// port that cannot be had is not an error: the console still works.
    fn choose_channel(&mut self) -> Result<String, DriverError> {
        let console = |why: String| Ok(format!("the backdoor console hvc0: {why}"));
        let socket = self.vm.state_dir().join(layout::DATA_SOCKET);
        // Connected before the guest's shell opens the port: without a host
        // end, the shell would read end of file and exit.
        let stream = match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(s) => s,
            Err(e) => return console(format!("the run script gives it no data port ({}: {e})", socket.display())),
        };
        let mut shell = match Shell::data_port(stream, &self.name) {
            Ok(s) => s,
            Err(e) => return console(format!("{}: {e}", socket.display())),
        };
        let started = self.execute(&data_shell_command(VIRTIO_PORTS, DATA_PORT_NAME), Some(DATA_SHELL_TIMEOUT))?;
        if started.status != 0 {
            let why = String::from_utf8_lossy(&started.stderr).trim().to_string();
            return console(format!("the guest cannot start a shell on it ({why}, exit code {})", started.status));
        }
        let printed = String::from_utf8_lossy(&started.stdout).trim().to_string();
        let Some((device, pid)) = printed.rsplit_once(' ').and_then(|(d, p)| Some((d.to_string(), p.parse().ok()?)))
        else {
            return console(format!("the guest started a shell on it but said {printed:?}, not its device and PID"));
        };
        let (vm, name) = (&mut self.vm, &self.name);
        let mut alive = || qemu_alive(&mut **vm, name);
        match shell.run("true", Some(DATA_SHELL_TIMEOUT), &mut alive, None) {
            Ok(out) if out.status == 0 => {
                self.data = Some(DataShell { shell, pid });
                Ok(format!("the data port {device} ({DATA_PORT_NAME})"))
            }
            Ok(out) => console(format!("the shell on {device} answers with exit code {}", out.status)),
            Err(e) if vm.exited().is_some() => Err(self.mark_dead(e)),
            Err(e) => console(format!("the shell on {device} does not answer ({})", e.message)),
        }
    }
}
