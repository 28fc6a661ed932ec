//! The data channel on real VMs (the default guest): commands move to a
//! shell on the `vmlab.data` virtio-serial port once the backdoor answers,
//! again after a reboot, and a run script without the port is driven over
//! the backdoor console as before.

use std::path::Path;

use serde_json::json;

use crate::support::{passing_script, text};
use crate::support::{run, vmlab, webserver_guest};
use vmlab::layout;

/// A spec of the default guest: one machine, `server`, with `memory` MiB.
fn one_machine(tmp: &Path, memory: u32) -> std::path::PathBuf {
    spec_of(tmp, webserver_guest(), memory)
}

/// A spec of one machine, `server`, of the guest in `g`.
fn spec_of(tmp: &Path, g: &Path, memory: u32) -> std::path::PathBuf {
    let node = json!({"kernel": g.join("kernel"), "initrd": g.join("initrd"), "memory": memory, "cmdline": "quiet"});
    let path = tmp.join("one.json");
    std::fs::write(&path, json!({"name": "one", "nodes": {"server": node}}).to_string()).unwrap();
    path
}

/// How many times the log says the machine's commands go over `channel`.
fn channel_lines(log: &str, channel: &str) -> usize {
    log.lines().filter(|l| l.contains(&format!("commands and copies go over {channel}"))).count()
}

const DATA_PORT: &str = r#"
import hashlib

# 24 MiB of random bytes, in base64: 32 MiB of output.
server.succeed("head -c 25165824 /dev/urandom | base64 > /tmp/blob")
want = server.succeed("sha256sum /tmp/blob").split()[0]
out = server.succeed("cat /tmp/blob")
assert len(out) > 32 * 1024 * 1024, len(out)
assert hashlib.sha256(out.encode()).hexdigest() == want, "the output changed on the way"
# Output through a reopened /dev/stderr moves no offset of the shell's: it still comes back.
out = server.execute("echo hi | tee /dev/stderr >/dev/null; echo done")
assert out == (0, "done\n"), out
assert server.succeed("echo err >/dev/stderr; echo ok") == "ok\n"
server.reboot()
assert server.succeed("echo again") == "again\n"
"#;

#[test]
fn commands_go_over_the_data_port_whole_and_again_after_a_reboot() {
    let tmp = tempfile::tempdir().unwrap();
    let log = passing_script(tmp.path(), &one_machine(tmp.path(), 256), "data.py", DATA_PORT).log;
    assert_eq!(channel_lines(&log, "the data port /dev/vport"), 2, "once per boot: {log}");
    assert_eq!(channel_lines(&log, "the backdoor console"), 0, "{log}");
}

const TIMEOUTS: &str = r#"
import time

def timed(command, timeout):
    started = time.monotonic()
    status, out = server.execute(command, timeout=timeout)
    took = time.monotonic() - started
    assert took < 60, (command, took)
    return status, out

def running():
    # The guest has no pgrep: the command lines of its processes, from /proc.
    out = server.succeed("for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' <$f 2>/dev/null || :; echo; done")
    return [line.strip() for line in out.splitlines()]

# What another command left running is no business of this one's timeout.
server.succeed("sleep 1001 >/dev/null 2>&1 &")
assert timed("echo started; sleep 1000 & sleep 1000", 3) == (143, "started\n")
assert "sleep 1000" not in running() and "sleep 1001" in running(), running()
assert timed("trap '' TERM; sleep 1000 & sleep 1000", 3)[0] == 137
assert "sleep 1000" not in running(), running()
assert server.succeed("echo ok") == "ok\n"
assert timed("sleep 1; echo in time", 30) == (0, "in time\n")
server.succeed("rm -f /tmp/tries")
server.wait_until_succeeds("echo x >> /tmp/tries; [ $(wc -l < /tmp/tries) -ge 3 ]", timeout=60)
"#;

/// On the data port the host stops a command at its timeout, through the
/// backdoor shell: SIGTERM, then SIGKILL, to the command and all it
/// started, never to anything else.
#[test]
fn the_host_stops_a_command_of_the_data_port_at_its_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let log = passing_script(tmp.path(), &one_machine(tmp.path(), 192), "timeouts.py", TIMEOUTS).log;
    assert_eq!(channel_lines(&log, "the data port /dev/vport"), 1, "{log}");
    let stopped: Vec<&str> = log.lines().filter(|l| l.contains(", stopped at its timeout")).collect();
    assert_eq!(stopped.len(), 2, "{log}");
    assert!(stopped[0].contains("exit 143") && stopped[1].contains("exit 137"), "{stopped:?}");
}

const COPIES: &str = r#"
import hashlib, os, stat

# 64 MiB each way through a 256 MiB guest, whose /tmp cannot hold two copies.
data = os.urandom(64 * 1024 * 1024)
src = os.path.join(driver.out_dir, "big")
with open(src, "wb") as f:
    f.write(data)
server.copy_to_vm(src, "/tmp/big")
os.remove(src)
assert server.succeed("sha256sum /tmp/big").split()[0] == hashlib.sha256(data).hexdigest(), "copied in"
back = server.copy_from_vm("/tmp/big", "back")
with open(back, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(data).hexdigest(), "copied out"
os.remove(back)
server.succeed("rm /tmp/big")

# A directory keeps its modes, never a setuid bit.
server.succeed("mkdir -p /tmp/d/sub && echo x > /tmp/d/sub/f && chmod 750 /tmp/d/sub && chmod 4755 /tmp/d/sub/f")
d = server.copy_from_vm("/tmp/d", "")
assert stat.S_IMODE(os.stat(os.path.join(d, "sub")).st_mode) == 0o750
assert stat.S_IMODE(os.stat(os.path.join(d, "sub/f")).st_mode) == 0o755
server.copy_to_vm(d, "/tmp/again")
assert server.succeed("stat -c %a /tmp/again/sub /tmp/again/sub/f") == "750\n755\n"

# Failures say why, in the guest's words.
for call, words in [
    (lambda: server.copy_from_vm("/nonexistent/x", ""), "/nonexistent/x"),
    (lambda: server.copy_to_vm(d, "/proc/version/below"), "/proc/version/below"),
]:
    try:
        call()
    except Exception as e:
        message = str(e)
        assert "machine server: cannot copy" in message and words in message, message
        assert "exit code" in message and "said nothing" not in message, message
        print("failure:", message)
    else:
        raise AssertionError("the copy did not fail")
assert server.succeed("echo still") == "still\n"

# A full /tmp, where a copy stages its pieces: the guest's words still come back.
server.succeed("head -c 3000000 /dev/urandom > /blob && mount -t tmpfs -o size=1m tmpfs /tmp")
server.succeed("dd if=/dev/zero of=/tmp/fill bs=4096 2>/dev/null || true")
for call in [lambda: server.copy_from_vm("/blob", ""), lambda: server.copy_to_vm(src, "/blob2")]:
    with open(src, "wb") as f:
        f.write(os.urandom(3000000))
    try:
        call()
    except Exception as e:
        assert "machine server: cannot copy" in str(e) and "No space left on device" in str(e), str(e)
    else:
        raise AssertionError("the copy into a full /tmp did not fail")
server.succeed("rm /tmp/fill")
assert server.succeed("echo room again") == "room again\n"
server.succeed("umount -l /tmp")
"#;

#[test]
fn copies_of_64_mib_stream_both_ways_through_a_small_guest() {
    let tmp = tempfile::tempdir().unwrap();
    passing_script(tmp.path(), &one_machine(tmp.path(), 256), "copies.py", COPIES);
}

const FALLBACK: &str = r#"
import os

assert server.succeed("echo over hvc0") == "over hvc0\n"
src = os.path.join(driver.out_dir, "small")
with open(src, "wb") as f:
    f.write(os.urandom(100000))
server.copy_to_vm(src, "/tmp/small")
back = server.copy_from_vm("/tmp/small", "back")
assert open(back, "rb").read() == open(src, "rb").read(), "copied back"
server.fail("false")
# The guest's `timeout` stops a command here: nothing else could.
status, _ = server.execute("sleep 1000", timeout=2)
assert status in (124, 143), status
"#;

#[test]
fn a_run_script_without_the_data_port_is_driven_over_the_backdoor_console() {
    let tmp = tempfile::tempdir().unwrap();
    let built = tmp.path().join("built");
    let made = run(vmlab().arg("build").arg(one_machine(tmp.path(), 192)).arg("--out").arg(&built));
    assert!(made.status.success(), "{}", text(&made.stderr));
    let run_script = built.join(layout::run_script("server"));
    let original = std::fs::read_to_string(&run_script).unwrap();
    let without: String = original
        .lines()
        .filter(|l| !l.contains("id=data,") && !l.contains("virtserialport"))
        .map(|l| format!("{l}\n"))
        .collect();
    // Both ways of starting (its own channels, a nixpkgs driver's) lose the port.
    assert!(original.contains("vmlab.data") && !without.contains("vmlab.data"), "{original}");
    std::fs::write(&run_script, without).unwrap();
    let log = passing_script(tmp.path(), &built, "fallback.py", FALLBACK).log;
    assert_eq!(channel_lines(&log, "the backdoor console hvc0: the run script gives it no data port"), 1, "{log}");
}

const BUSYBOX_ONLY: &str = r#"
import hashlib, os

assert server.succeed("readlink /proc/$$/exe").strip().endswith("busybox")
server.succeed("head -c 12582912 /dev/urandom | base64 > /tmp/blob")
want = server.succeed("sha256sum /tmp/blob").split()[0]
assert hashlib.sha256(server.succeed("cat /tmp/blob").encode()).hexdigest() == want
data = os.urandom(16 * 1024 * 1024)
src = os.path.join(driver.out_dir, "in")
with open(src, "wb") as f:
    f.write(data)
server.copy_to_vm(src, "/tmp/in")
back = server.copy_from_vm("/tmp/in", "back")
assert open(back, "rb").read() == data, "copied in and out"
# Stopped at its timeout by a busybox backdoor shell, and the data port's shell goes on.
assert server.execute("sleep 1000 & sleep 1000", timeout=2)[0] == 143
assert server.succeed("echo after") == "after\n"
"#;

#[test]
fn a_guest_whose_only_shell_is_busybox_uses_the_data_port_too() {
    let tmp = tempfile::tempdir().unwrap();
    let guest = tmp.path().join("guest");
    let built = run(vmlab().arg("guest").arg("--out").arg(&guest).arg("--no-bash"));
    assert!(built.status.success(), "{}", text(&built.stderr));
    let log = passing_script(tmp.path(), &spec_of(tmp.path(), &guest, 256), "busybox.py", BUSYBOX_ONLY).log;
    assert_eq!(channel_lines(&log, "the data port /dev/vport"), 1, "{log}");
}

const UNDER_LOAD: &str = r#"
import hashlib, os, threading

start_all()
failures = []

def copy_out(m):
    try:
        for round in range(5):
            m.succeed(f"head -c 8388608 /dev/urandom > /tmp/blob{round}")
            want = m.succeed(f"sha256sum /tmp/blob{round}").split()[0]
            path = m.copy_from_vm(f"/tmp/blob{round}", m.name)
            with open(path, "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
            os.remove(path)
            if got != want:
                failures.append(f"{m.name} round {round}: the copy changed")
    except Exception as e:
        failures.append(f"{m.name}: {e}")

threads = [threading.Thread(target=copy_out, args=(m,)) for m in machines]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert failures == [], failures
"#;

/// Both host cores busy, three machines copying 8 MiB out at once, five
/// rounds: every copy byte-exact, none failed, and the console needed no
/// recovery (no reply asked for again, no probe), since nothing goes over it.
#[test]
fn copies_under_load_from_three_machines_are_exact_with_no_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let g = webserver_guest();
    let node = json!({"kernel": g.join("kernel"), "initrd": g.join("initrd"), "memory": 192, "cmdline": "quiet"});
    let spec = tmp.path().join("load.json");
    std::fs::write(&spec, json!({"name": "load", "nodes": {"a": node, "b": node, "c": node}}).to_string()).unwrap();
    let busy: Vec<Busy> = (0..2).map(|_| Busy::new()).collect();
    let log = passing_script(tmp.path(), &spec, "load.py", UNDER_LOAD).log;
    drop(busy);
    assert_eq!(channel_lines(&log, "the data port"), 3, "{log}");
    assert!(log.contains("backdoor console: 0 replies asked for again, 0 probes sent"), "{log}");
}

/// A host process keeping one core busy (`yes > /dev/null`), killed on drop.
struct Busy(std::process::Child);

impl Busy {
    fn new() -> Busy {
        Busy(std::process::Command::new("sh").args(["-c", "exec yes > /dev/null"]).spawn().expect("cannot start yes"))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
