//! The Python client, shipped inside the binary so `vmlab test` works from
//! anywhere (a Nix store path, `cargo install`): written out next to the
//! session, then used for the script pre-check and to run `.py` scripts.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::runtime::process::ChildGuard;

const FILES: [(&str, &str); 8] = [
    ("vmlab/__init__.py", include_str!("../../python/vmlab/__init__.py")),
    ("vmlab/check.py", include_str!("../../python/vmlab/check.py")),
    ("vmlab/connection.py", include_str!("../../python/vmlab/connection.py")),
    ("vmlab/driver.py", include_str!("../../python/vmlab/driver.py")),
    ("vmlab/errors.py", include_str!("../../python/vmlab/errors.py")),
    ("vmlab/logger.py", include_str!("../../python/vmlab/logger.py")),
    ("vmlab/machine.py", include_str!("../../python/vmlab/machine.py")),
    ("vmlab/polling_condition.py", include_str!("../../python/vmlab/polling_condition.py")),
];

/// Writes the `vmlab` package under `dir`; `dir` is then the PYTHONPATH entry.
pub fn install(dir: &Path) -> anyhow::Result<PathBuf> {
    for (name, text) in FILES {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("has a parent"))
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir.to_path_buf())
}

pub fn python3() -> anyhow::Result<PathBuf> {
    which::which("python3").map_err(|_| anyhow::anyhow!("python3 not found (Debian package: python3)"))
}

fn with_path(python: &Path, pythonpath: &Path) -> Command {
    let mut cmd = Command::new(python);
    let mut paths = vec![pythonpath.to_path_buf()];
    paths.extend(std::env::var_os("PYTHONPATH").iter().flat_map(std::env::split_paths));
    cmd.env("PYTHONPATH", std::env::join_paths(paths).expect("paths without ':'"));
    // The current directory first on sys.path would let a script named like a
    // module the client imports (copy.py) replace it (Python 3.11 and later).
    cmd.env("PYTHONSAFEPATH", "1");
    cmd
}

/// Checks a `.py` script before anything boots: its problems, one
/// `SCRIPT:LINE: message` per line, if it has any.
/// `vlans` is the value of `VMLAB_VLANS`, which the script gets too.
pub fn precheck(
    python: &Path,
    pythonpath: &Path,
    script: &Path,
    machines: &[String],
    vlans: &str,
) -> anyhow::Result<Option<String>> {
    let mut cmd = with_path(python, pythonpath);
    cmd.env("VMLAB_VLANS", vlans).arg("-m").arg("vmlab.check").arg(script).args(machines);
    let out = ChildGuard::output(cmd, "the script's check")?;
    if out.status.success() {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&out.stderr).trim_end().to_string()))
}

/// The command that runs a `.py` test script with the API and machines bound.
pub fn script_command(python: &Path, pythonpath: &Path, script: &Path, machines: &[String]) -> Command {
    let mut cmd = with_path(python, pythonpath);
    cmd.arg("-c")
        .arg("import sys, vmlab; sys.exit(vmlab.run_script(sys.argv[1], sys.argv[2:]))")
        .arg(script)
        .args(machines);
    cmd
}

/// An interactive Python prompt with the API and machines bound; with a
/// script, `test_script()` runs it (as in the NixOS driver).
pub fn interactive_command(python: &Path, pythonpath: &Path, machines: &[String], script: Option<&Path>) -> Command {
    let mut cmd = with_path(python, pythonpath);
    cmd.arg("-i")
        .arg("-c")
        .arg("import sys, vmlab; globals().update(vmlab.interactive(sys.argv[1], sys.argv[2:]))")
        .arg(script.map(Path::as_os_str).unwrap_or_default())
        .args(machines);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every module of python/vmlab is shipped: one left out would be
    /// missing only where vmlab runs from its binary alone.
    #[test]
    fn every_module_is_shipped() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/vmlab");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| format!("vmlab/{}", e.unwrap().file_name().to_string_lossy()))
            .filter(|name| name.ends_with(".py"))
            .collect();
        on_disk.sort();
        let shipped: Vec<String> = FILES.iter().map(|(name, _)| name.to_string()).collect();
        assert_eq!(shipped, on_disk);
    }
    use crate::driver::control::{serve, Driver};
    use crate::driver::log::Log;
    use crate::driver::machine::DrivenMachine;
    use crate::driver::testing::{busybox_bin, LocalVm};
    use std::sync::Arc;

    fn script(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("test.py");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn precheck_catches_syntax_and_unknown_names_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let py = install(&dir.path().join("py")).unwrap();
        let machines = vec!["server".to_string(), "client-1".to_string()];
        let ok = script(dir.path(), "import os\nstart_all()\nserver.succeed('true')\nclient_1.fail('false')\nwith subtest('x'):\n    retry(lambda last: True)\nmachines[0].log(os.sep)\n");
        assert_eq!(precheck(&python3().unwrap(), &py, &ok, &machines, "").unwrap(), None);
        // What a NixOS testScript sees without importing it.
        let nixos = script(
            dir.path(),
            "log(os.getcwd(), vlans, vlan1.nr, vlan7, machines_qemu, machines_nspawn, debug, t)\n\
             @polling_condition(seconds_interval=1)\ndef fine():\n    return True\n\
             def later():\n    run_tests(); test_script(); create_machine('x'); serial_stdout_off(); serial_stdout_on()\n\
             assert isinstance(server, Machine) and isinstance(client_1, BaseMachine)\n",
        );
        assert_eq!(precheck(&python3().unwrap(), &py, &nixos, &machines, "1 7").unwrap(), None);
        let typo = script(dir.path(), "start_all()\n\nsever.succeed('true')\npolling_conditon\nvlan2\nmachine\n");
        let e = precheck(&python3().unwrap(), &py, &typo, &machines, "1 7").unwrap().expect("problems");
        assert!(
            e.contains("test.py:3: name 'sever' is not defined; did you mean 'server'? (machines: client_1, server)"),
            "{e}"
        );
        assert!(
            e.contains("test.py:4: name 'polling_conditon' is not defined; did you mean 'polling_condition'?"),
            "{e}"
        );
        assert!(e.contains("test.py:5: name 'vlan2' is not defined"), "{e}");
        // `machine` names the only machine, so with two it is a mistake.
        assert!(e.contains("test.py:6: name 'machine' is not defined"), "{e}");
        let one = script(dir.path(), "machine.succeed('true')\n");
        assert_eq!(precheck(&python3().unwrap(), &py, &one, &["solo".to_string()], "").unwrap(), None);
        let broken = script(dir.path(), "x = (\n");
        let e = precheck(&python3().unwrap(), &py, &broken, &machines, "").unwrap().expect("problems");
        assert!(e.contains("test.py:1: syntax error"), "{e}");
    }

    /// The client's pure helpers, as tables, in Python.
    #[test]
    fn client_helpers_map_keys_parse_units_and_find_listening_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let py = install(&dir.path().join("py")).unwrap();
        let unix = dir.path().join("unix");
        std::fs::write(
            &unix,
            "Num       RefCount Protocol Flags    Type St Inode Path\n\
             0000000000000000: 00000002 00000000 00010000 0001 01 101 /run/app.sock\n\
             0000000000000000: 00000002 00000000 00010000 0001 01 102 /run/with space\n\
             0000000000000000: 00000003 00000000 00000000 0001 03 103 /run/connected\n\
             0000000000000000: 00000002 00000000 00000000 0002 01 104 /dev/log\n",
        )
        .unwrap();
        let check = format!(
            r#"
import subprocess, vmlab
keys = {{"a": "a", "A": "shift-a", "1": "1", "!": "shift-1", " ": "spc", "\n": "ret", "_": "shift-minus",
        '"': "shift-apostrophe", "~": "shift-grave_accent", "/": "slash", "ctrl-alt-delete": "ctrl-alt-delete"}}
for char, name in keys.items():
    assert vmlab.key_name(char) == name, (char, vmlab.key_name(char))
assert vmlab.unit_properties("Id=a.service\nActiveState=active\nExecStart={{ path=/bin/x ; argv[]=/bin/x a=b }}\nnoise\n") == {{
    "Id": "a.service", "ActiveState": "active", "ExecStart": "{{ path=/bin/x ; argv[]=/bin/x a=b }}"}}
for path, datagram, listening in [
    ("/run/app.sock", False, True), ("/run/with space", False, True), ("/run/connected", False, False),
    ("/dev/log", True, True), ("/dev/log", False, False), ("/run/app.sock", True, False), ("/run/app", False, False),
]:
    command = vmlab.unix_socket_check(path, datagram).replace("/proc/net/unix", {unix:?})
    assert (subprocess.run(["sh", "-c", command]).returncode == 0) == listening, (path, datagram)
"#,
            unix = unix.display().to_string()
        );
        let out = with_path(&python3().unwrap(), &py).arg("-c").arg(check).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// A driver of `machines` serving its control socket in `dir`.
    fn served(dir: &Path, machines: Vec<DrivenMachine>, log: Arc<Log>) -> (Arc<Driver>, PathBuf) {
        let driver = Arc::new(Driver::new(machines, log));
        let sock = dir.join("control.sock");
        serve(driver.clone(), &sock).unwrap();
        (driver, sock)
    }

    /// `sys.exit()` ends a script as in the NixOS driver: with nothing or 0 it
    /// passes, otherwise it fails, saying where and why; so does the subtest
    /// it ends in.
    #[test]
    fn sys_exit_ends_the_script_passing_only_without_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Log::new(Box::new(std::io::sink()), false, None));
        let (driver, sock) = served(dir.path(), vec![], log.clone());
        let py = install(&dir.path().join("py")).unwrap();
        let cases = [
            ("sys.exit(0)", 0, None),
            ("sys.exit()", 0, None),
            ("sys.exit(None)", 0, None),
            ("exit()", 0, None),
            ("sys.exit(3)", 3, Some("sys.exit(3)")),
            ("sys.exit(256)", 1, Some("sys.exit(256)")),
            ("sys.exit('the server is down')", 1, Some("the server is down")),
        ];
        for (statement, status, why) in cases {
            let text =
                format!("import sys\nwith subtest('ends'):\n    {statement}\nraise AssertionError('not ended')\n");
            let run = script_command(&python3().unwrap(), &py, &script(dir.path(), &text), &[])
                .env("VMLAB_SOCKET", &sock)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert_eq!(run.status.code(), Some(status), "{statement}: {stderr}");
            let said = why.map(|why| format!("test.py at line 3: {why}"));
            assert_eq!(stderr.lines().last().map(str::to_string), said, "{statement}");
            let (subtests, _) = log.records();
            assert_eq!(subtests.last().unwrap().failure.as_deref(), why, "{statement}");
        }
        driver.release_all();
    }

    /// A NixOS-style script, unchanged, against local busybox "machines".
    #[test]
    fn nixos_style_script_runs_through_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let bin = busybox_bin(dir.path());
        let log = Arc::new(Log::new(Box::new(std::io::sink()), false, None));
        let out = dir.path().join("out");
        let machines: Vec<DrivenMachine> = ["client", "server"]
            .iter()
            .map(|n| {
                DrivenMachine::new(n, vec![], Box::new(LocalVm::new(&dir.path().join(n), &bin)), &out, log.clone())
            })
            .collect();
        let (driver, sock) = served(dir.path(), machines, log.clone());
        let py = install(&dir.path().join("py")).unwrap();
        let guest = dir.path().join("guest");
        let test = script(
            dir.path(),
            &format!(
                r#"
start_all()
server.succeed("mkdir -p {g} && echo hello > {g}/page")
with subtest("the page is there"):
    server.wait_until_succeeds("test -s {g}/page")
    assert client.succeed("cat {g}/page") == "hello\n"
    client.fail("false")
    status, output = client.execute("echo out; exit 3")
    assert (status, output) == (3, "out\n"), (status, output)
try:
    server.succeed("false")
except RequestedAssertionFailed as e:
    assert "exit code 1" in str(e)
else:
    raise AssertionError("succeed did not raise")
server.wait_for_file("{g}/page")
server.copy_from_vm("{g}/page", "fetched")
retry(lambda last_try: True)
assert server.execute("echo gone; exit 4", check_return=False) == (-1, "gone\n")
assert server.execute("touch {g}/later", check_output=False) == (-2, "")
server.wait_for_file("{g}/later")
import socket
listener = socket.socket(socket.AF_UNIX)
listener.bind("{g}/listen.sock")
import vmlab
server.fail(vmlab.unix_socket_check("{g}/listen.sock", False))
listener.listen()
server.wait_for_open_unix_socket("{g}/listen.sock", timeout=30)
checks = []
@polling_condition(seconds_interval=0)
def flag_absent():
    "no flag file"
    checks.append(1)
    return server.execute("test -e {g}/flag")[0] != 0
with flag_absent:
    server.succeed("true")
    server.succeed("touch {g}/flag")
    try:
        client.succeed("true")
    except RequestedAssertionFailed as e:
        assert "polling condition failed: no flag file" in str(e), e
    else:
        raise AssertionError("the polling condition did not fail")
assert len(checks) == 3, checks
client.succeed("true")
# During a long wait too: the flag appears while server waits for a file that never comes.
server.succeed("rm {g}/flag")
import threading
threading.Timer(1, lambda: client.succeed("touch {g}/flag")).start()
with polling_condition(flag_absent.fun, seconds_interval=0.5):
    try:
        server.wait_for_file("{g}/never", timeout=120)
    except RequestedAssertionFailed as e:
        assert "polling condition failed: no flag file" in str(e), e
    else:
        raise AssertionError("the wait outlived a failed polling condition")
with subtest("fails"):
    client.succeed("exit 7")
"#,
                g = guest.display()
            ),
        );
        let run = script_command(&python3().unwrap(), &py, &test, &driver.machine_names())
            .env("VMLAB_SOCKET", &sock)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            stderr
                .trim_end()
                .ends_with("RequestedAssertionFailed: machine client: command `exit 7` failed (exit code 7)"),
            "{stderr}"
        );
        assert_eq!(run.status.code(), Some(1));
        assert_eq!(std::fs::read_to_string(out.join("fetched/page")).unwrap(), "hello\n");
        let (subtests, _) = log.records();
        let verdicts: Vec<(&str, bool)> = subtests.iter().map(|s| (s.name.as_str(), s.failure.is_none())).collect();
        assert_eq!(verdicts, [("the page is there", true), ("fails", false)]);
        assert!(subtests[1].failure.as_deref().unwrap().contains("command `exit 7` failed (exit code 7)"));
        driver.release_all();
    }
}
