"""The tap edge: L0's wire on a real Linux tap, driven by trio.

Theory of operation
-------------------
:class:`TapWire` has the loopback wire's interface (``transmit``, ``take``,
``put_back``, ``to_guest``), so a :class:`~xlio.backends.datapath.Datapath`
runs on it unchanged and the model charges the same exits; only time
differs. Frames cross with their 12-byte virtio-net header (IFF_VNET_HDR).

* Transmit: ``os.write`` per frame on the non-blocking fd. If the tap's
  queue is full (EAGAIN) the frame waits in ``backlog`` and the writer task
  flushes it when the fd is writable; past ``BACKLOG_MAX`` frames a frame is
  dropped and counted in ``tap_write_fails``.
* Receive: the reader task waits with ``trio.lowlevel.wait_readable``,
  reads with ``os.read`` until EAGAIN (a batch), and lets the datapath pump
  the batch toward L2; then it reads again, and waits for readiness only
  once a read finds the tap empty, as vhost-net's ``handle_rx`` polls its
  socket until it is empty before it re-arms the wake-up (every
  ``RX_WEIGHT`` frames it lets the other tasks run). A guest with no RX
  buffers is counted by the device (``no_rx_avail_buffer``) and the frames
  wait here, up to ``INBOX_MAX``.
* The tap's link set down: writes fail with EIO; the frame is dropped and
  counted (``tx_link_down``) and the wire keeps going, so traffic resumes
  when the link comes back up.
* A tap that disappears (its link deleted, or its namespace) makes reads and
  writes fail with EBADFD: :class:`TapGone`, a clean error, never a hang.
* The reader takes from the kernel only what the inbox has room for and
  leaves the rest queued in the tap (the kernel's own limit, ``txqueuelen``,
  then decides), so a burst larger than the inbox is delivered, not dropped.
* Accounting: every frame handed to :meth:`TapWire.transmit` is written,
  waiting in the backlog, or counted as dropped (``tap_write_fails``).
* ``--pcap``: every frame crossing the tap, both directions, is kept as
  bytes and written to the file in batches with scapy's ``RawPcapWriter``,
  outside the per-frame path. The file is opened and its header flushed
  before anything else is built; a batch that cannot be written (disk full)
  raises :class:`CaptureFailed`, which ends the run like a vanished tap.
"""

from __future__ import annotations

import errno
import os
import time
from collections import deque
from typing import TYPE_CHECKING

import trio

from xlio.virtio import NET_HDR_SIZE

from .wire import Inbox

if TYPE_CHECKING:
    from .datapath import Datapath

BACKLOG_MAX = 4096
#: Frames the reader moves before it lets the other tasks run: vhost-net's
#: VHOST_NET_PKT_WEIGHT (drivers/vhost/net.c, Linux 6.1).
RX_WEIGHT = 256
INBOX_MAX = 4096
READ_SIZE = 65536 + NET_HDR_SIZE
NUM_BUFFERS_1 = b"\x01\x00"  # the header's last field, little-endian
PCAP_BATCH = 256
PCAP_FILE_HEADER = 24  # libpcap global header
PCAP_RECORD_HEADER = 16  # per-record header: ts_sec, ts_usec, incl_len, orig_len
_GONE = (errno.EBADFD, errno.ENXIO, errno.ENODEV, errno.EBADF)


class TapGone(Exception):
    """The tap went away under us."""


class CaptureFailed(Exception):
    """The ``--pcap`` file could not be written; ``written`` frames reached it.

    Raised when the file is opened and its header test-written (before a
    namespace is built: a usage error) and by a failed batch during the run
    (disk full: the run ends, its report says how many frames were captured).
    """

    def __init__(self, path: str, err: OSError, written: int) -> None:
        super().__init__(f"cannot write capture {path}: {err.strerror or err}")
        self.path = path
        self.written = written
        self.report: dict[str, object] | None = None  # filled by the run that failed


class PcapBatcher:
    """Collects frames and writes them to a pcap file in batches.

    The file is created and its header flushed at construction, so a file
    that cannot be written (``/proc/version``: EIO at the first flush; a
    read-only filesystem: EROFS/EACCES at open) is found before anything is
    built. ``written`` counts the frames that reached the file.
    """

    def __init__(self, path: str) -> None:
        from scapy.utils import RawPcapWriter

        self.path = path
        self.written = 0
        self.failed: CaptureFailed | None = None
        self._pending: list[tuple[float, bytes]] = []
        self._w: RawPcapWriter | None = None
        self._size_at_flush = 0  # bytes of the file before the batch being written
        try:
            self._w = RawPcapWriter(path, linktype=1, sync=False)
            self._w.write_header(None)  # write_packet() below does not add the file header
            self._w.flush()
            self._size_at_flush = PCAP_FILE_HEADER
        except OSError as e:
            self._fail(e)

    def _fail(self, e: OSError) -> None:
        """Stop writing, let go of the file (its own errors are the same failure).

        Part of the failed batch may have reached the file before the disk
        filled: ``written`` counts the whole records it holds (16-byte
        record header plus frame), from the size the file ended with.
        """
        w, self._w = self._w, None
        if w is not None:
            start = self._size_at_flush
            try:
                w.close()
            except OSError:
                pass
            try:
                room = os.path.getsize(self.path) - start
            except OSError:
                room = 0
            for _, frame in self._pending:
                room -= PCAP_RECORD_HEADER + len(frame)
                if room < 0:
                    break
                self.written += 1
        self._pending.clear()
        self.failed = CaptureFailed(self.path, e, self.written)
        raise self.failed

    def add(self, frame: bytes) -> None:
        if self._w is None:
            return  # failed or closed: the run is ending with CaptureFailed
        self._pending.append((time.time(), frame))
        if len(self._pending) >= PCAP_BATCH:
            self.flush()

    def flush(self) -> None:
        if self._w is None:
            return
        try:
            for ts, frame in self._pending:
                sec = int(ts)
                self._w.write_packet(frame, sec=sec, usec=int((ts - sec) * 1e6))
            self._w.flush()
        except OSError as e:
            self._fail(e)
        self.written += len(self._pending)
        self._size_at_flush += sum(PCAP_RECORD_HEADER + len(f) for _, f in self._pending)
        self._pending.clear()

    def close(self) -> None:
        """Flush and close; after a failure, nothing to do (``failed`` says why)."""
        if self._w is None:
            return
        self.flush()  # a batch that cannot be written raises CaptureFailed here
        try:
            self._w.close()
        except OSError as e:
            self._fail(e)  # closes it again, ignoring that second error
        self._w = None


class TapWire(Inbox):
    """L0's wire on a tap fd (see the module docstring)."""

    def __init__(self, fd: int, pcap: PcapBatcher | None = None, record_batches: bool = False):
        super().__init__()
        self.fd = fd
        self.pcap = pcap
        self.backlog: deque[bytes] = deque()
        self.offered = 0  # frames handed to transmit()
        self.frames_to_peer = 0
        self.frames_from_peer = 0
        self.tap_write_fails = 0  # frames dropped on the way out (any reason)
        self.tx_link_down = 0  # of those, dropped because the link was down (EIO)
        self.tap_read_fails = 0
        self.seen_by_peer: list[bytes] | None = None
        self.read_batches: list[list[bytes]] | None = [] if record_batches else None
        self.want_write = trio.Event()
        # the system calls, as attributes: a test injects EAGAIN, ENOBUFS, EIO here
        self.write = os.write
        self.read = os.read

    # ------------------------------------------------------------- transmit
    def transmit(self, hdr_frames: list[bytes]) -> None:
        self.offered += len(hdr_frames)
        if self.pcap is None and not self.backlog:  # the common case, with locals
            write, fd = self.write, self.fd
            sent = 0
            try:
                for hf in hdr_frames:
                    write(fd, hf)
                    sent += 1
            except BlockingIOError:  # the tap is full: this frame and the rest wait
                self.frames_to_peer += sent
                self._queue(hdr_frames[sent])
                self._transmit_slow(hdr_frames[sent + 1 :])
                return
            except OSError as e:  # this frame is counted, the rest go as below
                self.frames_to_peer += sent
                self._write_failed(e)
                self._transmit_slow(hdr_frames[sent + 1 :])
                return
            self.frames_to_peer += sent
            return
        self._transmit_slow(hdr_frames)

    def _transmit_slow(self, hdr_frames: list[bytes]) -> None:
        """Each frame captured, queued behind a backlog, written or counted."""
        for hf in hdr_frames:
            if self.pcap is not None:
                self.pcap.add(hf[NET_HDR_SIZE:])
            if self.backlog:
                self._queue(hf)
                continue
            try:
                self.write(self.fd, hf)
                self.frames_to_peer += 1
            except BlockingIOError:
                self._queue(hf)
            except OSError as e:
                self._write_failed(e)

    def _write_failed(self, e: OSError) -> None:
        """A frame could not be written: counted; a vanished tap ends the run."""
        self.tap_write_fails += 1
        if e.errno == errno.EIO:
            self.tx_link_down += 1  # link down: drop, and go on
        elif e.errno in _GONE:
            raise TapGone(f"tap write failed: {os.strerror(e.errno)} (tap deleted?)") from None

    def _queue(self, hf: bytes) -> None:
        if len(self.backlog) >= BACKLOG_MAX:
            self.tap_write_fails += 1
            return
        self.backlog.append(hf)
        self.want_write.set()

    def flush_backlog(self) -> bool:
        """Write what waits; True when the backlog is empty."""
        while self.backlog:
            try:
                self.write(self.fd, self.backlog[0])
            except BlockingIOError:
                return False
            except OSError as e:
                self.backlog.popleft()
                self._write_failed(e)
                continue
            self.backlog.popleft()
            self.frames_to_peer += 1
        return True

    # ------------------------------------------------------------- receive
    def read_available(self) -> int:
        """Read until EAGAIN or until the inbox is full; returns frames read."""
        batch: list[bytes] = []
        put = batch.append
        read, fd = self.read, self.fd
        room = INBOX_MAX - len(self.to_guest)
        while room > 0:
            try:
                hf = read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                self.tap_read_fails += 1
                if e.errno in _GONE:
                    raise TapGone(
                        f"tap read failed: {os.strerror(e.errno)} (tap deleted?)"
                    ) from None
                break
            if len(hf) <= NET_HDR_SIZE:
                self.tap_read_fails += 1
                continue
            # RX without mergeable buffers: num_buffers is 1
            put(b"".join((hf[:10], NUM_BUFFERS_1, hf[NET_HDR_SIZE:])))
            room -= 1
        if not batch:
            return 0
        self.frames_from_peer += len(batch)
        if self.pcap is not None:
            for hf in batch:
                self.pcap.add(hf[NET_HDR_SIZE:])
        if self.read_batches is not None:
            self.read_batches.append([hf[NET_HDR_SIZE:] for hf in batch])
        self.to_guest.extend(batch)
        return len(batch)

    def inbox_full(self) -> bool:
        return len(self.to_guest) >= INBOX_MAX

    def metrics(self) -> dict[str, int]:
        return {
            "frames_to_peer": self.frames_to_peer,
            "frames_from_peer": self.frames_from_peer,
            "tap_write_fails": self.tap_write_fails,
            "tx_link_down": self.tx_link_down,
            "tap_read_fails": self.tap_read_fails,
            "backlog": len(self.backlog),
        }


async def _writer(wire: TapWire) -> None:
    while True:
        await wire.want_write.wait()
        wire.want_write = trio.Event()
        while not wire.flush_backlog():
            await trio.lowlevel.wait_writable(wire.fd)


async def _handle_rx(dp: Datapath, wire: TapWire) -> None:
    """vhost-net's ``handle_rx``: with the tap readable, read and pump until a
    read finds the tap empty (then the caller waits for readiness again, as
    ``vhost_net_enable_vq`` re-arms the socket's poll) or the inbox is full.
    Past :data:`RX_WEIGHT` frames it gives the other tasks a turn and goes
    on (``vhost_exceeds_weight`` requeues the work), so a busy tap neither
    starves them nor delays a cancellation by more than a weight's worth."""
    weight = RX_WEIGHT
    while True:
        got = wire.read_available()
        dp.pump()
        if not got or wire.inbox_full():
            return
        weight -= got
        if weight <= 0:
            await trio.lowlevel.checkpoint()
            weight = RX_WEIGHT


async def serve_tap(
    dp: Datapath, wire: TapWire, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Move frames between the tap and the datapath until cancelled.

    ``dp`` is a :class:`~xlio.backends.datapath.Datapath` whose wire is
    ``wire``. Raises :class:`TapGone` if the tap disappears.
    """
    assert dp.wire is wire
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_writer, wire)
            task_status.started()
            while True:
                # each wait parks this task, so the writer and the guest's tasks run
                if wire.inbox_full():  # L2 takes nothing now: leave frames in the kernel
                    await trio.sleep(0.001)
                    dp.pump()
                    continue
                await trio.lowlevel.wait_readable(wire.fd)
                await _handle_rx(dp, wire)
    except BaseExceptionGroup as group:
        raise_first(group, TapGone)
        raise


def raise_first(
    group: BaseExceptionGroup, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> None:
    """Re-raise the first ``kind`` inside a (nested) exception group, unwrapped."""
    match: BaseException | None = group.subgroup(kind)
    while isinstance(match, BaseExceptionGroup):
        match = match.exceptions[0]
    if match is not None:
        raise match from None


def close_tap(wire: TapWire) -> None:
    """Tell trio the fd is going away, then close it (call inside the trio run)."""
    if wire.fd >= 0:
        trio.lowlevel.notify_closing(wire.fd)
        os.close(wire.fd)
        wire.fd = -1
