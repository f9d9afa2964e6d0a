"""Routing of L2's exits: does L0 keep the exit or reflect it to L1?

Every L2 exit lands in L0. KVM's ``nested_vmx_reflect_vmexit`` (``nested.c``)
first asks ``nested_vmx_l0_wants_exit`` (exits L0 must see first), then
``nested_vmx_l1_wants_exit`` (exits L1 asked for in vmcs12, or that only L1
can handle). This module is that decision as a table: one row per exit reason,
the rule that decides it, and the KVM source of the rule.

An exit that L1 did not ask for is L0's, exactly as in KVM: an L2 port I/O
that L1's vmcs12 I/O bitmap lets through is served by L0 as an access to L1's
own port. That is how the direct-service path works without a special case:
when L1 delegates a device, it switches vmcs12 from unconditional I/O exiting
to I/O bitmaps with the device's notify port clear, and L0's direct backend
owns that port.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from .vmx import CpuBased, ExitReason, PinBased

R = ExitReason


class Rule(Enum):
    """How one exit reason is decided."""

    L0 = "L0 always handles it first"
    L1 = "always reflected to L1"
    L1_IF_CPU_CONTROL = "reflected when L1 set the primary exec-control bit"
    L1_IF_PIN_CONTROL = "reflected when L1 set the pin-based control bit"
    L1_IF_IO_EXITING = "reflected on unconditional I/O exiting or the port's I/O-bitmap bit"
    L1_IF_MSR_EXITING = "reflected without MSR bitmaps, or on the MSR's bitmap bit"
    L1_IF_EXCEPTION = "NMIs stay with L0; other exceptions by vmcs12's exception bitmap"
    L1_IF_CR = "CR0/CR4 writes by vmcs12's guest/host masks, CR3/CR8 by exec controls"


@dataclass(frozen=True)
class Route:
    rule: Rule
    control: int = 0
    source: str = ""


#: The routing table. Reasons not listed are reflected to L1 (KVM's default
#: in nested_vmx_l1_wants_exit is "return true").
ROUTES: dict[ExitReason, Route] = {
    R.EXTERNAL_INTERRUPT: Route(
        Rule.L0, source="nested_vmx_l0_wants_exit: host interrupt, L0 first"
    ),
    R.EXCEPTION_NMI: Route(
        Rule.L1_IF_EXCEPTION,
        source="nested_vmx_l0_wants_exit (NMI; #PF only without EPT) then "
        "nested_vmx_l1_wants_exit: vmcs12->exception_bitmap",
    ),
    R.EPT_VIOLATION: Route(Rule.L0, source="nested_vmx_l0_wants_exit: L0 walks EPT12 first"),
    R.EPT_MISCONFIG: Route(Rule.L0, source="nested_vmx_l0_wants_exit: L0 walks EPT12 first"),
    R.PREEMPTION_TIMER: Route(Rule.L0, source="nested_vmx_l0_wants_exit: L0's timer"),
    R.PML_FULL: Route(Rule.L0, source="nested_vmx_l0_wants_exit: L0's dirty logging"),
    R.TRIPLE_FAULT: Route(Rule.L1, source="nested_vmx_l1_wants_exit: always"),
    R.CPUID: Route(Rule.L1, source="nested_vmx_l1_wants_exit: CPUID always exits"),
    R.XSETBV: Route(Rule.L1, source="nested_vmx_l1_wants_exit: always"),
    R.INVD: Route(Rule.L1, source="nested_vmx_l1_wants_exit: always"),
    R.HLT: Route(Rule.L1_IF_CPU_CONTROL, CpuBased.HLT_EXITING, "nested_vmx_l1_wants_exit"),
    R.RDTSC: Route(Rule.L1_IF_CPU_CONTROL, CpuBased.RDTSC_EXITING, "nested_vmx_l1_wants_exit"),
    R.INVLPG: Route(Rule.L1_IF_CPU_CONTROL, CpuBased.INVLPG_EXITING, "nested_vmx_l1_wants_exit"),
    R.CR_ACCESS: Route(
        Rule.L1_IF_CR,
        CpuBased.CR3_LOAD_EXITING | CpuBased.CR8_LOAD_EXITING,
        "nested_vmx_exit_handled_cr: CR0/CR4 by cr0/cr4_guest_host_mask, CR3/CR8 by controls",
    ),
    R.DR_ACCESS: Route(
        Rule.L1_IF_CPU_CONTROL, CpuBased.MOV_DR_EXITING, "nested_vmx_l1_wants_exit: MOV_DR_EXITING"
    ),
    R.TPR_BELOW_THRESHOLD: Route(
        Rule.L1_IF_CPU_CONTROL, CpuBased.TPR_SHADOW, "nested_vmx_l1_wants_exit: TPR shadow"
    ),
    R.APIC_ACCESS: Route(
        Rule.L1, source="nested_vmx_l1_wants_exit: APIC virtualization controls come from vmcs12"
    ),
    R.APIC_WRITE: Route(
        Rule.L1, source="nested_vmx_l1_wants_exit: APIC virtualization controls come from vmcs12"
    ),
    R.EOI_INDUCED: Route(
        Rule.L1, source="nested_vmx_l1_wants_exit: APIC virtualization controls come from vmcs12"
    ),
    R.INTERRUPT_WINDOW: Route(
        Rule.L1_IF_CPU_CONTROL, CpuBased.INTR_WINDOW_EXITING, "nested_vmx_l1_wants_exit"
    ),
    R.IO_INSTRUCTION: Route(Rule.L1_IF_IO_EXITING, source="nested_vmx_exit_handled_io"),
    R.MSR_READ: Route(Rule.L1_IF_MSR_EXITING, source="nested_vmx_exit_handled_msr"),
    R.MSR_WRITE: Route(Rule.L1_IF_MSR_EXITING, source="nested_vmx_exit_handled_msr"),
    R.NMI_WINDOW: Route(Rule.L1_IF_PIN_CONTROL, PinBased.NMI_EXITING, "nested_vmx_l1_wants_exit"),
}
for _vmx_insn in (
    R.VMCALL, R.VMCLEAR, R.VMLAUNCH, R.VMPTRLD, R.VMPTRST, R.VMREAD,
    R.VMRESUME, R.VMWRITE, R.VMOFF, R.VMON, R.INVEPT, R.INVVPID,
):  # fmt: skip
    ROUTES[_vmx_insn] = Route(Rule.L1, source="nested_vmx_l1_wants_exit: VMX instructions")

DEFAULT_ROUTE = Route(Rule.L1, source="nested_vmx_l1_wants_exit: default")


NMI_VECTOR = 2
PF_VECTOR = 14
#: The exception bitmap a KVM L1 with EPT sets for its L2 (vmx.c,
#: vmx_update_exception_bitmap): #UD, #AC and #MC; #PF only without EPT,
#: #DB and #BP only while debugging the guest.
KVM_L1_EXCEPTION_BITMAP = (1 << 6) | (1 << 17) | (1 << 18)
CR0_WP = 1 << 16
CR0_TS = 1 << 3
CR4_PGE = 1 << 7


@dataclass
class L1Controls:
    """The parts of vmcs12 that routing reads: L1's wishes for L2's exits."""

    cpu_based: int
    pin_based: int
    io_passthrough: frozenset[int] = frozenset()  # ports whose I/O-bitmap bit is clear
    msr_bitmap: frozenset[int] = frozenset()  # MSRs whose access exits
    exception_bitmap: int = KVM_L1_EXCEPTION_BITMAP
    # CR0/CR4 bits L1 owns (set in the guest/host mask): a write changing one
    # of them exits to L1. KVM owns every CR0 bit but TS (and WP with EPT since
    # Linux 6.4) and the CR4 bits outside KVM_POSSIBLE_CR4_GUEST_BITS.
    cr0_mask: int = ~CR0_TS
    cr4_mask: int = ~CR4_PGE

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_state", None)  # the cached state() is stale

    def state(self) -> tuple[Any, ...]:
        """All fields as one tuple, cached until a field changes (for replays)."""
        st: tuple[Any, ...] | None = self.__dict__.get("_state")
        if st is None:
            st = (self.cpu_based, self.pin_based, self.io_passthrough, self.msr_bitmap,
                  self.exception_bitmap, self.cr0_mask, self.cr4_mask)  # fmt: skip
            object.__setattr__(self, "_state", st)
        return st

    def restore(self, st: tuple[Any, ...]) -> None:
        (self.cpu_based, self.pin_based, self.io_passthrough, self.msr_bitmap,
         self.exception_bitmap, self.cr0_mask, self.cr4_mask) = st  # fmt: skip


def route_l2_exit(
    reason: ExitReason,
    ctl: L1Controls,
    *,
    port: int = -1,
    msr: int = -1,
    vector: int = -1,
    cr: int = -1,
    bits: int = 0,
) -> int:
    """The level (0 or 1) that handles an L2 exit.

    KVM's nested_vmx_l0_wants_exit first, then nested_vmx_l1_wants_exit:
    ``port`` for I/O, ``msr`` for MSR accesses, ``vector`` for exceptions,
    ``cr`` and the changed ``bits`` for a control-register write.
    """
    route = ROUTES.get(reason, DEFAULT_ROUTE)
    rule = route.rule
    if rule is Rule.L0:
        return 0
    if rule is Rule.L1:
        return 1
    if rule is Rule.L1_IF_EXCEPTION:
        if vector == NMI_VECTOR:
            return 0  # nested_vmx_l0_wants_exit: NMIs are L0's
        return int(bool(ctl.exception_bitmap >> vector & 1)) if vector >= 0 else 1
    if rule is Rule.L1_IF_CR:
        if cr == 0:
            return int(bool(bits & ctl.cr0_mask))
        if cr == 4:
            return int(bool(bits & ctl.cr4_mask))
        return int(bool(ctl.cpu_based & route.control))
    if rule is Rule.L1_IF_CPU_CONTROL:
        return int(bool(ctl.cpu_based & route.control))
    if rule is Rule.L1_IF_PIN_CONTROL:
        return int(bool(ctl.pin_based & route.control))
    if rule is Rule.L1_IF_IO_EXITING:
        if ctl.cpu_based & CpuBased.USE_IO_BITMAPS:
            return int(port not in ctl.io_passthrough)
        return int(bool(ctl.cpu_based & CpuBased.UNCOND_IO_EXITING))
    # Rule.L1_IF_MSR_EXITING
    if not ctl.cpu_based & CpuBased.USE_MSR_BITMAPS:
        return 1
    return int(msr in ctl.msr_bitmap)
