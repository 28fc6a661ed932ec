//! `vmlab up` on networks of stand-in machines (tests/fixtures/runtime/fake-qemu
//! behind real run scripts and real vde_switches): signals, SIGKILL, a taken
//! port, a machine that fails to start.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{fixtures, processes_mentioning, run, vmlab};

/// Only a hang reaches this: a healthy run takes seconds on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(120);

/// Builds network "fake": `a` on vlan 1 forwarding host `port` to 80, `b` on vlans 1 and 2.
fn build_fake(tmp: &Path, port: u16) -> PathBuf {
    for file in ["kernel", "initrd"] {
        std::fs::write(tmp.join(file), "").unwrap();
    }
    let guest = json!({"kernel": tmp.join("kernel"), "initrd": tmp.join("initrd")});
    let node = |vlans: serde_json::Value, ports: serde_json::Value| {
        let mut node = guest.clone();
        node["vlans"] = vlans;
        node["forwardPorts"] = ports;
        node
    };
    let spec = json!({
        "name": "fake",
        "nodes": {"a": node(json!([1]), json!([{"host": port, "guest": 80}])), "b": node(json!([1, 2]), json!([]))},
        "qemu": fixtures().join("runtime/fake-qemu"),
    });
    let spec_path = tmp.join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let out = tmp.join("out");
    let built = run(vmlab().arg("build").arg(&spec_path).arg("--out").arg(&out));
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    out
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

/// A running `vmlab up`, its session under a private TMPDIR; stopped on drop
/// so a failing test leaves nothing running.
struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line so far, `out: ` or `err: ` first.
    seen: Vec<String>,
}

impl Up {
    fn start(dir: &Path, tmpdir: &Path, env: &[(&str, &str)]) -> Up {
        std::fs::create_dir_all(tmpdir).unwrap();
        let mut cmd = vmlab();
        cmd.arg("up").arg(dir).env_remove("XDG_RUNTIME_DIR").env_remove("VMLAB_ACCEL").env("TMPDIR", tmpdir);
        cmd.envs(env.iter().copied()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let (tx, lines) = mpsc::channel();
        forward_lines(child.stdout.take().unwrap(), "out: ", tx.clone());
        forward_lines(child.stderr.take().unwrap(), "err: ", tx);
        Up { child, lines, seen: Vec::new() }
    }

    /// Reads output until a line contains `needle`; returns that line.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => self.seen.push(line),
                Err(e) => panic!("no line with {needle:?} ({e}); output:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// The session directory, as `vmlab up` announces it.
    fn session(&mut self) -> PathBuf {
        let line = self.wait_for("vmlab: session directory: ");
        let rest = line.split_once("session directory: ").unwrap().1;
        PathBuf::from(rest.split_once(" (").unwrap().0)
    }

    fn signal(&self, signal: libc::c_int) {
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, signal) }, 0);
    }

    /// Waits for vmlab to exit; returns its status and all its output.
    fn finish(mut self) -> (ExitStatus, String) {
        let status = self.child.wait().unwrap();
        // The readers end at end of file, closing the channel.
        self.seen.extend(self.lines.iter());
        (status, self.seen.join("\n"))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

fn forward_lines(stream: impl Read + Send + 'static, prefix: &'static str, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if tx.send(format!("{prefix}{line}")).is_err() {
                return;
            }
        }
    });
}

/// Polls until no process mentions `session`; returns the ones left at the deadline.
fn leftovers(session: &Path) -> Vec<(u32, String)> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = processes_mentioning(session);
        if found.is_empty() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn up_runs_the_network_and_each_termination_signal_stops_it() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let dir = build_fake(tmp.path(), port);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let mut up = Up::start(&dir, &tmp.path().join("run"), &[]);
        let session = up.session();
        up.wait_for("vmlab: all 2 machines are up");
        up.wait_for("out: a # a booted");
        up.wait_for("out: b # b booted");
        let running = processes_mentioning(&session);
        let count = |what: &str| running.iter().filter(|(_, cmdline)| cmdline.contains(what)).count();
        assert_eq!((count("fake-qemu"), count("vde_switch")), (2, 2), "{running:#?}");
        for (pid, cmdline) in &running {
            // vmlab blocks termination signals for itself only.
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            assert!(status.contains("\nSigBlk:\t0000000000000000\n"), "{cmdline}: {status}");
        }

        let serial_a = std::fs::read_to_string(session.join("a.serial.log")).unwrap();
        let serial_b = std::fs::read_to_string(session.join("b.serial.log")).unwrap();
        let vlan = |v: u8| format!("switch {} accepts connections\n", session.join(format!("vlan{v}")).display());
        assert!(serial_a.contains(&vlan(1)) && !serial_a.contains(&vlan(2)), "{serial_a}");
        assert!(serial_b.contains(&vlan(1)) && serial_b.contains(&vlan(2)), "{serial_b}");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&session).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o700);
        up.wait_for(&format!("vmlab: http://127.0.0.1:{port} -> a:80"));
        up.wait_for("vmlab: a: up after ");

        up.signal(signal);
        let (status, output) = up.finish();
        assert_eq!(status.code(), Some(0), "{output}");
        let name = vmlab::runtime::signals::name(signal).unwrap();
        assert!(output.contains(&format!("vmlab: {name}: stopping the network")), "{output}");
        assert!(output.contains(&format!("vmlab: stopped; removed {}", session.display())), "{output}");
        assert!(!session.exists(), "{name}: session directory left behind");
        assert_eq!(leftovers(&session), [], "{name}");
    }
}

#[test]
fn sigkill_of_up_takes_its_machines_and_switches_along() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = build_fake(tmp.path(), free_port());
    let mut up = Up::start(&dir, &tmp.path().join("run"), &[]);
    let session = up.session();
    up.wait_for("vmlab: all 2 machines are up");
    assert_eq!(processes_mentioning(&session).len(), 4, "{:#?}", processes_mentioning(&session));
    up.signal(libc::SIGKILL);
    let (status, _) = up.finish();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    assert_eq!(leftovers(&session), []);
}

#[test]
fn a_taken_forwarded_port_fails_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = build_fake(tmp.path(), port);
    let runs = tmp.path().join("run");
    std::fs::create_dir(&runs).unwrap();
    let out = run(vmlab().arg("up").arg(&dir).env_remove("XDG_RUNTIME_DIR").env("TMPDIR", &runs));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let expected = format!("error: machine \"a\": cannot forward host port {port} to guest port 80: 127.0.0.1:{port} is not free: ");
    assert!(stderr.starts_with(&expected) && stderr.lines().count() == 1, "{stderr}");
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 0, "a session directory was created");
}

#[test]
fn a_machine_failing_at_start_fails_up_with_its_status_and_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = build_fake(tmp.path(), free_port());
    let mut up = Up::start(&dir, &tmp.path().join("run"), &[("FAKE_QEMU_FAIL", "b")]);
    let session = up.session();
    let (status, output) = up.finish();
    assert_eq!(status.code(), Some(2), "{output}");
    let expected = format!(
        "err: error: machine \"b\" failed to start: it exited with status 3; its standard error ended with:\n\
         err:   qemu-system-x86_64: -kernel {}: fake failure of b (--keep-state keeps its logs)",
        tmp.path().join("kernel").display()
    );
    assert!(output.contains(&expected), "{output}");
    assert!(!session.exists());
    assert_eq!(leftovers(&session), []);
}
