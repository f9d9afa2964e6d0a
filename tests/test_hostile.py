"""A hostile L2 and odd but valid traffic: each finding of the reliability issue, as a test.

Every test here failed before its fix. The guest-memory audit (every host
frame the serving device touches lies in L2's memory) runs wherever a
device reads or writes what L2 controls.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_datapath import (
    PATHS,
    Hostile,
    audit,
    guest_frames,
    l2_frames,
    new_dp,
    peer_frames,
)

from xlio.backends.datapath import Datapath
from xlio.backends.direct import DelegationRefused
from xlio.backends.wire import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC
from xlio.frontends.virtio_net import RXQ, TXQ
from xlio.packets import (
    BROADCAST,
    UDP_DISCARD_PORT,
    UDP_ECHO_PORT,
    arp_frame,
    icmp_echo_frame,
    udp_frame,
)
from xlio.sim.nested import L2
from xlio.sim.vmx import ExitReason
from xlio.virtio import DESC, MAX_TX_CHAIN_BYTES, NET_HDR, STATUS_DRIVER_OK, VIRTQ_DESC_F_NEXT


def chained_tx(dp: Datapath, frame: bytes, header: bytes = bytes(12)) -> None:
    """L2 posts ``header + frame`` in two chained descriptors and kicks."""
    h = Hostile(dp)
    data = header + frame
    cut = len(data) // 2
    a = h.buf()
    b = a + 8192  # two separate TX buffers (each buf_size apart)
    dp.l2_view.write(a, data[:cut])
    dp.l2_view.write(b, data[cut:])
    h.tx_chain([(a, cut, VIRTQ_DESC_F_NEXT, 1), (b, len(data) - cut, 0, -1)])


def healthy(dp: Datapath, first: int = 1000) -> None:
    """L2 runs, and traffic flows both ways."""
    assert dp.m.state == L2
    assert dp.wire.seen_by_peer is not None and dp.received is not None
    dp.send(guest_frames(first, 3))
    assert dp.wire.seen_by_peer[-3:] == guest_frames(first, 3)
    dp.wire.inject(peer_frames(first, 3, port=UDP_DISCARD_PORT))
    dp.pump()
    assert dp.received[-3:] == peer_frames(first, 3, port=UDP_DISCARD_PORT)


# ---------------------------------------------------------------- a valid jumbo frame
@pytest.mark.parametrize("path", PATHS)
def test_a_3000_byte_frame_in_two_descriptors_never_breaks_a_path(path: str) -> None:
    dp = new_dp(path)
    big = guest_frames(0, 1, size=3000)[0]
    chained_tx(dp, big)
    assert dp.wire.seen_by_peer is not None
    # on l1, L1's NIC relays it as a chain of its own buffers, as vhost-net
    # over a tap hands a large skb to L1's virtio-net
    assert dp.wire.seen_by_peer[-1] == big
    healthy(dp)


SCRATCH = 16 << 20  # an L2 address clear of the driver's rings and buffers, mapped


def _l2_chain(dp: Datapath, data: bytes, k: int) -> None:
    """L2 posts ``data`` as one TX chain of ``k`` descriptors (nearly equal
    pieces of one area of its memory) and kicks; its driver reclaims the chain."""
    tx = dp.driver.tx
    assert tx is not None
    tx.take_used()
    ids = [tx.free.pop() for _ in range(k)]
    dp.l2_view.write(SCRATCH, data)
    cuts = [len(data) * j // k for j in range(k + 1)]
    for j, i in enumerate(ids):
        last = j == k - 1
        dp.l2_view.write(tx.desc + 16 * i, DESC.pack(SCRATCH + cuts[j], cuts[j + 1] - cuts[j],
                                                     0 if last else VIRTQ_DESC_F_NEXT,
                                                     0 if last else ids[j + 1]))  # fmt: skip
    dp.l2_view.write_u16(tx.avail + 4 + 2 * (tx.avail_idx % tx.size), ids[0])
    tx.avail_idx = (tx.avail_idx + 1) & 0xFFFF
    tx.in_flight.add(ids[0])
    tx.chained[ids[0]] = ids[1:]
    tx.publish()
    dp.kick(TXQ)


TX_DROPS = ("tx_fails", "tx_malformed_frames", "tx_spoofed_mac_count", "tx_too_big", "tx_busy")


def _drops(dp: Datapath) -> int:
    """Every frame any device or driver on the path counted as dropped on TX."""
    return sum(n for d in dp.metrics().values() for k, n in d.items() if k in TX_DROPS)


@pytest.mark.parametrize("queue_size", [4, 256])
@pytest.mark.parametrize("path", PATHS)
def test_every_tx_chain_is_delivered_or_counted_across_both_hops(
    path: str, queue_size: int
) -> None:
    """Sent = delivered + counted drops, for frames of 60 to 65,550 bytes (chains
    of 72 to 65,562 bytes with the header) in chains of 1 to the queue size; on
    l1 across L1's backend and L1's own NIC. Every valid frame is delivered."""
    dp = new_dp(path, queue_size=queue_size)
    assert dp.wire.seen_by_peer is not None
    sent, wire0, drops0 = 0, len(dp.wire.seen_by_peer), _drops(dp)
    for size in (60, 1514, 2036, 2037, 3000, 9000, 32768, 65550, 65551):
        # a 60-byte UDP frame of L2's, padded (a GSO-sized frame is no IPv4 packet)
        frame = guest_frames(size, 1, size=60)[0] + (bytes(range(256)) * 257)[: size - 60]
        data = bytes(12) + frame
        for k in sorted({1, 2, 3, min(queue_size, len(data))}):  # no empty descriptor
            before = len(dp.wire.seen_by_peer)
            _l2_chain(dp, data, k)
            sent += 1
            delivered = dp.wire.seen_by_peer[before:]
            if len(data) <= MAX_TX_CHAIN_BYTES:
                assert delivered == [frame], (size, k)
            else:  # over the device's limit: L2's backend counts it, nothing goes out
                assert delivered == [], (size, k)
            assert sent == len(dp.wire.seen_by_peer) - wire0 + _drops(dp) - drops0, (size, k)
    healthy(dp)


# ---------------------------------------------------------------- a late RX interrupt
@pytest.mark.parametrize("event_idx", [True, False])
@pytest.mark.parametrize("where", ["l1", "l0-revoked"])
def test_a_late_rx_interrupt_never_stalls_rx(event_idx: bool, where: str) -> None:
    dp = new_dp("l1" if where == "l1" else "l0", queue_size=16, event_idx=event_idx)
    if where == "l0-revoked":
        assert dp.l1_revoke()
    handler = dp.l2_interrupt
    dp.l2_interrupt = lambda: None  # type: ignore[method-assign]  # L2's handler is late
    dp.wire.inject(peer_frames(0, 32, port=UDP_DISCARD_PORT))
    dp.pump()
    dp.l2_interrupt = handler  # type: ignore[method-assign]
    handler()
    dp.wire.inject(peer_frames(32, 4, port=UDP_DISCARD_PORT))
    dp.pump()
    assert dp.received == peer_frames(0, 32, port=UDP_DISCARD_PORT) + peer_frames(
        32, 4, port=UDP_DISCARD_PORT
    )
    assert not dp.l1_pending


# ---------------------------------------------------------------- used ring swapped out
@pytest.mark.parametrize("path", ["l1", "l0"])
def test_a_used_ring_page_swapped_out_is_needs_reset_not_an_exception(path: str) -> None:
    dp = new_dp(path, queue_size=2048)
    tx = dp.driver.tx
    assert tx is not None
    for i in range(0, 576, 64):
        dp.send(guest_frames(i, 64))
    tx.take_used()
    for f in guest_frames(600, 3):  # published, not yet kicked
        _, gpa = tx.add(dp.driver.tx_bufs, dp.driver.buf_size, 12 + len(f), write=False)
        dp.l2_view.write(gpa, bytes(12) + f)
    tx.publish()
    page = (tx.used + 4 + 8 * 577) >> 12  # holds used slots only
    assert page > (tx.avail + 6 + 2 * tx.size) >> 12
    touched = audit(dp)
    dp.mmu.evict(page)  # L1 swaps it out (EPT12 entry cleared, INVEPT)
    dp.kick(TXQ)
    dev = dp.active_device()
    assert dev is not None and dp.m.state == L2
    assert touched <= l2_frames(dp)
    if path == "l1":  # L1's vhost faults on the page: L1 swaps it back in and serves on
        assert page not in dp.mmu.swapped and not dev.needs_reset
        assert dp.wire.seen_by_peer is not None
        assert dp.wire.seen_by_peer[-3:] == guest_frames(600, 3)
    else:  # L0 cannot swap L1's memory in: the device needs a reset
        assert dev.needs_reset and dev.errors["used ring unwritable"] == 1
        dp.send(guest_frames(700, 1))  # the config interrupt: the driver resets the device
        assert dp.driver.resets == 1
    healthy(dp)


# ---------------------------------------------------------------- nonsense queue set-up
def _setups(dp: Datapath) -> dict[str, list[tuple[int, int, int, int, int]]]:
    rx, tx = dp.driver.rx, dp.driver.tx
    assert rx is not None and tx is not None
    good_rx = (RXQ, rx.size, rx.desc, rx.avail, rx.used)
    good_tx = (TXQ, tx.size, tx.desc, tx.avail, tx.used)
    return {
        "no queues": [],
        "only rx": [good_rx],
        "only tx": [good_tx],
        "size 100": [good_rx, (TXQ, 100, tx.desc, tx.avail, tx.used)],
        "size 0": [good_rx, (TXQ, 0, tx.desc, tx.avail, tx.used)],
        "used ring at 1<<40": [good_rx, (TXQ, tx.size, tx.desc, tx.avail, 1 << 40)],
        "used ring negative": [good_rx, (TXQ, tx.size, tx.desc, tx.avail, -4096)],
        "rx and tx share a descriptor table": [good_rx, (TXQ, tx.size, rx.desc, tx.avail, tx.used)],
    }


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "case",
    ["no queues", "only rx", "only tx", "size 100", "size 0", "used ring at 1<<40",
     "used ring negative", "rx and tx share a descriptor table"],
)  # fmt: skip
def test_nonsense_queue_setup_at_driver_ok_needs_reset_then_recovers(path: str, case: str) -> None:
    dp = new_dp(path)
    setup = _setups(dp)[case]
    model = dp.model
    model.set_status(0)
    for q in setup:
        model.setup_queue(*q)
    model.set_status(STATUS_DRIVER_OK)  # no exception escapes; L1 resumes L2
    assert dp.m.state == L2
    assert model.setup_errors == 1 and model.device is None
    assert dp.driver.needs_reset()
    dp.driver.reset()
    healthy(dp)


# ---------------------------------------------------------------- a reset on the direct path
def test_a_guest_reset_on_the_direct_path_hands_the_new_rings_to_l0() -> None:
    dp = new_dp("l0")
    old = dp.direct.delegation
    assert old is not None
    dp.driver.reset()
    assert dp.direct.active and dp.l1_dev is None  # one backend, L0's, serves
    healthy(dp, 10)
    # the driver moves its rings: L0 serves the new addresses
    dp.driver.base += 1 << 20
    dp.driver.reset()
    new = dp.direct.delegation
    assert new is not None and new.tx.desc == old.tx.desc + (1 << 20)
    touched = audit(dp)
    healthy(dp, 20)
    assert dp.wire.seen_by_peer is not None and dp.received is not None
    assert len(dp.wire.seen_by_peer) == 6 and len(dp.received) == 6  # none lost
    assert touched <= l2_frames(dp)


# ---------------------------------------------------------------- delegation
def _refused(dp: Datapath) -> list[object]:
    d = dp.direct.delegation
    assert d is not None
    rx, tx = d.rx, d.tx
    pos = lambda q, **kw: replace(q, **kw)  # noqa: E731
    return [
        replace(d, tx=replace(tx, desc=rx.desc)),  # RX and TX share a descriptor table
        replace(d, tx=replace(tx, used=tx.avail & ~3)),  # a used ring on an available ring
        replace(d, tx=replace(tx, used=rx.used)),  # two used rings at one address
        replace(d, rx=pos(rx, last_avail=70000)),
        replace(d, rx=pos(rx, last_avail=-1)),
        replace(d, tx=pos(tx, used_idx=1 << 20)),
        replace(d, tx=pos(tx, last_avail=(tx.used_idx + tx.size + 1) & 0xFFFF)),
        replace(d, mac=bytes(6)),
        replace(d, mac=bytes(7)),
        replace(d, mac=b"\x01\x00\x5e\x00\x00\x01"),  # multicast
        replace(d, mac=b"\xff" * 6),  # broadcast
    ]


def test_delegation_refuses_overlaps_impossible_positions_and_bad_macs() -> None:
    dp = new_dp("l0")
    bad = _refused(dp)
    assert dp.l1_revoke()
    for d in bad:
        with pytest.raises(DelegationRefused):
            dp.direct.delegate(d)  # type: ignore[arg-type]
    assert dp.direct.refusals == len(bad) and not dp.direct.active
    # a second REVOKE is refused, not an exception out of L0's handler
    assert not dp.l1_revoke()
    assert dp.direct.refusals == len(bad) + 1
    healthy(dp)  # L1's backend serves on


# ---------------------------------------------------------------- spoofed MACs, offloads
SPOOFS = {"another unicast MAC": bytes.fromhex("020000000099"), "broadcast": b"\xff" * 6}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spoof", list(SPOOFS))
def test_a_spoofed_source_mac_is_dropped_and_counted(path: str, spoof: str) -> None:
    dp = new_dp(path)
    frame = udp_frame(SPOOFS[spoof], PEER_MAC, GUEST_IP, PEER_IP, 5000, UDP_DISCARD_PORT, b"x" * 40)
    dp.send([frame])
    dev = dp.active_device()
    assert dev is not None and dev.metrics["tx_spoofed_mac_count"] == 1
    assert dp.wire.seen_by_peer == []
    healthy(dp)


OFFLOADS = {
    "NEEDS_CSUM": NET_HDR.pack(1, 0, 0, 0, 34, 6, 0),
    "GSO UDP_L4": NET_HDR.pack(0, 5, 42, 1400, 0, 0, 0),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("offload", list(OFFLOADS))
def test_an_offload_never_negotiated_does_not_reach_the_wire(path: str, offload: str) -> None:
    dp = new_dp(path)
    frame = guest_frames(0, 1)[0]
    chained_tx(dp, frame, header=OFFLOADS[offload])
    dev = dp.active_device()
    assert dev is not None and dev.errors["offload not negotiated"] == 1
    assert dev.metrics["tx_malformed_frames"] == 1
    assert dp.wire.seen_by_peer == []
    healthy(dp)


# ---------------------------------------------------------------- the peer and the wire
def test_unsolicited_echo_replies_keep_the_guest_endpoint_bounded() -> None:
    dp = new_dp("l0")
    ep = dp.endpoint
    n = 30_000
    for first in range(0, n, 256):
        frames = [
            udp_frame(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, UDP_ECHO_PORT, 30000 + i % 1000,
                      b"y" * 64, ident=first + i)
            for i in range(min(256, n - first))
        ]  # fmt: skip
        dp.wire.inject(frames)
        dp.pump()
    assert ep.udp_reply_count == n
    assert len(ep.udp_replies) <= 256
    # unsolicited ICMP echo replies, and ARP from 1,000 senders: bounded too
    replies = [
        icmp_echo_frame(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, 7, i, b"z" * 32, reply=True)
        for i in range(1000)
    ]
    arps = [
        arp_frame(1, PEER_MAC, bytes([10, 0, i >> 8, i & 255]), bytes(6), GUEST_IP, BROADCAST)
        for i in range(1000)
    ]
    for batch in (replies[:500], replies[500:], arps[:500], arps[500:]):
        dp.wire.inject(batch)
        dp.pump()
    assert ep.icmp_reply_count == 1000 and len(ep.icmp_replies) <= 256
    assert len(ep.neighbors) <= 256


def _rx_refill_kicks(dp: Datapath) -> int:
    return sum(
        int(row["count"])
        for row in dp.m.stats.reason_rows()
        if row["level"] == "L2" and row["reason"] == ExitReason.IO_INSTRUCTION.name
    )


def test_no_spurious_rx_refill_kick_at_a_16_bit_index_wrap() -> None:
    dp = new_dp("single", queue_size=256)
    dp.received = None  # do not keep 70,000 frames
    dp.m.reset_stats()
    frames = peer_frames(0, 64, size=64, port=UDP_DISCARD_PORT)
    for _ in range(70_000 // 64):  # the RX ring's indices wrap once
        dp.wire.inject(frames)
        dp.pump()
    dev = dp.active_device()
    assert dev is not None and dev.metrics["rx_packets_count"] == 70_000 // 64 * 64
    assert dev.metrics["no_rx_avail_buffer"] == 0
    assert _rx_refill_kicks(dp) == 0  # the guest kept up: the device never asked for a kick
