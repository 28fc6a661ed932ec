//! A machine saved into a snapshot and restored from one (docs/snapshots.md);
//! the QMP side is src/driver/snapshot.rs.

use std::path::Path;
use std::time::{Duration, Instant};

use super::copies::guest_says;
use super::{secs, DrivenMachine, DATA_SHELL_TIMEOUT, SOCKET_TIMEOUT};
use crate::driver::snapshot::{self, Restore};
use crate::driver::{DriverError, Kind};
use crate::runtime::manifest::Compression;

/// How long QEMU may take to answer a QMP command during a restore.
const QMP_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

impl DrivenMachine {
    /// The next start restores `restore` instead of booting.
    pub fn restore_from(&mut self, restore: Restore) {
        self.restore = Some(restore);
    }

    /// Keeps commands on the backdoor console, off the data port.
    pub fn without_data_port(&mut self) {
        self.use_data_port = false;
    }

    /// Loads the saved state into the QEMU just started (with `-incoming
    /// defer`); on failure QEMU is stopped and the restore stays pending, so
    /// that a later start fails the same way rather than boot cold unasked.
    pub(super) fn resume(&mut self, restore: Restore) -> Result<(), DriverError> {
        let started = Instant::now();
        let connected = self.connect_qmp();
        let pid = connected.and_then(|()| self.vm.pid().ok_or_else(|| "QEMU's process is unknown".to_owned()));
        let argv = pid.and_then(|pid| {
            snapshot::qemu_argv(pid, &restore.session).map_err(|e| format!("cannot read its command line: {e}"))
        });
        match argv.and_then(|argv| snapshot::resume(&self.monitor, &restore, &argv)) {
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

    /// Connects QMP to the QEMU just started. It makes its QMP socket just
    /// after the backdoor's, so the socket is looked for every few
    /// milliseconds, not with the backoff of a boot: a restore takes a fraction of a second.
    fn connect_qmp(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        loop {
            let Err(e) = self.monitor.connect(QMP_ANSWER_TIMEOUT) else { return Ok(()) };
            if let Some(how) = self.vm.exited() {
                return Err(format!("QEMU {how}"));
            }
            if Instant::now() >= deadline {
                return Err(e.message);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A restored guest, before anything else runs there: its backdoor shell
    /// must answer (no banner comes after a restore), then its clock and
    /// random pool are put right, then the data port gets a new shell (the
    /// host end of its socket is new).
    pub(super) fn settle_restored(&mut self) -> Result<(), DriverError> {
        let started = Instant::now();
        self.booted = true;
        let seed = snapshot::host_seed()
            .map_err(|e| self.err(Kind::Harness, format!("cannot read the host's random numbers: {e}")))?;
        let command = snapshot::after_restore_command(std::time::SystemTime::now(), &seed);
        let out = self.execute(&command, Some(DATA_SHELL_TIMEOUT))?;
        if out.status != 0 {
            let why = guest_says(&out);
            let what = format!("after the restore, cannot set its clock or seed its random numbers: {why}");
            return Err(self.err(Kind::Harness, what));
        }
        self.say(&format!("backdoor shell answers; clock set, random pool seeded ({})", secs(started.elapsed())));
        self.open_data_channel()
    }

    /// Saves the booted machine's state into `file`, then stops it: QEMU's
    /// command line (session directory marked) and version, for the key.
    pub fn save_state(
        &mut self,
        file: &Path,
        compression: Compression,
        session: &str,
    ) -> Result<(Vec<String>, String), DriverError> {
        self.wait_for_boot()?;
        let refuse = |m: &Self, why: String| m.err(Kind::Harness, format!("cannot be snapshotted: {why}"));
        snapshot::unsaved_files(&self.vm.state_dir()).map_err(|why| refuse(self, why))?;
        let pid = self.vm.pid().ok_or_else(|| refuse(self, "QEMU's process is unknown".into()))?;
        let argv = snapshot::qemu_argv(pid, session)
            .map_err(|e| refuse(self, format!("cannot read its command line: {e}")))?;
        let version = snapshot::qemu_version(&self.monitor)?;
        let started = Instant::now();
        snapshot::save(&self.monitor, file, compression)
            .map_err(|why| refuse(self, format!("QEMU cannot save it: {why}")))?;
        self.say(&format!("saved to {} ({})", file.display(), secs(started.elapsed())));
        self.release();
        Ok((argv, version))
    }
}
