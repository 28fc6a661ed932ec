#!/usr/bin/env python3
"""What one command costs inside the guest, in guest instructions.

Usage: bench/command_cost.py [path/to/vmlab]   (default: target/release/vmlab)

Wall-clock figures under TCG swing by a factor of two on a shared machine,
which hides differences of 10 or 20 %. This bench boots the default guest
with `-icount shift=0,sleep=off`: the guest's clock then advances one
nanosecond per instruction, so `$EPOCHREALTIME` differences inside the guest
count instructions, the same from run to run. It runs each piece of what
the data port's shell does for one command 100 times in a loop in the guest
and prints the thousands of instructions each costs: the subshell that
isolates every command (a fork of bash), the redirections, the sizes read
from /proc, the reply's `printf`, and the whole `__vmlab_r` for `true` and
for `echo hi`. Instructions are not time (a page fault or a TLB flush costs
the emulator more than its instructions say), but they show where a
command's cost is and whether a change removes any.
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 100
REPLY = "printf '%s out\\n%s err\\n%s end %s 0 0\\n' t t t 0"
# (label, loop body, set-up run once before the loop)
PIECES = [
    ("empty loop", ":", ""),
    ("subshell `( : )` (fork, exit, wait)", "( : )", ""),
    ("subshell with set -eu, pipefail and eval", "( set -eu -o pipefail --; eval true )", ""),
    ("subshell with the output descriptors", "{ ( : ) </dev/null >&3 2>&4 3>&- 4>&-; } 3>/tmp/xo 4>/tmp/xe", ""),
    ("sizes from /proc/self/fdinfo (2 reads)",
     "{ read -r p so </proc/self/fdinfo/3; read -r p se </proc/self/fdinfo/4; } 3>/tmp/xo 4>/tmp/xe", ""),
    ("the empty reply's printf", REPLY, ""),
    ("a shell function call", "f", "f() { :; }"),
    ("`stat -c %s` (a program)", "stat -c %s /tmp/xo", ": >/tmp/xo"),
    ("__vmlab_r for `true`", "__vmlab_r t - true", ""),
    ("__vmlab_r for `echo hi`", "__vmlab_r t - 'echo hi'", ""),
]

SCRIPT = r"""
import json
pieces = json.loads(%(pieces)r)
costs = {}
for label, body, setup in pieces:
    out = server.succeed(
        "( __vmlab_d=/tmp/bench.d; mkdir -p $__vmlab_d; %%s; s=${EPOCHREALTIME/./}; "
        "for ((i=0;i<%(n)d;i++)); do %%s; done; e=${EPOCHREALTIME/./}; echo $(( (e-s)/%(n)d )) >&9 ) "
        "9>/tmp/bench.res >/dev/null 2>&1; cat /tmp/bench.res" %% (setup or ":", body))
    costs[label] = int(out)
print("RESULT " + json.dumps(costs), flush=True)
"""


def main():
    vmlab = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/vmlab")
    with tempfile.TemporaryDirectory() as tmp:
        guest = os.path.join(tmp, "guest")
        subprocess.run([vmlab, "guest", "--out", guest], check=True, stdout=subprocess.DEVNULL)
        node = {"kernel": f"{guest}/kernel", "initrd": f"{guest}/initrd", "memory": 256, "cmdline": "quiet",
                "qemuOptions": ["-icount", "shift=0,sleep=off"]}
        spec = os.path.join(tmp, "cost.json")
        with open(spec, "w") as f:
            json.dump({"name": "cost", "nodes": {"server": node}}, f)
        script = os.path.join(tmp, "cost.py")
        with open(script, "w") as f:
            f.write(SCRIPT % {"pieces": json.dumps(PIECES), "n": N})
        out = subprocess.run([vmlab, "test", spec, script, "--out", os.path.join(tmp, "out")],
                             stderr=subprocess.PIPE, text=True)
        lines = [l for l in out.stderr.splitlines() if "RESULT " in l]
        if out.returncode != 0 or not lines:
            sys.exit(f"vmlab test failed:\n{out.stderr}")
        costs = json.loads(lines[0].split("RESULT ", 1)[1])
        loop = costs.pop("empty loop")
        print(f"thousands of guest instructions per run (the loop's own {loop} taken off):")
        for label, cost in costs.items():
            print(f"  {cost - loop:7d}  {label}")


if __name__ == "__main__":
    main()
