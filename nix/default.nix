# The vmlab Nix library, builtins only: every tool comes in through `tools`,
# so the same code runs with nixpkgs packages (flake.nix) and with a Debian
# host's programs (nix/host.nix). Nix only serialises and wires: addresses
# and QEMU options are vmlab's (`vmlab build`, `vmlab test`). See docs/nix.md.
{ tools }:
# tools.vmlab      the vmlab executable
# tools.qemu       qemu-system-x86_64
# tools.vdeSwitch  vde_switch
# tools.sh         a POSIX shell, the builders' interpreter
# tools.coreutils  a directory with coreutils, put on the builders' PATH (mkdir,
#                  cp; the run scripts' dirname and mkdir when vmlab test runs them)
# tools.python3    python3, for Python test scripts
# tools.zstd       optional: zstd, for snapshots (docs/snapshots.md); else none on PATH
# tools.busybox    a static busybox, for the default guest
# tools.bash       a static bash for the default guest, or null for none
# tools.kernel     the default guest's kernel, or null for vmlab's choice
# tools.modules    its module tree (lib/modules/<release>), or null for vmlab's choice
# tools.evalNixos  optional: how NixOS nodes are evaluated (nix/nixos.nix; needs nixpkgs)
let
  inherit (builtins) attrNames concatMap isAttrs isFunction isList listToAttrs mapAttrs removeAttrs toJSON;

  system = tools.system or builtins.currentSystem;

  optional = cond: x: if cond then [ x ] else [ ];
  optionalArgs = flag: value: if value == null then [ ] else [ flag value ];

  # A derivation whose builder is a shell script; the tools it needs are
  # passed in its environment, so they become its dependencies.
  # scriptArgs are the script's "$@", each one word whatever it contains.
  shellDerivation = { name, script, scriptArgs ? [ ], ... }@attrs:
    derivation ({ PATH = "${tools.coreutils}"; } // removeAttrs attrs [ "script" "scriptArgs" ] // {
      inherit name system;
      builder = tools.sh;
      args = [ "-c" script name ] ++ scriptArgs;
    });

  isDerivation = x: isAttrs x && (x.type or null) == "derivation";

  # The default minimal guest: `vmlab guest` in a derivation.
  # files: guest path -> host path (a directory is copied recursively).
  defaultGuest =
    { name ? "vmlab-guest"
    , rc ? null
    , files ? { }
    , kernel ? tools.kernel or null
    , modules ? tools.modules or null
    , busybox ? tools.busybox
    , bash ? tools.bash or null
    }:
    derivation {
      inherit name system;
      builder = tools.vmlab;
      args = [ "guest" "--out" (builtins.placeholder "out") "--busybox" busybox ]
        ++ (if bash == null then [ "--no-bash" ] else [ "--bash" bash ])
        ++ optionalArgs "--kernel" kernel
        ++ optionalArgs "--modules" modules
        ++ optionalArgs "--rc" rc
        ++ concatMap (target: [ "--add" "${files.${target}}:${target}" ]) (attrNames files);
    };

  # A node of `nodes` is written as a node of a NixOS test: a NixOS module
  # (a function, an attribute set, a path) or a list of modules. vmlab's own
  # fields (docs/spec.md's node fields, and `guest`) go under this one key,
  # which no NixOS option uses; the rest of an attribute set is the module.
  nodeKey = "vmlabNode";
  # The fields that say the node is not NixOS: how it boots instead.
  bootFields = [ "kernel" "startScript" "guest" ];
  # vmlab's fields as they once stood at a node's top level, before nodes
  # were NixOS modules: an error naming the key, not an unknown NixOS option.
  formerTopLevel = [ "nixos" "kernel" "initrd" "cmdline" "startScript" "vlans" "memory" "cpus" "forwardPorts" "qemuOptions" "guest" ];

  # A node as { fields, nixos, guest }: vmlab's fields (without `guest`); the
  # NixOS modules, or null when it boots otherwise; its default guest (true:
  # the network's), or null.
  normalise = nodeName: node:
    let
      fail = why: throw "node \"${nodeName}\": ${why} (docs/nix.md, \"Nodes\")";
      asNixos = modules: { fields = { }; nixos = modules; guest = null; };
    in
    if isFunction node || isList node || builtins.isPath node then asNixos node
    else if !(isAttrs node) then fail "a NixOS module (a function, an attribute set or a path) or a list of them expected, not a ${builtins.typeOf node}"
    else
      let
        given = node.${nodeKey} or { };
        module = removeAttrs node [ nodeKey ];
        former = builtins.filter (f: node ? ${f}) formerTopLevel;
        boots = builtins.filter (f: given ? ${f}) bootFields;
        boot = builtins.head boots;
      in
      if former != [ ] && builtins.head former == "nixos" then
        fail "\"nixos\" is no longer needed: a node is its NixOS module, as in NixOS tests (imports = [ … ]; with vmlab's fields in ${nodeKey})"
      else if former != [ ] then
        fail "\"${builtins.head former}\" is a vmlab node field: write it as ${nodeKey}.${builtins.head former}; the rest of a node is a NixOS module, as in NixOS tests"
      else if !(isAttrs given) then fail "${nodeKey} must be an attribute set of vmlab's node fields"
      else if builtins.length boots > 1 then fail "${nodeKey} has ${builtins.concatStringsSep " and " boots}: a node boots one way"
      else if boots != [ ] && module != { } then
        fail "${nodeKey}.${boot} boots it without NixOS, so its NixOS settings (${builtins.concatStringsSep ", " (attrNames module)}) would be lost"
      else if boots == [ ] then (asNixos module) // { fields = given; }
      else { fields = removeAttrs given [ "guest" ]; nixos = null; guest = given.guest or null; };

  # As in NixOS tests, a node's config is also reachable as its `config`.
  withConfig = config: config // { inherit config; };

  # The spec of docs/spec.md for a network of `nodes`, and the evaluated
  # NixOS nodes (`nixos`: config and startScript by name).
  network = { name, nodes, guest ? { } }:
    let
      normalised = mapAttrs normalise nodes;
      plan = numbering { inherit name; nodes = mapAttrs (_: n: n.fields) normalised; };
      # Named by content only, so networks with the same guest share its build.
      guestOf = g: if isDerivation g then g else defaultGuest g;
      sharedGuest = guestOf guest;
      nixosConfigs = mapAttrs (nodeName: n:
        if tools ? evalNixos then
          tools.evalNixos {
            inherit nodeName plan;
            inherit (n) fields;
            modules = n.nixos;
            nodes = mapAttrs (_: c: withConfig c.config) nixosConfigs;
          }
        else
          throw "node \"${nodeName}\" is a NixOS configuration: evaluating it needs nixpkgs (use the flake's lib); for vmlab's default guest, write ${nodeKey}.guest = true")
        (filterAttrs (_: n: n.nixos != null) normalised);
      specNode = nodeName: n:
        if n.nixos != null then
          removeAttrs n.fields [ "memory" "cpus" ] // { startScript = nixosConfigs.${nodeName}.startScript; }
        else if n.guest == null then
          n.fields
        else
          let g = if n.guest == true then sharedGuest else guestOf n.guest; in
          { kernel = "${g}/kernel"; initrd = "${g}/initrd"; } // n.fields;
    in
    {
      spec = {
        inherit name;
        nodes = mapAttrs specNode normalised;
        qemu = tools.qemu;
        vdeSwitch = tools.vdeSwitch;
      };
      nixos = nixosConfigs;
    };

  networkSpec = args: (network args).spec;

  filterAttrs = pred: set:
    listToAttrs (concatMap (n: optional (pred n set.${n}) { name = n; value = set.${n}; }) (attrNames set));

  # `vmlab build` in a derivation; `.spec` is the JSON it reads, as data.
  buildVirtualNetwork = { name, nodes, guest ? { } }@args:
    let inherit (network args) spec nixos; in
    shellDerivation {
      name = "${name}-vms";
      vmlab = tools.vmlab;
      spec = toJSON spec;
      # A file, not an argument: specs with many nodes exceed argument limits.
      passAsFile = [ "spec" ];
      script = ''exec "$vmlab" build "$specPath" --out "$out"'';
    } // {
      inherit spec;
      plan = numbering spec;
      # As in NixOS tests: nodes.server.networking…, nodes.server.config…;
      # and the VM's start script.
      nodes = mapAttrs (_: n: withConfig n.config // { inherit (n) startScript; }) nixos;
    };

  # The builders' PATH: coreutils, and zstd for snapshots when given.
  toolPath = "${tools.coreutils}" + (if tools ? zstd then ":${dirOf tools.zstd}" else "");

  # `vmlab snapshot` in a derivation: every machine of `network` (a
  # buildVirtualNetwork) booted once and saved (docs/snapshots.md). `ready`:
  # a readiness command by machine name; `compress`: "zstd" or "none".
  snapshot =
    { network
    , ready ? { }
    , compress ? null
    , accel ? null
    , requiredSystemFeatures ? [ "nixos-test" "kvm" ]
    }:
    shellDerivation {
      name = "${network.spec.name}-snapshot";
      inherit network requiredSystemFeatures;
      vmlab = tools.vmlab;
      PATH = toolPath;
      scriptArgs = optionalArgs "--accel" accel
        ++ optionalArgs "--compress" compress
        ++ concatMap (m: [ "--ready" "${m}=${ready.${m}}" ]) (attrNames ready);
      script = ''exec "$vmlab" snapshot "$network" --out "$out" "$@"'';
    };

  # `vmlab test` in a derivation (docs/nix.md for the arguments).
  runTest =
    { name
    , nodes
    , testScript
    , guest ? { }
    , keepFailedOutput ? false
    , requiredSystemFeatures ? [ "nixos-test" "kvm" ]
    , globalTimeout ? null
    , accel ? null
    , extraArgs ? [ ]
    , coverage ? false
    , coverageBuildDirs ? [ ]
    , snapshot ? false
    }:
    let
      network = buildVirtualNetwork { inherit name nodes guest; };
      # Booted once per network and closure, shared through the store.
      saved = self.snapshot { inherit network accel requiredSystemFeatures; };
      # A string is Python source, as in NixOS tests; so is what a function
      # of `nodes` (NixOS nodes' configs, as NixOS tests pass them) and
      # `machines` (the plan's machines by name) returns. A path or
      # derivation is a script file: Python when its name ends in .py, else
      # run as it is.
      script = if isFunction testScript then callWith scriptInputs testScript else testScript;
      scriptInputs = {
        nodes = mapAttrs (_: node: withConfig node.config) network.nodes;
        machines = listToAttrs (map (m: { name = m.name; value = m; }) network.plan.machines);
      };
      isSource = builtins.isString script;
    in
    shellDerivation ({
      name = "${name}-test";
      inherit requiredSystemFeatures;
      vmlab = tools.vmlab;
      network = network;
      PATH = "${toolPath}:${dirOf tools.python3}";
      keepFailedOutput = if keepFailedOutput then "1" else "";
      scriptArgs = optionalArgs "--global-timeout" (if globalTimeout == null then null else toString globalTimeout)
        ++ optionalArgs "--accel" accel
        ++ (if coverage then [ "--coverage" ] ++ concatMap (dir: [ "--build-dir" "${dir}" ]) coverageBuildDirs
            else if coverageBuildDirs != [ ] then throw "runTest: coverageBuildDirs needs coverage = true"
            else [ ])
        ++ (if snapshot then [ "--snapshot" "${saved}" ] else [ ])
        ++ extraArgs;
      # The script is copied under a plain name: the name reports show.
      script = ''
        if [ -n "''${testScriptSourcePath-}" ]; then
          cp "$testScriptSourcePath" test.py
        else
          cp "$testScriptFile" "$testScriptName"
        fi
        mkdir -p "$out/nix-support"
        "$vmlab" test "$network" "$PWD/$testScriptName" --out "$out" --junit "$out/junit.xml" "$@"
        status=$?
        products=$out/nix-support/hydra-build-products
        for log in "$out"/*.log; do
          if [ -e "$log" ]; then echo "file log $log" >> "$products"; fi
        done
        if [ -e "$out/junit.xml" ]; then echo "report junit $out/junit.xml" >> "$products"; fi
        if [ -e "$out/coverage/index.html" ]; then echo "report coverage $out/coverage index.html" >> "$products"; fi
        if [ "$status" -ne 0 ]; then
          if [ -z "$keepFailedOutput" ]; then exit "$status"; fi
          # Hydra's convention: the build succeeded, the product is a failure.
          echo "vmlab test exited with status $status" > "$out/nix-support/failed"
        fi
      '';
    } // (if isSource then {
      testScriptSource = script;
      testScriptName = "test.py";
      passAsFile = [ "testScriptSource" ];
    } else {
      testScriptFile = script;
      testScriptName = fileName script;
    })) // {
      inherit network;
      inherit (network) spec plan nodes;
    } // (if snapshot then { snapshot = saved; } else { });

  # A path's or store path's file name, without the store hash.
  fileName = file:
    let
      base = baseNameOf (toString file);
      stripped = builtins.match "[0-9a-z]{32}-(.*)" base;
    in
    if stripped == null then base else builtins.head stripped;

  # Calls f with the inputs it names (all of them if it names none).
  callWith = inputs: f:
    let wanted = builtins.functionArgs f; in
    f (if wanted == { } then inputs else builtins.intersectAttrs wanted inputs);

  numbering = import ./numbering.nix;

  # runTest's `snapshot` argument hides the function of that name.
  self = { inherit buildVirtualNetwork runTest defaultGuest networkSpec numbering snapshot; };
in
self
