# vmlab as a flake (docs/nix.md). The library itself (nix/) is builtins only
# and takes every tool as an argument; this file passes nixpkgs' packages.
{
  description = "Virtual networks of QEMU VMs for automated and manual testing";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # The default guest and the QEMU options are x86_64's.
      systems = [ "x86_64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      cargoToml = builtins.fromTOML (builtins.readFile ./Cargo.toml);

      vmlabPackage = pkgs: pkgs.rustPlatform.buildRustPackage {
        pname = cargoToml.package.name;
        version = cargoToml.package.version;
        src = lib.fileset.toSource {
          root = ./.;
          fileset = lib.fileset.unions [ ./Cargo.toml ./Cargo.lock ./src ./python ./tests ];
        };
        cargoLock.lockFile = ./Cargo.lock;
        nativeBuildInputs = [ pkgs.makeWrapper ];
        # The test suite boots VMs and needs the host's kernel; the example
        # tests run as `checks` instead.
        doCheck = false;
        # What vmlab finds on PATH when a spec does not name it.
        postInstall = ''
          wrapProgram $out/bin/vmlab --suffix PATH : ${lib.makeBinPath [
            pkgs.qemu_kvm pkgs.vde2 pkgs.python3 pkgs.zstd pkgs.pkgsStatic.busybox pkgs.pkgsStatic.bash pkgs.lcov
          ]}
        '';
        meta = {
          inherit (cargoToml.package) description;
          license = lib.licenses.mit;
          mainProgram = "vmlab";
        };
      };

      # The library with nixpkgs' tools (nix/default.nix lists them).
      vmlabLib = pkgs: vmlab:
        let
          kernel = pkgs.linuxPackages.kernel;
          inherit (pkgs.stdenv.hostPlatform) system;
        in
        import ./nix {
          tools = {
            inherit system;
            vmlab = "${vmlab}/bin/vmlab";
            qemu = "${pkgs.qemu_kvm}/bin/qemu-system-x86_64";
            vdeSwitch = "${pkgs.vde2}/bin/vde_switch";
            sh = "${pkgs.bash}/bin/sh";
            coreutils = "${pkgs.coreutils}/bin";
            python3 = "${pkgs.python3}/bin/python3";
            zstd = "${pkgs.zstd}/bin/zstd";
            busybox = "${pkgs.pkgsStatic.busybox}/bin/busybox";
            bash = "${pkgs.pkgsStatic.bash}/bin/bash";
            kernel = "${kernel}/${pkgs.stdenv.hostPlatform.linux-kernel.target}";
            modules = "${kernel}/lib/modules/${kernel.modDirVersion}";
            evalNixos = import ./nix/nixos.nix {
              inherit nixpkgs system;
              guestModule = self.nixosModules.guest;
            };
          };
        };

      example = system: import ./examples/webserver { lab = self.lib.${system}; };
    in
    {
      packages = forAllSystems (pkgs: rec {
        vmlab = vmlabPackage pkgs;
        default = vmlab;
        # nix build .#vms && ./result/bin/run-vms
        vms = (example pkgs.stdenv.hostPlatform.system).vms;
      });

      # lib.<system>: buildVirtualNetwork, runTest, defaultGuest, networkSpec, numbering.
      lib = forAllSystems (pkgs: vmlabLib pkgs self.packages.${pkgs.stdenv.hostPlatform.system}.vmlab);

      nixosModules.guest = import ./nix/guest-module.nix;
      nixosModules.default = self.nixosModules.guest;

      checks = forAllSystems (pkgs:
        let system = pkgs.stdenv.hostPlatform.system; in {
          inherit (self.packages.${system}) vmlab vms;
          webserver = (example system).test;
        });

      # Hydra: one job per output and system; the test's junit.xml and log are
      # build products (nix-support/hydra-build-products).
      hydraJobs = {
        vmlab = lib.mapAttrs (_: p: p.vmlab) self.packages;
        vms = lib.mapAttrs (_: p: p.vms) self.packages;
        webserver = lib.mapAttrs (_: c: c.webserver) self.checks;
      };

      overlays.default = final: prev: {
        vmlab = vmlabPackage final;
        vmlabLib = vmlabLib final final.vmlab;
      };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.vmlab ];
          packages = [
            pkgs.cargo pkgs.rustc pkgs.clippy pkgs.rustfmt
            pkgs.qemu_kvm pkgs.vde2 pkgs.pkgsStatic.busybox pkgs.pkgsStatic.bash
            pkgs.python3 pkgs.lcov pkgs.gcc pkgs.cpio pkgs.file pkgs.nix
          ];
        };
      });
    };
}
