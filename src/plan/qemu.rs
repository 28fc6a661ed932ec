//! QEMU options for one machine, from small pure functions.
//!
//! Values known only when the script runs (the state directory, the switch
//! sockets, the accelerator) are shell variables that the run script's
//! preamble sets (`crate::emit`); their names are the constants here.

use std::path::Path;

use super::addr::{self, MacAddr};
use super::MachinePlan;
use crate::layout;
use crate::shell::Word;
use crate::spec::ForwardPort;

/// The build output directory, found by the script from its own path.
pub const OUT_VAR: &str = "out";
/// The machine's state directory (`VMLAB_STATE_DIR`).
pub const STATE_VAR: &str = "state";
/// `kvm` or `tcg`, resolved by the script.
pub const ACCEL_VAR: &str = "accel";
/// Extra kernel parameters (nixpkgs' name), empty when unset.
pub const KERNEL_PARAMS_VAR: &str = "QEMU_KERNEL_PARAMS";
/// The guest configuration's fw_cfg name: the guest reads
/// /sys/firmware/qemu_fw_cfg/by_name/opt/vmlab/config/raw.
pub const FW_CFG_NAME: &str = "opt/vmlab/config";
/// Kernel parameters every direct-boot machine gets: the console on the
/// serial port (logged); a panic exits QEMU at once (with -no-reboot)
/// rather than leaving a dead guest behind; and no timer check: the kernel
/// counts timer ticks during a short busy wait, and an emulated CPU that
/// the host starves (many guests per core under TCG) sees too few, decides
/// "IO-APIC + timer doesn't work!" and panics.
pub const BASE_KERNEL_PARAMS: &str = "console=ttyS0 panic=-1 no_timer_check";

/// The netdev option of vlan `vlan`, chosen by the script: the switch when
/// `QEMU_VDE_SOCKET_<vlan>` is set, else a private hub.
pub fn netdev_var(vlan: u8) -> String {
    format!("netdev{vlan}")
}

/// One option and its arguments: one line of the emitted script.
pub type Opt = Vec<Word>;

fn opt(words: &[&str]) -> Opt {
    words.iter().map(|w| Word::lit(*w)).collect()
}

pub fn identity(m: &MachinePlan) -> Vec<Opt> {
    vec![
        opt(&["-name", &m.name]),
        vec![Word::lit("-accel"), Word::var(ACCEL_VAR)],
        opt(&["-m", &m.memory.to_string()]),
        opt(&["-smp", &m.cpus.to_string()]),
    ]
}

/// No default devices (each one costs boot time under TCG), no display
/// window, a VGA adapter kept for screenshots, the serial console on stdout.
pub fn headless() -> Vec<Opt> {
    vec![opt(&["-nodefaults", "-no-user-config", "-no-reboot"]), opt(&["-display", "none", "-vga", "std"])]
}

/// What a machine brings itself when run by hand or by vmlab, and takes
/// from its caller when run as a nixpkgs start script (which appends its own
/// `-serial`, virtio-serial bus, backdoor console and QMP): the serial
/// console on stdout and [`control_sockets`].
pub fn own_channels(serial: bool) -> Vec<Opt> {
    let serial = if serial { vec![opt(&["-serial", "stdio"])] } else { vec![] };
    [serial, control_sockets()].concat()
}

pub fn direct_boot(kernel: &Path, initrd: Option<&Path>, cmdline: &str) -> Vec<Opt> {
    let mut opts = vec![opt(&["-kernel", &kernel.to_string_lossy()])];
    if let Some(initrd) = initrd {
        opts.push(opt(&["-initrd", &initrd.to_string_lossy()]));
    }
    let params = match cmdline.trim() {
        "" => format!("{BASE_KERNEL_PARAMS} "),
        extra => format!("{BASE_KERNEL_PARAMS} {extra} "),
    };
    opts.push(vec![Word::lit("-append"), Word::lit(params).then_var(KERNEL_PARAMS_VAR)]);
    opts
}

/// The machine's network configuration, so one guest image serves every topology.
pub fn guest_config(m: &MachinePlan) -> Vec<Opt> {
    let value = Word::lit(format!("name={FW_CFG_NAME},file="))
        .then_var(OUT_VAR)
        .then(format!("/{}", layout::config_file(&m.name)));
    vec![vec![Word::lit("-fw_cfg"), value]]
}

/// The name the guest finds the data channel by, under
/// /sys/class/virtio-ports/*/name.
pub const DATA_PORT_NAME: &str = "vmlab.data";

/// The root-shell backdoor on a virtio console (the guest's hvc0), the data
/// channel on a named virtio-serial port, and QMP, all listening in the
/// state directory so a driver can connect at any time.
pub fn control_sockets() -> Vec<Opt> {
    let backdoor = vec![
        // Two ports, the console and the data channel, with an interrupt
        // vector per queue (two per port, two for the control queues that
        // carry the port's name, one for configuration): with the default 31
        // ports all queues share one vector, and the interrupts the console's
        // polled output raises for nothing make the guest kernel disable it
        // ("irq N: nobody cared"), input notifications with it.
        opt(&["-device", "virtio-serial,max_ports=2,vectors=7"]),
        vec![Word::lit("-chardev"), listening("socket,id=shell,path=", layout::SHELL_SOCKET)],
        opt(&["-device", "virtconsole,chardev=shell"]),
    ];
    [backdoor, data_port(), vec![vec![Word::lit("-qmp"), listening("unix:", layout::QMP_SOCKET)]]].concat()
}

/// A listening socket in the state directory, as a chardev or QMP address:
/// `prefix` then `$state/file` with the server options.
fn listening(prefix: &str, file: &str) -> Word {
    Word::lit(prefix).then_var(STATE_VAR).then(format!("/{file},server=on,wait=off"))
}

/// The data channel: a named port on whichever virtio-serial bus QEMU made
/// before it (vmlab's own, or a nixpkgs driver's `-device virtio-serial`).
pub fn data_port() -> Vec<Opt> {
    vec![
        // Not a console, so QEMU throttles it: the guest waits while the host
        // reads slowly instead of losing what it writes.
        vec![Word::lit("-chardev"), listening("socket,id=data,path=", layout::DATA_SOCKET)],
        opt(&["-device", &format!("virtserialport,chardev=data,name={DATA_PORT_NAME}")]),
    ]
}

/// eth0: QEMU user networking, isolated from the host's networks (`restrict=on`).
pub fn user_nic(ports: &[ForwardPort]) -> Vec<Opt> {
    vec![
        opt(&["-netdev", &format!("user,id=user,{}", user_net_options(ports))]),
        opt(&["-device", &format!("virtio-net-pci,netdev=user,mac={}", addr::USER_NIC_MAC)]),
    ]
}

/// `restrict=on` plus one `hostfwd` per forwarded port, on 127.0.0.1 only.
pub fn user_net_options(ports: &[ForwardPort]) -> String {
    let mut s = String::from("restrict=on");
    for p in ports {
        s += &format!(",hostfwd=tcp:127.0.0.1:{}-:{}", p.host, p.guest);
    }
    s
}

/// eth1…: one virtio NIC per vlan, with the plan's MAC, on the vlan's switch.
pub fn vlan_nics(m: &MachinePlan) -> Vec<Opt> {
    m.interfaces
        .iter()
        .flat_map(|i| {
            [vec![Word::lit("-netdev"), Word::var(netdev_var(i.vlan))], opt(&["-device", &nic_device(i.vlan, i.mac)])]
        })
        .collect()
}

fn nic_device(vlan: u8, mac: MacAddr) -> String {
    format!("virtio-net-pci,netdev=vlan{vlan},mac={mac}")
}

/// The netdev a vlan NIC uses when its switch socket is set, and the
/// private hub it falls back to when the machine runs alone.
pub fn vde_netdev(vlan: u8) -> String {
    format!("vde,id=vlan{vlan},sock=")
}

pub fn hub_netdev(vlan: u8) -> String {
    format!("hubport,id=vlan{vlan},hubid={vlan}")
}

/// The spec's `qemuOptions`, verbatim; each option on a line with its arguments.
pub fn extra(options: &[String]) -> Vec<Opt> {
    let mut opts: Vec<Opt> = Vec::new();
    for o in options {
        match opts.last_mut() {
            Some(last) if !o.starts_with('-') => last.push(Word::lit(o.as_str())),
            _ => opts.push(vec![Word::lit(o.as_str())]),
        }
    }
    opts
}

/// Everything a direct-boot machine's QEMU gets but [`own_channels`].
pub fn direct_boot_opts(
    m: &MachinePlan,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    options: &[String],
) -> Vec<Opt> {
    [
        identity(m),
        headless(),
        direct_boot(kernel, initrd, cmdline),
        guest_config(m),
        user_nic(&m.forward_ports),
        vlan_nics(m),
        extra(options),
    ]
    .concat()
}

/// What a nixpkgs start script gets from vmlab, but [`own_channels`]. It brings its own memory,
/// CPUs, display, console and user NIC (configured through `QEMU_NET_OPTS`,
/// see [`user_net_options`]), so those are left out. It does not bring
/// `-no-reboot` (nixpkgs' driver passes it itself), without which a reboot
/// or a panic (NixOS tests boot with `panic=1`) restarts the guest inside
/// QEMU, and the driver waits for an exit that never comes. Its own
/// accelerator choice (KVM when it can, else TCG) gives way to vmlab's
/// (`VMLAB_ACCEL`, `--accel`), so both kinds of machine run alike.
pub fn start_script_opts(m: &MachinePlan, options: &[String]) -> Vec<Opt> {
    [vec![opt(&["-no-reboot"]), start_script_accel()], guest_config(m), vlan_nics(m), extra(options)].concat()
}

/// The accelerator for a start script's QEMU. Not `-accel`, which QEMU
/// refuses next to the `-machine accel=kvm:tcg` (or `hvf:tcg`) that
/// qemu-vm.nix's script gives: a later `-machine accel=` replaces that one,
/// keeping its machine type.
fn start_script_accel() -> Opt {
    vec![Word::lit("-machine"), Word::lit("accel=").then_var(ACCEL_VAR)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Interface;

    fn render(opts: &[Opt]) -> Vec<String> {
        opts.iter().map(|o| o.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")).collect()
    }

    fn machine(vlans: &[u8]) -> MachinePlan {
        MachinePlan {
            name: "server".into(),
            number: 2,
            interfaces: vlans
                .iter()
                .enumerate()
                .map(|(i, &v)| Interface {
                    name: format!("eth{}", i + 1),
                    vlan: v,
                    mac: MacAddr::for_vlan_nic(v, 2),
                    ipv4: addr::ipv4(v, 2),
                    ipv4_prefix_length: 24,
                    ipv6: addr::ipv6(v, 2),
                    ipv6_prefix_length: 64,
                })
                .collect(),
            primary_ipv4: None,
            primary_ipv6: None,
            memory: 128,
            cpus: 2,
            forward_ports: vec![ForwardPort { host: 8081, guest: 80 }, ForwardPort { host: 2222, guest: 22 }],
            snapshot_ready: None,
        }
    }

    #[test]
    fn identity_and_accel() {
        assert_eq!(render(&identity(&machine(&[]))), ["-name server", "-accel \"$accel\"", "-m 128", "-smp 2"]);
    }

    #[test]
    fn kernel_params_append_cmdline_then_env() {
        let opts = render(&direct_boot(Path::new("/k"), Some(Path::new("/i")), "  quiet  "));
        assert_eq!(
            opts,
            [
                "-kernel /k",
                "-initrd /i",
                "-append 'console=ttyS0 panic=-1 no_timer_check quiet '\"$QEMU_KERNEL_PARAMS\""
            ]
        );
        let opts = render(&direct_boot(Path::new("/my kernel"), None, ""));
        assert_eq!(
            opts,
            ["-kernel '/my kernel'", "-append 'console=ttyS0 panic=-1 no_timer_check '\"$QEMU_KERNEL_PARAMS\""]
        );
    }

    #[test]
    fn forwarded_ports_bind_loopback_only() {
        assert_eq!(
            user_net_options(&machine(&[]).forward_ports),
            "restrict=on,hostfwd=tcp:127.0.0.1:8081-:80,hostfwd=tcp:127.0.0.1:2222-:22"
        );
        assert_eq!(user_net_options(&[]), "restrict=on");
        assert_eq!(render(&user_nic(&[]))[1], "-device virtio-net-pci,netdev=user,mac=52:54:00:12:00:00");
    }

    #[test]
    fn one_nic_per_vlan_with_plan_mac() {
        assert_eq!(
            render(&vlan_nics(&machine(&[1, 10]))),
            [
                "-netdev \"$netdev1\"",
                "-device virtio-net-pci,netdev=vlan1,mac=52:54:00:12:01:02",
                "-netdev \"$netdev10\"",
                "-device virtio-net-pci,netdev=vlan10,mac=52:54:00:12:0a:02",
            ]
        );
        assert!(vlan_nics(&machine(&[])).is_empty());
    }

    #[test]
    fn sockets_live_in_the_state_dir() {
        let r = render(&control_sockets());
        assert_eq!(r[1], "-chardev socket,id=shell,path=\"$state\"/shell.sock,server=on,wait=off");
        assert_eq!(r[3], "-chardev socket,id=data,path=\"$state\"/data.sock,server=on,wait=off");
        assert_eq!(r[4], "-device virtserialport,chardev=data,name=vmlab.data");
        assert_eq!(r[5], "-qmp unix:\"$state\"/qmp.sock,server=on,wait=off");
        assert_eq!(
            render(&guest_config(&machine(&[]))),
            ["-fw_cfg name=opt/vmlab/config,file=\"$out\"/config/server.conf"]
        );
    }

    #[test]
    fn extra_options_keep_their_order_one_flag_a_line() {
        let opts: Vec<String> =
            ["value-first", "-device", "virtio-rng-pci", "-snapshot", "-smbios", "type=1"].map(String::from).into();
        assert_eq!(render(&extra(&opts)), ["value-first", "-device virtio-rng-pci", "-snapshot", "-smbios type=1"]);
    }

    #[test]
    fn start_script_leaves_out_what_nixos_brings() {
        let r = render(&start_script_opts(&machine(&[1]), &["-snapshot".into()]));
        assert!(
            r.iter().all(|o| !o.starts_with("-m ") && !o.starts_with("-netdev user") && !o.starts_with("-serial")),
            "{r:?}"
        );
        assert_eq!(r.last().unwrap(), "-snapshot");
        assert!(r.iter().any(|o| o == "-no-reboot"), "{r:?}");
        assert!(r.iter().any(|o| o == "-machine accel=\"$accel\""), "{r:?}");
        // The run script adds its own channels unless its caller brings them.
        assert!(r.iter().all(|o| !o.starts_with("-chardev") && !o.starts_with("-qmp")), "{r:?}");
        let own = render(&own_channels(false));
        assert!(own.iter().any(|o| o.starts_with("-chardev socket,id=shell")), "{own:?}");
        assert!(!own.iter().any(|o| o.starts_with("-serial")), "{own:?}");
        assert_eq!(render(&own_channels(true))[0], "-serial stdio");
    }
}
