//! runTest: tests that run `vmlab test` inside a derivation, and what the
//! build makes of them (system features, failure, Hydra's products,
//! coverage, snapshots).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::support::free_port;
use crate::support::nix::{built, example_expr, lab, nix, nix_build, nix_path, ok};
use crate::support::run;

/// A test of network `name` (one default-guest machine `a`) with the
/// Nix-level `options` (runTest's arguments, `requiredSystemFeatures = [ ]`
/// unless given).
fn run_test_expr(name: &str, options: &str) -> String {
    format!(
        "{}.runTest ({{ name = \"{name}\"; nodes.a.vmlabNode = {{ guest = true; memory = 128; }}; \
         requiredSystemFeatures = [ ]; }} // {{ {options} }})",
        lab()
    )
}

/// An executable test script that fails without starting anything.
fn failing_executable(dir: &Path) -> PathBuf {
    let script = dir.join("fail.sh");
    std::fs::write(&script, "#!/bin/sh\necho 'this test fails on purpose' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn run_test_declares_system_features_that_builders_must_offer() {
    let tmp = tempfile::tempdir().unwrap();
    let script = format!("testScript = {};", nix_path(&failing_executable(tmp.path())));
    let default = format!("{}.runTest {{ name = \"features\"; nodes.a.vmlabNode.guest = true; {script} }}", lab());
    let overridden = run_test_expr("features", &script);
    for (expr, want) in [(&default, r#"["nixos-test","kvm"]"#), (&overridden, "[]")] {
        let Some(mut cmd) = nix("nix-instantiate") else { return };
        let features = ok(
            run(cmd.args(["--eval", "--strict", "--json", "-E", &format!("({expr}).requiredSystemFeatures")])),
            expr,
        );
        assert_eq!(features.trim(), want, "{expr}");
    }
    // A builder without those features refuses the test before running anything.
    let Some(refused) = nix_build(&default, &["--option", "system-features", ""]) else { return };
    let out = refused.expect_err("built on a builder without kvm and nixos-test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("with features {kvm, nixos-test} is required to build"), "{stderr}");
    assert!(!stderr.contains("this test fails on purpose"), "the test ran: {stderr}");
}

/// `nix-support/hydra-build-products` of `out`: every product is a file of
/// `out`; the kinds listed (`report junit`, `file log`, ...).
fn hydra_products(out: &Path) -> Vec<String> {
    let products = std::fs::read_to_string(out.join("nix-support/hydra-build-products")).unwrap();
    products
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            assert!(fields.len() >= 3, "{line}");
            let path = Path::new(fields[2]);
            assert!(path.starts_with(out) && path.exists(), "{line}");
            format!("{} {}", fields[0], fields[1])
        })
        .collect()
}

#[test]
fn run_test_of_the_example_passes_with_junit_and_hydra_products() {
    let Some(out) = built(&format!("{}.test", example_expr(free_port()))) else { return };
    let junit = std::fs::read_to_string(out.join("junit.xml")).unwrap();
    assert!(junit.contains("<testsuite") && junit.contains("the client fetches the page by name"), "{junit}");
    assert!(!junit.contains("<failure"), "{junit}");
    let products = hydra_products(&out);
    assert!(products.contains(&"report junit".to_owned()) && products.contains(&"file log".to_owned()), "{products:?}");
    assert!(!out.join("nix-support/failed").exists());
}

#[test]
fn run_test_with_a_failing_script_fails_the_build() {
    let tmp = tempfile::tempdir().unwrap();
    let options = format!("testScript = {};", nix_path(&failing_executable(tmp.path())));
    let Some(result) = nix_build(&run_test_expr("failing", &options), &[]) else { return };
    let out = result.expect_err("a failing test built");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("failing-test.drv' failed with exit code 1"), "{stderr}");
}

#[test]
fn run_test_keeps_a_failed_tests_output_when_asked_and_marks_it_failed() {
    // A Python file this time (the example's script is Python source).
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("fails.py");
    std::fs::write(&script, "a.succeed(\"echo the guest ran this; false\")\n").unwrap();
    let options =
        format!(r#"keepFailedOutput = true; globalTimeout = 600; accel = "tcg"; testScript = {};"#, nix_path(&script));
    let Some(out) = built(&run_test_expr("kept", &options)) else { return };
    let failed = std::fs::read_to_string(out.join("nix-support/failed")).unwrap();
    assert_eq!(failed, "vmlab test exited with status 1\n");
    let junit = std::fs::read_to_string(out.join("junit.xml")).unwrap();
    assert!(junit.contains("<testcase classname=\"kept\" name=\"fails.py\"") && junit.contains("<failure"), "{junit}");
    assert!(hydra_products(&out).contains(&"report junit".to_owned()));
    // The machine's serial console is among the logs.
    let logs: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(logs.iter().any(|log| log.contains("vmlab-guest: boot done")), "{logs:?}");
}

/// `coverage = true`: the report is made in the build and Hydra gets a link to it.
#[test]
fn run_test_with_coverage_reports_it_as_a_build_product() {
    let tmp = tempfile::tempdir().unwrap();
    let build = tmp.path().join("build");
    let greet = crate::coverage::build_greet(&build);
    let script = tmp.path().join("cov.py");
    std::fs::write(&script, "a.succeed(\"greet server\")\n").unwrap();
    let options = format!(
        "guest.files.\"/bin/greet\" = {}; coverage = true; coverageBuildDirs = [ {} ]; testScript = {};",
        nix_path(&greet),
        nix_path(&build),
        nix_path(&script)
    );
    let Some(out) = built(&run_test_expr("coverage", &options)) else { return };
    assert!(hydra_products(&out).contains(&"report coverage".to_owned()));
    assert!(out.join("coverage/index.html").is_file());
    assert_eq!(crate::coverage::hits(&out.join("coverage.info"), "serve"), 1);
    let log = std::fs::read_to_string(out.join("vmlab.log")).unwrap();
    assert!(log.contains("coverage: lines "), "{log}");
}

/// `snapshot = true`: the library's `snapshot` derivation boots the network
/// and saves it, and the test restores its machine from that store path.
#[test]
fn run_test_restores_from_its_snapshot_derivation() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("restored.py");
    std::fs::write(&script, "a.succeed(\"test -e /etc/vmlab/config || true\")\n").unwrap();
    let options = format!(r#"snapshot = true; accel = "tcg"; testScript = {};"#, nix_path(&script));
    let expr = run_test_expr("snapped", &options);
    let Some(out) = built(&expr) else { return };
    let Some(snapshot) = built(&format!("({expr}).snapshot")) else { return };
    assert!(snapshot.join("manifest.json").is_file(), "{}", snapshot.display());
    let log = std::fs::read_to_string(out.join("vmlab.log")).unwrap();
    assert!(log.contains(&format!("a: restored from {}", snapshot.join("a.state").display())), "{log}");
    assert!(!log.contains("backdoor shell ready"), "booted instead: {log}");
}
