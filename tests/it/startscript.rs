//! The run script of a startScript node (a NixOS machine's) against a
//! stand-in for qemu-vm.nix's start script
//! (tests/fixtures/specs/tools/run-nixos-vm), whose QEMU records its
//! arguments: no VM boots.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::support::{fixtures, run, vmlab};
use vmlab::layout;

fn tool(name: &str) -> PathBuf {
    fixtures().join("specs/tools").join(name)
}

/// Builds one startScript machine, `machine` on vlan 1 with `qemu_options`,
/// into `out`.
fn build(out: &Path, qemu_options: &[&str]) {
    let spec = out.with_extension("json");
    let node = json!({"startScript": tool("run-nixos-vm"), "vlans": [1], "qemuOptions": qemu_options});
    let text = json!({"nodes": {"machine": node}, "qemu": tool("qemu-system-x86_64"), "vdeSwitch": tool("vde_switch")});
    fs::write(&spec, text.to_string()).unwrap();
    let built = run(vmlab().arg("build").arg(&spec).arg("--out").arg(out));
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
}

/// Runs the machine of `out` with state directory `state`, `env` added; the
/// stand-in QEMU's arguments, from the directory it ran in (which must be `state`).
fn start(out: &Path, state: &Path, env: &[(&str, &str)]) -> Vec<String> {
    let started = run(Command::new(out.join(layout::run_script("machine")))
        .env("VMLAB_STATE_DIR", state)
        // Where qemu-vm.nix's script would make its nix-vm.* directories if
        // it did not take the state directory as its own.
        .env("TMPDIR", state)
        .env_remove("USE_TMPDIR")
        .env_remove("QEMU_OPTS")
        .envs(env.iter().copied()));
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let args = fs::read_to_string(state.join("qemu-args")).unwrap_or_else(|e| {
        panic!("no qemu-args in {state:?} ({e}): {:?}", fs::read_dir(state).unwrap().flatten().collect::<Vec<_>>())
    });
    args.split_terminator('\0').map(String::from).collect()
}

fn contains(args: &[String], words: &[&str]) -> bool {
    args.windows(words.len()).any(|w| w == words)
}

/// qemu-vm.nix makes a nix-vm.* directory for each start unless USE_TMPDIR is
/// set: the wrapper's state directory is the script's, however often it starts.
#[test]
fn a_start_script_runs_in_the_state_directory_every_time() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, state) = (tmp.path().join("out"), tmp.path().join("state"));
    build(&out, &[]);
    for _ in 0..2 {
        let args = start(&out, &state, &[]);
        assert!(contains(&args, &["-no-reboot"]), "{args:?}");
        let mut entries: Vec<String> =
            fs::read_dir(&state).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        entries.sort();
        assert_eq!(entries, ["qemu-args", "xchg"]);
    }
}

/// qemu-vm.nix expands QEMU_OPTS unquoted without `set -f`: vmlab's options,
/// paths in the state and output directories among them, reach QEMU whole
/// whatever characters they hold; the caller's QEMU_OPTS is split, as nixpkgs has it.
#[test]
fn vmlab_options_reach_qemu_whole_through_a_start_script() {
    for (out_name, state_name, smbios) in [
        ("out", "state", "type=11,value=plain"),
        ("out dir [1]", "state *?", "type=11,value=two words*"),
        ("out\tdir", "state\n*", "type=11,value=[a]"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (out, state) = (tmp.path().join(out_name), tmp.path().join(state_name));
        build(&out, &["-smbios", smbios]);
        let args = start(&out, &state, &[("QEMU_OPTS", "-device  virtio-balloon")]);
        let (out, state) = (out.display(), state.display());
        for words in [
            &["-fw_cfg", &format!("name=opt/vmlab/config,file={out}/{}", layout::config_file("machine"))][..],
            &["-chardev", &format!("socket,id=shell,path={state}/{},server=on,wait=off", layout::SHELL_SOCKET)],
            &["-qmp", &format!("unix:{state}/{},server=on,wait=off", layout::QMP_SOCKET)],
            &["-netdev", "hubport,id=vlan1,hubid=1"],
            &["-smbios", smbios],
            &["-device", "virtio-balloon"],
        ] {
            assert!(contains(&args, words), "{out_name:?}, {state_name:?}: {words:?} not in {args:?}");
        }
    }
}
