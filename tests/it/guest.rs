//! `vmlab guest`: the default guest is built by the binary, then booted with
//! QEMU directly (the options a run script gives it) and checked through its
//! backdoor shell.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{boot, run, vmlab, Backdoor, Qemu};

const MODULES: &str = "/lib/modules";

/// Builds a guest with `vmlab guest --out DIR ARGS`, panicking with stderr on failure.
fn build_guest(dir: &Path, args: &[&str]) {
    let out = run(vmlab().arg("guest").arg("--out").arg(dir).args(args));
    assert!(out.status.success(), "vmlab guest failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Checks what every guest does from the configuration: host name, NICs
/// renamed by MAC (eth1 and eth2 swapped), addresses usable at once,
/// /etc/hosts, and names resolving over IPv4 and IPv6.
fn assert_configured(qemu: &mut Qemu, backdoor: &mut Backdoor) {
    assert_eq!(backdoor.succeed(qemu, "hostname"), "server\n");
    for (nic, mac, ipv4, ipv6) in [
        ("eth0", "52:54:00:12:00:00", "10.0.2.15/24", None),
        ("eth1", "52:54:00:12:01:02", "192.168.1.2/24", Some("2001:db8:1::2/64")),
        ("eth2", "52:54:00:12:02:02", "192.168.2.2/24", Some("2001:db8:2::2/64")),
    ] {
        let mac_now = backdoor.succeed(qemu, &format!("cat /sys/class/net/{nic}/address"));
        assert_eq!(mac_now.trim(), mac, "{nic}");
        let addresses = backdoor.succeed(qemu, &format!("ip address show dev {nic}"));
        assert!(addresses.contains(&format!("inet {ipv4} ")), "{nic}: {addresses}");
        if let Some(ipv6) = ipv6 {
            assert!(addresses.contains(&format!("inet6 {ipv6} ")), "{nic}: {addresses}");
        }
        assert!(!addresses.contains("tentative"), "{nic}: duplicate address detection is off: {addresses}");
        assert!(addresses.contains(",UP"), "{nic} is up: {addresses}");
    }
    // The kernel named the NICs in PCI order, the reverse of the configuration's.
    let serial = fs::read_to_string(&qemu.serial_log).unwrap();
    assert!(serial.contains("vmlabaside0: renamed from eth1"), "eth1 and eth2 traded names:\n{serial}");
    assert_eq!(
        backdoor.succeed(qemu, "cat /etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n# vmlab: the network's machines (fw_cfg opt/vmlab/config)\n\
         192.168.1.1 client\n2001:db8:1::1 client\n192.168.1.2 server\n2001:db8:1::2 server\n"
    );
    let ping = backdoor.succeed(qemu, "ping -c 1 server && ping6 -c 1 server");
    assert!(ping.contains("PING server (192.168.1.2)"), "{ping}");
    assert!(ping.contains("PING server (2001:db8:1::2)"), "{ping}");
}

#[test]
fn boots_with_bash_rc_and_additions_and_powers_off() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    fs::create_dir_all(w.join("www/sub")).unwrap();
    fs::write(w.join("www/index.html"), "hello from the guest\n").unwrap();
    fs::write(w.join("www/sub/tool"), "#!/bin/sh\necho tool ran\n").unwrap();
    fs::set_permissions(w.join("www/sub/tool"), fs::Permissions::from_mode(0o750)).unwrap();
    symlink("../index.html", w.join("www/sub/link")).unwrap();
    fs::write(w.join("note"), "a single file\n").unwrap();
    // The rc script starts a service and leaves a trace of the order it ran in.
    fs::write(w.join("rc"), "#!/bin/sh\nhostname > /run/rc-saw-hostname\nhttpd -h /srv/www\n").unwrap();
    let guest = w.join("guest");
    #[rustfmt::skip]
    build_guest(&guest, &[
        "--rc", w.join("rc").to_str().unwrap(),
        "--add", &format!("{}:/srv/www", w.join("www").display()),
        "--add", &format!("{}:/etc/note", w.join("note").display()),
    ]);
    let (mut qemu, mut backdoor) = boot(w, &guest);
    let q = &mut qemu;

    assert_configured(q, &mut backdoor);
    assert!(backdoor.succeed(q, "echo $BASH_VERSION").starts_with('5'), "the backdoor shell is bash");
    assert_eq!(backdoor.succeed(q, "cat /run/rc-saw-hostname"), "server\n", "rc ran after the configuration");
    assert_eq!(backdoor.succeed(q, "cat /etc/note"), "a single file\n");
    assert_eq!(backdoor.succeed(q, "stat -c '%a %F' /srv/www/sub/tool"), "750 regular file\n");
    assert_eq!(backdoor.succeed(q, "/srv/www/sub/tool"), "tool ran\n");
    assert_eq!(backdoor.succeed(q, "readlink /srv/www/sub/link"), "../index.html\n");
    // The service rc started, fetched by name and by IPv6 literal with busybox wget.
    for url in ["http://server/", "http://[2001:db8:1::2]/", "http://192.168.2.2/sub/link"] {
        let page = backdoor.succeed(q, &format!("wget -q -O - {url}"));
        assert_eq!(page, "hello from the guest\n", "{url}");
    }
    let (output, status) = backdoor.run(q, "false");
    assert_eq!((output.as_str(), status), ("", 1));
    // Standard error goes to the serial console, not to the backdoor.
    assert_eq!(backdoor.succeed(q, "echo to-stderr >&2"), "");

    // When the shell exits, init starts a new one with a new banner.
    backdoor.send("exit\n");
    backdoor.wait_for_banner(q);
    assert_eq!(backdoor.succeed(q, "echo again"), "again\n");

    backdoor.send("poweroff -f\n");
    let status = qemu.wait_for_exit();
    assert!(status.success(), "QEMU exit status after poweroff: {status}");
    let serial = fs::read_to_string(&qemu.serial_log).unwrap();
    assert!(serial.contains("to-stderr"), "stderr is on the serial console");
}

/// A module tree like `MODULES/<version>` whose needed modules are
/// compressed as distributions ship them: xz (Debian's option, Arch) and
/// zstd (nixpkgs, Fedora), both in one tree.
fn compressed_module_tree(tree: &Path) -> PathBuf {
    let version = fs::read_dir(MODULES)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("modules.dep").is_file())
        .expect("a kernel module tree (linux-image-cloud-amd64)");
    let compressed = |module: &str| {
        let zstd = module.contains("virtio_net") || module.contains("fw_cfg");
        format!("{module}.{}", if zstd { "zst" } else { "xz" })
    };
    let dep = fs::read_to_string(version.join("modules.dep")).unwrap();
    let mut compressed_dep = String::new();
    for line in dep.lines() {
        let (module, deps) = line.split_once(':').unwrap();
        let needed =
            ["virtio", "failover", "qemu_fw_cfg", "acpi/button", "input/evdev"].iter().any(|n| module.contains(n));
        if !needed {
            continue;
        }
        let target = tree.join(compressed(module));
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        let data = if target.extension().unwrap() == "zst" {
            let plain = fs::File::open(version.join(module)).unwrap();
            ruzstd::encoding::compress_to_vec(plain, ruzstd::encoding::CompressionLevel::Fastest)
        } else {
            let xz = run(Command::new("xz").args(["--check=crc32", "--stdout"]).arg(version.join(module)));
            assert!(xz.status.success(), "xz {module}");
            xz.stdout
        };
        fs::write(&target, data).unwrap();
        let deps: Vec<String> = deps.split_whitespace().map(compressed).collect();
        compressed_dep.push_str(&format!("{}: {}\n", compressed(module), deps.join(" ")));
    }
    assert!(compressed_dep.contains(".ko.zst:") && compressed_dep.contains(".ko.xz:"), "{compressed_dep}");
    fs::write(tree.join("modules.dep"), compressed_dep).unwrap();
    tree.to_path_buf()
}

#[test]
fn boots_without_bash_from_compressed_modules_and_powers_off() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let modules = compressed_module_tree(&w.join("modules"));
    let guest = w.join("guest");
    build_guest(&guest, &["--no-bash", "--modules", modules.to_str().unwrap()]);
    let (mut qemu, mut backdoor) = boot(w, &guest);
    let q = &mut qemu;

    assert_configured(q, &mut backdoor);
    assert_eq!(backdoor.succeed(q, "echo \"[$BASH_VERSION]\"; test -e /bin/bash || echo no bash"), "[]\nno bash\n");
    let lsmod = backdoor.succeed(q, "lsmod");
    assert!(lsmod.contains("virtio_net") && lsmod.contains("qemu_fw_cfg"), "{lsmod}");
    // Plain poweroff: busybox init stops everything and powers off.
    backdoor.send("poweroff\n");
    let status = qemu.wait_for_exit();
    assert!(status.success(), "QEMU exit status after poweroff: {status}");
}

#[test]
fn same_inputs_give_the_same_bytes_and_nothing_else() {
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    fs::create_dir_all(work.path().join("add/d")).unwrap();
    fs::write(work.path().join("add/d/f"), "x").unwrap();
    let add = format!("{}:/opt/add", work.path().join("add").display());
    build_guest(&a, &["--add", &add]);
    build_guest(&b, &["--add", &add]);
    for name in ["kernel", "initrd"] {
        assert!(fs::read(a.join(name)).unwrap() == fs::read(b.join(name)).unwrap(), "{name} differs");
    }
    let mut names: Vec<_> = fs::read_dir(&a).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["initrd", "kernel"], "no temporary files are left");
}

#[test]
fn bad_inputs_are_one_line_errors_and_write_nothing() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // A bzImage header naming a kernel release with no module tree.
    let mut fake_kernel = vec![0u8; 0x1000];
    fake_kernel[0x202..0x206].copy_from_slice(b"HdrS");
    fake_kernel[0x20e..0x210].copy_from_slice(&0x200u16.to_le_bytes());
    fake_kernel[0x400..0x40b].copy_from_slice(b"0.0-nowhere");
    fs::write(w.join("fake-kernel"), fake_kernel).unwrap();
    fs::create_dir(w.join("empty")).unwrap();
    fs::write(w.join("text"), "not a program\n").unwrap();
    let (fake, empty, text) = (w.join("fake-kernel"), w.join("empty"), w.join("text"));
    let (fake, empty, text) = (fake.to_str().unwrap(), empty.to_str().unwrap(), text.to_str().unwrap());
    let add_relative = format!("{text}:etc/x");
    // vmlab itself is dynamically linked.
    let dynamic = env!("CARGO_BIN_EXE_vmlab");
    let dynamic_error =
        format!("error: {dynamic} is dynamically linked, but the guest has no shared libraries: install");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (vec!["--busybox", dynamic], format!("{dynamic_error} busybox-static")),
        (vec!["--bash", dynamic], format!("{dynamic_error} bash-static")),
        (vec!["--busybox", text], format!("error: {text}: not an ELF executable")),
        (vec!["--kernel", "/nonexistent/vmlinuz"], "error: kernel /nonexistent/vmlinuz does not exist".into()),
        (
            vec!["--kernel", text],
            format!("error: cannot tell the release of kernel {text} (pass --modules): not a bzImage"),
        ),
        (
            vec!["--kernel", fake],
            "error: no kernel modules for 0.0-nowhere (no /lib/modules/0.0-nowhere/modules.dep): \
             install linux-image-cloud-amd64, or pass --modules"
                .into(),
        ),
        (vec!["--modules", "/nonexistent"], "error: module tree /nonexistent does not exist".into()),
        (vec!["--modules", empty], format!("error: cannot read {empty}/modules.dep")),
        (vec!["--rc", "/nonexistent/rc"], "error: rc script /nonexistent/rc does not exist".into()),
        (vec!["--add", "/nonexistent:/x"], "error: --add /nonexistent:/x: /nonexistent does not exist".into()),
        (
            vec!["--add", &add_relative],
            format!("error: --add {add_relative}: the guest path \"etc/x\" must be absolute"),
        ),
        (vec!["--add", text], format!("error: --add {text}: expected HOST_PATH:GUEST_PATH")),
    ];
    for (args, expected) in cases {
        let out_dir = w.join("out");
        let out = run(vmlab().arg("guest").arg("--out").arg(&out_dir).args(&args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        assert!(stderr.contains(expected.as_str()), "{args:?}: expected {expected:?} in {stderr:?}");
        let written = fs::read_dir(&out_dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(written, 0, "{args:?}: nothing written");
    }
}

/// Runs `init.sh network` (what a NixOS guest runs) on the host, in
/// namespaces of its own: network, host name, and mounts (sysfs of that
/// network, a fake fw_cfg configuration `config`, tmpfs on /etc and /run),
/// so nothing of the host changes. `before` and `after` are shell commands
/// around it; their standard output, or `None` (and why) without root.
fn init_sh_network(config: &str, before: &str, after: &str) -> Option<String> {
    let init_sh = crate::support::repo_root().join("src/guest/init.sh");
    let fw_cfg = "/sys/firmware/qemu_fw_cfg/by_name/opt/vmlab/config";
    let sandbox = format!(
        "set -eu
         mount -t sysfs sysfs /sys
         mount -t tmpfs tmpfs /sys/firmware
         mount -t tmpfs tmpfs /etc
         mount -t tmpfs tmpfs /run
         mkdir -p {fw_cfg}
         printf '%s' '{config}' > {fw_cfg}/raw
         {before}
         sh {init_sh:?} network
         {after}"
    );
    let out = run(Command::new("unshare")
        .args(["--mount", "--net", "--uts", "--propagation", "private", "sh", "-c"])
        .arg(&sandbox));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("unshare failed") {
        crate::support::skip(&format!("cannot make namespaces (not root?): {}", stderr.trim()));
        return None;
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{stderr}");
    Some(stdout)
}

/// The NIC exists before `init.sh network` runs, as a NixOS guest's does:
/// the IPv6 address must be usable at once, not tentative for a second of
/// duplicate address detection.
#[test]
fn init_sh_network_adds_ipv6_addresses_without_duplicate_address_detection() {
    let Some(stdout) = init_sh_network(
        "hostname server\ninterface eth1 52:54:00:12:01:02 2001:db8:1::2/64\n",
        "ip link add veth0 address 52:54:00:12:01:02 type veth peer name peer
         ip link set dev peer up",
        "cat /proc/sys/net/ipv6/conf/eth1/accept_dad
         ip -6 address show dev eth1 scope global",
    ) else {
        return;
    };
    assert!(stdout.starts_with("0\n") && stdout.contains("inet6 2001:db8:1::2/64"), "{stdout}");
    assert!(!stdout.contains("tentative"), "{stdout}");
}

/// On a NixOS guest /etc/hosts holds what NixOS wrote (its own lines,
/// networking.hosts, extraHosts; the last line without a line end): the
/// network's machines are added after it, once however often the service runs.
#[test]
fn init_sh_network_adds_the_machines_to_the_hosts_nixos_wrote() {
    let nixos = "127.0.0.1 localhost\n::1 localhost\n127.0.0.2 server\n10.0.0.9 db.example # extraHosts";
    let Some(stdout) = init_sh_network(
        "hostname server\nhost 192.168.1.1 client\nhost 2001:db8:1::1 client\n",
        &format!("printf '{nixos}' > /etc/hosts; chmod 0604 /etc/hosts"),
        &format!(
            "sh {:?} network; stat -c %a /etc/hosts; cat /etc/hosts",
            crate::support::repo_root().join("src/guest/init.sh")
        ),
    ) else {
        return;
    };
    assert_eq!(
        stdout,
        format!(
            "604\n{nixos}\n# vmlab: the network's machines (fw_cfg opt/vmlab/config)\n\
             192.168.1.1 client\n2001:db8:1::1 client\n"
        )
    );
}
