#!/usr/bin/env python3
"""Boot-to-backdoor-ready time of 1, 2 and 4 default guests: `vmlab up`
against bare QEMU started with the very same command lines (the run scripts,
each machine alone on private hubs, no switch), so the difference is the
overhead vmlab adds (switches, session, supervision).

Usage: bench/boot.py [path/to/vmlab]   (default: target/release/vmlab)
Set VMLAB_ACCEL to choose the accelerator (default tcg). Prints the median of
RUNS runs for each count.
"""
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(os.environ.get("RUNS", "3"))
BANNER = b"Spawning backdoor root shell..."
ACCEL = os.environ.get("VMLAB_ACCEL", "tcg")


def build(vmlab: str, tmp: str, count: int) -> str:
    guest = os.path.join(tmp, "guest")
    if not os.path.isdir(guest):
        subprocess.run([vmlab, "guest", "--out", guest], check=True, stdout=subprocess.DEVNULL)
    spec = {
        "name": f"boot{count}",
        "nodes": {
            f"m{i}": {"kernel": f"{guest}/kernel", "initrd": f"{guest}/initrd", "cmdline": "quiet", "memory": 192}
            for i in range(count)
        },
    }
    path = os.path.join(tmp, f"spec{count}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    out = os.path.join(tmp, f"net{count}")
    subprocess.run([vmlab, "build", path, "--out", out], check=True)
    return out


def wait_banner(path: str, deadline: float) -> None:
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise TimeoutError(path)
            time.sleep(0.005)
    data = b""
    s.settimeout(max(0.1, deadline - time.monotonic()))
    while BANNER not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise EOFError(path)
        data += chunk
    s.close()


def bare(out: str, count: int, tmp: str) -> float:
    """Every run script at once with its own state dir; ready when every banner is seen."""
    start = time.monotonic()
    procs = []
    for i in range(count):
        state = os.path.join(tmp, f"bare{count}-{i}")
        env = dict(os.environ, VMLAB_STATE_DIR=state, VMLAB_ACCEL=ACCEL)
        procs.append(subprocess.Popen([f"{out}/bin/run-m{i}-vm"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
    try:
        for i in range(count):
            wait_banner(os.path.join(tmp, f"bare{count}-{i}", "shell.sock"), start + 300)
        return time.monotonic() - start
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def with_vmlab(vmlab: str, out: str, count: int) -> float:
    """`vmlab up` until it reports every machine up."""
    start = time.monotonic()
    p = subprocess.Popen([vmlab, "up", out, "--accel", ACCEL], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:
            if "machines are up" in line or "machine is up" in line:
                return time.monotonic() - start
        raise RuntimeError(f"vmlab up ended before every machine was up (status {p.wait()})")
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait()


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vmlab = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "target/release/vmlab")
    print(f"accelerator {ACCEL}, {RUNS} runs each, median seconds to every backdoor ready")
    with tempfile.TemporaryDirectory() as tmp:
        for count in (1, 2, 4):
            out = build(vmlab, tmp, count)
            b = statistics.median(bare(out, count, tmp) for _ in range(RUNS))
            v = statistics.median(with_vmlab(vmlab, out, count) for _ in range(RUNS))
            print(f"{count} guest(s): bare QEMU {b:5.2f} s, vmlab up {v:5.2f} s, overhead {v - b:+5.2f} s")


if __name__ == "__main__":
    main()
