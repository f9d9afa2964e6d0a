"""Flat cost and memory: per-frame time and peak RSS from 10^3 to 10^6 frames.

Each row is a fresh process running ``measure`` for one workload and count
and reporting its wall time per operation and its own peak resident memory
(VmHWM). Flat means: the per-frame time does not grow with the count (the
first rows carry the set-up) and the peak memory stays where it was at
10^4, whatever the count (nothing is kept per frame).

    python scripts/bench_flat.py [--max 1000000] [--path l0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

#: Every workload measured per operation (a micro exit, a frame, a request);
#: ept-touch and ept-churn are one run each (per page, per modeled second).
PER_OP = ("cpuid", "vmcall", "io-kick", "io-user", "mmio-kick", "tx", "rx", "echo")

CHILD = """
import time
from xlio.measure import measure
t = time.perf_counter()
r = measure({w!r}, {p!r}, 'kvm-2019', count={n})
wall = time.perf_counter() - t
with open('/proc/self/status') as f:
    hwm = int(next(l.split()[1] for l in f if l.startswith('VmHWM:')))
print(wall, hwm, r['per_op']['l0_exits'])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max", type=int, default=1_000_000)
    ap.add_argument("--path", default="l0")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    counts = [10**k for k in range(3, 7) if 10**k <= a.max]
    rows = []
    print(f"{'workload':<10}{'path':<6}" + "".join(f"{n:>22,}" for n in counts))
    print(f"{'':<16}" + "".join(f"{'us/op   MiB  exits/op':>22}" for _ in counts))
    for w in PER_OP:
        cells = []
        for n in counts:
            code = CHILD.format(w=w, p=a.path, n=n)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr)
            wall, hwm, exits = out.stdout.split()
            row = {"workload": w, "path": a.path, "count": n, "us_per_op": float(wall) / n * 1e6,
                   "peak_rss_mib": int(hwm) / 1024, "l0_exits_per_op": float(exits)}  # fmt: skip
            rows.append(row)
            cells.append(f"{row['us_per_op']:>9.2f}{row['peak_rss_mib']:>6.1f}{float(exits):>7.3f}")
        print(f"{w:<10}{a.path:<6}" + "".join(f"{c:>22}" for c in cells), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
