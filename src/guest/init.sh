#!/bin/sh
# The vmlab default guest's setup and backdoor, run by busybox init (PID 1)
# as listed in /etc/inittab:
#   init.sh boot       once at boot (sysinit): file systems, modules, network, rc
#   init.sh backdoor   respawned: the root shell on the virtio console (hvc0)
# NixOS guests run `init.sh network` (the network part of boot) from a
# systemd service with its own PATH: nix/guest-module.nix.
# See docs/guest.md.

[ "${1:-}" = network ] || export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# Programs built with --coverage write their .gcda files here, in the rc
# script and in the backdoor alike; `vmlab test --coverage` collects them
# (keep in step with coverage::GUEST_DIR).
export GCOV_PREFIX=/var/lib/vmlab/coverage
CONFIG=/sys/firmware/qemu_fw_cfg/by_name/opt/vmlab/config/raw

say() {
    echo "vmlab-guest: $*"
}

mount_filesystems() {
    # Applet links do not exist yet: `busybox --install` needs /proc/self/exe.
    busybox mount -t proc proc /proc
    busybox --install -s
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    mkdir -p /dev/pts /dev/shm
    mount -t devpts devpts /dev/pts
    ln -s /proc/self/fd /dev/fd
    ln -s fd/0 /dev/stdin
    ln -s fd/1 /dev/stdout
    ln -s fd/2 /dev/stderr
    mount -t tmpfs -o mode=1777 tmpfs /dev/shm
    mount -t tmpfs -o mode=1777 tmpfs /tmp
    mount -t tmpfs -o mode=0755 tmpfs /run
}

load_modules() {
    # The list is in dependency order (resolved from modules.dep when the
    # initrd was built), so plain insmod suffices.
    while read -r module; do
        file=/lib/modules/$module
        case $module in
            *.ko.xz) unxz -c "$file" > /tmp/module.ko && file=/tmp/module.ko ;;
            *.ko.gz) zcat "$file" > /tmp/module.ko && file=/tmp/module.ko ;;
        esac
        insmod "$file" || say "cannot load kernel module $module"
    done < /etc/vmlab/modules
    rm -f /tmp/module.ko
}

# Prints the name of the interface with MAC address $1.
nic_with_mac() {
    for address in /sys/class/net/*/address; do
        if [ "$(cat "$address")" = "$1" ]; then
            dir=${address%/address}
            echo "${dir##*/}"
            return 0
        fi
    done
    return 1
}

# Without duplicate address detection, IPv6 addresses are usable as soon as
# they are added, not tentative for a second. A NIC takes the default's
# setting when it appears; one that is already there (a NixOS guest's, by the
# time its network service runs) keeps its own, so each is set too.
dad_off() {
    for conf in "$@"; do
        { echo 0 > "/proc/sys/net/ipv6/conf/$conf/accept_dad"; } 2>/dev/null ||
            say "cannot turn off IPv6 duplicate address detection on $conf"
    done
}

configure_interfaces() {
    dad_off default all
    n=0
    while read -r keyword name mac addresses; do
        [ "$keyword" = interface ] || continue
        if ! dev=$(nic_with_mac "$mac"); then
            say "no network interface has MAC $mac (wanted as $name)"
            continue
        fi
        if [ "$dev" != "$name" ] && [ -e "/sys/class/net/$name" ]; then
            # Another NIC holds the name (the kernel's eth1 may have to become
            # eth2 and the other way round): move it aside; if it is
            # configured, a later line finds it by MAC and names it.
            ip link set dev "$name" name "vmlabaside$n"
            n=$((n + 1))
        fi
        ip link set dev "$dev" name "$name"
        dad_off "$name"
        ip link set dev "$name" up
        for address in $addresses; do
            case $address in
                *:*) ip -6 address add "$address" dev "$name" ;;
                *) ip address add "$address" dev "$name" ;;
            esac || say "cannot add address $address to $name"
        done
    done < /run/vmlab/config
}

configure() {
    ip link set dev lo up
    if [ ! -r "$CONFIG" ]; then
        say "no configuration at $CONFIG (QEMU -fw_cfg name=opt/vmlab/config,...): network left unconfigured"
        return
    fi
    mkdir -p /run/vmlab
    cat "$CONFIG" > /run/vmlab/config
    configure_interfaces
    while read -r keyword first rest; do
        if [ "$keyword" = hostname ]; then
            hostname "$first"
            echo "$first" > /etc/hostname
        fi
    done < /run/vmlab/config
    write_hosts
}

HOSTS_MARK="# vmlab: the network's machines (fw_cfg opt/vmlab/config)"

# /etc/hosts keeps what the system wrote there (a NixOS guest's own lines,
# networking.hosts and extraHosts; localhost when there is no file), and the
# network's machines follow, after a line of vmlab's that marks them so that
# running this again replaces them. Rewritten in place: the file keeps its
# mode and owner.
write_hosts() {
    {
        if [ -e /etc/hosts ]; then
            while IFS= read -r line || [ -n "$line" ]; do
                [ "$line" = "$HOSTS_MARK" ] && break
                printf '%s\n' "$line"
            done < /etc/hosts
        else
            printf '127.0.0.1 localhost\n::1 localhost\n'
        fi
        echo "$HOSTS_MARK"
        while read -r keyword address name rest; do
            if [ "$keyword" = host ]; then echo "$address $name"; fi
        done < /run/vmlab/config
    } > /run/vmlab/hosts
    cat /run/vmlab/hosts > /etc/hosts
}

# The ACPI power button (QMP system_powerdown) powers the guest off, as
# systemd does on NixOS: vmlab shuts a machine down that way while its
# backdoor is busy with a command.
watch_power_button() {
    for event in /sys/class/input/event*; do
        if [ "$(cat "$event/device/name" 2>/dev/null)" = "Power Button" ]; then
            # One read returns whole events (evdev refuses reads shorter than one).
            (dd if="/dev/input/${event##*/}" of=/dev/null bs=64 count=1 2>/dev/null && poweroff) &
            return
        fi
    done
    say "no ACPI power button: a machine busy with a command cannot be shut down at once"
}

# A 9p share tagged "shared" (nixpkgs' driver's SHARED_DIR) goes to
# /tmp/shared, as on NixOS test VMs; this guest's usual kernel has no 9p,
# which is said once, with what to do instead.
mount_shared() {
    for device in /sys/bus/virtio/devices/*; do
        [ "$(cat "$device/device" 2>/dev/null)" = 0x0009 ] || continue
        mkdir -p /tmp/shared
        if ! mount -t 9p -o trans=virtio,version=9p2000.L shared /tmp/shared 2>/dev/null; then
            say "a shared directory (SHARED_DIR) is offered, but this kernel has no 9p: /tmp/shared is not mounted; copy files with vmlab's copy_to_vm and copy_from_vm"
        fi
        return
    done
}

boot() {
    mount_filesystems
    load_modules
    watch_power_button
    mkdir -p "$GCOV_PREFIX"
    configure
    mount_shared
    if [ -e /etc/vmlab/rc ]; then
        say "running /etc/vmlab/rc"
        /etc/vmlab/rc || say "/etc/vmlab/rc failed with status $?"
    fi
    say "boot done"
}

# The test-instrumentation contract shared with NixOS test VMs: on hvc0, raw
# mode without echo, the banner line, then a root shell reading commands from
# hvc0, its stdout on hvc0 and its stderr on the serial console.
backdoor() {
    if [ ! -c /dev/hvc0 ]; then
        say "no /dev/hvc0 (no virtconsole device): no backdoor shell"
        # Stay alive: init would respawn an exiting entry at once, forever.
        while :; do sleep 3600; done
    fi
    cd /root || cd /
    export HOME=/root USER=root
    exec < /dev/hvc0 > /dev/hvc0 2> /dev/ttyS0
    stty raw -echo
    echo "Spawning backdoor root shell..."
    # Both shells read the terminal as a script, as NixOS's backdoor does:
    # never interactive, so no prompts, no line editing (a tab in a command
    # would complete), no job control messages.
    if [ -x /bin/bash ]; then
        exec /bin/bash --norc --noprofile /dev/hvc0
    fi
    exec /bin/sh /dev/hvc0
}

case ${1:-} in
    boot) boot ;;
    backdoor) backdoor ;;
    network) configure ;;
    *)
        echo "usage: $0 boot|backdoor|network" >&2
        exit 2
        ;;
esac
