"""Property tests of the device's batched ring reads against its one-at-a-time reads.

``DeviceQueue.pop_many`` (rings resolved once per batch, read in place) must
take exactly the chains, errors and breakage that repeated ``pop`` takes, for
any ring contents a guest can write, and ``push_many`` must write the used
ring exactly as repeated ``push`` does; with rings inside one page (the fast
path) and across pages (the general path).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from xlio.backends.virtqueue import Chain, ChainError, DeviceQueue, QueueBroken
from xlio.sim.memory import Epoch, GuestMemory, HostMemory, MemoryFault
from xlio.virtio import DESC, U16, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

MEM = 1 << 20
BUFS = 0x40000


def guest() -> GuestMemory:
    host = HostMemory(MEM)
    return GuestMemory(host, MEM, lambda gpa: gpa, "L2", (Epoch(),))


descriptor = st.tuples(
    st.one_of(st.integers(BUFS, MEM - 4096), st.integers(0, 1 << 40)),  # addr
    st.one_of(st.integers(1, 2048), st.just(0)),  # len
    st.sampled_from(
        [0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | 2, VIRTQ_DESC_F_INDIRECT]
    ),  # flags  # fmt: skip
    st.integers(0, 600),  # next
)


def layout(mem: GuestMemory, size: int, descs: list, heads: list, idx: int, base: int) -> tuple:
    desc, avail = base, base + 16 * size
    used = (avail + 6 + 2 * size + 3) & ~3
    for i, d in enumerate(descs[:size]):
        mem.pack_into(DESC, desc + 16 * i, *d)
    for j, h in enumerate(heads[:size]):
        mem.pack_into(U16, avail + 4 + 2 * j, h)
    mem.pack_into(U16, avail + 2, idx)
    return desc, avail, used


def outcome(item: Chain | ChainError) -> tuple:
    if isinstance(item, ChainError):
        return ("error", item.reason, item.head)
    return ("chain", *item)


@settings(max_examples=150, deadline=None)
@given(
    size=st.sampled_from([8, 64, 256, 1024]),
    descs=st.lists(descriptor, min_size=8, max_size=64),
    heads=st.lists(st.integers(0, 1100), min_size=1, max_size=64),
    idx=st.integers(0, 0xFFFF),
    limit=st.integers(1, 80),
    odd=st.booleans(),
)
def test_pop_many_takes_what_pop_takes(size, descs, heads, idx, limit, odd) -> None:
    base = 0x1000 + (8 if odd else 0)  # odd: the rings straddle pages (the general path)
    descs = (descs * (size // len(descs) + 1))[:size]
    heads = (heads * (size // len(heads) + 1))[:size]
    results = []
    for batched in (False, True):
        mem = guest()
        d, a, u = layout(mem, size, descs, heads, idx, base)
        q = DeviceQueue(mem, size, d, a, u, True)
        got: list[tuple] = []
        broken = None
        if batched:
            items, exc = q.pop_many(limit)
            got = [outcome(i) for i in items]
            broken = str(exc) if exc else None
        else:
            while len(got) < limit:
                try:
                    chain = q.pop()
                except ChainError as e:
                    got.append(outcome(e))
                    continue
                except QueueBroken as e:
                    broken = str(e)
                    break
                if chain is None:
                    break
                got.append(outcome(chain))
        results.append((got, broken, q.last_avail, q.popped, q.broken, dict(q.errors)))
    assert results[0] == results[1]


@settings(max_examples=60, deadline=None)
@given(
    size=st.sampled_from([8, 256, 1024]),
    entries=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 1 << 31)), max_size=40),
    start=st.integers(0, 0xFFFF),
)
def test_push_many_writes_what_push_writes(size, entries, start) -> None:
    rings = []
    for batched in (False, True):
        mem = guest()
        q = DeviceQueue(mem, size, 0x1000, 0x1000 + 16 * size, 0x9000, True, used_idx=start)
        if batched:
            q.push_many([h for h, _ in entries], [n for _, n in entries])
        else:
            for e in entries:
                q.push(*e)
        rings.append((mem.read(0x9000, 4 + 8 * size), q.used_idx))
    assert rings[0] == rings[1]


span = st.tuples(
    st.one_of(st.integers(0, MEM), st.integers(-5000, 1 << 40)), st.integers(0, 9000)
)  # (gpa, n): in range, across pages, past the end, negative


@settings(max_examples=150, deadline=None)
@given(spans=st.lists(span, max_size=24), fill=st.integers(0, 255))
def test_read_many_and_write_many_do_what_read_and_write_do(spans, fill) -> None:
    """The batch accessors return, write and count faults exactly as one
    access at a time does: a fault is that entry's (None, or its index in
    the failed list), never the batch's, and nothing outside memory is touched."""
    one, batch = guest(), guest()
    datas = [bytes([(fill + i) & 255]) * n for i, (_, n) in enumerate(spans)]
    failed = []
    for i, ((gpa, _), data) in enumerate(zip(spans, datas, strict=True)):
        try:
            one.write(gpa, data)
        except MemoryFault:
            failed.append(i)
    assert batch.write_many([g for g, _ in spans], datas) == failed
    assert batch.faults == one.faults
    expected = []
    for gpa, n in spans:
        try:
            expected.append(one.read(gpa, n))
        except MemoryFault:
            expected.append(None)
    assert batch.read_many([g for g, _ in spans], [n for _, n in spans]) == expected
    assert batch.faults == one.faults


def test_ring_pages_follow_a_mapping_change() -> None:
    """A queue keeps its rings' host pages between batches; when a mapping
    under them changes (the view's epoch moves, as when L1 swaps the page
    out and back in elsewhere) it must read the ring where it is now."""
    host = HostMemory(MEM)
    where: dict[int, int] = {}  # guest page -> host page, changeable

    def translate(gpa: int) -> int:
        return (where.get(gpa >> 12, gpa >> 12) << 12) | (gpa & 4095)

    epoch = Epoch()
    mem = GuestMemory(host, MEM, translate, "L2", (epoch,))
    size, base = 8, 0x10000  # the table in one page, the rings in the next
    descs = [(BUFS + 4096 * i, 100, 0, 0) for i in range(size)]
    desc, avail, used = layout(mem, size, descs, list(range(size)), 2, base)
    q = DeviceQueue(mem, size, desc, avail, used, event_idx=False)
    chains, broken = q.pop_many(8)
    assert broken is None and [c[0] for c in chains] == [0, 1]
    # L1 moves the available ring's page: a copy elsewhere, then the entries change there
    page = avail >> 12
    new = 0x80
    host.write(new, 0, host.read(page, 0, 4096))
    where[page] = new
    epoch.move()
    mem.pack_into(U16, avail + 4 + 2 * 2, 5)
    mem.pack_into(U16, avail + 2, 3)
    host.write(page, 0, bytes(4096))  # the old frame no longer holds the ring
    chains, broken = q.pop_many(8)
    assert broken is None and [c[0] for c in chains] == [5]
