"""NixOS's polling conditions: checks run before machine operations and during waits; and `retry`."""

import time

from .errors import PollingConditionError, RequestedAssertionFailed
from .logger import log


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
