"""Drive the tap TX path for a while, for a sampling profiler to look at.

64-byte frames from L2 in batches of 64 through ``l0`` or ``l1`` on a real
tap (a fresh namespace, removed at the end), as ``scripts/bench.py``'s TX row.

    py-spy record -f raw -r 400 -o prof.txt -- python scripts/profile_tap.py l0 8
"""

from __future__ import annotations

import select
import sys
import time

from bench import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC, run_script, tap_session

from xlio.packets import UDP_DISCARD_PORT, udp_frame_of_size


def main() -> None:
    path, seconds = sys.argv[1], float(sys.argv[2])
    frames = [
        udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_DISCARD_PORT, 64, i)
        for i in range(8192)
    ]
    with tap_session(path) as s:
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            for i in range(0, len(frames), 64):
                s.dp.send(frames[i : i + 64])
            while not s.wire.flush_backlog():
                select.select([], [s.wire.fd], [], 1.0)


if __name__ == "__main__":
    run_script(main)  # a stop signal removes the namespaces built
