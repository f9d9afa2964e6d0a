"""A guest's own paging under each MMU configuration, run through the VMX model.

Theory of operation
-------------------
A guest kernel (L2, or a single-level guest) keeps its own page tables, and
a program running on it makes the kernel generate paging events: demand page
faults (a PTE filled on first access), page-table writes (fork write-protects
the parent's PTEs, exit and exec tear tables down), CR3 loads (a switch to
another process) and INVLPG (munmap, mprotect, a COW break), plus the
guest's timer tick. What each costs depends on who translates the guest's
addresses, :class:`Paging` (REFERENCE section 13 traces the KVM code):

``native``, ``single``, ``l2-nested-ept``
    The hardware walks the guest's tables (with EPT, or EPT02 that L0 builds
    from L1's EPT12): no paging event exits. First touches of guest-physical
    memory are EPT violations (:mod:`sim.vept` models them), not events here.
``single-shadow``
    L0's shadow MMU: L0 intercepts #PF, CR3 loads and INVLPG and
    write-protects the guest's page tables.
``l2-shadow-on-ept``
    L1 runs L2 with shadow paging (L1 without EPT for L2, L0 with EPT for
    L1): L1 sets #PF in vmcs12's exception bitmap and CR3-load and INVLPG
    exiting, so each event is an L2 exit that L0 reflects to L1, whose
    handler (with its VMREAD/VMWRITEs, trapping or not per preset) runs
    before its VMRESUME; L1's TLB flushes are INVVPIDs, exits of L1.
``l2-shadow-on-shadow``
    As shadow-on-EPT, and L0 shadows L1 too: the tables L1 keeps for L2 are,
    to L0, guest page tables, so each shadow entry L1 writes traps to L0,
    which emulates the write (``kvm_mmu_pte_write``), and a VMRESUME with a
    new GUEST_CR3 makes L0 switch its own shadow root.

The state this module owns is the shadow MMU's view of the guest's leaf page
tables: a leaf that the guest writes is unsynced on the first write
(``mmu_try_to_unsync_pages``: that write traps once, the page becomes
writable), and further writes to it do not trap until the next CR3 load,
which resyncs each unsynced leaf (``FNAME(sync_page)``) and write-protects it
again. Upper-level tables are never unsynced: each write to one is emulated.

An event is a method; each crossing it makes goes through the machine
(:class:`~sim.nested.NestedVmx`: routing, reflection, VMCS accesses, handler
cycles), as one replayed operation keyed by the event and the shadow state
it depends on. ``events`` counts them by class, ``traps`` the ones that left
the guest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from enum import Enum
from typing import Any

from .machine import L1, NestedMachine
from .routing import CR4_PGE, PF_VECTOR
from .vmx import ExitReason, Msr

R = ExitReason

LOCAL_TIMER_VECTOR = 0xEC  # Linux's LOCAL_TIMER_VECTOR
CR3 = 3


class Paging(Enum):
    """Who translates the guest's addresses (the estimate's rows, in order)."""

    NATIVE = "native"
    SINGLE = "single"
    SINGLE_SHADOW = "single-shadow"
    NESTED_EPT = "l2-nested-ept"
    SHADOW_ON_EPT = "l2-shadow-on-ept"
    SHADOW_ON_SHADOW = "l2-shadow-on-shadow"

    @property
    def virtual(self) -> bool:
        return self is not Paging.NATIVE

    @property
    def nested(self) -> bool:
        return self in (Paging.NESTED_EPT, Paging.SHADOW_ON_EPT, Paging.SHADOW_ON_SHADOW)

    @property
    def shadow(self) -> bool:
        """A shadow MMU (L0's or L1's) sees the guest's paging events."""
        return self in (Paging.SINGLE_SHADOW, Paging.SHADOW_ON_EPT, Paging.SHADOW_ON_SHADOW)

    @property
    def l0_shadows_l1(self) -> bool:
        return self is Paging.SHADOW_ON_SHADOW


#: ``--l2-mmu`` names: KVM's three configurations for L2's paging.
L2_MMUS: dict[str, Paging] = {
    "nested-ept": Paging.NESTED_EPT,
    "shadow-on-ept": Paging.SHADOW_ON_EPT,
    "shadow-on-shadow": Paging.SHADOW_ON_SHADOW,
}


class GuestPaging:
    """The guest's paging events on machine ``m`` under ``paging`` (module docstring)."""

    def __init__(self, m: NestedMachine, paging: Paging) -> None:
        if paging.nested != m.cfg.nested or not paging.virtual:
            raise ValueError(
                f"{paging.value} needs a {'nested' if paging.nested else 'single-level'} machine"
            )
        self.m = m
        self.paging = paging
        self.unsync: set[int] = set()  # leaf tables written since the last CR3 load
        self.events: Counter[str] = Counter()
        self.traps: Counter[str] = Counter()
        if paging.nested and paging.shadow:
            m.l1_intercepts_guest_paging()

    # ------------------------------------------------------------- helpers
    def _run(self, key: tuple[object, ...], operation: Callable[[], None]) -> None:
        self.m.replay((self.paging, *key), operation)

    def _exit(self, reason: ExitReason, handler: str, **kw: Any) -> int:
        """One guest exit; the level that handled it (L1: resume is the caller's)."""
        self.traps[handler] += 1
        return self.m.l2_exit(reason, handler, **kw)

    def _shadow_writes(self, n: int, why: str) -> None:
        """L1 writes ``n`` entries of the shadow tables it keeps for L2: with
        L0 shadowing L1 each is a write-protection fault L0 emulates."""
        if self.paging.l0_shadows_l1 and n:
            self.m.l1_exit(R.EXCEPTION_NMI, "pte_emulate", cause=why, count=n)

    def _shadow_work(self, cycles: float, what: str) -> None:
        """Shadow-MMU work outside an exit's handler: in L1's exit path
        (with its cache pollution) or in L0's."""
        m = self.m
        if self.paging.nested:
            m.l1_work(cycles * m.costs.l1_pollution, what)
        else:
            m.l0_work(cycles, what)

    def _l1_flushes_tlb(self) -> None:
        """Nested, L1 flushes L2's translations with INVVPID (an exit of L1)."""
        if self.paging.nested:
            self.m.l1_exit(R.INVVPID, "invvpid", cause="l1-tlb-flush")

    def _l1_takes_its_timer(self) -> None:
        """L0's timer for L1 fires while L2 runs (a reflected external
        interrupt) and L1 takes it: an EOI exit without APICv."""
        m = self.m
        m.l0_interrupt_l1()
        if not m.cfg.apicv:
            m.l1_exit(R.MSR_WRITE, "eoi", cause="l1-timer")

    def _resume(self, level: int) -> None:
        if level == L1:
            self.m.l1_vmresume()

    # ------------------------------------------------------------- events
    def page_fault(self, leaf: int) -> None:
        """A demand fault on a not-present PTE of leaf table ``leaf``: with a
        shadow MMU, the #PF is injected back, the guest writes its PTE (a
        trap unless the leaf is unsynced) and retries, and the retry fills
        the shadow entry: at least 2 handled events (REFERENCE 13)."""
        self.events["guest_pf"] += 1
        if not self.paging.shadow:
            return

        def inject() -> None:
            self._resume(self._exit(R.EXCEPTION_NMI, "pf_inject", vector=PF_VECTOR))

        def fill() -> None:
            level = self._exit(R.EXCEPTION_NMI, "pf_fill", vector=PF_VECTOR)
            self._shadow_writes(1, "l1-shadow-fill")
            self._resume(level)

        self._run(("pf_inject",), inject)
        self._pte_write(leaf, upper=False)
        self._run(("pf_fill",), fill)

    def pte_write(self, leaf: int, *, upper: bool = False) -> None:
        """The guest writes one entry of page table ``leaf`` (an upper-level
        table with ``upper``), outside a fault (fork, exit, exec, mprotect)."""
        self.events["pte_write"] += 1
        self._pte_write(leaf, upper=upper)

    def _pte_write(self, leaf: int, *, upper: bool) -> None:
        if not self.paging.shadow or (not upper and leaf in self.unsync):
            return
        if upper:

            def emulate() -> None:
                level = self._exit(R.EXCEPTION_NMI, "pte_emulate", vector=PF_VECTOR)
                self._shadow_writes(1, "l1-shadow-update")
                self._resume(level)

            self._run(("pte_emulate",), emulate)
            return

        def unsync() -> None:
            level = self._exit(R.EXCEPTION_NMI, "pte_unsync", vector=PF_VECTOR)
            self._shadow_writes(1, "l1-shadow-unsync")
            self._resume(level)

        self._run(("pte_unsync",), unsync)
        self.unsync.add(leaf)

    def cr3_load(self) -> None:
        """A switch to another process: the shadow MMU resyncs every unsynced
        leaf (``FNAME(sync_page)``) and flushes the TLB (L1: INVVPID)."""
        self.events["cr3_load"] += 1
        if not self.paging.shadow:
            return
        n = len(self.unsync)
        m = self.m

        def load() -> None:
            level = self._exit(R.CR_ACCESS, "cr3_load", cr=CR3)
            if n:
                self._shadow_work(n * m.costs.handlers["sync_page"], "shadow resync")
                self._shadow_writes(n, "l1-shadow-resync")
            self._l1_flushes_tlb()
            if self.paging.l0_shadows_l1:  # a new GUEST_CR3 in vmcs12: L0's own root switch
                m.l0_work(m.costs.handlers["cr3_load"], "shadow root switch")
            self._resume(level)

        self._run(("cr3_load", n), load)
        self.unsync.clear()

    def invlpg(self) -> None:
        """The guest flushes one address (INVLPG): the shadow entry is zapped
        and, nested, L1 flushes it with INVVPID."""
        self.events["invlpg"] += 1
        if not self.paging.shadow:
            return

        def flush() -> None:
            level = self._exit(R.INVLPG, "invlpg")
            self._shadow_writes(1, "l1-shadow-zap")
            self._l1_flushes_tlb()
            self._resume(level)

        self._run(("invlpg",), flush)

    def tlb_flush_all(self) -> None:
        """A flush of every TLB entry, global ones included (``__flush_tlb_all``
        on a kernel-mapping change): CR4.PGE cleared and set again. With EPT
        PGE is the guest's own bit (no exit); a shadow MMU intercepts both
        writes (``handle_cr`` -> ``kvm_set_cr4``: the shadow's global
        entries are dropped, ``kvm_mmu_reset_context``) and nested L1
        flushes with INVVPID."""
        self.events["tlb_flush_all"] += 1
        if not self.paging.shadow:
            return

        def flush() -> None:
            for _ in range(2):  # PGE off, PGE on
                level = self._exit(R.CR_ACCESS, "cr4_write", cr=4, bits=CR4_PGE)
                self._l1_flushes_tlb()
                self._resume(level)

        self._run(("tlb_flush_all",), flush)
        self.unsync.clear()

    def timer_tick(self) -> None:
        """One tick of the guest's timer: its TSC-deadline WRMSR and the
        timer interrupt. Nested, the WRMSR is L1's (it emulates L2's LAPIC
        timer and arms its own with a WRMSR of its own), and the interrupt
        reaches L2 through L1: L0's timer for L1 fires while L2 runs (a
        reflected external interrupt), L1 takes it (an EOI exit without
        APICv), injects L2's and resumes; L2's EOI as the preset's APIC has it."""
        self.events["timer_tick"] += 1
        self._run(("timer_tick",), self.tick_operation)

    def l1_timer_tick(self) -> None:
        """One tick of L1's own timer while its vCPU runs L2 (a vCPU in guest
        mode is busy, so NOHZ does not stop it): L0's timer for L1 fires, L2
        exits and L0 reflects the external interrupt, L1 takes its tick (an
        EOI exit without APICv), re-arms its TSC deadline (an exit) and resumes L2."""
        if not self.paging.nested:
            return
        self.events["l1_timer_tick"] += 1
        self._run(("l1_timer_tick",), self.l1_tick_operation)

    def l1_tick_operation(self) -> None:
        """:meth:`l1_timer_tick`'s machine calls, not replayed."""
        self._l1_takes_its_timer()
        self.m.l1_exit(R.MSR_WRITE, "tsc_deadline", cause="l1-timer")
        self.m.l1_vmresume()

    def tick_operation(self) -> None:
        """The machine calls of one tick of a running guest, not replayed (for
        a caller that replays it itself, as netperf's model does)."""
        m = self.m
        if self._exit(R.MSR_WRITE, "tsc_deadline", msr=Msr.IA32_TSC_DEADLINE) == L1:
            m.l1_exit(R.MSR_WRITE, "tsc_deadline", cause="l1-timer")
            m.l1_vmresume()
            self._l1_takes_its_timer()
            m.l1_interrupt_l2(LOCAL_TIMER_VECTOR)
            m.l1_vmresume()
        else:
            m.l0_interrupt_l2(LOCAL_TIMER_VECTOR)
        m.l2_eoi()
