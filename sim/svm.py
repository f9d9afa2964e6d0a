"""AMD SVM vocabulary: #VMEXIT codes, what a KVM L1 intercepts in VMCB12, L1's run loop.

The exit codes are Linux's ``SVM_EXIT_*`` (``arch/x86/include/uapi/asm/svm.h``,
AMD APM vol. 2 appendix C). The workloads and the datapath say what the
guest did in one vocabulary (:class:`sim.vmx.ExitReason`, the names the
project started with); :data:`SVM_EXIT_FOR` is the table that turns each
into the #VMEXIT an AMD CPU takes for the same act, with the reason where the
mapping is not one to one (an MMIO access is a nested page fault, an xAPIC
access without AVIC too, an interrupt window is a VINTR intercept).

Routing (:func:`route_l2_exit`) is Linux 6.1 ``svm/nested.c``:
``nested_svm_exit_special`` keeps INTR, NMI and NPF for L0 (and exceptions
L0 itself intercepts); ``nested_svm_intercept`` reflects an MSR access by
L1's MSR permission map, I/O by L1's I/O permission map, and every other
exit when L1's VMCB12 intercepts it (``vmcb12_is_intercept``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any

from .vmx import ExitReason, Msr

R = ExitReason


class SvmExit(IntEnum):
    """#VMEXIT exit codes (Linux ``SVM_EXIT_*``)."""

    SVM_EXIT_READ_CR0 = 0x000
    SVM_EXIT_WRITE_CR0 = 0x010
    SVM_EXIT_WRITE_CR3 = 0x013
    SVM_EXIT_WRITE_CR4 = 0x014
    SVM_EXIT_WRITE_CR8 = 0x018
    SVM_EXIT_WRITE_DR7 = 0x037
    SVM_EXIT_EXCP_BASE = 0x040
    SVM_EXIT_EXCP_PF = 0x04E  # SVM_EXIT_EXCP_BASE + PF_VECTOR
    SVM_EXIT_INTR = 0x060
    SVM_EXIT_NMI = 0x061
    SVM_EXIT_VINTR = 0x064
    SVM_EXIT_CR0_SEL_WRITE = 0x065
    SVM_EXIT_RDTSC = 0x06E
    SVM_EXIT_CPUID = 0x072
    SVM_EXIT_INVD = 0x076
    SVM_EXIT_PAUSE = 0x077
    SVM_EXIT_HLT = 0x078
    SVM_EXIT_INVLPG = 0x079
    SVM_EXIT_INVLPGA = 0x07A
    SVM_EXIT_IOIO = 0x07B
    SVM_EXIT_MSR = 0x07C
    SVM_EXIT_SHUTDOWN = 0x07F
    SVM_EXIT_VMRUN = 0x080
    SVM_EXIT_VMMCALL = 0x081
    SVM_EXIT_VMLOAD = 0x082
    SVM_EXIT_VMSAVE = 0x083
    SVM_EXIT_STGI = 0x084
    SVM_EXIT_CLGI = 0x085
    SVM_EXIT_XSETBV = 0x08D
    SVM_EXIT_NPF = 0x400


S = SvmExit

#: The #VMEXIT an AMD CPU takes for what the workload vocabulary names.
SVM_EXIT_FOR: dict[ExitReason, SvmExit] = {
    R.CPUID: S.SVM_EXIT_CPUID,
    R.VMCALL: S.SVM_EXIT_VMMCALL,  # the hypercall instruction is VMMCALL on AMD
    R.HLT: S.SVM_EXIT_HLT,
    R.IO_INSTRUCTION: S.SVM_EXIT_IOIO,
    R.MSR_READ: S.SVM_EXIT_MSR,  # one code for both; EXITINFO1 says which
    R.MSR_WRITE: S.SVM_EXIT_MSR,
    R.EXTERNAL_INTERRUPT: S.SVM_EXIT_INTR,
    R.INTERRUPT_WINDOW: S.SVM_EXIT_VINTR,  # V_IRQ pending, VINTR intercepted
    R.EPT_VIOLATION: S.SVM_EXIT_NPF,
    R.EPT_MISCONFIG: S.SVM_EXIT_NPF,  # MMIO: an NPF on a reserved-bit SPTE (PFERR_RSVD_MASK)
    R.APIC_ACCESS: S.SVM_EXIT_NPF,  # xAPIC page without AVIC: MMIO, emulated
    R.CR_ACCESS: S.SVM_EXIT_CR0_SEL_WRITE,  # refined by the CR number (SVM_CR_WRITE)
    R.TPR_BELOW_THRESHOLD: S.SVM_EXIT_WRITE_CR8,  # no TPR shadow: CR8 writes intercepted
    R.EXCEPTION_NMI: S.SVM_EXIT_EXCP_PF,  # the model's exceptions are page faults
    R.RDTSC: S.SVM_EXIT_RDTSC,
    R.INVLPG: S.SVM_EXIT_INVLPG,
    R.DR_ACCESS: S.SVM_EXIT_WRITE_DR7,
    R.XSETBV: S.SVM_EXIT_XSETBV,
    R.PAUSE_INSTRUCTION: S.SVM_EXIT_PAUSE,
    R.INVD: S.SVM_EXIT_INVD,
    R.TRIPLE_FAULT: S.SVM_EXIT_SHUTDOWN,
}
SVM_CR_WRITE = {0: S.SVM_EXIT_CR0_SEL_WRITE, 3: S.SVM_EXIT_WRITE_CR3, 4: S.SVM_EXIT_WRITE_CR4,
                8: S.SVM_EXIT_WRITE_CR8}  # fmt: skip

#: nested_svm_vmexit (Linux 6.1 nested.c): what L0 writes into VMCB12, in L1's
#: memory mapped with kvm_vcpu_map, on every reflected #VMEXIT.
NESTED_SVM_VMEXIT_VMCB12 = (
    "save.es", "save.cs", "save.ss", "save.ds", "save.gdtr", "save.idtr", "save.efer",
    "save.cr0", "save.cr3", "save.cr2", "save.cr4", "save.rflags", "save.rip", "save.rsp",
    "save.rax", "save.dr7", "save.dr6", "save.cpl", "control.int_state", "control.exit_code",
    "control.exit_code_hi", "control.exit_info_1", "control.exit_info_2",
    "control.exit_int_info", "control.exit_int_info_err", "control.next_rip",
    "control.int_ctl", "control.tlb_ctl", "control.event_inj", "control.event_inj_err",
)  # fmt: skip
#: nested_vmcb02_prepare_save: VMCB12's save area into VMCB02 on L1's VMRUN. The
#: groups are skipped when VMCB12 is where it was and marks them clean
#: (vmcb_is_dirty); the rest is copied on every VMRUN.
VMCB02_SAVE_ALWAYS = ("rflags", "efer", "cr0", "cr4", "cr3", "cr2", "rax", "rsp", "rip")
VMCB02_SAVE_GROUPS = {
    "VMCB_SEG": ("es", "cs", "ss", "ds", "cpl"),
    "VMCB_DT": ("gdtr", "idtr"),
    "VMCB_DR": ("dr7", "dr6"),
}

#: What L1 does on VMX that is no exit on SVM: VMCB12 is plain memory (no
#: VMREAD/VMWRITE), and L1 flushes L2's TLB through VMCB12's TLB_CONTROL
#: instead of INVEPT/INVVPID (L0 flushes the shared ASID on every nested
#: transition anyway, nested_svm_transition_tlb_flush).
NO_SVM_EXIT = frozenset({R.VMREAD, R.VMWRITE, R.INVEPT, R.INVVPID})

#: The intercepts a KVM L1 sets in the VMCB it runs L2 on (svm.c init_vmcb,
#: svm_set_intercept; NPT on, no AVIC): the ones routing reads.
KVM_L1_INTERCEPTS = frozenset(
    {
        S.SVM_EXIT_INTR, S.SVM_EXIT_NMI, S.SVM_EXIT_CPUID, S.SVM_EXIT_HLT, S.SVM_EXIT_INVD,
        S.SVM_EXIT_INVLPGA, S.SVM_EXIT_IOIO, S.SVM_EXIT_MSR, S.SVM_EXIT_SHUTDOWN,
        S.SVM_EXIT_VMRUN, S.SVM_EXIT_VMMCALL, S.SVM_EXIT_VMLOAD, S.SVM_EXIT_VMSAVE,
        S.SVM_EXIT_STGI, S.SVM_EXIT_CLGI, S.SVM_EXIT_XSETBV, S.SVM_EXIT_CR0_SEL_WRITE,
        S.SVM_EXIT_WRITE_CR4, S.SVM_EXIT_WRITE_CR8, S.SVM_EXIT_WRITE_DR7, S.SVM_EXIT_PAUSE,
    }
)  # fmt: skip

#: MSRs L1's MSR permission map intercepts for L2 (svm.c: everything outside
#: direct_access_msrs; the x2APIC registers always, no AVIC for L2).
KVM_L1_MSRPM_INTERCEPTED: frozenset[int] = frozenset(
    {Msr.IA32_TSC_ADJUST, Msr.IA32_TSC_DEADLINE, Msr.X2APIC_TPR, Msr.X2APIC_EOI,
     Msr.X2APIC_ICR, Msr.X2APIC_SELF_IPI, Msr.TSC_AUX}
)  # fmt: skip

CR0_TS_MP = (1 << 3) | (1 << 1)


@dataclass
class Vmcb12Controls:
    """The parts of VMCB12's control area that routing and interrupts read.

    ``intercepts`` (the intercept vectors), ``io_passthrough`` (ports whose
    IOPM bit is clear), ``msr_intercepted`` (MSRs whose MSRPM bit is set),
    ``v_irq`` (int_ctl's V_IRQ: a virtual interrupt L1 asked the CPU to
    deliver when L2 can take it) and ``l2_if`` (L2's RFLAGS.IF in the save
    area, whether L2 takes interrupts now).
    """

    intercepts: frozenset[SvmExit] = KVM_L1_INTERCEPTS
    io_passthrough: frozenset[int] = frozenset()
    msr_intercepted: frozenset[int] = KVM_L1_MSRPM_INTERCEPTED
    v_irq: bool = False
    l2_if: bool = True

    # every field above, kept current by __setattr__: the replay signature reads it
    st: tuple[Any, ...] = field(default=(), init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        object.__setattr__(self, "st", tuple(getattr(self, f, None) for f in _VMCB12_FIELDS))

    def state(self) -> tuple[Any, ...]:
        """All fields as one tuple (for replays)."""
        return self.st

    def restore(self, st: tuple[Any, ...]) -> None:
        for f, v in zip(_VMCB12_FIELDS, st, strict=True):
            object.__setattr__(self, f, v)
        object.__setattr__(self, "st", st)


_VMCB12_FIELDS = ("intercepts", "io_passthrough", "msr_intercepted", "v_irq", "l2_if")


#: nested_svm_exit_special: what L0 handles first, whatever L1 intercepts.
L0_FIRST = frozenset({S.SVM_EXIT_INTR, S.SVM_EXIT_NMI, S.SVM_EXIT_NPF})


def route_l2_exit(code: SvmExit, ctl: Vmcb12Controls, *, port: int = -1, msr: int = -1,
                  cr: int = -1, bits: int = 0, **_: int) -> int:  # fmt: skip
    """The level (0 or 1) that handles an L2 #VMEXIT (nested_svm_exit_special,
    then nested_svm_intercept)."""
    if code in L0_FIRST:
        return 0
    if code is S.SVM_EXIT_IOIO:
        return int(code in ctl.intercepts and port not in ctl.io_passthrough)
    if code is S.SVM_EXIT_MSR:
        return int(code in ctl.intercepts and msr in ctl.msr_intercepted)
    if code is S.SVM_EXIT_CR0_SEL_WRITE:
        # init_vmcb sets INTERCEPT_SELECTIVE_CR0 (CR0 writes themselves pass
        # with NPT): it fires when a bit other than TS and MP changes
        return int(code in ctl.intercepts and bool(bits & ~CR0_TS_MP))
    return int(code in ctl.intercepts)


class SvmInsn(Enum):
    """The SVM instructions an L1 executes (its run loop, and INVLPGA)."""

    CLGI = "clgi"
    STGI = "stgi"
    VMLOAD = "vmload"
    VMSAVE = "vmsave"
    VMRUN = "vmrun"
    INVLPGA = "invlpga"

    @property
    def code(self) -> SvmExit:
        """The #VMEXIT it causes when intercepted."""
        return SvmExit["SVM_EXIT_" + self.name]

    @property
    def virtualized_by(self) -> str | None:
        """The feature that lets L1 run it without an exit: ``vgif`` (virtual
        GIF: STGI/CLGI), ``vls`` (virtual VMLOAD/VMSAVE), None (always exits:
        L0 requires the VMRUN intercept; INVLPGA is always intercepted)."""
        return _VIRTUALIZED_BY[self]


_VIRTUALIZED_BY = {
    SvmInsn.CLGI: "vgif", SvmInsn.STGI: "vgif", SvmInsn.VMLOAD: "vls", SvmInsn.VMSAVE: "vls",
    SvmInsn.VMRUN: None, SvmInsn.INVLPGA: None,
}  # fmt: skip
I = SvmInsn  # noqa: E741


@dataclass(frozen=True)
class RunLoop:
    """The SVM instructions an L1 executes around each VMRUN, in order, and where."""

    name: str
    before: tuple[SvmInsn, ...]  # from the decision to enter L2 up to VMRUN
    after: tuple[SvmInsn, ...]  # from the #VMEXIT back in L1 until its handler runs
    source: str
    kvm: bool = True  # a KVM L1: its exit framework and handlers run (not a test's loop)


#: KVM as L1 (Linux 6.1 svm.c svm_vcpu_enter_exit and vmenter.S __svm_vcpu_run):
#: clgi; vmload guest; vmrun; vmsave guest; vmload host save area; stgi.
KVM_RUN_LOOP = RunLoop(
    "kvm",
    (I.CLGI, I.VMLOAD),
    (I.VMSAVE, I.VMLOAD, I.STGI),
    "svm_vcpu_run: clgi, __svm_vcpu_run (vmload, vmrun, vmsave, vmload of the host "
    "save area), stgi",
)
#: kvm-unit-tests as L1 (x86/svm.c test_run): clgi; vmload; vmrun; vmsave; stgi.
TEST_RUN_LOOP = RunLoop(
    "kvm-unit-tests",
    (I.CLGI, I.VMLOAD),
    (I.VMSAVE, I.STGI),
    "kvm-unit-tests x86/svm.c test_run: clgi, vmload, vmrun, vmsave, stgi",
    kvm=False,
)
