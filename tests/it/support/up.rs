//! Helpers for tests of `vmlab up`: a running `vmlab up` and its output,
//! what is left of a session, a free port and a page fetched from it.

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{processes_mentioning, vmlab, Lines, PATIENCE};

pub(crate) fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

/// A running `vmlab up`, its session under a private TMPDIR; stopped on drop
/// so a failing test leaves nothing running.
pub(crate) struct Up {
    child: Child,
    /// Standard output and error, each line with `out: ` or `err: ` first.
    output: Option<Lines>,
}

impl Up {
    pub(crate) fn start(dir: &Path, tmpdir: &Path, env: &[(&str, &str)]) -> Up {
        let mut cmd = vmlab();
        cmd.arg("up").arg(dir);
        Up::spawn(cmd, tmpdir, env)
    }

    /// Runs `cmd`, a `vmlab up` or a script that runs one (`bin/run-vms`).
    pub(crate) fn spawn(mut cmd: Command, tmpdir: &Path, env: &[(&str, &str)]) -> Up {
        std::fs::create_dir_all(tmpdir).unwrap();
        cmd.env_remove("XDG_RUNTIME_DIR").env("TMPDIR", tmpdir);
        cmd.envs(env.iter().copied()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let output = Lines::merged(vec![
            (Box::new(child.stdout.take().unwrap()), "out: "),
            (Box::new(child.stderr.take().unwrap()), "err: "),
        ]);
        Up { child, output: Some(output) }
    }

    /// Reads output until a line contains `needle`; returns that line.
    pub(crate) fn wait_for(&mut self, needle: &str) -> String {
        self.output.as_mut().expect("read until finish").wait_for(needle)
    }

    /// The session directory, as `vmlab up` announces it.
    pub(crate) fn session(&mut self) -> PathBuf {
        let line = self.wait_for("vmlab: session directory: ");
        let rest = line.split_once("session directory: ").unwrap().1;
        PathBuf::from(rest.split_once(" (").unwrap().0)
    }

    pub(crate) fn signal(&self, signal: libc::c_int) {
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, signal) }, 0);
    }

    /// Waits for vmlab to exit; returns its status and all its output.
    pub(crate) fn finish(mut self) -> (ExitStatus, String) {
        let status = self.child.wait().unwrap();
        (status, self.output.take().expect("finished once").rest())
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// How many of `processes` have `what` in their command line.
pub(crate) fn count(processes: &[(u32, String)], what: &str) -> usize {
    processes.iter().filter(|(_, cmdline)| cmdline.contains(what)).count()
}

/// Polls until no process mentions `session`; returns the ones left at the deadline.
pub(crate) fn leftovers(session: &Path) -> Vec<(u32, String)> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = processes_mentioning(session);
        if found.is_empty() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /` on 127.0.0.1:`port`; the response body.
pub(crate) fn http_get(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    std::io::Write::write_all(&mut stream, b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not HTTP: {response}"));
    assert_eq!(head.split(' ').nth(1), Some("200"), "{head}");
    body.to_owned()
}
