//! Coverage: reports from `.gcda` files (the program run on the host with
//! each "machine's" GCOV_PREFIX, which is exactly what the guests do), and
//! `vmlab test --coverage` end to end on real VMs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{repo_root, run, vmlab};

/// Compiles examples/coverage/greet.c with --coverage into `build`, statically
/// linked so the same binary runs in the busybox guest.
pub fn build_greet(build: &Path) -> PathBuf {
    fs::create_dir_all(build).unwrap();
    fs::copy(repo_root().join("examples/coverage/greet.c"), build.join("greet.c")).unwrap();
    let out =
        run(Command::new("gcc").args(["--coverage", "-static", "-O0", "-o", "greet", "greet.c"]).current_dir(build));
    assert!(out.status.success(), "gcc: {}", String::from_utf8_lossy(&out.stderr));
    build.join("greet")
}

fn tracefile_functions(path: &Path) -> Vec<(String, u64)> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("FNDA:"))
        .map(|l| {
            let (count, name) = l.split_once(',').unwrap();
            (name.to_string(), count.parse().unwrap())
        })
        .collect()
}

pub fn hits(path: &Path, function: &str) -> u64 {
    tracefile_functions(path).iter().filter(|(f, _)| f == function).map(|(_, n)| n).sum()
}

#[test]
fn per_machine_and_combined_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let build = tmp.path().join("build");
    let greet = build_greet(&build);
    let out = tmp.path().join("out");
    for (machine, role) in [("a", "server"), ("b", "client")] {
        let prefix = out.join("coverage-data").join(machine);
        let status = Command::new(&greet).arg(role).env("GCOV_PREFIX", &prefix).status().unwrap();
        assert!(status.success());
    }
    let result = run(vmlab().arg("coverage").arg(&out).arg("--build-dir").arg(&build));
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(result.status.success(), "{stdout}{}", String::from_utf8_lossy(&result.stderr));
    assert!(stdout.starts_with("coverage: lines "), "{stdout}");
    assert!(stdout.contains("; a: lines") && stdout.contains("; b: lines"), "{stdout}");

    let (a, b, all) = (out.join("coverage-data/a.info"), out.join("coverage-data/b.info"), out.join("coverage.info"));
    assert_eq!((hits(&a, "serve"), hits(&a, "connect_to_server")), (1, 0));
    assert_eq!((hits(&b, "serve"), hits(&b, "connect_to_server")), (0, 1));
    assert_eq!((hits(&all, "serve"), hits(&all, "connect_to_server"), hits(&all, "main")), (1, 1, 2));
    assert!(out.join("coverage/index.html").is_file());
}

#[test]
fn no_data_is_a_warning_and_a_missing_build_dir_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let result = run(vmlab().arg("coverage").arg(tmp.path()).arg("--build-dir").arg(tmp.path()));
    assert!(result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).starts_with("warning: coverage: no .gcda files"));
    let result = run(vmlab().arg("coverage").arg(tmp.path()).arg("--build-dir").arg(tmp.path().join("nope")));
    assert_eq!(result.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&result.stderr).contains("is not a directory"));
}

/// Machine `a` runs one branch of greet, `b` the other, `idle` nothing and
/// `gone` is powered off before the end: the combined report has both
/// branches, each machine's tracefile only its own, and the lost data is
/// named in a warning.
#[test]
fn a_test_combines_coverage_from_every_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let build = t.join("build");
    let greet = build_greet(&build);
    let guest = t.join("guest");
    let add = format!("{}:/bin/greet", greet.display());
    let built = run(vmlab().arg("guest").arg("--out").arg(&guest).args(["--no-bash", "--add", &add]));
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let node =
        serde_json::json!({"kernel": guest.join("kernel"), "initrd": guest.join("initrd"), "memory": 128, "vlans": []});
    let spec = t.join("net.json");
    let nodes = serde_json::json!({"a": node, "b": node, "idle": node, "gone": node});
    fs::write(&spec, serde_json::json!({"name": "cov", "nodes": nodes}).to_string()).unwrap();
    let script = t.join("test.sh");
    fs::write(
        &script,
        "#!/bin/sh\nset -e\nvmlab start-all\nvmlab succeed a -- greet server\nvmlab succeed b -- greet client\n\
         vmlab succeed gone -- greet client\nvmlab shutdown gone\n",
    )
    .unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = t.join("out");
    let runs = t.join("runs");
    fs::create_dir_all(&runs).unwrap();
    let result = run(vmlab()
        .env("TMPDIR", &runs)
        .env_remove("XDG_RUNTIME_DIR")
        .arg("test")
        .arg(&spec)
        .arg(&script)
        .arg("--out")
        .arg(&out)
        .args(["--coverage", "--build-dir"])
        .arg(&build));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(0), "{stderr}");

    let data = out.join("coverage-data");
    let gcda = |m: &str| fs::read_dir(data.join(m)).is_ok().then(|| data.join(m));
    assert!(gcda("a").is_some() && gcda("b").is_some(), "{stderr}");
    assert_eq!((gcda("idle"), gcda("gone")), (None, None));
    assert!(
        stderr.contains("gone: warning: coverage: the machine is not running at the end: its data is lost"),
        "{stderr}"
    );
    assert!(!stderr.contains("idle: warning"), "{stderr}");
    let (a, b, all) = (data.join("a.info"), data.join("b.info"), out.join("coverage.info"));
    assert_eq!((hits(&a, "serve"), hits(&a, "connect_to_server")), (1, 0));
    assert_eq!((hits(&b, "serve"), hits(&b, "connect_to_server")), (0, 1));
    assert_eq!((hits(&all, "serve"), hits(&all, "connect_to_server"), hits(&all, "main")), (1, 1, 2));
    assert!(out.join("coverage/index.html").is_file());
    let summary = stderr.lines().find(|l| l.contains("coverage: lines ")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(summary.contains("; a: lines") && summary.contains("; b: lines"), "{summary}");
    let log = fs::read_to_string(out.join("vmlab.log")).unwrap();
    assert!(log.contains(summary.split_once("coverage: ").unwrap().1), "the summary is not in the log");
    assert_eq!(crate::common::processes_mentioning(&runs), []);
}

#[test]
fn a_missing_build_dir_or_lcov_fails_before_anything_boots() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("test.sh");
    fs::write(&script, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let spec = crate::common::fixtures().join("specs/webserver.json");
    let missing = tmp.path().join("nope");
    let result = run(vmlab().arg("test").arg(&spec).arg(&script).arg("--coverage").arg("--build-dir").arg(&missing));
    assert_eq!(result.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(stderr.trim(), format!("error: coverage build directory {} is not a directory", missing.display()));

    // PATH without lcov: the error names the package.
    let result = run(vmlab()
        .env("PATH", "/nonexistent")
        .arg("test")
        .arg(&spec)
        .arg(&script)
        .arg("--coverage")
        .arg("--build-dir")
        .arg(tmp.path()));
    assert_eq!(result.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(stderr.trim(), "error: lcov not found on PATH: install the Debian package lcov");
}
