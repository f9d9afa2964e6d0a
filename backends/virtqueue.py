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

A guest's bad input never escapes as an exception and never reaches memory
outside L2's own (every access goes through ``GuestMemory``):

* a chain that is malformed (descriptor index out of range in ``next``, a
  loop or a chain longer than the queue, a zero-length buffer, an indirect
  descriptor, which we do not offer, a readable descriptor after a writable
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

from xlio.sim.memory import GuestMemory, MemoryFault, RingPages
from xlio.virtio import (
    DESC,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_ring_size,
    desc_table_size,
    need_event,
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
    ) -> None:
        if not valid_queue_size(size):
            raise ValueError(f"queue size {size} is not a power of two up to 32768")
        self.mem = mem
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.event_idx = event_idx
        self.last_avail = last_avail
        self.avail_idx = last_avail  # the driver's available index as last read
        self.used_idx = used_idx
        self.signalled = used_idx  # used index at the last publish
        self.broken = False
        self.popped = 0  # heads taken off the available ring, good chains or not
        self.errors: Counter[str] = Counter()
        # the available ring, the descriptor table and the used ring, kept
        self._ring_pages = RingPages(
            mem,
            ((avail, avail_ring_size(size)), (desc, desc_table_size(size)),
             (used, used_ring_size(size))),
        ).get  # fmt: skip

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
        p = self._ring_pages()
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
        which the caller raises once it has dealt with them. When the
        available ring and the descriptor table each lie in one page, they
        are resolved once and read in place; a single-descriptor chain (the
        common TX buffer, every RX buffer) is read with one ``unpack_from``.
        """
        out: list[Chain | ChainError] = []
        try:
            pending = self.pending()
            if not pending:
                return out, None
            mem = self.mem
            size = self.size
            p = self._ring_pages()
            if p is None:  # rings across pages: one access at a time
                while len(out) < limit:
                    try:
                        chain = self.pop()
                    except ChainError as e:
                        out.append(e)
                        continue
                    if chain is None:
                        break
                    out.append(chain)
                return out, None
            apage, aoff, dpage, doff = p[0], p[1] + 4, p[2], p[3]
            head_at = _U16.unpack_from
            desc_at = DESC.unpack_from
            mask = size - 1
            end = mem.size
            put = out.append
            while len(out) < limit:
                if not pending:
                    pending = self.pending()
                    if not pending:
                        break
                take = min(pending, limit - len(out))
                pending -= take
                first = last = self.last_avail
                try:
                    for _ in range(take):
                        head = head_at(apage, aoff + 2 * (last & mask))[0]
                        last = (last + 1) & 0xFFFF
                        if head >= size:
                            raise self._break("head descriptor index out of range")
                        addr, length, flags, nxt = desc_at(dpage, doff + 16 * head)
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
            return out, None
        except QueueBroken as e:
            return out, e

    def _walk(self, head: int) -> Chain:
        """The chain at ``head`` (already taken off the ring), or ChainError."""
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        mem = self.mem
        size = self.size
        idx = head
        seen = 0
        while True:
            seen += 1
            if seen > size:
                raise ChainError("descriptor loop or chain longer than the queue", head)
            try:
                addr, length, flags, nxt = mem.unpack_from(DESC, self.desc + 16 * idx)
            except MemoryFault:
                raise self._break("descriptor table unreadable") from None
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise ChainError("indirect descriptor (feature not offered)", head)
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
            if nxt >= size:
                raise ChainError("next descriptor index out of range", head)
            idx = nxt

    def push_many(self, entries: list[tuple[int, int]]) -> None:
        """:meth:`push` for each (head, length), the used ring resolved once."""
        if not entries:
            return
        size = self.size
        p = self._ring_pages()
        if p is None:
            for head, length in entries:
                self.push(head, length)
            return
        page, off = p[4], p[5] + 4
        put = USED_ELEM.pack_into
        mask = size - 1
        idx = self.used_idx
        for head, length in entries:
            put(page, off + 8 * (idx & mask), head, length)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx

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
        p = self._ring_pages()
        if p is not None:
            _U16.pack_into(p[4], p[5] + 2, new)
            if self.event_idx:
                notify = need_event(_U16.unpack_from(p[0], p[1] + 4 + 2 * self.size)[0], new, old)
            else:
                notify = not _U16.unpack_from(p[0], p[1])[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
            self.signalled = new
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
        return notify

    def set_notify(self, enabled: bool) -> None:
        """Ask for kicks (at the next available entry) or suppress them."""
        if self.broken:
            return
        p = self._ring_pages()
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
