"""kvm-unit-tests' ``x86/vmexit.c``, run on the model.

Theory of operation
-------------------
Each test of ``vmexit.c`` (kvm-x86/kvm-unit-tests) loops one operation and
prints cycles per iteration. Here a test is *data*: the exits one iteration
takes, as :class:`Step` rows, one list for a machine with APICv and one
without (what exits differs: the SDM virtualizes EOI, TPR and the x2APIC
self-IPI under virtual-interrupt delivery; an xAPIC ICR write still traps,
as an APIC-write exit). :func:`run_test` plays the rows on a
:class:`~sim.nested.NestedVmx`: at level 1 the test guest is a plain VM of
L0 (``nested=False``), at level 2 it is L1's guest, and each row is routed by
KVM's rules (:mod:`sim.routing`) and, when reflected, handled by L1's profile
(:mod:`sim.profiles`), exactly as the workloads are. The machine's cycles per
iteration are the test's figure. A test that takes no exit at all runs at
native speed, which the model does not cost, and is reported as skipped,
with the reason.

``ipi`` and ``ipi_halt`` need a second vCPU (``-smp 2``): the target is
halted; its wake-up chain (L0's, or at level 2 L1's IPI to its own halted
vCPU and L1 waking L2's) is added to the sender's exit, as if nothing
overlapped; ``ipi_halt`` adds the test's 2,000-cycle spin.

``ipi`` and ``eoi`` sub-lines (kvm-unit-tests prints them for the self-IPI
tests) are the cycles of the rows marked with that part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .arch import machine_for
from .costs import CostModel
from .machine import NestedMachine
from .nested import L1, Config
from .routing import CR0_WP
from .vmx import ExitReason, Msr
from .workloads import mmio_kick_exit

R = ExitReason
PCI_TESTDEV_IO = 0xE000  # pci-testdev's I/O BAR (an ioeventfd-backed port)
PM_TIMER_PORT = 0x608  # QEMU's ACPI PM timer (pm_tmr_blk of the FADT)
QEMU_PORT = 0x1234  # a port only QEMU's userspace answers
ELCR_PORT = 0x4D0  # the PIC's ELCR, emulated in KVM's kernel
IPI_HALT_SPIN = 2_000  # ipi_halt spins this many TSC cycles after each IPI


@dataclass(frozen=True)
class Step:
    """One exit of one iteration: reason, L1 profile, routing keys."""

    reason: ExitReason
    profile: str  # L1 profile when reflected; L0 handler key too unless ``l0``
    l0: str | None = None  # L0 handler key when different from the profile
    part: str = ""  # "ipi" or "eoi": counted in that sub-line
    mmio: bool = False  # an MMIO write (EPT misconfiguration / nested EPT violation)
    port: int = -1  # routing keys (sim.routing.route_l2_exit)
    msr: int = -1
    cr: int = -1
    bits: int = 0


def _s(
    reason: ExitReason,
    profile: str,
    part: str = "",
    l0: str | None = None,
    *,
    port: int = -1,
    msr: int = -1,
    cr: int = -1,
    bits: int = 0,
) -> Step:
    return Step(reason, profile, l0, part, port=port, msr=msr, cr=cr, bits=bits)


# the recurring rows
_APIC_WRITE_ICR = _s(R.APIC_WRITE, "apic_write", "ipi")
_XAPIC_ICR = _s(R.APIC_ACCESS, "apic_access", "ipi")
_XAPIC_ICR_CLI = _s(R.APIC_ACCESS, "apic_icr_cli", "ipi", l0="apic_access")
_XAPIC_EOI = _s(R.APIC_ACCESS, "apic_access", "eoi")
_X2_SELF = _s(R.MSR_WRITE, "x2apic_self_ipi", "ipi", l0="apic_write", msr=Msr.X2APIC_SELF_IPI)
_X2_SELF_CLI = _s(
    R.MSR_WRITE, "x2apic_self_ipi_cli", "ipi", l0="apic_write", msr=Msr.X2APIC_SELF_IPI
)
_X2_EOI = _s(R.MSR_WRITE, "eoi", "eoi", msr=Msr.X2APIC_EOI)
_WINDOW = _s(R.INTERRUPT_WINDOW, "intr_window_inject", l0="intr_window")
_HLT = _s(R.HLT, "hlt")
_HLT_INJECT = _s(R.HLT, "hlt_inject", l0="hlt")
_TPR = _s(R.TPR_BELOW_THRESHOLD, "tpr_below_inject", l0="tpr_below_threshold")
_TPR_CLI = _s(R.TPR_BELOW_THRESHOLD, "tpr_below_cli", l0="tpr_below_threshold")

Rows = tuple[Step, ...] | None  # None: no exit, native speed


@dataclass(frozen=True)
class VmexitTest:
    name: str
    apicv: Rows
    no_apicv: Rows
    why: str  # what the test executes and how KVM handles it
    skip: str = ""  # a reason the model cannot represent the test at all
    smp: bool = False  # ipi, ipi_halt: a second, halted vCPU


NATIVE = "no VM exit: runs at native speed, which the model does not cost"

TESTS: tuple[VmexitTest, ...] = (
    VmexitTest("cpuid", (_s(R.CPUID, "cpuid"),), (_s(R.CPUID, "cpuid"),),
               "CPUID leaf 0: always exits; at level 2 always L1's"),
    VmexitTest("vmcall", (_s(R.VMCALL, "vmcall"),), (_s(R.VMCALL, "vmcall"),),
               "VMCALL with RAX 0: an unknown hypercall; at level 2 always L1's"),
    VmexitTest("mov_from_cr8", None, None,
               f"CR8 read: TPR shadow, no CR8 exiting; {NATIVE}"),
    VmexitTest("mov_to_cr8", None, None,
               f"CR8 write of 0: never below the TPR threshold (or VID); {NATIVE}"),
    VmexitTest("inl_from_pmtimer", (_s(R.IO_INSTRUCTION, "io_user", port=PM_TIMER_PORT),),
               (_s(R.IO_INSTRUCTION, "io_user", port=PM_TIMER_PORT),),
               "IN from the PM timer: KVM_EXIT_IO to QEMU; at level 2 L1's QEMU"),
    VmexitTest("inl_from_qemu", (_s(R.IO_INSTRUCTION, "io_user", port=QEMU_PORT),),
               (_s(R.IO_INSTRUCTION, "io_user", port=QEMU_PORT),),
               "IN from 0x1234: KVM_EXIT_IO to QEMU; at level 2 L1's QEMU"),
    VmexitTest("inl_from_kernel", (_s(R.IO_INSTRUCTION, "io_kernel", port=ELCR_PORT),),
               (_s(R.IO_INSTRUCTION, "io_kernel", port=ELCR_PORT),),
               "IN from the ELCR: KVM's in-kernel PIC; at level 2 L1's"),
    VmexitTest("outl_to_kernel", (_s(R.IO_INSTRUCTION, "io_kernel", port=ELCR_PORT),),
               (_s(R.IO_INSTRUCTION, "io_kernel", port=ELCR_PORT),),
               "OUT to the ELCR: KVM's in-kernel PIC; at level 2 L1's"),
    VmexitTest("mov_dr", None, None,
               f"MOV to DR7: the first exits, then KVM stops DR exiting "
               f"(KVM_DEBUGREG_WONT_EXIT) until the next exit; {NATIVE}"),
    VmexitTest("tscdeadline_immed", None, None, "TSC-deadline timer",
               skip="the APIC timer and its expiry are not modeled"),
    VmexitTest("tscdeadline", None, None, "TSC-deadline timer",
               skip="the APIC timer and its expiry are not modeled"),
    VmexitTest("self_ipi_sti_nop", (_APIC_WRITE_ICR,), (_XAPIC_ICR_CLI, _WINDOW, _XAPIC_EOI),
               "xAPIC self-IPI with IF=0, STI; NOP. APICv: the ICR write traps (APIC_WRITE), "
               "delivery and EOI are virtual. Without: ICR (APIC_ACCESS, window on), "
               "INTERRUPT_WINDOW, EOI (APIC_ACCESS)"),
    VmexitTest("self_ipi_sti_hlt", (_APIC_WRITE_ICR, _HLT),
               (_XAPIC_ICR_CLI, _HLT_INJECT, _XAPIC_EOI),
               "as sti_nop, then STI; HLT: HLT exits (reflected at level 2) and finds the "
               "interrupt pending, so nothing blocks"),
    VmexitTest("self_ipi_tpr", (_APIC_WRITE_ICR,), (_XAPIC_ICR, _TPR, _XAPIC_EOI),
               "TPR raised (CR8) above the vector, self-IPI, TPR lowered. APICv: TPR "
               "virtualization delivers. Without: TPR_BELOW_THRESHOLD injects"),
    VmexitTest("self_ipi_tpr_sti_nop", (_APIC_WRITE_ICR,),
               (_XAPIC_ICR, _TPR_CLI, _WINDOW, _XAPIC_EOI),
               "as self_ipi_tpr with IF=0, then STI; NOP"),
    VmexitTest("self_ipi_tpr_sti_hlt", (_APIC_WRITE_ICR, _HLT),
               (_XAPIC_ICR, _TPR_CLI, _HLT_INJECT, _XAPIC_EOI),
               "as self_ipi_tpr with IF=0, then STI; HLT"),
    VmexitTest("x2apic_self_ipi_sti_nop", None, (_X2_SELF_CLI, _WINDOW, _X2_EOI),
               "x2APIC SELF_IPI MSR (0x83f). APICv virtualizes it and the EOI: no exit. "
               "Without: MSR_WRITE, INTERRUPT_WINDOW, MSR_WRITE (EOI)"),
    VmexitTest("x2apic_self_ipi_sti_hlt", (_HLT,), (_X2_SELF_CLI, _HLT_INJECT, _X2_EOI),
               "x2APIC self-IPI, STI; HLT: with APICv only the HLT exits"),
    VmexitTest("x2apic_self_ipi_tpr", None, (_X2_SELF, _TPR, _X2_EOI),
               "x2APIC self-IPI under a raised TPR"),
    VmexitTest("x2apic_self_ipi_tpr_sti_nop", None, (_X2_SELF, _TPR_CLI, _WINDOW, _X2_EOI),
               "x2APIC self-IPI under a raised TPR, IF=0, STI; NOP"),
    VmexitTest("x2apic_self_ipi_tpr_sti_hlt", (_HLT,), (_X2_SELF, _TPR_CLI, _HLT_INJECT, _X2_EOI),
               "x2APIC self-IPI under a raised TPR, IF=0, STI; HLT"),
    VmexitTest("ipi", (_APIC_WRITE_ICR,), (_XAPIC_ICR,),
               "IPI to a halted CPU 1 and wait: the sender's ICR exit plus the target's "
               "wake-up chain", smp=True),
    VmexitTest("ipi_halt", (_APIC_WRITE_ICR,), (_XAPIC_ICR,),
               "as ipi, then a 2,000-cycle spin while the target halts again", smp=True),
    VmexitTest("ple_round_robin", None, None, "PAUSE loop across vCPUs",
               skip="PAUSE-loop exiting depends on spin timing across vCPUs, not modeled"),
    VmexitTest("wr_kernel_gs_base", None, None,
               f"WRMSR KERNEL_GS_BASE: passed through for a 64-bit guest; {NATIVE}"),
    VmexitTest("wr_tsx_ctrl_msr", None, None, "WRMSR TSX_CTRL",
               skip="the modeled machines have no TSX_CTRL (kvm-unit-tests skips it too)"),
    VmexitTest("wr_ibrs_msr", None, None,
               f"WRMSR SPEC_CTRL: passed through after the guest's first write; {NATIVE}"),
    VmexitTest("wr_ibpb_msr", None, None,
               f"WRMSR PRED_CMD: passed through to a guest with IBPB; {NATIVE}"),
    VmexitTest("wr_tsc_adjust_msr",
               (_s(R.MSR_WRITE, "tsc_adjust_write", l0="msr_write", msr=Msr.IA32_TSC_ADJUST),),
               (_s(R.MSR_WRITE, "tsc_adjust_write", l0="msr_write", msr=Msr.IA32_TSC_ADJUST),),
               "WRMSR TSC_ADJUST: intercepted; at level 2 L1 rewrites TSC_OFFSET, which is "
               "not shadowed (a trapped VMWRITE that dirties vmcs12)"),
    VmexitTest("rd_tsc_adjust_msr",
               (_s(R.MSR_READ, "msr_read", msr=Msr.IA32_TSC_ADJUST),),
               (_s(R.MSR_READ, "msr_read", msr=Msr.IA32_TSC_ADJUST),),
               "RDMSR TSC_ADJUST: intercepted"),
    VmexitTest("toggle_cr0_wp", (_s(R.CR_ACCESS, "cr0_write", cr=0, bits=CR0_WP),) * 2,
               (_s(R.CR_ACCESS, "cr0_write", cr=0, bits=CR0_WP),) * 2,
               "two CR0 writes flipping WP: KVM owns WP before Linux 6.4 (then guest-owned "
               "with EPT: no exit)"),
    VmexitTest("toggle_cr4_pge", None, None,
               f"two CR4 writes flipping PGE: guest-owned with EPT; {NATIVE}"),
    VmexitTest("pci-mem", (Step(R.EPT_MISCONFIG, "mmio_kick", mmio=True),),
               (Step(R.EPT_MISCONFIG, "mmio_kick", mmio=True),),
               "write to pci-testdev's MMIO BAR (an ioeventfd): L0's fast-MMIO path; at "
               "level 2 an EPT violation L0 turns into an EPT misconfig for L1, which decodes "
               "to skip (EMULTYPE_SKIP)"),
    VmexitTest("pci-io", (_s(R.IO_INSTRUCTION, "io_kick", port=PCI_TESTDEV_IO),),
               (_s(R.IO_INSTRUCTION, "io_kick", port=PCI_TESTDEV_IO),),
               "write to pci-testdev's I/O BAR (an ioeventfd): kvm_fast_pio; at level 2 L1's"),
)  # fmt: skip

BY_NAME: dict[str, VmexitTest] = {t.name: t for t in TESTS}
LEVELS = (1, 2)


def rows_for(test: VmexitTest, costs: CostModel, apicv: bool) -> Rows:
    rows = test.apicv if apicv else test.no_apicv
    if test.name == "toggle_cr0_wp" and costs.cr0_wp_guest_owned:
        return None
    return rows


def _play(m: NestedMachine, step: Step) -> None:
    if step.mmio:
        level = mmio_kick_exit(m, m.cfg.nested)
    else:
        level = m.l2_exit(
            step.reason, step.profile, l0_handler=step.l0,
            port=step.port, msr=step.msr, cr=step.cr, bits=step.bits,
        )  # fmt: skip
    if level == L1:
        m.l1_vmresume()


def _remote_wakeup(config: Config) -> float:
    """The halted target vCPU of ``ipi``: woken, takes the interrupt, EOIs."""
    r = machine_for(config)
    r.l2_hlt()  # it halted earlier (nested: reflected to L1, which halts too)
    before = r.stats.cycles
    r.l0_interrupt_l2()
    r.l2_eoi()
    return r.stats.cycles - before


def run_test(
    name: str, costs: CostModel, level: int, *, apicv: bool | None = None, iterations: int = 64
) -> dict[str, Any]:
    """One test's figures: cycles per iteration and the ipi/eoi sub-lines (None: skipped)."""
    t = BY_NAME[name]
    cfg = Config.from_preset(costs, nested=level == 2, apicv=apicv)
    rows = None if t.skip else rows_for(t, costs, cfg.apicv)
    if rows is None:
        return {"cycles": None, "why": t.skip or t.why, "exits": 0}
    m = machine_for(cfg)
    parts = {"ipi": 0.0, "eoi": 0.0}
    for _ in range(iterations):
        for step in rows:
            before = m.stats.cycles
            if t.smp and level == 2 and step.part == "ipi":
                # L1 emulates the ICR write: the target, L2's vCPU 1, is halted
                # in L1, so L1 IPIs its own vCPU 1 (an x2APIC ICR write, an L1
                # exit) before resuming this L2
                if m.l2_exit(step.reason, step.profile, l0_handler=step.l0) == L1:
                    m.l1_exit(R.MSR_WRITE, "msr_write", cause="l1-ipi")
                    m.l1_vmresume()
            else:
                _play(m, step)
            if step.part:
                parts[step.part] += m.stats.cycles - before
    cycles = m.stats.cycles / iterations
    if t.smp:
        cycles += _remote_wakeup(cfg)
        if name == "ipi_halt":
            cycles += IPI_HALT_SPIN
    return {
        "cycles": cycles,
        "ipi": parts["ipi"] / iterations or None,
        "eoi": parts["eoi"] / iterations or None,
        "exits": m.stats.l0_exits / iterations,
        "path": exit_path(m, iterations),
        "why": t.why,
    }


def exit_path(m: NestedMachine, iterations: int) -> str:
    """The exits of one iteration by level and reason, e.g. ``L2 CPUID>L1, L1 VMRESUME``."""
    s = m.stats
    parts = []
    for row in s.reason_rows():
        n = row["count"] / iterations
        count = f" x{n:g}" if n != 1 else ""
        parts.append(f"{row['level']} {row['reason']}{count}")
    if s.reflected:
        parts.append(f"reflected x{s.reflected / iterations:g}")
    return ", ".join(parts)


def run(
    costs: CostModel, level: int, names: list[str] | None = None, *, apicv: bool | None = None
) -> dict[str, dict[str, Any]]:
    """Every wanted test, in vmexit.c's order (all of them when ``names`` is empty)."""
    wanted = names or [t.name for t in TESTS]
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        raise KeyError(", ".join(unknown))
    return {t.name: run_test(t.name, costs, level, apicv=apicv) for t in TESTS if t.name in wanted}


def format_lines(results: dict[str, dict[str, Any]]) -> str:
    """kvm-unit-tests' output: ``name cycles``, ``name (skipped)``, ipi/eoi sub-lines."""
    out = []
    for name, r in results.items():
        if r["cycles"] is None:
            out.append(f"{name} (skipped)")
            continue
        out.append(f"{name} {int(r['cycles'])}")
        for part in ("ipi", "eoi"):
            if r.get(part):
                out.append(f"  {part} {name} {int(r[part])}")
    return "\n".join(out)
