//! Coverage reports from collected `.gcda` files. Here the program runs on the
//! host with each "machine's" GCOV_PREFIX, which is exactly what the guests
//! do; the end-to-end test with VMs is in the driver tests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{repo_root, run, vmlab};

/// Compiles examples/coverage/greet.c with --coverage into `build`, statically
/// linked so the same binary runs in the busybox guest.
pub fn build_greet(build: &Path) -> PathBuf {
    fs::create_dir_all(build).unwrap();
    fs::copy(repo_root().join("examples/coverage/greet.c"), build.join("greet.c")).unwrap();
    let out = run(Command::new("gcc")
        .args(["--coverage", "-static", "-O0", "-o", "greet", "greet.c"])
        .current_dir(build));
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
