"""Exceptions a test script sees, and how the driver's error kinds map to them."""


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
