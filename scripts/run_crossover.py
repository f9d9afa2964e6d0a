"""From how many entries ring work in runs pays off: the basis of ``RUN_MIN``.

For each batch size k, µs of Python per frame on ``l0`` (kvm-2019, the
loopback wire with a sink in place of the peer), best of ``--runs``, with
runs used for every batch (``RUN_MIN`` 1) and for none (one entry at a
time): TX, L2 sending k frames a call; RX, k frames on the wire, pumped
into L2. A ratio under 1 means runs are faster at that size.

    python scripts/run_crossover.py [--sizes 4,8,16,24,32,64] [--runs 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from xlio import virtio
from xlio.backends import datapath, device, virtqueue
from xlio.backends.device import with_rx_header
from xlio.backends.wire import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC, Inbox
from xlio.frontends import virtio_net
from xlio.measure import make_config
from xlio.packets import UDP_DISCARD_PORT, udp_frame_of_size
from xlio.sim.arch import machine_for


class Sink(Inbox):
    def transmit(self, frames: list[bytes]) -> None:
        pass


def _datapath() -> tuple[datapath.Datapath, Sink]:
    m = machine_for(make_config("kvm-2019", "l0"))
    wire = Sink()
    return datapath.make_datapath(m, "l0", datapath.datapath_options({}), wire=wire), wire


def tx(k: int, n: int = 20000) -> float:
    dp, _ = _datapath()
    frames = [
        udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_DISCARD_PORT, 64, i)
        for i in range(k)
    ]
    for _ in range(300):
        dp.send(frames)
    reps = n // k
    t = time.perf_counter()
    for _ in range(reps):
        dp.send(frames)
    return (time.perf_counter() - t) / (reps * k) * 1e6


def rx(k: int, n: int = 20000) -> float:
    dp, wire = _datapath()
    frames = [
        with_rx_header(
            udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, UDP_DISCARD_PORT, 64, i)
        )
        for i in range(k)
    ]
    for _ in range(300):
        wire.to_guest.extend(frames)
        dp.pump()
    reps = n // k
    t = time.perf_counter()
    for _ in range(reps):
        wire.to_guest.extend(frames)
        dp.pump()
    return (time.perf_counter() - t) / (reps * k) * 1e6


def run_min(value: int) -> None:
    """Set ``RUN_MIN`` where the rings read it."""
    for mod in (virtio, virtqueue, device, virtio_net):
        mod.RUN_MIN = value  # type: ignore[attr-defined,union-attr]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4,8,16,24,32,64")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    kept = virtio.RUN_MIN
    rows: dict[tuple[str, int, str], float] = {}
    ways: dict[str, Callable[[int], float]] = {"tx": tx, "rx": rx}
    try:
        for _ in range(a.runs):
            for name, f in ways.items():
                for k in sizes:
                    for mode, value in (("runs", 1), ("one", 1 << 30)):
                        run_min(value)
                        us = f(k)
                        key = (name, k, mode)
                        rows[key] = min(us, rows.get(key, us))
    finally:
        run_min(kept)
    print(f"RUN_MIN is {kept}; us per frame on l0, best of {a.runs}")
    print(f"{'way':<4}{'k':>5}{'runs':>10}{'one by one':>12}{'runs/one':>10}")
    for name in ways:
        for k in sizes:
            r, o = rows[(name, k, "runs")], rows[(name, k, "one")]
            print(f"{name:<4}{k:>5}{r:>10.3f}{o:>12.3f}{r / o:>10.2f}")


if __name__ == "__main__":
    main()
