"""L1's management of L2's memory: EPT12 as bytes in L1 memory, frames, host swap.

Theory of operation
-------------------
L1 (a KVM) backs L2's guest-physical pages with its own frames and records
the mapping in EPT12, a four-level EPT whose table pages are L1 memory. It
fills EPT12 either up front for all of L2's memory (``static``: the slides'
"build as possible as static guest EPT table") or on demand, when L0 injects
an EPT violation because EPT12 had no mapping (:meth:`L1Mmu.handle_ept_violation`,
run while the machine is in L1 after the reflected exit).

After changing EPT12, L1 issues INVEPT (single context). A change from not
present to present cannot leave a stale translation anywhere, so with
``avoid_invept`` L1 skips the INVEPT for it (the slides' "avoid unnecessary
INVEPT"); a removal or a remap always needs one.

Host swap in L1 (:meth:`L1Mmu.evict`): L1's reclaim (kswapd, on another of
L1's vCPUs while L2 keeps running) picks an L2 page, clears its EPT12 entry,
INVEPTs, and frees the frame; L2's next touch faults, L0 reflects it, and L1
swaps the page back in.
"""

from __future__ import annotations

from .ept import EPT_RWX, QW, EptTable, leaf_entry
from .machine import L1, L2, NestedMachine
from .memory import PAGE_SHIFT, Epoch, MemoryFault
from .refs import weak_method
from .vept import VirtualEpt
from .vmx import ExitReason


def static_fits(l1_bytes: int, l2_bytes: int, page_shift: int) -> bool:
    """Whether L1 memory of ``l1_bytes`` can back ``l2_bytes`` of L2 statically:
    every L2 page (growing down from the top) plus EPT12's leaf tables, one
    per 512 pages, its upper levels and the reserved first frame (growing up)."""
    fpp = 1 << (page_shift - PAGE_SHIFT)
    n = l2_bytes >> page_shift
    first_l1 = (l1_bytes >> PAGE_SHIFT) // fpp - n
    return first_l1 * fpp > 1 + n // QW + 8


class L1Mmu:
    """L1's EPT12 for one L2 (see the module docstring)."""

    def __init__(
        self,
        machine: NestedMachine,
        vept: VirtualEpt,
        l2_size: int,
        *,
        avoid_invept: bool = False,
    ) -> None:
        self.m = machine
        self.vept = vept
        self.costs = machine.costs
        self.page_shift = vept.page_shift
        self.frames_per_page = vept.frames_per_page
        self.l2_pages = l2_size >> self.page_shift
        self.avoid_invept = avoid_invept
        mem = vept.l1mem
        self._next_table = 1  # table frames grow up from the bottom of L1 memory
        self._next_page = mem.nframes // self.frames_per_page  # backing grows down
        self._free_pages: list[int] = []
        self._free_tables: list[int] = []
        self.ept12 = EptTable(
            mem, weak_method(self._alloc_table), weak_method(self._free_table), self.page_shift,
            "EPT12",
        )  # fmt: skip
        vept.attach_ept12(self.ept12)
        self.swapped: set[int] = set()
        self.epoch = Epoch()  # moves on every EPT12 change L1 makes

    # ------------------------------------------------------------- L1 frames
    def _alloc_table(self) -> int:
        if self._free_tables:
            return self._free_tables.pop()
        f = self._next_table
        if f >= self._next_page * self.frames_per_page:
            raise MemoryFault("L1 memory exhausted")
        self._next_table += 1
        return f

    def _free_table(self, frame: int) -> None:
        self._free_tables.append(frame)

    def _alloc_page(self) -> int:
        if self._free_pages:
            return self._free_pages.pop()
        self._next_page -= 1
        if self._next_page * self.frames_per_page <= self._next_table:
            raise MemoryFault("L1 memory exhausted")
        return self._next_page

    def _check(self, l2_page: int) -> None:
        if not 0 <= l2_page < self.l2_pages:
            raise MemoryFault(f"L2 page {l2_page:#x} outside L2 memory")

    # ------------------------------------------------------------- building
    def prebuild(self) -> None:
        """Static EPT12: back and map every L2 page up front, a leaf table at a time."""
        shift = self.page_shift
        n = self.l2_pages
        first_l1 = self._next_page - n
        if first_l1 * self.frames_per_page <= self._next_table + n // QW + 8:
            raise MemoryFault("L1 memory too small to back L2 statically")  # static_fits()
        self._next_page = first_l1
        for first in range(0, n, QW):
            last = min(first + QW, n)
            entries = [
                leaf_entry((first_l1 + p) << shift, EPT_RWX, shift) for p in range(first, last)
            ]
            entries.extend([0] * (QW - len(entries)))
            self.ept12.write_leaves(first << shift, entries)

    def l1_page_of(self, l2_page: int) -> int | None:
        """The L1 page backing ``l2_page``, read from EPT12 (L1's own record)."""
        pa = self.ept12.translate(l2_page << self.page_shift)
        return None if pa is None else pa >> self.page_shift

    def _map(self, l2_page: int) -> None:
        self.epoch.move()
        l1_page = self._alloc_page()
        self.ept12.map(l2_page << self.page_shift, l1_page << self.page_shift)

    def map_page(self, l2_page: int) -> None:
        """L1 maps an unmapped L2 page on its own initiative (not present -> present)."""
        self._check(l2_page)
        if self.l1_page_of(l2_page) is not None:
            raise ValueError(f"L2 page {l2_page:#x} is already mapped")
        with self.m.l1_background():
            self._map(l2_page)
            if self.avoid_invept:
                self.m.stats.invept_skipped += 1
            else:
                self.flush()

    def remap_page(self, l2_page: int) -> None:
        """L1 moves a mapped L2 page to another L1 page (compaction, say)."""
        old = self.l1_page_of(l2_page)
        if old is None:
            raise ValueError(f"L2 page {l2_page:#x} is not mapped")
        with self.m.l1_background():
            new = self._alloc_page()
            self.epoch.move()
            self.ept12.map(l2_page << self.page_shift, new << self.page_shift)
            self.flush()  # present -> other present: the old translation is stale
        self._free_pages.append(old)

    def handle_ept_violation(self, l2_page: int) -> None:
        """L1's handler for an EPT violation L0 injected: map the page (swap it in)."""
        self._check(l2_page)
        if self.m.state != L1:
            raise RuntimeError("L1's EPT-violation handler runs in L1")
        self._swap_in(l2_page)

    def fault_in(self, l2_page: int) -> None:
        """L1's own access to an L2 page it swapped out (its vhost copying through
        the VMM's mapping of L2 memory): L1's page-fault handler swaps it back in."""
        self._check(l2_page)
        if self.l1_page_of(l2_page) is not None:
            return
        with self.m.l1_background():
            self._swap_in(l2_page)

    def _swap_in(self, l2_page: int) -> None:
        if l2_page in self.swapped:
            self.swapped.discard(l2_page)
            self.m.l1_work(self.costs.swap_in, "swapping")
        self._map(l2_page)
        if self.avoid_invept:
            self.m.stats.invept_skipped += 1  # not present -> present: nothing can be stale
        else:
            self.vept.invept()

    def flush(self) -> None:
        """L1's TLB flush after an EPT12 change (kvm_flush_remote_tlbs).

        Run from another L1 vCPU (reclaim, compaction) under KVM's scheme, a
        modern L1 executes a global INVEPT there and IPIs every vCPU running
        L2 (an x2APIC ICR write, an L1 exit); the target leaves L2 (a
        reflected external interrupt), executes its own global INVEPT and
        re-enters. Otherwise one INVEPT.
        """
        m = self.m
        if self.vept.scheme != "kvm" or m.state != L2 or m.l2_halted:
            self.vept.invept()
            return
        self.vept.invept()
        m.l1_exit(ExitReason.MSR_WRITE, "msr_write", cause="tlb-flush-ipi")
        m.l0_interrupt_l1()
        self.vept.invept()
        m.l1_vmresume()

    def l2_fault(self, l2_page: int) -> None:
        """The whole reflected path of an L2 page EPT12 does not map."""
        c = self.costs
        walk = 4 * c.ept12_walk_level
        self.m.l2_exit(ExitReason.EPT_VIOLATION, "ept_violation", to_l1=True, l0_extra=walk)
        self.m.stats.ept_violations_reflected += 1
        self.handle_ept_violation(l2_page)
        self.m.l1_vmresume()

    # ------------------------------------------------------------- host swap in L1
    def evict(self, l2_page: int) -> None:
        """L1 reclaim swaps out the L1 page backing ``l2_page``."""
        self._check(l2_page)
        l1_page = self.l1_page_of(l2_page)
        if l1_page is None:
            return
        with self.m.l1_background():
            self.m.l1_work(self.costs.swap_evict, "swapping")
            self.epoch.move()
            self.ept12.unmap(l2_page << self.page_shift)
            self.flush()  # present -> not present always needs one
        self._free_pages.append(l1_page)
        self.swapped.add(l2_page)
