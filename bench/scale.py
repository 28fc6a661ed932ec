#!/usr/bin/env python3
"""Time from `vmlab up` to every backdoor ready for 1, 10, 20 and 40 default
guests of 96 MiB on one vlan, with the time per machine per core: a network
that scales linearly keeps that figure flat.

Usage: bench/scale.py [path/to/vmlab]   (default: target/release/vmlab)
Set VMLAB_ACCEL to choose the accelerator (default tcg), COUNTS to choose the
sizes ("1 10 20 40"), RUNS for runs per size (default 1; median printed).
"""
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from boot import with_vmlab  # noqa: E402  (the same timing as bench/boot.py)

import json  # noqa: E402

RUNS = int(os.environ.get("RUNS", "1"))
COUNTS = [int(c) for c in os.environ.get("COUNTS", "1 10 20 40").split()]
ACCEL = os.environ.get("VMLAB_ACCEL", "tcg")


def build(vmlab: str, tmp: str, count: int) -> str:
    guest = os.path.join(tmp, "guest")
    if not os.path.isdir(guest):
        subprocess.run([vmlab, "guest", "--out", guest], check=True, stdout=subprocess.DEVNULL)
    node = {"kernel": f"{guest}/kernel", "initrd": f"{guest}/initrd", "cmdline": "quiet", "memory": 96}
    spec = {"name": f"scale{count}", "nodes": {f"m{i}": node for i in range(count)}}
    path = os.path.join(tmp, f"spec{count}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    out = os.path.join(tmp, f"net{count}")
    subprocess.run([vmlab, "build", path, "--out", out], check=True, stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vmlab = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "target/release/vmlab")
    cores = os.cpu_count() or 1
    print(f"accelerator {ACCEL}, {cores} cores, {RUNS} run(s) each, median seconds to every backdoor ready")
    print("| machines | machines per core | all up | seconds per machine per core |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for count in COUNTS:
            out = build(vmlab, tmp, count)
            t = statistics.median(with_vmlab(vmlab, out, count) for _ in range(RUNS))
            per_core = count / cores
            print(f"| {count} | {per_core:.1f} | {t:.2f} s | {t / per_core:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
