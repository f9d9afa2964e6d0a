"""Soak: a long UDP echo run through each path over a real tap, every byte checked.

For each path (``single``, ``l1``, ``l0``) a fresh namespace; a UDP socket
inside it sends datagrams to the L2 guest's echo port one at a time (a
strict request/response, so every window of the run is the same sequence
of exits), each with a payload derived from its sequence number, and checks
that every echo comes back byte for byte. Stops at ``--frames`` frames
through L2's NIC (a request and its echo are two) or ``--minutes``.

Reports per path: frames, echoes checked, mismatches, lost (counted), the
device's and the tap's drop counters, resident memory after warm-up and at
the end (the target: within 5%), and L2/L1/L0 exits per frame over the
first and the last window (the target: identical). Needs CAP_NET_ADMIN and
CAP_SYS_ADMIN; removes what it builds, also on Ctrl-C.

    python scripts/soak.py [--frames 1000000] [--minutes 10] [--paths single,l1,l0]
                           [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from typing import Any

import trio

from xlio.backends.netns import NamespacedTap
from xlio.backends.wire import GUEST_MAC
from xlio.packets import UDP_ECHO_PORT
from xlio.tapsession import (
    TapSession,
    pin_neighbour,
    run_script,
    socket_in_netns,
    trio_run_stoppable,
)

WARMUP = 2_000  # echoes before the first memory reading and the first window
WINDOW = 5_000  # echoes in each window whose exits per frame are compared
EXIT_KEYS = ("l2_exits", "l1_exits", "l0_exits", "reflected", "l1_be_exits", "crossings")


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def payload(seq: int) -> bytes:
    """64 to 1,024 bytes that only this sequence number produces."""
    digest = hashlib.blake2b(seq.to_bytes(8, "little")).digest()
    n = 64 + seq * 37 % 961
    return seq.to_bytes(8, "little") + (digest * (n // 64 + 1))[: n - 8]


class Soak:
    def __init__(self, session: TapSession) -> None:
        self.s = session
        self.echoes = 0
        self.lost = 0
        self.mismatched = 0
        self.rss: list[int] = []
        self.windows: list[dict[str, float]] = []

    def frames(self) -> int:
        return self.s.frames()

    def snapshot(self) -> tuple[dict[str, float], int]:
        return dict(self.s.m.stats.summary()), self.frames()

    async def echo(self, sock: trio.socket.SocketType, seq: int) -> None:
        """One request to the guest's echo port; its echo checked byte for byte."""
        data = payload(seq)
        await sock.sendto(data, (self.s.info.guest_ip, UDP_ECHO_PORT))
        with trio.move_on_after(1.0):
            while True:
                got, _ = await sock.recvfrom(2048)
                if got[:8] == data[:8]:
                    break  # (a late echo of an earlier one is skipped)
            self.echoes += 1
            self.mismatched += got != data
            return
        self.lost += 1

    async def run(self, frames: int, seconds: float) -> None:
        info = self.s.info
        sock = trio.socket.from_stdlib_socket(socket_in_netns(info.netns))
        await sock.bind((info.host_ip, 0))
        start = time.monotonic()
        marks: dict[str, tuple[dict[str, float], int]] = {}
        seq = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(self.s.run)
            while self.frames() < frames and time.monotonic() - start < seconds:
                if self.echoes == WARMUP:
                    self.rss.append(rss_kib())
                    marks["first"] = self.snapshot()
                if self.echoes == WARMUP + WINDOW:
                    marks["first_end"] = self.snapshot()
                seq += 1
                await self.echo(sock, seq)
            # the last window: as many echoes again, then compare
            marks["last"] = self.snapshot()
            for _ in range(WINDOW):
                seq += 1
                await self.echo(sock, seq)
            marks["last_end"] = self.snapshot()
            self.rss.append(rss_kib())
            nursery.cancel_scope.cancel()
        sock.close()
        for a, b in (("first", "first_end"), ("last", "last_end")):
            (s0, f0), (s1, f1) = marks[a], marks[b]
            n = max(f1 - f0, 1)
            self.windows.append({k: round((s1[k] - s0[k]) / n, 6) for k in EXIT_KEYS})


def soak_path(path: str, frames: int, seconds: float) -> dict[str, Any]:
    host = NamespacedTap()
    try:
        host.open()
        session = TapSession(path, host, preset="kvm-2019" if path == "l0" else "turtles-2010")
        # no ARP probes from the namespace's kernel in the middle of a window
        pin_neighbour(session.info, GUEST_MAC)
        soak = Soak(session)
        t = time.perf_counter()
        trio_run_stoppable(soak.run, frames, seconds)
        wall = time.perf_counter() - t
        dev = session.dp.active_device()
        metrics = dict(dev.metrics) if dev is not None else {}
        tap = session.wire.metrics()
    finally:
        host.close()
    rss0, rss1 = soak.rss
    drops = metrics.get("rx_fails", 0) + metrics.get("tx_fails", 0) + tap["tap_write_fails"]
    return {
        "path": path, "frames": soak.frames(), "echoes_checked": soak.echoes,
        "mismatched": soak.mismatched, "lost": soak.lost, "drops_counted": drops,
        "wall_s": round(wall, 1), "frames_per_s": round(soak.frames() / wall),
        "rss_kib_after_warmup": rss0, "rss_kib_end": rss1,
        "rss_growth": round(rss1 / rss0 - 1, 4),
        "exits_per_frame_first_window": soak.windows[0],
        "exits_per_frame_last_window": soak.windows[1],
        "identical": soak.windows[0] == soak.windows[1],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1_000_000, help="per path")
    ap.add_argument("--minutes", type=float, default=10.0, help="per path, at most")
    ap.add_argument("--paths", default="single,l1,l0")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    rows = []
    for path in a.paths.split(","):
        r = soak_path(path, a.frames, a.minutes * 60)
        rows.append(r)
        print(
            f"{path:<7}{r['frames']:>10,} frames {r['echoes_checked']:>9,} echoes checked "
            f"{r['mismatched']} mismatched {r['lost']} lost {r['drops_counted']} drops counted "
            f"RSS {r['rss_kib_after_warmup']:,} -> {r['rss_kib_end']:,} KiB "
            f"({100 * r['rss_growth']:+.1f}%), exits per frame in the first and the last "
            f"window identical: {r['identical']} ({r['wall_s']} s, {r['frames_per_s']:,} frames/s)",
            flush=True,
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    ok = all(r["mismatched"] == 0 and r["identical"] and r["rss_growth"] <= 0.05 for r in rows)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    run_script(main)  # a stop signal removes the namespaces built
