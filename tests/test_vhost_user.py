"""vhost-user: the protocol against a front-end played here, in process and on a socket.

The well-behaved front-end is xlio's own driver laid out in a region of
"guest memory" (a bytearray, or a memfd on the socket), its notify writes
the kicks; the hostile one sends what QEMU never would. A real QEMU guest
is in ``test_real_guest.py``.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
from typing import Any

import pytest
import trio

from xlio.backends.datapath import Datapath
from xlio.backends.vhost_user import (
    DEVICE_FEATURES,
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    HEADER,
    MEM_HEADER,
    REGION,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_NOFD,
    VRING_STATE,
    ProtocolError,
    ProtocolFeature,
    Request,
    VhostUserDevice,
    frontend_handshake,
)
from xlio.backends.wire import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC, LoopbackWire
from xlio.frontends.virtio_net import RXQ, TXQ, VirtioNetDriver, VmmTransport
from xlio.measure import make_config
from xlio.packets import UDP_ECHO_PORT, udp_frame_of_size
from xlio.sim.arch import machine_for
from xlio.sim.memory import MappedHost
from xlio.virtio import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1

MIB = 1 << 20
OFFERED = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX)  # what the "VMM" offers
UADDR = 0x7F0000000000  # where the "VMM" has the region in its address space


def msg(req: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(req, VERSION | flags, len(payload)) + payload


def state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def mem_table(regions: list[tuple[int, int, int, int]]) -> bytes:
    return MEM_HEADER.pack(len(regions), 0) + b"".join(REGION.pack(*r) for r in regions)


class Frontend:
    """A VMM in process: one region of guest memory at GPA 0 (a bytearray),
    xlio's driver in it, every message fed straight to the device."""

    def __init__(self, path: str, size: int = 8 * MIB) -> None:
        self.buf = bytearray(size)
        self.mapped: list[Any] = []
        self.dp = Datapath(
            machine_for(make_config("turtles-2010", path)), path, guest=True,
            wire=LoopbackWire(capture=True),
        )  # fmt: skip
        self.signals: list[int] = []
        self.dev = VhostUserDevice(self.dp, self._map, lambda b: None,
                                   signal_fd=self.signals.append)  # fmt: skip
        self.next_fd = 1000
        host = MappedHost([(0, size, self.buf)])
        self.vmm = VmmTransport(OFFERED, self.start, lambda i: self.dev.kick(i, 1))
        self.driver = VirtioNetDriver(host.memory("L2 driver"), self.vmm, queue_size=256)

    def _map(self, fd: int, offset: int, size: int) -> Any:
        if offset + size > len(self.buf):
            raise OSError("mapping past the end of the memfd")
        view = memoryview(self.buf)[offset : offset + size]
        self.mapped.append(view)
        return view

    def fd(self) -> int:
        self.next_fd += 1
        return self.next_fd

    def send(self, data: bytes, fds: list[int] | None = None) -> list[bytes]:
        return self.dev.feed(data, fds or [])

    def start(self, features: int, queues: dict[int, tuple[int, int, int, int]]) -> None:
        """DRIVER_OK: the VMM's handshake, each fd a fresh number."""
        for m in frontend_handshake(features, len(self.buf), UADDR, queues):
            self.send(m.data, [self.fd()] if m.fd else [])

    def echo(self, first: int, n: int, size: int = 200) -> list[bytes]:
        frames = [udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_ECHO_PORT,
                                    size, first + i) for i in range(n)]  # fmt: skip
        self.driver.send(frames)
        return self.driver.receive()


@pytest.mark.parametrize("path", ["single", "l1", "l0"])
def test_xlio_driver_as_a_vmm_is_served_on_every_path(path: str) -> None:
    fe = Frontend(path)
    fe.driver.probe()
    assert fe.dev.serving and fe.dev.attaches == 1
    got = [f for i in range(20) for f in fe.echo(10 * i, 10)]
    assert len(got) == 200 and len(fe.dp.wire.seen_by_peer) == 200
    assert (fe.dp.direct.active) == (path == "l0")
    # every interrupt went to the RX queue's call fd: TX's the driver suppressed
    assert fe.signals and set(fe.signals) == {fe.dev.vrings[RXQ].call}
    counts = fe.dev.queue_counts()
    assert counts["tx"]["avail_entries"] == 200 and counts["rx"]["interrupts"] == len(fe.signals)


def test_get_vring_base_stops_the_ring_and_a_restart_resumes_where_it_stood() -> None:
    fe = Frontend("l0")
    fe.driver.probe()
    fe.echo(0, 30)
    reply = fe.send(msg(Request.GET_VRING_BASE, state(TXQ, 0)))
    index, base = VRING_STATE.unpack(reply[0][HEADER.size :])
    assert (index, base) == (TXQ, 30) and not fe.dev.serving and not fe.dp.direct.active
    fe.send(msg(Request.SET_VRING_BASE, state(TXQ, base)))
    fe.send(msg(Request.SET_VRING_KICK, U64.pack(TXQ)), [fe.fd()])
    assert fe.dev.serving and fe.dev.attaches == 2
    assert len(fe.echo(30, 30)) == 30 and len(fe.dp.wire.seen_by_peer) == 60


def test_delegate_and_revoke_under_a_vhost_user_guest_lose_and_repeat_nothing() -> None:
    fe = Frontend("l1")
    fe.driver.probe()
    got = []
    for i in range(12):
        got += fe.echo(5 * i, 5)
        if fe.dp.direct.active:
            assert fe.dp.l1_revoke()
        else:
            fe.dp.l1_delegate()
    assert len(got) == 60 and len(set(got)) == 60 and len(fe.dp.wire.seen_by_peer) == 60


def test_reply_ack_answers_a_need_reply_message_once_it_is_done() -> None:
    fe = Frontend("single")
    fe.send(msg(Request.SET_PROTOCOL_FEATURES, U64.pack(1 << ProtocolFeature.REPLY_ACK)))
    [r] = fe.send(msg(Request.SET_OWNER, flags=FLAG_NEED_REPLY))
    req, flags, size = HEADER.unpack_from(r)
    assert req == Request.SET_OWNER and flags & 0x4 and U64.unpack(r[HEADER.size :]) == (0,)
    [r] = fe.send(msg(Request.GET_FEATURES))
    assert U64.unpack(r[HEADER.size :])[0] == DEVICE_FEATURES
    # without REPLY_ACK negotiated, no ack
    fe2 = Frontend("single")
    assert fe2.send(msg(Request.SET_OWNER, flags=FLAG_NEED_REPLY)) == []


def _ready_to_kick(fe: Frontend, size: int = 256) -> None:
    fe.send(msg(Request.SET_MEM_TABLE, mem_table([(0, len(fe.buf), UADDR, 0)])), [fe.fd()])
    fe.send(msg(Request.SET_VRING_NUM, state(0, size)))


HOSTILE: dict[str, Any] = {
    "unknown request": lambda fe: fe.send(msg(99)),
    "oversize payload": lambda fe: fe.send(HEADER.pack(Request.SET_FEATURES, VERSION, 1 << 20)),
    "short payload": lambda fe: fe.send(msg(Request.SET_FEATURES, b"\0" * 4)),
    "wrong version": lambda fe: fe.send(HEADER.pack(Request.GET_FEATURES, 2, 0)),
    "fd with a message that takes none": lambda fe: fe.send(msg(Request.SET_OWNER), [fe.fd()]),
    "fewer fds than regions": lambda fe: fe.send(
        msg(
            Request.SET_MEM_TABLE,
            mem_table([(0, MIB, UADDR, 0), (2 * MIB, MIB, UADDR + 2 * MIB, 2 * MIB)]),
        ),
        [fe.fd()],
    ),
    "more fds than regions": lambda fe: fe.send(
        msg(Request.SET_MEM_TABLE, mem_table([(0, MIB, UADDR, 0)])), [fe.fd(), fe.fd()]
    ),
    "overlapping regions": lambda fe: fe.send(
        msg(
            Request.SET_MEM_TABLE,
            mem_table([(0, 2 * MIB, UADDR, 0), (MIB, MIB, UADDR + 4 * MIB, MIB)]),
        ),
        [fe.fd(), fe.fd()],
    ),
    "region not whole pages": lambda fe: fe.send(
        msg(Request.SET_MEM_TABLE, mem_table([(0, MIB + 1, UADDR, 0)])), [fe.fd()]
    ),
    "region past the memfd": lambda fe: fe.send(
        msg(Request.SET_MEM_TABLE, mem_table([(0, 64 * MIB, UADDR, 0)])), [fe.fd()]
    ),
    "queue size 0": lambda fe: fe.send(msg(Request.SET_VRING_NUM, state(0, 0))),
    "queue size 3": lambda fe: fe.send(msg(Request.SET_VRING_NUM, state(0, 3))),
    "queue size 65536": lambda fe: fe.send(msg(Request.SET_VRING_NUM, state(1, 65536))),
    "queue index 7": lambda fe: fe.send(msg(Request.SET_VRING_NUM, state(7, 256))),
    "base beyond a ring index": lambda fe: fe.send(msg(Request.SET_VRING_BASE, state(0, 1 << 16))),
    "kick before the memory table": lambda fe: (
        fe.send(msg(Request.SET_VRING_NUM, state(0, 256))),
        fe.send(msg(Request.SET_VRING_KICK, U64.pack(0)), [fe.fd()]),
    ),
    "kick without an fd": lambda fe: fe.send(msg(Request.SET_VRING_KICK, U64.pack(VRING_NOFD))),
    "kick flag says no fd but one came": lambda fe: fe.send(
        msg(Request.SET_VRING_CALL, U64.pack(VRING_NOFD)), [fe.fd()]
    ),
    "get_vring_base of a queue never set": lambda fe: fe.send(
        msg(Request.GET_VRING_BASE, state(1, 0))
    ),
    "features never offered": lambda fe: fe.send(msg(Request.SET_FEATURES, U64.pack(1 << 22))),
    "rings outside every region": lambda fe: (
        _ready_to_kick(fe),
        fe.send(msg(Request.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, 0x1000, 0x3000, 0x2000, 0))),
        fe.send(msg(Request.SET_VRING_NUM, state(1, 256))),
        fe.send(
            msg(
                Request.SET_VRING_ADDR,
                VRING_ADDR.pack(1, 0, UADDR, UADDR + 0x2000, UADDR + 0x1000, 0),
            )
        ),
        fe.send(msg(Request.SET_VRING_ENABLE, state(0, 1))),
        fe.send(msg(Request.SET_VRING_ENABLE, state(1, 1))),
        fe.send(msg(Request.SET_FEATURES, U64.pack(1 << F_PROTOCOL_FEATURES))),
        fe.send(msg(Request.SET_VRING_KICK, U64.pack(1)), [fe.fd()]),
        fe.send(msg(Request.SET_VRING_KICK, U64.pack(0)), [fe.fd()]),
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_frontend_gets_one_line_and_the_connection_ends(case: str) -> None:
    fe = Frontend("l1")
    with pytest.raises(ProtocolError) as e:
        HOSTILE[case](fe)
    assert str(e.value) and "\n" not in str(e.value)
    fe.dev.close()
    sent = set(range(1001, fe.next_fd + 1))
    assert set(fe.dev.fds_to_close) == sent  # every fd it sent is handed back to close
    assert not fe.dev.serving and fe.dev.memory is None


def test_a_message_cut_in_half_waits_and_is_reported_at_the_end_of_the_stream() -> None:
    fe = Frontend("single")
    whole = msg(Request.SET_FEATURES, U64.pack(1 << 32))
    assert fe.send(whole[:7]) == [] and fe.send(whole[7:15]) == []
    assert fe.dev.end_of_stream() is not None
    fe.send(whole[15:])
    assert fe.dev.features == 1 << 32 and fe.dev.end_of_stream() is None


def test_a_flood_of_messages_is_served_in_bounded_memory() -> None:
    fe = Frontend("single")
    one = msg(Request.GET_QUEUE_NUM)
    replies = fe.send(one * 5000)
    assert len(replies) == 5000 and fe.dev.buffer == b""


def test_descriptors_pointing_outside_the_regions_are_counted_not_followed() -> None:
    """A TX descriptor past the end of guest memory, across it, or far
    beyond is dropped and counted; the one good frame goes out."""
    fe = Frontend("single", size=8 * MIB)
    fe.driver.probe()
    tx = fe.driver.tx
    assert tx is not None
    frame = udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_ECHO_PORT, 100, 0)
    fe.driver.send([frame])
    dev = fe.dp.active_device()
    assert dev is not None
    for bad in (len(fe.buf), len(fe.buf) - 8, 1 << 40):
        i = tx.free[-1]
        struct.pack_into("<QIHH", fe.buf, tx.desc + 16 * i, bad, 112, 0, 0)
        slot = tx.avail_idx
        struct.pack_into("<H", fe.buf, tx.avail + 4 + 2 * (slot % tx.size), i)
        struct.pack_into("<H", fe.buf, tx.avail + 2, (slot + 1) & 0xFFFF)
        tx.avail_idx += 1
        fe.dev.kick(TXQ, 1)
    assert dev.metrics["tx_fails"] == 3 and len(fe.dp.wire.seen_by_peer) == 1


# ---------------------------------------------------------------- on a socket
def _server_datapath() -> Datapath:
    return Datapath(machine_for(make_config("turtles-2010", "l1")), "l1", guest=True,
                    wire=LoopbackWire(capture=True))  # fmt: skip


async def _client(path: str) -> trio.socket.SocketType:
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await s.connect(path)
    return s


async def test_on_a_socket_a_bad_message_closes_that_connection_and_the_next_is_served() -> None:
    from xlio.vhostsession import VhostUserServer

    logged: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vu.sock")
        srv = VhostUserServer(_server_datapath(), path, logged.append)
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.serve)
            bad = await _client(path)
            await bad.send(HEADER.pack(77, VERSION, 0))
            assert await bad.recv(16) == b""  # closed on us
            bad.close()
            cut = await _client(path)
            await cut.send(msg(Request.GET_FEATURES)[:5])
            cut.close()
            good = await _client(path)
            await good.send(msg(Request.GET_FEATURES))
            r = await good.recv(64)
            assert U64.unpack(r[HEADER.size :])[0] == DEVICE_FEATURES
            # a memory table with its fd over SCM_RIGHTS, from a real memfd
            fd = os.memfd_create("xlio-test")
            os.ftruncate(fd, 2 * MIB)
            await good.sendmsg(
                [msg(Request.SET_MEM_TABLE, mem_table([(0, 2 * MIB, UADDR, 0)]))],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))],
            )
            os.close(fd)
            await good.send(msg(Request.GET_QUEUE_NUM))
            r = await good.recv(64)
            assert U64.unpack(r[HEADER.size :])[0] == 2
            dev = srv.device
            assert dev is not None and dev.memory is not None
            good.close()
            with trio.fail_after(5):
                while srv.device is not None:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert len(logged) == 2 and all("\n" not in line for line in logged)
    assert "unknown request 77" in logged[0] and "inside a message" in logged[1]
    assert srv.connections == 3 and srv.protocol_errors == 2
    assert not [m for m in open("/proc/self/maps") if "xlio-test" in m]  # unmapped


@pytest.mark.parametrize("real", ["single", "l1", "l0"])
def test_shadows_charge_the_same_events_as_a_real_run_on_their_path(real: str) -> None:
    """xlio's driver notifies alike on every path (deterministic), so the
    shadow of path P in a run on another path must charge what a run on P
    charges: every exit, by level, and the cycles."""
    from xlio.backends.datapath import DATAPATH_DEFAULTS
    from xlio.backends.shadow import Shadows

    def run(path: str, shadows_of: tuple[str, ...] = ()) -> tuple[Frontend, Shadows | None]:
        fe = Frontend(path)
        sh = None
        if shadows_of:
            ms = {p: machine_for(make_config("turtles-2010", p)) for p in shadows_of}
            sh = Shadows(fe.dp, ms, dict(DATAPATH_DEFAULTS))
            fe.dev.shadows = sh
        fe.driver.probe()
        for m in [fe.dp.m, *(d.m for d in (sh.dps.values() if sh else []))]:
            m.reset_stats()
        for i in range(20):
            fe.echo(10 * i, 10)
        return fe, sh

    others = tuple(p for p in ("single", "l1", "l0") if p != real)
    _, sh = run(real, others)
    assert sh is not None
    sh.catch_up()
    for p in others:
        alone, _ = run(p)
        want, got = alone.dp.m.stats.summary(), sh.dps[p].m.stats.summary()
        for k in ("l0_exits", "l1_exits", "l2_exits", "reflected", "l1_be_exits"):
            assert got[k] == want[k], (p, k, got[k], want[k])
        assert got["cycles"] == pytest.approx(want["cycles"], rel=1e-9)


def test_mapped_memory_with_a_hole_faults_there_and_touches_nothing_outside() -> None:
    """QEMU's two regions over one memfd leave 640-768 KiB unmapped: an access
    there, or one that runs from a region into the hole, faults; a region's
    bytes are its buffer's."""
    from xlio.sim.memory import MemoryFault

    low, high = bytearray(0xA0000), bytearray(0x100000)
    host = MappedHost([(0, len(low), low), (0xC0000, len(high), high)])
    mem = host.memory("guest")
    mem.write(0xC0010, b"abc")
    assert high[0x10:0x13] == b"abc" and mem.read(0xC0010, 3) == b"abc"
    for gpa, n in ((0xA0000, 4), (0x9FFFE, 4), (0xBFFFF, 2), (0x1C0000, 1), (-1, 2)):
        with pytest.raises(MemoryFault):
            mem.read(gpa, n)
        with pytest.raises(MemoryFault):
            mem.write(gpa, bytes(n))
    assert not any(low[-4:]) and mem.faults == 10
    with pytest.raises(ValueError):
        MappedHost([(0, 0x2000, bytearray(0x2000)), (0x1000, 0x1000, bytearray(0x1000))])
    host.release()
    with pytest.raises(MemoryFault):
        mem.read(0xC0010, 3)


def _rx_device(mergeable: bool, nbufs: int, buf: int = 2048) -> tuple[Any, Any, Any]:
    from xlio.backends.device import NetDevice
    from xlio.backends.virtqueue import DeviceQueue
    from xlio.frontends.virtio_net import DriverQueue
    from xlio.virtio import VIRTIO_NET_F_MRG_RXBUF

    buf_area = bytearray(4 * MIB)
    mem = MappedHost([(0, len(buf_area), buf_area)]).memory("guest")
    drv = DriverQueue(mem, 64, 0x2000, True)
    rxq = DeviceQueue(mem, 64, drv.desc, drv.avail, drv.used, True)
    txq = DeviceQueue(mem, 8, 0x9000, 0x9080, 0x9100, True)
    dev = NetDevice(mem, rxq, txq, "rx",
                    features=(1 << VIRTIO_NET_F_MRG_RXBUF) if mergeable else 0)  # fmt: skip
    for _ in range(nbufs):
        drv.add_many(0x100000, 4096, [buf], write=True)
    drv.publish()
    return mem, drv, dev


def test_mergeable_rx_buffers_carry_a_frame_over_several_in_order() -> None:
    from xlio.backends.device import with_rx_header

    sizes = [100, 5000, 100, 9000, 1514]
    frames = [with_rx_header(bytes([i + 1]) * n) for i, n in enumerate(sizes)]
    mem, drv, dev = _rx_device(True, 16)
    consumed, _ = dev.rx(frames)
    ids, lens = drv.take_used()
    assert consumed == 5 and dev.metrics["rx_packets_count"] == 5
    assert dev.metrics["rx_bytes_count"] == sum(sizes)
    got, at = [], 0
    for f in frames:  # each frame's buffers consecutive in the used ring, in order
        first = mem.read(0x100000 + 4096 * ids[at], lens[at])
        k = int.from_bytes(first[10:12], "little")
        body = first + b"".join(
            mem.read(0x100000 + 4096 * ids[at + i], lens[at + i]) for i in range(1, k)
        )
        got.append(body[12:])
        assert k == -(-len(f) // 2048) and body[:10] == f[:10]
        at += k
    assert got == [f[12:] for f in frames] and at == len(ids)
    # without the feature, a frame over one buffer is dropped and counted
    _, _, plain = _rx_device(False, 16)
    plain.rx(frames)
    assert plain.errors["RX buffer too small for the frame"] == 2


def test_a_mergeable_frame_short_of_buffers_waits_for_the_driver_and_then_goes() -> None:
    from xlio.backends.device import with_rx_header

    frame = with_rx_header(b"x" * 5000)  # three 2,048-byte buffers
    mem, drv, dev = _rx_device(True, 2)
    assert dev.rx([frame])[0] == 0 and dev.metrics["no_rx_avail_buffer"] == 1
    assert dev.rxq.last_avail == 0 and not drv.take_used()[0]  # nothing taken for good
    drv.add_many(0x100000, 4096, [2048], write=True)
    drv.publish()
    assert dev.rx([frame])[0] == 1 and len(drv.take_used()[0]) == 3


def test_mergeable_rx_reassembles_whatever_the_buffer_and_frame_sizes() -> None:
    """Property: for any buffers posted (12 to 3,000 bytes each) and frames
    (14 to 12,000 bytes), what the device consumed is, reassembled by
    ``num_buffers`` from the used ring, exactly those frames in order, each
    buffer's used length within it, and every frame not consumed left whole
    (it waits: the buffers it would need are not all there)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from xlio.backends.device import NetDevice, with_rx_header
    from xlio.backends.virtqueue import DeviceQueue
    from xlio.frontends.virtio_net import DriverQueue
    from xlio.virtio import VIRTIO_NET_F_MRG_RXBUF

    @settings(max_examples=150, deadline=None)
    @given(bufs=st.lists(st.integers(12, 3000), min_size=1, max_size=60),
           sizes=st.lists(st.integers(14, 12000), min_size=1, max_size=20))  # fmt: skip
    def check(bufs: list[int], sizes: list[int]) -> None:
        area = bytearray(4 * MIB)
        mem = MappedHost([(0, len(area), area)]).memory("guest")
        drv = DriverQueue(mem, 64, 0x2000, True)
        rxq = DeviceQueue(mem, 64, drv.desc, drv.avail, drv.used, True)
        txq = DeviceQueue(mem, 8, 0x9000, 0x9080, 0x9100, True)
        dev = NetDevice(mem, rxq, txq, "rx", features=1 << VIRTIO_NET_F_MRG_RXBUF)
        size_of: dict[int, int] = {}
        for b in bufs:
            (gpa,) = drv.add_many(0x100000, 4096, [b], write=True)
            size_of[(gpa - 0x100000) // 4096] = b
        drv.publish()
        frames = [with_rx_header(bytes([i + 1]) * n) for i, n in enumerate(sizes)]
        consumed, _ = dev.rx(frames)
        ids, lens = drv.take_used()
        at, got = 0, []
        while at < len(ids):
            first = mem.read(0x100000 + 4096 * ids[at], lens[at])
            k = int.from_bytes(first[10:12], "little") if lens[at] >= 12 else 0
            assert k >= 1 and all(lens[at + i] <= size_of[ids[at + i]] for i in range(k))
            got.append(first + b"".join(mem.read(0x100000 + 4096 * ids[at + i], lens[at + i])
                                        for i in range(1, k)))  # fmt: skip
            at += k
        assert [g[12:] for g in got] == [f[12:] for f in frames[:consumed]]
        assert consumed == len(got) == dev.metrics["rx_packets_count"]
        left = sum(size_of[i] for i in range(len(bufs)) if i not in set(ids))
        if consumed < len(frames):  # the next frame would not fit what is left
            assert len(frames[consumed]) > left

    check()
