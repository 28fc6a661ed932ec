//! Every name vmlab gives a file on disk, and the backdoor banner: defined
//! here once, and used by emit, runtime, driver and the tests, so that what
//! one writes the others find (the tables in docs/design.md). Pure.

use std::path::{Path, PathBuf};

/// What the guest prints on its virtio console (hvc0) once a root shell reads
/// from it: the NixOS test-instrumentation contract, kept by vmlab's guest.
pub const BANNER: &str = "Spawning backdoor root shell...";

// The output directory of `vmlab build`.

/// The plan (`vmlab plan` prints the same bytes).
pub const PLAN_FILE: &str = "plan.json";
/// The network's hosts file.
pub const HOSTS_FILE: &str = "hosts";
/// nixpkgs' test driver's configuration for this network (`nixos-test-driver
/// -c FILE`, docs/nix.md).
pub const DRIVER_CONFIG: &str = "nixos-test-driver.json";
/// The run scripts' directory.
pub const BIN_DIR: &str = "bin";
/// `exec vmlab up` on the output directory.
pub const RUN_VMS: &str = "bin/run-vms";

/// A machine's run script's file name (`run-<name>-vm`, as nixpkgs names it).
pub fn run_script_name(machine: &str) -> String {
    format!("run-{machine}-vm")
}

/// A machine's run script, relative to the output directory.
pub fn run_script(machine: &str) -> String {
    format!("{BIN_DIR}/{}", run_script_name(machine))
}

/// A machine's guest configuration, relative to the output directory.
pub fn config_file(machine: &str) -> String {
    format!("config/{machine}.conf")
}

// A machine's state directory (`VMLAB_STATE_DIR`), where QEMU listens.

/// The backdoor root shell (virtconsole).
pub const SHELL_SOCKET: &str = "shell.sock";
/// The data channel (a named virtio-serial port).
pub const DATA_SOCKET: &str = "data.sock";
/// QMP.
pub const QMP_SOCKET: &str = "qmp.sock";

// A snapshot directory (`vmlab snapshot`, docs/snapshots.md).

/// What the saved states depend on, and which file holds each.
pub const SNAPSHOT_MANIFEST: &str = "manifest.json";

/// A machine's saved state, uncompressed (`.zst` added when compressed).
pub fn snapshot_state(machine: &str) -> String {
    format!("{machine}.state")
}

// The session directory of `vmlab up` and `vmlab test`.

/// Where a network given as a spec is built.
pub const BUILD_DIR: &str = "build";
/// `vmlab test`: the Python client, written out for the script.
pub const PYTHON_DIR: &str = "python";

/// Paths inside a session directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDir {
    pub root: PathBuf,
}

impl SessionDir {
    pub fn new(root: &Path) -> SessionDir {
        SessionDir { root: root.to_owned() }
    }

    /// The vde_switch socket directory of a vlan (`QEMU_VDE_SOCKET_<v>`).
    pub fn vlan_dir(&self, vlan: u8) -> PathBuf {
        self.root.join(format!("vlan{vlan}"))
    }

    /// The switch's control socket, which accepts connections once it is ready.
    pub fn vlan_control_socket(&self, vlan: u8) -> PathBuf {
        self.vlan_dir(vlan).join("ctl")
    }

    /// vde_switch's standard error.
    pub fn switch_log(&self, vlan: u8) -> PathBuf {
        self.root.join(format!("vlan{vlan}.log"))
    }

    /// The machine's `VMLAB_STATE_DIR`.
    pub fn state_dir(&self, machine: &str) -> PathBuf {
        self.root.join(machine)
    }

    pub fn shell_socket(&self, machine: &str) -> PathBuf {
        self.state_dir(machine).join(SHELL_SOCKET)
    }

    pub fn qmp_socket(&self, machine: &str) -> PathBuf {
        self.state_dir(machine).join(QMP_SOCKET)
    }

    /// The serial console, appended to across restarts.
    pub fn serial_log(&self, machine: &str) -> PathBuf {
        self.root.join(serial_log_name(machine))
    }

    /// QEMU's standard error, appended to across restarts.
    pub fn qemu_log(&self, machine: &str) -> PathBuf {
        self.root.join(format!("{machine}.qemu.log"))
    }

    /// The driver's control socket (docs/protocol.md).
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    pub fn build_dir(&self) -> PathBuf {
        self.root.join(BUILD_DIR)
    }

    pub fn python_dir(&self) -> PathBuf {
        self.root.join(PYTHON_DIR)
    }
}

/// A machine's serial console log's file name: in the session directory, and
/// in `vmlab test`'s output directory.
pub fn serial_log_name(machine: &str) -> String {
    format!("{machine}.serial.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files vmlab does not generate that must spell the banner and the
    /// socket names as they are here: the guests, the stand-in QEMU, the
    /// harnesses and benchmarks that reach a machine without vmlab's code.
    #[test]
    fn every_copy_of_a_name_is_spelled_as_here() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cases: [(&str, &[&str]); 6] = [
            ("src/guest/init.sh", &[BANNER]),
            ("nix/guest-module.nix", &[BANNER]),
            ("tests/fixtures/runtime/fake-qemu", &[BANNER]),
            ("tests/fixtures/nixdriver/harness.py", &[BANNER]),
            ("bench/boot.py", &[BANNER, SHELL_SOCKET]),
            ("bench/driver.py", &[BANNER, SHELL_SOCKET]),
        ];
        for (file, names) in cases {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            for name in names {
                assert!(text.contains(name), "{file} does not spell {name:?}");
            }
        }
    }

    #[test]
    fn session_paths() {
        let s = SessionDir::new(Path::new("/s"));
        let paths = [
            s.vlan_dir(1),
            s.vlan_control_socket(1),
            s.switch_log(1),
            s.state_dir("server"),
            s.shell_socket("server"),
            s.qmp_socket("server"),
            s.serial_log("server"),
            s.qemu_log("server"),
            s.control_socket(),
            s.build_dir(),
            s.python_dir(),
        ];
        let expected = [
            "/s/vlan1",
            "/s/vlan1/ctl",
            "/s/vlan1.log",
            "/s/server",
            "/s/server/shell.sock",
            "/s/server/qmp.sock",
            "/s/server.serial.log",
            "/s/server.qemu.log",
            "/s/control.sock",
            "/s/build",
            "/s/python",
        ];
        assert_eq!(paths.map(|p| p.display().to_string()), expected);
        assert_eq!((run_script("a"), config_file("a")), ("bin/run-a-vm".into(), "config/a.conf".into()));
    }
}
