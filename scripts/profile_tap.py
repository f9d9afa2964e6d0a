"""Drive a tap path for a while, for a sampling profiler to look at.

``tx``: 64-byte frames from L2 in batches of 64 through ``l0`` or ``l1`` on
a real tap (a fresh namespace, removed at the end), as ``scripts/bench.py``'s
TX row. ``echo``: the session serves under trio in this process while a
forked child sends UDP echo requests from the namespace, one at a time, as
the echo row does (the profiler sees the server only); ``--cpu N`` puts
both on CPU N, as the echo rows that the targets judge do.

    py-spy record -f raw -r 400 -o prof.txt -- python scripts/profile_tap.py tx l0 8
    py-spy record -f raw -r 1000 -o prof.txt -- python scripts/profile_tap.py echo l1 8 --cpu 0
    python scripts/pyspy_top.py prof.txt [--layers]
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import time

import trio
from bench import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC, round_trips, tap_session

from xlio.packets import UDP_DISCARD_PORT, udp_frame_of_size
from xlio.tapsession import TapSession, pin_neighbour, run_script


def tx(s: TapSession, seconds: float) -> None:
    frames = [
        udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_DISCARD_PORT, 64, i)
        for i in range(8192)
    ]
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        for i in range(0, len(frames), 64):
            s.dp.send(frames[i : i + 64])
        while not s.wire.flush_backlog():
            select.select([], [s.wire.fd], [], 1.0)


async def _serve_for(s: TapSession, seconds: float) -> None:
    with trio.move_on_after(seconds):
        await s.run()


def echo(s: TapSession, seconds: float, cpu: int | None = None) -> None:
    pin_neighbour(s.info, GUEST_MAC)
    if cpu is not None:  # the client forked below inherits it
        os.sched_setaffinity(0, {cpu})
    pid = os.fork()
    if pid == 0:  # the client: round trips until the time is up
        try:
            time.sleep(0.3)  # the server first
            t = time.perf_counter()
            while time.perf_counter() - t < seconds:
                round_trips(s, 200)
        finally:
            os._exit(0)
    try:
        trio.run(_serve_for, s, seconds + 1.0)
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("tx", "echo"))
    ap.add_argument("path", choices=("l0", "l1"))
    ap.add_argument("seconds", type=float)
    ap.add_argument("--cpu", type=int, help="echo: server and client on this CPU")
    a = ap.parse_args()
    with tap_session(a.path) as s:
        if a.kind == "tx":
            tx(s, a.seconds)
        else:
            echo(s, a.seconds, a.cpu)


if __name__ == "__main__":
    run_script(main)  # a stop signal removes the namespaces built
