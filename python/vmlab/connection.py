"""The control socket (docs/protocol.md): one connection per thread, and where the driver puts files."""

import json
import os
import socket
import threading

from .errors import _error_for, MachineError


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


def _out_dir():
    return os.environ.get("VMLAB_OUT") or os.getcwd()
