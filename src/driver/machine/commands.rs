//! Commands and waits: `execute`, `succeed`, `fail`, and the waits that
//! poll a command or the serial console until it says yes.

use super::data_channel::stop;
use super::*;

impl DrivenMachine {
    /// Runs a command: `(status, stdout, stderr)`; boots the machine first if needed.
    pub fn execute(&mut self, command: &str, timeout: Option<Duration>) -> Result<Output, DriverError> {
        self.with_shells(|shell, stopper, alive| match stopper {
            // The host enforces the timeout from the idle backdoor: in the
            // guest, `timeout` would cost two programs per command.
            Some((pid, backdoor)) => {
                shell.run(command, timeout, alive, Some(&mut |signal, alive| stop(backdoor, pid, signal, alive)))
            }
            None => shell.run(command, timeout, alive, None),
        })
    }

    /// Boots the machine if needed and runs `f` on its backdoor; an error
    /// saying the machine is gone marks it dead.
    pub(super) fn with_shell<T>(
        &mut self,
        f: impl FnOnce(&mut Shell, Alive) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        self.with_shells(|shell, _, alive| f(shell, alive))
    }

    /// [`DrivenMachine::with_shell`], giving `f` too, when the commands go
    /// over the data port, what stops one of them: the PID of the data
    /// port's shell and the backdoor shell.
    fn with_shells<T>(
        &mut self,
        f: impl FnOnce(&mut Shell, Option<(u32, &mut Shell)>, Alive) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        self.wait_for_boot()?;
        let (vm, name) = (&mut self.vm, &self.name);
        let mut alive = || qemu_alive(&mut **vm, name);
        let backdoor = self.shell.as_mut().expect("a booted machine has a shell");
        let result = match self.data.as_mut() {
            Some(data) => f(&mut data.shell, Some((data.pid, backdoor)), &mut alive),
            None => f(backdoor, None, &mut alive),
        };
        match result {
            Ok(out) => Ok(out),
            Err(e) if e.kind == Kind::Machine => Err(self.mark_dead(e)),
            Err(e) => Err(e),
        }
    }

    /// `execute` with the command and its result in the log.
    fn logged(&mut self, what: &str, command: &str, timeout: Option<Duration>) -> Result<Output, DriverError> {
        let started = Instant::now();
        let out = self.execute(command, timeout)?;
        let style = if out.status == 0 { Style::Good } else { Style::Plain };
        let stopped = if out.timed_out { ", stopped at its timeout" } else { "" };
        let msg = format!("{what}{command} (exit {}{stopped}, {})", out.status, secs(started.elapsed()));
        self.log.write(Some(&self.name), &msg, style);
        Ok(out)
    }

    pub fn execute_logged(&mut self, command: &str, timeout: Option<Duration>) -> Result<Output, DriverError> {
        self.logged("$ ", command, timeout)
    }

    /// Runs each command, failing at the first non-zero status; the
    /// concatenated standard output.
    pub fn succeed(&mut self, commands: &[String], timeout: Option<Duration>) -> Result<Vec<u8>, DriverError> {
        let mut all = Vec::new();
        for command in commands {
            let out = self.logged("must succeed: ", command, timeout)?;
            if out.status != 0 {
                let err = String::from_utf8_lossy(&out.stderr);
                return Err(self.err(
                    Kind::Failed,
                    format!("command `{command}` failed (exit code {}){}", out.status, stderr_note(&err)),
                ));
            }
            all.extend(out.stdout);
        }
        Ok(all)
    }

    /// Like `succeed`, but each command must fail.
    pub fn fail(&mut self, commands: &[String], timeout: Option<Duration>) -> Result<Vec<u8>, DriverError> {
        let mut all = Vec::new();
        for command in commands {
            let out = self.logged("must fail: ", command, timeout)?;
            if out.status == 0 {
                return Err(self.err(Kind::Failed, format!("command `{command}` unexpectedly succeeded")));
            }
            all.extend(out.stdout);
        }
        Ok(all)
    }

    /// Calls `attempt` until it gives a value, pausing adaptively between
    /// tries; a timeout error names `what`.
    pub(super) fn poll<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut attempt: impl FnMut(&mut Self, Duration) -> Result<Option<T>, DriverError>,
    ) -> Result<T, DriverError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut backoff = backoff();
        self.say(&format!("waiting for {what}"));
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
            if let Some(v) = attempt(self, left)? {
                self.log.write(
                    Some(&self.name),
                    &format!("done waiting for {what} ({})", secs(started.elapsed())),
                    Style::Good,
                );
                return Ok(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.err(Kind::Timeout, format!("timed out after {} waiting for {what}", secs(timeout))));
            }
            std::thread::sleep(backoff.pause().min(deadline - now));
        }
    }

    /// Repeats `command` until its status is zero (`want_success`) or non-zero; its last output.
    pub fn wait_until(&mut self, command: &str, want_success: bool, timeout: Duration) -> Result<Vec<u8>, DriverError> {
        let what = format!("{} of `{command}`", if want_success { "success" } else { "failure" });
        self.poll(timeout, &what, |m, left| {
            let out = m.execute(command, Some(left))?;
            Ok(((out.status == 0) == want_success).then_some(out.stdout))
        })
    }

    fn wait_for_status(
        &mut self,
        command: &str,
        want_zero: bool,
        what: &str,
        timeout: Duration,
    ) -> Result<(), DriverError> {
        self.poll(timeout, what, |m, left| {
            Ok(((m.execute(command, Some(left))?.status == 0) == want_zero).then_some(()))
        })
    }

    pub fn wait_for_file(&mut self, path: &str, timeout: Duration) -> Result<(), DriverError> {
        self.wait_for_status(&format!("test -e {}", quote(path)), true, &format!("file {path}"), timeout)
    }

    pub fn wait_for_open_port(&mut self, port: u16, addr: &str, timeout: Duration) -> Result<(), DriverError> {
        self.wait_for_status(&port_check(port, addr), true, &format!("TCP port {port} on {addr}"), timeout)
    }

    pub fn wait_for_closed_port(&mut self, port: u16, addr: &str, timeout: Duration) -> Result<(), DriverError> {
        self.wait_for_status(&port_check(port, addr), false, &format!("TCP port {port} on {addr} to close"), timeout)
    }

    /// Waits for a systemd unit to be active; fails at once when it failed,
    /// or is inactive with no job pending, or the guest has no systemd.
    pub fn wait_for_unit(&mut self, unit: &str, user: Option<&str>, timeout: Duration) -> Result<(), DriverError> {
        if self.execute("command -v systemctl", None)?.status != 0 {
            return Err(self.err(
                Kind::Failed,
                format!("wait_for_unit({unit}) needs systemd, and this guest has no systemctl (wait for a port, a file or a command instead)"),
            ));
        }
        let systemctl = match user {
            None => "systemctl".to_string(),
            Some(u) => format!(
                "su -l {} -s /bin/sh -c 'XDG_RUNTIME_DIR=/run/user/$(id -u) systemctl --user \"$@\"' --",
                quote(u)
            ),
        };
        let show = format!("{systemctl} --no-pager show {} --property=ActiveState", quote(unit));
        let jobs = format!("{systemctl} list-jobs --full 2>&1");
        self.poll(timeout, &format!("unit {unit}"), |m, left| {
            let out = m.execute(&show, Some(left))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let state = text.trim().strip_prefix("ActiveState=").unwrap_or("").to_string();
            match state.as_str() {
                "active" => Ok(Some(())),
                "failed" => Err(m.err(Kind::Failed, format!("unit {unit} reached state \"failed\""))),
                "inactive" => {
                    let pending = m.execute(&jobs, Some(left))?;
                    if String::from_utf8_lossy(&pending.stdout).contains("No jobs") {
                        return Err(
                            m.err(Kind::Failed, format!("unit {unit} is inactive and there are no pending jobs"))
                        );
                    }
                    Ok(None)
                }
                _ => Ok(None),
            }
        })
    }

    /// Waits for `regex` to match the serial console output since the
    /// previous match (or since the machine started).
    pub fn wait_for_console_text(&mut self, regex: &str, timeout: Duration) -> Result<String, DriverError> {
        let re =
            regex::Regex::new(regex).map_err(|e| self.err(Kind::Request, format!("bad regular expression: {e}")))?;
        let path = self.vm.serial_log();
        self.poll(timeout, &format!("/{regex}/ on the console"), |m, _| {
            if let Ok(bytes) = std::fs::read(&path) {
                let new = bytes.get(m.console_offset as usize..).unwrap_or_default();
                m.console_offset += new.len() as u64;
                m.console += &String::from_utf8_lossy(new).replace('\r', "");
            }
            let found = re.find(&m.console).map(|f| (f.as_str().to_string(), f.end()));
            Ok(found.map(|(text, end)| {
                m.console.drain(..end);
                text
            }))
        })
    }
}

/// The shell command for "something listens on `addr`:`port`". `nc -z`
/// (OpenBSD netcat, NixOS) first; busybox's nc has no `-z` but runs a
/// program once connected.
pub fn port_check(port: u16, addr: &str) -> String {
    let (a, p) = (quote(addr), port);
    format!("nc -z {a} {p} 2>/dev/null || nc -w 2 {a} {p} -e true 2>/dev/null")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_checks_quote_the_address() {
        assert_eq!(
            port_check(80, "localhost"),
            "nc -z localhost 80 2>/dev/null || nc -w 2 localhost 80 -e true 2>/dev/null"
        );
        assert!(port_check(1, "a b").starts_with("nc -z 'a b' 1 "));
    }
}
