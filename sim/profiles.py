"""L1 handler profiles: which VMCS fields a KVM-like L1 reads and writes per exit.

A profile is data: an ordered list of *logical* VMCS accesses, the way the
source of a KVM L1 performs them (``vmx_vcpu_run``, ``vmx_handle_exit``,
``skip_emulated_instruction``, ``vmx_interrupt_allowed``,
``update_cr8_intercept``, ``vmx_save_host_state``, ...), composed from shared
fragments (every exit starts with the same prologue and ends with the same
entry epilogue). Whether a logical access becomes a VMREAD/VMWRITE instruction
depends on the L1 register cache (``cache_reg``), compiled by
:func:`compile_fragment`:

``base``
    The Turtles-era KVM (2.6.3x): only RIP and RSP are cached
    (``regs_avail``/``regs_dirty``); their writes are deferred to VM entry.
    Every other logical read is a VMREAD, every other write a VMWRITE.
``extended``
    The slides' "extend cache_reg", which modern KVM has: every field is read
    at most once per exit and written at most once per entry, and a write that
    does not change the cached value is dropped.

Calibration: Turtles (Ben-Yehuda et al., OSDI 2010, section 4.1) counts, for
one L2 CPUID under KVM-on-KVM, 7 VMREADs and 4 VMWRITEs by L1 (13 exits to L0
in all), and for a port-I/O exit handled in L1 userspace, 31 exits to L0, 14
when VMREAD/VMWRITE do not trap. Turtles gives the totals, not the field list;
the fragments below are our reconstruction of which fields a 2.6.3x KVM
touched on those paths, chosen to reproduce the published totals in ``base``
mode. In ``extended`` mode the io-kick profile yields exactly the modern KVM
list of REFERENCE.md section 4 (reads exit reason, IDT vectoring info, exit
qualification, RFLAGS, instruction length, RIP, interruptibility; writes RIP).
"""

from __future__ import annotations

from dataclasses import dataclass

from .costs import CostModel
from .vmx import CpuBased, ExitReason, VmcsField

F = VmcsField
READ = 0
WRITE = 1


@dataclass(frozen=True)
class Access:
    """One logical VMCS access in L1's handler source."""

    op: int  # READ or WRITE
    field: VmcsField
    same: bool = False  # a write that stores the value the field already has
    where: str = ""


def _r(field: VmcsField, where: str) -> Access:
    return Access(READ, field, False, where)


def _w(field: VmcsField, where: str, same: bool = False) -> Access:
    return Access(WRITE, field, same, where)


#: Fragments: named runs of logical accesses, shared between profiles.
FRAGMENTS: dict[str, tuple[Access, ...]] = {
    "exit_prologue": (
        _r(F.VM_EXIT_REASON, "vmx_vcpu_run: exit_reason after every exit"),
        _r(F.IDT_VECTORING_INFO_FIELD, "vmx_vcpu_run: idt_vectoring_info, vmx_complete_interrupts"),
    ),
    "exit_qualification": (_r(F.EXIT_QUALIFICATION, "handler: decode the exit qualification"),),
    "skip_instruction": (
        _r(F.VM_EXIT_INSTRUCTION_LEN, "skip_emulated_instruction: instruction length"),
        _r(F.GUEST_RIP, "skip_emulated_instruction: kvm_rip_read"),
        _w(F.GUEST_RIP, "skip_emulated_instruction: kvm_rip_write"),
        _r(F.GUEST_INTERRUPTIBILITY_INFO, "vmx_get_interrupt_shadow"),
        _w(F.GUEST_INTERRUPTIBILITY_INFO, "vmx_set_interrupt_shadow(0)", same=True),
    ),
    "hypercall_cpl": (_r(F.GUEST_CS_AR_BYTES, "kvm_emulate_hypercall: vmx_get_cpl"),),
    "return_to_user": (_r(F.GUEST_RFLAGS, "post_kvm_run_save: kvm_run->if_flag"),),
    "reload_host_state": (
        _w(F.HOST_FS_SELECTOR, "vmx_save_host_state after a return to userspace", same=True),
        _w(F.HOST_GS_SELECTOR, "vmx_save_host_state", same=True),
        _w(F.HOST_FS_BASE, "vmx_save_host_state", same=True),
        _w(F.HOST_GS_BASE, "vmx_save_host_state", same=True),
    ),
    "ept_fault_info": (_r(F.GUEST_PHYSICAL_ADDRESS, "handle_ept_violation: faulting L2 GPA"),),
    "ext_intr_info": (_r(F.VM_EXIT_INTR_INFO, "handle_external_interrupt: vector (ack on exit)"),),
    "decode_instruction": (
        # L1 runs under a hypervisor (X86_FEATURE_HYPERVISOR), so for an EPT
        # misconfiguration it does not trust the exit's instruction length and
        # decodes the instruction to skip it (skip_emulated_instruction ->
        # kvm_emulate_instruction(EMULTYPE_SKIP)). In 64-bit mode the decode
        # needs CS.L/CS.D and the CPL (CS access rights), RFLAGS, RIP and the
        # paging mode (CR0, CR4, CR3 for the fetch walk); CS's selector, base
        # and limit are not read (the base is 0 in long mode).
        _r(F.GUEST_CR0, "init_emulate_ctxt: CR0 (paging, protection)"),
        _r(F.GUEST_CR4, "init_emulate_ctxt: CR4"),
        _r(F.GUEST_CS_AR_BYTES, "init_emulate_ctxt: CS.L, CS.D, CPL"),
        _r(F.GUEST_RIP, "x86_decode_insn: fetch at RIP"),
        _r(F.GUEST_CR3, "emulator fetch: walk L2's page table"),
        _r(F.GUEST_RFLAGS, "init_emulate_ctxt: eflags"),
        _r(F.GUEST_INTERRUPTIBILITY_INFO, "x86_emulate_instruction: shadow state"),
        _w(F.GUEST_RIP, "x86_emulate_instruction: writeback RIP"),
    ),
    "mmio_gpa": (_r(F.GUEST_PHYSICAL_ADDRESS, "handle_ept_misconfig: MMIO GPA"),),
    "inject_posted": (
        # with APICv, L1 posts into L2's descriptor and syncs PIR into RVI
        # before entry (vmx_sync_pir_to_irr -> vmx_set_rvi)
        _r(F.GUEST_INTR_STATUS, "vmx_set_rvi: read the guest interrupt status"),
        _w(F.GUEST_INTR_STATUS, "vmx_set_rvi: RVI = highest pending vector"),
    ),
    "intr_window_off": (
        _w(F.CPU_BASED_VM_EXEC_CONTROL, "handle_interrupt_window: clear window exiting"),
    ),
    "intr_window_on": (
        _w(F.CPU_BASED_VM_EXEC_CONTROL, "enable_irq_window: set window exiting (IF=0)"),
    ),
    "cr0_write": (
        _w(F.CR0_READ_SHADOW, "vmx_set_cr0: read shadow"),
        _w(F.GUEST_CR0, "vmx_set_cr0: guest CR0"),
    ),
    "exception_info": (
        _r(F.VM_EXIT_INTR_INFO, "handle_exception_nmi: vector and type (#PF)"),
        _r(F.VM_EXIT_INTR_ERROR_CODE, "handle_exception_nmi: the page-fault error code"),
        _r(F.EXIT_QUALIFICATION, "handle_exception_nmi: the faulting address (CR2)"),
    ),
    "inject_exception": (
        _w(F.VM_ENTRY_INTR_INFO_FIELD, "vmx_inject_exception: #PF | HARD_EXCEPTION | VALID"),
        _w(F.VM_ENTRY_EXCEPTION_ERROR_CODE, "vmx_inject_exception: the error code"),
    ),
    "cr4_write": (
        _w(F.CR4_READ_SHADOW, "vmx_set_cr4: read shadow"),
        _w(F.GUEST_CR4, "vmx_set_cr4: guest CR4"),
    ),
    "load_shadow_root": (_w(F.GUEST_CR3, "vmx_load_mmu_pgd: the new shadow root in GUEST_CR3"),),
    "tsc_adjust": (_w(F.TSC_OFFSET, "kvm_set_msr_common(TSC_ADJUST) -> adjust_tsc_offset_guest"),),
    "inject_irq": (
        _r(F.GUEST_RFLAGS, "vmx_interrupt_allowed: RFLAGS.IF"),
        _r(F.GUEST_INTERRUPTIBILITY_INFO, "vmx_interrupt_allowed: STI/MOV-SS blocking"),
        _w(F.VM_ENTRY_INTR_INFO_FIELD, "vmx_inject_irq: vector | INTR_TYPE_EXT_INTR | VALID"),
    ),
    "entry_epilogue": (
        _r(F.GUEST_RFLAGS, "vcpu_enter_guest: interrupt window, vmx_interrupt_allowed"),
        _r(F.GUEST_INTERRUPTIBILITY_INFO, "vcpu_enter_guest: interrupt window"),
        _w(F.TPR_THRESHOLD, "update_cr8_intercept on every entry", same=True),
        _w(
            F.VM_ENTRY_INTR_INFO_FIELD,
            "entry interruption info rewritten unchanged (pre-cached-controls KVM)",
            same=True,
        ),
    ),
}


@dataclass(frozen=True)
class L1OwnExit:
    """A hardware exit L1 itself takes to L0 while handling (not a VMX instruction)."""

    reason: ExitReason
    count: int
    handler: str  # L0 handler cost key
    why: str


@dataclass(frozen=True)
class Profile:
    """What a KVM-like L1 does for one reflected exit."""

    name: str
    reason: ExitReason
    fragments: tuple[str, ...]  # run at reflection, in order; the epilogue runs at VMRESUME
    handler: str  # key of the handler's cycle cost (CostModel.handlers)
    returns_to_user: bool = False  # the exit goes to L1's VMM userspace and back
    source: str = ""
    sets_controls: int = 0  # primary exec-control bits L1 sets in vmcs12 while handling
    clears_controls: int = 0  # and the ones it clears (enable_irq_window and back)

    def own_exits(self, costs: CostModel) -> tuple[L1OwnExit, ...]:
        """The exits L1 itself takes to L0 while handling, by the preset's era.

        A return to L1's userspace restores the user-return MSRs and sets them
        again before the next entry (kvm_on_user_return,
        kvm_set_user_return_msr): L0 does not pass these through to L1, so
        each write is an MSR exit of L1. A KVM with lazy FPU switching (before
        Linux 4.x) also toggled CR0.TS around it.
        """
        if not self.returns_to_user:
            return ()
        out = [
            L1OwnExit(
                ExitReason.MSR_WRITE, 2 * costs.user_return_msrs, "msr_write",
                "user-return MSRs restored for the VMM, then set again before VM entry",
            )
        ]  # fmt: skip
        if costs.lazy_fpu:
            out.append(
                L1OwnExit(
                    ExitReason.CR_ACCESS, 2, "cr_access",
                    "lazy FPU switch around the return to userspace: CR0.TS set, then cleared",
                )
            )  # fmt: skip
        return tuple(out)


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "cpuid", ExitReason.CPUID,
            ("exit_prologue", "skip_instruction"), "cpuid",
            source="handle_cpuid; Turtles: 7 VMREADs + 4 VMWRITEs in base mode",
        ),
        Profile(
            "vmcall", ExitReason.VMCALL,
            ("exit_prologue", "hypercall_cpl", "skip_instruction"), "vmcall",
            source="handle_vmcall -> kvm_emulate_hypercall",
        ),
        Profile(
            "io_kick", ExitReason.IO_INSTRUCTION,
            ("exit_prologue", "exit_qualification", "skip_instruction"), "io_kick",
            source="handle_io -> kvm_fast_pio -> ioeventfd (in-kernel backend)",
        ),
        Profile(
            "io_kernel", ExitReason.IO_INSTRUCTION,
            ("exit_prologue", "exit_qualification", "skip_instruction"), "io_kernel",
            source="handle_io -> kernel_pio: an in-kernel device (the PIC's ELCR)",
        ),
        Profile(
            "io_user", ExitReason.IO_INSTRUCTION,
            (
                "exit_prologue", "exit_qualification", "skip_instruction",
                "return_to_user", "reload_host_state",
            ),
            "io_user", returns_to_user=True,
            source="handle_io -> KVM_EXIT_IO to QEMU; Turtles: 31 exits, 14 without VMCS traps",
        ),
        Profile(
            "mmio_kick", ExitReason.EPT_MISCONFIG,
            ("exit_prologue", "mmio_gpa", "decode_instruction"), "mmio_kick",
            source="handle_ept_misconfig -> fast MMIO bus, skip by decode (EMULTYPE_SKIP)",
        ),
        Profile(
            "ept_violation", ExitReason.EPT_VIOLATION,
            ("exit_prologue", "exit_qualification", "ept_fault_info"), "ept_violation",
            source="handle_ept_violation -> kvm_mmu_page_fault (L1 fills EPT12)",
        ),
        Profile(
            "external_interrupt", ExitReason.EXTERNAL_INTERRUPT,
            ("exit_prologue", "ext_intr_info"), "external_interrupt",
            source="handle_external_interrupt: an interrupt for L1 arrived while L2 ran",
        ),
        Profile(
            "hlt", ExitReason.HLT,
            ("exit_prologue", "skip_instruction"), "hlt",
            source="handle_halt -> kvm_emulate_halt (blocking and wake-up apart)",
        ),
        Profile(
            "eoi", ExitReason.MSR_WRITE,
            ("exit_prologue", "skip_instruction"), "eoi",
            source="handle_wrmsr -> kvm_x2apic_msr_write(EOI) -> apic_set_eoi",
        ),
        Profile(
            "tsc_adjust_write", ExitReason.MSR_WRITE,
            ("exit_prologue", "skip_instruction", "tsc_adjust"), "msr_write",
            source="handle_wrmsr -> kvm_set_msr_common(MSR_IA32_TSC_ADJUST)",
        ),
        Profile(
            "msr_read", ExitReason.MSR_READ,
            ("exit_prologue", "skip_instruction"), "msr_read",
            source="handle_rdmsr -> kvm_get_msr_common",
        ),
        Profile(
            "apic_write", ExitReason.APIC_WRITE,
            ("exit_prologue", "exit_qualification"), "apic_write",
            source="handle_apic_write -> kvm_apic_write_nodecode (trap-like, RIP already past)",
        ),
        Profile(
            "apic_access", ExitReason.APIC_ACCESS,
            ("exit_prologue", "exit_qualification", "decode_instruction"), "apic_access",
            source="handle_apic_access -> kvm_emulate_instruction (an xAPIC MMIO access)",
        ),
        Profile(
            "intr_window", ExitReason.INTERRUPT_WINDOW,
            ("exit_prologue", "intr_window_off"), "intr_window",
            source="handle_interrupt_window: the window opened, inject at entry",
        ),
        Profile(
            "tpr_below_threshold", ExitReason.TPR_BELOW_THRESHOLD,
            ("exit_prologue",), "tpr_below_threshold",
            source="handle_tpr_below_threshold: re-evaluate pending interrupts",
        ),
        Profile(
            "apic_icr_cli", ExitReason.APIC_ACCESS,
            ("exit_prologue", "exit_qualification", "decode_instruction", "intr_window_on"),
            "apic_access",
            source="handle_apic_access: ICR write, the self-IPI is pending with IF=0: "
            "enable_irq_window",
            sets_controls=CpuBased.INTR_WINDOW_EXITING,
        ),
        Profile(
            "x2apic_self_ipi", ExitReason.MSR_WRITE,
            ("exit_prologue", "skip_instruction", "inject_irq"), "apic_write",
            source="handle_wrmsr -> kvm_x2apic_msr_write(SELF_IPI), injected at entry",
        ),
        Profile(
            "x2apic_self_ipi_cli", ExitReason.MSR_WRITE,
            ("exit_prologue", "skip_instruction", "intr_window_on"), "apic_write",
            source="handle_wrmsr -> kvm_x2apic_msr_write(SELF_IPI) with IF=0: enable_irq_window",
            sets_controls=CpuBased.INTR_WINDOW_EXITING,
        ),
        Profile(
            "hlt_inject", ExitReason.HLT,
            ("exit_prologue", "skip_instruction", "intr_window_off", "inject_irq"), "hlt",
            source="handle_halt with an interrupt pending: no block, inject at entry",
            clears_controls=CpuBased.INTR_WINDOW_EXITING,
        ),
        Profile(
            "intr_window_inject", ExitReason.INTERRUPT_WINDOW,
            ("exit_prologue", "intr_window_off", "inject_irq"), "intr_window",
            source="handle_interrupt_window, then vmx_inject_irq at entry",
            clears_controls=CpuBased.INTR_WINDOW_EXITING,
        ),
        Profile(
            "tpr_below_inject", ExitReason.TPR_BELOW_THRESHOLD,
            ("exit_prologue", "inject_irq"), "tpr_below_threshold",
            source="handle_tpr_below_threshold: the pending interrupt is injected at entry",
        ),
        Profile(
            "tpr_below_cli", ExitReason.TPR_BELOW_THRESHOLD,
            ("exit_prologue", "intr_window_on"), "tpr_below_threshold",
            source="handle_tpr_below_threshold with IF=0: enable_irq_window",
            sets_controls=CpuBased.INTR_WINDOW_EXITING,
        ),
        # L2's paging under L1's shadow MMU (REFERENCE 13; L1 without EPT for L2)
        Profile(
            "pf_inject", ExitReason.EXCEPTION_NMI,
            ("exit_prologue", "exception_info", "inject_exception"), "pf_inject",
            source="handle_exception_nmi -> kvm_mmu_page_fault -> FNAME(page_fault): the "
            "guest PTE is not present, the #PF goes back into L2 (kvm_inject_page_fault)",
        ),
        Profile(
            "pf_fill", ExitReason.EXCEPTION_NMI,
            ("exit_prologue", "exception_info"), "pf_fill",
            source="handle_exception_nmi -> kvm_mmu_page_fault -> FNAME(fetch): the guest PTE "
            "is there now, the shadow entry is filled (pte_prefetch of the neighbours)",
        ),
        Profile(
            "pte_unsync", ExitReason.EXCEPTION_NMI,
            ("exit_prologue", "exception_info"), "pte_unsync",
            source="kvm_mmu_page_fault on a write to a write-protected leaf page table: "
            "mmu_try_to_unsync_pages, the page made writable, the write retried",
        ),
        Profile(
            "pte_emulate", ExitReason.EXCEPTION_NMI,
            ("exit_prologue", "exception_info", "decode_instruction"), "pte_emulate",
            source="kvm_mmu_page_fault on a write to an upper-level page table: "
            "x86_emulate_instruction -> kvm_mmu_pte_write (detect_write_flooding)",
        ),
        Profile(
            "cr3_load", ExitReason.CR_ACCESS,
            ("exit_prologue", "exit_qualification", "skip_instruction", "load_shadow_root"),
            "cr3_load",
            source="handle_cr -> kvm_set_cr3 -> kvm_mmu_new_pgd, kvm_mmu_sync_roots "
            "(unsync pages resynced), then a TLB flush (vpid_sync_context: INVVPID)",
        ),
        Profile(
            "invlpg", ExitReason.INVLPG,
            ("exit_prologue", "exit_qualification", "skip_instruction"), "invlpg",
            source="handle_invlpg -> kvm_mmu_invlpg -> FNAME(invlpg), then INVVPID of the address",
        ),
        Profile(
            "cr4_write", ExitReason.CR_ACCESS,
            ("exit_prologue", "exit_qualification", "skip_instruction", "cr4_write"), "cr4_write",
            source="handle_cr -> kvm_set_cr4: a PGE change drops the shadow's global "
            "entries (kvm_post_set_cr4 -> kvm_mmu_reset_context)",
        ),
        Profile(
            "tsc_deadline", ExitReason.MSR_WRITE,
            ("exit_prologue", "skip_instruction"), "tsc_deadline",
            source="handle_wrmsr -> kvm_set_lapic_tscdeadline_msr -> start_apic_timer",
        ),
        Profile(
            "cr0_write", ExitReason.CR_ACCESS,
            ("exit_prologue", "exit_qualification", "skip_instruction", "cr0_write"), "cr0_write",
            source="handle_cr -> kvm_set_cr0 (a WP change resets the MMU context)",
        ),
    )
}  # fmt: skip

#: Fields whose reads are cached and whose writes are deferred to VM entry in
#: the Turtles-era KVM (regs_avail / regs_dirty for RIP and RSP).
BASE_CACHED: frozenset[int] = frozenset({F.GUEST_RIP, F.GUEST_RSP})

CACHE_MODES = ("base", "extended")

# A cache state: (fields whose value L1 knows, writes pending until entry).
CacheState = tuple[frozenset[int], tuple[int, ...]]
EMPTY_CACHE: CacheState = (frozenset(), ())
Instruction = tuple[int, int]  # (READ|WRITE, field)


def compile_fragment(
    accesses: tuple[Access, ...], state: CacheState, mode: str
) -> tuple[tuple[Instruction, ...], CacheState]:
    """The VMREAD/VMWRITE instructions a run of logical accesses executes.

    Pure: the same fragment from the same cache state always compiles the same
    way, so callers memoize on ``(fragment, state)``.
    """
    extended = mode == "extended"
    known, pending = state
    known_s = set(known)
    pending_l = list(pending)
    out: list[Instruction] = []
    for a in accesses:
        cached = extended or a.field in BASE_CACHED
        if a.op == READ:
            if cached and a.field in known_s:
                continue
            out.append((READ, a.field))
            if cached:
                known_s.add(a.field)
        else:
            if not cached:
                out.append((WRITE, a.field))
                continue
            if extended and a.same:
                continue  # value unchanged: modern KVM writes controls only on change
            known_s.add(a.field)
            if a.field not in pending_l:
                pending_l.append(a.field)
    return tuple(out), (frozenset(known_s), tuple(pending_l))


def flush_on_entry(state: CacheState) -> tuple[Instruction, ...]:
    """The deferred VMWRITEs L1 issues just before VMRESUME."""
    return tuple((WRITE, f) for f in state[1])
