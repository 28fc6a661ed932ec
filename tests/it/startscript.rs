//! The run script of a startScript node (a NixOS machine's) against a
//! stand-in for qemu-vm.nix's start script
//! (tests/fixtures/specs/tools/run-nixos-vm), whose QEMU records its
//! arguments: no VM boots.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::support::{fixtures, run, vmlab};
use vmlab::{accel, layout};

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

/// Runs the machine of `out` with state directory `state`, `env` added, and
/// `args` (as a nixpkgs driver gives them); the stand-in QEMU's arguments,
/// from the directory it ran in (which must be `state`).
fn start(out: &Path, state: &Path, env: &[(&str, &str)], args: &[&str]) -> Vec<String> {
    let started = run(Command::new(out.join(layout::run_script("machine")))
        .args(args)
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
    position(args, words).is_some()
}

fn position(args: &[String], words: &[&str]) -> Option<usize> {
    args.windows(words.len()).position(|w| w == words)
}

/// qemu-vm.nix makes a nix-vm.* directory for each start unless USE_TMPDIR is
/// set: the wrapper's state directory is the script's, however often it starts.
#[test]
fn a_start_script_runs_in_the_state_directory_every_time() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, state) = (tmp.path().join("out"), tmp.path().join("state"));
    build(&out, &[]);
    for _ in 0..2 {
        let args = start(&out, &state, &[], &[]);
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
        let args = start(&out, &state, &[("QEMU_OPTS", "-device  virtio-balloon")], &[]);
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

/// `VMLAB_ACCEL` (`--accel`) chooses a NixOS machine's accelerator as it does
/// a direct-boot one's: after the script's own `-machine type=q35,accel=kvm:tcg`,
/// which real QEMU then runs with the later choice (KVM where it is usable; a
/// `kvm` request fails on a host without, rather than falling back to TCG).
#[test]
fn vmlab_accel_chooses_a_start_scripts_accelerator() {
    let auto = accel::decide(accel::Accel::Auto, &accel::probe()).unwrap().accel.to_string();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    build(&out, &[]);
    for (requested, want) in [(Some("tcg"), "tcg"), (Some("kvm"), "kvm"), (Some("auto"), &auto), (None, &auto)] {
        let state = tmp.path().join(format!("state-{requested:?}"));
        let env: Vec<(&str, &str)> = requested.map(|r| ("VMLAB_ACCEL", r)).into_iter().collect();
        let args = start(&out, &state, &env, &[]);
        let own = position(&args, &["-machine", "type=q35,accel=kvm:tcg"]).expect("the stand-in's own -machine");
        let ours = position(&args, &["-machine", &format!("accel={want}")]);
        assert!(ours.is_some_and(|at| at > own), "{requested:?}: {args:?}");
        let machine_args: Vec<&str> =
            args.windows(2).filter(|w| w[0] == "-machine").flat_map(|w| [w[0].as_str(), w[1].as_str()]).collect();
        let (kvm_used, stderr) = qemu_uses_kvm(&machine_args);
        match (want, kvm_used) {
            ("tcg", Some(false)) | ("kvm", Some(true)) => {}
            ("kvm", None) => assert!(stderr.contains("kvm"), "{stderr}"),
            _ => panic!("{requested:?}: QEMU with {machine_args:?}: kvm {kvm_used:?}: {stderr}"),
        }
    }
}

/// Whether the host's QEMU, given `args` and nothing to run (`-S`), uses KVM
/// (`info kvm`); `None` when it does not start, with its standard error.
fn qemu_uses_kvm(args: &[&str]) -> (Option<bool>, String) {
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(args)
        .args(["-nodefaults", "-display", "none", "-S", "-monitor", "stdio"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut qemu.stdin.take().unwrap(), b"info kvm\nquit\n").unwrap();
    let done = qemu.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&done.stdout);
    let used = ["disabled", "enabled"].iter().position(|s| stdout.contains(&format!("kvm support: {s}")));
    (used.map(|i| i == 1), String::from_utf8_lossy(&done.stderr).into_owned())
}

/// Given arguments (as nixpkgs' driver runs it), the run script leaves its
/// channels to the caller but adds the data port to the caller's
/// virtio-serial bus, after it (QEMU puts a port on a bus made before it);
/// without such a bus it adds none, which QEMU would refuse.
#[test]
fn the_data_port_joins_a_callers_virtio_serial_bus() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    build(&out, &[]);
    let data_port = ["-device", "virtserialport,chardev=data,name=vmlab.data"];
    for (i, (given, bus)) in [
        (&["-device", "virtio-serial", "-device", "virtconsole,chardev=shell"][..], Some("virtio-serial")),
        (&["-device", "virtio-serial-pci,max_ports=4"], Some("virtio-serial-pci,max_ports=4")),
        (&["-device", "virtio-rng-pci", "-serial", "stdio"], None),
    ]
    .into_iter()
    .enumerate()
    {
        let state = tmp.path().join(format!("state{i}"));
        let args = start(&out, &state, &[], given);
        let port = position(&args, &data_port);
        match bus {
            Some(bus) => assert!(port > position(&args, &["-device", bus]), "{given:?}: {args:?}"),
            None => assert_eq!(port, None, "{given:?}: {args:?}"),
        }
        // The caller's channels replace the run script's own.
        assert!(!contains(&args, &["-device", "virtio-serial,max_ports=2,vectors=7"]), "{args:?}");
        assert!(!args.iter().any(|a| a.contains(layout::SHELL_SOCKET) || a.contains(layout::QMP_SOCKET)), "{args:?}");
    }
}
