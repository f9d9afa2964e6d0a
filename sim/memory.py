"""Sparse physical memory: host frames, and L1's guest-physical view of them.

Theory of operation
-------------------
:class:`HostMemory` is L0's physical memory as 4 KiB frames. A frame is a
number handed out by :meth:`HostMemory.alloc_frame`; it gets bytes only when
something writes to it, and reads of an untouched frame return zeros without
allocating. A 16 GiB guest whose pages are mapped but never written costs
nothing but its page tables.

:class:`L1Memory` is L1's guest-physical address space: an L1 frame number
becomes a host frame through EPT01, which only L0 changes. L1Memory asks its
``resolve`` function (L0's EPT01 lookup, with L0's own cache) and never
touches a host frame it was not given. Both classes are the one place where
bytes of a level's memory are read or written; everything else (EPT walks,
virtqueues) goes through them, so bounds are checked in one spot.
"""

from __future__ import annotations

import struct
import weakref
from collections.abc import Callable, Sequence
from typing import Any

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
QWORDS_PER_PAGE = PAGE_SIZE // 8
_PAGE_Q = struct.Struct(f"<{QWORDS_PER_PAGE}Q")
_U64 = struct.Struct("<Q")
_U16 = struct.Struct("<H")
_ZERO_PAGE = bytes(PAGE_SIZE)


class MemoryFault(Exception):
    """An access outside the memory a level owns (counted by callers, never fatal)."""


class HostMemory:
    """L0's physical memory: sparse 4 KiB frames."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError("host memory size must be a positive multiple of 4 KiB")
        self.size = size
        self.nframes = size >> PAGE_SHIFT
        self.frames: dict[int, bytearray] = {}
        self._next = 1  # frame 0 is never handed out: a zero address means "none"
        self._free: list[int] = []

    # ---------------------------------------------------------------- frames
    def alloc_frame(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next >= self.nframes:
            raise MemoryFault("host memory exhausted")
        f = self._next
        self._next += 1
        return f

    def alloc_frames(self, n: int, align: int = 1) -> int:
        """``n`` contiguous frames starting at a multiple of ``align``; returns the first."""
        start = -(-self._next // align) * align
        if start + n > self.nframes:
            raise MemoryFault("host memory exhausted")
        self._next = start + n
        return start

    def free_frame(self, frame: int) -> None:
        self.frames.pop(frame, None)
        self._free.append(frame)

    def _check(self, frame: int) -> None:
        if not 0 < frame < self.nframes:
            raise MemoryFault(f"host frame {frame:#x} outside host memory")

    # ---------------------------------------------------------------- bytes
    def read_page_qwords(self, frame: int) -> tuple[int, ...]:
        self._check(frame)
        page = self.frames.get(frame)
        return _PAGE_Q.unpack(page if page is not None else _ZERO_PAGE)

    def write_page_qwords(self, frame: int, qwords: Sequence[int]) -> None:
        self._check(frame)
        page = self.frames.get(frame)
        if page is None:
            page = self.frames[frame] = bytearray(PAGE_SIZE)
        _PAGE_Q.pack_into(page, 0, *qwords)

    def read_u64(self, frame: int, index: int) -> int:
        self._check(frame)
        page = self.frames.get(frame)
        return 0 if page is None else _U64.unpack_from(page, index << 3)[0]

    def write_u64(self, frame: int, index: int, value: int) -> None:
        self._check(frame)
        page = self.frames.get(frame)
        if page is None:
            if value == 0:
                return
            page = self.frames[frame] = bytearray(PAGE_SIZE)
        _U64.pack_into(page, index << 3, value)

    def read(self, frame: int, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset`` within one frame."""
        self._check(frame)
        if offset < 0 or n < 0 or offset + n > PAGE_SIZE:
            raise MemoryFault("access crosses a frame boundary")
        page = self.frames.get(frame)
        return bytes(n) if page is None else bytes(page[offset : offset + n])

    def write(self, frame: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(frame)
        n = len(data)
        if offset < 0 or offset + n > PAGE_SIZE:
            raise MemoryFault("access crosses a frame boundary")
        page = self.frames.get(frame)
        if page is None:
            page = self.frames[frame] = bytearray(PAGE_SIZE)
        page[offset : offset + n] = data

    def page(self, frame: int) -> bytearray:
        """The frame's bytes, materialized (for zero-copy views of a whole frame)."""
        self._check(frame)
        page = self.frames.get(frame)
        if page is None:
            page = self.frames[frame] = bytearray(PAGE_SIZE)
        return page

    def resident_bytes(self) -> int:
        return len(self.frames) * PAGE_SIZE


class L1Memory:
    """L1's guest-physical memory: L1 frames resolved to host frames by L0 (EPT01)."""

    def __init__(self, host: HostMemory, size: int, resolve: Callable[[int], int]) -> None:
        self.host = host
        self.size = size
        self.nframes = size >> PAGE_SHIFT
        self.resolve = resolve  # L1 frame -> host frame (L0 maps on first use)

    def _host(self, frame: int) -> int:
        if not 0 <= frame < self.nframes:
            raise MemoryFault(f"L1 frame {frame:#x} outside L1 memory")
        return self.resolve(frame)

    def read_page_qwords(self, frame: int) -> tuple[int, ...]:
        return self.host.read_page_qwords(self._host(frame))

    def write_page_qwords(self, frame: int, qwords: Sequence[int]) -> None:
        self.host.write_page_qwords(self._host(frame), qwords)

    def read_u64(self, frame: int, index: int) -> int:
        return self.host.read_u64(self._host(frame), index)

    def write_u64(self, frame: int, index: int, value: int) -> None:
        self.host.write_u64(self._host(frame), index, value)


class Epoch:
    """Moves whenever a mapping is removed or changed; the views that cache
    translations over it drop their cached pages at once (push, not poll:
    the accessor's hit path then makes no call at all)."""

    def __init__(self) -> None:
        self._views: weakref.WeakSet[GuestMemory] = weakref.WeakSet()  # not theirs to keep

    def move(self) -> None:
        for view in self._views:
            view.invalidate()

    def watch(self, view: GuestMemory) -> None:
        self._views.add(view)


class GuestMemory:
    """One level's view of L2's guest-physical memory: the audited accessor.

    Every byte any driver or device reads or writes in L2's memory goes
    through here. An access is checked against L2's size, translated page by
    page with ``translate`` (L2 GPA -> host address: EPT12 then EPT01, by
    whichever level is looking), and only then touches a host frame; an
    address that is out of range or not mapped raises :class:`MemoryFault`,
    which devices count and contain. ``faults`` counts them here too.

    With ``epochs`` (the :class:`Epoch` of every mapping this view relies
    on), translated pages are cached; an epoch that moves empties the cache.
    ``touched``, when set, collects every host frame accessed, so a test can
    check that a device never strays outside L2's frames.
    """

    def __init__(
        self,
        host: HostMemory,
        size: int,
        translate: Callable[[int], int],
        name: str,
        epochs: Sequence[Epoch] = (),
    ) -> None:
        self.host = host
        self.size = size
        self.translate = translate
        self.name = name
        self.caching = bool(epochs)
        for e in epochs:
            e.watch(self)
        self.faults = 0
        self._touched: set[int] | None = None
        #: guest page -> (host page, host frame, a memoryview of the page: a
        #: slice of a memoryview is read and written without a second copy)
        self._cache: dict[int, tuple[bytearray, int, memoryview]] = {}
        #: moves with every invalidation: a page a caller resolved (a ring's,
        #: :meth:`pinned_page`) is good while this has not moved
        self.generation = 0

    @property
    def touched(self) -> set[int] | None:
        """Host frames accessed since this was set (None: not recorded)."""
        return self._touched

    @touched.setter
    def touched(self, frames: set[int] | None) -> None:
        # what callers kept (a ring's pages) was resolved without recording:
        # resolving again, through the accessor, records
        self._touched = frames
        self.invalidate()

    def invalidate(self) -> None:
        """A mapping this view relies on changed: every cached page goes."""
        self._cache.clear()
        self.generation += 1

    def pinned_page(self, gpa: int, n: int) -> tuple[bytearray, int] | None:
        """:meth:`span_page` for a caller that keeps the page across batches
        (a virtqueue's rings): None also when this view does not cache
        translations or records every frame touched, so that such a caller
        goes through the accessor each time. The page is good while
        ``generation`` has not moved."""
        if not self.caching or self._touched is not None:
            return None
        return self.span_page(gpa, n)

    def _span(self, gpa: int, n: int) -> None:
        if gpa < 0 or n < 0 or gpa + n > self.size:
            self.faults += 1
            raise MemoryFault(f"{self.name}: [{gpa:#x}, +{n}) outside guest memory")

    def _page(self, gpa: int) -> tuple[bytearray, int]:
        page_no = gpa >> PAGE_SHIFT
        off = gpa & (PAGE_SIZE - 1)
        hit = self._cache.get(page_no)
        if hit is not None:
            if self._touched is not None:
                self._touched.add(hit[1])
            return hit[0], off
        try:
            hpa = self.translate(gpa)
        except MemoryFault:
            self.faults += 1
            raise
        frame = hpa >> PAGE_SHIFT
        buf = self.host.page(frame)
        if self.caching:
            self._cache[page_no] = (buf, frame, memoryview(buf))
        if self._touched is not None:
            self._touched.add(frame)
        return buf, off

    def span_page(self, gpa: int, n: int) -> tuple[bytearray, int] | None:
        """The host page and offset holding all of ``[gpa, gpa + n)``, for a
        batch of accesses to one ring; None when the span leaves L2's memory
        or crosses a page (then use the per-access methods). Raises
        :class:`MemoryFault` if the page is not mapped. The page stays valid
        until a mapping changes (an epoch moves): callers resolve it again
        for every batch, never across anything that can run the model."""
        off = gpa & (PAGE_SIZE - 1)
        if gpa < 0 or gpa + n > self.size or off + n > PAGE_SIZE:
            return None
        return self._page(gpa)

    def read(self, gpa: int, n: int) -> bytes:
        if gpa < 0 or n < 0 or gpa + n > self.size:
            self._span(gpa, n)
        off = gpa & (PAGE_SIZE - 1)
        if off + n <= PAGE_SIZE:
            hit = None if self._touched is not None else self._cache.get(gpa >> PAGE_SHIFT)
            if hit is not None:
                return hit[2][off : off + n].tobytes()
            page, off = self._page(gpa)
            return bytes(page[off : off + n])
        out = bytearray()
        while n:
            page, o = self._page(gpa)
            k = min(n, PAGE_SIZE - o)
            out += page[o : o + k]
            gpa += k
            n -= k
        return bytes(out)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if gpa < 0 or gpa + n > self.size:
            self._span(gpa, n)
        off = gpa & (PAGE_SIZE - 1)
        if off + n <= PAGE_SIZE:
            hit = None if self._touched is not None else self._cache.get(gpa >> PAGE_SHIFT)
            if hit is not None:
                hit[2][off : off + n] = data
                return
            page, off = self._page(gpa)
            page[off : off + n] = data
            return
        view = memoryview(data)
        pos = 0
        while pos < n:
            page, o = self._page(gpa + pos)
            k = min(n - pos, PAGE_SIZE - o)
            page[o : o + k] = view[pos : pos + k]
            pos += k

    def read_many(self, gpas: Sequence[int], lens: Sequence[int]) -> list[bytes | None]:
        """:meth:`read` of ``lens[i]`` bytes at each ``gpas[i]`` of a batch: the
        bytes, or None where that read faulted (counted in ``faults``; the rest
        of the batch goes on). A span inside one cached page is served here;
        any other goes through :meth:`read` and its checks."""
        out: list[bytes | None] = []
        put = out.append
        cache = self._cache if self._touched is None else {}
        get = cache.get
        size = self.size
        # equal lengths, by every caller's construction (zip's strict= is a keyword call)
        for gpa, n in zip(gpas, lens):  # noqa: B905
            off = gpa & (PAGE_SIZE - 1)
            hit = get(gpa >> PAGE_SHIFT) if off + n <= PAGE_SIZE and gpa + n <= size else None
            if hit is not None and gpa >= 0 and n >= 0:
                put(hit[2][off : off + n].tobytes())
                continue
            try:
                put(self.read(gpa, n))
            except MemoryFault:
                put(None)
        return out

    def write_many(self, gpas: Sequence[int], datas: Sequence[bytes]) -> list[int]:
        """:meth:`write` of each ``datas[i]`` at ``gpas[i]`` for a batch;
        returns the indexes whose write faulted (counted in ``faults``; the
        rest of the batch is written). A write inside one cached page is
        done here; any other goes through :meth:`write` and its checks."""
        failed: list[int] = []
        cache = self._cache if self._touched is None else {}
        get = cache.get
        size = self.size
        for i, gpa in enumerate(gpas):
            data = datas[i]
            n = len(data)
            off = gpa & (PAGE_SIZE - 1)
            hit = get(gpa >> PAGE_SHIFT) if off + n <= PAGE_SIZE and gpa + n <= size else None
            if hit is not None and gpa >= 0:
                hit[2][off : off + n] = data
                continue
            try:
                self.write(gpa, data)
            except MemoryFault:
                failed.append(i)
        return failed

    def unpack_from(self, st: struct.Struct, gpa: int) -> tuple[Any, ...]:
        """``st`` unpacked from guest memory at ``gpa``, with no intermediate copy."""
        n = st.size
        off = gpa & (PAGE_SIZE - 1)
        if gpa < 0 or gpa + n > self.size or off + n > PAGE_SIZE:
            return st.unpack(self.read(gpa, n))  # out of range (raises) or across pages
        hit = None if self._touched is not None else self._cache.get(gpa >> PAGE_SHIFT)
        if hit is None:
            page, off = self._page(gpa)
        else:
            page = hit[0]
        return st.unpack_from(page, off)

    def pack_into(self, st: struct.Struct, gpa: int, *values: Any) -> None:
        """``values`` packed by ``st`` into guest memory at ``gpa``, in place."""
        n = st.size
        off = gpa & (PAGE_SIZE - 1)
        if gpa < 0 or gpa + n > self.size or off + n > PAGE_SIZE:
            self.write(gpa, st.pack(*values))
            return
        hit = None if self._touched is not None else self._cache.get(gpa >> PAGE_SHIFT)
        if hit is None:
            page, off = self._page(gpa)
        else:
            page = hit[0]
        st.pack_into(page, off, *values)

    def read_u16(self, gpa: int) -> int:
        return int(self.unpack_from(_U16, gpa)[0])

    def write_u16(self, gpa: int, value: int) -> None:
        self.pack_into(_U16, gpa, value & 0xFFFF)


#: Three rings' host pages and offsets, flat: (page, offset) x 3.
Pages3 = tuple[bytearray, int, bytearray, int, bytearray, int]


class RingPages:
    """The host pages of a queue's three rings (``spans``: (GPA, bytes) each,
    in the order the owner reads them back), kept between batches and
    resolved again only when the view's ``generation`` moves (every mapping
    change moves it, and so does starting or stopping to record ``touched``).
    :meth:`get` is None when they cannot be kept (a ring across pages, a view
    that does not cache or records what it touches, a fault): then the owner
    goes through the accessor, which says what is wrong.

    On its hot paths an owner reads ``pages`` itself while ``gen`` equals
    the view's generation (``rp.pages if rp.gen == mem.generation else
    rp.get()``): the same answer as :meth:`get`, without a call."""

    __slots__ = ("mem", "spans", "pages", "gen")

    def __init__(self, mem: GuestMemory, spans: tuple[tuple[int, int], ...]) -> None:
        self.mem = mem
        self.spans = spans
        self.pages: Pages3 | None = None
        self.gen = -1  # the view's generation ``pages`` was resolved at

    def get(self) -> Pages3 | None:
        mem = self.mem
        if self.gen == mem.generation:
            return self.pages
        try:
            found = [mem.pinned_page(gpa, n) for gpa, n in self.spans]
        except MemoryFault:
            return None  # not kept: the accessor reports which ring it was
        a, b, c = found
        self.pages = (*a, *b, *c) if a and b and c else None
        self.gen = mem.generation
        return self.pages


class MappedHost:
    """A VMM's guest memory as regions mapped into this process (vhost-user's
    memory table): the ``host`` of a :class:`GuestMemory` whose frames are
    guest-physical page numbers, backed by whichever region holds them.

    ``regions`` are (guest-physical start, bytes, buffer) with page-aligned
    starts and sizes, disjoint; a buffer is anything a memoryview takes (an
    ``mmap`` of the VMM's memfd, a bytearray in tests). :meth:`translate`
    is the bounds check: an address in no region raises :class:`MemoryFault`
    (the hole below 1 MiB that QEMU leaves for VGA and the BIOS is one), so
    nothing outside the mapped regions is ever touched. :meth:`release`
    drops every view into the buffers, so that their owner can unmap them.
    """

    def __init__(self, regions: Sequence[tuple[int, int, Any]]) -> None:
        ordered = sorted(regions, key=lambda r: r[0])
        for gpa, size, _ in ordered:
            if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
                raise ValueError(f"region [{gpa:#x}, +{size:#x}) is not whole pages")
        for (a, n, _), (b, _, _) in zip(ordered, ordered[1:], strict=False):
            if b < a + n:
                raise ValueError(f"regions at {a:#x} and {b:#x} overlap")
        self.starts = [gpa for gpa, _, _ in ordered]
        self.ends = [gpa + size for gpa, size, _ in ordered]
        self.views: list[memoryview] | None = [memoryview(buf) for _, _, buf in ordered]
        self.size = self.ends[-1] if ordered else 0
        self.epoch = Epoch()

    def _region(self, gpa: int) -> int:
        import bisect

        i = bisect.bisect_right(self.starts, gpa) - 1
        if i < 0 or gpa >= self.ends[i] or self.views is None:
            raise MemoryFault(f"guest-physical {gpa:#x} is in no mapped region")
        return i

    def translate(self, gpa: int) -> int:
        """The identity on mapped guest-physical addresses; else MemoryFault."""
        self._region(gpa)
        return gpa

    def page(self, frame: int) -> memoryview:
        gpa = frame << PAGE_SHIFT
        i = self._region(gpa)
        assert self.views is not None
        off = gpa - self.starts[i]
        return self.views[i][off : off + PAGE_SIZE]

    def memory(self, name: str) -> GuestMemory:
        """A view of these regions, its translations cached until :meth:`release`."""
        return GuestMemory(self, self.size, self.translate, name, (self.epoch,))  # type: ignore[arg-type]

    def release(self) -> None:
        """Forget every page handed out (the views empty their caches) and the
        buffers themselves; accesses after this fault."""
        self.epoch.move()
        if self.views is not None:
            for v in self.views:
                try:
                    v.release()
                except BufferError:  # a page still held somewhere: the collector frees it
                    pass
        self.views = None
