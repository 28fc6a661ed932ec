//! A default guest booted by QEMU directly, without vmlab's runtime or
//! driver, with the options a run script gives it, and a minimal client of
//! its backdoor: for tests of the guest itself (tests/it/guest.rs).

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vmlab::layout::{self, BANNER};
use vmlab::plan::qemu;

/// Generous: TCG on a loaded two-core machine, possibly two boots at once.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);
const CONFIG: &str = "\
# vmlab guest configuration
hostname server
interface eth0 52:54:00:12:00:00 10.0.2.15/24
interface eth1 52:54:00:12:01:02 192.168.1.2/24 2001:db8:1::2/64
interface eth2 52:54:00:12:02:02 192.168.2.2/24 2001:db8:2::2/64
host 192.168.1.1 client
host 2001:db8:1::1 client
host 192.168.1.2 server
host 2001:db8:1::2 server
unknown-keyword ignored by this guest
";

/// A QEMU process in its own process group, killed with the group and reaped on drop.
pub(crate) struct Qemu {
    child: Child,
    pub(crate) serial_log: PathBuf,
}

impl Qemu {
    /// Boots `guest` (kernel + initrd) as machine "server" of a network
    /// with "client", with the QEMU options its run script would give it
    /// (plan/qemu.rs) and [`CONFIG`] as its guest configuration. Its vlan
    /// NICs are on private hubs (as the script has them without switches)
    /// and in reverse order on the PCI bus, vlan 2's first, so the kernel's
    /// names are the reverse of the configuration's and init must swap them.
    pub(crate) fn boot(guest: &Path, work: &Path) -> Qemu {
        let state = work.join("state");
        fs::create_dir_all(&state).unwrap();
        let config = work.join(layout::config_file("server"));
        fs::create_dir_all(config.parent().unwrap()).unwrap();
        fs::write(&config, CONFIG).unwrap();
        let accel = match std::env::var("VMLAB_ACCEL") {
            Ok(accel) if accel != "auto" => accel,
            _ => "tcg".to_string(),
        };
        let (kernel, initrd) = (guest.join("kernel"), guest.join("initrd"));
        let node = json!({ "kernel": kernel, "initrd": initrd, "memory": 192 });
        let mut server = node.clone();
        server["vlans"] = json!([1, 2]);
        let spec = json!({ "nodes": { "client": node, "server": server } });
        let spec = vmlab::spec::parse(&spec.to_string(), work).unwrap();
        let plan = vmlab::plan::plan(&spec, "qemu-system-x86_64".into(), "vde_switch".into());
        let mut machine = plan.machine("server").unwrap().clone();
        machine.interfaces.reverse();
        let opts = [qemu::direct_boot_opts(&machine, &kernel, Some(&initrd), "", &[]), qemu::own_channels(true)];
        let value = |var: &str| match var {
            qemu::OUT_VAR => work.display().to_string(),
            qemu::STATE_VAR => state.display().to_string(),
            qemu::ACCEL_VAR => accel.clone(),
            qemu::KERNEL_PARAMS_VAR => String::new(),
            _ => match (1..=2).find(|&v| qemu::netdev_var(v) == var) {
                Some(vlan) => qemu::hub_netdev(vlan),
                None => panic!("the run script's ${var} is not known here"),
            },
        };
        let args: Vec<String> = opts.concat().iter().flatten().map(|word| word.expand(value)).collect();
        let serial_log = state.join(layout::serial_log_name("server"));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&serial_log).unwrap())
            .stderr(fs::File::create(state.join("qemu.log")).unwrap())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64: {e}"));
        Qemu { child, serial_log }
    }

    /// Panics (with the serial console's tail) if QEMU has exited.
    pub(crate) fn assert_alive(&mut self, waiting_for: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("QEMU exited ({status}) while waiting for {waiting_for}; serial console:\n{}", self.serial_tail());
        }
    }

    pub(crate) fn serial_tail(&self) -> String {
        let log = fs::read_to_string(&self.serial_log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits for QEMU to exit on its own (the guest powered off).
    pub(crate) fn wait_for_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + COMMAND_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU still running after poweroff; serial console:\n{}",
                self.serial_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: plain kill(2) on the process group QEMU leads.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// The guest's backdoor: the virtconsole's unix socket.
pub(crate) struct Backdoor {
    stream: UnixStream,
    /// Received but not yet consumed.
    pending: Vec<u8>,
}

impl Backdoor {
    /// Connects as soon as QEMU has created the socket.
    pub(crate) fn connect(qemu: &mut Qemu, socket: &Path) -> Backdoor {
        let deadline = Instant::now() + BOOT_DEADLINE;
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                    return Backdoor { stream, pending: Vec::new() };
                }
                Err(e) => {
                    qemu.assert_alive("the backdoor socket");
                    assert!(Instant::now() < deadline, "cannot connect to {socket:?}: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Reads until `marker`; returns what came before it and keeps the rest.
    pub(crate) fn read_until(&mut self, qemu: &mut Qemu, marker: &str, deadline: Duration) -> String {
        let deadline = Instant::now() + deadline;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(at) = find(&self.pending, marker.as_bytes()) {
                let before = String::from_utf8_lossy(&self.pending[..at]).into_owned();
                self.pending.drain(..at + marker.len());
                return before;
            }
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("backdoor socket closed while waiting for {marker:?}"),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                // Interrupted: seen under load on the full suite; a timed read
                // can return EINTR, which is no answer yet either.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                    qemu.assert_alive(marker);
                    assert!(
                        Instant::now() < deadline,
                        "no {marker:?} from the guest; got {:?}; serial console:\n{}",
                        String::from_utf8_lossy(&self.pending),
                        qemu.serial_tail()
                    );
                }
                Err(e) => panic!("reading the backdoor: {e}"),
            }
        }
    }

    pub(crate) fn wait_for_banner(&mut self, qemu: &mut Qemu) {
        let before = self.read_until(qemu, &format!("{BANNER}\n"), BOOT_DEADLINE);
        assert_eq!(before, "", "nothing but the banner on hvc0");
    }

    pub(crate) fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).unwrap();
    }

    /// Runs a shell command; returns its standard output and exit status.
    /// The end marker is split in the command so that an echo of the input
    /// could not be mistaken for it.
    pub(crate) fn run(&mut self, qemu: &mut Qemu, command: &str) -> (String, i32) {
        self.send(&format!("{command}\necho \"__END\"\"__ $?\"\n"));
        let output = self.read_until(qemu, "__END__ ", COMMAND_DEADLINE);
        let status = self.read_until(qemu, "\n", COMMAND_DEADLINE);
        (output, status.parse().unwrap())
    }

    /// Runs a command that must succeed; returns its standard output.
    pub(crate) fn succeed(&mut self, qemu: &mut Qemu, command: &str) -> String {
        let (output, status) = self.run(qemu, command);
        assert_eq!(status, 0, "`{command}` failed; output: {output}");
        output
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A booted guest and its backdoor, ready for commands.
pub(crate) fn boot(work: &Path, guest: &Path) -> (Qemu, Backdoor) {
    let mut qemu = Qemu::boot(guest, work);
    let mut backdoor = Backdoor::connect(&mut qemu, &work.join("state").join(layout::SHELL_SOCKET));
    backdoor.wait_for_banner(&mut qemu);
    (qemu, backdoor)
}
