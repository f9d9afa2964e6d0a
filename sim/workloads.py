"""Micro-workloads: one guest operation, run on a path, charged by the model.

A workload's ``build`` runs once before counting starts (control plane: L1
delegating a port to L0) and returns the operation to repeat. Paths:

``single``  a plain VM of L0 does the operation (baseline).
``l1``      nested; L1 handles L2's I/O (the classic path).
``l0``      nested; L1 has delegated L2's device to L0, which serves it directly.
            Only I/O can bypass L1: for CPUID and VMCALL, ``l0`` is ``l1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .costs import CostModel
from .ept import PAGE_SHIFTS
from .guest_mmu import L2_MMUS, GuestPaging, Paging
from .l1mmu import L1Mmu, static_fits
from .machine import L1, NestedMachine
from .memory import HostMemory
from .vept import SCHEMES, VirtualEpt
from .vmx import ExitReason

PATHS = ("single", "l1", "l0")
#: The guest-paging micro workloads (their option: ``l2_mmu``).
PAGING_WORKLOADS = ("guest-pf", "pte-write", "cr3-load", "invlpg", "tlb-flush-all", "timer-tick")

#: The legacy virtio-pci notify register of L2's NIC: BAR0 (I/O) + 0x10, with
#: BAR0 where QEMU usually places the first virtio device's I/O BAR.
VIRTIO_NOTIFY_PORT = 0xC050


#: One operation of a workload. A run (``Workload.once``) returns the units it
#: performed (None: one); a repeated operation is one unit, whatever it returns
#: (a replayed one returns its record).
Op = Callable[[], Any]
Builder = Callable[[NestedMachine, str, dict[str, Any]], Op]


def _reflectable(m: NestedMachine, reason: ExitReason, handler: str, **kw: Any) -> Op:
    """L2's exit, and L1's VMRESUME if it was reflected: one replayed operation."""
    key = (reason, handler, tuple(sorted(kw.items())))

    def operation() -> None:
        if m.l2_exit(reason, handler, **kw) == L1:
            m.l1_vmresume()

    return m.replayer(key, operation)


def _simple(reason: ExitReason, handler: str) -> Builder:
    def build(m: NestedMachine, path: str, opts: dict[str, Any]) -> Op:
        return _reflectable(m, reason, handler)

    return build


def _port_io(handler: str) -> Builder:
    def build(m: NestedMachine, path: str, opts: dict[str, Any]) -> Op:
        if path == "l0":  # control plane: L1 delegates the notify port to L0
            m.l1_set_io_passthrough(frozenset({VIRTIO_NOTIFY_PORT}))
        return _reflectable(m, ExitReason.IO_INSTRUCTION, handler, port=VIRTIO_NOTIFY_PORT)

    return build


def mmio_kick_exit(m: NestedMachine, to_l1: bool) -> int:
    """L2 writes an MMIO notify register; returns the level that handles it.

    Classic path (``to_l1``): L1 marked the page misconfigured in EPT12; L0
    never installs that marker in EPT02, so the write is an EPT violation;
    L0's nested walk of EPT12 finds the reserved bits and injects an EPT
    misconfiguration into L1 (nested_ept_inject_page_fault), which decodes the
    instruction to skip it. Otherwise the page is L0's own: a single level
    VM's MMIO (an EPT misconfiguration on L0's fast-MMIO bus), or the direct
    path's delegated notify page, which needs an L0 change
    (``L0_CHANGES["fast-mmio-in-guest-mode"]``): Linux 6.1 refuses fast MMIO
    while the vCPU is in guest mode (handle_ept_misconfig).
    """
    if to_l1:
        c = m.costs
        return m.l2_exit(
            ExitReason.EPT_VIOLATION, "mmio_kick", to_l1=True,
            l0_extra=c.handlers["ept_fault"] + 4 * c.ept12_walk_level,
            reflect_as=ExitReason.EPT_MISCONFIG,
        )  # fmt: skip
    return m.l2_exit(ExitReason.EPT_MISCONFIG, "mmio_kick", to_l1=False, l0_handler="mmio_fast")


def _mmio_kick(m: NestedMachine, path: str, opts: dict[str, Any]) -> Op:
    def operation() -> None:
        if mmio_kick_exit(m, path == "l1") == L1:
            m.l1_vmresume()

    return m.replayer(("mmio-kick", path), operation)


#: Changes to today's KVM (Linux 6.1) that a modeled path assumes in L0.
L0_CHANGES: dict[str, str] = {
    "delegation": "L0 accepts DELEGATE/REVOKE hypercalls from L1 and serves L2's virtqueues "
    "through EPT12 (no such interface exists in KVM)",
    "fast-mmio-in-guest-mode": "L0 serves an MMIO kick of L2 on its fast-MMIO bus while the "
    "vCPU is in guest mode; handle_ept_misconfig refuses that in Linux 6.1 ('a nested guest "
    "cannot optimize MMIO vmexits')",
    "nested-posting": "L0's backend posts into the posted-interrupt descriptor L1 set up for "
    "L2 (vmcs12 POSTED_INTR_DESC_ADDR) and sends the nested notification vector",
}


# ---------------------------------------------------------------- memory (EPT)
#: Defaults of the memory workloads: the issue's 16 GiB L2 inside a 32 GiB L1,
#: and the slides' 4K EPT-table modifications per second.
EPT_DEFAULTS: dict[str, Any] = {
    "static_ept": False,
    "static_ept02": False,
    "swap": "l1",
    "defer_rebuild": False,
    "working_set_mib": 64,
    "rate": 4000,
    "seconds": 1.0,
    "touch_hz": 100,
    "page_size": "4k",
    "l2_mem_gib": 16,
    "l1_mem_gib": 32,
}


def ept_options(opts: dict[str, Any], costs: CostModel) -> dict[str, Any]:
    """The memory workloads' options; the scheme and L1's INVEPT habit default to the preset's."""
    o = {
        **EPT_DEFAULTS,
        "virtual_ept": costs.virtual_ept,
        "avoid_invept": costs.avoid_invept,
        **{k: v for k, v in opts.items() if v is not None},
    }
    if o["virtual_ept"] not in SCHEMES:
        raise ValueError(f"--virtual-ept must be one of {', '.join(SCHEMES)}")
    if o["page_size"] not in PAGE_SHIFTS:
        raise ValueError(f"--page-size must be one of {', '.join(PAGE_SHIFTS)}")
    if o["swap"] not in ("l1", "l0"):
        raise ValueError("--swap must be l1 or l0")
    if o["l1_mem_gib"] < o["l2_mem_gib"]:
        raise ValueError("L1 memory must be at least L2 memory")
    if not 0 < o["working_set_mib"] <= o["l2_mem_gib"] * 1024:
        raise ValueError("--working-set must be positive and fit in L2 memory")
    for k in ("rate", "seconds", "touch_hz"):
        if o[k] <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive")
    if o["static_ept"] or o["static_ept02"]:
        gib = 1 << 30
        shift = PAGE_SHIFTS[o["page_size"]]
        l2 = int(o["l2_mem_gib"] * gib)
        if not static_fits(int(o["l1_mem_gib"] * gib), l2, shift):
            need = next(g for g in range(int(o["l1_mem_gib"]), 1 << 20)
                        if static_fits(g * gib, l2, shift))  # fmt: skip
            flag = "--static-ept" if o["static_ept"] else "--static-ept02"
            raise ValueError(
                f"{flag} needs --l1-mem {need} or more to back --l2-mem {o['l2_mem_gib']} "
                f"statically (L2's pages plus L1's EPT12 tables; --l1-mem is {o['l1_mem_gib']})"
            )
    return o


def build_memory(m: NestedMachine, o: dict[str, Any]) -> tuple[VirtualEpt, L1Mmu]:
    """L1 and L2 memory, EPT01/EPT12/EPT02, in the configuration ``o``."""
    shift = PAGE_SHIFTS[o["page_size"]]
    l1 = int(o["l1_mem_gib"] * (1 << 30))
    l2 = int(o["l2_mem_gib"] * (1 << 30))
    # host memory: L1's frames plus room for L0's own tables (never all resident)
    host = HostMemory(l1 + l1 // 8 + (64 << 20))
    vept = VirtualEpt(m, host, l1, shift, o["virtual_ept"], o["defer_rebuild"])
    mmu = L1Mmu(m, vept, l2, avoid_invept=o["avoid_invept"])
    if o["static_ept"] or o["static_ept02"]:
        mmu.prebuild()
    if o["static_ept02"]:
        vept.prebuild_ept02(0, mmu.l2_pages)
    m.memory = (vept, mmu)
    return vept, mmu


def _working_set_pages(o: dict[str, Any]) -> int:
    return max(1, (int(o["working_set_mib"]) << 20) >> PAGE_SHIFTS[o["page_size"]])


def _single_level_touch(m: NestedMachine, pages: int) -> None:
    for _ in range(pages):
        m.l2_exit(ExitReason.EPT_VIOLATION, "ept_violation")


def _ept_touch(m: NestedMachine, path: str, opts: dict[str, Any]) -> Op:
    o = ept_options(opts, m.costs)
    pages = _working_set_pages(o)
    if path == "single":  # a plain VM: each first touch is one EPT violation L0 fixes
        static = o["static_ept"] or o["static_ept02"]

        def op_single() -> float:
            if not static:
                _single_level_touch(m, pages)
            return pages

        return op_single
    vept, mmu = build_memory(m, o)

    def op() -> float:
        vept.l2_touch(0, pages, mmu.l2_fault)
        return pages

    return op


def _ept_churn(m: NestedMachine, path: str, opts: dict[str, Any]) -> Op:
    """Host swap at ``rate`` EPT modifications per second while L2 sweeps its working set.

    A modification is one change of the swapping level's table: an eviction
    (present -> not present) or the swap-in that follows it when L2 touches
    the page again, so evictions run at rate/2. L2 touches its whole working
    set ``touch_hz`` times a second. With ``swap=l0`` the same evictions hit
    EPT01 in L0 instead, and L1's EPT12 never changes.
    """
    o = ept_options(opts, m.costs)
    pages = _working_set_pages(o)
    seconds = float(o["seconds"])
    evictions = round(o["rate"] * seconds / 2)
    sweeps = max(1, round(o["touch_hz"] * seconds))
    # one timeline, events in time order (an eviction first on a tie)
    events = sorted(
        [(i * seconds / max(evictions, 1), 0) for i in range(evictions)]
        + [((j + 1) * seconds / sweeps, 1) for j in range(sweeps)]
    )
    if path == "single":  # a plain VM, host swap in L0: each eviction refaults once
        c = m.costs

        def op_single() -> float:
            m.l0_work(evictions * c.swap_evict, "swapping")
            for _ in range(evictions):
                m.l2_exit(ExitReason.EPT_VIOLATION, "ept_violation", l0_extra=c.swap_in)
            return seconds

        return op_single
    vept, mmu = build_memory(m, o)
    for _ in range(2):  # warm: the working set is resident and EPT02 holds all of it
        vept.l2_touch(0, pages, mmu.l2_fault)

    def op() -> float:
        victim = 0
        for _, kind in events:
            if kind == 1:
                vept.l2_touch(0, pages, mmu.l2_fault)
                continue
            p = victim % pages
            victim += 1
            if o["swap"] == "l1":
                mmu.evict(p)
            else:
                # L0 picks a host page; its reverse map names the L1 page and
                # the EPT02 entry built from it (here read from EPT12)
                l1_page = mmu.l1_page_of(p)
                if l1_page is not None and l1_page not in vept.swapped_out:
                    vept.l0_swap_out(l1_page, p)
        return seconds

    return op


def guest_paging(m: NestedMachine, path: str, opts: dict[str, Any]) -> GuestPaging:
    """L2's paging on ``path`` with ``--l2-mmu`` (default nested EPT); on
    ``single`` the guest's own MMU mode: EPT, or shadow paging for either shadow mode."""
    mode = L2_MMUS[opts.get("l2_mmu", "nested-ept")]
    if path == "single":
        mode = Paging.SINGLE_SHADOW if mode.shadow else Paging.SINGLE
    return GuestPaging(m, mode)


def _paging(event: str) -> Builder:
    """One paging event per operation, each from the same shadow state: a
    fault or a PTE write on a leaf table in sync (the first after a CR3
    load: the write traps), a CR3 load with no unsynced leaf."""

    def build(m: NestedMachine, path: str, opts: dict[str, Any]) -> Op:
        g = guest_paging(m, path, opts)

        def op() -> None:
            g.unsync.clear()  # the state each operation starts from, not an event
            if event == "guest-pf":
                g.page_fault(0)
            elif event == "pte-write":
                g.pte_write(0)
            elif event == "cr3-load":
                g.cr3_load()
            elif event == "invlpg":
                g.invlpg()
            elif event == "tlb-flush-all":
                g.tlb_flush_all()
            else:
                g.timer_tick()

        return op

    return build


@dataclass(frozen=True)
class Workload:
    name: str
    build: Builder
    description: str
    per: str = "op"  # what per_op counts: an operation, a frame, a request, a second
    once: bool = False  # the operation is a whole run (--count does not repeat it)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("cpuid", _simple(ExitReason.CPUID, "cpuid"), "one CPUID in the guest"),
        Workload("vmcall", _simple(ExitReason.VMCALL, "vmcall"), "one no-op hypercall"),
        Workload(
            "io-kick", _port_io("io_kick"),
            "one port-I/O virtio kick, in-kernel backend (ioeventfd)",
        ),
        Workload(
            "io-user", _port_io("io_user"),
            "one port I/O handled by the hypervisor's userspace device model",
        ),
        Workload("mmio-kick", _mmio_kick, "one MMIO virtio kick (EPT misconfiguration)"),
        Workload(
            "guest-pf", _paging("guest-pf"),
            "one demand page fault in the guest, on a leaf page table in sync (--l2-mmu)",
        ),
        Workload(
            "pte-write", _paging("pte-write"),
            "one guest page-table write to a write-protected leaf table (--l2-mmu)",
        ),
        Workload(
            "cr3-load", _paging("cr3-load"), "one guest CR3 load, a process switch (--l2-mmu)"
        ),
        Workload("invlpg", _paging("invlpg"), "one guest INVLPG (--l2-mmu)"),
        Workload(
            "tlb-flush-all", _paging("tlb-flush-all"),
            "one full TLB flush in the guest: CR4.PGE cleared and set (--l2-mmu)",
        ),
        Workload(
            "timer-tick", _paging("timer-tick"),
            "one tick of the guest's timer: TSC-deadline WRMSR and the timer interrupt",
        ),
        Workload(
            "ept-touch", _ept_touch, "L2 touches its working set for the first time",
            per="page", once=True,
        ),
        Workload(
            "ept-churn", _ept_churn,
            "host swap rewrites EPT entries at --rate per second while L2 runs",
            per="second", once=True,
        ),
    )
}  # fmt: skip
