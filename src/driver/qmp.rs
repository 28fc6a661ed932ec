//! A small QMP client: greeting, capability negotiation, and commands matched
//! to their replies by id (asynchronous events in between are skipped).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

use super::DriverError;

/// How long QEMU may take to answer one command (screendump of a large
/// display under TCG is the slowest we send).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    machine: String,
}

impl Qmp {
    /// Reads the greeting and enters command mode.
    pub fn handshake(stream: UnixStream, machine: &str) -> Result<Self, DriverError> {
        Self::handshake_within(stream, machine, REPLY_TIMEOUT)
    }

    /// [`Qmp::handshake`], with every answer awaited at most `timeout`.
    pub fn handshake_within(stream: UnixStream, machine: &str, timeout: Duration) -> Result<Self, DriverError> {
        let io_err = |e: std::io::Error| DriverError::harness(format!("machine {machine}: QMP: {e}"));
        stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        let writer = stream.try_clone().map_err(io_err)?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer, next_id: 0, machine: machine.to_string() };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.error(format!("expected a QMP greeting, got {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn error(&self, message: String) -> DriverError {
        DriverError::new(super::Kind::Machine, format!("machine {}: QMP: {message}", self.machine))
    }

    fn read_message(&mut self) -> Result<Value, DriverError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(self.error("connection closed (QEMU exited)".into())),
            Ok(_) => serde_json::from_str(&line).map_err(|e| self.error(format!("bad message {line:?}: {e}"))),
            Err(e) => Err(self.error(format!("no answer: {e}"))),
        }
    }

    /// Runs a command and returns its `return` value; a QMP error becomes a
    /// [`DriverError`] with QEMU's description.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, DriverError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            request["arguments"] = arguments;
        }
        let mut text = request.to_string();
        text.push('\n');
        if let Err(e) = self.writer.write_all(text.as_bytes()) {
            return Err(self.error(format!("sending {command}: {e}")));
        }
        loop {
            let message = self.read_message()?;
            // Asynchronous events (no id) and late answers are not ours.
            if message.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            let desc = message.pointer("/error/desc").and_then(Value::as_str).unwrap_or("unknown error");
            return Err(self.error(format!("{command}: {desc}")));
        }
    }

    /// Runs a human-monitor (HMP) command line and returns its output.
    pub fn human(&mut self, command_line: &str) -> Result<String, DriverError> {
        let out = self.execute("human-monitor-command", json!({ "command-line": command_line }))?;
        Ok(out.as_str().unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU: greets, answers each command by `reply(request)`, and
    /// sends an event before every answer.
    fn fake(reply: fn(&Value) -> Value) -> (tempfile::TempDir, std::thread::JoinHandle<Vec<Value>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            writeln!(s, r#"{{"QMP": {{"version": {{}}, "capabilities": ["oob"]}}}}"#).unwrap();
            let mut seen = Vec::new();
            for line in BufReader::new(s.try_clone().unwrap()).lines() {
                let request: Value = serde_json::from_str(&line.unwrap()).unwrap();
                writeln!(s, r#"{{"event": "NIC_RX_FILTER_CHANGED", "data": {{}}}}"#).unwrap();
                let mut answer = reply(&request);
                answer["id"] = request["id"].clone();
                writeln!(s, "{answer}").unwrap();
                seen.push(request);
            }
            seen
        });
        (dir, server)
    }

    #[test]
    fn negotiates_executes_and_skips_events() {
        let (dir, server) = fake(|r| match r["execute"].as_str().unwrap() {
            "human-monitor-command" => json!({ "return": format!("ran {}", r["arguments"]["command-line"]) }),
            "set_link" => json!({ "error": { "class": "DeviceNotFound", "desc": "Device 'nope' not found" } }),
            _ => json!({ "return": {} }),
        });
        let mut q = Qmp::handshake(UnixStream::connect(dir.path().join("qmp.sock")).unwrap(), "server").unwrap();
        assert_eq!(q.human("info network").unwrap(), "ran \"info network\"");
        let e = q.execute("set_link", json!({ "name": "nope", "up": false })).unwrap_err();
        assert_eq!(e.message, "machine server: QMP: set_link: Device 'nope' not found");
        drop(q);
        let seen = server.join().unwrap();
        let names: Vec<&str> = seen.iter().map(|r| r["execute"].as_str().unwrap()).collect();
        assert_eq!(names, ["qmp_capabilities", "human-monitor-command", "set_link"]);
        assert!(seen[0].get("arguments").is_none());
        assert_eq!(seen[2]["arguments"], json!({ "name": "nope", "up": false }));
    }

    #[test]
    fn a_closed_connection_is_a_machine_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || drop(listener.accept().unwrap()));
        let e = Qmp::handshake(UnixStream::connect(&path).unwrap(), "client").err().unwrap();
        server.join().unwrap();
        assert_eq!(e.kind, super::super::Kind::Machine);
        assert!(e.message.contains("machine client") && e.message.contains("closed"), "{e}");
    }
}
