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

  # How a node of `nodes` is written (docs/nix.md): a NixOS module or list of
  # modules; an attribute set with `nixos`; vmlab node fields with `kernel`
  # (direct boot) or `startScript`; or fields only, for the default guest.
  normalise = node: if isFunction node || isList node then { nixos = node; } else node;

  # The spec of docs/spec.md for a network of `nodes`, and the evaluated
  # NixOS nodes (`nixos`: config and startScript by name).
  network = { name, nodes, guest ? { } }:
    let
      normalised = mapAttrs (_: normalise) nodes;
      plan = numbering { inherit name; nodes = normalised; };
      # Named by content only, so networks with the same guest share its build.
      guestOf = g: if isDerivation g then g else defaultGuest g;
      sharedGuest = guestOf guest;
      nixosConfigs = mapAttrs (nodeName: node:
        if tools ? evalNixos then
          tools.evalNixos { inherit nodeName node plan; nodes = nixosConfigs; }
        else
          throw "node \"${nodeName}\" is a NixOS configuration: evaluating it needs nixpkgs (use the flake's lib)")
        (filterAttrs (_: node: node ? nixos) normalised);
      specNode = nodeName: node:
        let fields = removeAttrs node [ "nixos" "guest" ]; in
        if node ? nixos then
          removeAttrs fields [ "memory" "cpus" ] // { startScript = nixosConfigs.${nodeName}.startScript; }
        else if node ? kernel || node ? startScript then
          fields
        else
          let g = if node ? guest then guestOf node.guest else sharedGuest; in
          { kernel = "${g}/kernel"; initrd = "${g}/initrd"; } // fields;
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
      # As in NixOS tests: nodes.server.config…
      nodes = nixos;
    };

  # The builders' PATH: coreutils, and zstd for snapshots when given.
  toolPath = "${tools.coreutils}" + (if tools ? zstd then ":${dirOf tools.zstd}" else "");

  # `vmlab snapshot` in a derivation: every machine of `network` (a
  # buildVirtualNetwork) booted once and saved (docs/snapshots.md). `ready`:
  # a readiness command by machine name.
  snapshot =
    { network
    , ready ? { }
    , accel ? null
    , requiredSystemFeatures ? [ "nixos-test" "kvm" ]
    }:
    shellDerivation {
      name = "${network.spec.name}-snapshot";
      inherit network requiredSystemFeatures;
      vmlab = tools.vmlab;
      PATH = toolPath;
      scriptArgs = optionalArgs "--accel" accel
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
        nodes = mapAttrs (_: node: node.config) network.nodes;
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
