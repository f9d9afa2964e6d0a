"""Wire faults: the tap refuses, truncates, goes down, disappears.

Most run on a stand-in for a tap that needs no privileges: one end of an
AF_UNIX SOCK_SEQPACKET pair (message boundaries kept, as a tap keeps
frames), with the system calls of :class:`~xlio.backends.tap.TapWire`
replaced where a fault is injected. The link going down, the tap and its
namespace deleted run on real taps (root). Every case ends in recovery or a
clean, explained stop, never a hang, and every frame is accounted for:
sent = delivered + counted drops (+ still queued).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest
import trio
from taphosts import needs_taps

from xlio.backends.datapath import Datapath, datapath_options, make_datapath
from xlio.backends.netns import NamespacedTap
from xlio.backends.tap import TapGone, TapWire, serve_tap
from xlio.backends.wire import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC
from xlio.measure import make_config
from xlio.packets import UDP_DISCARD_PORT, udp_frame_of_size
from xlio.sim.nested import NestedVmx
from xlio.tapsession import TapSession, host_ping, run_with
from xlio.virtio import NET_HDR_SIZE


def frames_out(first: int, n: int) -> list[bytes]:
    return [
        udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_DISCARD_PORT, 100, first + i)
        for i in range(n)
    ]


def frames_in(first: int, n: int) -> list[bytes]:
    return [
        udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, UDP_DISCARD_PORT, 100, first + i)
        for i in range(n)
    ]


@pytest.fixture
def fake_tap() -> Iterator[tuple[Datapath, TapWire, socket.socket]]:
    """A datapath whose wire is one end of a SEQPACKET pair; the test holds the other."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    peer.setblocking(False)
    wire = TapWire(ours.fileno())
    m = NestedVmx(make_config("kvm-2019", "l0"))
    dp = make_datapath(m, "l0", datapath_options({}), capture=True, wire=wire)
    try:
        yield dp, wire, peer
    finally:
        ours.close()
        peer.close()


def drain(peer: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(peer.recv(65536)[NET_HDR_SIZE:])
        except BlockingIOError:
            return got


def faulty(errs: dict[int, int], real: Callable[[int, bytes], int]) -> Callable[[int, bytes], int]:
    """os.write that fails the n-th call (0-based) with errs[n]."""
    calls = [0]

    def write(fd: int, data: bytes) -> int:
        n = calls[0]
        calls[0] += 1
        if n in errs:
            e = errs[n]
            if e == errno.EAGAIN:
                raise BlockingIOError(e, os.strerror(e))
            raise OSError(e, os.strerror(e))
        return real(fd, data)

    return write


def accounted(wire: TapWire) -> bool:
    return wire.offered == wire.frames_to_peer + wire.tap_write_fails + len(wire.backlog)


def test_eagain_queues_and_the_writer_flushes_in_order(fake_tap) -> None:  # type: ignore[no-untyped-def]
    dp, wire, peer = fake_tap
    wire.write = faulty({2: errno.EAGAIN}, os.write)
    dp.send(frames_out(0, 6))
    assert len(wire.backlog) == 4 and accounted(wire)  # frame 2 and everything after it wait
    assert wire.flush_backlog()
    assert drain(peer) == frames_out(0, 6) and accounted(wire)
    assert wire.tap_write_fails == 0


@pytest.mark.parametrize("err", [errno.ENOBUFS, errno.EIO], ids=["ENOBUFS", "EIO"])
def test_a_refused_write_is_a_counted_drop_and_the_wire_goes_on(fake_tap, err: int) -> None:  # type: ignore[no-untyped-def]
    dp, wire, peer = fake_tap
    wire.write = faulty({1: err, 3: err}, os.write)
    dp.send(frames_out(0, 6))
    sent = frames_out(0, 6)
    assert drain(peer) == [sent[0], sent[2], sent[4], sent[5]]
    assert wire.tap_write_fails == 2 and accounted(wire)
    assert wire.tx_link_down == (2 if err == errno.EIO else 0)


def test_a_vanished_tap_is_a_clean_error(fake_tap) -> None:  # type: ignore[no-untyped-def]
    dp, wire, peer = fake_tap
    wire.write = faulty({0: errno.EBADFD}, os.write)
    with pytest.raises(TapGone, match="tap deleted"):
        dp.send(frames_out(0, 1))
    assert accounted(wire)


async def test_short_reads_are_counted_and_good_frames_still_arrive(fake_tap) -> None:  # type: ignore[no-untyped-def]
    dp, wire, peer = fake_tap
    good = frames_in(0, 3)
    peer.send(bytes(12) + good[0])
    peer.send(b"\x00" * 5)  # shorter than the virtio-net header
    peer.send(bytes(12))  # a header and no frame
    peer.send(bytes(12) + good[1])
    peer.send(bytes(12) + good[2])
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            await n.start(serve_tap, dp, wire)
            while dp.received is None or len(dp.received) < 3:
                await trio.sleep(0.01)
            n.cancel_scope.cancel()
    assert dp.received == good
    assert wire.tap_read_fails == 2 and wire.frames_from_peer == 3


async def test_a_burst_larger_than_the_inbox_stays_in_the_kernel_until_l2_has_room(
    fake_tap,  # type: ignore[no-untyped-def]
) -> None:
    from xlio.backends import tap

    dp, wire, peer = fake_tap
    dp.received = None  # count at the device
    n = 120  # what one AF_UNIX socket buffer holds
    for f in frames_in(0, n):
        peer.send(bytes(12) + f)
    reads = [0]
    real_read = os.read

    def counting_read(fd: int, size: int) -> bytes:
        reads[0] += 1
        return real_read(fd, size)

    wire.read = counting_read
    old = tap.INBOX_MAX
    tap.INBOX_MAX = 32
    try:
        assert wire.read_available() == 32 and reads[0] == 32  # the rest stays queued
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_tap, dp, wire)
                dev = dp.active_device()
                assert dev is not None
                while dev.metrics["rx_packets_count"] < n:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    finally:
        tap.INBOX_MAX = old
    assert wire.frames_from_peer == n


def _arrivals(dp: Datapath, frames: list[bytes]) -> Callable[[int, int], bytes]:
    """A tap read for the fake tap: the first frame is the one queued on the
    socket (which makes it readable once); frame ``i + 1`` arrives only once
    L2 has received frame ``i``, as a client sends its next request when the
    answer is out. Then the tap is empty (EAGAIN)."""
    at = [0]

    def read(fd: int, size: int) -> bytes:
        if at[0] == 0:
            at[0] = 1
            return os.read(fd, size)
        if at[0] >= len(frames) or len(dp.received or ()) < at[0]:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        at[0] += 1
        return bytes(12) + frames[at[0] - 1]

    return read


async def test_the_reader_reads_again_after_a_pump_and_waits_only_on_an_empty_tap(
    fake_tap,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vhost-net's handle_rx: after a pass the reader reads the tap again, and
    only a read that finds it empty sends it back to wait for readiness.
    Frames that arrive while it works (here each after the one before was
    received) are taken without a wait: the socket is readable once."""
    dp, wire, peer = fake_tap
    frames = frames_in(0, 20)
    peer.send(bytes(12) + frames[0])
    wire.read = _arrivals(dp, frames)
    waits = [0]
    real_wait = trio.lowlevel.wait_readable

    async def counting_wait(fd: int) -> None:
        waits[0] += 1
        await real_wait(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting_wait)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            await n.start(serve_tap, dp, wire)
            while len(dp.received or ()) < len(frames):
                await trio.sleep(0.01)
            n.cancel_scope.cancel()
    assert dp.received == frames
    assert waits[0] == 2  # the first frame's, then the empty tap's


async def test_a_tap_that_never_empties_starves_no_task_and_the_run_still_stops(
    fake_tap,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past RX_WEIGHT frames the reader lets the other tasks run (as
    vhost_exceeds_weight requeues the work): a flood neither starves them
    nor keeps a cancellation from ending the run."""
    from xlio.backends import tap

    dp, wire, peer = fake_tap
    dp.received = None
    frame = bytes(12) + frames_in(0, 1)[0]
    peer.send(frame)  # readable once; then the tap always has the next frame
    cap = 50 * tap.RX_WEIGHT
    reads = [0]

    def flood(fd: int, size: int) -> bytes:
        reads[0] += 1
        if reads[0] > cap:  # a reader that never yields ends here, not in a hang
            raise OSError(errno.EBADF, "flood over")
        return frame

    wire.read = flood
    monkeypatch.setattr(tap, "INBOX_MAX", 64)  # small passes: several per weight
    turns = 0
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            await n.start(serve_tap, dp, wire)
            while turns < 5:  # this task gets its turns while the flood goes on
                await trio.sleep(0)
                turns += 1
            n.cancel_scope.cancel()
    assert tap.RX_WEIGHT <= reads[0] < cap  # the reader ran between this task's turns


# ---------------------------------------------------------------- real taps
def _link(host: NamespacedTap, state: str) -> None:
    assert host.info is not None
    subprocess.run(
        ["ip", "netns", "exec", host.name, "ip", "link", "set", host.ifname, state], check=True
    )


@needs_taps
async def test_link_down_drops_are_counted_and_traffic_resumes_when_it_comes_back(
    host: NamespacedTap,
) -> None:
    s = TapSession("l0", host, preset="kvm-2019")
    assert host.info is not None
    info = host.info

    async def body() -> tuple[dict, dict]:
        first = await host_ping(info, 3, interval=0.05)
        await trio.to_thread.run_sync(_link, host, "down")
        s.dp.send([s.dp.endpoint.ping(s.host_ip, 1, i, b"x" * 32) for i in range(5)])
        await trio.to_thread.run_sync(_link, host, "up")
        await trio.sleep(0.5)  # the link and the neighbour entry come back
        second = await host_ping(info, 5, interval=0.05)
        return first, second

    with trio.fail_after(30):
        first, second = await run_with(s, body)
    assert first["received"] == 3 and second["received"] == 5
    assert s.wire.tx_link_down == 5 and accounted(s.wire)


@needs_taps
@pytest.mark.parametrize("what", ["tap", "namespace"])
async def test_the_tap_or_its_namespace_deleted_mid_run_is_a_clean_stop(
    host: NamespacedTap, what: str
) -> None:
    s = TapSession("l1", host)

    def delete() -> None:
        cmd = (
            ["ip", "netns", "exec", host.name, "ip", "link", "del", host.ifname]
            if what == "tap"
            else ["ip", "netns", "del", host.name]
        )
        subprocess.run(cmd, check=True)

    async def delete_soon() -> None:
        await trio.sleep(0.2)
        await trio.to_thread.run_sync(delete)

    async with trio.open_nursery() as n:
        n.start_soon(delete_soon)
        with pytest.raises(TapGone, match="tap deleted"), trio.fail_after(5):
            await s.run()


@needs_taps
async def test_a_burst_of_8000_frames_into_l2_over_the_tap_is_all_delivered(
    host: NamespacedTap,
) -> None:
    """The reader leaves what its inbox cannot hold in the kernel's queue
    (the tap's txqueuelen is 10,000): nothing is dropped anywhere."""
    import socket as so

    from pyroute2 import NetNS, netns

    s = TapSession("l0", host, preset="kvm-2019")
    s.dp.received = None
    n = 8000
    frames = [
        udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, UDP_DISCARD_PORT, 64, i)
        for i in range(n)
    ]
    netns.pushns(host.name)
    try:
        sock = so.socket(so.AF_PACKET, so.SOCK_RAW)
    finally:
        netns.popns()
    with sock:
        sock.bind((host.ifname, 0))
        for f in frames:  # queued in the tap before L2 reads any
            sock.send(f)
    dev = s.dp.active_device()
    assert dev is not None

    async def drained() -> None:
        while dev.metrics["rx_packets_count"] < n:
            await trio.sleep(0.01)

    with trio.fail_after(60):
        await run_with(s, drained)
    with NetNS(host.name) as ns:
        stats = ns.get_links(ns.link_lookup(ifname=host.ifname)[0])[0].get_attr("IFLA_STATS64")
    assert dev.metrics["rx_packets_count"] == n and dev.metrics["rx_fails"] == 0
    assert stats["tx_dropped"] == 0 and s.wire.frames_from_peer == n
