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
from xlio.sim.memory import Epoch, GuestMemory, HostMemory
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
            q.push_many(entries)
        else:
            for e in entries:
                q.push(*e)
        rings.append((mem.read(0x9000, 4 + 8 * size), q.used_idx))
    assert rings[0] == rings[1]
