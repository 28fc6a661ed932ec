//! The control socket's server: the machines, each behind its own lock, and
//! the requests (protocol.rs, docs/protocol.md) dispatched to them. A thread
//! serves each connection (server.rs) and each machine has its own lock, so
//! a long wait on one machine never holds up requests for another.

mod ops;
mod server;

pub use server::serve;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::log::{Log, Style};
use super::machine::{boot_silence_limit, DrivenMachine, Interrupt};
use super::monitor::Monitor;
use super::protocol::Op;
use super::DriverError;
use crate::runtime::Network;
use crate::sync::lock;
use ops::{arg, machine_op, opt_str, qemu_op, str_arg, summary, Args};

/// Every machine, each behind its own lock, and the test's log.
pub struct Driver {
    machines: BTreeMap<String, Mutex<DrivenMachine>>,
    /// Each machine's crash and QEMU-level side, which must not wait for a
    /// request holding the machine.
    interrupts: BTreeMap<String, Interrupt>,
    monitors: BTreeMap<String, Arc<Monitor>>,
    pub log: Arc<Log>,
    /// Requests being served, by serial number: what the report names when
    /// the global timeout fires.
    in_flight: Mutex<BTreeMap<u64, String>>,
    serial: AtomicU64,
    /// The most recent error a client was given, for the verdict and the report.
    last_error: Mutex<Option<DriverError>>,
    /// Set when the test ends: no request may start a machine any more.
    closed: AtomicBool,
}

/// How long QEMU may take to answer a QMP command sent while its machine is busy.
pub(super) const QMP_TIMEOUT: Duration = Duration::from_secs(60);

impl Driver {
    pub fn new(machines: Vec<DrivenMachine>, log: Arc<Log>) -> Self {
        Driver {
            interrupts: machines.iter().map(|m| (m.name.clone(), m.interrupt())).collect(),
            monitors: machines.iter().map(|m| (m.name.clone(), m.monitor())).collect(),
            machines: machines.into_iter().map(|m| (m.name.clone(), Mutex::new(m))).collect(),
            log,
            in_flight: Mutex::new(BTreeMap::new()),
            serial: AtomicU64::new(0),
            last_error: Mutex::new(None),
            closed: AtomicBool::new(false),
        }
    }

    /// A driver for every machine of a running network, in the plan's order;
    /// copies and screenshots go to `out_dir`.
    /// `boot_silence`: see [`boot_silence_limit`]; by default from the
    /// accelerator and the machines per core of this host.
    pub fn for_network(network: &Network, out_dir: &Path, log: Arc<Log>, boot_silence: Option<Duration>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let tcg = network.accel() == crate::accel::Resolved::Tcg;
        let silence = boot_silence.unwrap_or_else(|| boot_silence_limit(tcg, network.plan().machines.len(), cores));
        let machines = network
            .plan()
            .machines
            .iter()
            .map(|planned| {
                let vm = network.machine(&planned.name).expect("the network runs its plan's machines").clone();
                let interfaces = planned.interfaces.iter().map(|i| (i.name.clone(), i.vlan)).collect();
                let mut machine = DrivenMachine::new(&planned.name, interfaces, Box::new(vm), out_dir, log.clone());
                machine.set_boot_silence(silence);
                machine
            })
            .collect();
        Self::new(machines, log)
    }

    /// Runs `f` on a machine, holding its lock; `None` when there is no such machine.
    pub fn with_machine<T>(&self, name: &str, f: impl FnOnce(&mut DrivenMachine) -> T) -> Option<T> {
        let slot = self.machines.get(name)?;
        let mut machine = lock(slot);
        Some(f(&mut machine))
    }

    /// Refuses every later request: the test is over and its machines are
    /// being stopped, and a late client must not start one again.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn machine_names(&self) -> Vec<String> {
        self.machines.keys().cloned().collect()
    }

    /// What is being done right now, oldest first.
    pub fn running_steps(&self) -> Vec<String> {
        lock(&self.in_flight).values().cloned().collect()
    }

    pub fn last_error(&self) -> Option<DriverError> {
        lock(&self.last_error).clone()
    }

    /// Answers one request line (the response has no trailing newline).
    pub fn handle_line(&self, line: &str) -> String {
        let (id, result) = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(req)) => (req.get("id").cloned().unwrap_or(Value::Null), self.handle(&req)),
            Ok(_) => (Value::Null, Err(DriverError::request("a request must be a JSON object"))),
            Err(e) => (Value::Null, Err(DriverError::request(format!("not JSON: {e}")))),
        };
        let response = match result {
            Ok(value) => json!({ "id": id, "ok": true, "result": value }),
            Err(e) => {
                *lock(&self.last_error) = Some(e.clone());
                json!({ "id": id, "ok": false, "error": { "kind": e.kind.as_str(), "message": e.message } })
            }
        };
        response.to_string()
    }

    fn handle(&self, req: &Args) -> Result<Value, DriverError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(DriverError::harness("the test is over: its machines are stopped"));
        }
        let op_name = str_arg(req, "op")?;
        let op = Op::parse(op_name);
        let machine = opt_str(req, "machine")?;
        let step = match machine {
            Some(m) => format!("{m}: {op_name} {}", summary(req)),
            None => format!("{op_name} {}", summary(req)),
        };
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        lock(&self.in_flight).insert(serial, step.trim_end().to_string());
        let result = match (machine, op) {
            (None, Some(op)) if op.is_global() => self.global(op, req),
            (None, _) => Err(DriverError::request(format!("operation {op_name:?} needs a \"machine\""))),
            (Some(name), op) => {
                let slot = self.machines.get(name).ok_or_else(|| {
                    DriverError::request(format!("no machine {name:?} (machines: {})", self.machine_names().join(", ")))
                })?;
                let op = op
                    .filter(|op| !op.is_global())
                    .ok_or_else(|| DriverError::request(format!("unknown operation {op_name:?}")))?;
                if op == Op::Crash {
                    self.interrupts[name].crash();
                }
                match slot.try_lock() {
                    Ok(mut m) => machine_op(&mut m, op, req),
                    Err(std::sync::TryLockError::Poisoned(p)) => machine_op(&mut p.into_inner(), op, req),
                    // Busy with a command: QEMU-level operations go straight to QEMU.
                    Err(std::sync::TryLockError::WouldBlock) => match qemu_op(&self.monitors[name], op, req) {
                        Some(result) => result,
                        None => {
                            if op == Op::Shutdown {
                                self.power_off_busy(name);
                            }
                            machine_op(&mut lock(slot), op, req)
                        }
                    },
                }
            }
        };
        lock(&self.in_flight).remove(&serial);
        if let Err(e) = &result {
            self.log.write(machine, &format!("error: {}", e.message), Style::Bad);
        }
        result
    }

    /// `shutdown` of a machine busy with a command: the backdoor cannot take
    /// `poweroff` before the command ends, so the guest is told through the
    /// ACPI power button; the command then fails saying why, and the
    /// shutdown, once it has the machine, finds QEMU gone.
    fn power_off_busy(&self, name: &str) {
        let (interrupt, monitor) = (&self.interrupts[name], &self.monitors[name]);
        interrupt.powering_off(true);
        if monitor.connect(QMP_TIMEOUT).and_then(|()| monitor.power_button()).is_err() {
            // The usual way, then, once the command is over.
            interrupt.powering_off(false);
        }
    }

    /// Runs `f` on every machine at once, each in its own thread; the first error.
    fn each_machine(
        &self,
        f: impl Fn(&mut DrivenMachine) -> Result<(), DriverError> + Sync,
    ) -> Result<(), DriverError> {
        let results: Vec<Result<(), DriverError>> = std::thread::scope(|s| {
            let f = &f;
            let handles: Vec<_> = self
                .machines
                .iter()
                .map(|(name, slot)| {
                    std::thread::Builder::new().name(format!("each-{name}")).spawn_scoped(s, move || f(&mut lock(slot)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(thread) => thread.join().expect("machine thread"),
                    Err(e) => Err(DriverError::harness(format!("cannot start a thread: {e}"))),
                })
                .collect()
        });
        results.into_iter().collect()
    }

    fn global(&self, op: Op, req: &Args) -> Result<Value, DriverError> {
        match op {
            Op::Machines => {
                let list: Vec<Value> =
                    self.machines.iter().map(|(name, m)| json!({ "name": name, "up": lock(m).is_up() })).collect();
                Ok(json!({ "machines": list }))
            }
            Op::StartAll => self.each_machine(DrivenMachine::start).map(|()| json!({})),
            Op::JoinAll => {
                self.each_machine(|m| m.wait_for_shutdown(Duration::from_secs(u64::from(u32::MAX)))).map(|()| json!({}))
            }
            Op::Log => {
                self.log.info(None, str_arg(req, "message")?);
                Ok(json!({}))
            }
            Op::SerialStdout => {
                let on = arg(req, "on")?
                    .as_bool()
                    .ok_or_else(|| DriverError::request("argument \"on\" must be true or false"))?;
                self.log.show_serial(on);
                Ok(json!({}))
            }
            Op::SubtestBegin => {
                self.log.subtest_begin(str_arg(req, "name")?);
                Ok(json!({}))
            }
            Op::SubtestEnd => {
                let failure = opt_str(req, "failure")?.map(str::to_string);
                let done = self.log.subtest_end(failure)?;
                Ok(json!({ "name": done.name, "duration": done.duration.as_secs_f64() }))
            }
            _ => unreachable!("only global operations get here"),
        }
    }

    /// Stops every machine that runs (end of the test); waits for machines
    /// busy with a request, which end once their QEMU is gone.
    pub fn release_all(&self) {
        for slot in self.machines.values() {
            lock(slot).release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::protocol::Client;
    use crate::driver::testing::{busybox_bin, LocalVm};
    use crate::driver::{base64, Kind};
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    fn driver(dir: &Path, names: &[&str]) -> Arc<Driver> {
        let bin = busybox_bin(dir);
        let log = Arc::new(Log::new(Box::new(std::io::sink()), false, None));
        let machines = names
            .iter()
            .map(|n| {
                let vm = LocalVm::new(&dir.join(n), &bin);
                DrivenMachine::new(n, vec![("eth1".into(), 1)], Box::new(vm), &dir.join("out"), log.clone())
            })
            .collect();
        Arc::new(Driver::new(machines, log))
    }

    fn call(c: &mut Client, v: Value) -> Result<Value, DriverError> {
        c.call(v.as_object().unwrap().clone())
    }

    #[test]
    fn requests_and_errors_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path(), &["client", "server"]);
        let path = dir.path().join("control.sock");
        serve(d.clone(), &path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let mut c = Client::connect(&path).unwrap();
        let r = call(&mut c, json!({"op": "execute", "machine": "server", "command": "printf 'a\\377'; echo e >&2; exit 3", "binary": true})).unwrap();
        assert_eq!(r["status"], 3);
        assert_eq!(r["stdout"], "a\u{fffd}");
        assert_eq!(base64::decode(r["stdout_base64"].as_str().unwrap().as_bytes()).unwrap(), b"a\xff");
        assert_eq!(r["stderr"], "e\n");
        let r = call(&mut c, json!({"op": "succeed", "machine": "server", "commands": ["echo 1", "echo 2"]})).unwrap();
        assert_eq!(r["stdout"], "1\n2\n");
        let e = call(&mut c, json!({"op": "succeed", "machine": "server", "command": "false"})).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (Kind::Failed, "machine server: command `false` failed (exit code 1)")
        );
        let e = call(&mut c, json!({"op": "succeed", "machine": "sever", "command": "true"})).unwrap_err();
        assert_eq!((e.kind, e.message.as_str()), (Kind::Request, "no machine \"sever\" (machines: client, server)"));
        for (bad, want) in [
            (json!({"op": "frobnicate", "machine": "server"}), "unknown operation \"frobnicate\""),
            (json!({"op": "execute", "machine": "server"}), "missing argument \"command\""),
            (
                json!({"op": "wait_for_file", "machine": "server", "path": "x", "timeout": "soon"}),
                "argument \"timeout\" must be a number of seconds or null",
            ),
            (json!({"op": "succeed", "command": "true"}), "operation \"succeed\" needs a \"machine\""),
        ] {
            let e = call(&mut c, bad).unwrap_err();
            assert_eq!((e.kind, e.message.as_str()), (Kind::Request, want));
        }
        let r = call(&mut c, json!({"op": "machines"})).unwrap();
        assert_eq!(r, json!({"machines": [{"name": "client", "up": false}, {"name": "server", "up": true}]}));
        assert!(d.log.serial_shown());
        call(&mut c, json!({"op": "serial_stdout", "on": false})).unwrap();
        assert!(!d.log.serial_shown());
        let e = call(&mut c, json!({"op": "serial_stdout", "on": "no"})).unwrap_err();
        assert_eq!((e.kind, e.message.as_str()), (Kind::Request, "argument \"on\" must be true or false"));
        call(&mut c, json!({"op": "subtest_begin", "name": "one"})).unwrap();
        assert_eq!(call(&mut c, json!({"op": "subtest_end"})).unwrap()["name"], "one");
        assert_eq!(call(&mut c, json!({"op": "subtest_end"})).unwrap_err().kind, Kind::Request);
        // Garbage gets an answer too, with a null id.
        assert!(d.handle_line("nonsense").contains(r#""id":null"#));
        d.release_all();
    }

    /// QEMU-level operations do not wait for the command that holds the
    /// machine; `crash` makes that command fail at once, saying why, and
    /// the machine starts again.
    #[test]
    fn qemu_operations_and_a_crash_do_not_wait_for_a_running_command() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path(), &["m"]);
        let path = dir.path().join("control.sock");
        serve(d.clone(), &path).unwrap();
        call(&mut Client::connect(&path).unwrap(), json!({"op": "start_all"})).unwrap();
        let sleeper = {
            let path = path.clone();
            std::thread::spawn(move || {
                call(
                    &mut Client::connect(&path).unwrap(),
                    json!({"op": "succeed", "machine": "m", "command": "sleep 30"}),
                )
            })
        };
        let started = Instant::now();
        while d.running_steps().is_empty() {
            assert!(started.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut c = Client::connect(&path).unwrap();
        // QEMU-level operations do not wait for the command either: it still runs once they are done.
        call(&mut c, json!({"op": "block", "machine": "m"})).unwrap();
        let r = call(&mut c, json!({"op": "send_monitor_command", "machine": "m", "command": "info status"})).unwrap();
        assert_eq!(r["output"], "");
        assert!(d.running_steps().iter().any(|s| s.starts_with("m: succeed")), "{:?}", d.running_steps());
        call(&mut c, json!({"op": "crash", "machine": "m"})).unwrap();
        // Had the crash waited for the command, the command would have succeeded.
        let e = sleeper.join().unwrap().unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (Kind::Machine, "machine m: crashed on request (crash()) while this ran")
        );
        assert_eq!(call(&mut c, json!({"op": "machines"})).unwrap()["machines"][0]["up"], false);
        let r = call(&mut c, json!({"op": "succeed", "machine": "m", "command": "echo back"})).unwrap();
        assert_eq!(r["stdout"], "back\n");
        d.release_all();
    }

    #[test]
    fn a_wait_on_one_machine_does_not_block_another() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path(), &["a", "b"]);
        let path = dir.path().join("control.sock");
        serve(d.clone(), &path).unwrap();
        call(&mut Client::connect(&path).unwrap(), json!({"op": "start_all"})).unwrap();
        let flag = dir.path().join("flag");
        let waiter = {
            let (path, flag) = (path.clone(), flag.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&path).unwrap();
                call(&mut c, json!({"op": "wait_for_file", "machine": "a", "path": flag, "timeout": 60}))
            })
        };
        // While `a` waits, `b` answers, and creates what `a` waits for.
        let mut c = Client::connect(&path).unwrap();
        let started = Instant::now();
        while d.running_steps().is_empty() {
            assert!(started.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(d.running_steps()[0].starts_with("a: wait_for_file"), "{:?}", d.running_steps());
        call(&mut c, json!({"op": "succeed", "machine": "b", "command": format!("touch {}", flag.display())})).unwrap();
        waiter.join().unwrap().unwrap();
        d.release_all();
    }
}
