//! A request's arguments, decoded, and its operation run on a machine (or,
//! while the machine is busy, on QEMU alone).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::QMP_TIMEOUT;
use crate::driver::base64;
use crate::driver::machine::{DrivenMachine, DEFAULT_TIMEOUT};
use crate::driver::monitor::Monitor;
use crate::driver::protocol::Op;
use crate::driver::DriverError;

pub(super) type Args = Map<String, Value>;

pub(super) fn arg<'a>(args: &'a Args, key: &str) -> Result<&'a Value, DriverError> {
    args.get(key).ok_or_else(|| DriverError::request(format!("missing argument {key:?}")))
}

pub(super) fn str_arg<'a>(args: &'a Args, key: &str) -> Result<&'a str, DriverError> {
    arg(args, key)?.as_str().ok_or_else(|| DriverError::request(format!("argument {key:?} must be a string")))
}

pub(super) fn opt_str<'a>(args: &'a Args, key: &str) -> Result<Option<&'a str>, DriverError> {
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

/// A short description of a request's arguments, for the log and reports.
pub(super) fn summary(req: &Args) -> String {
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
pub(super) fn qemu_op(monitor: &Monitor, op: Op, req: &Args) -> Option<Result<Value, DriverError>> {
    if !op.is_qemu_level() {
        return None;
    }
    monitor.connect(QMP_TIMEOUT).ok()?;
    let empty = Ok(json!({}));
    Some(match op {
        Op::Block | Op::Unblock => {
            opt_str(req, "interface").and_then(|i| monitor.set_links(op == Op::Unblock, i)).and(empty)
        }
        Op::ForwardPort => port_arg(req, "host_port", Some(8080))
            .and_then(|h| Ok((h, port_arg(req, "guest_port", Some(80))?)))
            .and_then(|(h, g)| monitor.forward_port(h, g))
            .and(empty),
        Op::Screenshot => str_arg(req, "name").and_then(|n| monitor.screenshot(n)).map(|p| json!({ "path": p })),
        _ => str_arg(req, "command").and_then(|c| monitor.send_monitor_command(c)).map(|o| json!({ "output": o })),
    })
}

pub(super) fn machine_op(m: &mut DrivenMachine, op: Op, req: &Args) -> Result<Value, DriverError> {
    let empty = Ok(json!({}));
    match op {
        Op::Start => m.start().and(empty),
        Op::Shutdown => m.shutdown(wait_timeout(req)?).and(empty),
        Op::Crash => m.crash().and(empty),
        Op::WaitForShutdown => m.wait_for_shutdown(wait_timeout(req)?).and(empty),
        Op::Reboot => m.reboot(wait_timeout(req)?).and(empty),
        Op::Execute => {
            let binary = req.get("binary").and_then(Value::as_bool).unwrap_or(false);
            let out = m.execute_logged(str_arg(req, "command")?, timeout_arg(req, Some(DEFAULT_TIMEOUT))?)?;
            let mut result = Map::new();
            result.insert("status".into(), json!(out.status));
            result.insert("timed_out".into(), json!(out.timed_out));
            bytes_fields(&mut result, "stdout", &out.stdout, binary);
            bytes_fields(&mut result, "stderr", &out.stderr, binary);
            Ok(Value::Object(result))
        }
        Op::Succeed | Op::Fail => {
            let binary = req.get("binary").and_then(Value::as_bool).unwrap_or(false);
            let commands = commands_arg(req)?;
            let timeout = timeout_arg(req, None)?;
            let out = if op == Op::Succeed { m.succeed(&commands, timeout)? } else { m.fail(&commands, timeout)? };
            let mut result = Map::new();
            bytes_fields(&mut result, "stdout", &out, binary);
            Ok(Value::Object(result))
        }
        Op::WaitUntilSucceeds | Op::WaitUntilFails => {
            let out = m.wait_until(str_arg(req, "command")?, op == Op::WaitUntilSucceeds, wait_timeout(req)?)?;
            Ok(json!({ "stdout": String::from_utf8_lossy(&out) }))
        }
        Op::WaitForOpenPort | Op::WaitForClosedPort => {
            let port = port_arg(req, "port", None)?;
            let addr = opt_str(req, "addr")?.unwrap_or("localhost");
            let t = wait_timeout(req)?;
            let r = if op == Op::WaitForOpenPort {
                m.wait_for_open_port(port, addr, t)
            } else {
                m.wait_for_closed_port(port, addr, t)
            };
            r.and(empty)
        }
        Op::WaitForFile => m.wait_for_file(str_arg(req, "path")?, wait_timeout(req)?).and(empty),
        Op::WaitForUnit => m.wait_for_unit(str_arg(req, "unit")?, opt_str(req, "user")?, wait_timeout(req)?).and(empty),
        Op::WaitForConsoleText => {
            let matched = m.wait_for_console_text(str_arg(req, "regex")?, wait_timeout(req)?)?;
            Ok(json!({ "match": matched }))
        }
        Op::CopyToVm => m.copy_to_vm(Path::new(str_arg(req, "source")?), str_arg(req, "dest")?).and(empty),
        Op::CopyFromVm => {
            let path = m.copy_from_vm(str_arg(req, "source")?, opt_str(req, "target_dir")?.unwrap_or(""))?;
            Ok(json!({ "path": path }))
        }
        Op::Block | Op::Unblock => m.set_links(op == Op::Unblock, opt_str(req, "interface")?).and(empty),
        Op::ForwardPort => {
            m.forward_port(port_arg(req, "host_port", Some(8080))?, port_arg(req, "guest_port", Some(80))?).and(empty)
        }
        Op::Screenshot => Ok(json!({ "path": m.screenshot(str_arg(req, "name")?)? })),
        Op::SendMonitorCommand => Ok(json!({ "output": m.send_monitor_command(str_arg(req, "command")?)? })),
        Op::Sleep => {
            let secs = arg(req, "seconds")?
                .as_f64()
                .ok_or_else(|| DriverError::request("argument \"seconds\" must be a number"))?;
            m.succeed(&[format!("sleep {secs}")], None).and(empty)
        }
        _ => unreachable!("{op:?} takes no machine: the caller dispatches it"),
    }
}
