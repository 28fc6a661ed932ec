//! What `vmlab up` and `vmlab test` do before anything starts (docs/running.md).

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::{check_forwarded_ports, load_plan, Network, Session};
use crate::accel::{self, Accel};
use crate::plan::Plan;

/// A network read and checked, its session directory made; nothing runs yet.
pub struct Prepared {
    /// The `vmlab build` directory: the one given, or one inside the session.
    pub plan_dir: PathBuf,
    pub plan: Plan,
    pub session: Session,
    pub accel: accel::Resolved,
}

impl Prepared {
    /// Starts the switches; machines start later, on demand.
    pub fn start(self) -> Result<Network> {
        Network::start(&self.plan_dir, self.plan, self.session, self.accel)
    }
}

/// What `vmlab up` and `vmlab test` do before anything starts: read the
/// network (a `vmlab build` directory, or a spec, built into the session
/// directory), choose the accelerator, check forwarded ports, create the
/// session directory. Progress goes to `say`, warnings to `warn`.
pub fn prepare(
    network: &Path,
    requested: Accel,
    keep_state: bool,
    say: &dyn Fn(&str),
    warn: &dyn Fn(&str),
) -> Result<Prepared> {
    let spec = if network.is_dir() { None } else { Some(crate::emit::load(network)?) };
    let plan = match &spec {
        Some(loaded) => loaded.plan.clone(),
        None => load_plan(network)?,
    };
    let choice = accel::decide(requested, &accel::probe())?;
    check_forwarded_ports(&plan)?;
    let session = Session::create(&plan, keep_state)?;
    let plan_dir = match &spec {
        Some(loaded) => {
            let dir = session.layout().build_dir();
            crate::emit::write_build(loaded, &dir)?;
            dir
        }
        None => network.to_owned(),
    };
    say(&format!("network {:?}: {}", plan.name, summary(&plan)));
    say(&format!("accelerator: {}", choice.accel));
    if let (accel::Resolved::Tcg, Some(why)) = (choice.accel, &choice.kvm_unusable_because) {
        warn(&format!(
            "warning: KVM is not usable ({why}): machines run under TCG software emulation, several times slower"
        ));
    }
    say(&format!(
        "session directory: {} (serial consoles in <machine>.serial.log, QEMU messages in <machine>.qemu.log)",
        session.path().display()
    ));
    for m in &plan.machines {
        for f in &m.forward_ports {
            say(&forward_line(f.host, &m.name, f.guest));
        }
    }
    Ok(Prepared { plan_dir, plan, session, accel: choice.accel })
}

/// Pure: "2 machines (client, server), vlans 1, 2".
fn summary(plan: &Plan) -> String {
    let names: Vec<&str> = plan.machines.iter().map(|m| m.name.as_str()).collect();
    let vlans: Vec<String> = plan.vlans.iter().map(u8::to_string).collect();
    let machines = match names.len() {
        1 => format!("1 machine ({})", names[0]),
        n => format!("{n} machines ({})", names.join(", ")),
    };
    match vlans.len() {
        0 => format!("{machines}, no vlan"),
        1 => format!("{machines}, vlan {}", vlans[0]),
        _ => format!("{machines}, vlans {}", vlans.join(", ")),
    }
}

/// Pure: how a person reaches a forwarded port; a URL for web ports.
fn forward_line(host: u16, machine: &str, guest: u16) -> String {
    let scheme = match guest {
        80 | 8000 | 8080 => "http://",
        443 | 8443 => "https://",
        _ => "",
    };
    format!("{scheme}127.0.0.1:{host} -> {machine}:{guest}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::tests::plan_with;

    #[test]
    fn summaries() {
        let cases = [
            (plan_with(&[("server", &[1])]), "1 machine (server), vlan 1"),
            (plan_with(&[("server", &[1]), ("client", &[2, 1])]), "2 machines (client, server), vlans 1, 2"),
            (plan_with(&[("alone", &[])]), "1 machine (alone), no vlan"),
        ];
        for (plan, expected) in cases {
            assert_eq!(summary(&plan), expected);
        }
    }

    #[test]
    fn forward_lines() {
        let cases = [
            ((8081, "server", 80), "http://127.0.0.1:8081 -> server:80"),
            ((8443, "web", 443), "https://127.0.0.1:8443 -> web:443"),
            ((2222, "server", 22), "127.0.0.1:2222 -> server:22"),
        ];
        for ((host, machine, guest), expected) in cases {
            assert_eq!(forward_line(host, machine, guest), expected);
        }
    }
}
