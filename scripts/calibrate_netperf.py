"""Calibrate the single-level guest's per-packet stack costs on Turtles' netperf figure.

Turtles (OSDI 2010, netperf TCP_STREAM over 1 GbE, read off its figure):
single-level virtio reaches about 935 Mb/s at about 48% CPU. The only
parameters solved here are ``guest_tx_packet`` (and ``guest_rx_packet``,
kept at half of it: an estimate, see sim/costs.py): the utilization of the
CPU running the guest's vCPU is linear in them at a fixed packet rate, so
two runs and a line give the value, and a third run checks it.

    python scripts/calibrate_netperf.py [--duration 0.5]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from xlio.backends.netperf import NetperfModel, NetperfOptions, Path, Test
from xlio.sim.presets import PRESETS

TARGET_CPU = 0.48  # Turtles: single-level virtio, TCP_STREAM, 1 GbE
TARGET_MBPS = 935


def cpu_at(tx: float, duration: float) -> tuple[float, float]:
    costs = replace(
        PRESETS["turtles-2010"], guest_tx_packet=round(tx), guest_rx_packet=round(tx / 2)
    )
    r = NetperfModel(costs, NetperfOptions(Test.TCP_STREAM, Path.SINGLE, duration=duration)).run()
    return r["cpu"]["cpu0"], r["throughput_mbps"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=0.5)
    a = ap.parse_args()
    lo, hi = 5_000.0, 15_000.0
    u_lo, _ = cpu_at(lo, a.duration)
    u_hi, _ = cpu_at(hi, a.duration)
    tx = lo + (TARGET_CPU - u_lo) * (hi - lo) / (u_hi - u_lo)
    u, mbps = cpu_at(tx, a.duration)
    print(f"guest_tx_packet = {round(tx)} cycles, guest_rx_packet = {round(tx / 2)}")
    print(f"check: {mbps:.0f} Mb/s (Turtles ~{TARGET_MBPS}) at {u:.1%} CPU (Turtles ~48%)")


if __name__ == "__main__":
    main()
