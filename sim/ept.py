"""EPT paging structures in their real format, stored as bytes in a memory.

Entry format (Intel SDM Vol. 3, 29.3.2 "EPT Translation Mechanism"): bit 0
read, bit 1 write, bit 2 execute, bits 5:3 memory type (leaf), bit 6 ignore
PAT, bit 7 page size (a 2 MiB leaf in a PDE, a 1 GiB leaf in a PDPTE), bits
51:12 the physical address of the next table or of the page. An entry with
none of bits 2:0 set is not present (a walk ending there is an EPT violation);
write without read is a misconfiguration (KVM marks MMIO that way).

An :class:`EptTable` is a four-level hierarchy (PML4, PDPT, PD, PT) whose
table pages live in a memory object (``HostMemory`` for L0's EPT01 and EPT02,
``L1Memory`` for L1's EPT12). Leaves are 4 KiB PTEs or 2 MiB PDEs, fixed per
table. Whole leaf tables (512 entries) can be read and written in one step,
which is what lets a sweep over a large working set or a static pre-build of
16 GiB run at Python speed. A ``trap`` hook sees every entry write to a
protected table page: that is how L0 write-protects EPT12 in the shadow-like
scheme.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

EPT_READ = 1
EPT_WRITE = 2
EPT_EXEC = 4
EPT_RWX = 7
EPT_MT_WB = 6 << 3
EPT_IPAT = 1 << 6
EPT_LARGE = 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000
QW = 512

PAGE_4K = 12
PAGE_2M = 21
PAGE_SHIFTS = {"4k": PAGE_4K, "2m": PAGE_2M}


def leaf_entry(pa: int, perms: int, page_shift: int) -> int:
    """A present leaf mapping ``pa`` (aligned to the page size) with ``perms``."""
    e = (pa & ADDR_MASK) | (perms & EPT_RWX) | EPT_MT_WB
    return e | EPT_LARGE if page_shift == PAGE_2M else e


def entry_pa(e: int) -> int:
    return e & ADDR_MASK


def is_present(e: int) -> bool:
    return bool(e & EPT_RWX)


def is_misconfig(e: int) -> bool:
    return e & (EPT_READ | EPT_WRITE) == EPT_WRITE


class PageStore(Protocol):
    def read_page_qwords(self, frame: int) -> tuple[int, ...]: ...
    def write_page_qwords(self, frame: int, qwords: Sequence[int]) -> None: ...
    def read_u64(self, frame: int, index: int) -> int: ...
    def write_u64(self, frame: int, index: int, value: int) -> None: ...


class Trap(Protocol):
    def protected(self, frame: int) -> bool: ...
    def write(self, frame: int, index: int, old: int, new: int) -> None: ...


class EptTable:
    """A four-level EPT hierarchy in ``store``; table frames come from ``alloc``."""

    def __init__(
        self,
        store: PageStore,
        alloc: Callable[[], int],
        free: Callable[[int], None],
        page_shift: int,
        name: str,
    ) -> None:
        if page_shift not in (PAGE_4K, PAGE_2M):
            raise ValueError("EPT leaves are 4 KiB or 2 MiB")
        self.store = store
        self.alloc = alloc
        self.free = free
        self.page_shift = page_shift
        self.region_shift = page_shift + 9  # what one leaf table covers
        self.leaf_level = 1 if page_shift == PAGE_4K else 2
        self.name = name
        self.trap: Trap | None = None
        self.present = 0  # present leaf entries
        self.table_frames: set[int] = set()  # the owner's record of its table pages
        self.root = self._new_table()

    def _new_table(self) -> int:
        f = self.alloc()
        self.store.write_page_qwords(f, (0,) * QW)
        self.table_frames.add(f)
        return f

    @staticmethod
    def index(gpa: int, level: int) -> int:
        return (gpa >> (12 + 9 * (level - 1))) & 511

    def _write(self, frame: int, index: int, old: int, new: int) -> None:
        trap = self.trap
        if trap is not None and trap.protected(frame):
            trap.write(frame, index, old, new)
        self.store.write_u64(frame, index, new)

    # ---------------------------------------------------------------- walks
    def leaf_table(self, gpa: int, create: bool = False) -> tuple[int, int]:
        """(frame of the leaf table covering ``gpa``, entries read); frame 0: none."""
        frame = self.root
        reads = 0
        for level in range(4, self.leaf_level, -1):
            idx = self.index(gpa, level)
            e = self.store.read_u64(frame, idx)
            reads += 1
            if not is_present(e):
                if not create:
                    return 0, reads
                child = self._new_table()
                self._write(frame, idx, e, (child << 12) | EPT_RWX)
                frame = child
            else:
                frame = entry_pa(e) >> 12
        return frame, reads

    def walk(self, gpa: int) -> tuple[int, int]:
        """(leaf entry for ``gpa`` or 0, entries read: the levels a walker touched)."""
        frame, reads = self.leaf_table(gpa)
        if not frame:
            return 0, reads
        return self.store.read_u64(frame, self.index(gpa, self.leaf_level)), reads + 1

    def translate(self, gpa: int) -> int | None:
        """The physical address ``gpa`` maps to, or None."""
        e, _ = self.walk(gpa)
        if not is_present(e) or is_misconfig(e):
            return None
        mask = (1 << self.page_shift) - 1
        return entry_pa(e) & ~mask | (gpa & mask)

    # ---------------------------------------------------------------- updates
    def set_leaf(self, gpa: int, entry: int) -> int:
        """Write the leaf entry for ``gpa``; returns the old entry."""
        frame, _ = self.leaf_table(gpa, create=is_present(entry))
        if not frame:
            return 0
        idx = self.index(gpa, self.leaf_level)
        old = self.store.read_u64(frame, idx)
        if old != entry:
            self._write(frame, idx, old, entry)
            self.present += is_present(entry) - is_present(old)
        return old

    def map(self, gpa: int, pa: int, perms: int = EPT_RWX) -> int:
        return self.set_leaf(gpa, leaf_entry(pa, perms, self.page_shift))

    def unmap(self, gpa: int) -> int:
        return self.set_leaf(gpa, 0)

    def read_leaves(self, region_gpa: int) -> tuple[int, ...] | None:
        """The 512 leaf entries of the region containing ``region_gpa``, or None."""
        frame, _ = self.leaf_table(region_gpa)
        return self.store.read_page_qwords(frame) if frame else None

    def write_leaves(self, region_gpa: int, entries: Sequence[int]) -> None:
        """Replace the 512 leaf entries of a region in one step."""
        frame, _ = self.leaf_table(region_gpa, create=True)
        old = self.store.read_page_qwords(frame)
        trap = self.trap
        if trap is not None and trap.protected(frame):
            for i, (o, n) in enumerate(zip(old, entries, strict=True)):
                if o != n:
                    trap.write(frame, i, o, n)
        self.store.write_page_qwords(frame, entries)
        self.present += sum(1 for e in entries if e & EPT_RWX) - sum(1 for e in old if e & EPT_RWX)

    def drop_all(self) -> int:
        """Free every table page and start from an empty root; returns leaves dropped."""
        dropped = self.present
        for f in self.table_frames:
            self.free(f)
        self.table_frames = set()
        self.present = 0
        self.root = self._new_table()
        return dropped

    def leaves(self) -> dict[int, int]:
        """Every present leaf as {guest page base: entry} (for checks, not the hot path)."""
        out: dict[int, int] = {}

        def visit(frame: int, level: int, base: int) -> None:
            for i, e in enumerate(self.store.read_page_qwords(frame)):
                if not is_present(e):
                    continue
                gpa = base | (i << (12 + 9 * (level - 1)))
                if level == self.leaf_level:
                    out[gpa] = e
                else:
                    visit(entry_pa(e) >> 12, level - 1, gpa)

        visit(self.root, 4, 0)
        return out
