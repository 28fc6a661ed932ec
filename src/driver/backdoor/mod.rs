//! The guest side of a command, over the backdoor contract: a root shell
//! (busybox sh, bash, or a stock NixOS test VM's bash) reading commands from
//! the virtio console and writing to it, announced by [`BANNER`].
//!
//! The framing is pure (framing.rs): [`functions`] is the shell text a shell is given
//! once, [`script`] the line sent for one command, and [`ReplyParser`]
//! takes the console's bytes back, in pieces of any size. [`Shell`] is the
//! thin I/O wrapper over a stream (the machine's `shell.sock` or
//! `data.sock`, or a socketpair to a local shell in the tests).

mod framing;
#[cfg(test)]
mod local_tests;
#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::base64;
use super::{DriverError, Kind};
use framing::*;
pub use framing::{data_shell_command, stop_command, Output, Signal};

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

/// How long a command stopped by the host with SIGTERM has to reply before
/// it is sent SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

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

/// Checked while waiting: an error means the machine is gone (QEMU exited).
pub type Alive<'a> = &'a mut dyn FnMut() -> Result<(), DriverError>;

/// Stops a command of this shell that ran past its timeout, from outside
/// the shell (see [`stop_command`]).
pub type Stop<'a> = &'a mut dyn FnMut(Signal, Alive) -> Result<(), DriverError>;

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
        functions(self.lossless) + &line
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
    /// little later in case the guest cannot report. With `stop`, the host
    /// enforces it instead: the command is sent as an untimed one, which
    /// starts no program in the guest where `timeout` starts two.
    pub fn run(
        &mut self,
        command: &str,
        timeout: Option<Duration>,
        alive: Alive,
        stop: Option<Stop>,
    ) -> Result<Output, DriverError> {
        let token = new_token();
        let timeout = timeout.map(|t| Duration::from_secs(t.as_secs().max(1)));
        let stop = stop.filter(|_| timeout.is_some());
        let guest_timeout = timeout.filter(|_| stop.is_none());
        let text = script(&token, command, guest_timeout.map(|t| t.as_secs())).map_err(DriverError::request)?;
        let text = self.with_functions(text);
        if let (Some(timeout), Some(stop)) = (timeout, stop) {
            return self.run_stopped(&token, &text, timeout, stop, alive);
        }
        let started = Instant::now();
        // QEMU drops what a guest writes to a virtio console while the host
        // end is full: the guest keeps the command's output until the next
        // command, so a reply that lost bytes is asked for again, not rerun.
        let reasks = if self.lossless { 0 } else { REPLY_ATTEMPTS - 1 };
        let mut output = self.exchange(&token, &[text.as_bytes()], timeout, reasks, alive)?;
        output.timed_out = timeout.is_some_and(|t| TIMEOUT_STATUSES.contains(&output.status) && started.elapsed() >= t);
        Ok(output)
    }

    /// Sends `text`, the command marked `token`, and reads its reply; at
    /// `timeout`, `stop` sends the command SIGTERM, then SIGKILL after
    /// [`TERM_GRACE`], and the reply of the stopped command is read until
    /// the host's usual grace has passed.
    fn run_stopped(
        &mut self,
        token: &str,
        text: &str,
        timeout: Duration,
        stop: Stop,
        alive: Alive,
    ) -> Result<Output, DriverError> {
        let (deadline, what) = self.deadline(Some(timeout));
        let started = Instant::now();
        self.write_all(text.as_bytes(), alive, deadline, &what)?;
        let mut parser = ReplyParser::new(token, self.lossless);
        let mut steps = [(Signal::Term, TERM_GRACE), (Signal::Kill, self.grace(Some(timeout)))].into_iter();
        let mut wait = started + timeout;
        let (mut stopped, mut reasked) = (false, false);
        loop {
            match self.parse(&mut parser, alive, Some(wait), &what, None) {
                Ok(Ok(mut output)) => {
                    // A command that ended as the signal was sent was not stopped by it.
                    output.timed_out = stopped && TIMEOUT_STATUSES.contains(&output.status);
                    return Ok(output);
                }
                // A command that ended as its timeout passed may have been
                // replying: the signal then cut the program sending its
                // output, whose files the guest still has.
                Ok(Err(_)) if stopped && !reasked => {
                    reasked = true;
                    wait = Instant::now() + self.grace(Some(timeout));
                    parser = self.reask(alive, Some(wait), &what)?;
                }
                Ok(Err(why)) => return Err(self.garbled(&why)),
                Err(e) if e.kind == Kind::Timeout => {
                    // Once the reply is asked for again, the command is long over.
                    let Some((signal, grace)) = steps.next().filter(|_| !reasked) else { return Err(e) };
                    // Once its reply has started the command is over, and
                    // what runs is the shell sending the reply.
                    if !parser.started() {
                        stop(signal, alive)?;
                        stopped = true;
                    }
                    wait = Instant::now() + grace;
                }
                Err(e) => return Err(e),
            }
        }
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
        Ok(self.exchange(&token, &[text.as_bytes(), encoded.as_bytes()], Some(timeout), 0, alive)?.status)
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
        let header = format!("{token} ");
        let mut buf = vec![0u8; COPY_PIECE.min(1024 * 1024)];
        loop {
            let line = self.read_line(&header, alive, deadline, &what)?;
            if let Some(why) = line.strip_prefix("fail ") {
                return self.failed_copy(why, &token, timeout, deadline, alive);
            }
            let line = line.strip_prefix("piece ").ok_or_else(|| self.garbled(&format!("unexpected line {line:?}")))?;
            let (size, sum) = parse_piece(line).map_err(|why| self.garbled(&why))?;
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
        self.read_reply(&token, Some(timeout), deadline, 0, alive)
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
        let line = self.read_line(&format!("{token} "), alive, deadline, &what)?;
        if let Some(why) = line.strip_prefix("fail ") {
            return self.failed_copy(why, &token, timeout, deadline, alive);
        }
        if line.trim_end() != "ready" {
            return Err(self.garbled(&format!("unexpected line {line:?}")));
        }
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
        let line = self.read_line(&format!("{token} "), alive, deadline, &what)?;
        if let Some(why) = line.strip_prefix("fail ") {
            return self.failed_copy(why, &token, timeout, deadline, alive);
        }
        let output = self.read_reply(&token, Some(timeout), deadline, 0, alive)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let theirs: Vec<&str> = stdout.lines().filter_map(|l| l.split_whitespace().next()).collect();
        if output.status == 0 && theirs != sums {
            return Err(
                self.garbled(&format!("the guest took the archive's pieces with checksums {theirs:?}, not {sums:?}"))
            );
        }
        Ok(output)
    }

    /// The rest of a copy the guest gave up on, saying `why` on a line of
    /// its own (`<token> fail <why>`), which needs no room in its /tmp when
    /// that is what is full: the reply, failed, `why` last in its standard
    /// error.
    fn failed_copy(
        &mut self,
        why: &str,
        token: &str,
        timeout: Duration,
        deadline: Option<Instant>,
        alive: Alive,
    ) -> Result<Output, DriverError> {
        let mut out = self.read_reply(token, Some(timeout), deadline, 0, alive)?;
        if !out.stderr.is_empty() && !out.stderr.ends_with(b"\n") {
            out.stderr.push(b'\n');
        }
        out.stderr.extend_from_slice(why.trim_end().as_bytes());
        if out.status == 0 {
            out.status = 1;
        }
        Ok(out)
    }

    /// Time allowed beyond `timeout` for the guest to reply.
    fn grace(&self, timeout: Option<Duration>) -> Duration {
        self.host_grace + timeout.unwrap_or_default() / 10
    }

    /// The host's deadline for a command of `timeout`, and what it says when passed.
    fn deadline(&self, timeout: Option<Duration>) -> (Option<Instant>, String) {
        let grace = self.grace(timeout);
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
    /// up a little after `timeout`. See [`Shell::read_reply`] for `reasks`.
    fn exchange(
        &mut self,
        token: &str,
        parts: &[&[u8]],
        timeout: Option<Duration>,
        reasks: usize,
        alive: Alive,
    ) -> Result<Output, DriverError> {
        let (deadline, what) = self.deadline(timeout);
        for part in parts {
            self.write_all(part, alive, deadline, &what)?;
        }
        self.read_reply(token, timeout, deadline, reasks, alive)
    }

    /// Asks for the previous command's reply again under a new token (its
    /// files stay in the guest until the next command): the parser for it.
    fn reask(&mut self, alive: Alive, deadline: Option<Instant>, what: &str) -> Result<ReplyParser, DriverError> {
        let token = new_token();
        REASKED.fetch_add(1, Ordering::Relaxed);
        self.write_all(resend_script(&token).as_bytes(), alive, deadline, what)?;
        Ok(ReplyParser::new(&token, self.lossless))
    }

    /// Reads the reply marked with `token` by `deadline`, the host's for a
    /// command of `timeout`. A reply that comes back garbled or short is
    /// asked for again, up to `reasks` times, each with a new token and a
    /// new deadline; then it is an error.
    fn read_reply(
        &mut self,
        token: &str,
        timeout: Option<Duration>,
        deadline: Option<Instant>,
        reasks: usize,
        alive: Alive,
    ) -> Result<Output, DriverError> {
        let (mut deadline, mut reasks) = (deadline, reasks);
        let what = self.deadline(timeout).1;
        let mut parser = ReplyParser::new(token, self.lossless);
        loop {
            let probe = (!self.lossless).then(|| probe_line(parser.token()));
            match self.parse(&mut parser, alive, deadline, &what, probe.as_deref())? {
                Ok(output) => return Ok(output),
                Err(why) if reasks == 0 => return Err(self.garbled(&why)),
                // The rest of this reply is skipped by the next one's parser: it has another token.
                Err(_) => {
                    reasks -= 1;
                    deadline = self.deadline(timeout).0;
                    parser = self.reask(alive, deadline, &what)?;
                }
            }
        }
    }

    /// Feeds `parser` what was read ahead, then what comes, until it has a
    /// reply or finds it garbled (the inner error, why). Stopped by
    /// `deadline`, it can be called again to go on where it was.
    fn parse(
        &mut self,
        parser: &mut ReplyParser,
        alive: Alive,
        deadline: Option<Instant>,
        what: &str,
        probe: Option<&str>,
    ) -> Result<Result<Output, String>, DriverError> {
        let mut data = std::mem::take(&mut self.pending);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match parser.feed(&data) {
                Ok(Some((output, used))) => {
                    self.pending = data[used..].to_vec();
                    return Ok(Ok(output));
                }
                Err(why) => return Ok(Err(why)),
                Ok(None) => {}
            }
            let n = self.read_some(&mut buf, alive, deadline, what, probe)?;
            data.clear();
            data.extend_from_slice(&buf[..n]);
        }
    }

    fn garbled(&self, why: &str) -> DriverError {
        DriverError::harness(format!("machine {}: garbled reply: {why}", self.machine))
    }
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
