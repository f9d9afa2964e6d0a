"""Isolation of the direct path: L0 reads and writes L2's memory on L1's behalf.

L0 may touch only what EPT12 maps for L2, must drop a translation the
moment L1's change to EPT12 becomes visible (also halfway through a buffer),
must stop serving at REVOKE, and must refuse rings it cannot safely serve.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_datapath import audit, guest_frames, l2_frames, new_dp

from xlio.backends.direct import DelegationRefused
from xlio.frontends.virtio_net import TXQ
from xlio.sim.memory import PAGE_SHIFT, PAGE_SIZE
from xlio.virtio import DESC


def _host_frame(dp, l2_page: int) -> int:  # type: ignore[no-untyped-def]
    l1 = dp.mmu.l1_page_of(l2_page)
    assert l1 is not None
    return int(dp.vept.resolve_l1_frame(l1))


def _post_tx(dp, gpa: int, data: bytes, *, fill: bool = True) -> None:  # type: ignore[no-untyped-def]
    """L2 posts one descriptor at ``gpa`` (it may cross a page) and publishes;
    ``fill=False``: without writing the buffer (L0 alone touches it)."""
    tx = dp.driver.tx
    i = tx.free.pop()
    tx.in_flight.add(i)
    if fill:
        dp.l2_view.write(gpa, data)
    dp.l2_view.write(tx.desc + 16 * i, DESC.pack(gpa, len(data), 0, 0))
    dp.l2_view.write_u16(tx.avail + 4 + 2 * (tx.avail_idx % tx.size), i)
    tx.avail_idx = (tx.avail_idx + 1) & 0xFFFF
    tx.publish()


def test_l1_remapping_a_page_in_the_middle_of_l0s_copy_is_seen_at_once() -> None:
    """L1 compacts the second page of a buffer while L0 is copying its first:
    L0 reads the second part from the new frame, never from the old one."""
    dp = new_dp("l0")
    frame = guest_frames(0, 1, size=300)[0]
    data = bytes(12) + frame
    b_page = (dp.driver.tx_bufs >> PAGE_SHIFT) + 40  # a page of L2 memory no ring uses
    a_page = b_page - 1
    gpa = (b_page << PAGE_SHIFT) - 150  # 150 bytes in page A, the rest in page B
    # warm L0's translation cache for both pages with a first frame there
    _post_tx(dp, gpa, data)
    dp.kick(TXQ)
    assert dp.wire.seen_by_peer == [frame]
    old_b = _host_frame(dp, b_page)
    _post_tx(dp, gpa, data)
    view = dp.l0_view_of_l2
    unhooked = view._page
    state: dict[str, int] = {}

    def page_then_compact(addr: int):  # type: ignore[no-untyped-def]
        got = unhooked(addr)
        if addr >> PAGE_SHIFT == a_page and "new" not in state:
            dp.mmu.remap_page(b_page)  # L1 on another vCPU: new page, INVEPT
            new = state["new"] = _host_frame(dp, b_page)
            # what compaction copied, marked so the test can tell old from new
            dp.vept.host.page(new)[:PAGE_SIZE] = b"N" * PAGE_SIZE
            assert view.touched is not None
            view.touched.clear()
        return got

    view._page = page_then_compact  # type: ignore[method-assign]
    touched = audit(dp)
    dp.kick(TXQ)
    assert "new" in state and state["new"] != old_b
    assert old_b not in touched and state["new"] in touched
    sent = dp.wire.seen_by_peer[-1]
    assert sent[: 150 - 12] == frame[: 150 - 12]  # page A: the frame
    assert set(sent[150 - 12 :]) == {ord("N")}  # page B: the new frame's bytes


@pytest.mark.parametrize("change", ["evict", "remap"])
def test_after_an_ept12_change_l0_never_uses_the_old_translation(change: str) -> None:
    dp = new_dp("l0")
    page = (dp.driver.tx_bufs >> PAGE_SHIFT) + 3
    gpa = page << PAGE_SHIFT
    data = bytes(12) + guest_frames(0, 1)[0]
    _post_tx(dp, gpa, data)
    dp.kick(TXQ)  # L0 has translated and cached the page
    old = _host_frame(dp, page)
    getattr(dp.mmu, "evict" if change == "evict" else "remap_page")(page)
    touched = audit(dp)
    _post_tx(dp, gpa, data, fill=False)  # L2 reposts without touching the page
    dp.kick(TXQ)
    dev = dp.active_device()
    assert dev is not None
    assert old not in touched
    if change == "evict":  # not mapped any more: dropped and counted, nothing read
        assert dev.errors["buffer not mapped in guest memory"] == 1
    else:
        assert _host_frame(dp, page) in touched
    assert touched <= l2_frames(dp)


def test_after_revoke_l0_does_not_serve_the_next_kick() -> None:
    dp = new_dp("l0")
    direct = dp.direct.device
    assert direct is not None
    dp.send(guest_frames(0, 2))
    served = direct.metrics["tx_packets_count"]
    assert dp.l1_revoke()
    reflected = dp.m.stats.reflected
    dp.send(guest_frames(2, 2))
    assert direct.metrics["tx_packets_count"] == served  # L0's device did nothing
    assert dp.m.stats.reflected == reflected + 1  # the kick went to L1
    assert dp.l1_dev is not None and dp.l1_dev.metrics["tx_packets_count"] == 2


@pytest.mark.parametrize("where", ["outside L2 memory", "not mapped by EPT12"])
def test_a_delegation_of_rings_l0_cannot_safely_serve_is_refused(where: str) -> None:
    dp = new_dp("l0")
    d = dp.direct.delegation
    assert d is not None
    assert dp.l1_revoke()
    if where == "outside L2 memory":
        bad = replace(d, tx=replace(d.tx, used=dp.l2_view.size - 64))
    else:
        dp.mmu.evict(d.tx.used >> PAGE_SHIFT)  # L1 took the page away from L2
        bad = d
    with pytest.raises(DelegationRefused, match=where.split()[0]):
        dp.direct.delegate(bad)
    assert not dp.direct.active and dp.l1_dev is not None  # L1 keeps serving
    dp.send(guest_frames(0, 2))
    assert dp.wire.seen_by_peer is not None and dp.wire.seen_by_peer[-2:] == guest_frames(0, 2)
