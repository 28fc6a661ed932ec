//! `vmlab up DIR`: run a built network until a signal (docs/running.md).

use std::io::Write;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::session::{self, Config, Session};
use crate::cli::UpArgs;
use crate::driver::control::Driver;
use crate::driver::log::Log;
use crate::runtime::process::describe_exit;
use crate::runtime::signals;
use crate::runtime::{spawn_thread, Exit, Network, VmProcess};
use crate::{EXIT_HARNESS, EXIT_OK};

enum Event {
    Signal(libc::c_int),
    Ready(usize),
    NotReady(usize, anyhow::Error),
    Exited(usize, Exit),
}

pub fn run(args: &UpArgs) -> Result<ExitCode> {
    let signals = session::block_signals()?;
    let config =
        Config { network: &args.dir, accel: args.accel, keep_state: args.keep_state, boot_silence: args.boot_silence };
    let warn = |line: &str| eprintln!("{line}");
    let prepared = session::prepare_network(&config, &say, &warn)?;
    // Copies and screenshots clients ask for land where `vmlab up` was started.
    let out_dir = std::env::current_dir().context("cannot find the current directory")?;
    let session = Session::start(
        prepared,
        &out_dir,
        Arc::new(Log::stderr(None)),
        config.boot_silence,
        args.restore.snapshot.as_deref(),
    )?;
    say(&format!("control socket: export VMLAB_SOCKET={}", crate::shell::quote(&session.socket.to_string_lossy())));

    let (events, received) = mpsc::channel();
    Session::forward_signals(signals, events.clone(), Event::Signal)?;
    let network = session.network();
    for m in network.machines() {
        print_console(m, session.driver.log.clone())?;
    }
    for (i, m) in network.machines().iter().enumerate() {
        watch(i, m.clone(), session.driver.clone(), events.clone())?;
    }
    drop(events);

    let failed = run_until_stopped(network, received)?;
    session.close();
    session.stop();
    let (dir, kept) = session.end();
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
                    say(&format!("{name}: {}", describe_exit(exit.status)));
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
fn watch(i: usize, machine: Arc<VmProcess>, driver: Arc<Driver>, events: mpsc::Sender<Event>) -> Result<()> {
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
fn print_console(machine: &VmProcess, log: Arc<Log>) -> Result<()> {
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
