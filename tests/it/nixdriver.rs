//! nixpkgs' test driver drives vmlab's machines: a harness that starts a
//! `vmlab build` network's run scripts, as named in the driver configuration
//! the build writes, as that driver starts its start scripts (its
//! arguments, environment, sockets and framing; see
//! tests/fixtures/nixdriver/harness.py), on two real VMs on its own switch.

use serde_json::{json, Value};

use crate::support::{fixtures, processes_mentioning, run, vmlab};
use crate::support::{spec, text};
use vmlab::layout;

#[test]
fn nixpkgs_driver_start_up_and_framing_drive_vmlab_run_scripts() {
    let tmp = tempfile::tempdir().unwrap();
    let built = tmp.path().join("built");
    let out =
        run(vmlab().arg("build").arg(spec(tmp.path(), "nixdriver", &["server", "client"])).arg("--out").arg(&built));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let state = tmp.path().join("driver");
    std::fs::create_dir(&state).unwrap();
    // Started from the configuration `vmlab build` writes for nixpkgs' driver.
    let out = run(std::process::Command::new("python3")
        .arg(fixtures().join("nixdriver/harness.py"))
        .arg(built.join(layout::DRIVER_CONFIG))
        .arg(&state));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let result: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(result["statuses"], json!([0, 1, 3]), "{result}");
    assert_eq!(result["outputs"]["echo"], json!([0, "hello\n"]));
    assert_eq!(result["outputs"]["server"], json!([0, "server\n"]));
    assert_eq!(result["outputs"]["client"], json!([0, "client\n"]));
    // vmlab's data port joined the driver's virtio-serial bus, next to its console.
    assert_eq!(result["outputs"]["ports"], json!([0, "vmlab.data\n"]), "{result}");
    // Over the driver's own vde_switch, by name.
    assert_eq!(result["outputs"]["ping"], json!(0), "{result}");
    assert_eq!(result["exits"], json!({"server": 0, "client": 0}));
    // The driver's SHARED_DIR reached the guest, which says once why it cannot mount it.
    let note = "a shared directory (SHARED_DIR) is offered, but this kernel has no 9p";
    for machine in ["server", "client"] {
        let serial = result["serial"][machine].as_str().unwrap();
        assert_eq!(serial.matches(note).count(), 1, "{machine}: {serial}");
    }
    // The run scripts took the driver's state directories (TMPDIR with
    // USE_TMPDIR) rather than making their own there (QEMU removes its
    // listening sockets, the data port's among them, as it exits), and left
    // nothing running.
    for machine in ["server", "client"] {
        let entries: Vec<String> = std::fs::read_dir(state.join(format!("vm-state-{machine}")))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let known = ["monitor", "shell", "qmp", layout::DATA_SOCKET];
        assert!(entries.iter().all(|e| known.contains(&e.as_str())), "{entries:?}");
    }
    assert_eq!(processes_mentioning(tmp.path()), []);
}
