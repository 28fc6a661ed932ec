//! One vde_switch per vlan, in hub mode, daemonless, owned by vmlab.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::log_tail;
use super::process::{deadline_after, describe_exit, ChildGuard, Poll, STOP_GRACE};
use crate::layout::SessionDir;

/// A switch comes up in milliseconds; this only bounds a broken one.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// vde_switch's default, kept as a floor so ad-hoc clients (vde_plug, a
/// capture) can join a small network.
const MIN_PORTS: usize = 32;

pub struct Switch {
    guard: ChildGuard,
    /// vde_switch reads management commands from standard input and exits at
    /// its end of file; holding the pipe open keeps it running, and vmlab's
    /// death closes it.
    _console: ChildStdin,
}

impl Switch {
    /// Starts the switch of `vlan` for `machines` machines, its sockets in
    /// [`SessionDir::vlan_dir`], and waits until its control socket accepts connections.
    pub fn start(vde_switch: &Path, vlan: u8, machines: usize, layout: &SessionDir) -> Result<Switch> {
        let what = format!("vde_switch for vlan {vlan}");
        let log_path = layout.switch_log(vlan);
        let log = File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut cmd = Command::new(vde_switch);
        cmd.args(args(&layout.vlan_dir(vlan), machines)).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(log);
        let guard = ChildGuard::spawn(cmd, &what).context("vde_switch comes with the Debian package vde2")?;
        let console = guard.take_stdin().expect("stdin is piped");
        let ctl = layout.vlan_control_socket(vlan);
        match guard.poll_until(deadline_after(READY_TIMEOUT), || UnixStream::connect(&ctl).ok()) {
            Poll::Ready(_) => Ok(Switch { guard, _console: console }),
            Poll::Exited(status) => {
                bail!("{what} {} before it was ready{}", describe_exit(status), log_tail(&log_path, 0))
            }
            Poll::TimedOut => bail!(
                "{what} was not ready after {READY_TIMEOUT:?}: {} accepts no connection{}",
                ctl.display(),
                log_tail(&log_path, 0)
            ),
        }
    }

    pub fn stop(&self) {
        self.guard.stop(STOP_GRACE);
    }
}

/// Pure: vde_switch's arguments. `--dirmode 0700`: by default vde_switch
/// makes its socket directory setgid, which fails inside Nix builds (their
/// seccomp filter refuses setuid and setgid modes), and the session
/// directory is private to this user anyway.
fn args(dir: &Path, machines: usize) -> Vec<OsString> {
    // vde_switch never hands out port 0: `--numports N` plugs N - 1 machines,
    // and one more waits, QEMU blocked in its netdev before the guest starts.
    let ports = (machines + 1).max(MIN_PORTS).to_string();
    let mut args = vec![OsString::from("--sock"), dir.into()];
    args.extend(["--dirmode", "0700", "--hub", "--numports", &ports].map(OsString::from));
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_arguments() {
        let cases = [(1, "32"), (31, "32"), (32, "33"), (254, "255")];
        for (machines, ports) in cases {
            assert_eq!(
                args(Path::new("/s/vlan1"), machines),
                ["--sock", "/s/vlan1", "--dirmode", "0700", "--hub", "--numports", ports].map(OsString::from),
                "{machines} machines"
            );
        }
    }
}
