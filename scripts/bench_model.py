"""Modeled exits per second of the nested VMX model, tracing off and on.

Runs every micro-workload on the nested classic path (the exit-heaviest one)
in one process, side by side, and prints modeled L0 exits per wall-clock
second. Target (issue 2): at least 1,000,000 with tracing off on one core.

    python scripts/bench_model.py [--seconds S]
"""

from __future__ import annotations

import argparse
import time

from xlio.sim.nested import Config, NestedVmx
from xlio.sim.presets import PRESETS
from xlio.sim.workloads import WORKLOADS


def rate(workload: str, preset: str, trace: bool, seconds: float) -> tuple[float, int]:
    """Best of three runs of ``seconds`` each: (exits per second, exits counted)."""
    best = 0.0
    total = 0
    for _ in range(3):
        m = NestedVmx(Config.from_preset(PRESETS[preset], trace=trace))
        op = WORKLOADS[workload].build(m, "l1", {})
        m.reset_stats()
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for _ in range(1000):
                op()
            n += 1000
            if time.perf_counter() >= deadline:
                break
        dt = time.perf_counter() - t0
        exits = m.stats.l0_exits
        best = max(best, exits / dt)
        total += exits
    return best, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=0.5)
    a = ap.parse_args()
    head = ("workload", "preset", "exits/s trace off", "exits/s trace on", "ratio")
    print(f"{head[0]:<12}{head[1]:<14}{head[2]:>20}{head[3]:>20}{head[4]:>8}")
    for preset in PRESETS:
        for w in ("cpuid", "vmcall", "io-kick", "io-user", "mmio-kick"):
            off, _ = rate(w, preset, False, a.seconds)
            on, _ = rate(w, preset, True, a.seconds)
            print(f"{w:<12}{preset:<14}{off:>20,.0f}{on:>20,.0f}{off / on:>8.1f}")


if __name__ == "__main__":
    main()
