"""The in-process datapath: same frames on every path, exits per frame, bad guests."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest

from xlio.backends.datapath import Datapath, datapath_options, make_datapath
from xlio.backends.direct import DelegationRefused, QueueState
from xlio.backends.wire import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC
from xlio.frontends.virtio_net import TXQ
from xlio.guestfuzz import l2_host_frames
from xlio.measure import WORKLOADS, _built, make_config, measure
from xlio.packets import UDP_DISCARD_PORT, UDP_ECHO_PORT, udp_frame_of_size
from xlio.sim.nested import NestedVmx
from xlio.sim.workloads import PAGING_WORKLOADS
from xlio.virtio import DESC, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

PATHS = ("single", "l1", "l0")
BACKENDS = ("single", "l1", "l0")


SWITCHES = ("apicv", "virtual_idle")


def per_frame(workload: str, path: str, preset: str = "turtles-2010", **opts) -> dict:
    sw = {k: opts.pop(k) for k in SWITCHES if k in opts}
    return measure(workload, path, preset, count=opts.pop("count", 64), options=opts, **sw)[
        "per_op"
    ]


def new_dp(path: str, **opts) -> Datapath:
    m = NestedVmx(make_config("turtles-2010", path))
    return make_datapath(m, path, datapath_options(opts), capture=True)


def peer_frames(first: int, n: int, size: int = 200, port: int = UDP_ECHO_PORT) -> list[bytes]:
    return [
        udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, port, size + i % 50, first + i)
        for i in range(n)
    ]


def guest_frames(first: int, n: int, size: int = 200) -> list[bytes]:
    return [
        udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, UDP_DISCARD_PORT, size, first + i)
        for i in range(n)
    ]


# ---------------------------------------------------------------- same bytes everywhere
def test_frames_are_byte_identical_on_every_path() -> None:
    seen = {}
    for path in PATHS:
        dp = new_dp(path)
        dp.send(guest_frames(0, 40))
        dp.wire.inject(peer_frames(100, 40))  # echo requests: L2 answers
        dp.wire.inject(peer_frames(200, 10, port=UDP_DISCARD_PORT))
        dp.pump()
        assert dp.wire.seen_by_peer is not None and dp.received is not None
        seen[path] = (list(dp.wire.seen_by_peer), list(dp.received))
        assert len(seen[path][0]) == 80 and len(seen[path][1]) == 50
    assert seen["single"] == seen["l1"] == seen["l0"]
    # and they are the frames that went in: L2's own, then L2's echo answers
    assert seen["l0"][0][:40] == guest_frames(0, 40)
    assert seen["l0"][1][:40] == peer_frames(100, 40)


@pytest.mark.parametrize("path", PATHS)
def test_many_ring_wraps_with_mixed_sizes_keep_every_byte(path: str) -> None:
    dp = new_dp(path, queue_size=64)
    sizes = [60 + (i * 137) % 1454 for i in range(700)]
    sent = [
        udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, UDP_ECHO_PORT, n, i)
        for i, n in enumerate(sizes)
    ]
    for i in range(0, len(sent), 16):
        dp.wire.inject(sent[i : i + 16])
        dp.pump()
    assert dp.received == sent  # every request arrived intact, in order
    answers = dp.wire.seen_by_peer
    assert answers is not None and len(answers) == len(sent)
    for req, ans in zip(sent, answers, strict=True):
        assert ans[42:] == req[42:]  # UDP echo: the payload comes back unchanged


# ---------------------------------------------------------------- exits per frame
@pytest.mark.parametrize("workload", ["tx", "rx", "echo"])
def test_direct_path_steady_state_never_involves_l1(workload: str) -> None:
    # with APICv L0 posts L2's interrupts through L1's descriptor; an idle L2's
    # HLT stays in L0 only with virtual idle
    for batch in (1, 16):
        p = per_frame(workload, "l0", batch=batch, apicv=True, virtual_idle=True)
        assert p["reflected"] == 0 and p["l1_exits"] == 0 and p["l1_be_exits"] == 0
        assert p["l0_exits"] == p["l2_exits"]


@pytest.mark.parametrize("path", ["single", "l0"])
def test_apicv_delivers_rx_interrupts_to_a_running_l2_without_an_exit(path: str) -> None:
    def delivery_exits(apicv: bool) -> tuple[float, float]:
        r = measure("rx", path, "kvm-2019", count=64, apicv=apicv)
        ext = sum(
            row["count"]
            for row in r["by_reason"]
            if row["level"] == "L2" and row["reason"] == "EXTERNAL_INTERRUPT"
        )
        return ext, r["totals"]["irqs_injected_l2"]

    ext, irqs = delivery_exits(True)
    assert irqs == 64 and ext == 0
    ext, irqs = delivery_exits(False)
    assert irqs == 64 and ext == 64  # one kick of the running vCPU per interrupt


def test_without_apicv_or_virtual_idle_the_direct_path_goes_through_l1_for_interrupts() -> None:
    # no posted-interrupt descriptor: L0 must interrupt L1, which injects
    # (a reflected external interrupt) and emulates L2's EOI (a reflected WRMSR)
    rx = per_frame("rx", "l0", apicv=False)
    assert rx["reflected"] == 2 and rx["l1_be_exits"] == 0
    # APICv, no virtual idle: L2's HLT is reflected, L1 halts, the next
    # interrupt wakes L1, which VMRESUMEs L2
    echo = per_frame("echo", "l0", apicv=True)
    assert echo["reflected"] == 1 and echo["wakeups"] == 2  # L0 wakes L1, L1 wakes L2
    assert per_frame("echo", "l0", apicv=True, virtual_idle=True)["reflected"] == 0


def test_l1_path_per_frame_counts() -> None:
    # TX, batch 1: L2's kick (reflected) + 12 trapped VMCS accesses of the
    # io_kick profile + L1's kick of its own NIC + VMRESUME
    tx = per_frame("tx", "l1")
    assert (tx["l2_exits"], tx["reflected"], tx["vmcs_emulated"], tx["l1_be_exits"]) == (
        1,
        1,
        12,
        1,
    )
    assert tx["l0_exits"] == 15
    # RX, batch 1: L1's interrupt forces a reflected exit of L2; L1's handler
    # (external interrupt, then injecting into L2) traps 10 times; VMRESUME;
    # then L2's EOI (no APICv): a WRMSR reflected to L1, 11 traps, VMRESUME
    rx = per_frame("rx", "l1")
    assert (rx["l2_exits"], rx["reflected"], rx["vmcs_emulated"], rx["l0_exits"]) == (2, 2, 21, 25)
    # echo: TX + RX, except that the request finds L2 halted (no forced exit:
    # L0 wakes L1), plus L2's HLT reflected to L1, and L1's own HLT
    echo = per_frame("echo", "l1")
    assert (echo["l2_exits"], echo["reflected"], echo["wakeups"]) == (3, 3, 2)


def test_mmio_kicks() -> None:
    # L0 serves its own (delegated) notify page; L1 must decode the MMIO write:
    # 1 L2 exit + 15 trapped VMCS accesses (exit prologue, GPA, decode) + its NIC kick + VMRESUME
    assert per_frame("tx", "l0", kick="mmio")["l0_exits"] == 1
    assert per_frame("tx", "single", kick="mmio")["l0_exits"] == 1
    l1 = per_frame("tx", "l1", kick="mmio")
    assert (l1["reflected"], l1["vmcs_emulated"], l1["l0_exits"]) == (1, 15, 18)
    assert per_frame("tx", "l1", kick="mmio")["cycles"] > per_frame("tx", "l1")["cycles"]
    dp = new_dp("l0", kick="mmio")
    dp.send(guest_frames(0, 4))
    assert dp.wire.seen_by_peer == guest_frames(0, 4)


@pytest.mark.parametrize("path", ["l1", "l0"])
@pytest.mark.parametrize("workload", ["tx", "rx", "echo"])
def test_batching_lowers_exits_per_frame(path: str, workload: str) -> None:
    e = [per_frame(workload, path, batch=b, count=128)["l0_exits"] for b in (1, 4, 32)]
    assert e[0] > e[1] > e[2]


@pytest.mark.parametrize("path", PATHS)
def test_flag_mode_without_event_idx_moves_the_same_frames(path: str) -> None:
    dp = new_dp(path, event_idx=False)
    assert not dp.driver.event_idx
    dp.wire.inject(peer_frames(0, 30))
    dp.pump()
    assert dp.received == peer_frames(0, 30)
    assert dp.wire.seen_by_peer is not None and len(dp.wire.seen_by_peer) == 30  # the answers


def test_burst_larger_than_the_ring_is_counted_not_lost() -> None:
    for path in PATHS:
        dp = new_dp(path, queue_size=16)
        dp.wire.inject(peer_frames(0, 100, port=UDP_DISCARD_PORT))
        dp.pump()
        assert dp.received is not None and len(dp.received) == 100  # refills drain the rest
        dev = dp.active_device()
        assert dev is not None and dev.metrics["rx_packets_count"] == 100


# ---------------------------------------------------------------- delegation
def test_revocation_sends_the_next_kick_to_l1_and_loses_nothing() -> None:
    dp = new_dp("l0")
    dp.send(guest_frames(0, 5))
    m = dp.m
    before = m.stats.reflected
    # L2 publishes frames that L0 has not served yet (no kick), then L1 revokes
    tx = dp.driver.tx
    assert tx is not None
    for f in guest_frames(5, 3):
        _, gpa = tx.add(dp.driver.tx_bufs, dp.driver.buf_size, 12 + len(f), write=False)
        dp.l2_view.write(gpa, bytes(12) + f)
    tx.publish()
    dp.l1_revoke()
    assert not dp.direct.active and dp.l1_dev is not None
    dp.send(guest_frames(8, 2))  # the next kick is reflected to L1
    assert m.stats.reflected == before + 1
    dp.wire.inject(peer_frames(50, 4, port=UDP_DISCARD_PORT))
    dp.pump()
    assert dp.wire.seen_by_peer == guest_frames(0, 10)  # in order, none lost or doubled
    assert dp.received is not None and dp.received[-4:] == peer_frames(50, 4, port=UDP_DISCARD_PORT)
    # and delegating again brings the kicks back to L0
    dp.l1_delegate()
    r = m.stats.reflected
    dp.send(guest_frames(10, 3))
    assert m.stats.reflected == r and dp.wire.seen_by_peer[10:] == guest_frames(10, 3)


def test_delegation_is_validated() -> None:
    dp = new_dp("l0")
    d = dp.direct.delegation
    assert d is not None
    good = d.rx
    dp.l1_revoke()
    bad = [
        QueueState(100, good.desc, good.avail, good.used, 0, 0, 0),  # not a power of two
        QueueState(good.size, good.desc + 4, good.avail, good.used, 0, 0, 0),  # misaligned
        QueueState(good.size, 1 << 40, good.avail, good.used, 0, 0, 0),  # outside L2
    ]
    from dataclasses import replace

    for q in bad:
        with pytest.raises(DelegationRefused):
            dp.direct.delegate(replace(d, rx=q))
    with pytest.raises(DelegationRefused):
        dp.direct.delegate(replace(d, features=d.features | (1 << 22)))  # MQ: not served
    assert dp.direct.refusals == 4 and not dp.direct.active


# ---------------------------------------------------------------- hostile L2
class Hostile:
    """L2 writing whatever it likes into its own TX/RX rings, then kicking."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.mem = dp.l2_view

    def tx_chain(self, descs: list[tuple[int, int, int, int]], head: int | None = None) -> None:
        tx = self.dp.driver.tx
        assert tx is not None
        ids = [tx.free.pop() for _ in descs]
        for i, (addr, n, flags, nxt) in zip(ids, descs, strict=True):
            # nxt: -1 none, k >= 0 the k-th descriptor of this chain, <= -2 raw index -nxt
            raw = ids[nxt] if nxt >= 0 else (-nxt if nxt <= -2 else 0)
            self.mem.write(tx.desc + 16 * i, DESC.pack(addr, n, flags, raw))
        self.mem.write_u16(
            tx.avail + 4 + 2 * (tx.avail_idx % tx.size), ids[0] if head is None else head
        )
        tx.avail_idx = (tx.avail_idx + 1) & 0xFFFF
        tx.publish()
        self.dp.kick(TXQ)

    def buf(self) -> int:
        return self.dp.driver.tx_bufs  # a legitimate buffer address in L2 memory


def l2_frames(dp: Datapath) -> set[int]:
    """The host frames backing L2's memory right now."""
    return l2_host_frames(dp)


def audit(dp: Datapath) -> set[int]:
    """Record every host frame the device serving L2 touches from now on."""
    dev = dp.active_device()
    assert dev is not None
    dev.mem.touched = set()
    return dev.mem.touched


BAD_TX = {
    "next descriptor index out of range": lambda h: [(h.buf(), 64, VIRTQ_DESC_F_NEXT, -9999)],
    "descriptor loop or chain longer than the queue": lambda h: [
        (h.buf(), 64, VIRTQ_DESC_F_NEXT, 1), (h.buf(), 64, VIRTQ_DESC_F_NEXT, 0)],
    "zero-length buffer": lambda h: [(h.buf(), 0, 0, -1)],
    "device-writable descriptor on TX": lambda h: [(h.buf(), 100, VIRTQ_DESC_F_WRITE, -1)],
    "buffer outside guest memory": lambda h: [(1 << 40, 100, 0, -1)],
    "buffer not mapped in guest memory": lambda h: [(h.dp.unmapped, 100, 0, -1)],
    "frame length out of bounds": lambda h: [(h.buf(), 20, 0, -1)],
    "frame longer than 65,562 bytes": lambda h: [
        (h.buf(), 2048, VIRTQ_DESC_F_NEXT, i + 1) for i in range(32)] + [(h.buf(), 2048, 0, -1)],
}  # fmt: skip


def _with_hole(path: str) -> Datapath:
    dp = new_dp(path)
    page = dp.mmu.l2_pages - 1  # the last L2 page: no ring or buffer lives there
    dp.mmu.evict(page)  # L1 unmaps it from EPT12
    dp.unmapped = page << 12  # type: ignore[attr-defined]
    return dp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_TX))
def test_bad_tx_chains_are_dropped_counted_contained(backend: str, case: str) -> None:
    dp = _with_hole(backend)
    touched = audit(dp)
    h = Hostile(dp)
    h.tx_chain(BAD_TX[case](h))
    dev = dp.active_device()
    assert dev is not None and not dev.needs_reset
    key = "frame length out of bounds" if case.startswith("frame longer") else case
    if backend == "l1" and key == "buffer not mapped in guest memory":
        # L1's vhost faults on the page and L1 swaps it back in (L0 cannot)
        assert dp.unmapped >> 12 not in dp.mmu.swapped  # type: ignore[attr-defined]
        assert dev.errors[key] == 0
    elif key == "frame length out of bounds":
        assert dev.errors[key] >= 1, dict(dev.errors)
        assert dev.metrics["tx_malformed_frames"] >= 1
    else:
        assert dev.errors[key] >= 1, dict(dev.errors)
        assert dev.metrics["tx_fails"] >= 1
    # the bad chain came back to the driver, and good traffic still flows
    dp.send(guest_frames(0, 3))
    assert dp.wire.seen_by_peer == guest_frames(0, 3)
    assert touched and touched <= l2_frames(dp)  # never a byte outside L2's memory


@pytest.mark.parametrize("backend", BACKENDS)
def test_available_index_jump_needs_reset_then_recovers(backend: str) -> None:
    dp = new_dp(backend)
    tx = dp.driver.tx
    assert tx is not None
    dp.l2_view.write_u16(tx.avail + 2, (tx.avail_idx + 1000) & 0xFFFF)
    dp.kick(TXQ)
    dev = dp.active_device()
    assert dev is not None and dev.needs_reset
    assert dev.errors["available index moved by more than the queue size"] == 1
    dp.send(guest_frames(0, 1))  # the config interrupt makes the driver reset the device
    assert dp.driver.resets == 1 and dp.resets_signalled >= 1
    dp.send(guest_frames(1, 2))
    assert dp.wire.seen_by_peer is not None and dp.wire.seen_by_peer[-2:] == guest_frames(1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_index_out_of_range_needs_reset(backend: str) -> None:
    dp = new_dp(backend)
    Hostile(dp).tx_chain([(dp.driver.tx_bufs, 100, 0, -1)], head=5000)
    dev = dp.active_device()
    assert dev is not None and dev.needs_reset
    assert dev.errors["head descriptor index out of range"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_rx_chains_are_dropped_and_counted(backend: str) -> None:
    dp = _with_hole(backend)
    rx = dp.driver.rx
    assert rx is not None
    dev = dp.active_device()
    assert dev is not None
    touched = audit(dp)
    nxt = dev.rxq.last_avail
    head = dp.l2_view.read_u16(rx.avail + 4 + 2 * (nxt % rx.size))
    head2 = dp.l2_view.read_u16(rx.avail + 4 + 2 * ((nxt + 1) % rx.size))
    # the next RX buffer is readable (device may not write it), the one after
    # points at a page EPT12 no longer maps
    addr, n, _, _ = DESC.unpack(dp.l2_view.read(rx.desc + 16 * head, 16))
    dp.l2_view.write(rx.desc + 16 * head, DESC.pack(addr, n, 0, 0))
    dp.l2_view.write(rx.desc + 16 * head2, DESC.pack(dp.unmapped, n, VIRTQ_DESC_F_WRITE, 0))  # type: ignore[attr-defined]
    dp.wire.inject(peer_frames(0, 4, port=UDP_DISCARD_PORT))
    dp.pump()
    assert dev.errors["readable descriptor on RX"] == 1
    # L1's vhost swaps the page back in; L0 cannot, and drops the frame
    lost = 1 if backend == "l1" else 2
    assert dev.metrics["rx_fails"] == lost
    assert dev.errors["buffer not mapped in guest memory"] == lost - 1
    assert dp.received is not None and len(dp.received) == 4 - lost  # the others arrived
    assert touched and touched <= l2_frames(dp)


@pytest.mark.parametrize("path", ["single", "l1", "l0"])
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_a_dead_machine_is_freed_by_reference_counting(workload: str, path: str) -> None:
    """No reference cycle holds a machine, its memory or its datapath: the
    moment the last reference goes, it is gone (a sweep keeps no dead
    machines waiting for the cyclic collector)."""
    gc.collect()
    gc.disable()
    try:
        small: dict[str, Any] = {
            "working_set_mib": 4, "seconds": 0.05, "l2_mem_gib": 1, "l1_mem_gib": 2,
        }  # fmt: skip
        opts = small if workload in ("ept-touch", "ept-churn") else {}
        if workload in PAGING_WORKLOADS:  # with EPT they cost nothing: run them under a shadow MMU
            opts = {"l2_mmu": "shadow-on-ept"}
        m, w, _, op = _built(workload, path, "kvm-2019", opts, 20, {})
        getattr(op, "warmup", op)()
        op()
        assert m.stats.cycles > 0  # it did run
        parts = [weakref.ref(m)]
        if m.memory is not None:
            parts += [weakref.ref(p) for p in m.memory]
        if m.datapath is not None:
            parts.append(weakref.ref(m.datapath))
        del m, w, op
        assert [p() for p in parts] == [None] * len(parts)
    finally:
        gc.enable()


def test_a_part_that_outlives_its_datapath_fails_loudly() -> None:
    """A part calls back into its owner weakly; once the owner is gone the
    call is a ReferenceError, never a silent no-op."""
    dp = make_datapath(NestedVmx(make_config("kvm-2019", "l0")), "l0", datapath_options({}))
    driver = dp.driver
    driver.send([udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, 9, 64, 0)])
    del dp
    with pytest.raises(ReferenceError, match="Datapath.kick: its object is gone"):
        driver.send([udp_frame_of_size(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, 9, 64, 1)])
