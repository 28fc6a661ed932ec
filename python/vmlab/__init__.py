"""vmlab's Python client: the NixOS test driver's API over vmlab's control socket.

Standard library only. `vmlab test NETWORK script.py` runs a script with
everything below bound as globals, plus one object per machine named after
its node (characters not valid in identifiers become `_`). The protocol is
documented in docs/protocol.md.
"""

import base64
import contextlib
import json
import os
import re
import shlex
import socket
import sys
import threading
import time
import unittest

__all__ = [
    "BaseMachine",
    "Machine",
    "MachineError",
    "RequestedAssertionFailed",
    "TestScriptError",
    "create_machine",
    "debug",
    "driver",
    "join_all",
    "log",
    "machines",
    "machines_nspawn",
    "machines_qemu",
    "os",
    "polling_condition",
    "retry",
    "run_tests",
    "serial_stdout_off",
    "serial_stdout_on",
    "start_all",
    "subtest",
    "t",
    "test_script",
    "vlans",
]


class TestScriptError(Exception):
    """The test failed: what the script asked for did not happen."""


class RequestedAssertionFailed(TestScriptError):
    """An expectation failed: succeed() saw a failure, a wait timed out, …"""


class MachineError(Exception):
    """A machine is gone or vmlab could not do its part (not the test's fault)."""


class _TimedOut(RequestedAssertionFailed):
    """A wait ran out of time (the driver's `timeout` error kind)."""


class Unsupported(NotImplementedError):
    """A NixOS driver feature this architecture cannot offer; the message
    says why and what to use instead."""


class PollingConditionError(RequestedAssertionFailed):
    """A polling condition failed while the test ran."""


def _unsupported(name, why):
    raise Unsupported(f"{name} is not supported by vmlab: {why}")


def _error_for(kind, message):
    if kind == "timeout":
        return _TimedOut(message)
    if kind == "failed":
        return RequestedAssertionFailed(message)
    if kind == "request":
        return ValueError(message)
    return MachineError(message)


class _Connection:
    """One connection per thread: a request on one never waits for another's."""

    def __init__(self, path):
        self.path = path
        self.local = threading.local()
        self.next_id = 0
        self.lock = threading.Lock()

    def _stream(self):
        if getattr(self.local, "sock", None) is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.path)
            self.local.sock = sock
            self.local.file = sock.makefile("rb")
        return self.local.sock, self.local.file

    def call(self, op, machine=None, **args):
        with self.lock:
            self.next_id += 1
            request_id = self.next_id
        request = {"id": request_id, "op": op, **args}
        if machine is not None:
            request["machine"] = machine
        sock, file = self._stream()
        sock.sendall(json.dumps(request).encode() + b"\n")
        line = file.readline()
        if not line:
            raise MachineError("the vmlab driver closed the control socket")
        response = json.loads(line)
        if response.get("ok"):
            return response["result"]
        error = response.get("error", {})
        raise _error_for(error.get("kind"), error.get("message", "unknown error"))


_connection = None


def _conn():
    global _connection
    if _connection is None:
        path = os.environ.get("VMLAB_SOCKET")
        if not path:
            raise MachineError("VMLAB_SOCKET is not set: run the script with `vmlab test`, or export what `vmlab up` prints")
        _connection = _Connection(path)
    return _connection


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


def log(message):
    _conn().call("log", message=str(message))


def start_all():
    _conn().call("start_all")


def join_all():
    _conn().call("join_all")


@contextlib.contextmanager
def subtest(name):
    _conn().call("subtest_begin", name=name)
    try:
        yield
    except BaseException as e:
        # sys.exit(0) ends the script well, and so the subtest it ends in.
        _conn().call("subtest_end", failure=_failure(e))
        raise
    _conn().call("subtest_end")


def retry(fn, timeout_seconds=900):
    """Calls fn(last_try) until it returns True, pausing fast at first and
    then about a second; raises RequestedAssertionFailed after the timeout."""
    start = time.monotonic()
    delay = 0.05
    while time.monotonic() - start < timeout_seconds:
        if fn(False):
            return
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    if not fn(True):
        elapsed = time.monotonic() - start
        raise RequestedAssertionFailed(f"action timed out after {elapsed:.2f} seconds (timeout={timeout_seconds})")


def serial_stdout_on():
    """Shows serial console lines on the terminal again (the default)."""
    _conn().call("serial_stdout", on=True)


def serial_stdout_off():
    """Stops showing serial console lines on the terminal; the log file and
    `<machine>.serial.log` keep them."""
    _conn().call("serial_stdout", on=False)


class _PollingCondition:
    """A check run before machine operations while its `with` block is
    open, at most every `seconds_interval`; a failed check fails the test."""

    def __init__(self, fun, seconds_interval=2.0, description=None):
        self.fun = fun
        self.seconds_interval = seconds_interval
        self.description = str(description) if description is not None else (fun.__doc__ or fun.__name__)
        self.last_checked = float("-inf")
        self.checking = False

    def check(self, force=False):
        """Whether the condition holds; skipped (true) inside its own
        check, and when not yet due unless forced."""
        if self.checking or (not force and time.monotonic() < self.last_checked + self.seconds_interval):
            return True
        self.checking = True
        try:
            held = self.fun()
        except Exception:  # noqa: BLE001 — a condition that raises has failed
            held = False
        finally:
            self.checking = False
            self.last_checked = time.monotonic()
        held = held is None or bool(held)
        log(f"polling condition {'succeeded' if held else 'failed'}: {self.description}")
        return held

    def __enter__(self):
        _polling_conditions.append(self)

    def __exit__(self, *_):
        _polling_conditions.remove(self)

    def wait(self, timeout=900):
        """Waits until the condition holds (checked at once, then again)."""
        retry(lambda last_try: self.check(force=True), timeout)


_polling_conditions = []


def _check_polling_conditions():
    for condition in list(_polling_conditions):
        if not condition.check():
            raise PollingConditionError(f"polling condition failed: {condition.description}")


def polling_condition(fun_=None, *, seconds_interval=2.0, description=None):
    """NixOS's decorator: `@polling_condition` (or with arguments) makes a
    function a context manager; inside its `with`, it is checked before
    machine operations and during waits."""

    def make(fun):
        return _PollingCondition(fun, seconds_interval, description)

    return make if fun_ is None else make(fun_)


def create_machine(start_command, *, name=None, keep_machine_state=False):
    _unsupported("create_machine", "machines come from the network spec; add a node there")


class _Debug:
    """NixOS's `debug` hook: its breakpoint() does nothing unless NixOS's
    --debug-hook-attach is given, which vmlab has no equivalent of."""

    def breakpoint(self):
        pass


debug = _Debug()


class VLan:
    """A vlan of the network: `nr` is its number (`vlan1` is vlan 1)."""

    def __init__(self, nr):
        self.nr = nr

    def __repr__(self):
        return f"<VLan {self.nr}>"


def identifier(name):
    """The Python name of a machine: characters not valid in identifiers become `_`."""
    ident = re.sub(r"\W", "_", name, flags=re.ASCII)
    return "_" + ident if ident[:1].isdigit() else ident


def _out_dir():
    return os.environ.get("VMLAB_OUT") or os.getcwd()


class _Driver:
    """What NixOS scripts reach as `driver`."""

    @property
    def machines(self):
        return machines

    @property
    def out_dir(self):
        return _out_dir()


    @property
    def vlans(self):
        return vlans

    def polling_condition(self, fun_=None, *, seconds_interval=2.0, description=None):
        return polling_condition(fun_, seconds_interval=seconds_interval, description=description)

    def serial_stdout_on(self):
        serial_stdout_on()

    def serial_stdout_off(self):
        serial_stdout_off()


class _AssertionTester(unittest.TestCase):
    """`t`: unittest's assertions, failing as RequestedAssertionFailed (as in NixOS)."""

    failureException = RequestedAssertionFailed


driver = _Driver()
t = _AssertionTester()
machines = []
machines_qemu = machines
machines_nspawn = []
vlans = []
_script = {"path": None, "running": False}


def test_script():
    """Runs the test script (the one `vmlab test` was given)."""
    if _script["path"] is None:
        _unsupported("test_script()", "no script was given; pass one to `vmlab test NETWORK SCRIPT --interactive`")
    if _script["running"]:
        _unsupported("test_script() inside the test script", "it would run itself again")
    _script["running"] = True
    try:
        _exec(_script["path"], _script["scope"])
    finally:
        _script["running"] = False


run_tests = test_script


def bind(names, path=None):
    """Fills `machines` and `vlans` and returns the globals a test script
    sees: the API, one name per machine (`machine` too when there is only
    one, as in NixOS) and `vlanN` per vlan (from VMLAB_VLANS)."""
    machines[:] = [Machine(n) for n in names]
    vlans[:] = [VLan(int(n)) for n in os.environ.get("VMLAB_VLANS", "").split()]
    scope = {name: globals()[name] for name in __all__}
    for m in machines:
        scope[identifier(m.name)] = m
    if len(machines) == 1:
        scope.setdefault("machine", machines[0])
    for v in vlans:
        scope[f"vlan{v.nr}"] = v
    _script.update(path=path, scope=scope)
    return scope


def _exec(path, scope):
    with open(path, encoding="utf-8") as f:
        source = f.read()
    scope.update({"__name__": "__main__", "__file__": path})
    exec(compile(source, path, "exec"), scope)


def run_script(path, names):
    """Runs a test script with the API bound; the process's exit status."""
    try:
        bind(names, path)
        test_script()
    except SystemExit as e:
        # As in the NixOS driver, where the script's sys.exit() ends the driver.
        status, why = _exit_status(e.code)
        if why is not None:
            sys.stderr.write(f"{_where(e, path)}: {why}\n")
        return status
    except BaseException as e:  # noqa: BLE001 — any error in a test script fails the test
        _report(e, path)
        # vmlab makes this 2 when the last driver error was a harness error.
        return 1
    return 0


def _exit_status(code):
    """The exit status and failure message of `sys.exit(code)`: `None` and 0
    pass; another number fails with it as the status (1 when no status can
    carry it); anything else is a message, failing with status 1."""
    if code is None or code == 0:
        return 0, None
    if isinstance(code, int):
        return (code if 0 < code < 256 else 1), f"sys.exit({code})"
    return 1, str(code)


def _failure(error):
    """Why an exception ends a subtest as failed, or None when it does not."""
    if isinstance(error, SystemExit):
        return _exit_status(error.code)[1]
    return f"{type(error).__name__}: {error}"


def interactive(path, names):
    """The globals of `vmlab test --interactive`: the API, the machines, and
    `test_script()` running the script given (as in the NixOS driver)."""
    scope = bind(names, path or None)
    print(f"vmlab: machines {', '.join(m.name for m in machines)}" + ("; test_script() runs the script" if path else ""))
    return scope


def _report(error, path):
    """The traceback, then one line saying where and why: vmlab takes a
    script's last line on standard error as the reason it failed."""
    import traceback

    sys.stderr.write("".join(traceback.format_exception(error)))
    sys.stderr.write(f"{_where(error, path)}: {_failure(error)}\n")


def _where(error, path):
    """`test.py at line 12`: the script's innermost line the error passed."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == path]
    return os.path.basename(path) + (f" at line {frames[-1].lineno}" if frames else "")
