"""The test log and its subtests (JUnit test cases), written by the driver."""

import contextlib

from .connection import _conn


def log(message):
    _conn().call("log", message=str(message))


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


def serial_stdout_on():
    """Shows serial console lines on the terminal again (the default)."""
    _conn().call("serial_stdout", on=True)


def serial_stdout_off():
    """Stops showing serial console lines on the terminal; the log file and
    `<machine>.serial.log` keep them."""
    _conn().call("serial_stdout", on=False)


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
