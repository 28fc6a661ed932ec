//! The control socket's protocol (docs/protocol.md): JSON lines, one request
//! (`op`, its arguments, an `id`), one response. [`Op`] is the one list of
//! operations: the server (`driver::control`) dispatches on it, the CLI
//! clients (src/commands/client.rs) name their requests with it, and a test
//! checks the Python client (python/vmlab) against it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Map, Value};

use super::{DriverError, Kind};

/// Defines [`Op`] and its wire names together, so they cannot drift apart.
macro_rules! ops {
    ($($op:ident = $name:literal,)*) => {
        /// An operation of the control socket.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Op { $($op,)* }

        impl Op {
            pub const ALL: &'static [Op] = &[$(Op::$op,)*];

            /// The name on the wire (`"op"`).
            pub fn name(self) -> &'static str {
                match self { $(Op::$op => $name,)* }
            }
        }
    };
}

ops! {
    Start = "start",
    Shutdown = "shutdown",
    Crash = "crash",
    WaitForShutdown = "wait_for_shutdown",
    Reboot = "reboot",
    Execute = "execute",
    Succeed = "succeed",
    Fail = "fail",
    WaitUntilSucceeds = "wait_until_succeeds",
    WaitUntilFails = "wait_until_fails",
    WaitForOpenPort = "wait_for_open_port",
    WaitForClosedPort = "wait_for_closed_port",
    WaitForFile = "wait_for_file",
    WaitForUnit = "wait_for_unit",
    WaitForConsoleText = "wait_for_console_text",
    CopyToVm = "copy_to_vm",
    CopyFromVm = "copy_from_vm",
    Block = "block",
    Unblock = "unblock",
    ForwardPort = "forward_port",
    Screenshot = "screenshot",
    SendMonitorCommand = "send_monitor_command",
    Sleep = "sleep",
    Machines = "machines",
    StartAll = "start_all",
    JoinAll = "join_all",
    Log = "log",
    SerialStdout = "serial_stdout",
    SubtestBegin = "subtest_begin",
    SubtestEnd = "subtest_end",
}

impl Op {
    pub fn parse(name: &str) -> Option<Op> {
        Op::ALL.iter().copied().find(|op| op.name() == name)
    }

    /// Takes no machine: about the whole test.
    pub fn is_global(self) -> bool {
        use Op::*;
        matches!(self, Machines | StartAll | JoinAll | Log | SerialStdout | SubtestBegin | SubtestEnd)
    }

    /// Served by QEMU without the guest, so done at once even while the
    /// machine is busy with a command.
    pub fn is_qemu_level(self) -> bool {
        matches!(self, Op::Block | Op::Unblock | Op::ForwardPort | Op::Screenshot | Op::SendMonitorCommand)
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
    /// result, or the driver's error; a broken connection is a harness error.
    pub fn call(&mut self, mut request: Map<String, Value>) -> Result<Value, DriverError> {
        self.next_id += 1;
        request.insert("id".into(), json!(self.next_id));
        let mut line = Value::Object(request).to_string();
        line.push('\n');
        let broken = |what: &str, e: &dyn std::fmt::Display| DriverError::harness(format!("{what}: {e}"));
        self.writer.write_all(line.as_bytes()).map_err(|e| broken("writing to the control socket", &e))?;
        let mut answer = String::new();
        match self.reader.read_line(&mut answer) {
            Ok(0) => return Err(DriverError::harness("the driver closed the control socket")),
            Ok(_) => {}
            Err(e) => return Err(broken("reading the control socket", &e)),
        }
        let v: Value = serde_json::from_str(&answer).map_err(|e| broken("the driver's answer is not JSON", &e))?;
        if v["ok"] == json!(true) {
            return Ok(v["result"].clone());
        }
        let kind = serde_json::from_value(v["error"]["kind"].clone()).unwrap_or(Kind::Harness);
        Err(DriverError::new(kind, v["error"]["message"].as_str().unwrap_or("unknown error")))
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

    #[test]
    fn names_are_unique_and_parse_back() {
        for op in Op::ALL {
            assert_eq!(Op::parse(op.name()), Some(*op));
        }
        assert_eq!(Op::parse("no_such_op"), None);
    }

    /// Every operation the Python client sends is one the server knows.
    #[test]
    fn the_python_client_uses_only_these_ops() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/vmlab");
        let pattern = regex::Regex::new(r#"(?:_call|_wait|\.call)\(\s*"([a-z_]+)""#).unwrap();
        let mut used = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "py") {
                let text = std::fs::read_to_string(&path).unwrap();
                used.extend(pattern.captures_iter(&text).map(|c| c[1].to_string()));
            }
        }
        assert!(used.len() > 20, "the pattern no longer finds the client's requests: {used:?}");
        let unknown: Vec<&String> = used.iter().filter(|name| Op::parse(name).is_none()).collect();
        assert!(unknown.is_empty(), "the Python client sends ops the server does not know: {unknown:?}");
    }
}
