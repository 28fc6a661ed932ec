//! The framing of the backdoor, pure: what is sent for a command or a copy,
//! and the parsing of what comes back, in pieces of any size.
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

use std::time::Instant;

use super::base64;

use crate::layout::BANNER;

/// Pure: the probe of a command marked `token`: it prints `<token> probe`
/// once the shell is free again. Seen before the reply's end, it means the
/// end was lost (the command is over): the reply is asked for again rather
/// than waited for until the timeout. Seen after it, it is noise to the
/// next reply's parser (another token).
pub fn probe_line(token: &str) -> String {
    format!("printf '%s probe\\n' {token}\n")
}

/// A signal the host stops a command of the data port with: TERM first,
/// as `timeout` does, then KILL for a command that ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

/// Pure: the command, run by the backdoor shell, that sends `signal` to
/// every descendant of the data port's shell `shell_pid` (the subshell
/// running its command and what that started), never to the shell itself,
/// which then replies with the status the subshell ended with. Only the
/// shell and /proc are used (no `pkill`, no `ps`), so it works on any
/// guest. Each process found is stopped (SIGSTOP) before its children are
/// looked for again, until a walk finds none new, so that no process can
/// fork one that is missed; the signal is sent, then SIGCONT so that a
/// stopped process takes it. `PPid:` is read from `status`, whose lines
/// cannot be fooled by a program's name (`stat`'s may hold spaces and
/// parentheses). A process may end at any point of this: it only drops out.
pub fn stop_command(shell_pid: u32, signal: Signal) -> String {
    let signal = match signal {
        Signal::Term => "TERM",
        Signal::Kill => "KILL",
    };
    format!(
        "t=' {shell_pid} ' g=1; while [ $g = 1 ]; do g=0; for f in /proc/[0-9]*/status; do \
         p=${{f#/proc/}} q=; p=${{p%/status}}; case $t in *\" $p \"*) continue;; esac; \
         {{ while read -r k v; do [ \"$k\" != PPid: ] || {{ q=$v; break; }}; done <\"$f\"; }} 2>/dev/null || continue; \
         case $t in *\" $q \"*) t=\"$t$p \" g=1; kill -STOP \"$p\" 2>/dev/null || :;; esac; done; done; \
         set -- ${{t# {shell_pid} }}; [ $# = 0 ] || {{ kill -{signal} \"$@\"; kill -CONT \"$@\"; }} 2>/dev/null || :"
    )
}

/// Exit statuses `timeout` gives a command it stopped: coreutils 124,
/// busybox 128+SIGTERM, and 128+SIGKILL after `-k`.
pub(super) const TIMEOUT_STATUSES: [i32; 3] = [124, 143, 137];

/// One finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The command was stopped at its timeout: by the guest's `timeout`, or
    /// by the host on a data port (see [`stop_command`]).
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

pub(super) const COPY_PIECE: usize = COPY_PIECE_MIB << 20;

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
/// - The sizes of the streams, once the command has ended, are the offsets
///   of the output files the shell holds open on fds 3 and 4, read from
///   /proc/self/fdinfo by a builtin: `stat`, a program, costs milliseconds
///   under emulation. It is left to `__vmlab_measure`, for copies, for a
///   guest whose /proc cannot be read, and for files with bytes past those
///   offsets: written through a reopened /dev/stdout or /dev/stderr, which
///   moves no offset of the shell's, or by a process still writing.
/// - `__vmlab_nodir TOKEN`: what every function says when it cannot make
///   its temporary directory: a `fail` line, then a failed empty reply, so
///   that a host waiting for either is answered.
/// - The functions end by forgetting the session's directory, so that a
///   shell given them again (restored from a snapshot made by an older
///   vmlab) settles everything anew.
/// - `__vmlab_reply TOKEN` sends the streams base64-encoded between marker
///   lines, and the end line with the status and sizes, by which the host
///   sees a reply that lost bytes on the way (the console cuts each stream
///   at its size, as a background process may still be writing; a data
///   port sends it whole and the host cuts). Run again with a new token,
///   it sends the same reply again.
/// - `__vmlab_copy_out TOKEN PARENT NAME` and `__vmlab_copy_in TOKEN SIZE
///   NAME DEST`: the copies of a data port, raw bytes in pieces of
///   [`COPY_PIECE`] (see [`Shell::copy_out`] and [`Shell::copy_in`]). `dd`
///   moves the bytes: it reads no further than it is asked (`head -c` may
///   read ahead, and busybox's reads a byte at a time), and each piece is
///   staged in a file, which `md5sum` reads twice as fast as a pipe under
///   TCG; busybox's `wc` and `tee` are as slow, so `stat` takes the sizes.
pub fn functions(lossless: bool) -> String {
    // Over the console the reply is cut at the sizes measured, so that a
    // short one shows it lost bytes. A data port loses none, and saves a
    // program per stream by sending the whole file, which the host cuts;
    // but not when a process was still writing to it as the command ended
    // (`__vmlab_w` empty): it could keep `base64` from ever reaching its end.
    let cut = "dd if=\"$1\" bs=1048576 count=\"$2\" iflag=count_bytes status=none | base64";
    let cut =
        if lossless { format!("if [ -n \"$__vmlab_w\" ]; then base64 <\"$1\"; else {cut}; fi") } else { cut.into() };
    format!(
        "__vmlab_setup() {{ [ ! -d \"${{__vmlab_d:-}}\" ] || return 0; \
         __vmlab_d=$(mktemp -d \"${{TMPDIR:-/tmp}}/vmlab.XXXXXX\") || {{ __vmlab_d=/dev/null/vmlab; return 1; }}; \
         __vmlab_n=0; __vmlab_o=/dev/null; __vmlab_e=/dev/null; __vmlab_so=0; __vmlab_se=0; \
         __vmlab_pf=; ! (set -o pipefail) 2>/dev/null || __vmlab_pf='-o pipefail'; \
         __vmlab_sh=sh; [ -z \"${{BASH_VERSION:-}}\" ] || __vmlab_sh=bash; }}\n\
         __vmlab_nodir() {{ printf '%s fail %s\\n%s out\\n%s err\\n%s end 1 0 0\\n' \"$1\" \
         'cannot create a temporary directory in /tmp' \"$1\" \"$1\" \"$1\"; }}\n\
         __vmlab_r() {{ [ -d \"${{__vmlab_d:-}}\" ] || __vmlab_setup || {{ __vmlab_nodir \"$1\"; return; }}; \
         [ \"$__vmlab_so$__vmlab_se\" = 00 ] || {{ :; }} 2>/dev/null >\"$__vmlab_o\" >\"$__vmlab_e\"; \
         __vmlab_n=$((__vmlab_n+1)) __vmlab_c=$3 __vmlab_s= __vmlab_so=0 __vmlab_se=0 __vmlab_w=; \
         __vmlab_o=$__vmlab_d/o$__vmlab_n __vmlab_e=$__vmlab_d/e$__vmlab_n; \
         case $__vmlab_n in *00) rm -f \"$__vmlab_d\"/[oe]*;; esac; \
         {{ if [ \"$2\" = - ]; then (set -eu $__vmlab_pf --; eval \"$__vmlab_c\") </dev/null >&3 2>&4 3>&- 4>&-; \
         else printf 'set -eu %s\\n%s\\n' \"$__vmlab_pf\" \"$__vmlab_c\" >\"$__vmlab_d/c\" && \
         timeout \"$2\" \"$__vmlab_sh\" \"$__vmlab_d/c\" </dev/null >&3 2>&4 3>&- 4>&-; fi; __vmlab_s=$?; \
         if [ -s \"$__vmlab_o\" ] || [ -s \"$__vmlab_e\" ]; then \
         read -r __vmlab_p __vmlab_so </proc/self/fdinfo/3 && read -r __vmlab_p __vmlab_se </proc/self/fdinfo/4 \
         && ! IFS= read -r __vmlab_x <&3 && [ -z \"$__vmlab_x\" ] \
         && ! IFS= read -r __vmlab_x <&4 && [ -z \"$__vmlab_x\" ] && __vmlab_w=1 || __vmlab_measure; fi; }} 3<>\"$__vmlab_o\" 4<>\"$__vmlab_e\"; \
         [ -n \"$__vmlab_s\" ] || {{ printf '%s fail %s\\n' \"$1\" \"cannot make output files in $__vmlab_d\"; return; }}; \
         __vmlab_reply \"$1\"; }}\n\
         __vmlab_measure() {{ __vmlab_so=0; __vmlab_se=0; [ -s \"$__vmlab_o\" ] || [ -s \"$__vmlab_e\" ] || return 0; \
         set -- $(stat -c %s \"$__vmlab_o\" \"$__vmlab_e\"); __vmlab_so=$1; __vmlab_se=$2; }}\n\
         __vmlab_reply() {{ if [ \"$__vmlab_so$__vmlab_se\" = 00 ]; then \
         printf '%s out\\n%s err\\n%s end %s 0 0\\n' \"$1\" \"$1\" \"$1\" \"$__vmlab_s\"; return; fi; \
         printf '%s out\\n' \"$1\"; [ \"$__vmlab_so\" = 0 ] || __vmlab_cut \"$__vmlab_o\" \"$__vmlab_so\"; \
         printf '%s err\\n' \"$1\"; [ \"$__vmlab_se\" = 0 ] || __vmlab_cut \"$__vmlab_e\" \"$__vmlab_se\"; \
         printf '%s end %s %s %s\\n' \"$1\" \"$__vmlab_s\" \"$__vmlab_so\" \"$__vmlab_se\"; }}\n\
         __vmlab_cut() {{ {cut}; }}\n\
         __vmlab_copy_out() {{ __vmlab_setup || {{ __vmlab_nodir \"$1\"; return; }}; \
         __vmlab_o=$__vmlab_d/o; __vmlab_e=$__vmlab_d/e; __vmlab_k=$__vmlab_d/k; : >\"$__vmlab_o\"; \
         {{ tar -C \"$2\" -cf - \"$3\" 2>\"$__vmlab_e\"; echo $? >\"$__vmlab_d/s\"; }} | while :; do \
         __vmlab_m=$(dd bs=1048576 count={mib} iflag=fullblock status=none of=\"$__vmlab_k\" 2>&1) || {{ rm -f \"$__vmlab_k\"; \
         printf '%s fail %s\\n' \"$1\" \"$(printf '%s' \"$__vmlab_m\" | tr '\\n' ' ')\"; break; }}; \
         set -- \"$1\" $(stat -c %s \"$__vmlab_k\"; md5sum <\"$__vmlab_k\"); \
         printf '%s piece %s %s\\n' \"$1\" \"$2\" \"$3\"; [ \"$2\" != 0 ] || break; cat \"$__vmlab_k\"; done; \
         read -r __vmlab_s <\"$__vmlab_d/s\" || __vmlab_s=1; rm -f \"$__vmlab_k\" \"$__vmlab_d/s\"; \
         __vmlab_measure; __vmlab_reply \"$1\"; }}\n\
         __vmlab_copy_in() {{ __vmlab_setup || {{ __vmlab_nodir \"$1\"; return; }}; __vmlab_x=$__vmlab_d/x; __vmlab_k=$__vmlab_d/k; __vmlab_o=$__vmlab_d/o; __vmlab_e=$__vmlab_d/e; \
         rm -rf \"$__vmlab_x\" \"$__vmlab_k\"; : >\"$__vmlab_o\"; mkdir \"$__vmlab_x\" 2>\"$__vmlab_e\"; __vmlab_s=$?; \
         printf '%s ready\\n' \"$1\"; \
         __vmlab_m=$({{ dd bs=1048576 count=\"$2\" iflag=fullblock,count_bytes status=none | {{ if [ $__vmlab_s = 0 ]; then \
         {{ while dd bs=1048576 count={mib} iflag=fullblock status=none of=\"$__vmlab_k\" && [ -s \"$__vmlab_k\" ]; do \
         md5sum <\"$__vmlab_k\" >>\"$__vmlab_o\"; cat \"$__vmlab_k\"; done; cat >/dev/null; }} | tar -x -C \"$__vmlab_x\"; \
         else cat >/dev/null; fi; }}; }} 2>&1; echo \" $?\"); __vmlab_s=${{__vmlab_m##* }}; __vmlab_m=${{__vmlab_m% *}}; \
         [ $__vmlab_s != 0 ] || {{ rm -rf \"$4\" && mkdir -p \"$(dirname \"$4\")\" && mv \"$__vmlab_x/$3\" \"$4\"; }} 2>>\"$__vmlab_e\" || __vmlab_s=$?; \
         rm -rf \"$__vmlab_x\" \"$__vmlab_k\"; \
         {{ printf '%s' \"$__vmlab_m\" >>\"$__vmlab_e\" && printf '%s took\\n' \"$1\"; }} 2>/dev/null \
         || printf '%s fail %s\\n' \"$1\" \"$(printf '%s' \"$__vmlab_m\" | tr '\\n' ' ')\"; \
         __vmlab_measure; __vmlab_reply \"$1\"; }}\n\
         __vmlab_d=\n",
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
    /// Over a data port the guest sends whole files and the sizes it
    /// measured when the command ended: what is beyond them was written
    /// later (a background process) and is cut here.
    lossless: bool,
    state: State,
    line: Vec<u8>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl ReplyParser {
    pub fn new(token: &str, lossless: bool) -> Self {
        ReplyParser {
            token: token.to_string(),
            lossless,
            state: State::Seeking,
            line: Vec::new(),
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    /// The token of the reply this parser looks for.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Whether any of the reply has come (its first marker).
    pub fn started(&self) -> bool {
        !matches!(self.state, State::Seeking)
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
                    if self.lossless && self.stdout.len() >= out && self.stderr.len() >= err {
                        self.stdout.truncate(out);
                        self.stderr.truncate(err);
                    } else if (out, err) != (self.stdout.len(), self.stderr.len()) {
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

/// Pure: the command, run by the backdoor shell, that starts a shell on the
/// virtio-serial port named `name` (its name is in `<ports>/vportNpM/name`,
/// normally under /sys/class/virtio-ports; its device is /dev/vportNpM)
/// and prints the device and the shell's PID (see [`stop_command`]);
/// status 3 and why on standard error when there is
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
         \"$s\" <>\"$d\" >&0 2>&0 & echo \"$d $!\"; exit 0; done; \
         echo \"no virtio port is named {name} in {ports}\" >&2; exit 3",
        ports = crate::shell::quote(ports),
        name = crate::shell::quote(name)
    )
}

/// Pure: the line a data port's shell runs to send the archive of `name`
/// in `parent` as raw bytes: `tar` writes into a pipe, never a file, and
/// the archive goes out in pieces of at most [`COPY_PIECE`], each after a
/// line `<token> piece <size> <md5>` (only one piece is ever kept in the
/// guest); a piece of size 0 ends it, or a line `<token> fail <why>` when
/// a piece cannot be staged (its /tmp is full: `dd`'s words, kept in
/// memory). Then the reply of a command with no output, carrying `tar`'s
/// status and error messages.
pub fn copy_out_line(token: &str, parent: &str, name: &str) -> String {
    format!("__vmlab_copy_out {token} {} {}\n", crate::shell::quote(parent), crate::shell::quote(name))
}

/// Pure: the line a data port's shell runs to take an archive of `size`
/// bytes holding `name`, and make it `dest`. Once it prints
/// `<token> ready` it reads exactly `size` bytes, whatever happens (a
/// shell must never read the rest as commands), in pieces of at most
/// [`COPY_PIECE`], each checksummed and fed to `tar -x` (only one piece is
/// ever kept in the guest). Then a line `<token> took`, or `<token> fail
/// <why>` when what `tar` and `dd` said cannot be kept in its full /tmp,
/// and the reply: its output the pieces' `md5sum` lines, its standard
/// error what `tar`, `dd` and the move said.
pub fn copy_in_line(token: &str, size: u64, name: &str, dest: &str) -> String {
    format!("__vmlab_copy_in {token} {size} {} {}\n", crate::shell::quote(name), crate::shell::quote(dest))
}

/// Pure: a piece's size and checksum from its line (after `<token> piece `).
pub(super) fn parse_piece(line: &str) -> Result<(usize, String), String> {
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

#[cfg(test)]
pub(super) mod tests;
