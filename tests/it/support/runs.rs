//! Helpers for tests that run `vmlab test` and `vmlab up`: specs of the
//! default guest or of stand-in machines, runs with a private TMPDIR, what
//! a run leaves behind, scripts and their reports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{fixtures, processes_mentioning, run, vmlab, webserver_guest, Lines, PATIENCE};

/// A spec of the default guest: `names` on vlan 1, 128 MiB each.
pub(crate) fn spec(tmp: &Path, name: &str, names: &[&str]) -> PathBuf {
    let g = webserver_guest();
    let node = json!({"kernel": g.join("kernel"), "initrd": g.join("initrd"), "memory": 128, "cmdline": "quiet"});
    write_spec(tmp, json!({"name": name, "nodes": nodes(names, &node)}))
}

/// The same network of stand-in machines (tests/fixtures/runtime/fake-qemu):
/// QEMU's process and sockets without a guest, for what needs no guest.
pub(crate) fn stand_in_spec(tmp: &Path, name: &str, names: &[&str]) -> PathBuf {
    for file in ["kernel", "initrd"] {
        std::fs::write(tmp.join(file), "").unwrap();
    }
    let node = json!({"kernel": tmp.join("kernel"), "initrd": tmp.join("initrd")});
    let qemu = fixtures().join("runtime/fake-qemu");
    write_spec(tmp, json!({"name": name, "nodes": nodes(names, &node), "qemu": qemu}))
}

pub(crate) fn nodes(names: &[&str], node: &serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    names.iter().map(|n| (n.to_string(), node.clone())).collect()
}

pub(crate) fn write_spec(tmp: &Path, spec: serde_json::Value) -> PathBuf {
    let path = tmp.join(format!("{}.json", spec["name"].as_str().unwrap()));
    std::fs::write(&path, spec.to_string()).unwrap();
    path
}

pub(crate) fn webserver_spec(tmp: &Path) -> PathBuf {
    spec(tmp, "webserver", &["server", "client"])
}

/// `vmlab test` (or `up`) with its session directory under `runs`.
pub(crate) fn vmlab_in(runs: &Path) -> Command {
    std::fs::create_dir_all(runs).unwrap();
    let mut cmd = vmlab();
    cmd.env_remove("XDG_RUNTIME_DIR").env("TMPDIR", runs).env_remove("NO_COLOR");
    cmd
}

/// No process mentions `needle`, at once or after a while (a killed
/// process may take a moment to go).
pub(crate) fn assert_no_process_left(needle: &Path) {
    let deadline = Instant::now() + PATIENCE;
    while !processes_mentioning(needle).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_mentioning(needle), [], "processes left behind");
}

/// Nothing of the runs under `runs` is left: no session directory, no process.
pub(crate) fn assert_nothing_left(runs: &Path) {
    assert_no_process_left(runs);
    let left: Vec<_> = std::fs::read_dir(runs).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `vmlab test NETWORK SCRIPT --out OUT ARGS`, waited for.
pub(crate) fn test_run(runs: &Path, network: &Path, script: &Path, out: &Path, args: &[&str]) -> Output {
    run(vmlab_in(runs).arg("test").arg(network).arg(script).arg("--out").arg(out).args(args))
}

/// What a passing run left: its standard error, `vmlab.log` and output directory.
pub(crate) struct Passed {
    pub stderr: String,
    pub log: String,
    pub out: PathBuf,
}

/// Writes the Python test `text` as `name` under `tmp`, runs it on
/// `network` (global timeout 900 s), and checks that it passed and left
/// nothing behind.
pub(crate) fn passing_script(tmp: &Path, network: &Path, name: &str, script_text: &str) -> Passed {
    let runs = tmp.join("runs");
    let out = tmp.join("out");
    let script = write_script(tmp, name, script_text);
    let output = test_run(&runs, network, &script, &out, &["--global-timeout", "900"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_nothing_left(&runs);
    let log = std::fs::read_to_string(out.join("vmlab.log")).unwrap();
    Passed { stderr, log, out }
}

/// The JUnit report's test cases: (name, failure message if failed).
pub(crate) fn junit_cases(path: &Path) -> Vec<(String, Option<String>)> {
    let xml = std::fs::read_to_string(path).unwrap();
    let attr = |tag: &str, name: &str| {
        let start = tag.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
        let value = &tag[start..start + tag[start..].find('"').unwrap()];
        value
            .replace("&apos;", "'")
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    };
    xml.split("<testcase ")
        .skip(1)
        .map(|case| {
            let head = &case[..case.find('>').unwrap()];
            let failure = case.find("<failure ").map(|at| attr(&case[at..], "message"));
            (attr(head, "name"), failure)
        })
        .collect()
}

pub(crate) fn write_script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Kills the child on drop, so a failing test leaves nothing running.
pub(crate) struct Running(pub(crate) Child);

impl Running {
    /// Sends `signal`, waits; the exit status and all of `lines`.
    pub(crate) fn stop(&mut self, signal: libc::c_int, lines: Lines) -> (Option<i32>, String) {
        assert_eq!(unsafe { libc::kill(self.0.id() as libc::pid_t, signal) }, 0);
        let status = self.0.wait().unwrap();
        (status.code(), lines.rest())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }
}
