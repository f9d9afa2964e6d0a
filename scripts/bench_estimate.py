"""Speed of the whole-program estimate and the cost of profiling (issue 19's targets).

* ``xlio estimate kbuild`` with every configuration, in process: the best of
  ``--runs`` (target: at most 0.5 s);
* what ``xlio profile`` adds to a command's own run time: a compile loop
  (``gcc -O2 -c`` of a generated C file, ``--compiles`` times, as a build
  does) run bare and under ``xlio profile`` in alternation (A B A B: these
  machines are noisy), the median ratio (target: under 1.02).

    python scripts/bench_estimate.py [--runs 5] [--pairs 5] [--compiles 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from xlio.estimate import estimate
from xlio.profile import load
from xlio.profiles import SHIPPED

C_SOURCE = "\n".join(
    f"int f{i}(int x) {{ int s = 0; for (int j = 0; j < x; j++) s += j * {i} % 7; return s; }}"
    for i in range(100)
)


def estimate_seconds(runs: int) -> float:
    prof = load(SHIPPED["kbuild"])
    best = float("inf")
    for preset in ("turtles-2010", "kvm-2019"):
        for _ in range(runs):
            t = time.perf_counter()
            estimate(prof, preset)
            best = min(best, time.perf_counter() - t)
    return best


def profile_overhead(pairs: int, compiles: int) -> list[tuple[float, float]]:
    """(profiled, bare) wall seconds of the compile loop, alternating."""
    with tempfile.TemporaryDirectory(prefix="xlio-bench-") as tmp:
        src = os.path.join(tmp, "x.c")
        with open(src, "w") as f:
            f.write(C_SOURCE)
        loop = f"for i in $(seq {compiles}); do gcc -O2 -c {src} -o {tmp}/x.o; done"
        bare = ["sh", "-c", loop]
        prof = [sys.executable, "-m", "xlio", "profile", "-o", os.path.join(tmp, "p.toml"),
                "--", *bare]  # fmt: skip

        def wall(cmd: list[str]) -> float:
            t = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return time.perf_counter() - t

        wall(bare)  # warm the compiler's pages
        return [(wall(prof), wall(bare)) for _ in range(pairs)]


def fixed_cost(pairs: int) -> float:
    """What ``xlio profile`` costs around a command that does nothing (``true``):
    Python's start, xlio's imports, the perf probe, perf's own start."""
    with tempfile.TemporaryDirectory(prefix="xlio-bench-") as tmp:
        prof = [sys.executable, "-m", "xlio", "profile", "-o", os.path.join(tmp, "p.toml"), "--",
                "true"]  # fmt: skip
        out = []
        for _ in range(pairs):
            t = time.perf_counter()
            subprocess.run(prof, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            mid = time.perf_counter()
            subprocess.run(["true"], check=True)
            out.append((mid - t) - (time.perf_counter() - mid))
        return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--compiles", type=int, default=20)
    a = ap.parse_args()
    est = estimate_seconds(a.runs)
    verdict = "met" if est <= 0.5 else "NOT MET"
    print(f"xlio estimate kbuild, every configuration, in process: {est:.3f} s "
          f"(best of {a.runs} per preset; target <= 0.5 s: {verdict})")  # fmt: skip
    fixed = fixed_cost(a.pairs)
    print(f"xlio profile -- true, less a bare true: {fixed:.3f} s (the fixed cost: Python, "
          "xlio's imports, the perf probe and perf's start)")  # fmt: skip
    pairs = profile_overhead(a.pairs, a.compiles)
    whole = [p / b for p, b in pairs]
    counting = [(p - fixed) / b for p, b in pairs]
    bare = statistics.median(b for _, b in pairs)
    med = statistics.median(counting)
    print(f"{a.compiles} gcc -O2 -c runs ({bare:.1f} s bare): profiled / bare "
          f"{statistics.median(whole):.4f} (min-max {min(whole):.4f}-{max(whole):.4f}); "
          f"less the fixed cost {med:.4f} (min-max {min(counting):.4f}-{max(counting):.4f}) over "
          f"{a.pairs} pairs; target < 1.02 of the command's own run time: "
          f"{'met' if med < 1.02 else 'NOT MET'}")  # fmt: skip


if __name__ == "__main__":
    main()
