"""vhost-user rows of ``scripts/bench.py``: xlio's backend serving a VMM's rings.

The front-end is the bench itself, in the VMM's place: guest memory is a
memfd it maps, xlio's own driver lays its rings and buffers out there, its
notify writes are writes to the kick eventfds, and it waits for the call
eventfds; the handshake goes over the unix socket as QEMU's does. The
back-end is xlio's vhost-user server on a forked child, serving the tap of
a fresh namespace as ``xlio serve --vhost-user --no-other-paths`` does (the
same datapath work as the tap row: the shadows that charge the other two
paths are left out, they cost about as much again each). Each row is put against the tap
path's rate on the same path, measured in the same run (``tap_tx``,
``tap_rx`` of bench.py, in-process: the datapath driven directly).

``serve_cpu_per_frame`` boots the real guest (QEMU, TCG) on ``xlio serve``
and reads the server's CPU time (utime + stime) over a 3 MB TCP stream:
serve's own cost per frame under Linux's driver.
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from xlio.backends.netns import NamespacedTap
from xlio.backends.vhost_user import HEADER, frontend_handshake
from xlio.backends.wire import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC
from xlio.frontends.virtio_net import RXQ, TXQ, VirtioNetDriver, VmmTransport
from xlio.packets import UDP_DISCARD_PORT, udp_frame_of_size
from xlio.sim.memory import MappedHost
from xlio.tapsession import TapSession
from xlio.vhostsession import unmap
from xlio.virtio import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1

MEM = 16 << 20
RING = 256  # the front-end's queue size
UADDR = 0x7F0000000000  # the front-end's "user address" of its one region
#: How long the front-end polls an empty used ring before it sleeps on the call eventfd.
POLL_S = 0.0005


class SocketFrontend:
    """The VMM's side of vhost-user, with xlio's driver as the guest's."""

    def __init__(self, path: str) -> None:
        self.memfd = os.memfd_create("xlio-bench-guest")
        os.ftruncate(self.memfd, MEM)
        self.map = mmap.mmap(self.memfd, MEM)
        self.host = MappedHost([(0, MEM, self.map)])
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.kick = {q: os.eventfd(0, os.EFD_NONBLOCK) for q in (RXQ, TXQ)}
        self.call = {q: os.eventfd(0, os.EFD_NONBLOCK) for q in (RXQ, TXQ)}
        vmm = VmmTransport(
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX), self._start,
            lambda i: os.eventfd_write(self.kick[i], 1),
        )  # fmt: skip
        self.driver = VirtioNetDriver(self.host.memory("bench guest"), vmm, queue_size=RING)
        self.driver.probe()

    def _start(self, features: int, queues: dict[int, tuple[int, int, int, int]]) -> None:
        """DRIVER_OK: the VMM's handshake on the socket, its fds along."""
        for m in frontend_handshake(features, MEM, UADDR, queues):
            fd = {"memory": self.memfd, "call": self.call[m.queue], "kick": self.kick[m.queue],
                  None: None}[m.fd]  # fmt: skip
            if fd is not None:
                socket.send_fds(self.sock, [m.data], [fd])
            else:
                self.sock.sendall(m.data)
            if m.answered:
                size = HEADER.unpack(self.sock.recv(HEADER.size, socket.MSG_WAITALL))[2]
                if size:
                    self.sock.recv(size, socket.MSG_WAITALL)

    # the guest's side of the data path
    def send_all(self, frames: list[bytes], batch: int = 64) -> None:
        """Every frame posted (waiting for free descriptors as a guest whose TX
        queue is stopped does), then every one returned by the device."""
        d = self.driver
        tx = d.tx
        assert tx is not None
        for i in range(0, len(frames), batch):
            todo = frames[i : i + batch]
            while todo:
                before = d.tx_busy
                sent = d.send(todo)
                d.tx_busy = before  # not a drop here: the bench waits and posts again
                todo = todo[sent:]
                if todo:
                    time.sleep(0.00002)
        while tx.in_flight:
            tx.take_used()
            time.sleep(0.00002)

    def receive(self, n: int, timeout: float = 30.0) -> int:
        """Frames taken until ``n`` came: the used ring polled, as a DPDK
        virtio PMD polls it, for up to ``POLL_S`` after the last frame; then
        the RX interrupt waited for (the call eventfd)."""
        got = 0
        fd = self.call[RXQ]
        deadline = time.monotonic() + timeout
        idle_since = time.perf_counter()
        while got < n and time.monotonic() < deadline:
            k = len(self.driver.receive())
            got += k
            if k:
                idle_since = time.perf_counter()
                continue
            if time.perf_counter() - idle_since < POLL_S:
                continue
            select.select([fd], [], [], 0.5)
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
        return got

    def close(self) -> None:
        self.sock.close()
        for fd in (*self.kick.values(), *self.call.values()):
            os.close(fd)
        self.host.release()
        del self.driver  # its rings' pages are views of the map
        gc.collect()
        unmap(self.map)
        os.close(self.memfd)


@contextmanager
def vhost_session(
    path: str, preset: str, other_paths: bool = False
) -> Iterator[tuple[TapSession, SocketFrontend]]:
    """A namespace and tap, xlio's vhost-user server on them in a forked child,
    and the bench's front-end connected to it."""
    from xlio.vhostsession import VhostUserServer

    host = NamespacedTap()
    tmp = tempfile.mkdtemp(prefix="xlio-bench-")
    sock = os.path.join(tmp, "vu.sock")
    pid = 0
    fe = None
    try:
        host.open()
        s = TapSession(path, host, preset=preset, guest=True, other_paths=other_paths)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.close(r)

            async def serve() -> None:
                srv = VhostUserServer(s.dp, sock, lambda line: None, s.shadows)
                async with trio.open_nursery() as n:
                    await n.start(s.run)
                    await n.start(srv.serve)
                    os.write(w, b"r")

            try:
                trio.run(serve)
            finally:
                os._exit(0)
        os.close(w)
        os.read(r, 1)
        os.close(r)
        fe = SocketFrontend(sock)
        yield s, fe
    finally:
        if fe is not None:
            fe.close()
        if pid:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        host.close()
        os.rmdir(tmp) if os.path.isdir(tmp) and not os.listdir(tmp) else None


def vhost_tx(
    path: str, preset: str, n: int, n_pairs: int, tap_rate: Any
) -> list[tuple[float, float]]:
    """64-byte frames in batches of 64 through the front-end's TX ring, against
    the tap path's own TX rate (``tap_rate()``, the in-process datapath)."""
    frames = [
        udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_DISCARD_PORT, 64, i)
        for i in range(n)
    ]
    with vhost_session(path, preset) as (_, fe):

        def subject() -> float:
            t = time.perf_counter()
            fe.send_all(frames)
            return n / (time.perf_counter() - t)

        subject()  # warm-up: every ring slot used once
        return [(tap_rate(), subject()) for _ in range(n_pairs)]


def vhost_rx(path: str, preset: str, n: int, n_pairs: int, tap_rate: Any,
             inject: Any) -> list[tuple[float, float]]:  # fmt: skip
    """A burst of ``n`` 64-byte frames sent into the tap, through xlio's
    backend into the front-end's RX ring, against the tap path's RX rate
    timed the same way (``tap_rate``: sending included)."""
    frames = [
        udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, UDP_DISCARD_PORT, 64, i)
        for i in range(n)
    ]
    with vhost_session(path, preset) as (s, fe):

        def subject() -> float:
            # from the burst's first frame sent in the namespace to its last in
            # the guest's hands (the server drains the tap while the burst is
            # sent, on its own CPU: ``tap_rate`` is timed the same way)
            t = time.perf_counter()
            inject(s, frames)
            got = fe.receive(n)
            assert got == n, f"{got} of {n} frames"
            return n / (time.perf_counter() - t)

        subject()
        return [(tap_rate(), subject()) for _ in range(n_pairs)]


def serve_cpu_per_frame(
    path: str, other_paths: bool = True, stream_bytes: int = 3_000_000
) -> dict[str, Any]:
    """``xlio serve --vhost-user`` under the real guest's TCP stream: the
    server's CPU seconds (utime + stime) per frame it moved."""
    from xlio.guestvm import run_guest

    with tempfile.TemporaryDirectory(prefix="xlio-bench-") as tmp:
        sock = os.path.join(tmp, "vu.sock")
        ns = f"xlio-bench{os.getpid()}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "xlio", "serve", "--path", path, "--vhost-user", sock,
             "--netns", ns, "--json", *([] if other_paths else ["--no-other-paths"])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            while "ready" not in proc.stderr.readline():
                pass
            sink = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", SINK.format(n=stream_bytes)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            time.sleep(0.5)
            t0 = _cpu(proc.pid)
            r = run_guest(sock, f"dd if=/dev/zero bs=1000 count={stream_bytes // 1000} "
                          "2>/dev/null | nc 198.18.0.1 5001", 120)  # fmt: skip
            cpu = _cpu(proc.pid) - t0
            got = int((sink.communicate(timeout=30)[0] or "0").strip())
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rep = json.loads(out)
    frames = rep["tap"]["frames_to_peer"] + rep["tap"]["frames_from_peer"]
    return {
        "row": f"serve's CPU per frame, real guest's {stream_bytes // 1_000_000} MB TCP stream, "
        f"{path}{'' if other_paths else ', --no-other-paths'}",
        "unit": "s/frame", "subject": cpu / max(frames, 1), "target": "reference",
        "frames": frames, "stream_ok": got == stream_bytes and r.status == 0,
    }  # fmt: skip


#: A TCP sink in the namespace: takes ``n`` bytes, prints how many came.
SINK = """
import socket
t = socket.socket(); t.bind(("198.18.0.1", 5001)); t.listen(1)
c, _ = t.accept(); got = 0
while got < {n}:
    d = c.recv(1 << 20)
    if not d: break
    got += len(d)
c.close(); print(got)
"""


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
