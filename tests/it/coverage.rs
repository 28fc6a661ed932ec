//! Coverage: reports from `.gcda` files (the program run on the host with
//! each "machine's" GCOV_PREFIX, which is exactly what the guests do), and
//! `vmlab test --coverage` end to end on real VMs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{repo_root, run, vmlab};

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

/// The numbers in parentheses, in order: lcov's "(14 of 16 lines)" and
/// vmlab's "(14/16)" both give 14, 16.
fn figures(text: &str) -> Vec<u64> {
    text.split('(')
        .skip(1)
        .filter_map(|s| s.split_once(')'))
        .flat_map(|(inside, _)| inside.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()))
        .collect()
}

/// Checks vmlab's summary line (`coverage: <figures>; <machine>: <figures>; …`)
/// against the figures wanted, [lines hit, lines, functions hit, functions],
/// of all machines together and of each, and against what `lcov --summary`
/// counts in the merged tracefile and in each machine's own.
fn check_summary(line: &str, out: &Path, all: [u64; 4], machines: &[(&str, [u64; 4])]) {
    let summary = &line[line.find("coverage: lines ").unwrap_or_else(|| panic!("no summary in {line:?}"))..];
    let parts: Vec<&str> = summary.split("; ").collect();
    assert_eq!(parts.len(), 1 + machines.len(), "{summary}");
    let wanted = std::iter::once(("coverage", out.join("coverage.info"), all))
        .chain(machines.iter().map(|(m, want)| (*m, out.join(format!("coverage-data/{m}.info")), *want)));
    for (part, (name, tracefile, want)) in parts.iter().zip(wanted) {
        assert!(part.starts_with(&format!("{name}: ")), "{name} in {summary}");
        assert_eq!(figures(part), want, "{name} in {summary}");
        let lcov = run(Command::new("lcov").arg("--summary").arg(&tracefile));
        let lcov = String::from_utf8_lossy(&lcov.stdout);
        assert_eq!(figures(&lcov), want, "{}: lcov --summary says {lcov}", tracefile.display());
    }
}

/// Three machines, one role of greet each. gcc -O0 puts 16 lines of
/// greet.c in its line table: serve's 3, connect_to_server's 3, main's 10.
/// `server` runs serve's and 4 of main's, `client` connect_to_server's and 5
/// of main's, `other` 6 of main's; together all but the 2 of the usage
/// message. Summed, they would be 21 of 48 lines and 5 of 9 functions.
#[test]
fn per_machine_and_combined_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let build = tmp.path().join("build");
    let greet = build_greet(&build);
    let out = tmp.path().join("out");
    for (machine, role, code) in [("a", "server", 0), ("b", "client", 0), ("c", "other", 2)] {
        let prefix = out.join("coverage-data").join(machine);
        let status = Command::new(&greet).arg(role).env("GCOV_PREFIX", &prefix).status().unwrap();
        assert_eq!(status.code(), Some(code), "greet {role}");
    }
    let result = run(vmlab().arg("coverage").arg(&out).arg("--build-dir").arg(&build));
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(result.status.success(), "{stdout}{}", String::from_utf8_lossy(&result.stderr));
    let machines = [("a", [7, 16, 2, 3]), ("b", [8, 16, 2, 3]), ("c", [6, 16, 1, 3])];
    check_summary(stdout.trim_end(), &out, [14, 16, 3, 3], &machines);

    let (a, b, all) = (out.join("coverage-data/a.info"), out.join("coverage-data/b.info"), out.join("coverage.info"));
    assert_eq!((hits(&a, "serve"), hits(&a, "connect_to_server")), (1, 0));
    assert_eq!((hits(&b, "serve"), hits(&b, "connect_to_server")), (0, 1));
    assert_eq!((hits(&all, "serve"), hits(&all, "connect_to_server"), hits(&all, "main")), (1, 1, 3));
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
    // main's lines that both ran count once: 12 of 16, not 15 of 32.
    check_summary(summary, &out, [12, 16, 3, 3], &[("a", [7, 16, 2, 3]), ("b", [8, 16, 2, 3])]);
    let log = fs::read_to_string(out.join("vmlab.log")).unwrap();
    assert!(log.contains(summary.split_once("coverage: ").unwrap().1), "the summary is not in the log");
    assert_eq!(crate::support::processes_mentioning(&runs), []);
}

#[test]
fn a_missing_build_dir_or_lcov_fails_before_anything_boots() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("test.sh");
    fs::write(&script, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let spec = crate::support::fixtures().join("specs/webserver.json");
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
