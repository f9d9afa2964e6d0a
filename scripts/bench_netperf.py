"""Speed of the timed model: one modeled second of 1 GbE TCP_STREAM per path.

Target (issue 9): one modeled second (about 81,000 full-size packets) in at
most 5 s of wall time. The baseline, measured in the same run, is SimPy
itself: one bare timeout per packet, the engine's floor for this packet
count. Prints wall seconds, modeled packets per wall second and the ratio
to the baseline, per path.

    python scripts/bench_netperf.py [--duration 1.0] [--preset turtles-2010]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Generator
from typing import Any

import simpy

from xlio.backends.netperf import NetperfModel, NetperfOptions, Path, Test
from xlio.sim.presets import PRESETS


def bare_simpy(packets: int) -> float:
    """Packets per wall second of a SimPy loop doing nothing but one timeout each."""
    env = simpy.Environment()

    def loop() -> Generator[simpy.Event, Any, None]:
        for _ in range(packets):
            yield env.timeout(1e-5)

    env.process(loop())
    t = time.perf_counter()
    env.run()
    return packets / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=1.0)
    ap.add_argument("--preset", default="turtles-2010")
    a = ap.parse_args()
    print(f"{a.duration:g} modeled s of TCP_STREAM on 1 GbE, preset {a.preset}")
    print(f"{'run':<12}{'wall s':>8}{'packets':>10}{'packets/wall s':>16}{'vs bare SimPy':>15}")
    rows = []
    for path in Path:
        opts = NetperfOptions(Test.TCP_STREAM, path, duration=a.duration)
        model = NetperfModel(PRESETS[a.preset], opts)
        t = time.perf_counter()
        model.run()
        wall = time.perf_counter() - t
        packets = model.totals["guest_sent"]
        base = bare_simpy(packets)
        rows.append((path.value, wall, packets, packets / wall, packets / wall / base))
        print(f"{path.value:<12}{wall:>8.2f}{packets:>10,}{packets / wall:>16,.0f}"
              f"{packets / wall / base:>15.3f}")  # fmt: skip
    print(f"bare SimPy: {base:,.0f} timeouts per wall second")


if __name__ == "__main__":
    main()
