# nixosModules.guest: what a NixOS machine needs to be one of vmlab's
# machines (docs/nix.md):
# - the backdoor: a root shell on the virtio console hvc0, announced by the
#   line "Spawning backdoor root shell...", commands' output on hvc0 and their
#   standard error on the serial console: the contract of nixpkgs' test
#   instrumentation, so vmlab's driver and NixOS test scripts work unchanged;
# - the network applied at boot from fw_cfg opt/vmlab/config (docs/design.md):
#   NICs renamed by MAC, addresses, host name, /etc/hosts. The same program as
#   the default guest's (src/guest/init.sh network). Nothing in the system
#   depends on the network's shape, so one build serves every topology;
# - no default gateway, no name servers, no DHCP;
# - as NixOS test instrumentation has them: systemd's start and device
#   timeouts at 300 s, the journal on the serial console.
# With qemu-vm.nix (system.build.vm, as nix/nixos.nix uses it), the VM's
# user NIC gets the MAC vmlab configures as eth0, and the serial console is
# QEMU's standard output.
{ config, lib, options, pkgs, ... }:
let
  cfg = config.vmlab;
  serial = "ttyS0";
  # Settings of a systemd configuration file: `settings` in NixOS since 2025
  # (defaults, so a machine's own configuration can change them), lines of
  # `extraConfig` before.
  settingsOr = hasSettings: section: values:
    if hasSettings then { settings.${section} = lib.mapAttrs (_: lib.mkDefault) values; }
    else { extraConfig = lib.concatStrings (lib.mapAttrsToList (k: v: "${k}=${toString v}\n") values); };
in
{
  options.vmlab = {
    backdoor = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Run the root shell on hvc0 that vmlab's driver talks to.";
    };
    network = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Configure NICs, host name and /etc/hosts at boot from fw_cfg opt/vmlab/config.";
    };
  };

  config = lib.mkMerge [
    (lib.mkIf cfg.backdoor {
      systemd.services.vmlab-backdoor = {
        description = "vmlab backdoor: root shell on hvc0";
        wantedBy = [ "multi-user.target" ];
        # Waits up to systemd's DefaultDeviceTimeoutSec (below) for each.
        requires = [ "dev-hvc0.device" "dev-${serial}.device" ];
        after = [ "dev-hvc0.device" "dev-${serial}.device" ] ++ lib.optional cfg.network "vmlab-network.service";
        path = [ pkgs.coreutils ];
        # The shell ends on SIGHUP, as a terminal's would.
        serviceConfig.KillSignal = "SIGHUP";
        script = ''
          export USER=root HOME=/root PAGER=
          # /etc/profile is not written for `set -u`.
          set +u
          . /etc/profile
          cd /root
          exec < /dev/hvc0 > /dev/hvc0
          # The serial device can be busy for a moment after boot.
          until exec 2> /dev/${serial}; do sleep 0.1; done
          # Raw, without echo: the driver reads exactly what commands print.
          stty -F /dev/hvc0 raw -echo
          echo "Spawning backdoor root shell..."
          # Given a file, bash reads it as a script: no prompts, no job control.
          PS1= exec ${pkgs.bashInteractive}/bin/bash --norc /dev/hvc0
        '';
      };
      # A getty on either console would steal the backdoor's input.
      systemd.services."serial-getty@${serial}".enable = false;
      systemd.services."serial-getty@hvc0".enable = false;
      boot.kernelParams = [ "console=${serial}" "panic=1" "boot.panic_on_fail" ];
    })

    (lib.mkIf cfg.network {
      boot.kernelModules = [ "qemu_fw_cfg" ];
      systemd.services.vmlab-network = {
        description = "vmlab network configuration from fw_cfg";
        # network.target is in a boot only when something wants it.
        wantedBy = [ "network.target" "multi-user.target" ];
        before = [ "network-pre.target" ];
        wants = [ "network-pre.target" ];
        # Every NIC must exist before it can be found by MAC.
        after = [ "systemd-modules-load.service" "systemd-udev-settle.service" ];
        requires = [ "systemd-udev-settle.service" ];
        unitConfig.DefaultDependencies = false;
        serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
        path = [ pkgs.iproute2 pkgs.nettools pkgs.coreutils ];
        script = "exec ${pkgs.bash}/bin/bash ${../src/guest/init.sh} network";
      };
      # Written at boot, so regular files rather than links into the store.
      environment.etc.hosts.mode = "0644";
      environment.etc.hostname = lib.mkIf (config.networking.hostName != "") { mode = "0644"; };
      # The network's shape comes at boot: names stay the kernel's until renamed.
      networking.usePredictableInterfaceNames = false;
      networking.useDHCP = lib.mkDefault false;
      networking.defaultGateway = lib.mkOverride 150 null;
      networking.nameservers = lib.mkOverride 150 [ ];
    })

    {
      # As in nixpkgs' test instrumentation: under TCG, with many machines to
      # a core, a unit or a device (the backdoor's hvc0 among them) can take
      # longer than systemd's default 90 s, which would fail the boot.
      systemd = settingsOr (options ? systemd.settings) "Manager" {
        DefaultTimeoutStartSec = 300;
        DefaultDeviceTimeoutSec = 300;
      };
      # The journal on the serial console, all of it, as in a NixOS test: the
      # machine's log then says what failed in the guest.
      services.journald = settingsOr (options ? services.journald.settings) "Journal" {
        ForwardToConsole = "yes";
        TTYPath = "/dev/${serial}";
        MaxLevelConsole = "debug";
      };

      # vmlab brings eth0 itself (below), so what qemu-vm.nix would make of
      # these options would be lost: say so rather than drop them (each where
      # this NixOS has it).
      assertions = lib.optional (options ? virtualisation.forwardPorts)
        {
          assertion = config.virtualisation.forwardPorts == [ ];
          message = ''
            virtualisation.forwardPorts is not used on vmlab's machines: vmlab makes
            eth0 itself and forwards ports from 127.0.0.1 on the host. Give them
            in the node's vmlab fields instead, e.g.
              nodes.<name>.vmlabNode.forwardPorts = [ { host = 8080; guest = 80; } ];
            (docs/nix.md, "Nodes").'';
        }
      ++ lib.optional (options ? virtualisation.restrictNetwork)
        {
          # Set to false by the configuration, not left at qemu-vm.nix's
          # default (an option default's priority is 1500).
          assertion = config.virtualisation.restrictNetwork
            || options.virtualisation.restrictNetwork.highestPrio >= 1500;
          message = ''
            virtualisation.restrictNetwork = false cannot be had on vmlab's machines:
            eth0 is always restricted (QEMU's restrict=on), and the vlans reach only
            the network's machines (docs/nix.md, "nixosModules.guest").'';
        };

      virtualisation = lib.optionalAttrs (options ? virtualisation.qemu) {
        graphics = lib.mkDefault false;
        # No disk: the store comes from the host, the root is a tmpfs.
        diskImage = lib.mkDefault null;
        # eth0: QEMU user networking with the MAC vmlab configures;
        # vmlab passes restrict=on and forwarded ports in QEMU_NET_OPTS and
        # adds the vlan NICs itself.
        qemu.networkingOptions = lib.mkForce [
          "-netdev user,id=user.0,\"$QEMU_NET_OPTS\""
          "-device virtio-net-pci,netdev=user.0,mac=52:54:00:12:00:00"
        ];
      };
    }
  ];
}
