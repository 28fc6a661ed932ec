//! What a test script can rely on around it: nothing it starts outlives
//! the test; its output directory is its own. None of these scripts
//! touches a machine, so none boots.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{
    assert_no_process_left, assert_nothing_left, spec, test_run, text, vmlab_in, write_script, Running,
};
use crate::support::{processes_mentioning, Lines};

/// A number no other process has on its command line: `sleep MARKER` is
/// how a test finds the processes its script started.
fn marker(test: u32) -> PathBuf {
    PathBuf::from(format!("1234.{}{test}", std::process::id()))
}

/// A script starting `sleep MARKER` three ways: a child it does not wait
/// for, one in a new session, and one a shell leaves behind (a double fork).
fn script_leaving_sleepers(dir: &Path, marker: &Path, then: &str) -> PathBuf {
    let m = marker.display();
    let text = format!(
        "import subprocess, sys, time\n\
         subprocess.Popen(['sleep', '{m}'])\n\
         subprocess.Popen(['sleep', '{m}'], start_new_session=True)\n\
         subprocess.Popen(['sh', '-c', 'sleep {m} &']).wait()\n\
         {then}\n"
    );
    write_script(dir, "sleepers.py", &text)
}

fn sleepers(marker: &Path) -> Vec<(u32, String)> {
    processes_mentioning(marker).into_iter().filter(|(_, cmdline)| cmdline.starts_with("sleep ")).collect()
}

#[test]
fn a_killed_vmlab_test_leaves_none_of_the_scripts_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let marker = marker(1);
    let script = script_leaving_sleepers(tmp.path(), &marker, "print('started', flush=True)\ntime.sleep(1000)");
    let mut cmd = vmlab_in(&runs);
    cmd.arg("test").arg(spec(tmp.path(), "one", &["server"])).arg(&script).arg("--out").arg(tmp.path().join("out"));
    let mut child = Running(cmd.stdin(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
    let mut lines = Lines::of(child.0.stderr.take().unwrap());
    lines.wait_for("] started");
    // The shell's child may not have become `sleep` yet.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sleepers(&marker).len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sleepers(&marker).len(), 3, "{:?}", sleepers(&marker));
    let (status, stderr) = child.stop(libc::SIGKILL, lines);
    assert_eq!(status, None, "{stderr}");
    assert_no_process_left(&marker);
    assert_no_process_left(&runs);
}

#[test]
fn a_script_that_exits_leaves_none_of_its_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let marker = marker(2);
    let script = script_leaving_sleepers(tmp.path(), &marker, "sys.exit(0)");
    let output = test_run(&runs, &spec(tmp.path(), "one", &["server"]), &script, &tmp.path().join("out"), &[]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("] test passed ("), "{stderr}");
    // Gone before vmlab ended, not only killed: reaped.
    assert_eq!(sleepers(&marker), [], "{stderr}");
    assert_nothing_left(&runs);
}

#[test]
fn an_output_directory_another_run_holds_is_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let network = spec(tmp.path(), "one", &["server"]);
    let script = write_script(tmp.path(), "pass.py", "log('passing')\n");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("vmlab.log"), "the other run's log\n").unwrap();
    // As a run holds it.
    let held = std::fs::File::open(&out).unwrap();
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    let output = test_run(&runs, &network, &script, &out, &[]);
    let out_path = std::fs::canonicalize(&out).unwrap();
    let in_use = format!("error: output directory {} is in use by another vmlab test\n", out_path.display());
    assert_eq!((output.status.code(), text(&output.stderr)), (Some(2), in_use));
    assert_eq!(std::fs::read_to_string(out.join("vmlab.log")).unwrap(), "the other run's log\n");
    drop(held);
    let output = test_run(&runs, &network, &script, &out, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_nothing_left(&runs);
}

/// A tmpfs mounted on a directory while it lives.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` where mounting is not permitted (not root): skipped.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let mount =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).output();
        let why = match mount {
            Ok(out) if out.status.success() => return Some(Tmpfs(dir.to_owned())),
            Ok(out) => text(&out.stderr),
            Err(e) => format!("cannot run mount: {e}"),
        };
        crate::support::skip(&format!("cannot mount a tmpfs on {}: {}", dir.display(), why.trim()));
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The script fills the output directory's disk: the reports cannot be
/// written, which is the run's error, said with the file; no verdict is
/// said, no empty or partial report left; the log file's failure is said
/// when it happens.
#[test]
fn reports_that_cannot_be_written_are_the_runs_error_and_no_verdict_is_said() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let Some(disk) = Tmpfs::mount(&tmp.path().join("out"), "1m") else { return };
    let fill = "import os\n\
                with open(os.path.join(os.environ['VMLAB_OUT'], 'filler'), 'wb', buffering=0) as f:\n    \
                    try:\n        \
                        while True:\n            \
                            f.write(b'x' * 65536)\n    \
                    except OSError as e:\n        \
                        print('filled:', e)\n\
                # More than the log file's last page holds.\n\
                for i in range(200):\n    \
                    print('after the disk filled', i)\n";
    let script = write_script(tmp.path(), "fill.py", fill);
    let output = test_run(&runs, &spec(tmp.path(), "one", &["server"]), &script, &disk.0, &[]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let out = std::fs::canonicalize(&disk.0).unwrap();
    let full = "No space left on device (os error 28)";
    let warning = format!("warning: cannot write {}: {full}; the log file ends here", out.join("vmlab.log").display());
    assert_eq!(stderr.matches(&warning).count(), 1, "{stderr}");
    assert_eq!(
        stderr.lines().last(),
        Some(format!("error: cannot write {}: {full}", out.join("junit.xml").display()).as_str())
    );
    assert!(!stderr.contains("test passed"), "{stderr}");
    let mut left: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["filler", "vmlab.log"]);
    assert_nothing_left(&runs);
}

/// A script that cannot start (its interpreter is missing) is vmlab's
/// error, exit 2, not a failed test, though it runs under the reaper.
#[test]
fn a_script_that_cannot_start_is_a_harness_error() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let script = write_script(tmp.path(), "bad.sh", "#!/nonexistent/interpreter\ntrue\n");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = tmp.path().join("out");
    let output = test_run(&runs, &spec(tmp.path(), "bad", &["server"]), &script, &out, &[]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot start"), "{stderr}");
    assert!(stderr.contains("No such file or directory (os error 2) (the interpreter its #! line names)"), "{stderr}");
    assert_nothing_left(&runs);
}
