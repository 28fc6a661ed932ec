#!/usr/bin/env python3
"""Times the test driver on the default guest, next to the raw backdoor.

Usage: bench/driver.py [path/to/vmlab]   (default: target/release/vmlab)

Prints:
- through vmlab (`vmlab test` running a Python script): command round trip
  (median and p99 of 200 `succeed("true")`, then of 100 `succeed("echo
  hello")` and 100 `succeed("true", timeout=60)`), copy throughput into and out of
  a 256 MiB guest (64 MiB of random bytes, over the data port), and the
  driver's peak memory (VmHWM of the vmlab process at the end);
- the raw backdoor baseline: one QEMU started from its run script, its
  virtio console read and written directly, no framing: round trip of
  `true`, and 16 MiB as base64 each way (what the console itself can carry);
- the wall time of the webserver example's test (two machines, boot included).
"""
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024 * 1024
# The raw console carries about 0.5 MiB/s out: 16 MiB keeps it to a minute.
SIZE = 16 * MIB
# Through the driver: what the data port is to carry, in a guest of 256 MiB.
COPY_SIZE = 64 * MIB
COPY_GUEST_MIB = 256
BANNER = b"Spawning backdoor root shell...\n"

# Runs inside `vmlab test`: measures through the driver and prints one JSON line.
DRIVER_SCRIPT = r"""
import json, os, statistics, time
def round_trips(n, *command, **kw):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        server.succeed(*command, **kw)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median": statistics.median(times), "p99": times[int(len(times) * 0.99) - 1]}
times = round_trips(200, "true")
# What else a command can cost: output to encode and count, a timeout to enforce.
text = round_trips(100, "echo hello")
timed = round_trips(100, "true", timeout=60)
data = os.urandom(%(size)d)
src = os.path.join(driver.out_dir, "random.bin")
with open(src, "wb") as f:
    f.write(data)
start = time.perf_counter()
server.copy_to_vm(src, "/tmp/random.bin")
copy_in = time.perf_counter() - start
start = time.perf_counter()
server.copy_from_vm("/tmp/random.bin", "back")
copy_out = time.perf_counter() - start
# The driver: the parent, or its parent when the script runs under `vmlab reap`.
pid = os.getppid()
if open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[1:2] == [b"reap"]:
    pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
hwm = [l for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM:")][0].split()[1]
print("RESULT " + json.dumps({**times, "text": text, "timed": timed,
      "copy_in": copy_in, "copy_out": copy_out, "hwm_kib": int(hwm)}), flush=True)
"""


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def build_guest(vmlab, tmp):
    example = os.path.join(ROOT, "examples/webserver")
    guest = os.path.join(tmp, "guest")
    run([vmlab, "guest", "--out", guest, "--rc", os.path.join(example, "rc.sh"),
         "--add", os.path.join(example, "www") + ":/var/www"], stdout=subprocess.DEVNULL)
    return guest


def write_spec(tmp, guest, name, nodes, memory=128):
    node = {"kernel": os.path.join(guest, "kernel"), "initrd": os.path.join(guest, "initrd"), "memory": memory,
            "cmdline": "quiet"}
    path = os.path.join(tmp, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"name": name, "nodes": {n: node for n in nodes}}, f)
    return path


def through_vmlab(vmlab, tmp, spec):
    script = os.path.join(tmp, "bench_driver.py")
    with open(script, "w") as f:
        f.write(DRIVER_SCRIPT % {"size": COPY_SIZE})
    out = subprocess.run([vmlab, "test", spec, script, "--out", os.path.join(tmp, "out")],
                         stderr=subprocess.PIPE, text=True)
    lines = [l for l in out.stderr.splitlines() if "RESULT " in l]
    if out.returncode != 0 or not lines:
        sys.exit(f"vmlab test failed:\n{out.stderr}")
    return json.loads(lines[0].split("RESULT ", 1)[1])


class Raw:
    """A QEMU started from its run script; its backdoor console used directly."""

    def __init__(self, built, state):
        env = dict(os.environ, VMLAB_STATE_DIR=state)
        self.qemu = subprocess.Popen([os.path.join(built, "bin/run-server-vm")], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        path = os.path.join(state, "shell.sock")
        deadline = time.monotonic() + 60
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline or self.qemu.poll() is not None:
                    raise
                time.sleep(0.05)
        self.buf = bytearray()
        self.read_until(BANNER)

    def send(self, data):
        self.sock.settimeout(None)
        self.sock.sendall(data)

    def read_until(self, marker, nudge=False):
        """Reads up to `marker`; with `nudge`, an empty line after 2 s of
        silence, as vmlab sends (a guest may miss a console notification)."""
        self.sock.settimeout(2)
        deadline = time.monotonic() + 600
        while marker not in self.buf[-len(marker) - (1 << 16):]:
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no {marker!r} from the raw backdoor")
                if nudge:
                    self.sock.sendall(b"\n")
                continue
            if not chunk:
                raise RuntimeError("the backdoor closed")
            self.buf += chunk
        at = self.buf.index(marker) + len(marker)
        del self.buf[:at]

    def close(self):
        os.killpg(self.qemu.pid, 9)
        self.qemu.wait()


def raw_baseline(vmlab, tmp, spec):
    built = os.path.join(tmp, "raw-built")
    run([vmlab, "build", spec, "--out", built])
    raw = Raw(built, os.path.join(tmp, "raw-state"))
    try:
        times = []
        for _ in range(200):
            start = time.perf_counter()
            raw.send(b"true; echo done\n")
            raw.read_until(b"done\n", nudge=True)
            times.append(time.perf_counter() - start)
        times.sort()
        start = time.perf_counter()
        raw.send(f"head -c {SIZE} /dev/urandom | base64; echo END\n".encode())
        raw.read_until(b"END\n", nudge=True)
        out = time.perf_counter() - start
        encoded = base64.encodebytes(os.urandom(SIZE))
        start = time.perf_counter()
        raw.send(f"head -c {len(encoded)} | base64 -d | wc -c; echo END\n".encode() + encoded)
        raw.read_until(b"END\n", nudge=True)
        into = time.perf_counter() - start
        return {"median": statistics.median(times), "p99": times[int(len(times) * 0.99) - 1],
                "copy_in": into, "copy_out": out}
    finally:
        raw.close()


def main():
    vmlab = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/vmlab")
    with tempfile.TemporaryDirectory() as tmp:
        guest = build_guest(vmlab, tmp)
        one = write_spec(tmp, guest, "bench", ["server"])
        driver = through_vmlab(vmlab, tmp, write_spec(tmp, guest, "bench-big", ["server"], COPY_GUEST_MIB))
        raw = raw_baseline(vmlab, tmp, one)
        for name, r, size in [("vmlab driver", driver, COPY_SIZE), ("raw backdoor", raw, SIZE)]:
            print(f"{name}: round trip median {r['median'] * 1000:.1f} ms, p99 {r['p99'] * 1000:.1f} ms; "
                  f"{size // MIB} MiB in {r['copy_in']:.1f} s ({size / MIB / r['copy_in']:.2f} MiB/s), "
                  f"out {r['copy_out']:.1f} s ({size / MIB / r['copy_out']:.2f} MiB/s)")
        for what, key in [("`echo hello`", "text"), ("`true` with a 60 s timeout", "timed")]:
            print(f"vmlab driver: round trip of {what}: median {driver[key]['median'] * 1000:.1f} ms, "
                  f"p99 {driver[key]['p99'] * 1000:.1f} ms")
        print(f"vmlab driver: peak memory (VmHWM) {driver['hwm_kib'] / 1024:.1f} MiB")
        web = write_spec(tmp, guest, "webserver", ["server", "client"])
        start = time.perf_counter()
        run([vmlab, "test", web, os.path.join(ROOT, "examples/webserver/test.py"), "--out", os.path.join(tmp, "web")],
            stderr=subprocess.DEVNULL)
        print(f"webserver example test (2 machines, boot included): {time.perf_counter() - start:.1f} s wall time")


if __name__ == "__main__":
    main()
