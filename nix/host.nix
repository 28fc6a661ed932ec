# The library on a Debian host without nixpkgs: the host's programs as tools
# (Debian packages: qemu-system-x86, vde2, busybox-static, bash-static,
# linux-image-cloud-amd64, python3, coreutils, zstd). Builds need the sandbox off
# (`--option sandbox false`), since host paths are not in the store; see
# docs/nix.md.
#
# vmlab: the vmlab executable, best as a path (./target/release/vmlab), so
# it is copied into the store and a rebuilt vmlab rebuilds what used it.
{ vmlab
, qemu ? "/usr/bin/qemu-system-x86_64"
, vdeSwitch ? "/usr/bin/vde_switch"
, sh ? "/bin/sh"
, coreutils ? "/usr/bin"
, python3 ? "/usr/bin/python3"
, zstd ? "/usr/bin/zstd"
, busybox ? "/bin/busybox"
, bash ? "/bin/bash-static"
  # The newest /boot/vmlinuz-*, in version order, named in the derivation so
  # that a new kernel makes a new guest.
, kernel ?
    let
      versions = builtins.filter (v: v != null)
        (map (f: let m = builtins.match "vmlinuz-(.*)" f; in if m == null then null else builtins.head m)
          (builtins.attrNames (builtins.readDir /boot)));
      newest = builtins.foldl' (a: b: if a == null || builtins.compareVersions b a > 0 then b else a) null versions;
    in
    if newest == null then null else "/boot/vmlinuz-${newest}"
, modules ? null
}:
import ./. {
  tools = { inherit vmlab qemu vdeSwitch sh coreutils python3 zstd busybox bash kernel modules; };
}
