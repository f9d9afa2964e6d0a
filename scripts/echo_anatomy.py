"""Where one UDP echo round trip's time goes, on the tap and in process.

On the tap (as ``scripts/bench.py``'s echo rows: a fresh namespace, the
responder a child forked for the measurement, client and responder on CPU
0): for the floor (the straight-line ring) and for the path, the mean round
trip of each quarter of ``--trips`` timed trips after ``--warmup`` untimed
ones, the responder's CPU time and context switches per trip (``wait4``'s
rusage: a wait is a voluntary switch, a preemption by the woken client an
involuntary one), and, inside the serving child, the time per ``Datapath.pump`` (one
request), per ``TapWire.transmit`` (the reply's ``os.write``, which
delivers it to the client) and per ``TapWire.read_available``.

In process (``--calls``): the Python function calls and the C calls one
request makes on the path, on the loopback wire, counted with
``sys.setprofile`` over 10 requests after 300 of warm-up; then the replayed
machine operations per request and their mean time over 20,000 requests.

    python scripts/echo_anatomy.py l0|l1 [--trips 2000] [--warmup 20] [--calls]
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import trio
from bench import GUEST_MAC, on_cpu, serve_child, tap_session

from xlio.backends.device import with_rx_header
from xlio.packets import UDP_ECHO_PORT, udp_frame_of_size
from xlio.tapsession import TapSession, pin_neighbour, run_script, socket_in_netns


def quarters(s: TapSession, trips: int, warmup: int) -> list[float]:
    """Mean round trip (us) of each quarter of ``trips``, after ``warmup``."""
    sock = socket_in_netns(s.info.netns)
    with sock:
        sock.settimeout(2.0)
        sock.bind((s.info.host_ip, 0))
        to = (s.info.guest_ip, UDP_ECHO_PORT)
        for _ in range(warmup):
            sock.sendto(b"p" * 32, to)
            sock.recvfrom(2048)
        out = []
        for _ in range(4):
            t = time.perf_counter()
            for _ in range(trips // 4):
                sock.sendto(b"p" * 32, to)
                sock.recvfrom(2048)
            out.append((time.perf_counter() - t) / (trips // 4) * 1e6)
        return out


def _timed(totals: list[float], f: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        t = time.perf_counter()
        try:
            return f(*args)
        finally:
            totals[0] += time.perf_counter() - t
            totals[1] += 1

    return call


def serve_instrumented(s: TapSession, report: int) -> int:
    """Fork the session's datapath under trio on CPU 0, its pump, write and
    read timed; on SIGTERM it writes the means to the ``report`` fd."""
    pid = os.fork()
    if pid:
        return pid
    os.sched_setaffinity(0, {0})
    dp, wire = s.dp, s.wire
    t = {k: [0.0, 0] for k in ("pump", "transmit", "read_available")}
    dp.pump = _timed(t["pump"], dp.pump)  # type: ignore[method-assign]
    wire.transmit = _timed(t["transmit"], wire.transmit)  # type: ignore[method-assign]
    wire.read_available = _timed(t["read_available"], wire.read_available)  # type: ignore[method-assign]

    def done(*_: Any) -> None:
        line = "; ".join(f"{k} {v[0] / max(v[1], 1) * 1e6:.1f} us x {v[1]}" for k, v in t.items())
        os.write(report, (line + "\n").encode())
        os._exit(0)

    signal.signal(signal.SIGTERM, done)
    try:
        trio.run(s.run)
    finally:
        os._exit(0)


def on_tap(path: str, trips: int, warmup: int) -> None:
    with tap_session(path) as s:
        pin_neighbour(s.info, GUEST_MAC)
        r, w = os.pipe()
        for who in ("floor", path):
            pid = serve_child(s, "ring", 0) if who == "floor" else serve_instrumented(s, w)
            try:
                time.sleep(0.2)
                with on_cpu(0):
                    q = quarters(s, trips, warmup)
            finally:
                os.kill(pid, signal.SIGTERM)
                _, _, ru = os.wait4(pid, 0)
            n = trips + warmup
            print(f"{who}: round trip by quarter of {trips:,} after {warmup:,} untimed: "
                  + ", ".join(f"{x:.1f}" for x in q) + " us; the responder's CPU "
                  f"{(ru.ru_utime + ru.ru_stime) / n * 1e6:.1f} us a trip (user "
                  f"{ru.ru_utime / n * 1e6:.1f}), context switches a trip: "
                  f"{ru.ru_nvcsw / n:.2f} waits, {ru.ru_nivcsw / n:.2f} preempted")  # fmt: skip
        print(f"{path} server: " + os.read(r, 400).decode().strip())


def calls(path: str) -> None:
    from xlio.backends.datapath import datapath_options, make_datapath
    from xlio.backends.wire import GUEST_IP, PEER_IP, PEER_MAC, Inbox
    from xlio.measure import make_config
    from xlio.sim.arch import machine_for

    class Sink(Inbox):
        def transmit(self, frames: list[bytes]) -> None:
            pass

    m = machine_for(make_config("kvm-2019" if path == "l0" else "turtles-2010", path))
    wire = Sink()
    dp = make_datapath(m, path, datapath_options({}), wire=wire)
    dp.endpoint.neighbors[PEER_IP] = PEER_MAC
    req = with_rx_header(
        udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, UDP_ECHO_PORT, 74, 1)
    )

    def one() -> None:
        wire.to_guest.append(req)
        dp.pump()
        dp.l2_idle()

    dp.l2_idle()
    for _ in range(300):
        one()
    seen: collections.Counter[str] = collections.Counter()

    def prof(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            seen["python"] += 1
        elif event == "c_call":
            seen["C"] += 1

    sys.setprofile(prof)
    for _ in range(10):
        one()
    sys.setprofile(None)
    print(f"{path}: {seen['python'] / 10:.0f} Python calls and {seen['C'] / 10:.0f} C calls "
          "per request")  # fmt: skip
    # the replayed machine operations among them, timed (20,000 requests)
    spent = [0.0, 0]
    dp._machine = _timed(spent, dp._machine)  # type: ignore[method-assign]
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        one()
    total = (time.perf_counter() - t) / n * 1e6
    print(
        f"{path}: {spent[1] / n:.0f} machine operations per request, "
        f"{spent[0] / spent[1] * 1e6:.2f} us each (timer included), "
        f"of {total:.1f} us per request"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", choices=("l0", "l1"))
    ap.add_argument("--trips", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--calls", action="store_true", help="count calls in process instead")
    a = ap.parse_args()
    if a.calls:
        calls(a.path)
    else:
        on_tap(a.path, a.trips, a.warmup)


if __name__ == "__main__":
    run_script(main)  # a stop signal removes the namespaces built
