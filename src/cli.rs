//! Command line. The doc comments here are the `--help` text.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Build and run virtual networks of QEMU virtual machines for testing.
///
/// A network is described as JSON (see docs/spec.md): named machines, each on
/// one or more virtual LANs. vmlab computes addressing compatible with the
/// NixOS test framework, writes run scripts, runs the network with a private
/// switch per VLAN, and drives test scripts against the machines.
///
/// Exit status: 0 success, 1 a test or guest command failed, 2 bad input or
/// harness error.
#[derive(Debug, Parser)]
#[command(name = "vmlab", version, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the network plan (machine numbers, MACs, addresses, hosts file) as JSON.
    Plan(PlanArgs),
    /// Write run scripts for a network into a directory (bin/run-vms, bin/run-<name>-vm).
    Build(BuildArgs),
    /// Start every machine of a built network, each VLAN on a private switch.
    ///
    /// Stops everything and removes its private state on Ctrl-C, SIGTERM or
    /// SIGHUP. Serial consoles are logged to the session directory and shown
    /// on the terminal, prefixed with the machine name.
    Up(UpArgs),
    /// Build the default minimal guest (kernel + initrd) from the host's kernel and a static busybox.
    Guest(GuestArgs),
    /// Build the combined coverage report from the .gcda files a test collected.
    ///
    /// Reads DIR/coverage-data/<machine>/ (written by `vmlab test --coverage`)
    /// and writes DIR/coverage-data/<machine>.info, DIR/coverage.info and
    /// DIR/coverage/index.html. Needs lcov.
    Coverage(CoverageArgs),
}

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm is usable and the CPU has vmx or svm, TCG otherwise.
    Auto,
    /// Hardware virtualisation; fails when KVM is unusable.
    Kvm,
    /// Software emulation: works everywhere, several times slower.
    Tcg,
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Network spec (JSON); `-` reads standard input.
    pub spec: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Network spec (JSON); `-` reads standard input.
    pub spec: PathBuf,
    /// Output directory (created; must be empty or absent).
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// A directory written by `vmlab build`.
    pub dir: PathBuf,
    /// Accelerator for every machine.
    #[arg(long, value_enum, env = "VMLAB_ACCEL", default_value = "auto")]
    pub accel: Accel,
    /// Keep the session directory (logs, sockets' directory) after the network stops.
    #[arg(long)]
    pub keep_state: bool,
}

#[derive(Debug, clap::Args)]
pub struct GuestArgs {
    /// Output directory (created if missing); `kernel` and `initrd` are written into it. See docs/guest.md.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Kernel image [default: the newest /boot/vmlinuz-*].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Module tree matching the kernel [default: /lib/modules/<release of --kernel>].
    #[arg(long)]
    pub modules: Option<PathBuf>,
    /// Statically linked busybox [default: `busybox` on PATH].
    #[arg(long)]
    pub busybox: Option<PathBuf>,
    /// Statically linked bash to include as /bin/bash [default: `bash-static` on PATH, if any].
    #[arg(long, conflicts_with = "no_bash")]
    pub bash: Option<PathBuf>,
    /// Do not include bash even when a static one is found.
    #[arg(long)]
    pub no_bash: bool,
    /// Add a host file or directory (recursively) to the guest at an absolute GUEST_PATH (repeatable).
    #[arg(long = "add", value_name = "HOST_PATH:GUEST_PATH")]
    pub add: Vec<String>,
    /// Shell script run at boot, after networking and before the backdoor shell (start services here).
    #[arg(long)]
    pub rc: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct CoverageArgs {
    /// A test's output directory.
    pub dir: PathBuf,
    /// A directory holding the .gcno files (and sources) of programs built with
    /// --coverage (repeatable).
    #[arg(long = "build-dir", value_name = "DIR", required = true)]
    pub build_dirs: Vec<PathBuf>,
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Plan(args) => crate::emit::plan_command(&args),
        Command::Build(args) => crate::emit::build_command(&args),
        Command::Up(args) => crate::runtime::up_command(&args),
        Command::Guest(args) => crate::guest::guest_command(&args),
        Command::Coverage(args) => crate::coverage::coverage_command(&args),
    }
}
