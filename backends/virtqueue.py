"""The device side of one split virtqueue, over one level's view of L2 memory.

Theory of operation
-------------------
A :class:`DeviceQueue` remembers ``last_avail`` (the next available entry it
will consume) and ``used_idx`` (the next used slot it will fill). :meth:`pop`
reads the driver's available index, takes one head, and walks its descriptor
chain; :meth:`push` writes a used element; :meth:`publish` makes the used index
visible and says whether the driver asked to be interrupted (``used_event``
with VIRTIO_F_EVENT_IDX, the NO_INTERRUPT flag without). :meth:`set_notify`
tells the driver whether the device wants kicks (``avail_event``, or the
NO_NOTIFY flag).

Batches. :meth:`pop_batch` takes up to a batch of chains at once and hands
the simple ones (one descriptor of the device's direction, as every RX
buffer and every small TX frame is) as parallel lists of heads, addresses
and lengths; :meth:`push_many` returns a batch's heads. From
:data:`~xlio.virtio.RUN_MIN` entries, ring entries are read and written as
runs (one ``struct`` call each), and so are the descriptors of consecutive
ids, which a driver that keeps its free ids as a stack (Linux's
``free_head``) posts. The checks are the ones :meth:`pop` makes: a run is
taken as a whole only when every entry in it passes them, else entry by
entry from the same slot.

A guest's bad input never escapes as an exception and never reaches memory
outside L2's own (every access goes through ``GuestMemory``):

* a chain that is malformed (descriptor index out of range in ``next``, a
  loop or a chain longer than the queue, a zero-length buffer, an indirect
  descriptor when VIRTIO_F_INDIRECT_DESC was not negotiated, or a bad or
  nested indirect table when it was, a readable descriptor after a writable
  one, an address outside L2's memory or not mapped by EPT12) is dropped:
  :meth:`pop` raises :class:`ChainError` with the head, the device returns the
  head to the used ring with length 0 and counts it (Firecracker's behaviour);
* a broken ring (an available index that moved by more than the queue size,
  a head index out of range, a descriptor table that cannot be read) makes
  the queue ``broken``: the device sets DEVICE_NEEDS_RESET and stops using it
  (QEMU's ``virtio_error``; vhost's "Guest says index %u > %u is available",
  "Desc index is %u > %u").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from operator import add

from xlio.sim.memory import GuestMemory, MemoryFault, RingPages
from xlio.virtio import (
    DESC,
    RUN_MIN,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_ring_size,
    desc_table_size,
    descs,
    id_runs,
    need_event,
    ring_run,
    u32s,
    used_ring_size,
    valid_queue_size,
)
from xlio.virtio import (
    U16 as _U16,
)


class ChainError(Exception):
    """A malformed chain: drop it, return ``head`` with length 0, count ``reason``."""

    def __init__(self, reason: str, head: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.head = head


class QueueBroken(Exception):
    """The ring itself is corrupt: the device needs a reset."""


Segments = tuple[tuple[int, int], ...]  # (L2 GPA, length) of each descriptor
Chain = tuple[int, Segments, Segments]
"""A descriptor chain as the device sees it: (head, readable, writable) (a
plain tuple: one is built per frame)."""
Batch = tuple[list[int], list[int], list[int], list[Chain | ChainError], QueueBroken | None]
"""What :meth:`DeviceQueue.pop_batch` takes off the ring: (heads, addresses,
lengths) of its simple chains, the rest, and what broke the ring."""


def simple_chains(
    heads: Sequence[int], addrs: Sequence[int], lens: Sequence[int], write: bool
) -> list[Chain]:
    """:meth:`DeviceQueue.pop_batch`'s simple chains as chains: one descriptor
    each, device-writable when ``write``, else device-readable."""
    if write:
        return [(h, (), ((a, n),)) for h, a, n in zip(heads, addrs, lens, strict=True)]
    return [(h, ((a, n),), ()) for h, a, n in zip(heads, addrs, lens, strict=True)]


class DeviceQueue:
    """Device side of a split virtqueue (see the module docstring)."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc: int,
        avail: int,
        used: int,
        event_idx: bool,
        *,
        last_avail: int = 0,
        used_idx: int = 0,
        indirect: bool = False,
    ) -> None:
        if not valid_queue_size(size):
            raise ValueError(f"queue size {size} is not a power of two up to 32768")
        self.mem = mem
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.event_idx = event_idx
        self.indirect = indirect  # VIRTIO_F_INDIRECT_DESC negotiated
        self.last_avail = last_avail
        self.avail_idx = last_avail  # the driver's available index as last read
        self.used_idx = used_idx
        self.signalled = used_idx  # used index at the last publish
        # publishes of new used entries: the driver asked to be interrupted,
        # or it had suppressed that (EVENT_IDX's used_event, NO_INTERRUPT)
        self.interrupts = 0
        self.interrupts_suppressed = 0
        self.indirect_tables = 0  # chains that came in an indirect table
        self.broken = False
        self.popped = 0  # heads taken off the available ring, good chains or not
        self.errors: Counter[str] = Counter()
        # the available ring, the descriptor table and the used ring, kept
        self._rings = RingPages(
            mem,
            ((avail, avail_ring_size(size)), (desc, desc_table_size(size)),
             (used, used_ring_size(size))),
        )  # fmt: skip

    # ------------------------------------------------------------- helpers
    def _break(self, reason: str) -> QueueBroken:
        self.broken = True
        self.errors[reason] += 1
        return QueueBroken(reason)

    def pending(self) -> int:
        """Available entries not consumed yet; a jump beyond the size breaks the queue."""
        if self.broken:
            return 0
        n = (self.avail_idx - self.last_avail) & 0xFFFF
        if n:  # entries seen at the last read of the index: no need to read it again
            return n
        p = rp.pages if (rp := self._rings).gen == self.mem.generation else rp.get()
        try:  # caught up: read the driver's index (once per batch, as vhost does)
            idx = _U16.unpack_from(p[0], p[1] + 2)[0] if p else self.mem.read_u16(self.avail + 2)
        except MemoryFault:
            raise self._break("available ring unreadable") from None
        n = (idx - self.last_avail) & 0xFFFF
        if n > self.size:
            raise self._break("available index moved by more than the queue size")
        self.avail_idx = idx
        return n

    # ------------------------------------------------------------- consuming
    def pop(self) -> Chain | None:
        """The next available chain, None when there is none.

        Raises :class:`ChainError` (drop that chain) or :class:`QueueBroken`.
        """
        if not self.pending():
            return None
        size = self.size
        mem = self.mem
        try:
            head = mem.read_u16(self.avail + 4 + 2 * (self.last_avail % size))
        except MemoryFault:
            raise self._break("available ring unreadable") from None
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        self.popped += 1
        if head >= size:
            raise self._break("head descriptor index out of range")
        return self._walk(head)

    def pop_many(self, limit: int) -> tuple[list[Chain | ChainError], QueueBroken | None]:
        """Up to ``limit`` available chains in one pass, for a batch.

        Each item is a chain, or the :class:`ChainError` that :meth:`pop`
        would have raised for that head (the caller drops it). A broken ring
        ends the pass: the chains before it come back with the exception,
        which the caller raises once it has dealt with them. (:meth:`pop_batch`
        with its simple prefix as chains.)
        """
        heads, addrs, lens, rest, broken = self.pop_batch(limit, write=False)
        out: list[Chain | ChainError] = list(simple_chains(heads, addrs, lens, write=False))
        out += rest
        return out, broken

    def pop_batch(self, limit: int, write: bool) -> Batch:
        """:meth:`pop_many` for a device that reads (``write`` False: TX) or
        fills (True: RX) its buffers, shaped for a batch: (heads, addresses,
        lengths, rest, broken).

        The first ``len(heads)`` chains taken are *simple*: one descriptor,
        device-readable for TX or device-writable for RX, not empty, inside
        guest memory; they come as three parallel lists, no tuple per chain.
        ``rest`` holds every chain taken after the first that is not simple,
        in ring order, each a :data:`Chain` or the :class:`ChainError` of its
        head. ``broken`` is the :class:`QueueBroken` that ended the pass, or
        None. When the available ring and the descriptor table each lie in one
        page, they are resolved once and read in place; else one access at a
        time (then everything is in ``rest``).
        """
        heads: list[int] = []
        addrs: list[int] = []
        lens: list[int] = []
        rest: list[Chain | ChainError] = []
        try:
            pending = self.pending()
            if not pending:
                return heads, addrs, lens, rest, None
            p = rp.pages if (rp := self._rings).gen == self.mem.generation else rp.get()
            if p is None:  # rings across pages: one access at a time
                while len(rest) < limit:
                    try:
                        chain = self.pop()
                    except ChainError as e:
                        rest.append(e)
                        continue
                    if chain is None:
                        break
                    rest.append(chain)
                return heads, addrs, lens, rest, None
            size = self.size
            apage, aoff, dpage, doff = p[0], p[1] + 4, p[2], p[3]
            head_at = _U16.unpack_from
            desc_at = DESC.unpack_from
            mask = size - 1
            end = self.mem.size
            simple = VIRTQ_DESC_F_WRITE if write else 0
            put_head, put_addr, put_len = heads.append, addrs.append, lens.append
            put = rest.append
            taken = 0
            while taken < limit:
                if not pending:
                    pending = self.pending()
                    if not pending:
                        break
                take = min(pending, limit - taken)
                pending -= take
                taken += take
                if not rest and take >= RUN_MIN:  # still simple: the run of heads at once
                    hs = ring_run(apage, aoff, self.last_avail & mask, take, size, 2)
                    if max(hs) < size:
                        a, n, fl = self._descriptors(dpage, doff, hs)
                        if fl.count(simple) == take and min(n) and max(map(add, a, n)) <= end:
                            heads += hs
                            addrs += a
                            lens += n
                            self.last_avail = (self.last_avail + take) & 0xFFFF
                            self.popped += take
                            continue
                    # not all simple: one head at a time, as below, from the same slot
                first = last = self.last_avail
                try:
                    for _ in range(take):
                        head = head_at(apage, aoff + 2 * (last & mask))[0]
                        last = (last + 1) & 0xFFFF
                        if head >= size:
                            raise self._break("head descriptor index out of range")
                        addr, length, flags, nxt = desc_at(dpage, doff + 16 * head)
                        if flags == simple and length and addr + length <= end and not rest:
                            put_head(head)
                            put_addr(addr)
                            put_len(length)
                            continue
                        if not flags & ~VIRTQ_DESC_F_WRITE and length and addr + length <= end:
                            seg = ((addr, length),)
                            put((head, (), seg) if flags else (head, seg, ()))
                            continue
                        try:
                            put(self._walk(head))
                        except ChainError as e:
                            put(e)
                finally:  # the heads taken off the ring, the bad one included
                    self.last_avail = last
                    self.popped += (last - first) & 0xFFFF
            return heads, addrs, lens, rest, None
        except QueueBroken as e:
            return heads, addrs, lens, rest, e

    @staticmethod
    def _descriptors(
        page: bytearray, off: int, hs: tuple[int, ...]
    ) -> tuple[Sequence[int], Sequence[int], Sequence[int]]:
        """(addresses, lengths, flags) of the descriptors ``hs`` (each below the
        queue size), in that order. A driver that keeps its free ids as a stack
        (Linux's ``free_head``) posts runs of consecutive ids, up and down; each
        run (:func:`~xlio.virtio.id_runs`) is read as one slice of the table."""
        addrs: list[int] = []
        lens: list[int] = []
        flags: list[int] = []
        for at, k, step in id_runs(hs):
            if k == 1:
                a, n, fl, _ = DESC.unpack_from(page, off + 16 * hs[at])
                addrs.append(a)
                lens.append(n)
                flags.append(fl)
                continue
            low = hs[at] if step > 0 else hs[at + k - 1]
            flat = descs(k).unpack_from(page, off + 16 * low)
            if step > 0:
                addrs += flat[0::4]
                lens += flat[1::4]
                flags += flat[2::4]
            else:
                addrs += flat[-4::-4]
                lens += flat[-3::-4]
                flags += flat[-2::-4]
        return addrs, lens, flags

    def _walk(self, head: int) -> Chain:
        """The chain at ``head`` (already taken off the ring), or ChainError.

        With VIRTIO_F_INDIRECT_DESC a descriptor flagged INDIRECT (and not
        NEXT: 2.7.5.3.1) points at a table of ``len / 16`` descriptors in
        guest memory, which is walked instead, bounded by its own size; a
        table inside a table, or one of a length that is not a positive
        multiple of 16, drops the chain (vhost's "Invalid indirect
        descriptor length" and "Nested indirect descriptor")."""
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        mem = self.mem
        table, limit = self.desc, self.size  # the ring's table, or an indirect one
        in_indirect = False
        idx = head
        seen = 0
        while True:
            seen += 1
            if seen > limit:
                raise ChainError("descriptor loop or chain longer than the queue", head)
            try:
                addr, length, flags, nxt = mem.unpack_from(DESC, table + 16 * idx)
            except MemoryFault:
                if in_indirect:
                    raise ChainError("indirect table outside guest memory", head) from None
                raise self._break("descriptor table unreadable") from None
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError("indirect descriptor (feature not offered)", head)
                if in_indirect:
                    raise ChainError("nested indirect descriptor", head)
                if flags & VIRTQ_DESC_F_NEXT or readable or writable:
                    raise ChainError("indirect descriptor inside a chain", head)
                if not length or length % 16 or addr + length > mem.size:
                    raise ChainError("indirect table length or address invalid", head)
                table, limit, idx, seen, in_indirect = addr, length // 16, 0, 0, True
                self.indirect_tables += 1
                continue
            if length == 0:
                raise ChainError("zero-length buffer", head)
            if addr + length > mem.size or addr + length < addr:
                raise ChainError("buffer outside guest memory", head)
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise ChainError("readable descriptor after a writable one", head)
            else:
                readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return head, tuple(readable), tuple(writable)
            if nxt >= limit:
                raise ChainError("next descriptor index out of range", head)
            idx = nxt

    def push_many(self, heads: Sequence[int], lengths: Sequence[int]) -> None:
        """:meth:`push` for each head with its length, the used ring resolved
        once and written in one or two runs (two when it wraps)."""
        k = len(heads)
        if not k:
            return
        size = self.size
        p = rp.pages if (rp := self._rings).gen == self.mem.generation else rp.get()
        if p is None or k > size:  # (more than a ring's worth: each overwrites the one before)
            for head, length in zip(heads, lengths, strict=True):
                self.push(head, length)
            return
        if k < RUN_MIN:  # one at a time
            page, off = p[4], p[5] + 4
            put = USED_ELEM.pack_into
            mask = size - 1
            idx = self.used_idx
            for head, length in zip(heads, lengths):  # noqa: B905 (equal: zip's strict= costs)
                put(page, off + 8 * (idx & mask), head, length)
                idx = (idx + 1) & 0xFFFF
            self.used_idx = idx
            return
        flat = [0] * (2 * k)  # id, len, id, len, ...
        flat[0::2] = heads
        flat[1::2] = lengths
        page, off = p[4], p[5] + 4
        start = self.used_idx & (size - 1)
        first = min(k, size - start)
        u32s(2 * first).pack_into(page, off + 8 * start, *flat[: 2 * first])
        if first < k:
            u32s(2 * (k - first)).pack_into(page, off, *flat[2 * first :])
        self.used_idx = (self.used_idx + k) & 0xFFFF

    def push(self, head: int, length: int) -> None:
        """Return a chain to the driver (not visible until :meth:`publish`);
        raises :class:`QueueBroken` if the used ring cannot be written."""
        slot = self.used + 4 + 8 * (self.used_idx % self.size)
        try:
            self.mem.pack_into(USED_ELEM, slot, head, length)
        except MemoryFault:
            raise self._break("used ring unwritable") from None
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Expose the used index; True if the driver wants an interrupt now."""
        if self.broken:
            return False
        new = self.used_idx
        old = self.signalled
        if new == old:
            return False
        p = rp.pages if (rp := self._rings).gen == self.mem.generation else rp.get()
        if p is not None:
            _U16.pack_into(p[4], p[5] + 2, new)
            if self.event_idx:
                notify = need_event(_U16.unpack_from(p[0], p[1] + 4 + 2 * self.size)[0], new, old)
            else:
                notify = not _U16.unpack_from(p[0], p[1])[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
            self.signalled = new
            if notify:
                self.interrupts += 1
            else:
                self.interrupts_suppressed += 1
            return notify
        try:
            self.mem.write_u16(self.used + 2, new)
            if self.event_idx:
                event = self.mem.read_u16(self.avail + 4 + 2 * self.size)
                notify = need_event(event, new, old)
            else:
                notify = not self.mem.read_u16(self.avail) & VIRTQ_AVAIL_F_NO_INTERRUPT
        except MemoryFault:
            raise self._break("used ring unwritable") from None
        self.signalled = new
        if notify:
            self.interrupts += 1
        else:
            self.interrupts_suppressed += 1
        return notify

    def set_notify(self, enabled: bool) -> None:
        """Ask for kicks (at the next available entry) or suppress them."""
        if self.broken:
            return
        p = rp.pages if (rp := self._rings).gen == self.mem.generation else rp.get()
        if p is not None:  # as below, in place
            if self.event_idx:
                event = self.last_avail if enabled else (self.last_avail + 0x8000) & 0xFFFF
                _U16.pack_into(p[4], p[5] + 4 + 8 * self.size, event)
            else:
                _U16.pack_into(p[4], p[5], 0 if enabled else VIRTQ_USED_F_NO_NOTIFY)
            return
        try:
            if self.event_idx:
                # enabled: kick me at the next entry; disabled: at the entry half
                # the index space away, which a driver cannot publish before the
                # device has consumed what comes first (a stale event would
                # otherwise fire again at every 16-bit wrap of the index)
                event = self.last_avail if enabled else (self.last_avail + 0x8000) & 0xFFFF
                self.mem.write_u16(self.used + 4 + 8 * self.size, event)
            else:
                self.mem.write_u16(self.used, 0 if enabled else VIRTQ_USED_F_NO_NOTIFY)
        except MemoryFault:
            raise self._break("used ring unwritable") from None

    def unpop(self, n: int) -> None:
        """Put back the last ``n`` chains taken, unused (a mergeable RX frame
        that found too few buffers: vhost's ``vhost_discard_vq_desc``)."""
        self.last_avail = (self.last_avail - n) & 0xFFFF
        self.popped -= n

    def kick_beyond_known(self) -> bool:
        """Ask for a kick at the next entry the driver publishes beyond the
        ones already seen (``avail_idx``), then look again: True if it has
        published more meanwhile (vhost_enable_notify's re-check)."""
        if self.broken:
            return False
        known = self.avail_idx
        try:
            if self.event_idx:
                self.mem.write_u16(self.used + 4 + 8 * self.size, known)
            else:
                self.mem.write_u16(self.used, 0)
            idx = self.mem.read_u16(self.avail + 2)
        except MemoryFault:
            raise self._break("used ring unwritable") from None
        if (idx - self.last_avail) & 0xFFFF > self.size:
            raise self._break("available index moved by more than the queue size")
        self.avail_idx = idx
        return idx != known

    def state(self) -> tuple[int, int]:
        """(last_avail, used_idx): what a hand-over between backends carries."""
        return self.last_avail, self.used_idx


#: One ring of a queue in guest memory: (start GPA, end GPA, what, alignment).
Span = tuple[int, int, str, int]


def queue_spans(name: str, size: int, desc: int, avail: int, used: int) -> list[Span]:
    """The three rings of a split virtqueue as spans (virtio 1.x, 2.7)."""
    return [
        (desc, desc + desc_table_size(size), f"{name} descriptor table", 16),
        (avail, avail + avail_ring_size(size), f"{name} available ring", 2),
        (used, used + used_ring_size(size), f"{name} used ring", 4),
    ]


def span_problem(spans: list[Span], mem_size: int) -> str | None:
    """Why these rings cannot be used (None: they can): misaligned, outside
    ``mem_size`` bytes of guest memory, or two of them overlapping."""
    for start, end, what, align in spans:
        if start % align:
            return f"{what} at {start:#x} is not {align}-byte aligned"
        if start < 0 or end > mem_size:
            return f"{what} lies outside L2 memory"
    ordered = sorted(spans)
    for (_, end, a, _), (start, _, b, _) in zip(ordered, ordered[1:], strict=False):
        if start < end:
            return f"{a} overlaps {b}"
    return None
