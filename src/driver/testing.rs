//! Test support: a [`Vm`] whose "guest" is a local busybox shell behind a
//! unix socket, with a QMP server that accepts every command, so machine
//! operations and the control socket are tested without booting anything.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use super::vm::{Killer, Vm};
use crate::layout::{self, BANNER};

pub struct LocalVm {
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
    /// The shell's process group, for [`Vm::killer`] (0: none).
    group: Arc<std::sync::atomic::AtomicI32>,
    /// QMP commands received, for assertions.
    pub qmp_log: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl LocalVm {
    /// `dir` holds the sockets and `serial.log`; `bin` is a PATH directory.
    pub fn new(dir: &Path, bin: &Path) -> Self {
        LocalVm {
            dir: dir.to_path_buf(),
            bin: bin.to_path_buf(),
            child: None,
            group: Default::default(),
            qmp_log: Default::default(),
        }
    }
}

/// A directory of busybox applet links, the local "guest's" whole PATH.
pub fn busybox_bin(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    assert!(Command::new("busybox").arg("--install").arg("-s").arg(&bin).status().unwrap().success());
    bin
}

fn relay(mut from: UnixStream, mut to: UnixStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

impl Vm for LocalVm {
    fn spawn(&mut self) -> anyhow::Result<()> {
        // What a dead "guest" left behind in its process group goes with it.
        self.kill();
        std::fs::create_dir_all(&self.dir)?;
        for s in [layout::SHELL_SOCKET, layout::QMP_SOCKET] {
            let _ = std::fs::remove_file(self.dir.join(s));
        }
        let (ours, theirs) = UnixStream::pair()?;
        let sh = self.bin.join("sh");
        let child = Command::new(&sh)
            .arg("-c")
            .arg(format!("sleep 0.2; printf '%s\\n' '{BANNER}'; exec {}", sh.display()))
            .env_clear()
            .env("PATH", &self.bin)
            // The session's directory goes with the test's.
            .env("TMPDIR", &self.dir)
            .current_dir(&self.dir)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs.try_clone()?)))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        self.group.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
        self.child = Some(child);
        let shell = UnixListener::bind(self.dir.join(layout::SHELL_SOCKET))?;
        std::thread::spawn(move || {
            if let Ok((client, _)) = shell.accept() {
                relay(ours.try_clone().unwrap(), client.try_clone().unwrap());
                relay(client, ours);
            }
        });
        let qmp = UnixListener::bind(self.dir.join(layout::QMP_SOCKET))?;
        let log = self.qmp_log.clone();
        std::thread::spawn(move || {
            let Ok((mut s, _)) = qmp.accept() else { return };
            let _ = writeln!(s, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#);
            for line in BufReader::new(s.try_clone().unwrap()).lines() {
                let Ok(line) = line else { return };
                let request: serde_json::Value = serde_json::from_str(&line).unwrap();
                let answer = if request["execute"] == "human-monitor-command" {
                    serde_json::json!("")
                } else {
                    serde_json::json!({})
                };
                let id = request["id"].clone();
                // Logged before the answer, so a caller that got it sees it logged.
                log.lock().unwrap().push(request);
                let _ = writeln!(s, "{}", serde_json::json!({ "return": answer, "id": id }));
            }
        });
        Ok(())
    }

    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(format!("exited ({status})")),
            _ => None,
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    fn killer(&self) -> Killer {
        let group = self.group.clone();
        Arc::new(move || match group.load(std::sync::atomic::Ordering::SeqCst) {
            0 => {}
            g => unsafe {
                libc::kill(-g, libc::SIGKILL);
            },
        })
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.clone()
    }

    fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    fn retired(&self) -> bool {
        false
    }
}

impl Drop for LocalVm {
    fn drop(&mut self) {
        self.kill();
    }
}
