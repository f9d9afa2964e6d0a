"""vhost-user's edge: the unix socket, SCM_RIGHTS, mmaps and eventfds, in trio.

The protocol and everything it decides live in
:class:`~xlio.backends.vhost_user.VhostUserDevice` (sans-IO); this module
only moves bytes and fds. One front-end (a VMM) is served at a time; when it
disconnects, is killed, or breaks the protocol (one log line) its
connection ends, every fd it sent is closed, every region unmapped, and the
listener takes the next one. A kick eventfd that becomes readable is read
(its count is the number of notify writes since the last read) and handed
to the device; an interrupt is a write of 1 to the queue's call eventfd.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import trio

from xlio.backends.datapath import Datapath
from xlio.backends.vhost_user import HEADER, MAX_FDS, ProtocolError, VhostUserDevice

_ONE = struct.pack("<Q", 1)
_COUNT = struct.Struct("<Q")


def map_region(fd: int, offset: int, size: int) -> mmap.mmap:
    """``size`` bytes of ``fd`` from ``offset``, shared and writable (the
    guest's RAM: what we write, the guest sees)."""
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)  # fmt: skip


def unmap(buf: Any) -> None:
    try:
        buf.close()
    except BufferError:  # a view still refers to it: unmapped when it is collected
        pass


def signal_eventfd(fd: int) -> None:
    try:
        os.write(fd, _ONE)
    except OSError:  # a full counter (the guest is not reading it) or a closed fd
        pass


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds += a.tolist()
    return fds


async def _recv_exact(conn: trio.socket.SocketType, n: int) -> tuple[bytes, list[int]]:
    """``n`` bytes (fewer: the peer closed) and the fds that came with them.
    More fds than a message takes are handed on, for the protocol to refuse."""
    got = b""
    fds: list[int] = []
    while len(got) < n:
        try:
            data, anc, flags, _ = await conn.recvmsg(n - len(got), socket.CMSG_SPACE(MAX_FDS * 4))
        except (ConnectionResetError, BrokenPipeError):
            break
        fds += _fds_of(anc)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                _close(fd)
            raise ProtocolError(f"more than {MAX_FDS} fds in one message")
        if not data:
            break
        got += data
    return got, fds


def _close(fd: int) -> None:
    trio.lowlevel.notify_closing(fd)
    try:
        os.close(fd)
    except OSError:
        pass


class VhostUserServer:
    """The listener and the one connection it serves at a time."""

    def __init__(
        self, dp: Datapath, path: str, log: Callable[[str], None], shadows: Any = None
    ) -> None:
        self.dp = dp
        self.shadows = shadows
        self.path = path
        self.log = log
        self.connections = 0
        self.protocol_errors = 0
        self.device: VhostUserDevice | None = None
        self.counts: dict[str, dict[str, int]] = {}  # of connections that ended
        self.messages: dict[str, int] = {}

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(self.path) and not os.path.isdir(self.path):
                os.unlink(self.path)  # a socket left by an earlier run
            await listener.bind(self.path)
            listener.listen(1)
            task_status.started()
            while True:
                conn, _ = await listener.accept()
                with conn:
                    await self._connection(conn)
        finally:
            listener.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _connection(self, conn: trio.socket.SocketType) -> None:
        self.connections += 1
        dev = VhostUserDevice(self.dp, map_region, unmap, self.shadows, signal_eventfd)
        self.device = dev
        watched: dict[int, tuple[int, trio.CancelScope]] = {}
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._messages(conn, dev, nursery, watched)
                except ProtocolError as e:
                    self.protocol_errors += 1
                    self.log(f"xlio serve: vhost-user: {e}; connection closed")
                except OSError as e:  # the front-end went away while we replied
                    self.log(f"xlio serve: vhost-user: {os.strerror(e.errno or 0)}; "
                             "connection closed")  # fmt: skip
                nursery.cancel_scope.cancel()
        finally:
            for _, scope in watched.values():
                scope.cancel()
            self.counts = _add(self.counts, dev.queue_counts())
            for k, v in dev.messages.items():
                self.messages[k] = self.messages.get(k, 0) + v
            dev.close()
            self._close_fds(dev)
            self.device = None

    async def _messages(
        self, conn: trio.socket.SocketType, dev: VhostUserDevice, nursery: trio.Nursery,
        watched: dict[int, tuple[int, trio.CancelScope]],
    ) -> None:  # fmt: skip
        """Read, feed, reply, until the front-end closes (or breaks the protocol).

        One message at a time, its header first: a VMM sends each message
        with one sendmsg, its fds on the first byte, and a unix stream read
        may return several messages' bytes with only the last one's fds, so
        reading exactly a header keeps each message's fds its own."""
        while True:
            for want in (HEADER.size, None):
                if want is None:  # the payload the header announced
                    want = (
                        HEADER.unpack_from(dev.buffer)[2] if len(dev.buffer) >= HEADER.size else 0
                    )
                data, fds = await _recv_exact(conn, want)
                try:
                    replies = dev.feed(data, fds)
                finally:
                    self._close_fds(dev)
                if len(data) < want:  # the front-end closed
                    unfinished = dev.end_of_stream()
                    if unfinished is not None:
                        raise ProtocolError(unfinished)
                    return
                for r in replies:
                    view = memoryview(r)
                    while view:
                        view = view[await conn.send(view) :]
            await self._watch(nursery, dev, watched)
            self._close_fds(dev)

    async def _watch(
        self, nursery: trio.Nursery, dev: VhostUserDevice,
        watched: dict[int, tuple[int, trio.CancelScope]],
    ) -> None:  # fmt: skip
        """Watch the kick fd of every started ring, and no other."""
        want = dev.kick_fds()
        for index, (fd, scope) in list(watched.items()):
            if want.get(index) != fd:
                scope.cancel()
                del watched[index]
        for index, fd in want.items():
            if index not in watched:
                os.set_blocking(fd, False)
                scope = await nursery.start(_watch_kick, dev, index, fd)
                watched[index] = (fd, scope)

    @staticmethod
    def _close_fds(dev: VhostUserDevice) -> None:
        fds, dev.fds_to_close = dev.fds_to_close, []
        for fd in fds:
            _close(fd)

    def report(self) -> dict[str, Any]:
        counts = self.counts
        if self.device is not None:
            counts = _add(counts, self.device.queue_counts())
        return {
            "socket": self.path,
            "connections": self.connections,
            "protocol_errors": self.protocol_errors,
            "connected": self.device is not None,
            "queues": counts,
            "messages": dict(sorted(self.messages.items())),
        }


async def _watch_kick(
    dev: VhostUserDevice, index: int, fd: int,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:  # fmt: skip
    with trio.CancelScope() as scope:
        task_status.started(scope)
        while True:
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:  # the ring stopped: its kick fd went
                return
            try:
                data = os.read(fd, 8)
            except BlockingIOError:
                continue
            except OSError:
                return
            if len(data) == 8:
                dev.kick(index, _COUNT.unpack(data)[0])


def _add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _add(out.get(k, {}), v) if isinstance(v, dict) else out.get(k, 0) + v
    return out
