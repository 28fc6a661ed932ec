//! The control socket: JSON lines over a unix socket, one request, one
//! response, matched by `id` (docs/protocol.md). A thread serves each
//! connection and each machine has its own lock, so a long wait on one
//! machine never holds up requests for another.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Map, Value};

use super::base64;
use super::log::{Log, Style};
use super::machine::{boot_silence_limit, Interrupt, Machine, DEFAULT_TIMEOUT};
use super::monitor::Monitor;
use super::{DriverError, Kind};
use crate::runtime::Network;

/// Every machine, each behind its own lock, and the test's log.
pub struct Driver {
    machines: BTreeMap<String, Mutex<Machine>>,
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

type Args = Map<String, Value>;

fn arg<'a>(args: &'a Args, key: &str) -> Result<&'a Value, DriverError> {
    args.get(key).ok_or_else(|| DriverError::request(format!("missing argument {key:?}")))
}

fn str_arg<'a>(args: &'a Args, key: &str) -> Result<&'a str, DriverError> {
    arg(args, key)?.as_str().ok_or_else(|| DriverError::request(format!("argument {key:?} must be a string")))
}

fn opt_str<'a>(args: &'a Args, key: &str) -> Result<Option<&'a str>, DriverError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_str().map(Some).ok_or_else(|| DriverError::request(format!("argument {key:?} must be a string")))
        }
    }
}

fn port_arg(args: &Args, key: &str, default: Option<u16>) -> Result<u16, DriverError> {
    match (args.get(key), default) {
        (None, Some(d)) => Ok(d),
        (v, _) => v
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| DriverError::request(format!("argument {key:?} must be a port number"))),
    }
}

/// `timeout` in seconds: absent gives `default`, `null` no timeout at all.
fn timeout_arg(args: &Args, default: Option<Duration>) -> Result<Option<Duration>, DriverError> {
    match args.get("timeout") {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|s| *s >= 0.0 && s.is_finite())
            .map(|s| Some(Duration::from_secs_f64(s)))
            .ok_or_else(|| DriverError::request("argument \"timeout\" must be a number of seconds or null")),
    }
}

/// Waits always end: `null` means NixOS's default.
fn wait_timeout(args: &Args) -> Result<Duration, DriverError> {
    Ok(timeout_arg(args, Some(DEFAULT_TIMEOUT))?.unwrap_or(DEFAULT_TIMEOUT))
}

/// `commands` (a list) or `command` (one).
fn commands_arg(args: &Args) -> Result<Vec<String>, DriverError> {
    if let Some(list) = args.get("commands") {
        let list =
            list.as_array().ok_or_else(|| DriverError::request("argument \"commands\" must be a list of strings"))?;
        return list
            .iter()
            .map(|c| {
                c.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| DriverError::request("argument \"commands\" must be a list of strings"))
            })
            .collect();
    }
    Ok(vec![str_arg(args, "command")?.to_string()])
}

/// Bytes as JSON: text (invalid UTF-8 replaced), plus base64 when asked.
fn bytes_fields(out: &mut Map<String, Value>, key: &str, bytes: &[u8], binary: bool) {
    out.insert(key.into(), json!(String::from_utf8_lossy(bytes)));
    if binary {
        out.insert(format!("{key}_base64"), json!(base64::encode(bytes)));
    }
}

/// How long QEMU may take to answer a QMP command sent while its machine is busy.
const QMP_TIMEOUT: Duration = Duration::from_secs(60);

/// Operations that take no machine.
const GLOBAL_OPS: [&str; 7] =
    ["machines", "start_all", "join_all", "log", "serial_stdout", "subtest_begin", "subtest_end"];

impl Driver {
    pub fn new(machines: Vec<Machine>, log: Arc<Log>) -> Self {
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
                let mut machine = Machine::new(&planned.name, interfaces, Box::new(vm), out_dir, log.clone());
                machine.set_boot_silence(silence);
                machine
            })
            .collect();
        Self::new(machines, log)
    }

    /// Runs `f` on a machine, holding its lock; `None` when there is no such machine.
    pub fn with_machine<T>(&self, name: &str, f: impl FnOnce(&mut Machine) -> T) -> Option<T> {
        let lock = self.machines.get(name)?;
        let mut machine = lock.lock().unwrap_or_else(|e| e.into_inner());
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
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    pub fn last_error(&self) -> Option<DriverError> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                json!({ "id": id, "ok": false, "error": { "kind": e.kind.as_str(), "message": e.message } })
            }
        };
        response.to_string()
    }

    fn handle(&self, req: &Args) -> Result<Value, DriverError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(DriverError::harness("the test is over: its machines are stopped"));
        }
        let op = str_arg(req, "op")?;
        let machine = opt_str(req, "machine")?;
        let step = match machine {
            Some(m) => format!("{m}: {op} {}", summary(req)),
            None => format!("{op} {}", summary(req)),
        };
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(serial, step.trim_end().to_string());
        let result = match machine {
            None if GLOBAL_OPS.contains(&op) => self.global(op, req),
            None => Err(DriverError::request(format!("operation {op:?} needs a \"machine\""))),
            Some(name) => {
                let lock = self.machines.get(name).ok_or_else(|| {
                    DriverError::request(format!("no machine {name:?} (machines: {})", self.machine_names().join(", ")))
                })?;
                if op == "crash" {
                    self.interrupts[name].crash();
                }
                match lock.try_lock() {
                    Ok(mut m) => machine_op(&mut m, op, req),
                    Err(std::sync::TryLockError::Poisoned(p)) => machine_op(&mut p.into_inner(), op, req),
                    // Busy with a command: QEMU-level operations go straight to QEMU.
                    Err(std::sync::TryLockError::WouldBlock) => match qemu_op(&self.monitors[name], op, req) {
                        Some(result) => result,
                        None => {
                            if op == "shutdown" {
                                self.power_off_busy(name);
                            }
                            machine_op(&mut lock.lock().unwrap_or_else(|e| e.into_inner()), op, req)
                        }
                    },
                }
            }
        };
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&serial);
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
    fn each_machine(&self, f: impl Fn(&mut Machine) -> Result<(), DriverError> + Sync) -> Result<(), DriverError> {
        let results: Vec<Result<(), DriverError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .machines
                .values()
                .map(|lock| s.spawn(|| f(&mut lock.lock().unwrap_or_else(|e| e.into_inner()))))
                .collect();
            handles.into_iter().map(|h| h.join().expect("machine thread")).collect()
        });
        results.into_iter().collect()
    }

    fn global(&self, op: &str, req: &Args) -> Result<Value, DriverError> {
        match op {
            "machines" => {
                let list: Vec<Value> = self
                    .machines
                    .iter()
                    .map(|(name, m)| json!({ "name": name, "up": m.lock().unwrap_or_else(|e| e.into_inner()).is_up() }))
                    .collect();
                Ok(json!({ "machines": list }))
            }
            "start_all" => self.each_machine(Machine::start).map(|()| json!({})),
            "join_all" => {
                self.each_machine(|m| m.wait_for_shutdown(Duration::from_secs(u64::from(u32::MAX)))).map(|()| json!({}))
            }
            "log" => {
                self.log.info(None, str_arg(req, "message")?);
                Ok(json!({}))
            }
            "serial_stdout" => {
                let on = arg(req, "on")?
                    .as_bool()
                    .ok_or_else(|| DriverError::request("argument \"on\" must be true or false"))?;
                self.log.show_serial(on);
                Ok(json!({}))
            }
            "subtest_begin" => {
                self.log.subtest_begin(str_arg(req, "name")?);
                Ok(json!({}))
            }
            "subtest_end" => {
                let failure = opt_str(req, "failure")?.map(str::to_string);
                let done = self.log.subtest_end(failure)?;
                Ok(json!({ "name": done.name, "duration": done.duration.as_secs_f64() }))
            }
            _ => unreachable!("only GLOBAL_OPS get here"),
        }
    }

    /// Stops every machine that runs (end of the test); waits for machines
    /// busy with a request, which end once their QEMU is gone.
    pub fn release_all(&self) {
        for lock in self.machines.values() {
            lock.lock().unwrap_or_else(|e| e.into_inner()).release();
        }
    }
}

/// A short description of a request's arguments, for the log and reports.
fn summary(req: &Args) -> String {
    let mut parts = Vec::new();
    for (k, v) in req {
        if matches!(k.as_str(), "op" | "machine" | "id") {
            continue;
        }
        let text = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let short: String = text.chars().take(80).collect();
        parts.push(format!("{k}={short}"));
    }
    parts.join(" ")
}

/// An operation QEMU serves without the guest, done through `monitor`
/// while the machine is busy; `None` for any other operation, and when QEMU
/// cannot be reached that way (the machine is not running).
fn qemu_op(monitor: &Monitor, op: &str, req: &Args) -> Option<Result<Value, DriverError>> {
    if !matches!(op, "block" | "unblock" | "forward_port" | "screenshot" | "send_monitor_command") {
        return None;
    }
    monitor.connect(QMP_TIMEOUT).ok()?;
    let empty = Ok(json!({}));
    Some(match op {
        "block" | "unblock" => opt_str(req, "interface").and_then(|i| monitor.set_links(op == "unblock", i)).and(empty),
        "forward_port" => port_arg(req, "host_port", Some(8080))
            .and_then(|h| Ok((h, port_arg(req, "guest_port", Some(80))?)))
            .and_then(|(h, g)| monitor.forward_port(h, g))
            .and(empty),
        "screenshot" => str_arg(req, "name").and_then(|n| monitor.screenshot(n)).map(|p| json!({ "path": p })),
        _ => str_arg(req, "command").and_then(|c| monitor.send_monitor_command(c)).map(|o| json!({ "output": o })),
    })
}

fn machine_op(m: &mut Machine, op: &str, req: &Args) -> Result<Value, DriverError> {
    let empty = Ok(json!({}));
    match op {
        "start" => m.start().and(empty),
        "shutdown" => m.shutdown(wait_timeout(req)?).and(empty),
        "crash" => m.crash().and(empty),
        "wait_for_shutdown" => m.wait_for_shutdown(wait_timeout(req)?).and(empty),
        "reboot" => m.reboot(wait_timeout(req)?).and(empty),
        "execute" => {
            let binary = req.get("binary").and_then(Value::as_bool).unwrap_or(false);
            let out = m.execute_logged(str_arg(req, "command")?, timeout_arg(req, Some(DEFAULT_TIMEOUT))?)?;
            let mut result = Map::new();
            result.insert("status".into(), json!(out.status));
            result.insert("timed_out".into(), json!(out.timed_out));
            bytes_fields(&mut result, "stdout", &out.stdout, binary);
            bytes_fields(&mut result, "stderr", &out.stderr, binary);
            Ok(Value::Object(result))
        }
        "succeed" | "fail" => {
            let binary = req.get("binary").and_then(Value::as_bool).unwrap_or(false);
            let commands = commands_arg(req)?;
            let timeout = timeout_arg(req, None)?;
            let out = if op == "succeed" { m.succeed(&commands, timeout)? } else { m.fail(&commands, timeout)? };
            let mut result = Map::new();
            bytes_fields(&mut result, "stdout", &out, binary);
            Ok(Value::Object(result))
        }
        "wait_until_succeeds" | "wait_until_fails" => {
            let out = m.wait_until(str_arg(req, "command")?, op == "wait_until_succeeds", wait_timeout(req)?)?;
            Ok(json!({ "stdout": String::from_utf8_lossy(&out) }))
        }
        "wait_for_open_port" | "wait_for_closed_port" => {
            let port = port_arg(req, "port", None)?;
            let addr = opt_str(req, "addr")?.unwrap_or("localhost");
            let t = wait_timeout(req)?;
            let r = if op == "wait_for_open_port" {
                m.wait_for_open_port(port, addr, t)
            } else {
                m.wait_for_closed_port(port, addr, t)
            };
            r.and(empty)
        }
        "wait_for_file" => m.wait_for_file(str_arg(req, "path")?, wait_timeout(req)?).and(empty),
        "wait_for_unit" => m.wait_for_unit(str_arg(req, "unit")?, opt_str(req, "user")?, wait_timeout(req)?).and(empty),
        "wait_for_console_text" => {
            let matched = m.wait_for_console_text(str_arg(req, "regex")?, wait_timeout(req)?)?;
            Ok(json!({ "match": matched }))
        }
        "copy_to_vm" => m.copy_to_vm(Path::new(str_arg(req, "source")?), str_arg(req, "dest")?).and(empty),
        "copy_from_vm" => {
            let path = m.copy_from_vm(str_arg(req, "source")?, opt_str(req, "target_dir")?.unwrap_or(""))?;
            Ok(json!({ "path": path }))
        }
        "block" | "unblock" => m.set_links(op == "unblock", opt_str(req, "interface")?).and(empty),
        "forward_port" => {
            m.forward_port(port_arg(req, "host_port", Some(8080))?, port_arg(req, "guest_port", Some(80))?).and(empty)
        }
        "screenshot" => Ok(json!({ "path": m.screenshot(str_arg(req, "name")?)? })),
        "send_monitor_command" => Ok(json!({ "output": m.send_monitor_command(str_arg(req, "command")?)? })),
        "sleep" => {
            let secs = arg(req, "seconds")?
                .as_f64()
                .ok_or_else(|| DriverError::request("argument \"seconds\" must be a number"))?;
            m.succeed(&[format!("sleep {secs}")], None).and(empty)
        }
        _ => Err(DriverError::new(Kind::Request, format!("unknown operation {op:?}"))),
    }
}

/// Serves the control socket until the process ends; the listener thread is detached.
pub fn serve(driver: Arc<Driver>, path: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let driver = driver.clone();
            std::thread::spawn(move || serve_connection(&driver, stream));
        }
    });
    Ok(())
}

fn serve_connection(driver: &Driver, stream: UnixStream) {
    let Ok(mut writer) = stream.try_clone() else { return };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let mut response = driver.handle_line(&line);
        response.push('\n');
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// A client connection (the CLI's).
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(path).with_context(|| {
            format!("connecting to the control socket {} (is the network running?)", path.display())
        })?;
        let writer = stream.try_clone().context("cloning the control socket")?;
        Ok(Client { reader: BufReader::new(stream), writer, next_id: 0 })
    }

    /// Sends a request (an object with `op` and arguments) and returns its
    /// result, or the driver's error.
    pub fn call(&mut self, mut request: Map<String, Value>) -> anyhow::Result<Result<Value, DriverError>> {
        self.next_id += 1;
        request.insert("id".into(), json!(self.next_id));
        let mut line = Value::Object(request).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).context("writing to the control socket")?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer).context("reading the control socket")? == 0 {
            anyhow::bail!("the driver closed the control socket");
        }
        let v: Value = serde_json::from_str(&answer).context("the driver's answer is not JSON")?;
        if v["ok"] == json!(true) {
            return Ok(Ok(v["result"].clone()));
        }
        let kind = serde_json::from_value(v["error"]["kind"].clone()).unwrap_or(Kind::Harness);
        Ok(Err(DriverError::new(kind, v["error"]["message"].as_str().unwrap_or("unknown error"))))
    }
}

/// The socket a client uses: `--socket`, else `VMLAB_SOCKET`.
pub fn socket_path(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    flag.or_else(|| std::env::var_os("VMLAB_SOCKET").map(PathBuf::from)).ok_or_else(|| {
        anyhow::anyhow!("no control socket: pass --socket or set VMLAB_SOCKET (`vmlab up` and `vmlab test` print it)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::testing::{busybox_bin, LocalVm};
    use std::time::Instant;

    fn driver(dir: &Path, names: &[&str]) -> Arc<Driver> {
        let bin = busybox_bin(dir);
        let log = Arc::new(Log::new(Box::new(std::io::sink()), false, None));
        let machines = names
            .iter()
            .map(|n| {
                let vm = LocalVm::new(&dir.join(n), &bin);
                Machine::new(n, vec![("eth1".into(), 1)], Box::new(vm), &dir.join("out"), log.clone())
            })
            .collect();
        Arc::new(Driver::new(machines, log))
    }

    fn call(c: &mut Client, v: Value) -> Result<Value, DriverError> {
        c.call(v.as_object().unwrap().clone()).unwrap()
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
