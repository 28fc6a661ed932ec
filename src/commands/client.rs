//! The CLI clients (`vmlab succeed MACHINE -- CMD…` and friends): each
//! subcommand is one control-socket request (docs/protocol.md).

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use serde_json::{json, Map, Value};

use crate::cli::{ClientCommand, CommandArgs, Conn, MachineArgs, OnOff, SubtestAction};
use crate::driver::protocol::{socket_path, Client, Op};
use crate::driver::{base64, DriverError, Kind};

/// The request a subcommand sends, and the connection it uses.
fn request(cmd: &ClientCommand) -> (Value, &Conn) {
    use ClientCommand as C;
    let command = |a: &CommandArgs| a.command.join(" ");
    fn machine_op(op: Op, a: &MachineArgs) -> (Value, &Conn) {
        (json!({"op": op.name(), "machine": a.machine, "timeout": a.timeout}), &a.conn)
    }
    let (mut v, conn) = match cmd {
        C::Succeed(a) => (
            json!({"op": Op::Succeed.name(), "machine": a.machine, "command": command(a), "timeout": a.timeout, "binary": true}),
            &a.conn,
        ),
        C::Fail(a) => (
            json!({"op": Op::Fail.name(), "machine": a.machine, "command": command(a), "timeout": a.timeout, "binary": true}),
            &a.conn,
        ),
        C::Execute(a) => (
            json!({"op": Op::Execute.name(), "machine": a.machine, "command": command(a), "timeout": a.timeout, "binary": true}),
            &a.conn,
        ),
        C::WaitUntilSucceeds(a) => (
            json!({"op": Op::WaitUntilSucceeds.name(), "machine": a.machine, "command": command(a), "timeout": a.timeout}),
            &a.conn,
        ),
        C::WaitUntilFails(a) => (
            json!({"op": Op::WaitUntilFails.name(), "machine": a.machine, "command": command(a), "timeout": a.timeout}),
            &a.conn,
        ),
        C::WaitForOpenPort(a) => (
            json!({"op": Op::WaitForOpenPort.name(), "machine": a.machine, "port": a.port, "addr": a.addr, "timeout": a.timeout}),
            &a.conn,
        ),
        C::WaitForClosedPort(a) => (
            json!({"op": Op::WaitForClosedPort.name(), "machine": a.machine, "port": a.port, "addr": a.addr, "timeout": a.timeout}),
            &a.conn,
        ),
        C::WaitForFile(a) => (
            json!({"op": Op::WaitForFile.name(), "machine": a.machine, "path": a.value, "timeout": a.timeout}),
            &a.conn,
        ),
        C::WaitForUnit(a) => (
            json!({"op": Op::WaitForUnit.name(), "machine": a.machine, "unit": a.value, "user": a.user, "timeout": a.timeout}),
            &a.conn,
        ),
        C::WaitForConsoleText(a) => (
            json!({"op": Op::WaitForConsoleText.name(), "machine": a.machine, "regex": a.value, "timeout": a.timeout}),
            &a.conn,
        ),
        C::CopyToVm(a) => {
            // The driver may run elsewhere than this shell's directory.
            let source = std::env::current_dir().map(|d| d.join(&a.source)).unwrap_or_else(|_| a.source.clone().into());
            (
                json!({"op": Op::CopyToVm.name(), "machine": a.machine, "source": source, "dest": a.dest.clone().unwrap_or_else(|| a.source.clone())}),
                &a.conn,
            )
        }
        C::CopyFromVm(a) => (
            json!({"op": Op::CopyFromVm.name(), "machine": a.machine, "source": a.source, "target_dir": a.dest.clone().unwrap_or_default()}),
            &a.conn,
        ),
        C::Start(a) => machine_op(Op::Start, a),
        C::Shutdown(a) => machine_op(Op::Shutdown, a),
        C::Crash(a) => machine_op(Op::Crash, a),
        C::WaitForShutdown(a) => machine_op(Op::WaitForShutdown, a),
        C::Reboot(a) => machine_op(Op::Reboot, a),
        C::Block(a) => (json!({"op": Op::Block.name(), "machine": a.machine, "interface": a.interface}), &a.conn),
        C::Unblock(a) => (json!({"op": Op::Unblock.name(), "machine": a.machine, "interface": a.interface}), &a.conn),
        C::ForwardPort(a) => (
            json!({"op": Op::ForwardPort.name(), "machine": a.machine, "host_port": a.host_port, "guest_port": a.guest_port}),
            &a.conn,
        ),
        C::Screenshot(a) => (json!({"op": Op::Screenshot.name(), "machine": a.machine, "name": a.value}), &a.conn),
        C::SendMonitorCommand(a) => {
            (json!({"op": Op::SendMonitorCommand.name(), "machine": a.machine, "command": a.value}), &a.conn)
        }
        C::Sleep(a) => (json!({"op": Op::Sleep.name(), "machine": a.machine, "seconds": a.seconds}), &a.conn),
        C::StartAll(c) => (json!({"op": Op::StartAll.name()}), c),
        C::JoinAll(c) => (json!({"op": Op::JoinAll.name()}), c),
        C::Machines(c) => (json!({"op": Op::Machines.name()}), c),
        C::Log(a) => (json!({"op": Op::Log.name(), "message": a.text}), &a.conn),
        C::SerialStdout(a) => (json!({"op": Op::SerialStdout.name(), "on": a.state == OnOff::On}), &a.conn),
        C::Subtest(a) => match &a.action {
            SubtestAction::Begin { name } => (json!({"op": Op::SubtestBegin.name(), "name": name}), &a.conn),
            SubtestAction::End { failure } => (json!({"op": Op::SubtestEnd.name(), "failure": failure}), &a.conn),
        },
        C::Shell(a) => (json!({"op": Op::Execute.name(), "machine": a.machine, "timeout": a.timeout}), &a.conn),
    };
    // Absent means "the default"; the CLI never means "no timeout".
    v.as_object_mut().expect("object").retain(|k, val| !(val.is_null() && k == "timeout"));
    (v, conn)
}

fn exit_for(e: &DriverError) -> ExitCode {
    eprintln!("error: {}", e.message);
    match e.kind {
        Kind::Failed | Kind::Timeout | Kind::Machine => ExitCode::from(crate::EXIT_FAILED),
        Kind::Request | Kind::Harness => ExitCode::from(crate::EXIT_HARNESS),
    }
}

/// The exact bytes of a text result (`<key>_base64` when sent).
fn bytes(result: &Value, key: &str) -> Vec<u8> {
    match result.get(format!("{key}_base64")).and_then(Value::as_str) {
        Some(b) => base64::decode(b.as_bytes()).unwrap_or_default(),
        None => result[key].as_str().unwrap_or_default().as_bytes().to_vec(),
    }
}

pub fn run(cmd: ClientCommand) -> anyhow::Result<ExitCode> {
    let (req, conn) = request(&cmd);
    let mut client = Client::connect(&socket_path(conn.socket.clone())?)?;
    if let ClientCommand::Shell(_) = cmd {
        return shell(&mut client, req);
    }
    let Value::Object(req) = req else { unreachable!("requests are objects") };
    let result = match client.call(req) {
        Ok(r) => r,
        Err(e) => return Ok(exit_for(&e)),
    };
    let mut out = std::io::stdout().lock();
    match cmd {
        ClientCommand::Execute(_) => {
            out.write_all(&bytes(&result, "stdout")).context("writing standard output")?;
            std::io::stderr().write_all(&bytes(&result, "stderr")).context("writing standard error")?;
            let status = result["status"].as_i64().unwrap_or(255);
            return Ok(ExitCode::from(u8::try_from(status).unwrap_or(255)));
        }
        ClientCommand::Succeed(_)
        | ClientCommand::Fail(_)
        | ClientCommand::WaitUntilSucceeds(_)
        | ClientCommand::WaitUntilFails(_) => {
            out.write_all(&bytes(&result, "stdout")).context("writing standard output")?
        }
        ClientCommand::Machines(_) => {
            for m in result["machines"].as_array().into_iter().flatten() {
                let state = if m["up"] == json!(true) { "up" } else { "down" };
                writeln!(out, "{} {state}", m["name"].as_str().unwrap_or_default())?;
            }
        }
        _ => {
            for key in ["path", "match", "output"] {
                if let Some(text) = result.get(key).and_then(Value::as_str) {
                    writeln!(out, "{text}")?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads command lines and runs each in the machine, showing its output and
/// a non-zero status.
fn shell(client: &mut Client, template: Value) -> anyhow::Result<ExitCode> {
    let tty = std::io::stdin().is_terminal();
    let machine = template["machine"].as_str().unwrap_or_default().to_string();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if tty {
            eprint!("{machine}# ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading standard input")?;
        if line.trim().is_empty() {
            continue;
        }
        let mut req: Map<String, Value> = template.as_object().cloned().unwrap_or_default();
        req.insert("command".into(), json!(line));
        req.insert("binary".into(), json!(true));
        match client.call(req) {
            Ok(r) => {
                std::io::stdout().write_all(&bytes(&r, "stdout"))?;
                std::io::stdout().flush()?;
                std::io::stderr().write_all(&bytes(&r, "stderr"))?;
                if r["status"] != json!(0) {
                    eprintln!("[exit {}]", r["status"]);
                }
            }
            Err(e) if e.kind == Kind::Machine || e.kind == Kind::Harness => return Ok(exit_for(&e)),
            Err(e) => eprintln!("error: {}", e.message),
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn req(args: &[&str]) -> Value {
        let cli = Cli::try_parse_from(std::iter::once("vmlab").chain(args.iter().copied())).unwrap();
        let Command::Client(cmd) = cli.command else { panic!("not a client command") };
        request(&cmd).0
    }

    #[test]
    fn subcommands_map_to_requests() {
        let table = [
            (
                &["succeed", "server", "--", "echo", "a|b"][..],
                json!({"op": "succeed", "machine": "server", "command": "echo a|b", "binary": true}),
            ),
            (
                &["execute", "server", "--timeout", "5", "--", "true"],
                json!({"op": "execute", "machine": "server", "command": "true", "timeout": 5.0, "binary": true}),
            ),
            (
                &["wait-for-open-port", "server", "80"],
                json!({"op": "wait_for_open_port", "machine": "server", "port": 80, "addr": "localhost"}),
            ),
            (
                &["wait-for-unit", "server", "nginx", "--user", "alice"],
                json!({"op": "wait_for_unit", "machine": "server", "unit": "nginx", "user": "alice"}),
            ),
            (
                &["copy-from-vm", "server", "/etc/hosts"],
                json!({"op": "copy_from_vm", "machine": "server", "source": "/etc/hosts", "target_dir": ""}),
            ),
            (
                &["block", "client", "--interface", "eth1"],
                json!({"op": "block", "machine": "client", "interface": "eth1"}),
            ),
            (
                &["forward-port", "server", "8080", "80"],
                json!({"op": "forward_port", "machine": "server", "host_port": 8080, "guest_port": 80}),
            ),
            (&["subtest", "end", "--failure", "boom"], json!({"op": "subtest_end", "failure": "boom"})),
            (&["start-all", "--socket", "/x"], json!({"op": "start_all"})),
            (&["serial-stdout", "off"], json!({"op": "serial_stdout", "on": false})),
            (&["serial-stdout", "on"], json!({"op": "serial_stdout", "on": true})),
        ];
        for (args, want) in table {
            assert_eq!(req(args), want, "{args:?}");
        }
        assert!(Cli::try_parse_from(["vmlab", "succeed", "server"]).is_err(), "a command is required");
    }
}
