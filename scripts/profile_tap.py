"""Drive a tap path for a while, for a sampling profiler to look at.

``tx``: 64-byte frames from L2 in batches of 64 through ``l0`` or ``l1`` on
a real tap (a fresh namespace, removed at the end), as ``scripts/bench.py``'s
TX row. ``echo``: the session serves under trio in this process while a
forked child sends UDP echo requests from the namespace, one at a time, as
the echo row does (the profiler sees the server only).

    py-spy record -f raw -r 400 -o prof.txt -- python scripts/profile_tap.py tx l0 8
    python scripts/pyspy_top.py prof.txt [--layers]
"""

from __future__ import annotations

import os
import select
import signal
import sys
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


def echo(s: TapSession, seconds: float) -> None:
    pin_neighbour(s.info, GUEST_MAC)
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
    kind, path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with tap_session(path) as s:
        {"tx": tx, "echo": echo}[kind](s, seconds)


if __name__ == "__main__":
    run_script(main)  # a stop signal removes the namespaces built
