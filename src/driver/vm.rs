//! The seam between the driver and whoever runs a machine's QEMU: the
//! driver owns the backdoor and QMP connections, the runtime (or a stand-in
//! in the tests) owns the process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::runtime::VmProcess;

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

/// How the test driver runs a machine: QEMU is the runtime's, the backdoor
/// and QMP connections are the driver's.
impl Vm for Arc<VmProcess> {
    fn spawn(&mut self) -> Result<()> {
        self.start()
    }

    fn exited(&mut self) -> Option<String> {
        self.wait_exit(Duration::ZERO).map(|exit| exit.to_string())
    }

    fn kill(&mut self) {
        VmProcess::kill(self);
    }

    fn killer(&self) -> Killer {
        let machine = self.clone();
        Arc::new(move || {
            VmProcess::kill(&machine);
        })
    }

    fn state_dir(&self) -> PathBuf {
        VmProcess::state_dir(self)
    }

    fn serial_log(&self) -> PathBuf {
        VmProcess::serial_log(self)
    }

    fn retired(&self) -> bool {
        self.is_retired()
    }

    fn spawn_incoming(&mut self) -> Result<()> {
        self.start_incoming()
    }

    fn pid(&self) -> Option<u32> {
        VmProcess::pid(self)
    }
}
