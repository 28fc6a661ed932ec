"""vmlab's Python client: the NixOS test driver's API over vmlab's control socket.

Standard library only. `vmlab test NETWORK script.py` runs a script with
everything in `__all__` bound as globals, plus one object per machine named
after its node (characters not valid in identifiers become `_`). The
protocol is documented in docs/protocol.md.

The modules follow nixpkgs' test driver: `machine` (a machine's methods),
`driver` (the script's world and how it runs), `polling_condition`,
`logger` (the log and subtests), `errors`; `connection` is the control
socket. The package exports the same names as before the split.
"""

import os  # in __all__: NixOS scripts get it as a global

from .errors import (  # noqa: F401
    MachineError,
    PollingConditionError,
    RequestedAssertionFailed,
    TestScriptError,
    Unsupported,
)
from .logger import log, serial_stdout_off, serial_stdout_on, subtest  # noqa: F401
from .polling_condition import polling_condition, retry  # noqa: F401
from .machine import (  # noqa: F401
    BaseMachine,
    key_name,
    Machine,
    unit_properties,
    unix_socket_check,
)
from .driver import (  # noqa: F401
    bind,
    create_machine,
    debug,
    driver,
    identifier,
    interactive,
    join_all,
    machines,
    machines_nspawn,
    machines_qemu,
    run_script,
    run_tests,
    start_all,
    t,
    test_script,
    VLan,
    vlans,
)

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
