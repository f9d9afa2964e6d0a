"""L0's virtual EPT for L1: EPT01, EPT02, and the two ways of keeping EPT02 right.

Theory of operation
-------------------
L0 runs L1 on EPT01 (L1 frame -> host frame) and L2 on EPT02, which must
always be the composition of L1's EPT12 (L2 page -> L1 frame, stored as bytes
in L1's memory) and EPT01. L1 changes EPT12 with ordinary memory writes and
tells the hardware with INVEPT. The slides compare two ways for L0 to follow:

``shadow`` (shadow-like)
    L0 write-protects every EPT12 table page it has shadowed. Each L1 write
    to one is an EPT-violation exit of L1; L0 emulates the write and fixes the
    EPT02 entry at once, under the global MMU lock (counted, since that lock
    is what hurts SMP). L1's INVEPT then has nothing left to do.
``vtlb`` (vTLB-like, KVM's choice)
    No write protection. EPT02 is a cache filled on L2's EPT violations by
    walking EPT12 and EPT01; when EPT12 has no mapping, L0 injects the EPT
    violation into L1 (a reflected exit). L1's INVEPT traps and L0 drops all
    of EPT02 for the context (``nested.c``: INVEPT frees the shadow roots;
    there is no per-address invalidation), to be rebuilt entry by entry.

``kvm`` (KVM's own nested MMU, Linux 5.x/6.x ``mmu.c``, ``paging_tmpl.h``)
    A hybrid. Upper-level EPT12 pages L0 has shadowed are write-tracked (an
    L1 write exits and L0 updates its shadow at once). A shadowed leaf page
    is write-protected until L1 first writes it; that write exits once, the
    page goes *unsync* and becomes writable, and later writes do not exit.
    On INVEPT L0 frees the roots (cheap) and, when the root is loaded again,
    resyncs only the unsync leaves (``kvm_mmu_sync_roots``): it rereads the
    EPT12 entry behind each present EPT02 entry of those pages and drops the
    ones that changed, then protects the page again. An INVEPT costs in
    proportion to what L1 changed, not to L2's working set. Every L2 fault
    also prefetches up to 8 neighbouring entries (``pte_prefetch``).

``defer_rebuild`` is our reading of the slides' "L0 may defer part of the
shadow EPT rebuild effort": the zapped entries are remembered as stale, and
the fault that brings the first one back rebuilds up to 7 more stale entries
of the same leaf table from the current EPT12 (KVM's PTE prefetch depth is
8), so a rebuild costs one exit per 8 entries instead of one per entry. It is
safe because every rebuilt entry is composed from EPT12 as it is now.

:meth:`VirtualEpt.translate` is the L2 GPA -> host service the direct
backend uses; its cache is dropped exactly when L1's change becomes visible
to L0 (a trapped EPT12 write under ``shadow``, INVEPT under ``vtlb``) and when
L0 itself changes EPT01 (host swap in L0).

Cost: every L2 EPT violation L0 fixes is a hardware exit plus the
``ept_fault`` handler, the EPT12 entries it reads, and the EPT02 entry it
builds; sweeps charge these in bulk per leaf table, with exactly the counts
the per-entry path would give.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from .ept import (
    ADDR_MASK,
    EPT_LARGE,
    EPT_MT_WB,
    EPT_RWX,
    PAGE_2M,
    QW,
    EptTable,
    entry_pa,
    is_misconfig,
    is_present,
    leaf_entry,
)
from .machine import NestedMachine
from .memory import PAGE_SHIFT, Epoch, HostMemory, L1Memory, MemoryFault
from .refs import weak_method
from .vmx import ExitReason

MMU = "MMU"  # the work row of L0's EPT upkeep (EPT12 walks, EPT01/EPT02 builds, zaps, locks)
SCHEMES = ("kvm", "vtlb", "shadow")
PREFETCH = 8  # KVM: PTE_PREFETCH_NUM


class VirtualEpt:
    """L0's nested-EPT state for one L1 and its L2 (see the module docstring)."""

    def __init__(
        self,
        machine: NestedMachine,
        host: HostMemory,
        l1_size: int,
        page_shift: int,
        scheme: str = "vtlb",
        defer_rebuild: bool = False,
    ) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"virtual EPT scheme must be one of {', '.join(SCHEMES)}")
        self.m = machine
        self.costs = machine.costs
        self.host = host
        self.scheme = scheme
        self.defer_rebuild = defer_rebuild
        self.page_shift = page_shift
        self.frames_per_page = 1 << (page_shift - PAGE_SHIFT)
        self.ept01 = EptTable(host, host.alloc_frame, host.free_frame, page_shift, "EPT01")
        self.ept02 = EptTable(host, host.alloc_frame, host.free_frame, page_shift, "EPT02")
        self.l1mem = L1Memory(host, l1_size, weak_method(self.resolve_l1_frame))
        # L0's index of its own EPT01: L1 region (512 pages) -> EPT01 leaf table frame
        self._ept01_leaf: dict[int, int] = {}
        self._tcache: dict[int, int] = {}  # translation service: L2 page -> host frame
        self._wp: dict[int, int] = {}  # write-protected EPT12 table frame -> region base
        # kvm: unsync EPT12 leaf frame -> (region base, what EPT02 was built
        # from: its entries when it went unsync, updated for entries built since)
        self._unsync: dict[int, tuple[int, list[int]]] = {}
        self._upper: set[int] = set()  # kvm: write-tracked upper-level EPT12 frames
        # deferred rebuild: an L2 page is stale when EPT02 built it before the
        # latest INVEPT zap (generation counter: an INVEPT is O(1))
        self._gen = 0
        self._built_gen: dict[int, int] = {}
        self.ept12: EptTable | None = None  # attached by L1's MMU
        self.swapped_out: set[int] = set()  # L1 pages L0 evicted (host swap in L0)
        # moves whenever an EPT02 or EPT01 mapping is removed or changed, so that
        # anyone caching a translation (L2's own view, the datapath) can drop it
        self.epoch = Epoch()

    # ------------------------------------------------------------- EPT01
    def resolve_l1_frame(self, l1_frame: int) -> int:
        """L1 frame -> host frame through EPT01; L0 backs L1 memory on first use."""
        shift = self.page_shift - PAGE_SHIFT
        page = l1_frame >> shift
        table = self._ept01_leaf.get(page >> 9)
        if table is not None:
            e = self.host.read_u64(table, page & (QW - 1))
            if e & EPT_RWX:
                return (entry_pa(e) >> PAGE_SHIFT) + (l1_frame & ((1 << shift) - 1))
        return self._ept01_fill(page) + (l1_frame & ((1 << shift) - 1))

    def _ept01_fill(self, l1_page: int) -> int:
        """Back an L1 page; returns its first host frame.

        The first use of an L1 region backs the whole region (512 pages) in one
        step, as L0 does when it backs guest memory with huge pages; a page L0
        swapped out comes back alone.
        """
        n = self.frames_per_page
        region = l1_page >> 9
        table = self._ept01_leaf.get(region)
        if table is None:
            base = self.host.alloc_frames(QW * n, n)
            shift = self.page_shift
            entries = [leaf_entry((base + i * n) << PAGE_SHIFT, EPT_RWX, shift) for i in range(QW)]
            gpa = region << (shift + 9)
            self.ept01.write_leaves(gpa, entries)
            self._ept01_leaf[region] = self.ept01.leaf_table(gpa)[0]
            self.m.stats.ept01_entries_built += QW
            return base + (l1_page & (QW - 1)) * n
        base = self.host.alloc_frame() if n == 1 else self.host.alloc_frames(n, n)
        self.ept01.map(l1_page << self.page_shift, base << PAGE_SHIFT)
        self.m.stats.ept01_entries_built += 1
        if l1_page in self.swapped_out:  # host swap in L0: L0 brings the page back
            self.swapped_out.discard(l1_page)
            self.m.l0_work(self.costs.swap_in + self.costs.lock, "swapping")
            self.m.stats.lock_acquisitions += 1
        return base

    def l0_swap_out(self, l1_page: int, l2_page: int) -> None:
        """Host swap kept in L0: L0 evicts the L1 page backing ``l2_page``.

        L0 clears its own EPT01 entry and, through its reverse map, the EPT02
        entry built from it; L1 and EPT12 never hear of it.
        """
        c = self.costs
        gpa1 = l1_page << self.page_shift
        old = self.ept01.unmap(gpa1)
        if is_present(old):
            n = self.frames_per_page
            base = entry_pa(old) >> PAGE_SHIFT
            for f in range(base, base + n):
                self.host.frames.pop(f, None)  # the data went to swap
        self.swapped_out.add(l1_page)
        self.epoch.move()
        s = self.m.stats
        s.lock_acquisitions += 1
        self.m.l0_work(c.swap_evict + c.lock, "swapping")
        if is_present(self.ept02.unmap(l2_page << self.page_shift)):
            s.ept02_entries_zapped += 1
            self.m.l0_work(c.ept02_zap, MMU)
        self._tcache.pop(l2_page, None)

    # ------------------------------------------------------------- EPT12 hooks
    def attach_ept12(self, ept12: EptTable) -> None:
        self.ept12 = ept12
        if self.scheme in ("shadow", "kvm"):
            ept12.trap = weakref.proxy(self)  # the table is ours: no cycle back (sim.refs)

    def protected(self, frame: int) -> bool:
        """Trap protocol: is this EPT12 table page write-protected by L0?"""
        return frame in self._wp or frame in self._upper

    def write(self, frame: int, index: int, old: int, new: int) -> None:
        """Trap protocol: L1 wrote an entry of a write-protected EPT12 page.

        An EPT-violation exit of L1 (write to a read-only page). ``shadow``:
        L0 emulates the write and brings EPT02 in line at once. ``kvm``: an
        upper-level page is emulated the same way; a leaf page goes unsync.
        """
        m = self.m
        c = self.costs
        if self.scheme == "kvm":
            s = m.stats
            s.ept12_writes_trapped += 1
            if frame in self._upper:
                m.l1_exit(ExitReason.EPT_VIOLATION, "ept12_write", cause="ept12-write-track")
                if is_present(old) and old != new:  # a table unlinked or replaced
                    self._zap_all()
                return
            m.l1_exit(ExitReason.EPT_VIOLATION, "unsync", cause="ept12-unsync")
            assert self.ept12 is not None
            # what EPT02 was built from: the page as it was while protected
            entries = list(self.ept12.store.read_page_qwords(frame))
            self._unsync[frame] = (self._wp.pop(frame), entries)
            s.lock_acquisitions += 1
            self.m.l0_work(c.lock, MMU)
            return
        m.l1_exit(ExitReason.EPT_VIOLATION, "ept12_write", cause="ept12-write-protect")
        s = m.stats
        s.ept12_writes_trapped += 1
        s.lock_acquisitions += 1
        self.m.l0_work(c.lock, MMU)
        region = self._wp[frame]
        self.epoch.move()
        l2_page = (region >> self.page_shift) + index
        self._tcache.pop(l2_page, None)
        gpa2 = l2_page << self.page_shift
        if is_present(new) and not is_misconfig(new):
            host = self.resolve_l1_frame(entry_pa(new) >> PAGE_SHIFT)
            self.ept02.map(gpa2, host << PAGE_SHIFT, new & EPT_RWX)
            s.ept02_entries_built += 1
            self.m.l0_work(c.ept02_build, MMU)
        elif is_present(self.ept02.unmap(gpa2)):
            s.ept02_entries_zapped += 1
            self.m.l0_work(c.ept02_zap, MMU)

    def _shadow_region(self, gpa: int) -> int:
        """Walk EPT12 to the leaf table covering ``gpa`` (L0 reads L1 memory);
        under ``shadow`` write-protect it. Returns the table frame (0: none)."""
        assert self.ept12 is not None
        region = gpa & ~((1 << (self.page_shift + 9)) - 1)
        frame, reads = self.ept12.leaf_table(region)
        self.m.l0_work(reads * self.costs.ept12_walk_level, MMU)
        if frame and self.scheme != "vtlb" and frame not in self._wp:
            if self.scheme == "kvm":
                if frame in self._unsync:
                    return frame
                self._upper.update(self._upper_frames(region))
            self._wp[frame] = region
        return frame

    def _upper_frames(self, gpa: int) -> list[int]:
        """The EPT12 table frames above the leaf table covering ``gpa``."""
        assert self.ept12 is not None
        t = self.ept12
        frame = t.root
        out = [frame]
        for level in range(4, t.leaf_level + 1, -1):
            e = t.store.read_u64(frame, t.index(gpa, level))
            if not is_present(e):
                break
            frame = entry_pa(e) >> PAGE_SHIFT
            out.append(frame)
        return out

    def _zap_all(self) -> None:
        s = self.m.stats
        zapped = self.ept02.drop_all()
        s.ept02_entries_zapped += zapped
        self.m.l0_work(zapped * self.costs.ept02_zap, MMU)
        self._gen += 1
        self.epoch.move()
        self._tcache.clear()

    # ------------------------------------------------------------- INVEPT
    def invept(self) -> None:
        """L1 executed INVEPT (single context); L0 has trapped it (an L1 exit)."""
        m = self.m
        c = self.costs
        m.l1_exit(ExitReason.INVEPT, "invept", cause="invept")
        s = m.stats
        s.invept_emulated += 1
        if self.scheme == "shadow":
            return  # EPT02 already follows every EPT12 write
        s.lock_acquisitions += 1
        self.m.l0_work(c.lock, MMU)
        if self.scheme == "kvm":
            self._resync()
            return
        self._zap_all()

    def _resync(self) -> None:
        """kvm: the roots are freed; on reload only the unsync leaves are resynced.

        For each present EPT02 entry of an unsync leaf L0 rereads the EPT12
        entry (FNAME(sync_page)) and drops the entry if L1 changed it; then
        the page is write-protected again.
        """
        assert self.ept12 is not None
        s = self.m.stats
        c = self.costs
        shift = self.page_shift
        for frame, (region, synced) in self._unsync.items():
            e02 = self.ept02.read_leaves(region)
            if e02 is None:
                self._wp[frame] = region
                continue
            e12 = self.ept12.store.read_page_qwords(frame)
            new = list(e02)
            first = region >> shift
            present = 0
            for i, e in enumerate(e02):
                if not e & EPT_RWX:
                    continue
                present += 1  # each present entry's EPT12 entry is reread
                if e12[i] != synced[i]:  # L1 changed it since the page went unsync
                    new[i] = 0
                    s.ept02_entries_zapped += 1
                    self.m.l0_work(c.ept02_zap, MMU)
                    self._tcache.pop(first + i, None)
            self.m.l0_work(present * c.ept12_walk_level, MMU)
            if new != list(e02):
                self.ept02.write_leaves(region, new)
            s.ept12_leaves_resynced += 1
            self._wp[frame] = region
        self._unsync.clear()
        self.epoch.move()
        self._tcache.clear()

    # ------------------------------------------------------------- L2 faults
    def l2_touch(self, first: int, count: int, on_missing: Callable[[int], None]) -> None:
        """L2 touches pages ``first .. first+count-1`` (in EPT page units), in order.

        Pages EPT02 maps cost nothing. The rest are EPT violations that L0
        fixes from EPT12 and EPT01 (charged in bulk per leaf table), except
        where EPT12 has no mapping: then ``on_missing(page)`` runs the
        reflected exit through L1 and L2 touches the page again.
        """
        assert self.ept12 is not None
        page = first
        end = first + count
        while page < end:
            region_first = page & ~(QW - 1)
            stop = min(end, region_first + QW)
            page = self._touch_region(region_first, page, stop, on_missing)

    def _touch_region(
        self, region_first: int, page: int, stop: int, on_missing: Callable[[int], None]
    ) -> int:
        assert self.ept12 is not None
        c = self.costs
        m = self.m
        s = m.stats
        shift = self.page_shift
        region = region_first << shift
        e02 = self.ept02.read_leaves(region)
        if e02 is not None:
            lo = page - region_first
            hi = stop - region_first
            if all(e & EPT_RWX for e in e02[lo:hi]):
                return stop
        e12_frame = self._shadow_region(region)
        e12 = self.ept12.store.read_page_qwords(e12_frame) if e12_frame else (0,) * QW
        new = list(e02) if e02 is not None else [0] * QW
        faults = 0
        built = 0
        missing: int | None = None
        i = page - region_first
        defer = self.defer_rebuild
        prefetch = self.scheme == "kvm"
        swapped = self.swapped_out
        unsync = self._unsync.get(e12_frame) if prefetch else None
        synced = unsync[1] if unsync is not None else None
        gen = self._gen
        built_gen = self._built_gen
        while i < stop - region_first:
            if new[i] & EPT_RWX:
                i += 1
                continue
            x = e12[i]
            if not is_present(x) or is_misconfig(x):
                missing = region_first + i
                break
            faults += 1
            group = [i]
            if prefetch:  # kvm: pte_prefetch, the aligned block of 8 around the fault
                # (an atomic lookup: a page L0 swapped out is not brought back)
                for j in range(i & ~(PREFETCH - 1), (i & ~(PREFETCH - 1)) + PREFETCH):
                    x = e12[j]
                    if (
                        j != i
                        and not new[j] & EPT_RWX
                        and is_present(x)
                        and not is_misconfig(x)
                        and entry_pa(x) >> shift not in swapped
                    ):
                        group.append(j)
            elif defer and built_gen.get(region_first + i, gen) < gen:
                j = i + 1
                while len(group) < PREFETCH and j < QW:
                    if (
                        not new[j] & EPT_RWX
                        and built_gen.get(region_first + j, gen) < gen
                        and is_present(e12[j])
                        and not is_misconfig(e12[j])
                    ):
                        group.append(j)
                    j += 1
            if synced is not None:
                for k in group:
                    synced[k] = e12[k]
            for k in group:
                xk = e12[k]
                host = self.resolve_l1_frame(entry_pa(xk) >> PAGE_SHIFT)
                new[k] = leaf_entry(host << PAGE_SHIFT, xk & EPT_RWX, shift)
                if defer:
                    built_gen[region_first + k] = gen
            built += len(group)
            i += 1
        if faults:
            self.ept02.write_leaves(region, new)
            per_fault = c.hw_exit + c.handlers["ept_fault"] + c.lock + 4 * c.ept12_walk_level
            s.l2_exits += faults
            s.l0_exits += faults
            s.crossings += 2 * faults
            s.cycles_switch += faults * c.hw_exit
            s.cycles_l0 += faults * (per_fault - c.hw_exit) + built * c.ept02_build
            npf = m.exit_code(ExitReason.EPT_VIOLATION)  # SVM_EXIT_NPF on SVM
            s.exit(2, npf, faults * per_fault + built * c.ept02_build, faults)
            s.ept_violations_l0 += faults
            s.ept02_entries_built += built
            s.lock_acquisitions += faults
        if missing is None:
            return stop
        on_missing(missing)
        return missing  # L2 touches the page again, now that L1 mapped it

    def prebuild_ept02(self, first: int, count: int) -> None:
        """L0 builds EPT02 for a range up front (static EPT at L0's level too)."""
        assert self.ept12 is not None
        shift = self.page_shift
        large = EPT_LARGE if shift == PAGE_2M else 0
        page = first
        end = first + count
        e01: tuple[int, ...] = ()
        e01_region = -1
        while page < end:
            region_first = page & ~(QW - 1)
            e12_frame = self._shadow_region(region_first << shift)
            e12 = self.ept12.store.read_page_qwords(e12_frame) if e12_frame else (0,) * QW
            new = [0] * QW
            for i, x in enumerate(e12):
                if not x & EPT_RWX or is_misconfig(x):
                    continue
                l1_page = entry_pa(x) >> shift
                if l1_page >> 9 != e01_region:
                    self.resolve_l1_frame(l1_page << (shift - PAGE_SHIFT))  # backs the region
                    e01_region = l1_page >> 9
                    e01 = self.host.read_page_qwords(self._ept01_leaf[e01_region])
                h = e01[l1_page & (QW - 1)]
                if not h & EPT_RWX:  # a page L0 swapped out: back it alone
                    self.resolve_l1_frame(l1_page << (shift - PAGE_SHIFT))
                    e01 = self.host.read_page_qwords(self._ept01_leaf[e01_region])
                    h = e01[l1_page & (QW - 1)]
                new[i] = (h & ADDR_MASK) | (x & h & EPT_RWX) | EPT_MT_WB | large
            self.ept02.write_leaves(region_first << shift, new)
            page = region_first + QW

    # ------------------------------------------------------------- translation
    def translate(self, l2_gpa: int) -> int:
        """L2 GPA -> host address, for L0's direct backend. Raises MemoryFault.

        A miss walks EPT12 (in L1 memory) and EPT01; the result is cached until
        L1's next visible EPT12 change (see the module docstring).
        """
        assert self.ept12 is not None
        shift = self.page_shift
        page = l2_gpa >> shift
        frame = self._tcache.get(page)
        if frame is None:
            e, reads = self.ept12.walk(l2_gpa)
            self.m.l0_work(reads * self.costs.ept12_walk_level, MMU)
            if not is_present(e) or is_misconfig(e):
                raise MemoryFault(f"L2 GPA {l2_gpa:#x} not mapped by EPT12")
            if self.scheme == "shadow":
                self._shadow_region(page << shift)
            frame = self.resolve_l1_frame(entry_pa(e) >> PAGE_SHIFT)
            self._tcache[page] = frame
        return (frame << PAGE_SHIFT) + (l2_gpa & ((1 << shift) - 1))

    def check_consistent(self) -> None:
        """Assert every present EPT02 entry is EPT12 composed with EPT01 (tests)."""
        assert self.ept12 is not None
        for gpa2, e02 in self.ept02.leaves().items():
            e12, _ = self.ept12.walk(gpa2)
            assert is_present(e12), f"EPT02 maps {gpa2:#x}, EPT12 does not"
            e01, _ = self.ept01.walk(entry_pa(e12))
            assert is_present(e01), f"EPT02 maps {gpa2:#x}, EPT01 does not back it"
            assert entry_pa(e02) == entry_pa(e01), f"EPT02 {gpa2:#x} points elsewhere"
            assert e02 & EPT_RWX == e12 & e01 & EPT_RWX, f"EPT02 {gpa2:#x} permissions"
