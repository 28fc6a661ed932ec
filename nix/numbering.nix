# The addressing rules of docs/spec.md (those of nixpkgs' NixOS test
# framework), in Nix, for configurations that need a peer's address at
# evaluation time. `vmlab plan` is the reference: tests/it/nix.rs compares the
# two on generated specs. Builtins only.
#
# spec: a network spec as in docs/spec.md (only `name` and each node's
# `vlans`, `memory`, `cpus` and `forwardPorts` matter here).
# Returns what `vmlab plan` prints, without `qemu` and `vdeSwitch`.
spec:
let
  inherit (builtins) attrNames concatStringsSep concatMap elemAt filter genList length substring sort toString;

  imap = f: list: genList (i: f i (elemAt list i)) (length list);

  hexDigit = d: substring d 1 "0123456789abcdef";
  hex2 = n: hexDigit (n / 16) + hexDigit (n - n / 16 * 16);

  unique = list: if list == [ ] then [ ] else
    let rest = unique (builtins.tail list); in
    if builtins.elem (builtins.head list) rest then rest else [ (builtins.head list) ] ++ rest;

  interface = number: k: vlan: {
    name = "eth${toString (k + 1)}";
    inherit vlan;
    mac = "52:54:00:12:${hex2 vlan}:${hex2 number}";
    ipv4 = "192.168.${toString vlan}.${toString number}";
    ipv4PrefixLength = 24;
    # Decimal, as nixpkgs interpolates it: vlan 10 is 2001:db8:10::.
    ipv6 = "2001:db8:${toString vlan}::${toString number}";
    ipv6PrefixLength = 64;
  };

  # attrNames sorts byte-wise, which is the numbering order.
  machine = i: name:
    let
      node = spec.nodes.${name};
      interfaces = imap (interface (i + 1)) (node.vlans or [ 1 ]);
      primary = field: if interfaces == [ ] then null else (builtins.head interfaces).${field};
    in
    {
      inherit name interfaces;
      number = i + 1;
      primaryIPv4 = primary "ipv4";
      primaryIPv6 = primary "ipv6";
      memory = node.memory or 256;
      cpus = node.cpus or 1;
      forwardPorts = node.forwardPorts or [ ];
    };

  machines = imap machine (attrNames spec.nodes);

  hostLines = m:
    if m.interfaces == [ ] then [ ]
    else [ "${m.primaryIPv4} ${m.name}\n" "${m.primaryIPv6} ${m.name}\n" ];
in
{
  name = spec.name or "network";
  vlans = sort (a: b: a < b) (unique (concatMap (m: map (i: i.vlan) m.interfaces) machines));
  hosts = concatStringsSep "" (concatMap hostLines machines);
  inherit machines;
}
