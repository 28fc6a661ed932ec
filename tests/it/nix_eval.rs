//! The Nix layer evaluated (nix/, flake.nix): every file parses, the Nix
//! numbering agrees with `vmlab plan`, the flake's outputs, the guest module
//! and the forms a node may be written in.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::support::nix::{lab, nix, nix_fixture, nix_path, ok};
use crate::support::{repo_root, run, vmlab};

#[test]
fn every_nix_file_parses() {
    let mut files = Vec::new();
    for dir in ["nix", "examples", "tests/fixtures/nix"] {
        collect_nix_files(&repo_root().join(dir), &mut files);
    }
    files.push(repo_root().join("flake.nix"));
    for expected in [
        "nix/default.nix",
        "nix/numbering.nix",
        "nix/guest-module.nix",
        "nix/nixos.nix",
        "examples/webserver/default.nix",
    ] {
        assert!(files.contains(&repo_root().join(expected)), "{expected} not found in {files:?}");
    }
    for file in &files {
        let Some(mut cmd) = nix("nix-instantiate") else { return };
        ok(run(cmd.arg("--parse").arg(file)), &file.display().to_string());
    }
}

fn collect_nix_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_nix_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "nix") {
            files.push(path);
        }
    }
}

/// A small deterministic generator (xorshift), so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Specs with names whose byte order differs from other orders (case,
/// `-` < `_`, digits), vlans from 0 to 255 in any order or none, defaults
/// left out or given, and one network of 254 machines.
fn generated_specs(kernel: &Path) -> Vec<Value> {
    const NAMES: [&str; 16] = [
        "B", "a", "a-1", "a_1", "a1", "b", "Z9", "node10", "node9", "node-10", "x_y-z", "server", "client", "C", "c0",
        "zz",
    ];
    let mut rng = Rng(0x5eed_cafe_f00d);
    let mut specs = Vec::new();
    for i in 0..60 {
        let mut nodes = serde_json::Map::new();
        let mut port = 10000 + i * 100;
        for name in NAMES {
            if rng.below(3) == 0 {
                continue;
            }
            let mut node = json!({"kernel": kernel});
            if rng.below(4) != 0 {
                let mut vlans: Vec<u64> = Vec::new();
                for _ in 0..rng.below(4) {
                    let v = [0, 1, 2, 10, 16, 99, 100, 255][rng.below(8) as usize] + rng.below(2);
                    if v <= 255 && !vlans.contains(&v) {
                        vlans.push(v);
                    }
                }
                node["vlans"] = json!(vlans);
            }
            if rng.below(3) == 0 {
                node["memory"] = json!(64 + rng.below(512));
                node["cpus"] = json!(1 + rng.below(4));
            }
            if rng.below(4) == 0 {
                port += 1;
                node["forwardPorts"] = json!([{"host": port, "guest": 80}]);
            }
            nodes.insert(name.to_owned(), node);
        }
        if nodes.is_empty() {
            nodes.insert("only".to_owned(), json!({"kernel": kernel}));
        }
        let mut spec = json!({"nodes": nodes});
        if i % 2 == 0 {
            spec["name"] = json!(format!("net{i}"));
        }
        specs.push(spec);
    }
    let many: serde_json::Map<String, Value> =
        (1..=254).map(|n| (format!("m{n}"), json!({"kernel": kernel, "vlans": [n % 7, 255 - n % 3]}))).collect();
    specs.push(json!({"name": "many", "nodes": many}));
    specs
}

#[test]
fn nix_numbering_agrees_with_vmlab_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let kernel = tmp.path().join("kernel");
    std::fs::write(&kernel, "").unwrap();
    let specs = generated_specs(&kernel);
    let file = tmp.path().join("specs.json");
    std::fs::write(&file, serde_json::to_string(&specs).unwrap()).unwrap();
    let expr = format!(
        "map (import {}) (builtins.fromJSON (builtins.readFile {}))",
        nix_path(&repo_root().join("nix/numbering.nix")),
        nix_path(&file)
    );
    let Some(mut cmd) = nix("nix-instantiate") else { return };
    let from_nix: Vec<Value> =
        serde_json::from_str(&ok(run(cmd.args(["--eval", "--strict", "--json", "-E", &expr])), "numbering")).unwrap();
    assert_eq!(from_nix.len(), specs.len());
    for (spec, nix_plan) in specs.iter().zip(from_nix) {
        let spec_file = tmp.path().join("spec.json");
        std::fs::write(&spec_file, spec.to_string()).unwrap();
        let mut plan: Value =
            serde_json::from_str(&ok(run(vmlab().arg("plan").arg(&spec_file)), "vmlab plan")).unwrap();
        let plan_fields = plan.as_object_mut().unwrap();
        plan_fields.remove("qemu");
        plan_fields.remove("vdeSwitch");
        assert_eq!(nix_plan, plan, "spec: {spec}");
    }
}

/// flake.nix needs nixpkgs, which this machine lacks: its outputs are
/// evaluated with a stand-in (tests/fixtures/nix/stub-nixpkgs.nix) whose
/// packages are fake paths, so what is checked is the flake's own wiring.
#[test]
fn the_flakes_outputs_evaluate_with_a_stand_in_nixpkgs() {
    let expr = nix_fixture("flake-outputs.nix", "");
    let Some(mut cmd) = nix("nix-instantiate") else { return };
    let outputs: Value =
        serde_json::from_str(&ok(run(cmd.args(["--eval", "--strict", "--json", "-E", &expr])), "flake")).unwrap();

    assert_eq!(outputs["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(outputs["checks"], json!(["vmlab", "vms", "webserver"]));
    assert_eq!(outputs["webserverFeatures"], json!(["nixos-test", "kvm"]));
    assert!(outputs["webserverDrv"].as_str().unwrap().ends_with("-webserver-test.drv"), "{outputs}");
    let every_system = json!(["x86_64-linux"]);
    assert_eq!(outputs["hydraJobs"], json!({"vmlab": every_system, "vms": every_system, "webserver": every_system}));
    assert_eq!(
        outputs["overlayLib"],
        json!(["buildVirtualNetwork", "defaultGuest", "networkSpec", "numbering", "runTest", "snapshot"])
    );
    assert_eq!((&outputs["guestModule"], &outputs["devShell"]), (&json!(true), &json!(true)));

    // nixpkgs' tools reach the spec and `vmlab guest`.
    let spec = &outputs["vmsSpec"];
    assert_eq!(
        (&spec["qemu"], &spec["vdeSwitch"]),
        (&json!("/stub/qemu_kvm/bin/qemu-system-x86_64"), &json!("/stub/vde2/bin/vde_switch"))
    );
    assert_eq!(spec["nodes"]["server"]["forwardPorts"], json!([{"host": 8081, "guest": 80}]));
    assert!(spec["nodes"]["server"]["kernel"].as_str().unwrap().ends_with("-vmlab-guest/kernel"), "{spec}");
    let args: Vec<&str> = outputs["guestArgs"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    for pair in [
        ["--busybox", "/stub/static-busybox/bin/busybox"],
        ["--bash", "/stub/static-bash/bin/bash"],
        ["--kernel", "/stub/kernel/bzImage"],
        ["--modules", "/stub/kernel/lib/modules/6.1.0"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} not in {args:?}");
    }

    // A NixOS node: its VM's start script, the spec fields a start script
    // takes, and what its modules are given.
    let mixed = &outputs["mixedSpec"]["nodes"];
    assert_eq!(mixed["server"], json!({"startScript": "/stub/vm-server/bin/run-server-vm", "vlans": [2]}));
    assert!(mixed["client"]["kernel"].as_str().unwrap().ends_with("-vmlab-guest/kernel"), "{mixed}");
    assert_eq!(outputs["mixedTestScript"], "server server 192.168.1.1");
    assert_eq!(
        outputs["server"],
        json!({"hostName": "server", "memory": 512, "nodes": ["server"], "planMachines": ["client", "server"],
               "primaryIPAddress": "192.168.2.2", "primaryIPv6Address": "2001:db8:2::2",
               "nodeConfigs": ["server", "server"], "ownModule": {"services": {"nginx": {"enable": true}}},
               "networkNodes": ["server", "server", "/stub/vm-server/bin/run-server-vm"]})
    );
}

/// `attr` of nix/guest-module.nix's merged definitions, on a NixOS with
/// systemd's and journald's `settings` options or one before them
/// (tests/fixtures/nix/guest-module.nix); `None` where Nix is not installed.
fn guest_module(settings: bool, attr: &str) -> Option<Value> {
    guest_module_with(&format!("settings = {settings};"), attr)
}

/// `attr` of nix/guest-module.nix's merged definitions with the fixture's
/// arguments `args` (Nix bindings).
fn guest_module_with(args: &str, attr: &str) -> Option<Value> {
    let expr = format!("({}).{attr}", nix_fixture("guest-module.nix", args));
    let mut cmd = nix("nix-instantiate")?;
    Some(serde_json::from_str(&ok(run(cmd.args(["--eval", "--strict", "--json", "-E", &expr])), &expr)).unwrap())
}

/// What the guest module sets as nixpkgs' test instrumentation does, in the
/// options of either generation of NixOS.
#[test]
fn the_guest_module_configures_systemd_as_nixos_tests_do() {
    for (settings, attr, want) in [
        // Under TCG a boot can take longer than systemd's 90 s for a unit or
        // a device: the backdoor waits for dev-hvc0.device.
        (true, "systemd.settings.Manager", json!({"DefaultTimeoutStartSec": 300, "DefaultDeviceTimeoutSec": 300})),
        (false, "systemd.extraConfig", json!("DefaultDeviceTimeoutSec=300\nDefaultTimeoutStartSec=300\n")),
        (true, "systemd.services.vmlab-backdoor.requires", json!(["dev-hvc0.device", "dev-ttyS0.device"])),
        // The journal on the serial console, as in a NixOS test's log.
        (
            true,
            "services.journald.settings.Journal",
            json!({"ForwardToConsole": "yes", "MaxLevelConsole": "debug", "TTYPath": "/dev/ttyS0"}),
        ),
        (
            false,
            "services.journald.extraConfig",
            json!("ForwardToConsole=yes\nMaxLevelConsole=debug\nTTYPath=/dev/ttyS0\n"),
        ),
        // network.target is not in every boot transaction; multi-user.target is.
        (true, "systemd.services.vmlab-network.wantedBy", json!(["network.target", "multi-user.target"])),
    ] {
        let Some(got) = guest_module(settings, attr) else { return };
        assert_eq!(got, want, "{attr} (settings = {settings})");
    }
}

/// The guest module makes eth0 itself, so qemu-vm.nix's `forwardPorts` and
/// an explicit `restrictNetwork = false` would be lost: evaluation fails
/// with what to write instead; `restrictNetwork = true` is what vmlab does.
#[test]
fn the_guest_module_refuses_qemu_vm_network_options_it_would_drop() {
    let forward = "forwardPorts = [ { from = \"host\"; host.port = 8080; guest.port = 80; } ];";
    let ports = "virtualisation.forwardPorts is not used on vmlab's machines";
    let restrict = "virtualisation.restrictNetwork = false cannot be had";
    for (args, want) in [
        ("", &[][..]),
        ("restrictNetwork = true;", &[]),
        (forward, &[ports]),
        ("restrictNetwork = false;", &[restrict]),
        (&format!("{forward} restrictNetwork = false;"), &[ports, restrict]),
        // A NixOS from before restrictNetwork: nothing to check there.
        ("restrictNetwork = \"absent\";", &[]),
    ] {
        let Some(assertions) = guest_module_with(args, "assertions") else { return };
        let failing: Vec<&str> = assertions
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["assertion"] == json!(false))
            .map(|a| a["message"].as_str().unwrap())
            .collect();
        assert_eq!(failing.len(), want.len(), "{args}: {failing:?}");
        for (message, start) in failing.iter().zip(want) {
            assert!(message.starts_with(start), "{args}: {message}");
        }
        if want.contains(&ports) {
            assert!(failing[0].contains("vmlabNode.forwardPorts = [ { host = 8080; guest = 80; } ]"), "{failing:?}");
        }
    }
}

/// A node is written as in NixOS tests: a NixOS module (function, attribute
/// set, path, a set with `imports`) or a list of them; vmlab's own fields go
/// under `vmlabNode`, where `kernel`, `startScript` or `guest` say it is not
/// NixOS. The spec node each form gives, with the flake's library on the
/// stand-in nixpkgs (its NixOS machines' start scripts are fake paths), or
/// the error, one that says what to write for the forms vmlab once read.
#[test]
fn nodes_are_written_as_nixos_tests_write_them() {
    let stub_lab = format!("({}).lib.x86_64-linux", nix_fixture("stub-flake.nix", ""));
    let host_lab = lab();
    let nixos = Ok(json!({"startScript": "/stub/vm-n/bin/run-n-vm"}));
    let former =
        |field: &str| Err(format!("node \"n\": \"{field}\" is a vmlab node field: write it as vmlabNode.{field}"));
    let cases: Vec<(&str, &str, Result<Value, String>)> = vec![
        (&stub_lab, "{ services.nginx.enable = true; }", nixos.clone()),
        (&stub_lab, "{ }", nixos.clone()),
        (&stub_lab, "{ pkgs, ... }: { services.nginx.enable = true; }", nixos.clone()),
        (&stub_lab, "[ { } ({ ... }: { }) ]", nixos.clone()),
        (&stub_lab, "/. + \"/server.nix\"", nixos.clone()),
        (
            &stub_lab,
            "{ imports = [ ]; vmlabNode = { vlans = [ 2 3 ]; memory = 512; }; }",
            Ok(json!({"startScript": "/stub/vm-n/bin/run-n-vm", "vlans": [2, 3]})),
        ),
        (&stub_lab, "{ vmlabNode = { kernel = \"/k\"; cmdline = \"quiet\"; }; }", Ok(json!({"kernel": "/k", "cmdline": "quiet"}))),
        (&stub_lab, "{ vmlabNode.startScript = \"/s\"; }", Ok(json!({"startScript": "/s"}))),
        (&stub_lab, "{ memory = 128; }", former("memory")),
        (
            &stub_lab,
            "{ nixos = [ ]; vlans = [ 1 ]; }",
            Err("node \"n\": \"nixos\" is no longer needed: a node is its NixOS module, as in NixOS tests \
                 (imports = [ … ]; with vmlab's fields in vmlabNode)"
                .into()),
        ),
        (&stub_lab, "{ guest.rc = ./x; }", former("guest")),
        (
            &stub_lab,
            "{ vmlabNode.kernel = \"/k\"; services.nginx.enable = true; }",
            Err("node \"n\": vmlabNode.kernel boots it without NixOS, so its NixOS settings (services) would be lost".into()),
        ),
        (
            &stub_lab,
            "{ vmlabNode = { kernel = \"/k\"; guest = true; }; }",
            Err("node \"n\": vmlabNode has kernel and guest: a node boots one way".into()),
        ),
        (&stub_lab, "\"server\"", Err("node \"n\": a NixOS module (a function, an attribute set or a path) or a list of them expected, not a string".into())),
        // Without nixpkgs, a NixOS node (an empty set among them, which
        // was vmlab's default guest) cannot be evaluated: the error says how
        // to ask for the default guest.
        (
            &host_lab,
            "{ }",
            Err("node \"n\" is a NixOS configuration: evaluating it needs nixpkgs (use the flake's lib); \
                 for vmlab's default guest, write vmlabNode.guest = true"
                .into()),
        ),
    ];
    for (lab, node, want) in cases {
        let expr = format!("({lab}.networkSpec {{ name = \"forms\"; nodes.n = {node}; }}).nodes.n");
        let Some(mut cmd) = nix("nix-instantiate") else { return };
        let out = run(cmd.args(["--eval", "--strict", "--json", "-E", &expr]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        match want {
            Ok(want) => {
                assert!(out.status.success(), "{node}: {stderr}");
                assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), want, "{node}");
            }
            Err(want) => assert!(!out.status.success() && stderr.contains(&want), "{node}: want {want:?}: {stderr}"),
        }
    }
    // The default guest: the network's, or the node's own.
    let guest = |node: &str| {
        let expr = format!("({stub_lab}.networkSpec {{ name = \"forms\"; nodes.n = {node}; }}).nodes.n");
        let mut cmd = nix("nix-instantiate")?;
        Some(
            serde_json::from_str::<Value>(&ok(run(cmd.args(["--eval", "--strict", "--json", "-E", &expr])), node))
                .unwrap(),
        )
    };
    let Some(shared) = guest("{ vmlabNode = { guest = true; memory = 64; }; }") else { return };
    assert!(shared["kernel"].as_str().unwrap().ends_with("-vmlab-guest/kernel"), "{shared}");
    assert_eq!(shared["memory"], json!(64));
    let Some(own) = guest("{ vmlabNode.guest.name = \"own-guest\"; }") else { return };
    assert!(own["initrd"].as_str().unwrap().ends_with("-own-guest/initrd"), "{own}");
}
