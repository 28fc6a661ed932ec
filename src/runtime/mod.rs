//! Running a built network: a private session directory, one switch per
//! vlan, one QEMU per machine, nothing left behind (docs/running.md).
//!
//! The driver builds on [`Network`]: start it, start machines (all at once or
//! lazily), stop and restart single machines, stop everything. The backdoor
//! and QMP connections are the driver's (`driver::machine`), through the
//! `driver::vm::Vm` that `Arc<VmProcess>` implements.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use vmlab::accel;
//! use vmlab::runtime::{load_plan, Network, Session};
//! let dir = std::path::Path::new("result");
//! let plan = load_plan(dir)?;
//! let session = Session::create(&plan, false)?;
//! let network = Network::start(dir, plan, session, accel::Resolved::Tcg)?;
//! let server = network.machine("server").unwrap();
//! let console = server.console().subscribe();
//! server.start()?;
//! let exit = server.wait_exit(Duration::from_secs(900));
//! # drop((console, exit));
//! network.stop();
//! # Ok(()) }
//! ```

mod console;
mod machine;
pub mod manifest;
mod prepare;
pub mod process;
pub mod reaper;
pub mod session;
pub mod signals;
mod switch;

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

pub use console::Console;
pub use machine::{Exit, VmProcess};
pub use prepare::{prepare, Prepared};
pub use session::Session;

use crate::accel;
use crate::layout::{self, SessionDir};
use crate::plan::Plan;
use switch::Switch;

/// A network whose switches run, and whose machines can be started. Stopping
/// (or dropping) it stops every machine and switch; dropping it then removes
/// the session directory unless it is kept.
pub struct Network {
    machines: Vec<Arc<VmProcess>>,
    switches: Vec<Switch>,
    plan: Plan,
    /// Last: the directory goes after every process using it.
    session: Session,
    accel: accel::Resolved,
}

impl Network {
    /// Starts one switch per vlan of `plan` in `session` and waits until each
    /// accepts connections. Machines run `plan_dir/bin/run-<name>-vm` with
    /// `accel`, and are not started yet.
    pub fn start(plan_dir: &Path, plan: Plan, session: Session, accel: accel::Resolved) -> Result<Network> {
        let layout = session.layout();
        let machines = plan
            .machines
            .iter()
            .map(|m| {
                let script = plan_dir.join(layout::run_script(&m.name));
                Arc::new(VmProcess::new(
                    m.name.clone(),
                    script,
                    machine_env(&layout, &plan, &m.name, accel),
                    layout.clone(),
                ))
            })
            .collect();
        let mut network = Network { machines, switches: Vec::new(), plan, session, accel };
        for &vlan in &network.plan.vlans {
            let users = network.plan.machines.iter().filter(|m| m.interfaces.iter().any(|i| i.vlan == vlan)).count();
            network.switches.push(Switch::start(&network.plan.vde_switch, vlan, users, &layout)?);
        }
        Ok(network)
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The accelerator every machine runs with.
    pub fn accel(&self) -> accel::Resolved {
        self.accel
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// In plan (number) order.
    pub fn machines(&self) -> &[Arc<VmProcess>] {
        &self.machines
    }

    pub fn machine(&self, name: &str) -> Option<&Arc<VmProcess>> {
        self.machines.iter().find(|m| m.name() == name)
    }

    /// Stops every machine for good (in parallel: each gets its grace period
    /// at the same time), then every switch. Idempotent.
    pub fn stop(&self) {
        std::thread::scope(|s| {
            for m in &self.machines {
                s.spawn(|| m.retire());
            }
        });
        for switch in &self.switches {
            switch.stop();
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads `DIR/plan.json`, as written by `vmlab build`.
pub fn load_plan(dir: &Path) -> Result<Plan> {
    let path = dir.join(layout::PLAN_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path:?} (is {dir:?} a directory written by `vmlab build`?)"))?;
    serde_json::from_str(&text).with_context(|| format!("{path:?} is not a plan written by this version of vmlab"))
}

/// Fails, naming the machine and port, when a forwarded host port cannot be
/// bound on 127.0.0.1 now: run before any machine starts, so a taken port is
/// a clear error rather than a QEMU failure.
pub fn check_forwarded_ports(plan: &Plan) -> Result<()> {
    for m in &plan.machines {
        for f in &m.forward_ports {
            TcpListener::bind((Ipv4Addr::LOCALHOST, f.host)).with_context(|| {
                format!(
                    "machine {:?}: cannot forward host port {} to guest port {}: 127.0.0.1:{} is not free",
                    m.name, f.host, f.guest, f.host
                )
            })?;
        }
    }
    Ok(())
}

/// Pure: the run script's environment (docs/design.md).
fn machine_env(layout: &SessionDir, plan: &Plan, machine: &str, accel: accel::Resolved) -> Vec<(String, OsString)> {
    let mut env = vec![("VMLAB_STATE_DIR".to_owned(), layout.state_dir(machine).into())];
    env.extend(plan.vlans.iter().map(|&v| (format!("QEMU_VDE_SOCKET_{v}"), layout.vlan_dir(v).into())));
    env.push(("VMLAB_ACCEL".to_owned(), accel.to_string().into()));
    env
}

/// Starts a detached helper thread; the name shows in debuggers and panics.
pub fn spawn_thread(name: String, body: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(body)
        .with_context(|| format!("cannot start thread {name}"))?;
    Ok(())
}

/// At most this many lines of a child's standard error end an error message.
const TAIL_LINES: usize = 10;
/// Read no more than this from the end of a log.
const TAIL_BYTES: u64 = 16 * 1024;

/// The end of the log a child wrote since `offset`, formatted to end a message.
fn log_tail(path: &Path, offset: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let start = offset.max(file.metadata()?.len().saturating_sub(TAIL_BYTES));
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => format_tail(&text),
        Err(e) => format!("; cannot read its standard error in {}: {e}", path.display()),
    }
}

/// Pure: a child's standard error, as the end of a message: the last
/// [`TAIL_LINES`] non-blank lines, or that it printed nothing.
fn format_tail(text: &str) -> String {
    stderr_ending(text, TAIL_LINES).unwrap_or_else(|| "; it printed nothing on its standard error".to_owned())
}

/// Pure: how every message that reports a failure ends with what a child
/// or a guest command wrote on its standard error: its last `lines`
/// non-blank lines, indented after a colon; `None` when it wrote nothing.
pub fn stderr_ending(text: &str, lines: usize) -> Option<String> {
    let all: Vec<&str> = text.lines().map(str::trim_end).filter(|l| !l.is_empty()).collect();
    if all.is_empty() {
        return None;
    }
    let tail = &all[all.len().saturating_sub(lines)..];
    Some(format!("; its standard error ended with:\n  {}", tail.join("\n  ")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{json, Map, Value};

    /// A plan of direct-boot machines on the given vlans.
    pub(crate) fn plan_with(nodes: &[(&str, &[u8])]) -> Plan {
        let nodes: Map<String, Value> =
            nodes.iter().map(|(n, v)| (n.to_string(), json!({"kernel": "/k", "vlans": v}))).collect();
        let spec = crate::spec::parse(&json!({"name": "net", "nodes": nodes}).to_string(), Path::new("/")).unwrap();
        crate::plan::plan(&spec, "/bin/qemu".into(), "/bin/vde_switch".into())
    }

    #[test]
    fn run_script_environment() {
        let plan = plan_with(&[("a", &[1]), ("b", &[1, 7])]);
        let env = machine_env(&SessionDir { root: "/s".into() }, &plan, "a", accel::Resolved::Tcg);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.to_str().unwrap())).collect();
        assert_eq!(
            env,
            [
                ("VMLAB_STATE_DIR", "/s/a"),
                ("QEMU_VDE_SOCKET_1", "/s/vlan1"),
                ("QEMU_VDE_SOCKET_7", "/s/vlan7"),
                ("VMLAB_ACCEL", "tcg"),
            ]
        );
    }

    #[test]
    fn stderr_tails() {
        let many: String = (1..=12).map(|i| format!("line {i}\n")).collect();
        let cases = [
            ("", "; it printed nothing on its standard error"),
            ("\n  \n", "; it printed nothing on its standard error"),
            ("qemu: -kernel /k: No such file\n", "; its standard error ended with:\n  qemu: -kernel /k: No such file"),
            ("a\r\n\nb", "; its standard error ended with:\n  a\n  b"),
        ];
        for (text, expected) in cases {
            assert_eq!(format_tail(text), expected, "{text:?}");
        }
        let tail = format_tail(&many);
        assert!(
            tail.ends_with(
                "  line 3\n  line 4\n  line 5\n  line 6\n  line 7\n  line 8\n  line 9\n  line 10\n  line 11\n  line 12"
            ),
            "{tail}"
        );
        assert!(!tail.contains("line 2\n"), "{tail}");
    }

    #[test]
    fn taken_port_names_machine_and_port() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut plan = plan_with(&[("server", &[1])]);
        plan.machines[0].forward_ports = vec![crate::spec::ForwardPort { host: port, guest: 80 }];
        let err = format!("{:#}", check_forwarded_ports(&plan).unwrap_err());
        let expected = format!(
            "machine \"server\": cannot forward host port {port} to guest port 80: 127.0.0.1:{port} is not free: "
        );
        assert!(err.starts_with(&expected), "{err}");
        drop(taken);
        check_forwarded_ports(&plan).unwrap();
    }
}
