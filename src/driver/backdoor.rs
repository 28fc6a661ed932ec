//! The guest side of a command, over the backdoor contract: a root shell
//! (busybox sh, bash, or a stock NixOS test VM's bash) reading commands from
//! the virtio console and writing to it, announced by [`BANNER`].
//!
//! The framing is pure: [`functions`] is the shell text a shell is given
//! once, [`script`] the line sent for one command, and [`ReplyParser`]
//! takes the console's bytes back, in pieces of any size. [`Shell`] is the
//! thin I/O wrapper over a stream (the machine's `shell.sock` or
//! `data.sock`, or a socketpair to a local shell in the tests).
//!
//! Why the guest's side looks the way it does:
//! - The command runs with its stdout and stderr redirected to files in the
//!   session's private temporary directory, and the shell *waits for the
//!   process*, not for end of file: a background process that keeps stdout
//!   open (`sleep 1000 &`, a daemon) cannot hold the reply back.
//! - The files are sent back base64-encoded between marker lines carrying a
//!   random per-command token; base64 never contains a space, so no output can
//!   forge a marker, and whatever a previous, abandoned command prints late is
//!   skipped. The markers are printed with `printf '%s out'`, so even a console
//!   that echoes its input never shows a marker it was not sent.
//! - The end marker carries both streams' sizes, and the command's output
//!   files stay until the next command: QEMU drops console output while the
//!   host end is full, and a reply that lost bytes is asked for again.
//! - Only POSIX sh and tools that busybox and coreutils share are used
//!   (`mktemp -d`, `base64` and `base64 -d`, `timeout SECS PROG`, `stat -c
//!   %s`, `dd iflag=fullblock,count_bytes status=none`, `md5sum`), so the
//!   same text drives busybox sh, bash and NixOS guests.
//! - Each program started costs milliseconds under emulation, and bash
//!   reads its input a byte per system call, so a command is one short line
//!   and starts as few programs as it can (see [`script`]): `true` costs
//!   one fork.
//! - The command runs in a subshell of the backdoor shell (bash when the
//!   guest has it, as on NixOS, so NixOS test scripts work unchanged; else
//!   sh), with `set -eu` and `pipefail` where the shell knows it, with stdin
//!   from /dev/null so it can never eat the commands that follow it.

use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::base64;
use super::{DriverError, Kind};
use crate::layout::BANNER;

/// How often a blocked read or write wakes up to check the machine is alive.
const POLL: Duration = Duration::from_millis(200);

/// Time allowed beyond a command's own timeout for the guest to report back
/// (slow emulated guests, large outputs) before the host gives up on it; a
/// tenth of the timeout is added on top.
const HOST_GRACE: Duration = Duration::from_secs(15);

/// After this long without a byte from a running command, the host sends
/// the shell a probe (see [`probe_line`]), then again after twice as long
/// each time, up to [`PROBE_MAX`]. Under TCG, a guest sometimes misses the
/// notification of a command written to its virtio console after heavy
/// output, and sits idle with the command unread until more input arrives;
/// and QEMU drops console output the host reads too slowly, which may be the
/// reply's end marker. The command's standard input is /dev/null, so the
/// probe waits for the shell, which runs it once the command is done.
const PROBE_AFTER: Duration = Duration::from_secs(2);
const PROBE_MAX: Duration = Duration::from_secs(30);

/// Pure: the probe of a command marked `token`: it prints `<token> probe`
/// once the shell is free again. Seen before the reply's end, it means the
/// end was lost (the command is over): the reply is asked for again rather
/// than waited for until the timeout. Seen after it, it is noise to the
/// next reply's parser (another token).
pub fn probe_line(token: &str) -> String {
    format!("printf '%s probe\\n' {token}\n")
}

/// How many times a command's reply is asked for when it comes back short.
const REPLY_ATTEMPTS: usize = 4;

/// Replies asked for again and probes sent, by every shell of this process:
/// what the lossy console cost, said at the end of a test (a data port
/// needs neither).
static REASKED: AtomicU64 = AtomicU64::new(0);
static PROBED: AtomicU64 = AtomicU64::new(0);

/// The replies asked for again and the probes sent so far.
pub fn recoveries() -> (u64, u64) {
    (REASKED.load(Ordering::Relaxed), PROBED.load(Ordering::Relaxed))
}

/// Exit statuses `timeout` gives a command it stopped: coreutils 124,
/// busybox 128+SIGTERM, and 128+SIGKILL after `-k`.
const TIMEOUT_STATUSES: [i32; 3] = [124, 143, 137];

/// One finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The guest's `timeout` stopped the command.
    pub timed_out: bool,
}

/// A fresh random token for one command's markers (hex, 16 digits).
pub fn new_token() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    format!("vmlab{:016x}", h.finish())
}

/// The text sent to the guest shell to run `command`, stopped by the guest
/// after `timeout_secs` when given: one short line calling [`functions`]'
/// `__vmlab_r`, which needs them defined in that shell (see
/// [`Shell::run`]).
///
/// Every external program costs a fork and an exec, several milliseconds
/// each under emulation, and bash reads a console or port one byte per
/// system call (900 bytes of script cost 3 ms), so the common path sends
/// a few dozen bytes and uses shell builtins only: the session's directory
/// and what the shell supports are settled by the first command (and again
/// if the directory goes, e.g. after a reboot); without a timeout the
/// command is run by `eval` in a subshell of the backdoor shell (a fork, no
/// exec, no file); empty streams are neither measured nor encoded, and
/// their reply is one `printf`.
///
/// Each command writes to files of its own (`o<n>`, `e<n>`): a background
/// process an earlier command left running still holds that command's
/// files open and keeps writing to them, and must never reach another
/// command's reply. The previous command's files are emptied when it wrote
/// anything (a builtin: what it wrote is no longer needed for a resend) and
/// old ones removed now and then (one `rm` every hundredth command); what a
/// background process writes later is its own business, as in any shell.
pub fn script(token: &str, command: &str, timeout_secs: Option<u64>) -> Result<String, String> {
    if command.contains('\0') {
        return Err("a command cannot contain a NUL byte".into());
    }
    let secs = timeout_secs.map_or("-".to_string(), |s| s.to_string());
    Ok(format!("__vmlab_r {token} {secs} {}\n", crate::shell::quote(command)))
}

/// The largest piece of a copy either way, which the guest keeps in a file
/// while it checksums and sends or unpacks it: large enough that the
/// programs started per piece cost little, small enough for any guest.
const COPY_PIECE_MIB: usize = 8;
const COPY_PIECE: usize = COPY_PIECE_MIB << 20;

/// Pure: the shell functions every command, reply and copy calls, defined
/// once per shell (sent before its first command). Only POSIX sh and what
/// busybox and coreutils share is used, so the same text drives busybox
/// sh, bash and NixOS guests.
///
/// - `__vmlab_setup` makes the session's directory when it is not there,
///   and settles `pipefail` and the shell a timed command runs under.
/// - `__vmlab_r TOKEN SECS|- COMMAND` runs a command (see [`script`]) with
///   `set -eu` and `pipefail` where the shell has it, standard input from
///   /dev/null, in a subshell of this shell (bash when the guest has it, as
///   on NixOS, so NixOS test scripts work unchanged), or under `timeout` in
///   a fresh one; the shell waits for the process, not for end of file, so
///   a background process keeping the output open cannot hold the reply.
/// - `__vmlab_measure` takes the sizes of the streams once the command has
///   ended; `__vmlab_reply TOKEN` sends them cut at those sizes (a
///   background process may still be writing), base64-encoded between
///   marker lines, and the end line with the status and sizes, by which
///   the host sees a reply that lost bytes on the way. Run again with a new
///   token, it sends the same reply again.
/// - `__vmlab_copy_out TOKEN PARENT NAME` and `__vmlab_copy_in TOKEN SIZE
///   NAME DEST`: the copies of a data port, raw bytes in pieces of
///   [`COPY_PIECE`] (see [`Shell::copy_out`] and [`Shell::copy_in`]). `dd`
///   moves the bytes: it reads no further than it is asked (`head -c` may
///   read ahead, and busybox's reads a byte at a time), and each piece is
///   staged in a file, which `md5sum` reads twice as fast as a pipe under
///   TCG; busybox's `wc` and `tee` are as slow, so `stat` takes the sizes.
pub fn functions() -> String {
    format!(
        "__vmlab_setup() {{ [ ! -d \"${{__vmlab_d:-}}\" ] || return 0; \
         __vmlab_d=$(mktemp -d /tmp/vmlab.XXXXXX) || {{ __vmlab_d=/dev/null/vmlab; return 1; }}; \
         __vmlab_n=0; __vmlab_o=/dev/null; __vmlab_e=/dev/null; __vmlab_so=0; __vmlab_se=0; \
         __vmlab_pf=; ! (set -o pipefail) 2>/dev/null || __vmlab_pf='set -o pipefail'; \
         __vmlab_sh=sh; [ -z \"${{BASH_VERSION:-}}\" ] || __vmlab_sh=bash; }}\n\
         __vmlab_r() {{ __vmlab_setup || {{ printf '%s fail %s\\n' \"$1\" 'cannot create a temporary directory in /tmp'; return; }}; \
         [ \"$__vmlab_so$__vmlab_se\" = 00 ] || : 2>/dev/null >\"$__vmlab_o\" >\"$__vmlab_e\"; \
         __vmlab_n=$((__vmlab_n+1)); case $__vmlab_n in *00) rm -f \"$__vmlab_d\"/[oe]*;; esac; \
         __vmlab_o=$__vmlab_d/o$__vmlab_n; __vmlab_e=$__vmlab_d/e$__vmlab_n; __vmlab_c=$3; \
         if [ \"$2\" = - ]; then (set -eu --; $__vmlab_pf; eval \"$__vmlab_c\") </dev/null >\"$__vmlab_o\" 2>\"$__vmlab_e\"; \
         else printf 'set -eu\\n%s\\n%s\\n' \"$__vmlab_pf\" \"$__vmlab_c\" >\"$__vmlab_d/c\"; \
         timeout \"$2\" \"$__vmlab_sh\" \"$__vmlab_d/c\" </dev/null >\"$__vmlab_o\" 2>\"$__vmlab_e\"; fi; \
         __vmlab_s=$?; __vmlab_measure; __vmlab_reply \"$1\"; }}\n\
         __vmlab_measure() {{ __vmlab_so=0; __vmlab_se=0; [ -s \"$__vmlab_o\" ] || [ -s \"$__vmlab_e\" ] || return 0; \
         set -- $(stat -c %s \"$__vmlab_o\" \"$__vmlab_e\"); __vmlab_so=$1; __vmlab_se=$2; }}\n\
         __vmlab_reply() {{ if [ \"$__vmlab_so$__vmlab_se\" = 00 ]; then \
         printf '%s out\\n%s err\\n%s end %s 0 0\\n' \"$1\" \"$1\" \"$1\" \"$__vmlab_s\"; return; fi; \
         printf '%s out\\n' \"$1\"; [ \"$__vmlab_so\" = 0 ] || __vmlab_cut \"$__vmlab_o\" \"$__vmlab_so\" | base64; \
         printf '%s err\\n' \"$1\"; [ \"$__vmlab_se\" = 0 ] || __vmlab_cut \"$__vmlab_e\" \"$__vmlab_se\" | base64; \
         printf '%s end %s %s %s\\n' \"$1\" \"$__vmlab_s\" \"$__vmlab_so\" \"$__vmlab_se\"; }}\n\
         __vmlab_cut() {{ dd if=\"$1\" bs=1048576 count=\"$2\" iflag=count_bytes status=none; }}\n\
         __vmlab_copy_out() {{ __vmlab_setup || {{ printf '%s fail %s\\n' \"$1\" 'cannot create a temporary directory in /tmp'; return; }}; \
         __vmlab_o=$__vmlab_d/o; __vmlab_e=$__vmlab_d/e; __vmlab_k=$__vmlab_d/k; : >\"$__vmlab_o\"; \
         {{ tar -C \"$2\" -cf - \"$3\" 2>\"$__vmlab_e\"; echo $? >\"$__vmlab_d/s\"; }} | while :; do \
         dd bs=1048576 count={mib} iflag=fullblock status=none of=\"$__vmlab_k\" 2>>\"$__vmlab_e\"; \
         set -- \"$1\" $(stat -c %s \"$__vmlab_k\"; md5sum <\"$__vmlab_k\"); \
         printf '%s piece %s %s\\n' \"$1\" \"$2\" \"$3\"; [ \"$2\" != 0 ] || break; cat \"$__vmlab_k\"; done; \
         read -r __vmlab_s <\"$__vmlab_d/s\" || __vmlab_s=1; rm -f \"$__vmlab_k\" \"$__vmlab_d/s\"; \
         __vmlab_measure; __vmlab_reply \"$1\"; }}\n\
         __vmlab_copy_in() {{ __vmlab_setup; __vmlab_x=$__vmlab_d/x; __vmlab_k=$__vmlab_d/k; __vmlab_o=$__vmlab_d/o; __vmlab_e=$__vmlab_d/e; \
         rm -rf \"$__vmlab_x\" \"$__vmlab_k\"; : >\"$__vmlab_o\"; mkdir \"$__vmlab_x\" 2>\"$__vmlab_e\"; __vmlab_s=$?; \
         printf '%s ready\\n' \"$1\"; \
         __vmlab_m=$({{ dd bs=1048576 count=\"$2\" iflag=fullblock,count_bytes status=none | {{ if [ $__vmlab_s = 0 ]; then \
         {{ while dd bs=1048576 count={mib} iflag=fullblock status=none of=\"$__vmlab_k\" && [ -s \"$__vmlab_k\" ]; do \
         md5sum <\"$__vmlab_k\" >>\"$__vmlab_o\"; cat \"$__vmlab_k\"; done; cat >/dev/null; }} | tar -x -C \"$__vmlab_x\"; \
         else cat >/dev/null; fi; }}; }} 2>&1; echo \" $?\"); __vmlab_s=${{__vmlab_m##* }}; __vmlab_m=${{__vmlab_m% *}}; \
         [ $__vmlab_s != 0 ] || {{ rm -rf \"$4\" && mkdir -p \"$(dirname \"$4\")\" && mv \"$__vmlab_x/$3\" \"$4\"; }} 2>>\"$__vmlab_e\" || __vmlab_s=$?; \
         rm -rf \"$__vmlab_x\" \"$__vmlab_k\"; printf '%s' \"$__vmlab_m\" >>\"$__vmlab_e\"; __vmlab_measure; __vmlab_reply \"$1\"; }}\n",
        mib = COPY_PIECE_MIB
    )
}

/// The text asking the guest shell for the previous command's reply again,
/// marked with a new `token` (its output files are kept until the next one).
pub fn resend_script(token: &str) -> String {
    format!("__vmlab_reply {token}\n")
}

#[derive(Debug)]
enum State {
    /// Before this command's first marker: anything else is skipped.
    Seeking,
    Stdout(base64::Decoder),
    Stderr(base64::Decoder),
}

/// Parses one command's reply from the console's bytes.
#[derive(Debug)]
pub struct ReplyParser {
    token: String,
    state: State,
    line: Vec<u8>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl ReplyParser {
    pub fn new(token: &str) -> Self {
        ReplyParser {
            token: token.to_string(),
            state: State::Seeking,
            line: Vec::new(),
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    /// Feeds bytes; returns the reply once its end marker is seen, with the
    /// number of bytes of `data` consumed (the rest belongs to what follows).
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<(Output, usize)>, String> {
        let mut start = 0;
        while let Some(nl) = data[start..].iter().position(|&b| b == b'\n') {
            let end = start + nl;
            let done = if self.line.is_empty() {
                self.take_line(&data[start..end])?
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&data[start..end]);
                self.take_line(&line)?
            };
            start = end + 1;
            if let Some(status) = done {
                let output = Output {
                    status,
                    stdout: std::mem::take(&mut self.stdout),
                    stderr: std::mem::take(&mut self.stderr),
                    timed_out: false,
                };
                return Ok(Some((output, start)));
            }
        }
        // A partial line is kept only while it may still become a marker:
        // base64 is decoded at once (huge unwrapped lines need no buffer) and
        // noise is dropped. A later piece of the same line cannot look like a
        // marker, since base64 has no spaces.
        self.line.extend_from_slice(&data[start..]);
        let prefix = format!("{} ", self.token);
        let prefix = prefix.as_bytes();
        if !(prefix.starts_with(&self.line) || self.line.starts_with(prefix)) {
            let line = std::mem::take(&mut self.line);
            match &mut self.state {
                State::Seeking => {}
                State::Stdout(d) => d.feed(&line, &mut self.stdout)?,
                State::Stderr(d) => d.feed(&line, &mut self.stderr)?,
            }
        }
        Ok(None)
    }

    /// Handles one whole line; `Some(status)` at the end marker.
    fn take_line(&mut self, line: &[u8]) -> Result<Option<i32>, String> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let marker = line
            .strip_prefix(self.token.as_bytes())
            .and_then(|rest| rest.strip_prefix(b" "))
            .map(|rest| String::from_utf8_lossy(rest).into_owned());
        match (marker.as_deref(), &mut self.state) {
            (Some("out"), State::Seeking) => self.state = State::Stdout(base64::Decoder::default()),
            (Some("err"), State::Stdout(_)) => {
                let State::Stdout(d) = std::mem::replace(&mut self.state, State::Stderr(Default::default())) else {
                    unreachable!()
                };
                d.finish()?;
            }
            (Some(m), State::Stderr(_)) if m.starts_with("end ") => {
                let State::Stderr(d) = std::mem::replace(&mut self.state, State::Seeking) else { unreachable!() };
                d.finish()?;
                let mut fields = m[4..].split_whitespace();
                let status =
                    fields.next().and_then(|s| s.parse().ok()).ok_or_else(|| format!("bad exit status in {m:?}"))?;
                let sizes: Vec<usize> = fields.filter_map(|f| f.parse().ok()).collect();
                if let [out, err] = sizes[..] {
                    if (out, err) != (self.stdout.len(), self.stderr.len()) {
                        return Err(format!(
                            "{} of {out} bytes of output and {} of {err} of standard error came back",
                            self.stdout.len(),
                            self.stderr.len()
                        ));
                    }
                }
                return Ok(Some(status));
            }
            (Some(m), _) if m.starts_with("fail ") => return Err(format!("the guest shell says: {}", &m[5..])),
            (Some("probe"), _) => return Err("the reply's end was lost on the console".to_string()),
            (Some(m), _) => return Err(format!("unexpected marker {m:?}")),
            (None, State::Seeking) => {}
            (None, State::Stdout(d)) => d.feed(line, &mut self.stdout)?,
            (None, State::Stderr(d)) => d.feed(line, &mut self.stderr)?,
        }
        Ok(None)
    }
}

/// Finds [`BANNER`] in a stream fed in pieces.
#[derive(Debug, Default)]
pub struct BannerScanner {
    tail: Vec<u8>,
}

impl BannerScanner {
    /// Returns the bytes after the banner once it has been seen.
    pub fn feed(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        self.tail.extend_from_slice(data);
        let banner = BANNER.as_bytes();
        if let Some(at) = self.tail.windows(banner.len()).position(|w| w == banner) {
            return Some(self.tail[at + banner.len()..].to_vec());
        }
        let keep = self.tail.len().saturating_sub(banner.len() - 1);
        self.tail.drain(..keep);
        None
    }
}

/// Checked while waiting: an error means the machine is gone (QEMU exited).
pub type Alive<'a> = &'a mut dyn FnMut() -> Result<(), DriverError>;

/// The I/O side: a connected backdoor stream.
pub struct Shell {
    stream: UnixStream,
    machine: String,
    /// Bytes read past the end of the previous reply.
    pending: Vec<u8>,
    /// A flow-controlled data port, which loses nothing: no probes, and a
    /// short reply is corruption, not asked for again.
    lossless: bool,
    /// Whether this shell has [`functions`] (a new shell, after a boot or
    /// on a new port, gets them with its first command).
    defined: bool,
    /// Time allowed beyond a command's own timeout before the host gives up.
    pub host_grace: Duration,
}

impl Shell {
    /// Wraps a connected stream; `wait_for_banner` still has to be called
    /// when the shell may not be up yet.
    pub fn new(stream: UnixStream, machine: &str) -> io::Result<Self> {
        stream.set_read_timeout(Some(POLL))?;
        stream.set_write_timeout(Some(POLL))?;
        Ok(Shell {
            stream,
            machine: machine.to_string(),
            pending: Vec::new(),
            lossless: false,
            defined: false,
            host_grace: HOST_GRACE,
        })
    }

    /// Wraps a connected data port (see [`data_shell_command`]), whose shell
    /// is started by then.
    pub fn data_port(stream: UnixStream, machine: &str) -> io::Result<Self> {
        Ok(Shell { lossless: true, ..Shell::new(stream, machine)? })
    }

    /// `line`, after [`functions`] when the shell does not have them yet.
    fn with_functions(&mut self, line: String) -> String {
        if std::mem::replace(&mut self.defined, true) {
            return line;
        }
        functions() + &line
    }

    fn lost(&self, what: &str) -> DriverError {
        DriverError::new(Kind::Machine, format!("machine {}: {what} (QEMU exited or the guest crashed)", self.machine))
    }

    fn check(&self, alive: Alive, deadline: Option<Instant>, what: &str) -> Result<(), DriverError> {
        alive()?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(DriverError::new(Kind::Timeout, format!("machine {}: {what}", self.machine)));
        }
        Ok(())
    }

    /// Reads some bytes, waking up to check liveness and the deadline. With
    /// a `probe`, it goes to the shell after [`PROBE_AFTER`] of silence, then
    /// after twice as long each time.
    fn read_some(
        &mut self,
        buf: &mut [u8],
        alive: Alive,
        deadline: Option<Instant>,
        what: &str,
        probe: Option<&str>,
    ) -> Result<usize, DriverError> {
        let mut quiet_since = Instant::now();
        let mut quiet_for = PROBE_AFTER;
        loop {
            match self.stream.read(buf) {
                Ok(0) => return Err(self.lost("the backdoor connection closed")),
                Ok(n) => return Ok(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) =>
                {
                    self.check(alive, deadline, what)?;
                    if let Some(probe) = probe.filter(|_| quiet_since.elapsed() >= quiet_for) {
                        PROBED.fetch_add(1, Ordering::Relaxed);
                        self.write_all(probe.as_bytes(), alive, deadline, what)?;
                        quiet_since = Instant::now();
                        quiet_for = (quiet_for * 2).min(PROBE_MAX);
                    }
                }
                Err(e) if is_disconnect(&e) => return Err(self.lost("the backdoor connection broke")),
                Err(e) => {
                    return Err(DriverError::harness(format!("machine {}: reading the backdoor: {e}", self.machine)))
                }
            }
        }
    }

    fn write_all(
        &mut self,
        mut data: &[u8],
        alive: Alive,
        deadline: Option<Instant>,
        what: &str,
    ) -> Result<(), DriverError> {
        while !data.is_empty() {
            match self.stream.write(data) {
                Ok(0) => return Err(self.lost("the backdoor connection closed")),
                Ok(n) => data = &data[n..],
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) =>
                {
                    self.check(alive, deadline, what)?
                }
                Err(e) if is_disconnect(&e) => return Err(self.lost("the backdoor connection broke")),
                Err(e) => {
                    return Err(DriverError::harness(format!("machine {}: writing the backdoor: {e}", self.machine)))
                }
            }
        }
        Ok(())
    }

    /// Waits until the guest announces its shell; `None`: no deadline.
    pub fn wait_for_banner(&mut self, alive: Alive, deadline: Option<Instant>) -> Result<(), DriverError> {
        let mut scanner = BannerScanner::default();
        let mut buf = [0u8; 4096];
        loop {
            let n = self.read_some(&mut buf, alive, deadline, "the backdoor shell did not come up in time", None)?;
            if let Some(rest) = scanner.feed(&buf[..n]) {
                self.pending = rest;
                return Ok(());
            }
        }
    }

    /// Sends a line to the shell without waiting for anything (`poweroff`).
    pub fn send_raw(&mut self, text: &str, alive: Alive) -> Result<(), DriverError> {
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        self.write_all(text.as_bytes(), alive, deadline, "the guest shell does not take input")
    }

    /// Runs a command; `timeout` is enforced in the guest, and by the host a
    /// little later in case the guest cannot report.
    pub fn run(&mut self, command: &str, timeout: Option<Duration>, alive: Alive) -> Result<Output, DriverError> {
        let token = new_token();
        let secs = timeout.map(|t| t.as_secs().max(1));
        let text = script(&token, command, secs).map_err(DriverError::request)?;
        let text = self.with_functions(text);
        let started = Instant::now();
        let mut reply = self.exchange(&token, &[text.as_bytes()], timeout, alive)?;
        // QEMU drops what a guest writes to a virtio console while the host
        // end is full: the guest keeps the command's output until the next
        // command, so a reply that lost bytes is asked for again, not rerun.
        let attempts = if self.lossless { 1 } else { REPLY_ATTEMPTS };
        for _ in 1..attempts {
            if reply.is_ok() {
                break;
            }
            let token = new_token();
            REASKED.fetch_add(1, Ordering::Relaxed);
            reply = self.exchange(&token, &[resend_script(&token).as_bytes()], timeout, alive)?;
        }
        let mut output = reply.map_err(|why| self.garbled(&why))?;
        output.timed_out = secs
            .is_some_and(|s| TIMEOUT_STATUSES.contains(&output.status) && started.elapsed() >= Duration::from_secs(s));
        Ok(output)
    }

    /// Writes `data` to the guest file `path` (appending), read by `head -c`
    /// straight from the console: many times faster than a command carrying
    /// the data, which the shell reads a byte at a time. Only for a backdoor
    /// shell that reads no further than the end of its command line (bash;
    /// busybox sh reads ahead). The status of `head`.
    pub fn append_raw(&mut self, path: &str, data: &[u8], timeout: Duration, alive: Alive) -> Result<i32, DriverError> {
        let token = new_token();
        // base64: the console is a terminal, which need not pass every byte as is.
        let encoded = base64::encode_lines(data, 76);
        let text = raw_append_line(&token, path, encoded.len());
        let reply = self.exchange(&token, &[text.as_bytes(), encoded.as_bytes()], Some(timeout), alive)?;
        Ok(reply.map_err(|why| self.garbled(&why))?.status)
    }

    /// Sends the archive of `name` in the guest directory `parent` into
    /// `sink` (see [`copy_out_line`]), checking each piece's size and
    /// checksum; the reply, with `tar`'s status and messages. Only for a
    /// data port: its bytes come through as they are.
    pub fn copy_out(
        &mut self,
        parent: &str,
        name: &str,
        sink: &mut dyn Write,
        timeout: Duration,
        alive: Alive,
    ) -> Result<Output, DriverError> {
        let token = new_token();
        let (deadline, what) = self.deadline(Some(timeout));
        let lines = self.with_functions(copy_out_line(&token, parent, name));
        self.write_all(lines.as_bytes(), alive, deadline, &what)?;
        let header = format!("{token} piece ");
        let mut buf = vec![0u8; COPY_PIECE.min(1024 * 1024)];
        loop {
            let line = self.read_line(&header, alive, deadline, &what)?;
            let (size, sum) = parse_piece(&line).map_err(|why| self.garbled(&why))?;
            if size == 0 {
                break;
            }
            let mut md5 = super::md5::Md5::default();
            let mut left = size;
            while left > 0 {
                let want = left.min(buf.len());
                let n = self.read_into(&mut buf[..want], alive, deadline, &what)?;
                md5.update(&buf[..n]);
                sink.write_all(&buf[..n])
                    .map_err(|e| DriverError::harness(format!("machine {}: writing the copy: {e}", self.machine)))?;
                left -= n;
            }
            let got = md5.hex();
            if got != sum {
                return Err(self.garbled(&format!("a piece of {size} bytes has checksum {got}, the guest sent {sum}")));
            }
        }
        self.read_reply(&token, deadline, &what, alive)?.map_err(|why| self.garbled(&why))
    }

    /// Sends `size` bytes of `archive` (the archive of `name`) to be
    /// unpacked as `dest` in the guest (see [`copy_in_line`]); the reply,
    /// with the status and messages of `tar -x` and the move. The guest's
    /// checksum of what it took must be the host's.
    pub fn copy_in(
        &mut self,
        archive: &mut dyn Read,
        size: u64,
        name: &str,
        dest: &str,
        timeout: Duration,
        alive: Alive,
    ) -> Result<Output, DriverError> {
        let token = new_token();
        let (deadline, what) = self.deadline(Some(timeout));
        let lines = self.with_functions(copy_in_line(&token, size, name, dest));
        self.write_all(lines.as_bytes(), alive, deadline, &what)?;
        let ready = format!("{token} ready");
        self.read_line(&ready, alive, deadline, &what)?;
        // The checksum of each piece the guest cuts, as it cuts them.
        let mut sums = Vec::new();
        let mut md5 = super::md5::Md5::default();
        let mut buf = vec![0u8; 1024 * 1024];
        let (mut left, mut piece_left) = (size, COPY_PIECE);
        while left > 0 {
            let want = left.min(buf.len().min(piece_left) as u64) as usize;
            let n = archive
                .read(&mut buf[..want])
                .map_err(|e| DriverError::harness(format!("machine {}: reading the archive: {e}", self.machine)))?;
            if n == 0 {
                return Err(DriverError::harness(format!("machine {}: the archive ended early", self.machine)));
            }
            md5.update(&buf[..n]);
            self.write_all(&buf[..n], alive, deadline, &what)?;
            left -= n as u64;
            piece_left -= n;
            if piece_left == 0 || left == 0 {
                sums.push(std::mem::take(&mut md5).hex());
                piece_left = COPY_PIECE;
            }
        }
        let output = self.read_reply(&token, deadline, &what, alive)?.map_err(|why| self.garbled(&why))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let theirs: Vec<&str> = stdout.lines().filter_map(|l| l.split_whitespace().next()).collect();
        if output.status == 0 && theirs != sums {
            return Err(
                self.garbled(&format!("the guest took the archive's pieces with checksums {theirs:?}, not {sums:?}"))
            );
        }
        Ok(output)
    }

    /// The host's deadline for a command of `timeout`, and what it says when passed.
    fn deadline(&self, timeout: Option<Duration>) -> (Option<Instant>, String) {
        let grace = self.host_grace + timeout.unwrap_or_default() / 10;
        let what = format!("no reply from the guest {:.1}s after the command's timeout", grace.as_secs_f64());
        (timeout.map(|t| Instant::now() + t + grace), what)
    }

    /// Reads up to the next line starting with `prefix`, skipping any other
    /// (what the guest's shell prints on the port); that line, without the
    /// prefix and the newline.
    fn read_line(
        &mut self,
        prefix: &str,
        alive: Alive,
        deadline: Option<Instant>,
        what: &str,
    ) -> Result<String, DriverError> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=nl).collect();
                if let Some(rest) = line[..nl].strip_prefix(prefix.as_bytes()) {
                    return Ok(String::from_utf8_lossy(rest).into_owned());
                }
                continue;
            }
            let n = self.read_some(&mut buf, alive, deadline, what, None)?;
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads at least one byte into `buf`, what was read ahead first.
    fn read_into(
        &mut self,
        buf: &mut [u8],
        alive: Alive,
        deadline: Option<Instant>,
        what: &str,
    ) -> Result<usize, DriverError> {
        if self.pending.is_empty() {
            return self.read_some(buf, alive, deadline, what, None);
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Ok(n)
    }

    /// Sends `parts` and reads the reply marked with `token`; the host gives
    /// up a little after `timeout`. `Ok(Err(why))`: the reply came back
    /// garbled or short.
    fn exchange(
        &mut self,
        token: &str,
        parts: &[&[u8]],
        timeout: Option<Duration>,
        alive: Alive,
    ) -> Result<Result<Output, String>, DriverError> {
        let (deadline, what) = self.deadline(timeout);
        for part in parts {
            self.write_all(part, alive, deadline, &what)?;
        }
        self.read_reply(token, deadline, &what, alive)
    }

    /// Reads the reply marked with `token`.
    fn read_reply(
        &mut self,
        token: &str,
        deadline: Option<Instant>,
        what: &str,
        alive: Alive,
    ) -> Result<Result<Output, String>, DriverError> {
        let mut parser = ReplyParser::new(token);
        let probe = (!self.lossless).then(|| probe_line(token));
        let mut data = std::mem::take(&mut self.pending);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match parser.feed(&data) {
                Ok(Some((output, used))) => {
                    self.pending = data[used..].to_vec();
                    return Ok(Ok(output));
                }
                // The rest of this reply is skipped by the next one's parser: it has another token.
                Err(why) => return Ok(Err(why)),
                Ok(None) => {}
            }
            let n = self.read_some(&mut buf, alive, deadline, what, probe.as_deref())?;
            data.clear();
            data.extend_from_slice(&buf[..n]);
        }
    }

    fn garbled(&self, why: &str) -> DriverError {
        DriverError::harness(format!("machine {}: garbled reply: {why}", self.machine))
    }
}

/// Pure: the command, run by the backdoor shell, that starts a shell on the
/// virtio-serial port named `name` (its name is in `<ports>/vportNpM/name`,
/// normally under /sys/class/virtio-ports; its device is /dev/vportNpM)
/// and prints the device; status 3 and why on standard error when there is
/// no such port. The port is opened once, read and write (`<>`): the
/// guest's driver lets only one process hold it open. The shell is bash
/// when the guest has it, as for the backdoor. The host must be connected
/// to the port first: while it is not, the shell reads end of file.
pub fn data_shell_command(ports: &str, name: &str) -> String {
    format!(
        "for f in {ports}/*/name; do read -r n 2>/dev/null <\"$f\" || continue; [ \"$n\" = {name} ] || continue; \
         p=${{f%/name}}; d=/dev/${{p##*/}}; \
         [ -c \"$d\" ] || {{ echo \"$d is not a character device\" >&2; exit 3; }}; \
         s=sh; ! command -v bash >/dev/null || s=bash; \
         \"$s\" <>\"$d\" >&0 2>&0 & echo \"$d\"; exit 0; done; \
         echo \"no virtio port is named {name} in {ports}\" >&2; exit 3",
        ports = crate::shell::quote(ports),
        name = crate::shell::quote(name)
    )
}

/// Pure: the line a data port's shell runs to send the archive of `name`
/// in `parent` as raw bytes: `tar` writes into a pipe, never a file, and
/// the archive goes out in pieces of at most [`COPY_PIECE`], each after a
/// line `<token> piece <size> <md5>` (only one piece is ever kept in the
/// guest); a piece of size 0 ends it. Then the reply of a command with no
/// output, carrying `tar`'s status and error messages.
pub fn copy_out_line(token: &str, parent: &str, name: &str) -> String {
    format!("__vmlab_copy_out {token} {} {}\n", crate::shell::quote(parent), crate::shell::quote(name))
}

/// Pure: the line a data port's shell runs to take an archive of `size`
/// bytes holding `name`, and make it `dest`. Once it prints
/// `<token> ready` it reads exactly `size` bytes, whatever happens (a
/// shell must never read the rest as commands), in pieces of at most
/// [`COPY_PIECE`], each checksummed and fed to `tar -x` (only one piece is
/// ever kept in the guest); the reply's output is the pieces' `md5sum`
/// lines, its standard error what `tar`, `dd` and the move said.
pub fn copy_in_line(token: &str, size: u64, name: &str, dest: &str) -> String {
    format!("__vmlab_copy_in {token} {size} {} {}\n", crate::shell::quote(name), crate::shell::quote(dest))
}

/// Pure: a piece's size and checksum from its line (after `<token> piece `).
fn parse_piece(line: &str) -> Result<(usize, String), String> {
    match line.trim_end_matches('\r').split(' ').collect::<Vec<_>>()[..] {
        [size, sum] if sum.len() == 32 && sum.bytes().all(|b| b.is_ascii_hexdigit()) => {
            let size = size.parse().map_err(|_| format!("bad piece size in {line:?}"))?;
            if size > COPY_PIECE {
                return Err(format!("a piece of {size} bytes, over the {COPY_PIECE} asked for"));
            }
            Ok((size, sum.to_string()))
        }
        _ => Err(format!("bad piece line {line:?}")),
    }
}

/// Pure: the line the shell runs before `len` bytes of base64 follow for
/// `head`; it replies as a command with empty output does. `path` is quoted here.
pub fn raw_append_line(token: &str, path: &str, len: usize) -> String {
    format!(
        "head -c {len} | base64 -d >> {path}; printf '%s out\\n%s err\\n%s end %s\\n' {token} {token} {token} \"$?\"\n",
        path = crate::shell::quote(path)
    )
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(token: &str, out: &[u8], err: &[u8], status: i32) -> Vec<u8> {
        format!(
            "{token} out\n{}{token} err\n{}{token} end {status} {} {}\n",
            base64::encode_lines(out, 76),
            base64::encode_lines(err, 76),
            out.len(),
            err.len(),
        )
        .into_bytes()
    }

    #[test]
    fn a_reply_that_lost_lines_is_an_error_and_can_be_asked_for_again() {
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let whole = String::from_utf8(reply("T1", &data, b"", 0)).unwrap();
        let lost: String =
            whole.lines().filter(|l| *l != whole.lines().nth(2).unwrap()).map(|l| format!("{l}\n")).collect();
        let mut p = ReplyParser::new("T1");
        let e = p.feed(lost.as_bytes()).unwrap_err();
        assert_eq!(e, "243 of 300 bytes of output and 0 of 0 of standard error came back");
        // Without sizes (a guest-side line of vmlab's own), nothing is checked.
        assert_eq!(parse_in_pieces(b"T1 out\nT1 err\nT1 end 3\n", 4).0.status, 3);
        // Asked for again, the reply is sent from the files the command left.
        assert_eq!(resend_script("T2"), "__vmlab_reply T2\n");
        assert!(
            functions().contains("printf '%s end %s %s %s\\n' \"$1\" \"$__vmlab_s\" \"$__vmlab_so\" \"$__vmlab_se\"")
        );
    }

    fn parse_in_pieces(data: &[u8], piece: usize) -> (Output, usize) {
        let mut p = ReplyParser::new("T1");
        let mut offset = 0;
        for chunk in data.chunks(piece) {
            if let Some((out, used)) = p.feed(chunk).unwrap() {
                return (out, offset + used);
            }
            offset += chunk.len();
        }
        panic!("no reply in {:?}", String::from_utf8_lossy(data));
    }

    #[test]
    fn script_carries_the_command_quoted_in_one_short_line() {
        let cases = [
            ("true", None, "__vmlab_r T1 - true\n"),
            ("echo '$HOME' \"`x`\"\nfalse", Some(5), "__vmlab_r T1 5 'echo '\\''$HOME'\\'' \"`x`\"\nfalse'\n"),
            // What once ended a heredoc is just text.
            ("cat <<x\nT1_EOF\nx", None, "__vmlab_r T1 - 'cat <<x\nT1_EOF\nx'\n"),
        ];
        for (command, timeout, line) in cases {
            let s = script("T1", command, timeout).unwrap();
            assert_eq!(s, line);
            // Markers are only ever printed, never sent, so an echoing console cannot fake one.
            assert!(!s.contains("T1 out") && !s.contains("T1 end"), "{s}");
        }
        // A command without a timeout is a fork of the shell, no program and
        // no file; rm runs on every hundredth command.
        let f = functions();
        assert!(f.contains("(set -eu --; $__vmlab_pf; eval \"$__vmlab_c\") </dev/null"), "{f}");
        assert!(f.contains("case $__vmlab_n in *00) rm -f"), "{f}");
    }

    #[test]
    fn raw_appends_read_exactly_the_data_and_reply_like_a_command() {
        let line = raw_append_line("T1", "/tmp/a b", 1000);
        assert_eq!(
            line,
            "head -c 1000 | base64 -d >> '/tmp/a b'; printf '%s out\\n%s err\\n%s end %s\\n' T1 T1 T1 \"$?\"\n"
        );
        assert!(!line.contains("T1 out"), "the marker is printed, never sent");
        let (out, _) = parse_in_pieces(b"T1 out\nT1 err\nT1 end 0\n", 5);
        assert_eq!((out.status, out.stdout.len()), (0, 0));
    }

    /// The port is found by its name; a port named `null` stands for a
    /// real one, its device being /dev/null (the shell started on it reads
    /// end of file and exits).
    #[test]
    fn the_data_shell_is_started_on_the_port_found_by_name() {
        /// (ports and their names, status, standard output, standard error)
        type Case = (&'static [(&'static str, &'static str)], i32, &'static str, &'static str);
        let cases: [Case; 4] = [
            (&[("vport0p0", "other"), ("null", "vmlab.data")], 0, "/dev/null\n", ""),
            (&[("vport0p0", "other")], 3, "", "no virtio port is named vmlab.data in "),
            (&[], 3, "", "no virtio port is named vmlab.data in "),
            (&[("vport9p9", "vmlab.data")], 3, "", "/dev/vport9p9 is not a character device"),
        ];
        for (ports, status, stdout, stderr) in cases {
            let dir = tempfile::tempdir().unwrap();
            for (port, name) in ports {
                std::fs::create_dir(dir.path().join(port)).unwrap();
                std::fs::write(dir.path().join(port).join("name"), format!("{name}\n")).unwrap();
            }
            let command = data_shell_command(&dir.path().display().to_string(), "vmlab.data");
            let out = std::process::Command::new("busybox").args(["sh", "-euc", &command]).output().unwrap();
            let got = (out.status.code(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert_eq!((got.0, got.1.as_ref()), (Some(status), stdout), "{ports:?}: {got:?}");
            assert!(got.2.starts_with(stderr), "{ports:?}: {got:?}");
        }
    }

    #[test]
    fn script_refuses_what_it_cannot_carry() {
        assert!(script("T1", "a\0b", None).is_err());
    }

    #[test]
    fn replies_parse_whatever_the_chunking() {
        let binary: Vec<u8> = (0..=255u8).rev().cycle().take(5000).collect();
        let cases: [(&[u8], &[u8], i32); 4] =
            [(b"", b"", 0), (b"hello\n", b"oops\n", 1), (&binary, b"", 255), (b"no newline", &binary, 7)];
        for (out, err, status) in cases {
            let mut data = b"echoed junk\r\nT0 out\nold\n".to_vec();
            let start = data.len();
            data.extend(reply("T1", out, err, status));
            let end = data.len();
            data.extend(b"next");
            for piece in [1, 3, 76, 77, 4096, data.len()] {
                let (o, used) = parse_in_pieces(&data, piece);
                assert_eq!((o.stdout.as_slice(), o.stderr.as_slice(), o.status), (out, err, status), "piece {piece}");
                assert_eq!(used, end, "consumed up to the end marker (reply started at {start})");
            }
        }
    }

    #[test]
    fn unwrapped_and_crlf_base64_is_accepted() {
        let data = b"T1 out\r\naGVsbG8K\r\nT1 err\r\nT1 end 0\r\n";
        assert_eq!(parse_in_pieces(data, 2).0.stdout, b"hello\n");
    }

    #[test]
    fn guest_side_failures_are_errors() {
        let mut p = ReplyParser::new("T1");
        assert!(p.feed(b"T1 fail cannot create a temporary directory in /tmp\n").unwrap_err().contains("temporary"));
        let mut p = ReplyParser::new("T1");
        assert!(p.feed(b"T1 out\n!!!!\n").is_err());
        let mut p = ReplyParser::new("T1");
        assert!(p.feed(b"T1 out\nT1 err\nT1 end x\n").is_err());
    }

    /// Reads what the host sends up to the end of the line that runs a
    /// command or asks for its reply again; the token it gives.
    fn token_of(guest: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut byte = [0u8];
        loop {
            guest.read_exact(&mut byte).unwrap();
            if byte[0] != b'\n' {
                line.push(byte[0]);
                continue;
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            let words: Vec<&str> = text.split(' ').collect();
            if matches!(words[0], "__vmlab_r" | "__vmlab_reply") {
                return words[1].to_string();
            }
            line.clear();
        }
    }

    /// The end line carries the sizes on one line, whatever `wc` prints.
    #[test]
    fn the_end_line_carries_both_sizes() {
        let text =
            functions() + &script("T1", "printf abc; printf de >&2; exit 4", None).unwrap() + "echo \"$__vmlab_d\"\n";
        let out = std::process::Command::new("sh").arg("-c").arg(&text).output().unwrap();
        let (reply, used) = parse_in_pieces(&out.stdout, 7);
        assert_eq!((reply.status, reply.stdout, reply.stderr), (4, b"abc".to_vec(), b"de".to_vec()));
        let text = String::from_utf8_lossy(&out.stdout[..used]).into_owned();
        assert!(text.ends_with("T1 end 4 3 2\n"), "{text}");
        // Clean up the directory a next command would have emptied.
        let dir = String::from_utf8_lossy(&out.stdout[used..]).trim().to_string();
        assert!(dir.starts_with("/tmp/vmlab."), "{dir}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_short_reply_is_asked_for_again_without_rerunning_the_command() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let mut shell = Shell::new(host, "server").unwrap();
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let fake = {
            let data = data.clone();
            std::thread::spawn(move || {
                let first = token_of(&mut guest);
                let whole = String::from_utf8(reply(&first, &data, b"", 0)).unwrap();
                let second_line = whole.lines().nth(2).unwrap().to_string();
                let lost: String = whole.lines().filter(|l| *l != second_line).map(|l| format!("{l}\n")).collect();
                guest.write_all(lost.as_bytes()).unwrap();
                let again = token_of(&mut guest);
                assert_ne!(again, first);
                guest.write_all(&reply(&again, &data, b"", 0)).unwrap();
                guest
            })
        };
        let out = shell.run("produce", Some(Duration::from_secs(60)), &mut || Ok(())).unwrap();
        assert_eq!((out.status, out.stdout), (0, data));
        drop(fake.join().unwrap());
    }

    /// The reply's end line is lost: without the probe, the host would wait
    /// for the command's whole timeout (here an hour).
    #[test]
    fn a_lost_end_is_found_by_the_probe_and_the_reply_asked_for_again() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let mut shell = Shell::new(host, "server").unwrap();
        let fake = std::thread::spawn(move || {
            let first = token_of(&mut guest);
            let whole = String::from_utf8(reply(&first, b"hello\n", b"", 0)).unwrap();
            let without_end: String =
                whole.lines().filter(|l| !l.contains(" end ")).map(|l| format!("{l}\n")).collect();
            guest.write_all(without_end.as_bytes()).unwrap();
            // What comes next is the probe, once the host has heard nothing for a while.
            let mut probe = vec![0u8; probe_line(&first).len()];
            guest.read_exact(&mut probe).unwrap();
            assert_eq!(String::from_utf8(probe).unwrap(), probe_line(&first));
            guest.write_all(format!("{first} probe\n").as_bytes()).unwrap();
            let again = token_of(&mut guest);
            guest.write_all(&reply(&again, b"hello\n", b"", 0)).unwrap();
            guest
        });
        let started = Instant::now();
        let out = shell.run("echo hello", Some(Duration::from_secs(3600)), &mut || Ok(())).unwrap();
        assert_eq!((out.status, out.stdout), (0, b"hello\n".to_vec()));
        assert!(started.elapsed() < Duration::from_secs(60), "waited {:?}", started.elapsed());
        drop(fake.join().unwrap());
        let mut p = ReplyParser::new("T1");
        assert_eq!(p.feed(b"T1 out\nT1 err\nT1 probe\n").unwrap_err(), "the reply's end was lost on the console");
    }

    #[test]
    fn banner_is_found_across_pieces() {
        let data = format!("boot noise\r\n{BANNER}\r\nrest");
        for piece in [1, 5, data.len()] {
            let mut s = BannerScanner::default();
            let found: Vec<Vec<u8>> = data.as_bytes().chunks(piece).filter_map(|c| s.feed(c)).collect();
            assert!(!found.is_empty(), "piece {piece}");
            assert!(b"\r\nrest".starts_with(&found[0]));
        }
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(new_token(), new_token());
    }
}

/// The whole command path against real local shells (busybox sh and bash),
/// wired like the guest's console: stdin and stdout on one stream, no echo.
#[cfg(test)]
mod local_shell_tests {
    use super::*;
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
        l.shell.run(cmd, Some(Duration::from_secs(60)), &mut ok()).unwrap()
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
                assert_eq!(
                    String::from_utf8_lossy(&run(&mut l, &format!("echo fast{i}")).stdout),
                    format!("fast{i}\n")
                );
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
            let out =
                l.shell.copy_in(&mut &archive[..], archive.len() as u64, "src", &dest, minute, &mut ok()).unwrap();
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
            let o = l.shell.run("echo before; sleep 30", Some(Duration::from_secs(1)), &mut ok()).unwrap();
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
        let e = l.shell.run("true", Some(Duration::from_secs(1)), &mut ok()).unwrap_err();
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
            let e = l.shell.run("sleep 30", None, &mut ok()).unwrap_err();
            killer.join().unwrap();
            assert_eq!(e.kind, Kind::Machine, "{e}");
            assert!(e.message.contains("machine local"), "{e}");
            let e = l.shell.run("true", None, &mut ok()).unwrap_err();
            assert_eq!(e.kind, Kind::Machine, "{e}");
        }
    }

    #[test]
    fn liveness_is_checked_while_waiting() {
        let mut l = spawn(false, "");
        let e = l
            .shell
            .run("sleep 30", None, &mut || {
                Err(DriverError::new(Kind::Machine, "machine local: QEMU exited with status 1"))
            })
            .unwrap_err();
        assert!(e.message.contains("QEMU exited"));
    }

    #[test]
    fn the_banner_is_awaited_and_what_follows_is_kept() {
        let mut l = spawn(true, &format!("sleep 0.2; echo boot noise; printf '%s\\n' '{BANNER}'; "));
        l.shell.wait_for_banner(&mut ok(), Some(Instant::now() + Duration::from_secs(30))).unwrap();
        assert_eq!(run(&mut l, "echo up").stdout, b"up\n");
    }
}
