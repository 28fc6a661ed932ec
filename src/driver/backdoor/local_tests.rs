//! The whole command path against real local shells (busybox sh and bash),
//! wired like the guest's console: stdin and stdout on one stream, no echo.

use super::*;
use crate::layout::BANNER;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

const BASH: &str = "/usr/bin/bash-static";

/// A local shell on a socketpair; its process group dies with it.
struct Local {
    child: Child,
    shell: Shell,
    _bin: tempfile::TempDir,
}

impl Drop for Local {
    fn drop(&mut self) {
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// `bash`: whether the guest has bash (then it is the backdoor shell too,
/// as on NixOS) or only busybox.
fn spawn(bash: bool, prelude: &str) -> Local {
    let bin = tempfile::tempdir().unwrap();
    let ok = Command::new("busybox").arg("--install").arg("-s").arg(bin.path()).status().unwrap();
    assert!(ok.success());
    let shell_path = if bash {
        // A missing bash would only show as a dangling link and a spawn error.
        assert!(Path::new(BASH).exists(), "{BASH} is needed (Debian: bash-static)");
        std::os::unix::fs::symlink(BASH, bin.path().join("bash")).unwrap();
        BASH.to_string()
    } else {
        bin.path().join("sh").display().to_string()
    };
    let (ours, theirs) = UnixStream::pair().unwrap();
    let child = Command::new(&shell_path)
        .arg("-c")
        .arg(format!("{prelude}exec {shell_path}"))
        .env_clear()
        .env("PATH", bin.path())
        // The session's directory goes with the test's.
        .env("TMPDIR", bin.path())
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs.try_clone().unwrap())))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let shell = Shell::new(ours, "local").unwrap();
    Local { child, shell, _bin: bin }
}

fn both() -> [Local; 2] {
    [spawn(false, ""), spawn(true, "")]
}

fn ok() -> impl FnMut() -> Result<(), DriverError> {
    || Ok(())
}

fn run(l: &mut Local, cmd: &str) -> Output {
    l.shell.run(cmd, Some(Duration::from_secs(60)), &mut ok(), None).unwrap()
}

#[test]
fn stdout_stderr_and_status_come_back_separately() {
    for mut l in both() {
        let o = run(&mut l, "for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 3");
        assert_eq!(o.stdout, b"out1\nout2\nout3\n");
        assert_eq!(o.stderr, b"err1\nerr2\nerr3\n");
        assert_eq!((o.status, o.timed_out), (3, false));
        let o = run(&mut l, "echo '$HOME' \"`echo x`\" \\\n  continued; cat <<EOF\nheredoc $((1+1))\nEOF");
        assert_eq!(String::from_utf8_lossy(&o.stdout), "$HOME x continued\nheredoc 2\n");
        // Quotes, backslashes and lines that look like the framing's own.
        let text = "it's \\ \"q\" $x `y`\n__vmlab_c='\nvmlab_EOF\nEOF";
        let o = run(&mut l, &format!("cat <<'END'\n{text}\nEND"));
        assert_eq!(String::from_utf8_lossy(&o.stdout), format!("{text}\n"));
    }
}

#[test]
fn errexit_nounset_and_pipefail_as_in_nixos() {
    for mut l in both() {
        assert_eq!(run(&mut l, "false; echo not reached").status, 1);
        assert_eq!(run(&mut l, "false | true").status, 1);
        assert_ne!(run(&mut l, "echo $undefined_variable").status, 0);
        assert_eq!(run(&mut l, "true | true").status, 0);
        // The command runs in a subshell: neither a syntax error nor an
        // `exit` or `exec` ends the backdoor shell.
        for cmd in ["if then", "exit 7", "exec true"] {
            run(&mut l, cmd);
            assert_eq!(run(&mut l, "echo alive").stdout, b"alive\n", "after {cmd:?}");
        }
        // The session's directory is made again when it goes (a command
        // cleaning /tmp, a reboot).
        run(&mut l, "rm -rf \"$__vmlab_d\"");
        assert_eq!(run(&mut l, "echo again").stdout, b"again\n");
        // Every command starts afresh: no state leaks between them.
        run(&mut l, "cd /; x=1");
        assert_eq!(run(&mut l, "echo ${x:-unset}").stdout, b"unset\n");
    }
}

#[test]
fn binary_output_of_any_size_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut data: Vec<u8> = (0..=255u8).collect();
    let mut x: u32 = 1;
    data.extend((0..16 * 1024 * 1024).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    }));
    let file = dir.path().join("blob");
    std::fs::write(&file, &data).unwrap();
    for mut l in both() {
        let o = run(&mut l, &format!("cat {}; printf 'e\\000r' >&2", file.display()));
        assert_eq!(o.stdout.len(), data.len());
        assert!(o.stdout == data, "stdout differs");
        assert_eq!(o.stderr, b"e\0r");
        assert_eq!(run(&mut l, "printf ''").stdout, b"");
    }
}

#[test]
fn a_background_process_holding_stdout_does_not_hold_the_command() {
    for mut l in both() {
        let o = run(&mut l, "sleep 1000 & echo started");
        assert_eq!((o.status, o.stdout.as_slice()), (0, &b"started\n"[..]));
        assert_eq!(run(&mut l, "echo next").stdout, b"next\n");
    }
}

/// A background process keeps writing to the files of the command that
/// started it: later commands' replies are their own all the same, and
/// the starting command's reply is cut where the command ended.
#[test]
fn a_background_writer_never_reaches_another_commands_output() {
    for mut l in both() {
        let o = run(&mut l, "echo started; (while :; do echo daemon-log; sleep 0.01; done) &");
        assert!(o.stdout.starts_with(b"started\n"), "{:?}", String::from_utf8_lossy(&o.stdout));
        for i in 0..10 {
            let o = run(&mut l, &format!("sleep 0.03; echo hi{i}"));
            assert_eq!(String::from_utf8_lossy(&o.stdout), format!("hi{i}\n"));
            assert_eq!(o.stderr, b"");
        }
        // A writer as fast as the machine allows (bounded: this is the host's /tmp).
        run(&mut l, "(yes daemon-log-line | head -c 50000000) &");
        for i in 0..3 {
            assert_eq!(String::from_utf8_lossy(&run(&mut l, &format!("echo fast{i}")).stdout), format!("fast{i}\n"));
        }
    }
}

/// Copies out and in over the raw framing, in pieces (a small piece
/// size is not needed: 9 MiB is two pieces), and what a failure says.
#[test]
fn copies_stream_out_and_in_whole_and_failures_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let data: Vec<u8> = (0..9 * 1024 * 1024 + 7).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(src.join("sub/blob"), &data).unwrap();
    let dir_path = dir.path().display().to_string();
    let minute = Duration::from_secs(60);
    for mut l in both() {
        let mut archive = Vec::new();
        let out = l.shell.copy_out(&dir_path, "src", &mut archive, minute, &mut ok()).unwrap();
        assert_eq!((out.status, out.stderr.as_slice()), (0, &b""[..]));
        let back = dir.path().join("back");
        crate::driver::copy::unpack(&archive[..], &back, "src".as_ref()).unwrap();
        assert!(std::fs::read(back.join("src/sub/blob")).unwrap() == data, "copied out");
        let dest = dir.path().join("in/deep/copy");
        let out = l
            .shell
            .copy_in(&mut &archive[..], archive.len() as u64, "src", &dest.display().to_string(), minute, &mut ok())
            .unwrap();
        assert_eq!(out.status, 0, "{out:?}");
        assert!(std::fs::read(dest.join("sub/blob")).unwrap() == data);
        std::fs::remove_dir_all(dir.path().join("in")).unwrap();
        // The shell reads on after each copy, failed or not.
        let out = l.shell.copy_out(&dir_path, "nonexistent", &mut Vec::new(), minute, &mut ok()).unwrap();
        assert_ne!(out.status, 0);
        assert!(String::from_utf8_lossy(&out.stderr).contains("nonexistent"), "{out:?}");
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, "").unwrap();
        let dest = blocked.join("below").display().to_string();
        let out = l.shell.copy_in(&mut &archive[..], archive.len() as u64, "src", &dest, minute, &mut ok()).unwrap();
        assert_ne!(out.status, 0);
        assert!(String::from_utf8_lossy(&out.stderr).contains("Not a directory"), "{out:?}");
        // What `tar -x` says reaches the host: it is kept in the shell
        // until the unpacked copy is removed, so a full /tmp cannot swallow it.
        let garbage = vec![b'x'; 3000];
        let dest = dir.path().join("in/garbage").display().to_string();
        let out = l.shell.copy_in(&mut &garbage[..], 3000, "src", &dest, minute, &mut ok()).unwrap();
        assert_ne!(out.status, 0);
        assert!(String::from_utf8_lossy(&out.stderr).contains("tar"), "{out:?}");
        assert_eq!(run(&mut l, "echo alive").stdout, b"alive\n");
    }
}

#[test]
fn the_guest_stops_a_command_at_its_timeout() {
    for mut l in both() {
        let o = l.shell.run("echo before; sleep 30", Some(Duration::from_secs(1)), &mut ok(), None).unwrap();
        assert!(o.timed_out, "{o:?}");
        assert!(TIMEOUT_STATUSES.contains(&o.status));
        assert_eq!(o.stdout, b"before\n");
        assert_eq!(run(&mut l, "echo alive").stdout, b"alive\n");
    }
}

#[test]
fn the_host_deadline_holds_when_the_guest_never_answers() {
    // A "shell" that swallows everything and never replies.
    let mut l = spawn(false, "exec cat >/dev/null; ");
    l.shell.host_grace = Duration::from_millis(300);
    let e = l.shell.run("true", Some(Duration::from_secs(1)), &mut ok(), None).unwrap_err();
    assert_eq!(e.kind, Kind::Timeout);
    assert!(e.message.contains("machine local"), "{e}");
}

#[test]
fn a_shell_dying_mid_command_is_an_error_naming_the_machine() {
    for mut l in both() {
        let pid = l.child.id() as i32;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        });
        let e = l.shell.run("sleep 30", None, &mut ok(), None).unwrap_err();
        killer.join().unwrap();
        assert_eq!(e.kind, Kind::Machine, "{e}");
        assert!(e.message.contains("machine local"), "{e}");
        let e = l.shell.run("true", None, &mut ok(), None).unwrap_err();
        assert_eq!(e.kind, Kind::Machine, "{e}");
    }
}

#[test]
fn liveness_is_checked_while_waiting() {
    let mut l = spawn(false, "");
    let e = l
        .shell
        .run(
            "sleep 30",
            None,
            &mut || Err(DriverError::new(Kind::Machine, "machine local: QEMU exited with status 1")),
            None,
        )
        .unwrap_err();
    assert!(e.message.contains("QEMU exited"));
}

#[test]
fn the_banner_is_awaited_and_what_follows_is_kept() {
    let mut l = spawn(true, &format!("sleep 0.2; echo boot noise; printf '%s\\n' '{BANNER}'; "));
    l.shell.wait_for_banner(&mut ok(), Some(Instant::now() + Duration::from_secs(30))).unwrap();
    assert_eq!(run(&mut l, "echo up").stdout, b"up\n");
}

/// The PIDs and names of the processes under `pid`, from /proc.
fn descendants(pid: u32) -> Vec<(u32, String)> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or("").trim().to_string();
        parents.push((child, field("PPid:").parse::<u32>().unwrap_or(0), field("Name:")));
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parents.iter().filter(|(_, ppid, _)| *ppid == parent).map(|(p, _, _)| *p));
        i += 1;
    }
    parents.into_iter().filter(|(p, _, _)| found[1..].contains(p)).map(|(p, _, name)| (p, name)).collect()
}

/// Whether a process runs (neither gone nor a zombie).
fn runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// The stop command, run by either shell a guest's backdoor may be, on a
/// real tree: a stand-in for the data port's shell running a command in a
/// subshell, as `__vmlab_r` does. Every process under the shell gets the
/// signal, the shell goes on with the subshell's status, and no other
/// process is touched.
#[test]
fn the_stop_command_signals_what_the_data_shell_runs_and_nothing_else() {
    use std::io::BufRead;
    // (the command, the signals sent in turn, the status the shell sees)
    let cases: [(&str, &[Signal], &str); 3] = [
        ("sleep 100 & sleep 100", &[Signal::Term], "143"),
        ("exec sleep 100", &[Signal::Term], "143"),
        ("trap '' TERM; sleep 100 & sleep 100", &[Signal::Term, Signal::Kill], "137"),
    ];
    let mut bystander = Command::new("sleep").arg("100").spawn().unwrap();
    for stopper in [["busybox", "sh"], [BASH, "--norc"]] {
        for (command, signals, status) in cases {
            let mut shell = Command::new("busybox")
                .args(["sh", "-c", &format!("({command}); echo $?; exec sleep 100")])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap();
            let pid = shell.id();
            let sleeps = command.matches("sleep").count();
            let deadline = Instant::now() + Duration::from_secs(10);
            let tree = loop {
                let tree = descendants(pid);
                if tree.iter().filter(|(_, name)| name == "sleep").count() == sleeps {
                    break tree;
                }
                assert!(Instant::now() < deadline, "{command}: {tree:?}");
                std::thread::sleep(Duration::from_millis(20));
            };
            for (i, &signal) in signals.iter().enumerate() {
                if i > 0 {
                    std::thread::sleep(Duration::from_millis(300));
                    assert!(tree.iter().all(|(p, _)| runs(*p)), "{command}: ignored {:?}", signals[i - 1]);
                }
                let out = Command::new(stopper[0])
                    .args(&stopper[1..])
                    .arg("-euc")
                    .arg(stop_command(pid, signal))
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{stopper:?} {command}: {out:?}");
            }
            let mut line = String::new();
            std::io::BufReader::new(shell.stdout.take().unwrap()).read_line(&mut line).unwrap();
            assert_eq!(line.trim(), status, "{stopper:?} {command}");
            let deadline = Instant::now() + Duration::from_secs(5);
            while tree.iter().any(|(p, _)| runs(*p)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(tree.iter().all(|(p, _)| !runs(*p)), "{stopper:?} {command}: left {tree:?}");
            assert!(runs(pid), "{stopper:?} {command}: the shell itself was stopped");
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            shell.wait().unwrap();
        }
    }
    assert!(bystander.try_wait().unwrap().is_none(), "a process outside the tree was signalled");
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

/// A timed command with a way to stop it is sent untimed, and stopped by
/// the host at its timeout, through another shell (here a host shell, as
/// the backdoor is on a machine): SIGTERM, then SIGKILL when that is not
/// enough; a command done in time is never stopped.
#[test]
fn the_host_stops_a_command_at_its_timeout_through_another_shell() {
    // (the command, the signals sent, its status)
    let cases: [(&str, &[Signal], i32); 3] = [
        ("echo before; sleep 1000 & sleep 1000", &[Signal::Term], 143),
        ("echo before; trap '' TERM; sleep 1000", &[Signal::Term, Signal::Kill], 137),
        ("echo before", &[], 0),
    ];
    for mut l in both() {
        let pid = l.child.id();
        for (command, signals, status) in cases {
            let mut sent = Vec::new();
            let mut stop = |signal, _: Alive| {
                sent.push(signal);
                let out = Command::new("busybox").args(["sh", "-euc", &stop_command(pid, signal)]).output().unwrap();
                assert!(out.status.success(), "{out:?}");
                Ok(())
            };
            let started = Instant::now();
            let o = l.shell.run(command, Some(Duration::from_secs(1)), &mut ok(), Some(&mut stop)).unwrap();
            assert!(started.elapsed() < Duration::from_secs(10), "{command}: {:?}", started.elapsed());
            assert_eq!(
                (o.status, o.timed_out, o.stdout.as_slice()),
                (status, status != 0, &b"before\n"[..]),
                "{command}"
            );
            assert_eq!(sent, signals, "{command}");
            assert!(!descendants(pid).iter().any(|(_, name)| name == "sleep"), "{command}: {:?}", descendants(pid));
            assert_eq!(run(&mut l, "echo alive").stdout, b"alive\n");
        }
    }
}
