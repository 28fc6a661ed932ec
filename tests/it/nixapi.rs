//! A NixOS-style test script using the NixOS driver's less common names on
//! one real VM (the default guest, busybox, no systemd): the globals a
//! testScript sees, copy_from_host, systemd helpers failing clearly, unix
//! sockets, the keyboard and virtual consoles, polling conditions, serial
//! output switched off and on, and the JUnit suite's wall time.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::support::{assert_nothing_left, junit_cases, test_run, text, write_script};
use crate::support::{run, webserver_guest};

const SCRIPT: &str = r#"
import vmlab

# What NixOS binds without an import: os, vlans and vlanN, `machine` for the only machine.
assert [v.nr for v in vlans] == [1] and vlan1.nr == 1, vlans
assert isinstance(machine, Machine) and machine is solo and machines_qemu == [solo]
assert os.path.isdir(driver.out_dir)
start_all()
assert machine.is_up()

with subtest("copy_from_host puts files where asked, making directories"):
    src = os.path.join(driver.out_dir, "hello.txt")
    with open(src, "w") as f:
        f.write("hi\n")
    machine.copy_from_host(src, "/srv/deep/er/hello.txt")
    machine.copy_from_host_via_shell(src, "/srv/other.txt")
    assert machine.succeed("cat /srv/deep/er/hello.txt /srv/other.txt") == "hi\nhi\n"

with subtest("nc -z tells an open port from a closed one, as NixOS scripts run it"):
    machine.succeed("busybox httpd -p 8080 -h /tmp")
    machine.succeed("nc -z localhost 8080", "nc -z -w 1 127.0.0.1 8080")
    machine.fail("nc -z localhost 8081")
    machine.wait_for_open_port(8080)
    # Without -z, busybox's own nc.
    reply = machine.succeed("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 127.0.0.1 8080 | head -c 5")
    assert reply == "HTTP/", reply

with subtest("systemd helpers say the guest has no systemd"):
    assert machine.systemctl("status foo")[0] == 127
    assert machine.start_job("foo")[0] == 127 and machine.stop_job("foo")[0] == 127
    for helper in [
        lambda: machine.get_unit_info("foo"),
        lambda: machine.get_unit_property("foo", "ActiveState"),
        lambda: machine.require_unit_state("foo"),
        lambda: machine.wait_for_job("foo"),
    ]:
        try:
            helper()
        except RequestedAssertionFailed as e:
            assert "no systemctl" in str(e), e
        else:
            raise AssertionError("a systemd helper worked without systemd")

with subtest("a unix socket counts once a program listens on it"):
    machine.copy_from_host("@LISTENER@", "/bin/listen")
    stream = vmlab.unix_socket_check("/run/app.sock", False)
    machine.fail(stream)
    machine.succeed("listen /run/app.sock >/dev/null 2>&1 &")
    machine.wait_for_open_unix_socket("/run/app.sock", timeout=120)
    machine.succeed("killall listen")
    machine.wait_until_fails(stream, timeout=120)
    machine.succeed("test -S /run/app.sock")  # the file stays; nobody listens
    machine.succeed("syslogd -O /tmp/messages")
    machine.wait_for_open_unix_socket("/dev/log", is_datagram=True, timeout=120)
    machine.fail(vmlab.unix_socket_check("/dev/log", False))

with subtest("keys typed on the keyboard reach tty1"):
    machine.succeed("setsid sh -c 'exec cat > /tmp/typed' < /dev/tty1 > /dev/null 2>&1 &")
    machine.send_chars("Hi there_!\n")
    machine.wait_until_tty_matches("1", "Hi there_!", timeout=120)
    machine.wait_until_succeeds("grep -qx 'Hi there_!' /tmp/typed", timeout=120)
    assert "Hi there_!" in machine.get_tty_text("1")

with subtest("a polling condition fails the command after it broke"):
    @polling_condition(seconds_interval=0)
    def listener_gone():
        "nothing listens on /run/app.sock"
        machine.fail(stream)
    with listener_gone:
        machine.succeed("true")
        machine.succeed("listen /run/app.sock >/dev/null 2>&1 &")
        try:
            # The condition fails at the first operation after the listener is up.
            machine.wait_for_open_unix_socket("/run/app.sock", timeout=120)
            machine.succeed("true")
        except RequestedAssertionFailed as e:
            assert "polling condition failed: nothing listens on /run/app.sock" in str(e), e
        else:
            raise AssertionError("the polling condition did not fail")

serial_stdout_off()
machine.succeed("echo hidden-line > /dev/console")
machine.wait_for_console_text("hidden-line")

with subtest("execute without waiting, and the NixOS tuple forms"):
    assert machine.execute("echo out; exit 3", check_return=False) == (-1, "out\n")
    assert machine.execute("sleep 1; touch /tmp/later", check_output=False) == (-2, "")
    machine.wait_for_file("/tmp/later", timeout=120)

with subtest("unsupported parts say why"):
    for call, why in [
        (lambda: create_machine("run-x-vm"), "network spec"),
        (lambda: machine.wait_for_text("login"), "no OCR"),
        (lambda: machine.shell_interact(), "vmlab shell solo"),
        (lambda: run_tests(), "run itself again"),
        (lambda: machine.send_console("x"), "output only"),
    ]:
        try:
            call()
        except NotImplementedError as e:
            assert why in str(e), e
        else:
            raise AssertionError(why)

serial_stdout_on()
machine.succeed("echo shown-line > /dev/console")
machine.wait_for_console_text("shown-line")
"#;

#[test]
fn a_nixos_style_script_uses_the_rest_of_the_nixos_api() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = tmp.path().join("listen");
    let source = write_script(
        tmp.path(),
        "listen.c",
        "#include <string.h>\n#include <sys/socket.h>\n#include <sys/un.h>\n#include <unistd.h>\n\
         int main(int argc, char **argv) {\n  struct sockaddr_un a = {.sun_family = AF_UNIX};\n\
         int s = socket(AF_UNIX, SOCK_STREAM, 0);\n  strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);\n  unlink(a.sun_path);\n\
         if (argc < 2 || s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1)) return 1;\n  for (;;) pause();\n}\n",
    );
    // A static program: the guest has no C library.
    let cc = run(Command::new("gcc").args(["-static", "-Os", "-o"]).arg(&listener).arg(&source));
    assert!(cc.status.success(), "{}", text(&cc.stderr));
    let g = webserver_guest();
    let node = json!({"kernel": g.join("kernel"), "initrd": g.join("initrd"), "memory": 128, "cmdline": "quiet", "vlans": [1]});
    let network = tmp.path().join("nixapi.json");
    std::fs::write(&network, json!({"name": "nixapi", "nodes": {"solo": node}}).to_string()).unwrap();
    let script = write_script(tmp.path(), "test.py", &SCRIPT.replace("@LISTENER@", &listener.to_string_lossy()));
    let (runs, out) = (tmp.path().join("runs"), tmp.path().join("out"));
    let output = test_run(&runs, &network, &script, &out, &[]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(junit_cases(&out.join("junit.xml")).iter().all(|(_, failure)| failure.is_none()));
    // Serial lines left the terminal while switched off; the log kept them.
    // A line may start with the serial shell's prompt (`solo: # solo:/# hidden-line`).
    let serial = |text: &str, needle: &str| text.lines().any(|l| l.contains("solo: # ") && l.contains(needle));
    assert!(!serial(&stderr, "hidden-line") && serial(&stderr, "shown-line"), "{stderr}");
    let log = std::fs::read_to_string(out.join("vmlab.log")).unwrap();
    assert!(serial(&log, "hidden-line") && serial(&log, "shown-line"), "{log}");
    assert_eq!(suite_and_script_times(&out.join("junit.xml")), (true, 9));
    assert_nothing_left(&runs);
}

/// Whether the suite's time is the whole script's case's (the wall time, not
/// the sum of overlapping cases), and how many cases there are.
fn suite_and_script_times(junit: &Path) -> (bool, usize) {
    let xml = std::fs::read_to_string(junit).unwrap();
    let time_of = |tag: &str| {
        let at = xml.find(tag).unwrap_or_else(|| panic!("no {tag} in {xml}"));
        let rest = &xml[at..];
        let start = rest.find(" time=\"").unwrap() + 7;
        rest[start..start + rest[start..].find('"').unwrap()].to_string()
    };
    (time_of("<testsuite ") == time_of("name=\"test.py\""), xml.matches("<testcase ").count())
}
