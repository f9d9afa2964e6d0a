"""Frames per second through each path over the loopback wire, against a bare copy loop.

Side by side in one run (these machines are noisy, so compare ratios): the
same UDP frames go (a) through a bare loop that copies each frame into a
buffer and back out, the least any datapath must do, and (b) L2 -> L0 wire
through ``single``, ``l1`` and ``l0`` (workload ``tx``), with every exit
charged by the model. Best of three runs per row.

    python scripts/bench_datapath.py [--frames N] [--batch B] [--frame-size S]
"""

from __future__ import annotations

import argparse
import time

from xlio.backends.datapath import _guest_frames, datapath_options, make_datapath
from xlio.measure import make_config
from xlio.packets import UDP_DISCARD_PORT
from xlio.sim.nested import NestedVmx


def bare_copy(frames: list[bytes]) -> float:
    buf = bytearray(2048)
    out = []
    t0 = time.perf_counter()
    for f in frames:
        n = len(f)
        buf[12 : 12 + n] = f
        out.append(bytes(buf[12 : 12 + n]))
    return len(frames) / (time.perf_counter() - t0)


def through(path: str, frames: list[bytes], batch: int) -> float:
    m = NestedVmx(make_config("turtles-2010", path))
    dp = make_datapath(m, path, datapath_options({"batch": batch}))
    t0 = time.perf_counter()
    for i in range(0, len(frames), batch):
        dp.send(frames[i : i + batch])
    dt = time.perf_counter() - t0
    assert dp.wire.frames_to_peer == len(frames)
    return len(frames) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--frame-size", type=int, default=256)
    a = ap.parse_args()
    frames = _guest_frames(0, a.frames, a.frame_size, UDP_DISCARD_PORT)
    base = max(bare_copy(frames) for _ in range(3))
    print(f"{a.frames} frames of {a.frame_size} bytes, batch {a.batch}")
    print(f"{'path':<12}{'frames/s':>14}{'ratio to bare copy':>22}")
    print(f"{'bare copy':<12}{base:>14,.0f}{1.0:>22.3f}")
    for path in ("single", "l1", "l0"):
        fps = max(through(path, frames, a.batch) for _ in range(3))
        print(f"{path:<12}{fps:>14,.0f}{fps / base:>22.3f}")


if __name__ == "__main__":
    main()
