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
import socket
import sys
import threading
import time
import unittest

__all__ = [
    "Machine",
    "MachineError",
    "RequestedAssertionFailed",
    "TestScriptError",
    "driver",
    "join_all",
    "log",
    "machines",
    "retry",
    "serial_stdout_off",
    "serial_stdout_on",
    "start_all",
    "subtest",
    "t",
]


class TestScriptError(Exception):
    """The test failed: what the script asked for did not happen."""


class RequestedAssertionFailed(TestScriptError):
    """An expectation failed: succeed() saw a failure, a wait timed out, …"""


class MachineError(Exception):
    """A machine is gone or vmlab could not do its part (not the test's fault)."""


def _error_for(kind, message):
    if kind in ("failed", "timeout"):
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
        return _conn().call(op, machine=self.name, **args)

    # Life cycle.
    def start(self, allow_reboot=False):
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
        result = self._call("execute", command=command, timeout=timeout)
        if not check_return:
            return (-1, result["stdout"])
        return (result["status"], result["stdout"])

    def succeed(self, *commands, timeout=None):
        return self._call("succeed", commands=list(commands), timeout=timeout)["stdout"]

    def fail(self, *commands, timeout=None):
        return self._call("fail", commands=list(commands), timeout=timeout)["stdout"]

    def wait_until_succeeds(self, command, timeout=900):
        return self._call("wait_until_succeeds", command=command, timeout=timeout)["stdout"]

    def wait_until_fails(self, command, timeout=900):
        return self._call("wait_until_fails", command=command, timeout=timeout)["stdout"]

    def sleep(self, secs):
        self._call("sleep", seconds=secs)

    def systemctl(self, q, user=None):
        if user is not None:
            q = q.replace("'", "\\'")
            return self.execute(
                f"su -l {user} --shell /bin/sh -c $'XDG_RUNTIME_DIR=/run/user/`id -u` systemctl --user {q}'"
            )
        return self.execute(f"systemctl {q}")

    # Waits.
    def wait_for_open_port(self, port, addr="localhost", timeout=900):
        self._call("wait_for_open_port", port=port, addr=addr, timeout=timeout)

    def wait_for_closed_port(self, port, addr="localhost", timeout=900):
        self._call("wait_for_closed_port", port=port, addr=addr, timeout=timeout)

    def wait_for_file(self, filename, timeout=900):
        self._call("wait_for_file", path=filename, timeout=timeout)

    def wait_for_unit(self, unit, user=None, timeout=900):
        self._call("wait_for_unit", unit=unit, user=user, timeout=timeout)

    def wait_for_console_text(self, regex, timeout=900):
        self._call("wait_for_console_text", regex=regex, timeout=timeout)

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
        _conn().call("subtest_end", failure=f"{type(e).__name__}: {e}")
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
    """Serial consoles are always logged by vmlab; kept for NixOS scripts."""


def serial_stdout_off():
    """Serial consoles are always logged by vmlab; kept for NixOS scripts."""


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


driver = _Driver()
t = unittest.TestCase()
machines = []


def bind(names):
    """Fills `machines` and returns the globals a test script sees."""
    machines[:] = [Machine(n) for n in names]
    scope = {name: globals()[name] for name in __all__}
    for m in machines:
        scope[identifier(m.name)] = m
    return scope


def _exec(path, scope):
    with open(path, encoding="utf-8") as f:
        source = f.read()
    scope.update({"__name__": "__main__", "__file__": path})
    exec(compile(source, path, "exec"), scope)


def run_script(path, names):
    """Runs a test script with the API bound; the process's exit status."""
    try:
        _exec(path, bind(names))
    except BaseException as e:  # noqa: BLE001 — any error in a test script fails the test
        _report(e, path)
        # vmlab makes this 2 when the last driver error was a harness error.
        return 1
    return 0


def interactive(path, names):
    """The globals of `vmlab test --interactive`: the API, the machines, and
    `test_script()` running the script given (as in the NixOS driver)."""
    scope = bind(names)
    if path:

        def test_script():
            _exec(path, scope)

        scope["test_script"] = test_script
    print(f"vmlab: machines {', '.join(m.name for m in machines)}" + ("; test_script() runs the script" if path else ""))
    return scope


def _report(error, path):
    """The traceback, then one line saying where and why: vmlab takes a
    script's last line on standard error as the reason it failed."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == path]
    where = f" at line {frames[-1].lineno}" if frames else ""
    sys.stderr.write("".join(traceback.format_exception(error)))
    sys.stderr.write(f"{os.path.basename(path)}{where}: {type(error).__name__}: {error}\n")
