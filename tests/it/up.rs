//! `vmlab up`: on networks of stand-in machines (tests/fixtures/runtime/fake-qemu
//! behind real run scripts and real vde_switches) for signals, SIGKILL, a
//! taken port, a machine that fails to start; and on real VMs (the webserver
//! example on the default guest) for a forwarded port, SIGTERM and SIGKILL.
//! Also a run script alone, on a stand-in machine: its state directory.

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    count, fixtures, free_port, http_get, leftovers, processes_mentioning, repo_root, run, vmlab, webserver_guest, Up,
    PATIENCE,
};
use vmlab::layout::{self, SessionDir};

/// Writes `spec` to `tmp/spec.json` and builds it into `tmp/out`.
fn build(tmp: &Path, spec: serde_json::Value) -> PathBuf {
    let spec_path = tmp.join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let out = tmp.join("out");
    let built = run(vmlab().arg("build").arg(&spec_path).arg("--out").arg(&out));
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    out
}

/// Spec of network "fake", stand-in machines: `a` on vlan 1 forwarding host
/// `port` to 80, `b` on vlans 1 and 2.
fn fake_spec(tmp: &Path, port: u16) -> serde_json::Value {
    for file in ["kernel", "initrd"] {
        std::fs::write(tmp.join(file), "").unwrap();
    }
    let node = |vlans: serde_json::Value, ports: serde_json::Value| json!({"kernel": tmp.join("kernel"), "initrd": tmp.join("initrd"), "vlans": vlans, "forwardPorts": ports});
    json!({
        "name": "fake",
        "nodes": {"a": node(json!([1]), json!([{"host": port, "guest": 80}])), "b": node(json!([1, 2]), json!([]))},
        "qemu": fixtures().join("runtime/fake-qemu"),
    })
}

fn build_fake(tmp: &Path, port: u16) -> PathBuf {
    build(tmp, fake_spec(tmp, port))
}

/// The webserver example on the default guest, `server` forwarding host `port` to 80.
fn build_webserver(tmp: &Path, port: u16) -> PathBuf {
    let guest = webserver_guest();
    let machine = json!({"kernel": guest.join("kernel"), "initrd": guest.join("initrd"), "memory": 128});
    let mut server = machine.clone();
    server["forwardPorts"] = json!([{"host": port, "guest": 80}]);
    build(tmp, json!({"name": "webserver", "nodes": {"server": server, "client": machine}}))
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
        assert_eq!((count(&running, "fake-qemu"), count(&running, "vde_switch")), (2, 2), "{running:#?}");
        for (pid, cmdline) in &running {
            // vmlab blocks termination signals for itself only.
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            assert!(status.contains("\nSigBlk:\t0000000000000000\n"), "{cmdline}: {status}");
        }

        let serial_a = std::fs::read_to_string(SessionDir::new(&session).serial_log("a")).unwrap();
        let serial_b = std::fs::read_to_string(SessionDir::new(&session).serial_log("b")).unwrap();
        let vlan = |v: u8| format!("switch {} accepts connections\n", session.join(format!("vlan{v}")).display());
        assert!(serial_a.contains(&vlan(1)) && !serial_a.contains(&vlan(2)), "{serial_a}");
        assert!(serial_b.contains(&vlan(1)) && serial_b.contains(&vlan(2)), "{serial_b}");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&session).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o700);
        up.wait_for(&format!("vmlab: http://127.0.0.1:{port} -> a:80"));
        up.wait_for("a: backdoor shell ready (");

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

/// SIGKILL of `vmlab up` once its machines are up: every process it started
/// (`processes` of them) dies with it.
fn sigkill_leaves_nothing(dir: &Path, tmp: &Path, processes: usize) {
    let mut up = Up::start(dir, &tmp.join("run"), &[]);
    let session = up.session();
    up.wait_for("vmlab: all 2 machines are up");
    assert_eq!(processes_mentioning(&session).len(), processes, "{:#?}", processes_mentioning(&session));
    up.signal(libc::SIGKILL);
    let (status, _) = up.finish();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    assert_eq!(leftovers(&session), []);
}

#[test]
fn sigkill_of_up_takes_its_machines_and_switches_along() {
    let tmp = tempfile::tempdir().unwrap();
    // Two machines, a switch for each of vlans 1 and 2.
    sigkill_leaves_nothing(&build_fake(tmp.path(), free_port()), tmp.path(), 4);
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
    let expected = format!(
        "error: machine \"a\": cannot forward host port {port} to guest port 80: 127.0.0.1:{port} is not free: "
    );
    assert!(stderr.starts_with(&expected) && stderr.lines().count() == 1, "{stderr}");
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 0, "a session directory was created");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The state directory holds the backdoor socket, a root shell: a run script
/// starts no QEMU in a VMLAB_STATE_DIR that another user owns or can write
/// to (there they could put a listener in the socket's place), and makes a
/// missing one private. QEMU stands in with FAKE_QEMU_FAIL: reached, it
/// exits at once with status 3.
#[test]
fn a_run_script_refuses_a_state_directory_others_own_or_can_write() {
    let tmp = tempfile::tempdir().unwrap();
    let script = build_fake(tmp.path(), free_port()).join(layout::run_script("a"));
    let dir = |name: &str, mode: u32, owner: Option<u32>| {
        let path = tmp.path().join(name);
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&path, owner, None).unwrap();
        path
    };
    let refused = "it must be a directory of ours that no one else can write to";
    for (state, status, stderr) in [
        (dir("nobodys", 0o700, Some(65534)), 2, refused),
        (dir("open", 0o777, None), 2, refused),
        (dir("group-writable", 0o770, None), 2, refused),
        (dir("ours", 0o755, None), 3, "fake failure of a"),
        (tmp.path().join("missing/state"), 3, "fake failure of a"),
    ] {
        let out = run(Command::new(&script).env("VMLAB_STATE_DIR", &state).env("FAKE_QEMU_FAIL", "a"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(status), "{state:?}: {err}");
        assert!(err.lines().any(|l| l.contains(stderr)), "{state:?}: {err}");
        if status == 2 {
            let line = format!("run-a-vm: refusing VMLAB_STATE_DIR {}: {refused}", state.display());
            assert_eq!(err.lines().last(), Some(line.as_str()));
            assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0, "{state:?} was used");
        }
    }
    assert_eq!(mode(&tmp.path().join("missing/state")), 0o700);
}

/// Alone (no VMLAB_STATE_DIR), a run script makes a fresh private state
/// directory under the runtime directory, never the predictable name that
/// another user may have made first, says where it is on standard error,
/// and removes it once QEMU has exited.
#[test]
fn a_run_script_alone_makes_a_private_state_directory_and_removes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let script = build_fake(tmp.path(), free_port()).join(layout::run_script("a"));
    let runtime_dir = tmp.path().join("runtime");
    let predictable = runtime_dir.join("vmlab-fake-a");
    std::fs::create_dir_all(&predictable).unwrap();
    std::fs::set_permissions(&predictable, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut vm = Up::spawn(Command::new(&script), &runtime_dir, &[]);
    vm.wait_for("out: a booted");
    assert_eq!(std::fs::read_dir(&predictable).unwrap().count(), 0, "the predictable directory was used");
    let line = vm.wait_for("err: run-a-vm: state directory: ");
    let state = PathBuf::from(line.split_once("state directory: ").unwrap().1.split_once(" (").unwrap().0);
    assert_eq!(state.parent(), Some(runtime_dir.as_path()), "{line}");
    assert!(state.file_name().unwrap().to_str().unwrap().starts_with("vmlab-fake-a-"), "{line}");
    assert_eq!(mode(&state), 0o700);
    assert!(state.join(layout::SHELL_SOCKET).exists());
    vm.signal(libc::SIGTERM);
    let (status, output) = vm.finish();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGTERM), "{output}");
    let deadline = Instant::now() + PATIENCE;
    while state.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!state.exists(), "{state:?} is left after QEMU exited");
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
        "err: error: machine \"b\" failed to start (--keep-state keeps its logs): it exited with status 3; \
         its standard error ended with:\nerr:   qemu-system-x86_64: -kernel {}: fake failure of b",
        tmp.path().join("kernel").display()
    );
    assert!(output.contains(&expected), "{output}");
    assert!(!session.exists());
    assert_eq!(leftovers(&session), []);
}

#[test]
fn a_machine_exiting_after_it_was_up_is_reported_and_the_others_keep_running() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = build_fake(tmp.path(), free_port());
    let mut up = Up::start(&dir, &tmp.path().join("run"), &[("FAKE_QEMU_CRASH", "b")]);
    let session = up.session();
    up.wait_for("b: backdoor shell ready (");
    let reported = up.wait_for("err: error: machine \"b\" exited with status 5; its standard error ended with:");
    up.wait_for("err:   qemu-system-x86_64: fake crash of b");
    up.wait_for("a: backdoor shell ready (");
    let running = processes_mentioning(&session);
    assert_eq!((count(&running, "-name a "), count(&running, "-name b ")), (1, 0), "{running:#?}");
    up.signal(libc::SIGTERM);
    let (status, output) = up.finish();
    assert_eq!(status.code(), Some(2), "a machine failed: {reported}\n{output}");
    assert!(!session.exists());
    assert_eq!(leftovers(&session), []);
}

/// A machine whose QEMU is stuck before its guest runs (as one was when the
/// switch had a port too few) is reported long before any global timeout,
/// with what QMP can tell, and the network stops.
#[test]
fn a_machine_with_no_sign_of_life_is_reported_with_what_qemu_says() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = build_fake(tmp.path(), free_port());
    let mut cmd = vmlab();
    cmd.arg("up").arg(&dir).args(["--boot-silence", "2"]);
    let mut up = Up::spawn(cmd, &tmp.path().join("run"), &[("FAKE_QEMU_SILENT", "b")]);
    let session = up.session();
    let (status, output) = up.finish();
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(
        output.contains(
            "b: machine b: no sign of life after 2.00s (nothing on the serial console, no backdoor banner); \
             QEMU does not answer on QMP: QEMU itself is stuck, before or without running the guest"
        ),
        "{output}"
    );
    assert!(output.contains("a: backdoor shell ready ("), "{output}");
    assert!(!session.exists());
    assert_eq!(leftovers(&session), []);
}

#[test]
fn up_ends_by_itself_when_no_machine_is_left() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = build_fake(tmp.path(), free_port());
    let mut up = Up::start(&dir, &tmp.path().join("run"), &[("FAKE_QEMU_CRASH", "a,b")]);
    let session = up.session();
    let (status, output) = up.finish();
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("vmlab: no machine is running: stopping the network"), "{output}");
    assert!(!session.exists());
    assert_eq!(leftovers(&session), []);
}

#[test]
fn a_switch_that_cannot_start_fails_up_with_its_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = fake_spec(tmp.path(), free_port());
    spec["vdeSwitch"] = json!(fixtures().join("runtime/broken-vde_switch"));
    let dir = build(tmp.path(), spec);
    let mut up = Up::start(&dir, &tmp.path().join("run"), &[]);
    let session = up.session();
    let (status, output) = up.finish();
    assert_eq!(status.code(), Some(2), "{output}");
    let expected = format!(
        "err: error: vde_switch for vlan 1 exited with status 1 before it was ready; its standard error ended with:\n\
         err:   vde_switch: cannot create {}: fake failure",
        session.join("vlan1").display()
    );
    assert!(output.contains(&expected), "{output}");
    assert!(!output.contains(": starting"), "a machine started: {output}");
    assert!(!session.exists());
}

#[test]
fn real_vms_serve_a_forwarded_port_and_sigterm_removes_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let dir = build_webserver(tmp.path(), port);
    let mut up = Up::start(&dir, &tmp.path().join("run"), &[]);
    let session = up.session();
    up.wait_for(&format!("vmlab: http://127.0.0.1:{port} -> server:80"));
    up.wait_for("vmlab: all 2 machines are up");
    let running = processes_mentioning(&session);
    assert_eq!((count(&running, "qemu-system-"), count(&running, "vde_switch")), (2, 1), "{running:#?}");
    let page = std::fs::read_to_string(repo_root().join("examples/webserver/www/index.html")).unwrap();
    assert_eq!(http_get(port), page);
    // The console reaches the terminal prefixed and the log as is.
    let prefixed = up.wait_for("out: server # ");
    let serial = std::fs::read_to_string(SessionDir::new(&session).serial_log("server")).unwrap();
    assert!(serial.contains(prefixed.strip_prefix("out: server # ").unwrap()), "{prefixed:?} not in {serial}");

    up.signal(libc::SIGTERM);
    let (status, output) = up.finish();
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(!session.exists());
    assert_eq!(leftovers(&session), []);
}

#[test]
fn real_vms_die_with_a_sigkilled_up() {
    let tmp = tempfile::tempdir().unwrap();
    // Two QEMUs, one switch.
    sigkill_leaves_nothing(&build_webserver(tmp.path(), free_port()), tmp.path(), 3);
}

/// Reads a console subscription until a line contains `needle`.
fn console_line(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let line = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap();
        if line.contains(needle) {
            return line;
        }
    }
}

/// The runtime's machine life cycle, on stand-in machines: start, refuse a
/// second start, stop, restart, report a failed start with QEMU's words, and
/// refuse to start once the network has stopped. (The backdoor is the
/// driver's: the next test drives real VMs through this API.)
#[test]
fn machines_start_restart_fail_and_stay_stopped_with_their_network() {
    use std::os::unix::process::ExitStatusExt;
    use vmlab::accel::Resolved;
    use vmlab::runtime::{load_plan, Network, Session};

    let tmp = tempfile::tempdir().unwrap();
    let dir = build_fake(tmp.path(), free_port());
    let plan = load_plan(&dir).unwrap();
    let network = Network::start(&dir, plan.clone(), Session::create(&plan, false).unwrap(), Resolved::Tcg).unwrap();
    let session = network.session().path().to_owned();
    let (a, b) = (network.machine("a").unwrap().clone(), network.machine("b").unwrap());
    let lines = a.console().subscribe();
    assert!(a.wait_exit(Duration::ZERO).is_none() && a.stop().is_none(), "a machine never started");

    a.start().unwrap();
    console_line(&lines, "a booted");
    assert_eq!(a.start().unwrap_err().to_string(), "machine \"a\" is already running");

    let first = a.pid().unwrap();
    assert_eq!(a.stop().unwrap().status.signal(), Some(libc::SIGTERM));
    assert!(!a.is_running());
    a.start().unwrap();
    assert_ne!(a.pid(), Some(first));
    console_line(&lines, "a booted");

    std::fs::create_dir_all(b.state_dir()).unwrap();
    std::fs::write(b.state_dir().join("fail"), "").unwrap();
    b.start().unwrap();
    let kernel = tmp.path().join("kernel");
    assert_eq!(
        b.wait_exit(PATIENCE).unwrap().to_string(),
        format!(
            "exited with status 3; its standard error ended with:\n  \
             qemu-system-x86_64: -kernel {}: fake failure of b",
            kernel.display()
        )
    );

    network.stop();
    assert_eq!(leftovers(&session), []);
    // A request still running when the network stopped cannot bring a machine back.
    assert_eq!(a.start().unwrap_err().to_string(), "machine \"a\" cannot start: its network has stopped");
    assert_eq!(leftovers(&session), []);
    drop(network);
    assert!(!session.exists());
}

/// The seam between driver and runtime (`driver::vm::Vm` for
/// `Arc<runtime::VmProcess>`), on real VMs: the driver boots, runs a command,
/// crashes and restarts a machine whose QEMU the runtime owns.
#[test]
fn the_driver_runs_real_vms_through_the_runtime() {
    use vmlab::accel::{self, Accel};
    use vmlab::driver::{log::Log, machine::DrivenMachine};
    use vmlab::runtime::{load_plan, Network, Session};

    let tmp = tempfile::tempdir().unwrap();
    let dir = build_webserver(tmp.path(), free_port());
    let plan = load_plan(&dir).unwrap();
    let accel = accel::decide(Accel::Auto, &accel::probe()).unwrap().accel;
    let network = Network::start(&dir, plan.clone(), Session::create(&plan, false).unwrap(), accel).unwrap();
    let session = network.session().path().to_owned();
    let runtime_server = network.machine("server").unwrap().clone();
    let log = std::sync::Arc::new(Log::new(Box::new(std::io::sink()), false, None));
    let mut server =
        DrivenMachine::new("server", vec![("eth1".into(), 1)], Box::new(runtime_server.clone()), tmp.path(), log);

    let out = server.execute("hostname", None).unwrap();
    assert_eq!((out.status, String::from_utf8_lossy(&out.stdout).into_owned()), (0, "server\n".to_owned()));
    let first = runtime_server.pid().unwrap();
    server.crash().unwrap();
    assert!(!runtime_server.is_running());
    let out = server.execute("cat /proc/sys/kernel/hostname", None).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "server\n");
    assert_ne!(runtime_server.pid(), Some(first), "the same QEMU after a crash");

    drop(server);
    network.stop();
    assert_eq!(leftovers(&session), []);
}
