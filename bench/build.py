#!/usr/bin/env python3
"""Times `vmlab build` on generated networks: 254 nodes x 16 vlans, and 25 nodes.

Usage: bench/build.py [path/to/vmlab]   (default: target/release/vmlab)
Prints one line per network: nodes, vlans per node, median and min wall time
over several runs, and the output size.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = 15


def spec(nodes: int, vlans: int, kernel: str) -> dict:
    return {
        "name": f"bench{nodes}",
        "nodes": {
            f"node{i:03}": {"kernel": kernel, "vlans": list(range(1, vlans + 1))}
            for i in range(nodes)
        },
    }


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vmlab = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "target/release/vmlab")
    with tempfile.TemporaryDirectory() as tmp:
        kernel = os.path.join(tmp, "kernel")
        open(kernel, "w").close()
        for nodes, vlans in [(254, 16), (25, 1)]:
            path = os.path.join(tmp, f"spec-{nodes}.json")
            with open(path, "w") as f:
                json.dump(spec(nodes, vlans, kernel), f)
            times = []
            for run in range(RUNS):
                out = os.path.join(tmp, f"out-{nodes}-{run}")
                start = time.perf_counter()
                subprocess.run([vmlab, "build", path, "--out", out], check=True)
                times.append(time.perf_counter() - start)
            size = sum(
                os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs
            )
            print(
                f"vmlab build: {nodes:3} nodes x {vlans:2} vlans: "
                f"median {statistics.median(times) * 1000:6.1f} ms, "
                f"min {min(times) * 1000:6.1f} ms over {RUNS} runs, output {size / 1024:.0f} KiB"
            )


if __name__ == "__main__":
    main()
