//! Machine operations against a local busybox "guest" (see `testing`).

use super::*;
use crate::driver::testing::{busybox_bin, LocalVm};

struct Fixture {
    dir: tempfile::TempDir,
    m: DrivenMachine,
    qmp_log: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let bin = busybox_bin(dir.path());
    let vm = LocalVm::new(&dir.path().join("state"), &bin);
    let qmp_log = vm.qmp_log.clone();
    let log = Arc::new(Log::new(Box::new(std::io::sink()), false, None));
    let ifs = vec![("eth1".to_string(), 1), ("eth2".to_string(), 2)];
    let m = DrivenMachine::new("server", ifs, Box::new(vm), &dir.path().join("out"), log);
    Fixture { dir, m, qmp_log }
}

fn cmds(c: &[&str]) -> Vec<String> {
    c.iter().map(|s| s.to_string()).collect()
}

#[test]
fn commands_boot_the_machine_and_check_their_status() {
    let mut f = fixture();
    assert!(!f.m.is_up());
    assert_eq!(f.m.succeed(&cmds(&["echo a", "echo b"]), None).unwrap(), b"a\nb\n");
    assert!(f.m.is_up());
    let e = f.m.succeed(&cmds(&["echo oops >&2; exit 4"]), None).unwrap_err();
    assert_eq!(e.kind, Kind::Failed);
    assert_eq!(
        e.message,
        "machine server: command `echo oops >&2; exit 4` failed (exit code 4); its standard error ended with:\n  oops"
    );
    assert_eq!(f.m.fail(&cmds(&["false"]), None).unwrap(), b"");
    assert_eq!(f.m.fail(&cmds(&["true"]), None).unwrap_err().kind, Kind::Failed);
    let out = f.m.execute_logged("echo x; exit 2", None).unwrap();
    assert_eq!((out.status, out.stdout), (2, b"x\n".to_vec()));
}

#[test]
fn waits_poll_until_true_or_time_out() {
    let mut f = fixture();
    f.m.succeed(&cmds(&["(sleep 0.5; touch later) &"]), None).unwrap();
    f.m.wait_for_file("later", Duration::from_secs(30)).unwrap();
    assert_eq!(f.m.wait_until("test -e later && echo yes", true, Duration::from_secs(30)).unwrap(), b"yes\n");
    f.m.wait_until("test -e never", false, Duration::from_secs(30)).unwrap();
    let e = f.m.wait_until("test -e never", true, Duration::from_secs(1)).unwrap_err();
    assert_eq!(e.kind, Kind::Timeout);
    assert!(e.message.contains("timed out after 1.00s waiting for success of `test -e never`"), "{e}");
}

#[test]
fn ports_open_and_close() {
    let mut f = fixture();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    f.m.wait_for_open_port(port, "127.0.0.1", Duration::from_secs(30)).unwrap();
    drop(listener);
    f.m.wait_for_closed_port(port, "127.0.0.1", Duration::from_secs(30)).unwrap();
}

#[test]
fn console_text_is_matched_once_each() {
    let mut f = fixture();
    f.m.start().unwrap();
    let log = f.dir.path().join("state/serial.log");
    std::fs::write(&log, "old line\n").unwrap();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut file = std::fs::OpenOptions::new().append(true).open(log).unwrap();
        writeln!(file, "login: ready 42\r\nlogin: ready 43").unwrap();
    });
    use std::io::Write;
    assert_eq!(f.m.wait_for_console_text(r"ready \d+", Duration::from_secs(30)).unwrap(), "ready 42");
    writer.join().unwrap();
    assert_eq!(f.m.wait_for_console_text(r"ready \d+", Duration::from_secs(30)).unwrap(), "ready 43");
    assert_eq!(f.m.wait_for_console_text("ready", Duration::from_secs(1)).unwrap_err().kind, Kind::Timeout);
    assert_eq!(f.m.wait_for_console_text("(", Duration::from_secs(1)).unwrap_err().kind, Kind::Request);
}

#[test]
fn copies_in_and_out_are_exact() {
    let mut f = fixture();
    let src = f.dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let mut x: u32 = 7;
    let big: Vec<u8> = (0..5 * 1024 * 1024 + 3)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    std::fs::write(src.join("big"), &big).unwrap();
    std::fs::write(src.join("sub/empty"), b"").unwrap();
    let guest = f.dir.path().join("guest/deep/copy");
    f.m.copy_to_vm(&src, &guest.display().to_string()).unwrap();
    assert!(std::fs::read(guest.join("big")).unwrap() == big);
    assert!(guest.join("sub/empty").exists());
    let back = f.m.copy_from_vm(&guest.display().to_string(), "fetched").unwrap();
    assert_eq!(back, f.dir.path().join("out/fetched/copy"));
    assert!(std::fs::read(back.join("big")).unwrap() == big);
    // A single file, into the output directory itself.
    let file = f.m.copy_from_vm(&guest.join("sub/empty").display().to_string(), "").unwrap();
    assert_eq!(file, f.dir.path().join("out/empty"));
    let e = f.m.copy_from_vm("/nonexistent/x", "").unwrap_err();
    assert_eq!(e.kind, Kind::Failed, "{e}");
}

#[test]
fn a_machine_dying_mid_command_is_reported_until_restarted() {
    let mut f = fixture();
    f.m.succeed(&cmds(&["true"]), None).unwrap();
    // `$$`: the backdoor shell (the command runs in its subshell).
    let pid: i32 = String::from_utf8(f.m.succeed(&cmds(&["echo $$"]), None).unwrap()).unwrap().trim().parse().unwrap();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let e = f.m.execute("sleep 30", None).unwrap_err();
    killer.join().unwrap();
    assert_eq!(e.kind, Kind::Machine);
    assert!(e.message.starts_with("machine server: "), "{e}");
    let again = f.m.execute("true", None).unwrap_err();
    assert!(again.message.contains("died earlier"), "{again}");
    f.m.start().unwrap();
    assert_eq!(f.m.succeed(&cmds(&["echo back"]), None).unwrap(), b"back\n");
}

#[test]
fn crash_and_shutdown_stop_the_machine_and_commands_restart_it() {
    let mut f = fixture();
    f.m.succeed(&cmds(&["true"]), None).unwrap();
    f.m.crash().unwrap();
    assert!(!f.m.is_up());
    assert_eq!(f.m.succeed(&cmds(&["echo again"]), None).unwrap(), b"again\n");
    // The local "guest" has no poweroff: the shell exits instead, as QEMU would.
    f.m.send_to_shell("exit\n").unwrap();
    f.m.wait_for_shutdown(Duration::from_secs(30)).unwrap();
    assert!(!f.m.is_up());
}

#[test]
fn block_forward_and_monitor_go_through_qmp() {
    let mut f = fixture();
    f.m.set_links(false, None).unwrap();
    f.m.set_links(true, Some("eth2")).unwrap();
    assert_eq!(f.m.set_links(true, Some("eth5")).unwrap_err().kind, Kind::Request);
    f.m.forward_port(8080, 80).unwrap();
    f.m.send_monitor_command("info status").unwrap();
    let log = f.qmp_log.lock().unwrap().clone();
    let sent: Vec<String> = log.iter().skip(1).map(|r| format!("{} {}", r["execute"], r["arguments"])).collect();
    assert_eq!(
        sent,
        [
            r#""set_link" {"name":"vlan1","up":false}"#,
            r#""set_link" {"name":"vlan2","up":false}"#,
            r#""set_link" {"name":"vlan2","up":true}"#,
            r#""human-monitor-command" {"command-line":"hostfwd_add user tcp:127.0.0.1:8080-:80"}"#,
            r#""human-monitor-command" {"command-line":"info status"}"#,
        ]
    );
}

#[test]
fn wait_for_unit_without_systemd_says_so() {
    let mut f = fixture();
    let e = f.m.wait_for_unit("nginx.service", None, Duration::from_secs(5)).unwrap_err();
    assert_eq!(e.kind, Kind::Failed);
    assert!(e.message.contains("needs systemd"), "{e}");
}

#[test]
fn a_machine_that_cannot_be_restored_never_boots_cold_instead() {
    let mut f = fixture();
    let saved = crate::runtime::manifest::Saved {
        run_script: String::new(),
        argv: Vec::new(),
        qemu_version: String::new(),
        files: Default::default(),
        state: "server.state".into(),
        bytes: 0,
    };
    let file = f.dir.path().join("server.state");
    let compression = crate::runtime::manifest::Compression::None;
    f.m.restore_from(Restore { saved, file, compression, session: String::new() });
    for _ in 0..2 {
        let e = f.m.succeed(&cmds(&["true"]), None).unwrap_err();
        assert_eq!(e.message, "machine server: cannot start: this machine cannot be restored from a snapshot");
        assert!(!f.m.is_up());
    }
}
