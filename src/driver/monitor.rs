//! A machine's QEMU-level side: QMP, shared by the machine and the driver.
//! Links, port forwards, monitor commands and screenshots need no backdoor,
//! so they must not wait for a command that holds the machine: the driver
//! reaches them here, under a lock of their own, while one runs.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::json;

use super::log::{Log, Style};
use super::qmp::Qmp;
use super::{DriverError, Kind};
use crate::sync::lock;

/// QMP ids for a machine's vlan NICs (`-netdev vde,id=vlan<v>`).
pub fn link_names(interfaces: &[(String, u8)], only: Option<&str>) -> Result<Vec<String>, String> {
    let chosen: Vec<String> = interfaces
        .iter()
        .filter(|(name, _)| only.map_or(true, |o| o == name))
        .map(|(_, vlan)| format!("vlan{vlan}"))
        .collect();
    match (only, chosen.is_empty()) {
        (Some(o), true) => {
            let names: Vec<&str> = interfaces.iter().map(|(n, _)| n.as_str()).collect();
            Err(format!(
                "no interface {o} (it has: {})",
                if names.is_empty() { "none".into() } else { names.join(", ") }
            ))
        }
        _ => Ok(chosen),
    }
}

/// Where `screenshot(name)` writes, as NixOS: `.png` added to a name with no
/// extension, relative to the output directory unless it has a `/`.
pub fn screenshot_path(out_dir: &Path, name: &str) -> PathBuf {
    let mut file = name.to_string();
    if !file.contains('.') {
        file += ".png";
    }
    if file.contains('/') {
        PathBuf::from(file)
    } else {
        out_dir.join(file)
    }
}

/// How long QEMU may take to answer a command sent by [`Monitor::execute`].
const QMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub struct Monitor {
    name: String,
    /// (`eth<k>`, vlan), in order.
    interfaces: Vec<(String, u8)>,
    out_dir: PathBuf,
    log: Arc<Log>,
    /// QEMU's QMP socket.
    socket: PathBuf,
    /// Made on first use (QEMU serves one QMP client, and most tests never
    /// need it); dropped when QEMU goes.
    qmp: Mutex<Option<Qmp>>,
}

impl Monitor {
    pub fn new(name: &str, interfaces: Vec<(String, u8)>, socket: PathBuf, out_dir: &Path, log: Arc<Log>) -> Self {
        Monitor {
            name: name.to_string(),
            interfaces,
            out_dir: out_dir.to_path_buf(),
            log,
            socket,
            qmp: Mutex::new(None),
        }
    }

    fn err(&self, kind: Kind, msg: impl std::fmt::Display) -> DriverError {
        DriverError::new(kind, format!("machine {}: {msg}", self.name))
    }

    fn say(&self, msg: &str) {
        self.log.write(Some(&self.name), msg, Style::Plain);
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Qmp>> {
        lock(&self.qmp)
    }

    /// Whether a QMP connection is made (QEMU runs and was reached).
    pub fn connected(&self) -> bool {
        self.slot().is_some()
    }

    /// Takes over a connection to QEMU's QMP socket.
    pub fn adopt(&self, qmp: Qmp) {
        *self.slot() = Some(qmp);
    }

    /// QEMU is gone: the next operation connects again.
    pub fn reset(&self) {
        *self.slot() = None;
    }

    /// Connects unless connected, at once (QEMU must be running), with
    /// `timeout` for each answer.
    pub fn connect(&self, timeout: std::time::Duration) -> Result<(), DriverError> {
        let mut slot = self.slot();
        if slot.is_none() {
            let stream = UnixStream::connect(&self.socket)
                .map_err(|e| self.err(Kind::Machine, format!("QMP: {}: {e}", self.socket.display())))?;
            *slot = Some(Qmp::handshake_within(stream, &self.name, timeout)?);
        }
        Ok(())
    }

    /// Runs `f` on the connection; a connection that broke is dropped.
    fn with<T>(&self, f: impl FnOnce(&mut Qmp) -> Result<T, DriverError>) -> Result<T, DriverError> {
        let mut slot = self.slot();
        let qmp = slot.as_mut().ok_or_else(|| self.err(Kind::Machine, "QEMU is not running"))?;
        let result = f(qmp);
        if result.as_ref().is_err_and(|e| e.kind == Kind::Machine) {
            *slot = None;
        }
        result
    }

    /// Runs a QMP command, connecting first if need be; its `return` value.
    pub fn execute(&self, command: &str, arguments: serde_json::Value) -> Result<serde_json::Value, DriverError> {
        self.connect(QMP_TIMEOUT)?;
        self.with(|q| q.execute(command, arguments))
    }

    /// Runs a QEMU monitor (HMP) command; its output.
    pub fn send_monitor_command(&self, command: &str) -> Result<String, DriverError> {
        let out = self.with(|q| q.human(command))?;
        self.say(&format!("monitor: {command}"));
        Ok(out)
    }

    /// Presses the ACPI power button: a guest that listens (systemd on
    /// NixOS, the default guest) powers off.
    pub fn power_button(&self) -> Result<(), DriverError> {
        self.with(|q| q.execute("system_powerdown", json!({})))?;
        self.say("shutting down (ACPI power button: the machine is busy)");
        Ok(())
    }

    /// The guest's run state and the first lines of its CPU registers.
    pub fn state(&self) -> Result<(String, String), DriverError> {
        self.with(|q| {
            let status = q.execute("query-status", json!({}))?["status"].as_str().unwrap_or("unknown").to_string();
            let registers = q.human("info registers")?;
            // The instruction pointer and flags first: the rest of the dump is long.
            let registers: Vec<&str> = registers.lines().take(3).map(str::trim).collect();
            Ok((status, registers.join(" ")))
        })
    }

    /// Takes the machine's vlan links down (`up` false) or up; all of them or one interface.
    pub fn set_links(&self, up: bool, interface: Option<&str>) -> Result<(), DriverError> {
        let names = link_names(&self.interfaces, interface).map_err(|e| self.err(Kind::Request, e))?;
        for name in &names {
            self.with(|q| q.execute("set_link", json!({ "name": name, "up": up })))?;
        }
        let what = if up { "unblocked" } else { "blocked" };
        self.say(&format!("{what} {}", interface.unwrap_or("all vlan interfaces")));
        Ok(())
    }

    /// Forwards TCP `127.0.0.1:host_port` on the host to `guest_port` in the guest.
    pub fn forward_port(&self, host_port: u16, guest_port: u16) -> Result<(), DriverError> {
        let rule = format!("tcp:127.0.0.1:{host_port}-:{guest_port}");
        // vmlab names the user netdev `user`; nixpkgs start scripts `user.0`.
        let mut out = String::new();
        for netdev in ["user", "user.0"] {
            out = self.with(|q| q.human(&format!("hostfwd_add {netdev} {rule}")))?;
            if out.trim().is_empty() {
                self.say(&format!("forwarding 127.0.0.1:{host_port} to port {guest_port}"));
                return Ok(());
            }
        }
        Err(self.err(Kind::Failed, format!("cannot forward port {host_port}: {}", out.trim())))
    }

    /// Saves the display as PNG; the path written.
    pub fn screenshot(&self, name: &str) -> Result<PathBuf, DriverError> {
        let path = screenshot_path(&self.out_dir, name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| self.err(Kind::Harness, format!("creating {}: {e}", dir.display())))?;
        }
        // QEMU resolves a relative name against its own working directory.
        let absolute = std::env::current_dir().map(|d| d.join(&path)).unwrap_or(path.clone());
        self.with(|q| q.execute("screendump", json!({ "filename": absolute, "format": "png" })))?;
        self.say(&format!("screenshot {}", path.display()));
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn screenshot_paths_follow_nixos() {
        let out = Path::new("/out");
        for (name, path) in
            [("shot", "/out/shot.png"), ("shot.ppm", "/out/shot.ppm"), ("/tmp/x/shot", "/tmp/x/shot.png")]
        {
            assert_eq!(screenshot_path(out, name), PathBuf::from(path));
        }
    }

    #[test]
    fn links_are_the_vlan_netdevs() {
        let ifs = vec![("eth1".to_string(), 1), ("eth2".to_string(), 7)];
        assert_eq!(link_names(&ifs, None).unwrap(), ["vlan1", "vlan7"]);
        assert_eq!(link_names(&ifs, Some("eth2")).unwrap(), ["vlan7"]);
        assert_eq!(link_names(&ifs, Some("eth9")).unwrap_err(), "no interface eth9 (it has: eth1, eth2)");
        assert_eq!(link_names(&[], Some("eth1")).unwrap_err(), "no interface eth1 (it has: none)");
        assert!(link_names(&[], None).unwrap().is_empty());
    }
}
