//! Operations on QEMU itself, over QMP: the monitor, links, forwarded
//! ports, screenshots.

use super::*;

impl DrivenMachine {
    /// The QEMU-level side, which the driver reaches while a command holds
    /// the machine.
    pub fn monitor(&self) -> Arc<Monitor> {
        self.monitor.clone()
    }

    /// Starts the machine if needed and connects QMP.
    fn qmp(&mut self) -> Result<&Monitor, DriverError> {
        self.start()?;
        if !self.monitor.connected() {
            let socket = self.wait_for_socket(&self.vm.state_dir().join(layout::QMP_SOCKET))?;
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
}
