"""Property tests of ring work in runs against one entry at a time.

From ``RUN_MIN`` entries a batch is read and written as runs (one ``struct``
call for a run of ring entries or of consecutive descriptors) and a batch's
simple TX frames are checked together. Each test runs the same guest input
twice, with runs for every batch (``RUN_MIN`` 1) and for none, and requires
the same outcome: chains taken, frames sent or placed, counters, errors,
ring bytes, free lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_rings import BUFS, descriptor, guest, layout, outcome

from xlio import virtio
from xlio.backends import device, virtqueue
from xlio.backends.device import NetDevice, with_rx_header
from xlio.backends.virtqueue import DeviceQueue
from xlio.frontends import virtio_net
from xlio.frontends.virtio_net import DriverQueue
from xlio.virtio import NET_HDR_SIZE, U16, USED_ELEM, id_runs

MAC = bytes.fromhex("020000000002")
OTHER_MAC = bytes.fromhex("020000000009")


@contextmanager
def run_min(value: int) -> Iterator[None]:
    kept = virtio.RUN_MIN
    for mod in (virtio, virtqueue, device, virtio_net):
        mod.RUN_MIN = value  # type: ignore[attr-defined,union-attr]
    try:
        yield
    finally:
        for mod in (virtio, virtqueue, device, virtio_net):
            mod.RUN_MIN = kept  # type: ignore[attr-defined,union-attr]


def both(scenario: Callable[[], Any]) -> None:
    """``scenario`` with runs for every batch and for none: the same result."""
    with run_min(1):
        runs = scenario()
    with run_min(1 << 30):
        one_by_one = scenario()
    assert runs == one_by_one


@st.composite
def run_ids(draw: st.DrawFn, size: int) -> list[int]:
    """Ids as a driver posts them: runs up and down, and stray ones."""
    out: list[int] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["up", "down", "stray"]))
        first = draw(st.integers(0, size - 1))
        k = draw(st.integers(1, 40))
        if kind == "up":
            out += [(first + j) % (size + 1) for j in range(k)]  # may run past the size
        elif kind == "down":
            out += [max(first - j, 0) for j in range(k)]
        else:
            out += draw(st.lists(st.integers(0, size), min_size=1, max_size=k))
    return out


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 40), min_size=1, max_size=60))
def test_id_runs_cut_ids_into_maximal_consecutive_runs(ids: list[int]) -> None:
    runs = id_runs(ids)
    rebuilt: list[int] = []
    for at, k, step in runs:
        assert at == len(rebuilt) and k >= 1 and step in (1, -1)
        part = ids[at : at + k]
        assert part == [ids[at] + step * j for j in range(k)]
        end = at + k
        if end < len(ids):  # the run cannot go on
            last_step = ids[end] - ids[end - 1]
            assert last_step != step if k > 1 else last_step not in (1, -1)
        rebuilt += part
    assert rebuilt == ids


@settings(max_examples=150, deadline=None)
@given(
    size=st.sampled_from([64, 256]),
    descs=st.lists(descriptor, min_size=8, max_size=64),
    data=st.data(),
    last=st.integers(0, 0xFFFF),
    pending=st.integers(0, 300),
    limit=st.integers(1, 80),
    write=st.booleans(),
)
def test_pop_batch_in_runs_takes_what_one_head_at_a_time_takes(
    size: int,
    descs: list,
    data: st.DataObject,
    last: int,
    pending: int,
    limit: int,
    write: bool,
) -> None:
    descs = (descs * (size // len(descs) + 1))[:size]
    simple = virtio.VIRTQ_DESC_F_WRITE if write else 0
    # simple descriptors but for a few, so that runs are taken whole
    odd = set(data.draw(st.lists(st.integers(0, size - 1), max_size=3)))
    for i in range(size):
        if i not in odd:
            descs[i] = (BUFS + 2048 * (i % 64), 100 + i, simple, 0)
    ids = data.draw(run_ids(size))
    # the ring's entries from its slot 0; the device resumes at ``last``, so
    # a batch can wrap past the ring's end
    heads = (ids * (size // len(ids) + 1))[:size]
    idx = (last + pending) & 0xFFFF

    def scenario() -> tuple:
        mem = guest()
        d, a, u = layout(mem, size, descs, heads, idx, 0x1000)
        q = DeviceQueue(mem, size, d, a, u, True, last_avail=last)
        hs, addrs, lens, rest, broken = q.pop_batch(limit, write)
        return (hs, list(addrs), list(lens), [outcome(c) for c in rest],
                str(broken) if broken else None, q.last_avail, q.popped,
                q.broken, dict(q.errors))  # fmt: skip

    both(scenario)


# one step of a driver and a device: post k buffers, or the device returns
# some (in flight or not, once or twice), then the driver reclaims
step = st.one_of(
    st.tuples(st.just("post"), st.integers(1, 40)),
    st.tuples(st.just("return"), st.lists(st.integers(0, 70), max_size=40)),
)


@settings(max_examples=150, deadline=None)
@given(
    size=st.sampled_from([32, 64]), steps=st.lists(step, max_size=12), start=st.integers(0, 0xFFFF)
)
def test_driver_runs_post_and_reclaim_as_one_at_a_time(size: int, steps: list, start: int) -> None:
    def scenario() -> tuple:
        mem = guest()
        q = DriverQueue(mem, size, 0x2000, True)
        q.avail_idx = q.published = q.last_used = start
        mem.pack_into(U16, q.used + 2, start)  # the device's used index, where the driver's is
        used_idx = start
        seen = []
        for kind, arg in steps:
            if kind == "post":
                k = min(arg, len(q.free))
                seen.append(q.add_many(BUFS, 2048, [60 + j for j in range(k)], write=bool(k % 2)))
                q.publish()
                continue
            for i in arg:  # the device writes used elements, bad ones included
                mem.pack_into(USED_ELEM, q.used + 4 + 8 * (used_idx % size), i, 77)
                used_idx = (used_idx + 1) & 0xFFFF
            mem.pack_into(U16, q.used + 2, used_idx)
            seen.append(q.take_used())
        rings = mem.read(0x2000, q.end - 0x2000)
        return seen, rings, list(q.free), sorted(q.in_flight), q.avail_idx, q.last_used

    both(scenario)


frame_kind = st.sampled_from(["good", "good", "good", "offload", "spoofed", "short", "long"])


def _frame(kind: str, i: int) -> bytes:
    hdr = bytearray(NET_HDR_SIZE)
    if kind == "offload":
        hdr[0] = 1  # NEEDS_CSUM, never negotiated
    src = OTHER_MAC if kind == "spoofed" else MAC
    body = bytes(6) + src + b"\x08\x00" + bytes([i & 255]) * 50
    if kind == "short":
        body = body[:10]
    return bytes(hdr) + body + (bytes(3000) if kind == "long" else b"")


@settings(max_examples=150, deadline=None)
@given(kinds=st.lists(frame_kind, min_size=1, max_size=60), check_mac=st.booleans())
def test_device_tx_batch_checks_count_what_frame_by_frame_counts(
    kinds: list[str], check_mac: bool
) -> None:
    def scenario() -> tuple:
        mem = guest()
        size = 64
        drv = DriverQueue(mem, size, 0x2000, True)
        rxq = DeviceQueue(mem, 8, 0x9000, 0x9080, 0x9100, True)
        txq = DeviceQueue(mem, size, drv.desc, drv.avail, drv.used, True)
        dev = NetDevice(mem, rxq, txq, "tx", mac=MAC if check_mac else None)
        frames = [_frame(k, i) for i, k in enumerate(kinds)]
        # a "long" frame (over the 2,048-byte buffer) is posted as two buffers
        for f in frames:
            if len(f) <= 2048:
                (gpa,) = drv.add_many(BUFS, 4096, [len(f)], write=False)
                mem.write(gpa, f)
            else:
                gpas = drv.add_chain(BUFS, 4096, [2048, len(f) - 2048])
                mem.write(gpas[0], f[:2048])
                mem.write(gpas[1], f[2048:])
        drv.publish()
        out, irq = dev.tx()
        ids, lens = drv.take_used()
        # the used entries as a set: a device may return a batch's chains in
        # any order (virtio 2.7.8), and a batch accepted whole goes first
        returned = sorted(zip(ids, lens, strict=True))
        return out, irq, dict(dev.metrics), dict(dev.errors), returned, txq.used_idx

    both(scenario)


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(14, 3000), min_size=1, max_size=60),
    bufs=st.lists(st.sampled_from([2048, 2048, 2048, 64]), min_size=1, max_size=60),
)
def test_device_rx_batches_place_what_frame_by_frame_places(
    sizes: list[int], bufs: list[int]
) -> None:
    def scenario() -> tuple:
        mem = guest()
        size = 64
        drv = DriverQueue(mem, size, 0x2000, True)
        rxq = DeviceQueue(mem, size, drv.desc, drv.avail, drv.used, True)
        txq = DeviceQueue(mem, 8, 0x9000, 0x9080, 0x9100, True)
        dev = NetDevice(mem, rxq, txq, "rx")
        for b in bufs[:size]:
            drv.add_many(BUFS, 4096, [b], write=True)
        drv.publish()
        frames = [with_rx_header(bytes([n & 255]) * n) for n in sizes]
        consumed, irq = dev.rx(frames)
        ids, lens = drv.take_used()
        placed = [mem.read(BUFS + 4096 * i, n) for i, n in zip(ids, lens, strict=True)]
        return consumed, irq, dict(dev.metrics), dict(dev.errors), ids, lens, placed

    both(scenario)


def test_a_batch_of_64_is_read_as_runs_by_default(monkeypatch: Any) -> None:
    """The equivalence above is worth something only if the default
    ``RUN_MIN`` sends a bench-sized batch through the runs: 64 buffers a
    driver posts are read as one run of descriptors."""
    mem = guest()
    drv = DriverQueue(mem, 256, 0x2000, True)
    q = DeviceQueue(mem, 256, drv.desc, drv.avail, drv.used, True)
    drv.add_many(BUFS, 2048, [100] * 64, write=False)
    drv.publish()
    seen: list[int] = []
    real = DeviceQueue._descriptors

    def spy(page: bytearray, off: int, hs: tuple[int, ...]) -> Any:
        seen.append(len(id_runs(hs)))
        return real(page, off, hs)

    monkeypatch.setattr(DeviceQueue, "_descriptors", staticmethod(spy))
    heads, _, _, rest, broken = q.pop_batch(256, write=False)
    assert len(heads) == 64 and not rest and broken is None
    assert seen == [1]  # one call, one run
