#!/usr/bin/env python3
"""Snapshots (docs/snapshots.md): how fast a restored machine answers, and
the webserver example's test restored against booted, in the same run.

1. One default guest (256 MiB, the example's boot script), saved with each
   compression: the time `vmlab snapshot` took, the state file's size, and,
   in `vmlab test --snapshot`, the time from the driver's "starting" line to
   its first answered command (`succeed("true")`: restore, clock, random
   pool, data port, the command), read from vmlab.log.
2. The example's two-machine network and test (examples/webserver/test.py:
   start_all() and commands on both machines), whole `vmlab test` wall
   time, cold and restored, alternating.

Usage: bench/snapshot.py [path/to/vmlab]   (default: target/release/vmlab)
VMLAB_ACCEL chooses the accelerator (default tcg); medians of RUNS runs.
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(os.environ.get("RUNS", "5"))
ACCEL = os.environ.get("VMLAB_ACCEL", "tcg")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^\[\s*([0-9.]+)s\]\s+(.*)$")


def spec(tmp: str, guest: str, name: str, nodes: dict) -> str:
    for node in nodes.values():
        node.update({"kernel": f"{guest}/kernel", "initrd": f"{guest}/initrd", "cmdline": "quiet"})
    path = os.path.join(tmp, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"name": name, "nodes": nodes}, f)
    return path


def snapshot(vmlab: str, network: str, out: str, compress: str) -> float:
    start = time.monotonic()
    subprocess.run([vmlab, "snapshot", network, "--out", out, "--compress", compress, "--accel", ACCEL],
                   check=True, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def test(vmlab: str, network: str, script: str, out: str, snap: str | None) -> float:
    """Wall time of a passing `vmlab test`."""
    args = [vmlab, "test", network, script, "--out", out, "--accel", ACCEL]
    if snap:
        args += ["--snapshot", snap]
    start = time.monotonic()
    done = subprocess.run(args, stderr=subprocess.PIPE, text=True)
    took = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"vmlab test failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return took


def first_answer(log: str, machine: str) -> float:
    """From the machine's "starting" to its first answered command, in the log."""
    started = answered = None
    for line in open(log):
        m = LINE.match(line)
        if not m:
            continue
        t, what = float(m.group(1)), m.group(2)
        if what == f"{machine}: starting":
            started = t
        elif started is not None and what.startswith(f"{machine}: must succeed: true (exit 0"):
            answered = t
            break
    if started is None or answered is None:
        raise RuntimeError(f"no start or answer of {machine} in {log}")
    return answered - started


def main() -> None:
    vmlab = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/vmlab")
    example = os.path.join(ROOT, "examples/webserver")
    print(f"accelerator {ACCEL}, {RUNS} runs each, medians")
    with tempfile.TemporaryDirectory() as tmp:
        guest = os.path.join(tmp, "guest")
        subprocess.run([vmlab, "guest", "--out", guest, "--rc", f"{example}/rc.sh",
                        "--add", f"{example}/www:/var/www"], check=True, stdout=subprocess.DEVNULL)
        one = spec(tmp, guest, "one", {"m": {"memory": 256}})
        script = os.path.join(tmp, "first.py")
        with open(script, "w") as f:
            f.write('m.succeed("true")\n')
        for compress in ("zstd", "none"):
            saves, answers = [], []
            for run in range(RUNS):
                snap = os.path.join(tmp, f"snap-{compress}-{run}")
                saves.append(snapshot(vmlab, one, snap, compress))
                out = os.path.join(tmp, f"out-{compress}-{run}")
                test(vmlab, one, script, out, snap)
                answers.append(first_answer(os.path.join(out, "vmlab.log"), "m"))
            size = sum(os.path.getsize(os.path.join(snap, f)) for f in os.listdir(snap)) / 2**20
            print(f"one machine, {compress:4}: snapshot {statistics.median(saves):5.2f} s, {size:5.1f} MiB; "
                  f"start to first answer {statistics.median(answers):5.2f} s (min {min(answers):.2f})")

        pair = spec(tmp, guest, "webserver", {"server": {"memory": 256, "forwardPorts": [{"host": 8081, "guest": 80}]},
                                             "client": {"memory": 256}})
        snap = os.path.join(tmp, "snap-pair")
        snapshot(vmlab, pair, snap, "zstd")
        cold, warm = [], []
        for run in range(RUNS):
            cold.append(test(vmlab, pair, f"{example}/test.py", os.path.join(tmp, f"cold-{run}"), None))
            warm.append(test(vmlab, pair, f"{example}/test.py", os.path.join(tmp, f"warm-{run}"), snap))
        c, w = statistics.median(cold), statistics.median(warm)
        print(f"webserver example test: cold {c:5.2f} s, restored {w:5.2f} s, ratio {w / c:.2f}")


if __name__ == "__main__":
    main()
