//! `vmlab plan` and `vmlab build`: golden files, determinism, error handling.
//! Regenerate the golden files with `UPDATE_GOLDEN=1 cargo test --test it build::`
//! and review the diff.

use std::fs;
use std::path::{Path, PathBuf};

use crate::support::{fixtures, repo_root, run, vmlab};
use vmlab::layout;

const GOLDEN_SPECS: [&str; 3] = ["webserver", "vlans", "nixos"];

fn spec(name: &str) -> PathBuf {
    fixtures().join("specs").join(format!("{name}.json"))
}

/// Every file below `dir`, relative, sorted, with its bytes.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((rel, fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Machine-specific paths made stable for golden comparison.
fn normalise(bytes: &[u8], out: &Path) -> String {
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .replace(&fixtures().join("specs").to_string_lossy().into_owned(), "@SPECS@")
        .replace(env!("CARGO_BIN_EXE_vmlab"), "@VMLAB@")
        .replace(&out.to_string_lossy().into_owned(), "@OUT@")
}

fn build(spec: &Path, out: &Path) -> std::process::Output {
    run(vmlab().arg("build").arg(spec).arg("--out").arg(out))
}

#[test]
fn build_matches_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for name in GOLDEN_SPECS {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let result = build(&spec(name), &out);
        assert!(result.status.success(), "{name}: {}", String::from_utf8_lossy(&result.stderr));
        let golden = repo_root().join("tests/golden").join(name);
        let got: Vec<(String, String)> = tree(&out).iter().map(|(p, b)| (p.clone(), normalise(b, &out))).collect();
        if update {
            let _ = fs::remove_dir_all(&golden);
            for (path, text) in &got {
                let dest = golden.join(path);
                fs::create_dir_all(dest.parent().unwrap()).unwrap();
                fs::write(dest, text).unwrap();
            }
            continue;
        }
        let want: Vec<(String, String)> =
            tree(&golden).into_iter().map(|(p, b)| (p, String::from_utf8(b).unwrap())).collect();
        let names = |v: &[(String, String)]| v.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
        assert_eq!(names(&got), names(&want), "{name}: files differ from tests/golden/{name}");
        for ((path, got), (_, want)) in got.iter().zip(&want) {
            assert!(
                got == want,
                "{name}/{path} differs from its golden file (UPDATE_GOLDEN=1 to regenerate)\n--- got:\n{got}"
            );
        }
    }
}

#[test]
fn build_is_deterministic_and_matches_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("nested/b"));
    assert!(build(&spec("vlans"), &a).status.success());
    assert!(build(&spec("vlans"), &b).status.success());
    // The same bytes but for where they are (the driver configuration names its scripts by path).
    let normalised = |dir: &Path| -> Vec<(String, String)> {
        tree(dir).iter().map(|(p, bytes)| (p.clone(), normalise(bytes, dir))).collect()
    };
    assert_eq!(normalised(&a), normalised(&b));
    let plan = run(vmlab().arg("plan").arg(spec("vlans")));
    assert!(plan.status.success());
    assert_eq!(plan.stdout, fs::read(a.join(layout::PLAN_FILE)).unwrap());
    let modes: Vec<u32> = [layout::RUN_VMS, &layout::run_script("a"), layout::PLAN_FILE]
        .iter()
        .map(|f| std::os::unix::fs::PermissionsExt::mode(&fs::metadata(a.join(f)).unwrap().permissions()) & 0o777)
        .collect();
    assert_eq!(modes, [0o755, 0o755, 0o644]);
}

#[test]
fn spec_from_stdin_resolves_paths_from_the_current_directory() {
    let text = fs::read(spec("webserver")).unwrap();
    let mut child = vmlab()
        .args(["plan", "-"])
        .current_dir(fixtures().join("specs"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &text).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, run(vmlab().arg("plan").arg(spec("webserver"))).stdout);
}

#[test]
fn emitted_scripts_are_valid_sh() {
    for name in GOLDEN_SPECS {
        let tmp = tempfile::tempdir().unwrap();
        assert!(build(&spec(name), tmp.path()).status.success(), "{name}");
        for script in fs::read_dir(tmp.path().join(layout::BIN_DIR)).unwrap() {
            let path = script.unwrap().path();
            let check = run(std::process::Command::new("sh").arg("-n").arg(&path));
            assert!(check.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&check.stderr));
        }
    }
}

/// An invalid spec: exit 2, one line naming the node and field, nothing written.
#[test]
fn invalid_spec_is_one_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    for (text, want) in [
        (
            r#"{"nodes": {"server": {"kernel": "/k", "vlans": [300]}}}"#,
            "error: node \"server\": vlans: 300 is out of range 0..=255",
        ),
        (
            r#"{"nodes": {"server": {"kernel": "/nonexistent/kernel"}}}"#,
            "error: node \"server\": kernel: \"/nonexistent/kernel\" is not a file",
        ),
        (
            r#"{"nodes": {"server": {"kernel": "/k"}, "server": {"kernel": "/k"}}}"#,
            "error: spec: key \"server\" is given twice in one object",
        ),
        (
            r#"{"nodes": {"server": {"kernel": "/k", "cmdline": "quiet\u0000"}}}"#,
            "error: node \"server\": cmdline: contains a NUL byte",
        ),
        (r#"{"nodes": {"server": {"kernel": "/k"}}, "extra": 1}"#, "error: unknown field \"extra\""),
        ("{", "error: spec is not valid JSON"),
    ] {
        let spec = tmp.path().join("spec.json");
        fs::write(&spec, text).unwrap();
        let out_dir = tmp.path().join("out");
        let result = build(&spec, &out_dir);
        let stderr = String::from_utf8(result.stderr).unwrap();
        assert_eq!(result.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.starts_with(want), "{text}\n  got:  {stderr}\n  want: {want}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!out_dir.exists(), "{text}: output directory was created");
        let leftovers: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, ["spec.json"], "{text}: something was left behind");
    }
}

/// What is not a spec at all: a one-line error naming the path, quoted so
/// that it stays one line, and soon (vmlab runs under a memory limit here,
/// so a read without end fails rather than swapping).
#[test]
fn unreadable_specs_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let odd = tmp.path().join("two\nlines");
    fs::create_dir(&odd).unwrap();
    let not_utf8 = tmp.path().join("latin1.json");
    fs::write(&not_utf8, b"{\"name\": \"caf\xe9\"}").unwrap();
    for (path, want) in [
        (
            PathBuf::from("/dev/zero"),
            "error: spec \"/dev/zero\" is larger than 16 MiB, the most a spec may be".to_owned(),
        ),
        (
            odd.join("spec.json"),
            format!("error: cannot read spec {:?}: No such file or directory", odd.join("spec.json")),
        ),
        (odd.clone(), format!("error: cannot read spec {odd:?}: Is a directory")),
        (not_utf8.clone(), format!("error: spec {not_utf8:?} is not UTF-8 text")),
    ] {
        let mut cmd = vmlab();
        cmd.arg("plan").arg(&path);
        // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                let limit = libc::rlimit { rlim_cur: 512 << 20, rlim_max: 512 << 20 };
                match libc::setrlimit(libc::RLIMIT_AS, &limit) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            });
        }
        let result = run(&mut cmd);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(2), "{path:?}: {stderr}");
        assert!(stderr.starts_with(&want), "{path:?}\n  got:  {stderr}\n  want: {want}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

#[test]
fn non_empty_output_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("precious"), "x").unwrap();
    let result = build(&spec("webserver"), tmp.path());
    assert_eq!(result.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&result.stderr).contains("is not empty"));
    assert_eq!(fs::read_to_string(tmp.path().join("precious")).unwrap(), "x");
    // An existing empty directory is fine (a fresh `$out`, say).
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert!(build(&spec("webserver"), &empty).status.success());
    assert!(empty.join(layout::RUN_VMS).is_file());
}
