"""A machine of the network, with the NixOS test driver's methods."""

import contextlib
import os
import re
import shlex
import time

from .errors import _TimedOut, _unsupported, RequestedAssertionFailed
from .connection import _conn, _out_dir
from .logger import log, subtest
from .polling_condition import _check_polling_conditions, _polling_conditions, retry


# QEMU sendkey names for the characters that are not their own key name:
# shifted characters are the unshifted key with `shift-`.
_KEY_NAMES = {
    " ": "spc", "\n": "ret", "\t": "tab", "-": "minus", "=": "equal", "[": "bracket_left",
    "]": "bracket_right", ";": "semicolon", "'": "apostrophe", "`": "grave_accent",
    "\\": "backslash", ",": "comma", ".": "dot", "/": "slash",
}


_SHIFTED = dict(zip('!@#$%^&*()_+{}:"~|<>?', "1234567890-=[];'`\\,./"))


def key_name(char):
    """The QEMU `sendkey` name that types `char`; other strings (`ctrl-alt-delete`) pass through."""
    if char in _SHIFTED:
        return "shift-" + key_name(_SHIFTED[char])
    if len(char) == 1 and char.isascii() and char.isupper():
        return "shift-" + char.lower()
    return _KEY_NAMES.get(char, char)


def unit_properties(text):
    """`systemctl show` output as a dict: one `Key=value` per line."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("="))


def unix_socket_check(path, is_datagram):
    """A guest command that succeeds when a process listens on the unix
    socket `path` (stream) or has bound it (datagram). It reads
    /proc/net/unix, so it needs no `nc -U` (busybox's nc has none)."""
    # Columns: Num RefCount Protocol Flags Type St Inode Path; type 1 is
    # stream, 2 datagram; flag 0x10000 (__SO_ACCEPTCON) marks a listener.
    want = '$5 == "0002"' if is_datagram else '$5 == "0001" && $4 == "00010000"'
    return (
        f"awk -v p={shlex.quote(path)} 'NR > 1 && {want} {{ for (i = 0; i < 7; i++) sub(/^ *[^ ]+ +/, \"\"); if ($0 == p) found = 1 }}"
        f" END {{ exit !found }}' /proc/net/unix"
    )


class Machine:
    """A machine of the network, with the NixOS test driver's methods."""

    def __init__(self, name):
        self.name = name

    @property
    def out_dir(self):
        """Where copies and screenshots go: `vmlab test --out`."""
        return _out_dir()

    def __repr__(self):
        return f"<Machine '{self.name}'>"

    def _call(self, op, **args):
        _check_polling_conditions()
        return _conn().call(op, machine=self.name, **args)

    def _wait(self, op, timeout, **args):
        """A wait done by the driver; while polling conditions are active it
        is done in slices, checking them in between (as NixOS checks them
        before each command of a wait)."""
        if not _polling_conditions:
            return self._call(op, timeout=timeout, **args)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            # NixOS's waits try once a second, checking conditions before each try.
            step = min([left] + [max(c.seconds_interval, 1.0) for c in _polling_conditions])
            try:
                return self._call(op, timeout=max(step, 0), **args)
            except _TimedOut:
                if step >= left:
                    raise

    # Life cycle.
    def start(self, allow_reboot=False):
        """Starts QEMU (does not wait for boot). vmlab always restarts a
        machine on `reboot()`, so `allow_reboot` changes nothing there; a
        reboot from inside the guest ends its QEMU (vmlab runs it with -no-reboot)."""
        self._call("start")

    def shutdown(self):
        self._call("shutdown")

    def crash(self):
        self._call("crash")

    def wait_for_shutdown(self):
        self._call("wait_for_shutdown")

    def reboot(self):
        self._call("reboot")

    def is_up(self):
        return any(m["name"] == self.name and m["up"] for m in _conn().call("machines")["machines"])

    # Commands.
    def execute(self, command, check_return=True, check_output=True, timeout=900):
        if not check_output:
            # NixOS does not wait for such a command (it may power the machine off).
            self._call("execute", command=f"( {command}\n) </dev/null >/dev/null 2>&1 &", timeout=timeout)
            return (-2, "")
        result = self._call("execute", command=command, timeout=timeout)
        if not check_return:
            return (-1, result["stdout"])
        return (result["status"], result["stdout"])

    def succeed(self, *commands, timeout=None):
        return self._call("succeed", commands=list(commands), timeout=timeout)["stdout"]

    def fail(self, *commands, timeout=None):
        return self._call("fail", commands=list(commands), timeout=timeout)["stdout"]

    def wait_until_succeeds(self, command, timeout=900):
        return self._wait("wait_until_succeeds", timeout, command=command)["stdout"]

    def wait_until_fails(self, command, timeout=900):
        return self._wait("wait_until_fails", timeout, command=command)["stdout"]

    def sleep(self, secs):
        self._call("sleep", seconds=secs)

    # systemd.
    def systemctl(self, q, user=None):
        if user is not None:
            q = q.replace("'", "\\'")
            return self.execute(
                f"su -l {user} --shell /bin/sh -c $'XDG_RUNTIME_DIR=/run/user/`id -u` systemctl --user {q}'"
            )
        return self.execute(f"systemctl {q}")

    def _show(self, unit, user, what, extra=""):
        status, out = self.systemctl(f'--no-pager show "{unit}"{extra}', user)
        if status == 127:
            raise RequestedAssertionFailed(
                f"machine {self.name}: {what} needs systemd, and this guest has no systemctl "
                "(check the service with wait_until_succeeds, wait_for_open_port or wait_for_file instead)"
            )
        if status != 0:
            under = "" if user is None else f' under user "{user}"'
            raise RequestedAssertionFailed(f'retrieving systemctl {what} for unit "{unit}"{under} failed with exit code {status}')
        return unit_properties(out)

    def get_unit_info(self, unit, user=None):
        return self._show(unit, user, "info")

    def get_unit_property(self, unit, property, user=None):
        props = self._show(unit, user, f'property "{property}"', f' --property="{property}"')
        if property not in props:
            raise RequestedAssertionFailed(f'systemctl show --property "{property}" "{unit}" gave no such property')
        return props[property]

    def require_unit_state(self, unit, require_state="active"):
        state = self.get_unit_info(unit)["ActiveState"]
        if state != require_state:
            raise RequestedAssertionFailed(f"unit '{unit}' is in state '{state}', expected '{require_state}'")

    def start_job(self, jobname, user=None):
        return self.systemctl(f"start {jobname}", user)

    def stop_job(self, jobname, user=None):
        return self.systemctl(f"stop {jobname}", user)

    # Waits.
    def wait_for_open_port(self, port, addr="localhost", timeout=900):
        self._wait("wait_for_open_port", timeout, port=port, addr=addr)

    def wait_for_closed_port(self, port, addr="localhost", timeout=900):
        self._wait("wait_for_closed_port", timeout, port=port, addr=addr)

    def wait_for_open_unix_socket(self, addr, is_datagram=False, timeout=900):
        self.wait_until_succeeds(unix_socket_check(addr, is_datagram), timeout=timeout)

    def wait_for_file(self, filename, timeout=900):
        self._wait("wait_for_file", timeout, path=filename)

    def wait_for_unit(self, unit, user=None, timeout=900):
        self._wait("wait_for_unit", timeout, unit=unit, user=user)

    wait_for_job = wait_for_unit

    def wait_for_console_text(self, regex, timeout=None):
        """As in NixOS, no timeout by default (the global timeout still applies)."""
        if timeout is None:
            while True:
                try:
                    return self._wait("wait_for_console_text", 3600, regex=regex)
                except _TimedOut:
                    pass
        self._wait("wait_for_console_text", timeout, regex=regex)

    # Virtual consoles and keyboard.
    def get_tty_text(self, tty):
        """What virtual console `tty` shows, one line per screen row."""
        return self.execute(f"fold -w$(stty -F /dev/tty{tty} size | awk '{{print $2}}') /dev/vcs{tty}")[1]

    def wait_until_tty_matches(self, tty, regexp, timeout=900):
        pattern = re.compile(regexp)

        def matches(last_try):
            text = self.get_tty_text(tty)
            if last_try:
                self.log(f"last chance to match /{regexp}/ on tty{tty}, which shows: {text}")
            return pattern.search(text) is not None

        retry(matches, timeout)

    def dump_tty_contents(self, tty):
        self.log(f"tty{tty}:\n" + self.execute(f"fold -w 80 /dev/vcs{tty}")[1])

    def send_key(self, key, delay=0.01, log=True):
        if log:
            self.log(f"sending key {key_name(key)!r}")
        self.send_monitor_command(f"sendkey {key_name(key)}")
        if delay is not None:
            time.sleep(delay)

    def send_chars(self, chars, delay=0.01):
        self.log(f"sending keys {chars!r}")
        for char in chars:
            self.send_key(char, delay, log=False)

    def send_console(self, chars):
        _unsupported("send_console", "the serial console is output only; type with send_chars() or run commands with succeed()")

    def get_screen_text(self):
        _unsupported("get_screen_text", "there is no OCR; take a screenshot() or read a text console with get_tty_text()")

    def get_screen_text_variants(self):
        _unsupported("get_screen_text_variants", "there is no OCR; take a screenshot() or read a text console with get_tty_text()")

    def wait_for_text(self, regex, timeout=900):
        _unsupported("wait_for_text", "there is no OCR; use wait_until_tty_matches() or wait_for_console_text()")

    def get_window_names(self):
        return self.succeed(r"xwininfo -root -tree | sed 's/.*0x[0-9a-f]* \"\([^\"]*\)\".*/\1/; t; d'").splitlines()

    def wait_for_window(self, regexp, timeout=900):
        pattern = re.compile(regexp)
        retry(lambda last_try: any(pattern.search(n) for n in self.get_window_names()), timeout)

    def wait_for_x(self, timeout=900):
        self.wait_until_succeeds("test -e /tmp/.X11-unix/X0", timeout=timeout)

    def get_console_log(self):
        _unsupported("get_console_log", "match console output with wait_for_console_text(); the whole console is <out>/<machine>.serial.log after the test")

    def wait_for_qmp_event(self, event_filter, timeout=600):
        _unsupported("wait_for_qmp_event", "vmlab keeps QMP to itself; query QEMU with send_monitor_command()")

    def switch_root(self):
        _unsupported("switch_root", "vmlab guests have no initrd backdoor stage; the backdoor starts in the booted system")

    def shell_interact(self, address=None):
        _unsupported("shell_interact", f"run `vmlab shell {self.name}` in another terminal (VMLAB_SOCKET as printed)")

    def console_interact(self):
        _unsupported("console_interact", f"the serial console is output only; run `vmlab shell {self.name}` in another terminal")

    # Files.
    def copy_from_vm(self, source, target_dir=""):
        """Copies to out_dir/target_dir/<name>; returns that host path."""
        return self._call("copy_from_vm", source=source, target_dir=target_dir)["path"]

    copy_from_machine = copy_from_vm

    def copy_to_vm(self, source, target):
        self._call("copy_to_vm", source=os.path.abspath(source), dest=target)

    copy_from_host = copy_to_vm
    copy_from_host_via_shell = copy_to_vm

    # QEMU.
    def block(self, interface=None):
        self._call("block", interface=interface)

    def unblock(self, interface=None):
        self._call("unblock", interface=interface)

    def forward_port(self, host_port=8080, guest_port=80):
        self._call("forward_port", host_port=host_port, guest_port=guest_port)

    def screenshot(self, filename):
        self._call("screenshot", name=filename)

    def send_monitor_command(self, command):
        return self._call("send_monitor_command", command=command)["output"]

    # Logging.
    def log(self, msg):
        log(f"{self.name}: {msg}")

    @contextlib.contextmanager
    def nested(self, msg, attrs=None):
        with subtest(f"{self.name}: {msg}"):
            yield


BaseMachine = Machine
