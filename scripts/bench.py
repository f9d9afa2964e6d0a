"""Every speed target in one run: the tap datapath against the Python floor, the model's rate.

Tap rows compare a subject with a baseline, interleaved (A B A B: these
machines are shared and noisy), and report the median ratio with its
min-max over the pairs. The baseline of every xlio row is the *floor*
measured on the same tap in the same run: the least a split ring can do in
Python, straight-line in one function, with no model and no checks (issue
20's targets are ratios to it, ``TARGETS``):

* tap TX: 64-byte frames, L2 sending in batches of 64 through ``l0`` and
  ``l1``, against the straight-line TX ring, frames per second;
* tap RX: a burst of 4,000 64-byte frames queued in the tap by a packet
  socket in the namespace, drained into L2 on ``l0`` and ``l1``, against
  the straight-line RX ring, frames per second;
* vhost-user TX and RX (``bench_vhost.py``): the same frames through xlio's
  vhost-user server on a child, the bench playing the VMM on a memfd, against
  the tap path on the same path in the same run (sending included on both
  sides for RX), target ``VHOST_TARGET``; with ``--guest``, serve's CPU per
  frame under a real guest's TCP stream (QEMU);
* UDP echo: round trips from a socket in the namespace to the L2 guest on
  ``l0`` and ``l1``, against the straight-line ring echo on the raw tap,
  mean time per round trip (ratio: subject over floor), client and
  responder on one CPU (see ``ECHO_ROWS``; reference rows on any CPU).

Each row says whether its median meets its target. Reference rows put the
floors against bare Python (an ``os.write`` loop, an ``os.read`` loop, a
bare responder that swaps addresses) and the bare responder under trio's
event loop (what trio alone adds to a round trip), so that each floor can
be read against what this machine allows.

Model rows are absolute: modeled exits per wall second (cpuid under
shadow-vmcs, tracing off, and the slowest workload and preset), the SVM
model against the VMX model on the same workloads (ratios, >= 1), 1,000
``measure`` configurations in one process, and one modeled second of 1 GbE
TCP_STREAM per path (issue 9). A bare Python loop's rate is printed as the
machine's speed of the day.

Tap rows build their own ``xlio-`` namespaces and remove them, also on
failure. Needs CAP_NET_ADMIN and CAP_SYS_ADMIN for the tap rows.

    python scripts/bench.py [--quick] [--guest] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import socket
import statistics
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from xlio.backends.netns import NamespacedTap
from xlio.backends.wire import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC
from xlio.packets import UDP_DISCARD_PORT, UDP_ECHO_PORT, udp_frame_of_size
from xlio.tapsession import TapSession, pin_neighbour, run_script, socket_in_netns
from xlio.virtio import NET_HDR_SIZE

HDR = bytes(NET_HDR_SIZE)


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    t = time.perf_counter()
    n = 0
    for i in range(2_000_000):
        n += i
    loop = 2_000_000 / (time.perf_counter() - t)
    return {
        "cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(),
        "kernel": platform.release(), "bare_loop_iterations_per_s": round(loop),
    }  # fmt: skip


#: The tap-path targets (issue 20), each a ratio to the floor measured in the
#: same run: frames/s at least this share of the floor's (TX, RX), time per
#: round trip at most this multiple of the floor's (echo).
TARGETS = {
    ("tx", "l0"): ">= 0.75", ("tx", "l1"): ">= 0.5",
    ("rx", "l0"): ">= 0.6", ("rx", "l1"): ">= 0.4",
    ("echo", "l0"): "<= 4", ("echo", "l1"): "<= 6",
}  # fmt: skip


def verdict(row: dict[str, Any]) -> str:
    """Whether a row's median meets its target ("" for a reference row)."""
    target = row["target"]
    if target == "reference":
        return ""
    op, bound = target.split()
    v = row["ratio"] if "ratio" in row else row["subject"]
    ok = v >= float(bound.replace(",", "")) if op == ">=" else v <= float(bound.replace(",", ""))
    return "met" if ok else "NOT MET"


# ---------------------------------------------------------------- helpers
@contextmanager
def tap_session(path: str) -> Iterator[TapSession]:
    host = NamespacedTap()
    try:
        host.open()
        yield TapSession(path, host, preset="kvm-2019" if path == "l0" else "turtles-2010")
    finally:
        host.close()


def write_all(fd: int, frames: list[bytes]) -> None:
    """The bare baseline: os.write each frame, waiting when the tap is full."""
    for f in frames:
        while True:
            try:
                os.write(fd, f)
                break
            except BlockingIOError:
                select.select([], [fd], [], 1.0)


def pairs(
    base: Callable[[], float], subject: Callable[[], float], n: int
) -> list[tuple[float, float]]:
    out = []
    for _ in range(n):
        out.append((base(), subject()))
    return out


def summarize(name: str, unit: str, ps: list[tuple[float, float]], target: str,
              higher_is_better: bool = True) -> dict[str, Any]:  # fmt: skip
    ratios = [s / b for b, s in ps]
    return {
        "row": name, "unit": unit, "baseline": statistics.median(b for b, _ in ps),
        "subject": statistics.median(s for _, s in ps), "ratio": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios), "target": target,
        "pairs": len(ps), "higher_is_better": higher_is_better,
    }  # fmt: skip


# ---------------------------------------------------------------- tap TX
def tap_tx(path: str, n: int, n_pairs: int) -> dict[str, Any]:
    frames = [
        udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_DISCARD_PORT, 64, i)
        for i in range(n)
    ]  # the namespace's kernel drops them at once: not its MAC
    raw = [HDR + f for f in frames]
    with tap_session(path) as s:
        fd = s.wire.fd

        def floor() -> float:
            return straight_ring_tx(fd, raw)

        def subject() -> float:
            return tx_rate(s, frames)

        subject()  # warm-up: every ring slot used once
        ps = pairs(floor, subject, n_pairs)
    return summarize(f"tap TX, 64-byte frames, batch 64, {path} / floor", "frames/s",
                     ps, TARGETS[("tx", path)])  # fmt: skip


def tx_rate(s: TapSession, frames: list[bytes]) -> float:
    """L2 (xlio's driver, in process) sends ``frames`` in batches of 64 onto the tap."""
    dp = s.dp
    n = len(frames)
    t = time.perf_counter()
    for i in range(0, n, 64):
        dp.send(frames[i : i + 64])
    while not s.wire.flush_backlog():
        select.select([], [s.wire.fd], [], 1.0)
    return n / (time.perf_counter() - t)


def rx_rate(s: TapSession, frames: list[bytes], sending: bool = False) -> float:
    """A burst queued in the tap, drained into L2's RX ring (in process); the
    clock starts once it is queued, or (``sending``) before it is sent."""
    n = len(frames)
    dp, fd = s.dp, s.wire.fd
    dev = dp.active_device()  # the backend filling L2's RX ring (L1's on l1)
    assert dev is not None
    t = time.perf_counter()
    inject(s, frames)
    if not sending:
        t = time.perf_counter()
    before = dev.metrics["rx_packets_count"]
    while dev.metrics["rx_packets_count"] - before < n:
        if not s.wire.read_available():
            select.select([fd], [], [], 1.0)
        dp.pump()
    return n / (time.perf_counter() - t)


def vhost_rows(path: str, n_tx: int, n_rx: int, n_pairs: int) -> list[dict[str, Any]]:
    """vhost-user TX and RX (``bench_vhost``) against the tap path on ``path``,
    each pair measured back to back in this run."""
    import bench_vhost

    preset = "kvm-2019" if path == "l0" else "turtles-2010"
    tx = [udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_DISCARD_PORT, 64, i)
          for i in range(n_tx)]  # fmt: skip
    rx = [udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, UDP_DISCARD_PORT, 64, i)
          for i in range(n_rx)]  # fmt: skip
    with tap_session(path) as s:
        tx_rate(s, tx)
        ps_tx = bench_vhost.vhost_tx(path, preset, n_tx, n_pairs, lambda: tx_rate(s, tx))
        ps_rx = bench_vhost.vhost_rx(
            path, preset, n_rx, n_pairs, lambda: rx_rate(s, rx, sending=True), inject
        )
    return [
        summarize(f"vhost-user TX, 64-byte frames, batch 64, {path} / tap path", "frames/s",
                  ps_tx, VHOST_TARGET),
        summarize(f"vhost-user RX, burst of {n_rx:,} 64-byte frames sent, {path} / tap path",
                  "frames/s", ps_rx, VHOST_TARGET),
    ]  # fmt: skip


#: vhost-user against the tap path on the same path (issue 34), frames/s.
VHOST_TARGET = ">= 0.8"


# ---------------------------------------------------------------- the floor
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED = struct.Struct("<II")


def straight_ring_tx(fd: int, raw: list[bytes], q: int = 256) -> float:
    """The least a split ring can do in Python, in one function: the driver
    copies each frame into its buffer and fills a descriptor and an available
    entry; the device reads the index once per batch of 64, each entry and
    descriptor with ``unpack_from``, writes a memoryview of the buffer to the
    tap and fills a used entry; the driver reclaims. No model, no checks, no
    translation: frames per second (the ceiling of any Python datapath)."""
    mem = bytearray(1 << 20)
    desc, avail, used, bufs = 0, 4096, 8192, 16384
    dpack, dunpack = _DESC.pack_into, _DESC.unpack_from
    upack, uunpack = _U16.pack_into, _U16.unpack_from
    epack, eunpack = _USED.pack_into, _USED.unpack_from
    write = os.write
    mask = q - 1
    avail_idx = last_avail = used_idx = last_used = 0
    free = list(range(q))
    pop, push = free.pop, free.append
    mv = memoryview(mem)
    n = len(raw)
    t = time.perf_counter()
    for b in range(0, n, 64):
        for f in raw[b : b + 64]:
            i = pop()
            g = bufs + (i << 11)
            k = len(f)
            mem[g : g + k] = f
            dpack(mem, desc + (i << 4), g, k, 0, 0)
            upack(mem, avail + 4 + ((avail_idx & mask) << 1), i)
            avail_idx = (avail_idx + 1) & 0xFFFF
        upack(mem, avail + 2, avail_idx)
        idx = uunpack(mem, avail + 2)[0]
        while last_avail != idx:
            h = uunpack(mem, avail + 4 + ((last_avail & mask) << 1))[0]
            a, k, _, _ = dunpack(mem, desc + (h << 4))
            while True:
                try:
                    write(fd, mv[a : a + k])
                    break
                except BlockingIOError:
                    select.select([], [fd], [], 1.0)
            epack(mem, used + 4 + ((used_idx & mask) << 3), h, 0)
            used_idx = (used_idx + 1) & 0xFFFF
            last_avail = (last_avail + 1) & 0xFFFF
        upack(mem, used + 2, used_idx)
        u = uunpack(mem, used + 2)[0]
        while last_used != u:
            push(eunpack(mem, used + 4 + ((last_used & mask) << 3))[0])
            last_used = (last_used + 1) & 0xFFFF
    mv.release()
    return n / (time.perf_counter() - t)


def straight_ring_rx(fd: int, n: int, q: int = 256) -> float:
    """The RX twin of :func:`straight_ring_tx`: the device reads each frame from
    the tap straight into the next posted buffer (``os.readv`` into a memoryview)
    and fills a used entry; the driver takes each frame out (one copy) and
    posts the buffer again. Frames per second for ``n`` queued frames."""
    mem = bytearray(1 << 20)
    desc, avail, used, bufs = 0, 4096, 8192, 16384
    dpack, dunpack = _DESC.pack_into, _DESC.unpack_from
    upack, uunpack = _U16.pack_into, _U16.unpack_from
    epack, eunpack = _USED.pack_into, _USED.unpack_from
    readv = os.readv
    mask = q - 1
    for i in range(q):  # the driver posts every buffer
        dpack(mem, desc + (i << 4), bufs + (i << 11), 2048, 2, 0)
        upack(mem, avail + 4 + (i << 1), i)
    avail_idx = q
    upack(mem, avail + 2, avail_idx)
    last_avail = used_idx = last_used = 0
    mv = memoryview(mem)
    got = 0
    t = time.perf_counter()
    while got < n:
        idx = uunpack(mem, avail + 2)[0]
        while last_avail != idx and got < n:
            h = uunpack(mem, avail + 4 + ((last_avail & mask) << 1))[0]
            a, k, _, _ = dunpack(mem, desc + (h << 4))
            try:
                m = readv(fd, [mv[a : a + k]])
            except BlockingIOError:
                select.select([fd], [], [], 1.0)
                continue
            epack(mem, used + 4 + ((used_idx & mask) << 3), h, m)
            used_idx = (used_idx + 1) & 0xFFFF
            last_avail = (last_avail + 1) & 0xFFFF
            got += 1
        upack(mem, used + 2, used_idx)
        u = uunpack(mem, used + 2)[0]
        while last_used != u:
            h, m = eunpack(mem, used + 4 + ((last_used & mask) << 3))
            bytes(mv[bufs + (h << 11) + 12 : bufs + (h << 11) + m])  # the frame, out to L2's stack
            upack(mem, avail + 4 + ((avail_idx & mask) << 1), h)
            avail_idx = (avail_idx + 1) & 0xFFFF
            last_used = (last_used + 1) & 0xFFFF
        upack(mem, avail + 2, avail_idx)
    mv.release()
    return n / (time.perf_counter() - t)


def floor_tx(n: int, n_pairs: int) -> dict[str, Any]:
    frames = [
        udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_DISCARD_PORT, 64, i)
        for i in range(n)
    ]
    raw = [HDR + f for f in frames]
    with tap_session("l0") as s:
        fd = s.wire.fd

        def base() -> float:
            t = time.perf_counter()
            write_all(fd, raw)
            return n / (time.perf_counter() - t)

        ps = pairs(base, lambda: straight_ring_tx(fd, raw), n_pairs)
    return summarize("floor: tap TX, straight-line Python split ring (no model) / bare os.write",
                     "frames/s", ps, "reference")  # fmt: skip


# ---------------------------------------------------------------- tap RX
def inject(s: TapSession, frames: list[bytes]) -> None:
    """Queue frames in the tap from the namespace side (a packet socket there)."""
    from pyroute2 import netns

    netns.pushns(s.info.netns)
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    finally:
        netns.popns()
    with sock:
        sock.bind((s.info.ifname, 0))
        for f in frames:
            sock.send(f)


def floor_rx(n: int, n_pairs: int) -> dict[str, Any]:
    frames = [
        udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, UDP_DISCARD_PORT, 64, i)
        for i in range(n)
    ]
    with tap_session("l0") as s:
        fd = s.wire.fd

        def base() -> float:
            inject(s, frames)
            return bare_read(fd, n)

        def subject() -> float:
            inject(s, frames)
            return straight_ring_rx(fd, n)

        ps = pairs(base, subject, n_pairs)
    return summarize("floor: tap RX, straight-line Python split ring (no model) / bare os.read",
                     "frames/s", ps, "reference")  # fmt: skip


def bare_read(fd: int, n: int) -> float:
    """The bare RX baseline: os.read ``n`` queued frames, frames per second."""
    got = 0
    t = time.perf_counter()
    while got < n:
        try:
            os.read(fd, 65536)
            got += 1
        except BlockingIOError:
            select.select([fd], [], [], 1.0)
    return n / (time.perf_counter() - t)


def tap_rx(path: str, n: int, n_pairs: int) -> dict[str, Any]:
    frames = [
        udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, UDP_DISCARD_PORT, 64, i)
        for i in range(n)
    ]
    with tap_session(path) as s:
        fd = s.wire.fd

        def floor() -> float:
            inject(s, frames)
            return straight_ring_rx(fd, n)

        def subject() -> float:
            return rx_rate(s, frames)

        subject()
        ps = pairs(floor, subject, n_pairs)
    return summarize(f"tap RX, burst of {n:,} 64-byte frames into L2, {path} / floor",
                     "frames/s", ps, TARGETS[("rx", path)])  # fmt: skip


# ---------------------------------------------------------------- UDP echo
def _echo_reply(f: bytes) -> bytes | None:
    """The bare responder's answer to a header-less frame, None if it is no UDP echo."""
    if len(f) < 42 or f[12:14] != b"\x08\x00" or f[23] != 17:
        return None
    ihl = (f[14] & 15) * 4
    u = 14 + ihl
    out = f[6:12] + f[0:6] + f[12:26] + f[30:34] + f[26:30] + f[34:u] + f[u + 2 : u + 4]
    return out + f[u : u + 2] + f[u + 4 :]


def _answer_queued(fd: int) -> None:
    """Answer every UDP echo request queued in the tap, until EAGAIN."""
    while True:
        try:
            hf = os.read(fd, 65536)
        except BlockingIOError:
            return
        out = _echo_reply(hf[NET_HDR_SIZE:])
        if out is not None:
            os.write(fd, HDR + out)


def bare_responder(fd: int) -> None:
    """Answer UDP echo on the raw tap: swap MACs, IPs and ports (checksums hold)."""
    while True:
        select.select([fd], [], [])
        _answer_queued(fd)


async def trio_responder(fd: int) -> None:
    """:func:`bare_responder` with trio's ``wait_readable`` in place of
    ``select``: what trio's event loop alone costs a round trip."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        _answer_queued(fd)


def straight_ring_echo(fd: int, q: int = 256) -> None:
    """The least a split-ring echo can do in Python, in one function, on
    :func:`bare_responder`'s ``select`` loop: the device reads each request
    from the tap straight into the next posted RX buffer (``os.readv``) and
    fills a used entry; the driver copies the frame out, answers it as the
    bare responder does, re-posts the RX buffer, copies the reply into a TX
    buffer with a descriptor and an available entry; the device reads the
    index, the entry and the descriptor, writes a memoryview of the buffer to
    the tap and fills a used entry; the driver reclaims. No model, no checks,
    no translation, no kick or interrupt."""
    mem = bytearray(1 << 21)
    rdesc, ravail, rused, rbufs = 0, 4096, 8192, 16384
    tdesc, tavail, tused, tbufs = 32768, 36864, 40960, 1 << 20
    dpack, dunpack = _DESC.pack_into, _DESC.unpack_from
    upack, uunpack = _U16.pack_into, _U16.unpack_from
    epack, eunpack = _USED.pack_into, _USED.unpack_from
    readv, write = os.readv, os.write
    mask = q - 1
    for i in range(q):  # the driver posts every RX buffer
        dpack(mem, rdesc + (i << 4), rbufs + (i << 11), 2048, 2, 0)
        upack(mem, ravail + 4 + (i << 1), i)
    upack(mem, ravail + 2, q)
    r_avail_idx, r_last_avail, r_used_idx, r_last_used = q, 0, 0, 0
    t_avail_idx = t_last_avail = t_used_idx = t_last_used = 0
    free = list(range(q))
    mv = memoryview(mem)
    while True:
        select.select([fd], [], [])
        while True:  # device, RX: one request into the next posted buffer
            h = uunpack(mem, ravail + 4 + ((r_last_avail & mask) << 1))[0]
            a, k, _, _ = dunpack(mem, rdesc + (h << 4))
            try:
                m = readv(fd, [mv[a : a + k]])
            except BlockingIOError:
                break
            r_last_avail = (r_last_avail + 1) & 0xFFFF
            epack(mem, rused + 4 + ((r_used_idx & mask) << 3), h, m)
            r_used_idx = (r_used_idx + 1) & 0xFFFF
            upack(mem, rused + 2, r_used_idx)
            # driver: take the frame, re-post the buffer, answer
            h, m = eunpack(mem, rused + 4 + ((r_last_used & mask) << 3))
            r_last_used = (r_last_used + 1) & 0xFFFF
            g = rbufs + (h << 11)
            out = _echo_reply(bytes(mv[g + NET_HDR_SIZE : g + m]))
            upack(mem, ravail + 4 + ((r_avail_idx & mask) << 1), h)
            r_avail_idx = (r_avail_idx + 1) & 0xFFFF
            upack(mem, ravail + 2, r_avail_idx)
            if out is None:
                continue
            i = free.pop()
            g = tbufs + (i << 11)
            k = NET_HDR_SIZE + len(out)
            mem[g : g + k] = HDR + out
            dpack(mem, tdesc + (i << 4), g, k, 0, 0)
            upack(mem, tavail + 4 + ((t_avail_idx & mask) << 1), i)
            t_avail_idx = (t_avail_idx + 1) & 0xFFFF
            upack(mem, tavail + 2, t_avail_idx)
            # device, TX: the entry, its descriptor, out to the tap
            h = uunpack(mem, tavail + 4 + ((t_last_avail & mask) << 1))[0]
            a, k, _, _ = dunpack(mem, tdesc + (h << 4))
            write(fd, mv[a : a + k])
            t_last_avail = (t_last_avail + 1) & 0xFFFF
            epack(mem, tused + 4 + ((t_used_idx & mask) << 3), h, 0)
            t_used_idx = (t_used_idx + 1) & 0xFFFF
            upack(mem, tused + 2, t_used_idx)
            # driver: reclaim the TX buffer
            free.append(eunpack(mem, tused + 4 + ((t_last_used & mask) << 3))[0])
            t_last_used = (t_last_used + 1) & 0xFFFF


def serve_child(s: TapSession, responder: str, cpu: int | None = None) -> int:
    """Fork the responder on the session's tap: ``bare``, ``trio``, ``ring``
    (the straight-line ring) or ``xlio`` (the session's datapath under trio),
    on ``cpu`` only when one is given."""
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        fd = s.wire.fd
        try:
            if responder == "bare":
                bare_responder(fd)
            elif responder == "trio":
                trio.run(trio_responder, fd)
            elif responder == "ring":
                straight_ring_echo(fd)
            else:
                trio.run(s.run)
        finally:
            os._exit(0)
    return pid


@contextmanager
def on_cpu(cpu: int | None) -> Iterator[None]:
    """This process on ``cpu`` alone for the block (None: wherever the kernel puts it)."""
    before = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


#: Round trips before the timed ones, for every responder alike. The
#: responder is a child forked for the measurement: its first requests pay
#: for copy-on-write faults on the pages of every object they touch and for
#: the model's first run of each machine operation (``scripts/echo_anatomy.py``
#: prints the round trip per quarter of the timed trips; the README says
#: what it showed).
WARMUP_TRIPS = 500


def round_trips(s: TapSession, k: int) -> float:
    """Mean time of ``k`` UDP echo round trips from the namespace, after
    :data:`WARMUP_TRIPS` untimed ones."""
    sock = socket_in_netns(s.info.netns)
    with sock:
        sock.settimeout(2.0)
        sock.bind((s.info.host_ip, 0))
        payload = b"p" * 32
        for _ in range(WARMUP_TRIPS):
            sock.sendto(payload, (s.info.guest_ip, UDP_ECHO_PORT))
            sock.recvfrom(2048)
        t = time.perf_counter()
        for _ in range(k):
            sock.sendto(payload, (s.info.guest_ip, UDP_ECHO_PORT))
            sock.recvfrom(2048)
        return (time.perf_counter() - t) / k


#: Each echo row: (name, baseline responder, target). The rows time the Python
#: on one CPU (the client, the responder and the kernel's tap work all on CPU
#: 0): with the client on another vCPU, each round trip also pays that vCPU's
#: wake-up, and on a guest whose cpuidle is haltpoll (this machine: 50 us of
#: polling, then HLT) that wake-up grows with the responder's time (a 25 us
#: spin in the floor adds 73 us to its round trip across CPUs, 31 us on one
#: CPU). The ``any CPU`` rows keep that placement for reference.
ECHO_ROWS = {
    "trio": ("reference: UDP echo, the bare responder under trio / bare responder", "bare",
             "reference", 0),
    "ring": ("floor: UDP echo, straight-line Python split ring (no model) / bare responder",
             "bare", "reference", 0),
    "l0": ("UDP echo round trip over the tap, l0 / floor (one CPU)", "ring",
           TARGETS[("echo", "l0")], 0),
    "l1": ("UDP echo round trip over the tap, l1 / floor (one CPU)", "ring",
           TARGETS[("echo", "l1")], 0),
    "l0 any": ("reference: UDP echo, l0 / floor, client and responder on any CPU", "ring",
               "reference", None),
    "l1 any": ("reference: UDP echo, l1 / floor, client and responder on any CPU", "ring",
               "reference", None),
}  # fmt: skip


def echo(subject: str, k: int, n_pairs: int) -> dict[str, Any]:
    """Round trips to ``subject`` (a path, or a reference responder of
    :func:`serve_child`) against its baseline (the floor for a path, the
    bare responder for a reference), interleaved, with the row's placement."""
    name, baseline, target, cpu = ECHO_ROWS[subject]
    path = subject.split()[0]
    with tap_session("l0" if path in ("trio", "ring") else path) as s:
        pin_neighbour(s.info, GUEST_MAC)

        def measure(responder: str) -> float:
            pid = serve_child(s, responder, cpu)
            try:
                time.sleep(0.2)
                with on_cpu(cpu):
                    return round_trips(s, k)
            finally:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)

        ps = pairs(lambda: measure(baseline), lambda: measure(path), n_pairs)
    return summarize(name, "s per trip", ps, target, higher_is_better=False)


# ---------------------------------------------------------------- the model
def _rates(preset: str, workload: str, seconds: float) -> tuple[float, float]:
    """(modeled exits, operations) per wall second of one workload on path l1."""
    from xlio.sim.arch import machine_for
    from xlio.sim.nested import Config
    from xlio.sim.presets import PRESETS
    from xlio.sim.workloads import WORKLOADS

    m = machine_for(Config.from_preset(PRESETS[preset]))
    op = WORKLOADS[workload].build(m, "l1", {})
    m.reset_stats()
    n = 0
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        for _ in range(1000):
            op()
        n += 1000
    dt = time.perf_counter() - t
    return m.stats.l0_exits / dt, n / dt


def _exit_rate(preset: str, workload: str, seconds: float) -> float:
    return max(_rates(preset, workload, seconds)[0] for _ in range(3))  # best of 3


MICRO = ("cpuid", "vmcall", "io-kick", "io-user", "mmio-kick")


def svm_against_vmx(seconds: float, n_pairs: int) -> list[dict[str, Any]]:
    """The SVM model (epyc-2019) against the VMX model (kvm-2019) on the same
    workloads, in pairs measured back to back (medians of the pairs' ratios).

    Exits per second compare like with like only where both take the same
    exits per operation (a model with fewer exits per operation does less
    work for each); operations per second compare every workload.
    """
    exits: dict[str, list[float]] = {}
    ops: dict[str, list[float]] = {}
    same: dict[str, bool] = {}
    for w in MICRO:
        for _ in range(n_pairs):
            ve, vo = _rates("kvm-2019", w, seconds)
            se, so = _rates("epyc-2019", w, seconds)
            exits.setdefault(w, []).append(se / ve)
            ops.setdefault(w, []).append(so / vo)
            same[w] = round(ve / vo, 6) == round(se / so, 6)
    med = statistics.median
    like = [w for w in MICRO if same[w]]
    we = min(like, key=lambda w: med(exits[w]))
    wo = min(MICRO, key=lambda w: med(ops[w]))
    return [
        {"row": f"SVM/VMX model exits/s, same exits per op, lowest ({we})", "unit": "ratio",
         "subject": med(exits[we]), "baseline": 1.0, "ratio": med(exits[we]),
         "ratio_min": min(exits[we]), "ratio_max": max(exits[we]), "target": ">= 1.0",
         "by_workload": {w: round(med(exits[w]), 3) for w in like}},
        {"row": f"SVM/VMX model operations/s, all 5 micro workloads, lowest ({wo})",
         "unit": "ratio", "subject": med(ops[wo]), "baseline": 1.0, "ratio": med(ops[wo]),
         "ratio_min": min(ops[wo]), "ratio_max": max(ops[wo]), "target": ">= 1.0",
         "by_workload": {w: round(med(ops[w]), 3) for w in MICRO}},
    ]  # fmt: skip


def model_rates(seconds: float) -> list[dict[str, Any]]:
    rates = {(w, p): _exit_rate(p, w, seconds)
             for p in ("turtles-2010", "shadow-vmcs", "kvm-2019") for w in MICRO}  # fmt: skip
    slowest = min(rates, key=lambda k: rates[k])
    return [
        {"row": "modeled exits/s, cpuid under shadow-vmcs, tracing off", "unit": "exits/s",
         "subject": rates[("cpuid", "shadow-vmcs")], "target": ">= 1,500,000"},
        {"row": f"modeled exits/s, slowest workload and preset ({slowest[0]}, {slowest[1]})",
         "unit": "exits/s", "subject": rates[slowest], "target": ">= 1,000,000"},
    ]  # fmt: skip


def measure_configs(n: int) -> dict[str, Any]:
    from xlio.measure import measure

    micro = ("cpuid", "vmcall", "io-kick", "io-user", "mmio-kick")
    paths = ("single", "l1", "l0")
    presets = ("turtles-2010", "kvm-2019", "shadow-vmcs")
    t = time.perf_counter()
    for i in range(n):
        measure(micro[i % 5], paths[i // 5 % 3], presets[i // 15 % 3], count=1000)
    wall = time.perf_counter() - t
    return {"row": f"{n:,} measure configurations in one process (micro, 1,000 ops each)",
            "unit": "s", "subject": wall, "target": "<= 5"}  # fmt: skip


def netperf_l1() -> dict[str, Any]:
    from xlio.backends.netperf import NetperfModel, NetperfOptions, Path, Test
    from xlio.sim.presets import PRESETS

    out = {}
    for path in Path:
        m = NetperfModel(
            PRESETS["turtles-2010"], NetperfOptions(Test.TCP_STREAM, path, duration=1.0)
        )
        t = time.perf_counter()
        m.run()
        out[path.value] = time.perf_counter() - t
    slowest = max(out, key=lambda k: out[k])
    return {"row": f"1 modeled s of 1 GbE TCP_STREAM, slowest path ({slowest})", "unit": "s",
            "subject": out[slowest], "target": "<= 5", "by_path": out}  # fmt: skip


def _number_format(v: float) -> Callable[[float], str]:
    if v > 100:
        return lambda x: f"{x:,.0f}"
    if v < 0.01:
        return lambda x: f"{x * 1e6:.1f} us"
    return lambda x: f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames and pairs (under 60 s)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--no-tap", action="store_true", help="model rows only")
    ap.add_argument(
        "--guest",
        action="store_true",
        help="also serve's CPU per frame under a real guest (QEMU, about 30 s)",
    )
    a = ap.parse_args()
    q = a.quick
    mach = machine()
    print(f"machine: {mach['cpu']}, {mach['cpus']} CPUs, Python {mach['python']}, "
          f"kernel {mach['kernel']}; bare loop {mach['bare_loop_iterations_per_s']:,} "
          "iterations/s", flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    n_pairs = 3 if q else 5
    if not a.no_tap:
        tx_n = 8_192 if q else 40_960
        rows.append(floor_tx(tx_n, n_pairs))
        rows.append(tap_tx("l0", tx_n, n_pairs))
        rows.append(tap_tx("l1", tx_n, n_pairs))
        rows.append(floor_rx(4_000, n_pairs))
        rows.append(tap_rx("l0", 4_000, n_pairs))
        rows.append(tap_rx("l1", 4_000, n_pairs))
        k = 1000  # round trips per measurement: fewer are at the mercy of a noisy neighbour
        for subject in ECHO_ROWS:
            rows.append(echo(subject, k, n_pairs))
        for path in ("l0", "l1"):
            rows.extend(vhost_rows(path, tx_n, 4_000, n_pairs))
        if a.guest:
            import bench_vhost

            for path, other_paths in (("l0", True), ("l1", True), ("l0", False)):
                rows.append(bench_vhost.serve_cpu_per_frame(path, other_paths))
    rows.extend(model_rates(0.2 if q else 0.5))
    rows.extend(svm_against_vmx(0.1 if q else 0.2, n_pairs))
    rows.append(measure_configs(1000))
    rows.append(netperf_l1())
    print(f"\n{'row':<78}{'subject':>14}{'baseline':>14}{'ratio (min-max)':>26}  target")
    for r in rows:
        r["verdict"] = verdict(r)
        subj = r["subject"]
        fmt = _number_format(subj)
        line = f"{r['row']:<78}{fmt(subj):>14}"
        if "ratio" in r:
            line += f"{fmt(r['baseline']):>14}"
            line += f"{r['ratio']:>10.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})".rjust(26)
        else:
            line += " " * 40
        print(line + f"  {r['target']} ({r['unit']}) {r['verdict']}".rstrip())
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": mach, "quick": q, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    run_script(main)  # a stop signal removes the namespaces built
