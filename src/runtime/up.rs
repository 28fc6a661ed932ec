//! `vmlab up DIR`: run a built network until a signal (docs/running.md).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::signals::{self, BlockedSignals};
use super::{accel, check_forwarded_ports, load_plan, spawn_thread, Exit, Machine, Network, Session};
use crate::cli::{Accel, UpArgs};
use crate::driver::control::{serve, Driver};
use crate::driver::log::Log;
use crate::plan::Plan;
use crate::{EXIT_HARNESS, EXIT_OK};

enum Event {
    Signal(libc::c_int),
    Ready(usize),
    NotReady(usize, anyhow::Error),
    Exited(usize, Exit),
}

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
            let dir = session.path().join("build");
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

pub fn up_command(args: &UpArgs) -> Result<ExitCode> {
    // Before any thread exists, so that every thread inherits the mask.
    let signals = BlockedSignals::block(&signals::TERMINATION)?;
    let warn = |line: &str| eprintln!("{line}");
    let prepared = prepare(&args.dir, args.accel, args.keep_state, &say, &warn)?;
    let plan_dir = prepared.plan_dir.clone();
    let network = prepared.start()?;
    // Copies and screenshots clients ask for land where `vmlab up` was started.
    let out_dir = std::env::current_dir().context("cannot find the current directory")?;
    let driver = Arc::new(Driver::for_network(&network, &out_dir, Arc::new(Log::stderr(None)), args.boot_silence));
    if let Some(snapshot) = &args.snapshot {
        super::snapshot::attach(snapshot, &driver, &network, &plan_dir)?;
    }
    let socket = network.session().layout().control_socket();
    serve(driver.clone(), &socket)?;
    say(&format!("control socket: export VMLAB_SOCKET={}", crate::shell::quote(&socket.to_string_lossy())));

    let (events, received) = mpsc::channel();
    let to_events = events.clone();
    spawn_thread("signals".into(), move || while to_events.send(Event::Signal(signals.wait())).is_ok() {})?;
    for m in network.machines() {
        print_console(m, driver.log.clone())?;
    }
    for (i, m) in network.machines().iter().enumerate() {
        watch(i, m.clone(), driver.clone(), events.clone())?;
    }
    drop(events);

    let failed = run_until_stopped(&network, received)?;
    driver.close();
    network.stop();
    driver.release_all();
    let (dir, kept) = (network.session().path().to_owned(), network.session().kept());
    drop(network);
    say(&format!("stopped; {} {}", if kept { "kept" } else { "removed" }, dir.display()));
    Ok(ExitCode::from(if failed { EXIT_HARNESS } else { EXIT_OK }))
}

/// Reports events until a signal or until no machine runs. Returns whether
/// a machine failed; a machine that exits before its backdoor is up is an error.
fn run_until_stopped(network: &Network, events: mpsc::Receiver<Event>) -> Result<bool> {
    let machines = network.machines();
    let mut ready = vec![false; machines.len()];
    let mut running = machines.len();
    let mut failed = false;
    for event in events {
        match event {
            Event::Signal(signal) => {
                say(&format!("{}: stopping the network", signals::name(signal).unwrap_or("signal")));
                break;
            }
            // The driver's log has said "backdoor shell ready" with the time.
            Event::Ready(i) => {
                ready[i] = true;
                if ready.iter().all(|&r| r) {
                    say(&match machines.len() {
                        1 => "the machine is up; Ctrl-C stops the network".to_owned(),
                        n => format!("all {n} machines are up; Ctrl-C stops the network"),
                    });
                }
            }
            Event::NotReady(i, e) => eprintln!("warning: machine {:?}: {e:#}", machines[i].name()),
            Event::Exited(i, exit) => {
                let name = machines[i].name();
                if !ready[i] {
                    let hint = if network.session().kept() { "" } else { " (--keep-state keeps its logs)" };
                    bail!("machine {name:?} failed to start{hint}: it {exit}");
                }
                running -= 1;
                if exit.status.success() {
                    say(&format!("{name}: {}", super::process::describe_exit(exit.status)));
                } else {
                    failed = true;
                    eprintln!("error: machine {name:?} {exit}");
                }
                if running == 0 {
                    say("no machine is running: stopping the network");
                    break;
                }
            }
        }
    }
    Ok(failed)
}

/// Starts the machine through the driver (which owns its backdoor and
/// QEMU's sockets), waits for its backdoor, then for its exit, reporting each.
fn watch(i: usize, machine: Arc<Machine>, driver: Arc<Driver>, events: mpsc::Sender<Event>) -> Result<()> {
    spawn_thread(format!("watch-{}", machine.name()), move || {
        let name = machine.name().to_owned();
        // The driver's log says when it starts and when its backdoor is ready.
        let booted = driver.with_machine(&name, |m| m.wait_for_boot_within(Duration::MAX));
        match booted.expect("the driver has every machine of the network") {
            Ok(()) => _ = events.send(Event::Ready(i)),
            // An exit is the usual cause: the exit event says it better.
            Err(e) if machine.is_running() => _ = events.send(Event::NotReady(i, e.into())),
            Err(_) => {}
        }
        if let Some(exit) = machine.wait_exit(Duration::MAX) {
            let _ = events.send(Event::Exited(i, exit));
        }
    })
}

/// Prints the machine's serial console on standard output, `name # line`,
/// unless a client turned that off (`serial_stdout_off`).
fn print_console(machine: &Machine, log: Arc<Log>) -> Result<()> {
    let lines = machine.console().subscribe();
    let name = machine.name().to_owned();
    spawn_thread(format!("print-{name}"), move || {
        for line in lines.into_iter().filter(|_| log.serial_shown()) {
            // A closed terminal must not take the network down with a panic.
            let _ = writeln!(std::io::stdout().lock(), "{name} # {line}");
        }
    })
}

fn say(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "vmlab: {message}");
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
