"""The test script's world: the machines, vlans and globals it is run with, and how it is run."""

import os
import re
import sys
import unittest

from .errors import _unsupported, RequestedAssertionFailed
from .connection import _conn, _out_dir
from .logger import _exit_status, _failure, serial_stdout_off, serial_stdout_on
from .polling_condition import polling_condition
from .machine import Machine


def start_all():
    _conn().call("start_all")


def join_all():
    _conn().call("join_all")


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
    package = sys.modules[__package__]
    scope = {name: getattr(package, name) for name in package.__all__}
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
