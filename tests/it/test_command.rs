//! `vmlab test` and the control socket on real VMs (the default guest with
//! the webserver example's boot script): the example's own tests in Python
//! and shell, two runs at once, machine operations, failures, the pre-check,
//! the global timeout, signals, `vmlab up` with CLI clients, the prompt.
//! Every run gets a private TMPDIR for its session directory, so a test can
//! check that nothing of it is left: no directory, no process.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::support::*;
use vmlab::layout;

#[test]
fn the_webserver_example_passes_in_python_and_in_shell_two_runs_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let built = tmp.path().join("built");
    let out = run(vmlab().arg("build").arg(webserver_spec(tmp.path())).arg("--out").arg(&built));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let runs = tmp.path().join("runs");
    let example = repo_root().join("examples/webserver");
    // Two runs of one built network at the same time, each with its own machines.
    let handles: Vec<_> = ["test.py", "test.sh"]
        .into_iter()
        .map(|script| {
            let (runs, built, script, out) =
                (runs.clone(), built.clone(), example.join(script), tmp.path().join(script));
            std::thread::spawn(move || (test_run(&runs, &built, &script, &out, &[]), out))
        })
        .collect();
    let results: Vec<(Output, PathBuf)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut sessions = Vec::new();
    for (output, out) in &results {
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        assert!(stderr.contains("client: must fail: wget -qO- http://server:8080/ (exit 1, "), "{stderr}");
        assert_eq!(stderr.lines().filter(|l| l.contains("test passed (")).count(), 1, "{stderr}");
        let session = stderr.split("session directory: ").nth(1).unwrap().split(' ').next().unwrap().to_string();
        sessions.push(session);
        for log in ["vmlab.log".into(), layout::serial_log_name("server"), layout::serial_log_name("client")] {
            assert!(out.join(&log).is_file(), "no {log} in {}", out.display());
        }
        assert!(std::fs::read_to_string(out.join("vmlab.log")).unwrap().contains("test passed ("));
    }
    assert_ne!(sessions[0], sessions[1], "both runs used one session");
    let names = |cases: Vec<(String, Option<String>)>| {
        assert!(cases.iter().all(|(_, f)| f.is_none()), "{cases:?}");
        cases.into_iter().map(|(n, _)| n).collect::<Vec<_>>()
    };
    assert_eq!(
        names(junit_cases(&results[0].1.join("junit.xml"))),
        [
            "the client fetches the server's page by name",
            "the client fetches it by IPv4 and IPv6 address",
            "nothing answers on a port nobody serves",
            "the page is copied out of the server",
            "test.py"
        ]
    );
    assert_eq!(
        names(junit_cases(&results[1].1.join("junit.xml"))),
        [
            "the client fetches the server's page by name",
            "the client fetches it by IPv4 and IPv6 address",
            "nothing answers on a port nobody serves",
            "test.sh"
        ]
    );
    let page = std::fs::read(example.join("www/index.html")).unwrap();
    assert_eq!(std::fs::read(results[0].1.join("server/index.html")).unwrap(), page);
    assert_nothing_left(&runs);
}

/// Machine operations a test relies on, one subtest each, then a failing
/// command: the test fails (exit 1) with that failure in the JUnit report.
const OPERATIONS: &str = r#"
import hashlib, os

start_all()

with subtest("a background process holding stdout open does not hold the command"):
    server.succeed("sleep 1000 &")
    server.succeed("httpd -f -p 8000 -h /var/www &")
    server.wait_for_open_port(8000)

with subtest("random bytes go in and come out unchanged"):
    data = os.urandom(1024 * 1024 + 3)
    src = os.path.join(driver.out_dir, "random.bin")
    with open(src, "wb") as f:
        f.write(data)
    server.copy_to_vm(src, "/tmp/in/random.bin")
    os.remove(src)
    guest_sum = server.succeed("sha256sum /tmp/in/random.bin").split()[0]
    assert guest_sum == hashlib.sha256(data).hexdigest(), "copied in: " + guest_sum
    back = server.copy_from_vm("/tmp/in/random.bin", "back")
    with open(back, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == guest_sum, "copied out"
    os.remove(back)

with subtest("a blocked machine is cut off until unblocked"):
    client.succeed("ping -c 1 -W 2 server")
    client.block()
    client.fail("ping -c 1 -W 2 server")
    client.unblock()
    client.wait_until_succeeds("ping -c 1 -W 1 server", timeout=120)

with subtest("a guest crashing mid-command is an error naming it"):
    try:
        # Without the crash noticed, this would run into the global timeout.
        server.succeed("echo c > /proc/sysrq-trigger; sleep 1000")
    except MachineError as e:
        assert str(e).startswith("machine server: "), e
    else:
        raise AssertionError("the crash went unnoticed")

with subtest("a failing command fails the test"):
    client.succeed("echo about to fail; exit 3")
"#;

#[test]
fn machine_operations_on_real_vms_and_a_failing_script() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let script = write_script(tmp.path(), "operations.py", OPERATIONS);
    let out = tmp.path().join("out");
    // A spec, built on the fly into the session directory.
    let output = test_run(&runs, &webserver_spec(tmp.path()), &script, &out, &["--global-timeout", "900"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let failure = "RequestedAssertionFailed: machine client: command `echo about to fail; exit 3` failed (exit code 3)";
    assert!(
        stderr.contains(&format!("test failed: the script exited with status 1: operations.py at line 42: {failure}")),
        "{stderr}"
    );
    let cases = junit_cases(&out.join("junit.xml"));
    let failed: Vec<(&str, Option<&str>)> = cases.iter().map(|(n, f)| (n.as_str(), f.as_deref())).collect();
    assert_eq!(failed.len(), 6, "{failed:#?}");
    assert!(failed[..4].iter().all(|(_, f)| f.is_none()), "{failed:#?}");
    assert_eq!(failed[4], ("a failing command fails the test", Some(failure)));
    assert_eq!(failed[5].0, "operations.py");
    assert!(failed[5].1.unwrap().ends_with(failure), "{failed:#?}");
    assert_nothing_left(&runs);
}

#[test]
fn script_problems_fail_before_anything_boots() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let network = webserver_spec(tmp.path());
    let out = tmp.path().join("out");
    let typo = write_script(tmp.path(), "typo.py", "start_all()\n\nsever.succeed('true')\n");
    let output = test_run(&runs, &network, &typo, &out, &[]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let problem =
        format!("{}:3: name 'sever' is not defined; did you mean 'server'? (machines: client, server)", typo.display());
    assert!(stderr.contains(&problem), "{stderr}");
    assert!(!stderr.contains("starting"), "a machine started: {stderr}");
    let cases = junit_cases(&out.join("junit.xml"));
    assert_eq!(cases.len(), 1);
    assert!(cases[0].1.as_deref().unwrap().contains(&problem), "{cases:?}");
    assert_nothing_left(&runs);

    // What cannot run at all is a harness error.
    let not_executable = write_script(tmp.path(), "test.sh", "true\n");
    for (script, message) in [
        (tmp.path().join("missing.py"), "error: test script ".to_string()),
        (not_executable.clone(), format!("error: test script {not_executable:?} is not executable")),
    ] {
        let output = test_run(&runs, &network, &script, &out, &[]);
        assert_eq!(output.status.code(), Some(2));
        assert!(text(&output.stderr).starts_with(&message), "{}", text(&output.stderr));
    }
    assert_nothing_left(&runs);
}

#[test]
fn the_global_timeout_stops_everything_and_names_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let script = write_script(tmp.path(), "stuck.py", "server.wait_for_file('/nonexistent')\n");
    let out = tmp.path().join("out");
    // A stand-in QEMU never answers the wait, and nothing boots meanwhile.
    let network = stand_in_spec(tmp.path(), "one", &["server"]);
    let output = test_run(&runs, &network, &script, &out, &["--global-timeout", "8"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let why =
        "global timeout: the test ran out of its 8 s; running: server: wait_for_file path=/nonexistent timeout=900";
    assert!(stderr.contains(&format!("test failed: {why}")), "{stderr}");
    assert_eq!(junit_cases(&out.join("junit.xml")), [("stuck.py".to_string(), Some(why.to_string()))]);
    // The wait still running sees its machine die; it must not start it again.
    assert_eq!(stderr.matches("server: starting").count(), 1, "{stderr}");
    assert_nothing_left(&runs);
}

#[test]
fn sigint_stops_a_test_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let script = "import time\nserver.succeed('true')\nprint('booted', flush=True)\ntime.sleep(1000)\n";
    let script = write_script(tmp.path(), "slow.py", script);
    let mut cmd = vmlab_in(&runs);
    cmd.arg("test").arg(spec(tmp.path(), "one", &["server"])).arg(&script).arg("--out").arg(tmp.path().join("out"));
    let mut child = Running(cmd.stdin(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
    let mut lines = Lines::of(child.0.stderr.take().unwrap());
    lines.wait_for("] booted");
    let (status, stderr) = child.stop(libc::SIGINT, lines);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("harness error: stopped by SIGINT"), "{stderr}");
    assert_nothing_left(&runs);
}

#[test]
fn up_serves_the_control_socket_to_cli_clients_and_vmlab_shell() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let built = tmp.path().join("built");
    let out = run(vmlab().arg("build").arg(spec(tmp.path(), "one", &["server"])).arg("--out").arg(&built));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let mut cmd = vmlab_in(&runs);
    let consoles = tmp.path().join("consoles");
    let stdout = std::fs::File::create(&consoles).unwrap();
    cmd.arg("up").arg(&built).current_dir(&cwd).stdin(Stdio::null()).stdout(stdout).stderr(Stdio::piped());
    let mut up = Running(cmd.spawn().unwrap());
    let mut lines = Lines::of(up.0.stderr.take().unwrap());
    let export = lines.wait_for("vmlab: control socket: export VMLAB_SOCKET=");
    let socket = export.split_once("VMLAB_SOCKET=").unwrap().1.to_string();
    lines.wait_for("vmlab: the machine is up");

    let client = |args: &[&str], stdin: &str| {
        let mut child = vmlab()
            .args(args)
            .env("VMLAB_SOCKET", &socket)
            .current_dir(tmp.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    // Consoles leave standard output while switched off (other requests run before it is on again).
    let console_line = |line: &str| {
        let said = client(&["succeed", "server", "--", &format!("echo {line} > /dev/console")], "");
        assert_eq!(said.status.code(), Some(0), "{}", text(&said.stderr));
        assert_eq!(client(&["wait-for-console-text", "server", line], "").status.code(), Some(0));
    };
    assert_eq!(client(&["serial-stdout", "off"], "").status.code(), Some(0));
    console_line("hidden-line");
    let hostname = client(&["succeed", "server", "--", "hostname"], "");
    assert_eq!(
        (hostname.status.code(), text(&hostname.stdout)),
        (Some(0), "server\n".to_string()),
        "{}",
        text(&hostname.stderr)
    );
    let failed = client(&["succeed", "server", "--", "exit 4"], "");
    assert_eq!(failed.status.code(), Some(1));
    assert_eq!(text(&failed.stderr), "error: machine server: command `exit 4` failed (exit code 4)\n");
    let shell = client(&["shell", "server"], "echo hi from $(hostname)\nexit 3\n");
    assert_eq!(shell.status.code(), Some(0), "{}", text(&shell.stderr));
    assert_eq!((text(&shell.stdout), text(&shell.stderr)), ("hi from server\n".to_string(), "[exit 3]\n".to_string()));
    // Copies land where `vmlab up` runs.
    let copied = client(&["copy-from-vm", "server", "/etc/hostname"], "");
    assert_eq!(text(&copied.stdout), format!("{}\n", cwd.join("hostname").display()));
    assert_eq!(std::fs::read_to_string(cwd.join("hostname")).unwrap(), "server\n");
    assert_eq!(client(&["serial-stdout", "on"], "").status.code(), Some(0));
    console_line("shown-line");

    let (status, stderr) = up.stop(libc::SIGTERM, lines);
    assert_eq!(status, Some(0), "{stderr}");
    let consoles = std::fs::read_to_string(consoles).unwrap();
    assert!(consoles.contains("server # shown-line") && !consoles.contains("hidden-line"), "{consoles}");
    // Each boot step is said once, by the driver's log.
    assert_eq!(stderr.matches("server: backdoor shell ready (").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("server: starting").count(), 1, "{stderr}");
    assert!(stderr.contains("server: must succeed: hostname (exit 0, "), "the log shows clients' commands: {stderr}");
    assert_nothing_left(&runs);
}

#[test]
fn the_interactive_prompt_has_the_machines_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let mut cmd = vmlab_in(&runs);
    cmd.arg("test").arg(spec(tmp.path(), "one", &["server-1"])).arg("--interactive");
    cmd.arg("--out").arg(tmp.path().join("out")).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let statements = "print('answer:', server_1.succeed('hostname').strip(), [m.name for m in machines])\n";
    child.stdin.take().unwrap().write_all(statements.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("vmlab: machines server-1\n"), "{stdout}");
    assert!(stdout.contains("answer: server-1 ['server-1']\n"), "{stdout}");
    assert_nothing_left(&runs);
}

/// README's first command (.ci/example) runs examples/webserver/run.sh: the
/// guest built from scratch, the example's own network.json and test.py.
#[test]
fn the_example_runner_of_the_readme_passes_and_shows_the_fetched_page() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let report = tmp.path().join("report");
    // vmlab_in's environment (a private TMPDIR), for the script and every vmlab it runs.
    let vmlab = vmlab_in(&runs);
    let out = run(Command::new(repo_root().join("examples/webserver/run.sh"))
        .arg(vmlab.get_program())
        .arg(&report)
        .envs(vmlab.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env_remove("XDG_RUNTIME_DIR"));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("the client fetched: <h1>Hello from the vmlab web server</h1>"), "{stderr}");
    assert!(report.join("junit.xml").is_file());
    assert_nothing_left(&runs);
}

/// The life-cycle and QEMU-side operations on a real VM: screenshot,
/// monitor command, forwarded port, reboot, shutdown and start, crash.
const LIFECYCLE: &str = r#"
import socket, urllib.request

server.start()
server.wait_for_open_port(80)

with subtest("a screenshot is a PNG in the output directory"):
    server.screenshot("screen")

with subtest("a monitor command answers"):
    assert "running" in server.send_monitor_command("info status")

with subtest("a port forwarded at run time reaches the guest"):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server.forward_port(port, 80)
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
    assert page == server.succeed("cat /var/www/index.html"), page

with subtest("reboot starts the guest afresh"):
    server.succeed("touch /tmp/before-reboot")
    server.reboot()
    server.fail("test -e /tmp/before-reboot")

with subtest("shutdown powers off; start boots again"):
    server.shutdown()
    assert not server.is_up()
    server.start()
    assert server.succeed("hostname") == "server\n"

with subtest("crash stops QEMU at once"):
    server.crash()
    server.wait_for_shutdown()
    assert not server.is_up()
"#;

#[test]
fn life_cycle_and_qemu_operations_on_a_real_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let script = write_script(tmp.path(), "lifecycle.py", LIFECYCLE);
    let out = tmp.path().join("out");
    let output =
        test_run(&runs, &spec(tmp.path(), "lifecycle", &["server"]), &script, &out, &["--global-timeout", "600"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let png = std::fs::read(out.join("screen.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 100, "not a PNG: {} bytes", png.len());
    let cases = junit_cases(&out.join("junit.xml"));
    assert_eq!(cases.len(), 7, "{cases:?}");
    assert!(cases.iter().all(|(_, failure)| failure.is_none()), "{cases:?}");
    assert_nothing_left(&runs);
}
