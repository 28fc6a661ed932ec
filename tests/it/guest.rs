//! `vmlab guest`: the default guest is built by the binary, then booted with
//! QEMU directly (the options a run script gives it) and checked through its
//! backdoor shell.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vmlab::layout::{self, BANNER};
use vmlab::plan::qemu;

use crate::support::{run, vmlab};

/// Generous: TCG on a loaded two-core machine, possibly two boots at once.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);
const MODULES: &str = "/lib/modules";

const CONFIG: &str = "\
# vmlab guest configuration
hostname server
interface eth0 52:54:00:12:00:00 10.0.2.15/24
interface eth1 52:54:00:12:01:02 192.168.1.2/24 2001:db8:1::2/64
interface eth2 52:54:00:12:02:02 192.168.2.2/24 2001:db8:2::2/64
host 192.168.1.1 client
host 2001:db8:1::1 client
host 192.168.1.2 server
host 2001:db8:1::2 server
unknown-keyword ignored by this guest
";

/// Builds a guest with `vmlab guest --out DIR ARGS`, panicking with stderr on failure.
fn build_guest(dir: &Path, args: &[&str]) {
    let out = run(vmlab().arg("guest").arg("--out").arg(dir).args(args));
    assert!(out.status.success(), "vmlab guest failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A QEMU process in its own process group, killed with the group and reaped on drop.
struct Qemu {
    child: Child,
    serial_log: PathBuf,
}

impl Qemu {
    /// Boots `guest` (kernel + initrd) as machine "server" of a network
    /// with "client", with the QEMU options its run script would give it
    /// (plan/qemu.rs) and [`CONFIG`] as its guest configuration. Its vlan
    /// NICs are on private hubs (as the script has them without switches)
    /// and in reverse order on the PCI bus, vlan 2's first, so the kernel's
    /// names are the reverse of the configuration's and init must swap them.
    fn boot(guest: &Path, work: &Path) -> Qemu {
        let state = work.join("state");
        fs::create_dir_all(&state).unwrap();
        let config = work.join(layout::config_file("server"));
        fs::create_dir_all(config.parent().unwrap()).unwrap();
        fs::write(&config, CONFIG).unwrap();
        let accel = match std::env::var("VMLAB_ACCEL") {
            Ok(accel) if accel != "auto" => accel,
            _ => "tcg".to_string(),
        };
        let (kernel, initrd) = (guest.join("kernel"), guest.join("initrd"));
        let node = json!({ "kernel": kernel, "initrd": initrd, "memory": 192 });
        let mut server = node.clone();
        server["vlans"] = json!([1, 2]);
        let spec = json!({ "nodes": { "client": node, "server": server } });
        let spec = vmlab::spec::parse(&spec.to_string(), work).unwrap();
        let plan = vmlab::plan::plan(&spec, "qemu-system-x86_64".into(), "vde_switch".into());
        let mut machine = plan.machine("server").unwrap().clone();
        machine.interfaces.reverse();
        let opts = [qemu::direct_boot_opts(&machine, &kernel, Some(&initrd), "", &[]), qemu::own_channels(true)];
        let value = |var: &str| match var {
            qemu::OUT_VAR => work.display().to_string(),
            qemu::STATE_VAR => state.display().to_string(),
            qemu::ACCEL_VAR => accel.clone(),
            qemu::KERNEL_PARAMS_VAR => String::new(),
            _ => match (1..=2).find(|&v| qemu::netdev_var(v) == var) {
                Some(vlan) => qemu::hub_netdev(vlan),
                None => panic!("the run script's ${var} is not known here"),
            },
        };
        let args: Vec<String> = opts.concat().iter().flatten().map(|word| word.expand(value)).collect();
        let serial_log = state.join(layout::serial_log_name("server"));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&serial_log).unwrap())
            .stderr(fs::File::create(state.join("qemu.log")).unwrap())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64: {e}"));
        Qemu { child, serial_log }
    }

    /// Panics (with the serial console's tail) if QEMU has exited.
    fn assert_alive(&mut self, waiting_for: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("QEMU exited ({status}) while waiting for {waiting_for}; serial console:\n{}", self.serial_tail());
        }
    }

    fn serial_tail(&self) -> String {
        let log = fs::read_to_string(&self.serial_log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits for QEMU to exit on its own (the guest powered off).
    fn wait_for_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + COMMAND_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU still running after poweroff; serial console:\n{}",
                self.serial_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: plain kill(2) on the process group QEMU leads.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// The guest's backdoor: the virtconsole's unix socket.
struct Backdoor {
    stream: UnixStream,
    /// Received but not yet consumed.
    pending: Vec<u8>,
}

impl Backdoor {
    /// Connects as soon as QEMU has created the socket.
    fn connect(qemu: &mut Qemu, socket: &Path) -> Backdoor {
        let deadline = Instant::now() + BOOT_DEADLINE;
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                    return Backdoor { stream, pending: Vec::new() };
                }
                Err(e) => {
                    qemu.assert_alive("the backdoor socket");
                    assert!(Instant::now() < deadline, "cannot connect to {socket:?}: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Reads until `marker`; returns what came before it and keeps the rest.
    fn read_until(&mut self, qemu: &mut Qemu, marker: &str, deadline: Duration) -> String {
        let deadline = Instant::now() + deadline;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(at) = find(&self.pending, marker.as_bytes()) {
                let before = String::from_utf8_lossy(&self.pending[..at]).into_owned();
                self.pending.drain(..at + marker.len());
                return before;
            }
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("backdoor socket closed while waiting for {marker:?}"),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                // Interrupted: seen under load on the full suite; a timed read
                // can return EINTR, which is no answer yet either.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                    qemu.assert_alive(marker);
                    assert!(
                        Instant::now() < deadline,
                        "no {marker:?} from the guest; got {:?}; serial console:\n{}",
                        String::from_utf8_lossy(&self.pending),
                        qemu.serial_tail()
                    );
                }
                Err(e) => panic!("reading the backdoor: {e}"),
            }
        }
    }

    fn wait_for_banner(&mut self, qemu: &mut Qemu) {
        let before = self.read_until(qemu, &format!("{BANNER}\n"), BOOT_DEADLINE);
        assert_eq!(before, "", "nothing but the banner on hvc0");
    }

    fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).unwrap();
    }

    /// Runs a shell command; returns its standard output and exit status.
    /// The end marker is split in the command so that an echo of the input
    /// could not be mistaken for it.
    fn run(&mut self, qemu: &mut Qemu, command: &str) -> (String, i32) {
        self.send(&format!("{command}\necho \"__END\"\"__ $?\"\n"));
        let output = self.read_until(qemu, "__END__ ", COMMAND_DEADLINE);
        let status = self.read_until(qemu, "\n", COMMAND_DEADLINE);
        (output, status.parse().unwrap())
    }

    /// Runs a command that must succeed; returns its standard output.
    fn succeed(&mut self, qemu: &mut Qemu, command: &str) -> String {
        let (output, status) = self.run(qemu, command);
        assert_eq!(status, 0, "`{command}` failed; output: {output}");
        output
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A booted guest and its backdoor, ready for commands.
fn boot(work: &Path, guest: &Path) -> (Qemu, Backdoor) {
    let mut qemu = Qemu::boot(guest, work);
    let mut backdoor = Backdoor::connect(&mut qemu, &work.join("state").join(layout::SHELL_SOCKET));
    backdoor.wait_for_banner(&mut qemu);
    (qemu, backdoor)
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
