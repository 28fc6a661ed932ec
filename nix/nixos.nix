# NixOS nodes (needs nixpkgs; flake.nix passes this as tools.evalNixos). A
# node's modules are evaluated with qemu-vm.nix and the guest module; its
# system.build.vm start script becomes the node's startScript. As in NixOS
# tests, modules get `nodes` (every NixOS node's config, by name, each also
# as its own `config`: given so by nix/default.nix); they also
# get `vmlab.plan` (the numbering of nix/numbering.nix), and
# networking.primaryIPAddress / primaryIPv6Address are the node's eth1
# addresses, so `nodes.server.networking.primaryIPAddress` works as in
# NixOS tests. Not run by vmlab's own tests (no nixpkgs there): see docs/nix.md.
{ nixpkgs, system, guestModule ? ./guest-module.nix }:
# modules: the node's NixOS modules (a module or a list); fields: its vmlab
# node fields (`vmlabNode`, docs/nix.md).
{ nodeName, modules, fields, nodes, plan }:
let
  inherit (nixpkgs) lib;
  machine = lib.findFirst (m: m.name == nodeName) (throw "no machine ${nodeName} in the plan") plan.machines;
  evaluated = nixpkgs.lib.nixosSystem {
    modules = [
      "${nixpkgs}/nixos/modules/virtualisation/qemu-vm.nix"
      guestModule
      {
        nixpkgs.hostPlatform = lib.mkDefault system;
        networking.hostName = lib.mkDefault nodeName;
        networking.primaryIPAddress = lib.mkIf (machine.primaryIPv4 != null) machine.primaryIPv4;
        networking.primaryIPv6Address = lib.mkIf (machine.primaryIPv6 != null) machine.primaryIPv6;
        virtualisation.memorySize = lib.mkIf (fields ? memory) fields.memory;
        virtualisation.cores = lib.mkIf (fields ? cpus) fields.cpus;
        _module.args = {
          inherit nodes;
          vmlab = { inherit plan; };
        };
      }
    ] ++ lib.toList modules;
  };
  inherit (evaluated) config;
in
{
  inherit config;
  startScript = "${config.system.build.vm}/bin/run-${config.system.name}-vm";
}
