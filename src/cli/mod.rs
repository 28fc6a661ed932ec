//! The command line: clap types only (src/commands/ runs them). The doc
//! comments here are the `--help` text.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::accel::Accel;
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
    /// on the terminal, prefixed with the machine name. Serves the control
    /// socket and prints `export VMLAB_SOCKET=…`: the client subcommands and
    /// `vmlab shell` then drive the machines.
    Up(UpArgs),
    /// Run a test script against a network: exit 0 passed, 1 failed, 2 harness error.
    ///
    /// Machines start on start_all() or on their first command, in parallel.
    /// SCRIPT is an executable, run as is (shell scripts use the client
    /// subcommands below: `vmlab succeed MACHINE -- CMD`…), or a `.py` file, run
    /// with python3 with the NixOS-compatible client preloaded and one object
    /// per machine bound as a global; a `.py` script is checked before any
    /// machine boots. Scripts find the driver through VMLAB_SOCKET. Reports go
    /// to --out: junit.xml, vmlab.log, <machine>.serial.log, copies and
    /// screenshots. See docs/testing.md.
    Test(TestArgs),
    /// Boot every machine of a network and save its state, for tests to restore instead of booting.
    ///
    /// Waits for each machine's backdoor shell and, if given (--ready or the
    /// spec's snapshotReady), until its readiness command succeeds, then saves
    /// its memory and devices into DIR with a manifest keyed to the plan, the
    /// run scripts, the files QEMU reads, QEMU's command line and version.
    /// `vmlab test` and `vmlab up` take --snapshot DIR. A machine with a 9p
    /// share mounted or a disk image in its state directory cannot be saved.
    /// See docs/snapshots.md.
    Snapshot(SnapshotArgs),
    /// Build the default minimal guest (kernel + initrd) from the host's kernel and a static busybox.
    Guest(GuestArgs),
    /// Build the combined coverage report from the .gcda files a test collected.
    ///
    /// Reads DIR/coverage-data/<machine>/ (written by `vmlab test --coverage`)
    /// and writes DIR/coverage-data/<machine>.info, DIR/coverage.info and
    /// DIR/coverage/index.html. Needs lcov.
    Coverage(CoverageArgs),
    #[command(flatten)]
    Client(ClientCommand),
    /// Runs a program so that nothing it starts outlives it: how `vmlab test`
    /// runs a test script (src/runtime/reaper.rs).
    #[command(hide = true)]
    Reap(ReapArgs),
}

/// How a client reaches the driver.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// The control socket [default: $VMLAB_SOCKET].
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct MachineArgs {
    pub machine: String,
    /// Seconds to wait [default: 900].
    #[arg(long)]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, clap::Args)]
pub struct CommandArgs {
    pub machine: String,
    /// The shell command (words are joined with spaces).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
    /// Seconds before the command is stopped [default: none for succeed and
    /// fail, 900 for execute and the waits].
    #[arg(long)]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, clap::Args)]
pub struct PortArgs {
    pub machine: String,
    pub port: u16,
    /// Address to connect to, in the guest.
    #[arg(long, default_value = "localhost")]
    pub addr: String,
    #[arg(long)]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, clap::Args)]
pub struct ValueArgs {
    pub machine: String,
    /// The path, unit, regular expression, screenshot name or monitor command.
    pub value: String,
    /// For wait-for-unit: a user's systemd instance.
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    pub machine: String,
    /// copy-to-vm: the host file or directory; copy-from-vm: the guest's.
    pub source: String,
    /// copy-to-vm: the guest path the copy gets; copy-from-vm: a directory
    /// under the output directory [default: the output directory].
    pub dest: Option<String>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, clap::Args)]
pub struct LinkArgs {
    pub machine: String,
    /// Only this interface (eth1, …) [default: every vlan interface].
    #[arg(long)]
    pub interface: Option<String>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, clap::Args)]
pub struct ForwardArgs {
    pub machine: String,
    pub host_port: u16,
    pub guest_port: u16,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, clap::Args)]
pub struct SleepArgs {
    pub machine: String,
    pub seconds: f64,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, clap::Args)]
pub struct TextArgs {
    pub text: String,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, clap::Args)]
pub struct SerialArgs {
    pub state: OnOff,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, clap::Args)]
pub struct SubtestArgs {
    #[command(subcommand)]
    pub action: SubtestAction,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Subcommand)]
pub enum SubtestAction {
    /// Open a (nested) subtest: a JUnit testcase.
    Begin { name: String },
    /// Close the innermost subtest.
    End {
        /// It failed, with this message.
        #[arg(long)]
        failure: Option<String>,
    },
}

/// Clients of a running network's control socket (`vmlab test` scripts,
/// `vmlab up`). Exit status: 0 done, 1 the check failed or timed out or the
/// machine died, 2 bad request or harness error; `execute` exits with the
/// command's status.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Run a command in a machine; print its output; exit 1 if it fails.
    Succeed(CommandArgs),
    /// Run a command in a machine; exit 1 if it succeeds.
    Fail(CommandArgs),
    /// Run a command in a machine; print stdout and stderr; exit with its status.
    Execute(CommandArgs),
    /// Repeat a command until it succeeds.
    WaitUntilSucceeds(CommandArgs),
    /// Repeat a command until it fails.
    WaitUntilFails(CommandArgs),
    /// Wait until something listens on a TCP port in the guest.
    WaitForOpenPort(PortArgs),
    /// Wait until nothing listens on a TCP port in the guest.
    WaitForClosedPort(PortArgs),
    /// Wait until a path exists in the guest.
    WaitForFile(ValueArgs),
    /// Wait until a systemd unit is active (systemd guests).
    WaitForUnit(ValueArgs),
    /// Wait until a regular expression matches the serial console output.
    WaitForConsoleText(ValueArgs),
    /// Copy a host file or directory into a machine.
    CopyToVm(CopyArgs),
    /// Copy a guest file or directory into the output directory.
    CopyFromVm(CopyArgs),
    /// Start a machine (does not wait for it to boot).
    Start(MachineArgs),
    /// Power a machine off cleanly and wait for it.
    Shutdown(MachineArgs),
    /// Stop a machine's QEMU at once.
    Crash(MachineArgs),
    /// Wait until a machine has powered off.
    WaitForShutdown(MachineArgs),
    /// Reboot a machine.
    Reboot(MachineArgs),
    /// Take a machine's vlan links down.
    Block(LinkArgs),
    /// Bring a machine's vlan links back up.
    Unblock(LinkArgs),
    /// Forward 127.0.0.1:HOST_PORT on the host to GUEST_PORT in a machine.
    ForwardPort(ForwardArgs),
    /// Save a machine's display as PNG in the output directory.
    Screenshot(ValueArgs),
    /// Run a QEMU monitor (HMP) command and print its output.
    SendMonitorCommand(ValueArgs),
    /// Sleep in a machine.
    Sleep(SleepArgs),
    /// Start every machine.
    StartAll(Conn),
    /// Wait until every machine has powered off.
    JoinAll(Conn),
    /// List the machines and whether they run.
    Machines(Conn),
    /// Write a line to the test log.
    Log(TextArgs),
    /// Show (`on`) or hide (`off`) serial console lines on the terminal; the log file keeps them.
    SerialStdout(SerialArgs),
    /// Open or close a subtest (a JUnit testcase).
    Subtest(SubtestArgs),
    /// An interactive shell in a machine: each line runs as a command.
    Shell(MachineArgs),
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
    /// A directory written by `vmlab build`, or a network spec (JSON), built on the fly.
    pub dir: PathBuf,
    /// Accelerator for every machine.
    #[arg(long, value_enum, env = "VMLAB_ACCEL", default_value = "auto")]
    pub accel: Accel,
    /// Keep the session directory (logs, sockets' directory) after the network stops.
    #[arg(long)]
    pub keep_state: bool,
    /// Seconds a booting machine may show no sign of life (nothing on its
    /// serial console, no backdoor banner) before it is reported, with what
    /// QEMU says of it, and stopped [default: 60 under TCG, 20 with KVM, more
    /// with many machines per core].
    #[arg(long, value_name = "SECS", value_parser = positive_secs)]
    pub boot_silence: Option<std::time::Duration>,
    #[command(flatten)]
    pub restore: RestoreArgs,
}

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// A directory written by `vmlab build`, or a network spec (JSON), built on the fly.
    pub network: PathBuf,
    /// The test script: a `.py` file or any executable.
    #[arg(required_unless_present = "interactive")]
    pub script: Option<PathBuf>,
    /// Directory for the reports, copies and screenshots (created if missing).
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Where to write the JUnit report [default: OUT/junit.xml].
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// Seconds the whole test may take; then every machine and switch is
    /// stopped and the test fails, naming the step that was running.
    #[arg(long, value_name = "SECS", default_value_t = 3600.0)]
    pub global_timeout: f64,
    /// Keep the session directory (logs, sockets' directory) after the test.
    #[arg(long)]
    pub keep_state: bool,
    /// Seconds a booting machine may show no sign of life (nothing on its
    /// serial console, no backdoor banner) before it is reported, with what
    /// QEMU says of it, and stopped [default: 60 under TCG, 20 with KVM, more
    /// with many machines per core].
    #[arg(long, value_name = "SECS", value_parser = positive_secs)]
    pub boot_silence: Option<std::time::Duration>,
    #[command(flatten)]
    pub restore: RestoreArgs,
    /// A Python prompt with the machines bound, instead of a test run (with a
    /// `.py` SCRIPT, `test_script()` runs it there); no global timeout.
    #[arg(long)]
    pub interactive: bool,
    /// Accelerator for every machine.
    #[arg(long, value_enum, env = "VMLAB_ACCEL", default_value = "auto")]
    pub accel: Accel,
    /// Collect the .gcda files of programs built with --coverage from every
    /// machine into OUT/coverage-data/<machine>/ when the script ends (see
    /// docs/coverage.md).
    #[arg(long)]
    pub coverage: bool,
    /// With --coverage: a directory holding the .gcno files (and sources) of
    /// those programs (repeatable); then the report is made too: a tracefile
    /// per machine, OUT/coverage.info and OUT/coverage/index.html (needs lcov).
    #[arg(long = "build-dir", value_name = "DIR", requires = "coverage")]
    pub build_dirs: Vec<PathBuf>,
}

/// Where `vmlab up` and `vmlab test` restore machines from.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// Restore every machine from this snapshot (`vmlab snapshot`) instead
    /// of booting it; refused, saying what differs, unless it was taken of
    /// this very network. A machine started again boots cold.
    #[arg(long, value_name = "DIR")]
    pub snapshot: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// A directory written by `vmlab build`, or a network spec (JSON), built on the fly.
    pub network: PathBuf,
    /// The snapshot directory (created mode 0700; must be empty or absent).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Save MACHINE only once COMMAND succeeds in it (repeatable; tried
    /// again until it does, for up to 900 s); overrides the spec's snapshotReady.
    #[arg(long, value_name = "MACHINE=COMMAND")]
    pub ready: Vec<String>,
    /// How the state files are written: compressed, they take 40 % of the
    /// space, and restores may take a tenth of a second longer.
    #[arg(long, value_enum, default_value = "none")]
    pub compress: crate::runtime::manifest::Compression,
    /// Accelerator for every machine (a snapshot restores under the same one).
    #[arg(long, value_enum, env = "VMLAB_ACCEL", default_value = "auto")]
    pub accel: Accel,
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

#[derive(Debug, clap::Args)]
pub struct ReapArgs {
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

/// A positive number of seconds.
fn positive_secs(text: &str) -> Result<std::time::Duration, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(std::time::Duration::from_secs_f64(s)),
        _ => Err(format!("{text:?} is not a positive number of seconds")),
    }
}
