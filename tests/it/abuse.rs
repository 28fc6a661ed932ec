//! vmlab used as an attacker or a careless user would. A guest is hostile:
//! what comes out of it never gains privileges on the host nor lands outside
//! its target, and a process it leaves running never reaches another
//! command's output. QEMU-level operations and a crash from another
//! thread do not wait for a running command. On a real VM (the default guest, whose commands run as
//! root), with host-side checks in the test script itself.

use crate::support::{junit_cases, passing_script, Passed};

const SCRIPT: &str = r#"
import io, os, stat, tarfile, threading, time

start_all()
out = driver.out_dir

with subtest("a copy out keeps no owner, special bit, device node or FIFO"):
    machine.succeed(
        "mkdir -p /tmp/tools/ro && cp /bin/busybox /tmp/tools/euid && chmod 6755 /tmp/tools/euid",
        "echo mine > /tmp/tools/owned && chown 1234:1234 /tmp/tools/owned",
        "mknod /tmp/tools/disk b 254 0 && chmod 666 /tmp/tools/disk && mkfifo /tmp/tools/pipe",
        "ln -s /etc/passwd /tmp/tools/passwd && chmod 1777 /tmp/tools && chmod 555 /tmp/tools/ro",
    )
    tools = machine.copy_from_vm("/tmp/tools", "safe")
    mode = lambda p: stat.S_IMODE(os.lstat(os.path.join(tools, p)).st_mode)
    assert mode("euid") == 0o755, oct(mode("euid"))
    assert mode(".") == 0o777, oct(mode("."))
    assert mode("ro") == 0o755, oct(mode("ro"))
    for p in ["euid", "owned", "ro", "."]:
        st = os.lstat(os.path.join(tools, p))
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()), (p, st.st_uid, st.st_gid)
    assert not os.path.lexists(os.path.join(tools, "disk"))
    assert not os.path.lexists(os.path.join(tools, "pipe"))
    assert os.readlink(os.path.join(tools, "passwd")) == "/etc/passwd"
    with open(os.path.join(tools, "owned")) as f:
        assert f.read() == "mine\n"

with subtest("an archive that leads out of the target is refused, and nothing is written"):
    outside = os.path.join(out, "outside")
    os.mkdir(outside)
    def evil(entries):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
            for name, kind, link in entries:
                info = tarfile.TarInfo(name)
                info.type = kind
                info.linkname = link
                t.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
        return buf.getvalue()
    archives = {
        "dotdot": evil([("tools/../../escaped", tarfile.REGTYPE, "")]),
        "absolute": evil([(outside + "/absolute", tarfile.REGTYPE, "")]),
        "through-a-link": evil([("tools/l", tarfile.SYMTYPE, outside), ("tools/l/planted", tarfile.REGTYPE, "")]),
    }
    for name, data in archives.items():
        path = os.path.join(out, name + ".tar")
        with open(path, "wb") as f:
            f.write(data)
        machine.copy_to_vm(path, "/tmp/evil/" + name + ".tar")
    # The guest's own tar now answers every copy out with the archive named in /tmp/evil/which.
    machine.succeed(
        "rm /bin/tar && printf '#!/bin/sh\\ncat /tmp/evil/$(cat /tmp/evil/which).tar > \"$4\"\\n' > /bin/tar && chmod +x /bin/tar"
    )
    for name in archives:
        machine.succeed(f"echo {name} > /tmp/evil/which")
        try:
            machine.copy_from_vm("/tmp/tools", "evil")
        except RequestedAssertionFailed as e:
            assert "refusing the archive" in str(e), e
        else:
            raise AssertionError(name + ": the archive was unpacked")
    assert os.listdir(outside) == [], os.listdir(outside)
    assert not os.path.lexists(os.path.join(out, "escaped"))
    assert os.listdir(os.path.join(out, "evil")) == [], os.listdir(os.path.join(out, "evil"))

with subtest("a background writer never reaches a later command's output"):
    machine.succeed("(while :; do echo daemon-log; sleep 0.05; done) &")
    for i in range(10):
        assert machine.succeed(f"sleep 0.1; echo hi{i}") == f"hi{i}\n"
    # As fast as the guest can write (bounded, so the guest's memory holds).
    machine.succeed("(sleep 1; yes daemon-log-line | head -c 20000000) &")
    for i in range(10):
        assert machine.succeed(f"sleep 0.2; echo fast{i}", timeout=60) == f"fast{i}\n"

with subtest("QEMU-level operations and a crash from another thread do not wait for a running command"):
    failures = []
    def sleeper():
        try:
            # Had anything below waited for it, this would succeed after 60 s.
            machine.succeed("sleep 60")
        except MachineError as e:
            failures.append(str(e))
    running = threading.Thread(target=sleeper)
    running.start()
    time.sleep(1)  # the machine is up: the sleeper's command is running by then
    assert "running" in machine.send_monitor_command("info status")
    machine.block()
    machine.unblock()
    assert running.is_alive(), "the monitor command waited for the running one"
    machine.crash()
    running.join()
    assert failures == ["machine machine: crashed on request (crash()) while this ran"], failures
    assert machine.succeed("echo restarted") == "restarted\n"

with subtest("a shutdown from another thread powers the guest off while a command runs"):
    failures = []
    running = threading.Thread(target=sleeper)
    running.start()
    time.sleep(1)
    machine.shutdown()
    running.join()
    assert failures == ["machine machine: shut down on request (shutdown()) while this ran"], failures
    assert not machine.is_up()
    assert machine.succeed("echo again") == "again\n"
"#;

#[test]
fn a_hostile_guest_cannot_plant_files_or_mix_output_and_qemu_operations_are_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = crate::support::spec(tmp.path(), "hostile", &["machine"]);
    let Passed { stderr, out, .. } = passing_script(tmp.path(), &spec, "hostile.py", SCRIPT);
    let cases = junit_cases(&out.join("junit.xml"));
    assert_eq!(cases.len(), 6, "{cases:?}");
    assert!(stderr.contains("warning: copy of /tmp/tools: left out \"tools/disk\" (a block device)"), "{stderr}");
    assert!(stderr.contains("left out \"tools/pipe\" (a FIFO)"), "{stderr}");
}
