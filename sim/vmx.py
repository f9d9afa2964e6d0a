"""VMX vocabulary: basic exit reasons, VMCS field encodings, KVM's shadow lists.

Everything here is data taken from the Intel SDM (Vol. 3, Appendix B for field
encodings, Appendix C for basic exit reasons) under the names Linux uses
(``arch/x86/include/asm/vmx.h``, ``uapi/asm/vmx.h``).  The shadow-VMCS lists
are KVM's ``arch/x86/kvm/vmx/vmcs_shadow_fields.h``: the fields L0 lets L1
VMREAD (read-only list) or VMREAD/VMWRITE (read-write list) without an exit.
"""

from __future__ import annotations

from enum import IntEnum


class ExitReason(IntEnum):
    """VMX basic exit reasons (SDM Appendix C), Linux ``EXIT_REASON_*`` names."""

    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INTERRUPT_WINDOW = 7
    NMI_WINDOW = 8
    TASK_SWITCH = 9
    CPUID = 10
    HLT = 12
    INVD = 13
    INVLPG = 14
    RDPMC = 15
    RDTSC = 16
    VMCALL = 18
    VMCLEAR = 19
    VMLAUNCH = 20
    VMPTRLD = 21
    VMPTRST = 22
    VMREAD = 23
    VMRESUME = 24
    VMWRITE = 25
    VMOFF = 26
    VMON = 27
    CR_ACCESS = 28
    DR_ACCESS = 29
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    INVALID_STATE = 33
    PAUSE_INSTRUCTION = 40
    TPR_BELOW_THRESHOLD = 43
    APIC_ACCESS = 44
    EOI_INDUCED = 45
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49
    INVEPT = 50
    PREEMPTION_TIMER = 52
    INVVPID = 53
    XSETBV = 55
    APIC_WRITE = 56
    PML_FULL = 62


#: VMX instructions: executed by L2 they always belong to L1 (nested.c,
#: nested_vmx_l1_wants_exit); executed by L1 without shadowing they trap to L0.
VMX_INSTRUCTIONS = frozenset(
    {
        ExitReason.VMCALL,
        ExitReason.VMCLEAR,
        ExitReason.VMLAUNCH,
        ExitReason.VMPTRLD,
        ExitReason.VMPTRST,
        ExitReason.VMREAD,
        ExitReason.VMRESUME,
        ExitReason.VMWRITE,
        ExitReason.VMOFF,
        ExitReason.VMON,
        ExitReason.INVEPT,
        ExitReason.INVVPID,
    }
)


class VmcsField(IntEnum):
    """VMCS field encodings (SDM Appendix B), Linux names.

    Encoding bits: bit 0 selects the high half of a 64-bit field, bits 11:10
    the type (1 = read-only VM-exit information), bits 14:13 the width
    (0 16-bit, 1 64-bit, 2 32-bit, 3 natural width).
    """

    # 16-bit
    VIRTUAL_PROCESSOR_ID = 0x0000
    POSTED_INTR_NV = 0x0002
    GUEST_ES_SELECTOR = 0x0800
    GUEST_CS_SELECTOR = 0x0802
    GUEST_SS_SELECTOR = 0x0804
    GUEST_DS_SELECTOR = 0x0806
    GUEST_FS_SELECTOR = 0x0808
    GUEST_GS_SELECTOR = 0x080A
    GUEST_LDTR_SELECTOR = 0x080C
    GUEST_TR_SELECTOR = 0x080E
    GUEST_INTR_STATUS = 0x0810
    GUEST_PML_INDEX = 0x0812
    HOST_ES_SELECTOR = 0x0C00
    HOST_CS_SELECTOR = 0x0C02
    HOST_SS_SELECTOR = 0x0C04
    HOST_DS_SELECTOR = 0x0C06
    HOST_FS_SELECTOR = 0x0C08
    HOST_GS_SELECTOR = 0x0C0A
    HOST_TR_SELECTOR = 0x0C0C
    # 64-bit control
    IO_BITMAP_A = 0x2000
    IO_BITMAP_B = 0x2002
    MSR_BITMAP = 0x2004
    VM_EXIT_MSR_STORE_ADDR = 0x2006
    VM_EXIT_MSR_LOAD_ADDR = 0x2008
    VM_ENTRY_MSR_LOAD_ADDR = 0x200A
    TSC_OFFSET = 0x2010
    VIRTUAL_APIC_PAGE_ADDR = 0x2012
    APIC_ACCESS_ADDR = 0x2014
    POSTED_INTR_DESC_ADDR = 0x2016
    EPT_POINTER = 0x201A
    EOI_EXIT_BITMAP0 = 0x201C
    EOI_EXIT_BITMAP1 = 0x201E
    EOI_EXIT_BITMAP2 = 0x2020
    EOI_EXIT_BITMAP3 = 0x2022
    XSS_EXIT_BITMAP = 0x202C
    TSC_MULTIPLIER = 0x2032
    # 64-bit read-only
    GUEST_PHYSICAL_ADDRESS = 0x2400
    # 64-bit guest state
    VMCS_LINK_POINTER = 0x2800
    GUEST_IA32_DEBUGCTL = 0x2802
    GUEST_IA32_PAT = 0x2804
    GUEST_IA32_EFER = 0x2806
    GUEST_PDPTR0 = 0x280A
    GUEST_PDPTR1 = 0x280C
    GUEST_PDPTR2 = 0x280E
    GUEST_PDPTR3 = 0x2810
    GUEST_BNDCFGS = 0x2812
    # 64-bit host state
    HOST_IA32_PAT = 0x2C00
    HOST_IA32_EFER = 0x2C02
    # 32-bit control
    PIN_BASED_VM_EXEC_CONTROL = 0x4000
    CPU_BASED_VM_EXEC_CONTROL = 0x4002
    EXCEPTION_BITMAP = 0x4004
    PAGE_FAULT_ERROR_CODE_MASK = 0x4006
    PAGE_FAULT_ERROR_CODE_MATCH = 0x4008
    CR3_TARGET_COUNT = 0x400A
    VM_EXIT_CONTROLS = 0x400C
    VM_EXIT_MSR_STORE_COUNT = 0x400E
    VM_EXIT_MSR_LOAD_COUNT = 0x4010
    VM_ENTRY_CONTROLS = 0x4012
    VM_ENTRY_MSR_LOAD_COUNT = 0x4014
    VM_ENTRY_INTR_INFO_FIELD = 0x4016
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018
    VM_ENTRY_INSTRUCTION_LEN = 0x401A
    TPR_THRESHOLD = 0x401C
    SECONDARY_VM_EXEC_CONTROL = 0x401E
    # 32-bit read-only
    VM_INSTRUCTION_ERROR = 0x4400
    VM_EXIT_REASON = 0x4402
    VM_EXIT_INTR_INFO = 0x4404
    VM_EXIT_INTR_ERROR_CODE = 0x4406
    IDT_VECTORING_INFO_FIELD = 0x4408
    IDT_VECTORING_ERROR_CODE = 0x440A
    VM_EXIT_INSTRUCTION_LEN = 0x440C
    VMX_INSTRUCTION_INFO = 0x440E
    # 32-bit guest state
    GUEST_ES_LIMIT = 0x4800
    GUEST_CS_LIMIT = 0x4802
    GUEST_SS_LIMIT = 0x4804
    GUEST_DS_LIMIT = 0x4806
    GUEST_FS_LIMIT = 0x4808
    GUEST_GS_LIMIT = 0x480A
    GUEST_LDTR_LIMIT = 0x480C
    GUEST_TR_LIMIT = 0x480E
    GUEST_GDTR_LIMIT = 0x4810
    GUEST_IDTR_LIMIT = 0x4812
    GUEST_ES_AR_BYTES = 0x4814
    GUEST_CS_AR_BYTES = 0x4816
    GUEST_SS_AR_BYTES = 0x4818
    GUEST_DS_AR_BYTES = 0x481A
    GUEST_FS_AR_BYTES = 0x481C
    GUEST_GS_AR_BYTES = 0x481E
    GUEST_LDTR_AR_BYTES = 0x4820
    GUEST_TR_AR_BYTES = 0x4822
    GUEST_INTERRUPTIBILITY_INFO = 0x4824
    GUEST_ACTIVITY_STATE = 0x4826
    GUEST_SYSENTER_CS = 0x482A
    VMX_PREEMPTION_TIMER_VALUE = 0x482E
    # 32-bit host state
    HOST_IA32_SYSENTER_CS = 0x4C00
    # natural-width control
    CR0_GUEST_HOST_MASK = 0x6000
    CR4_GUEST_HOST_MASK = 0x6002
    CR0_READ_SHADOW = 0x6004
    CR4_READ_SHADOW = 0x6006
    # natural-width read-only
    EXIT_QUALIFICATION = 0x6400
    GUEST_LINEAR_ADDRESS = 0x640A
    # natural-width guest state
    GUEST_CR0 = 0x6800
    GUEST_CR3 = 0x6802
    GUEST_CR4 = 0x6804
    GUEST_ES_BASE = 0x6806
    GUEST_CS_BASE = 0x6808
    GUEST_SS_BASE = 0x680A
    GUEST_DS_BASE = 0x680C
    GUEST_FS_BASE = 0x680E
    GUEST_GS_BASE = 0x6810
    GUEST_LDTR_BASE = 0x6812
    GUEST_TR_BASE = 0x6814
    GUEST_GDTR_BASE = 0x6816
    GUEST_IDTR_BASE = 0x6818
    GUEST_DR7 = 0x681A
    GUEST_RSP = 0x681C
    GUEST_RIP = 0x681E
    GUEST_RFLAGS = 0x6820
    GUEST_PENDING_DBG_EXCEPTIONS = 0x6822
    GUEST_SYSENTER_ESP = 0x6824
    GUEST_SYSENTER_EIP = 0x6826
    # natural-width host state
    HOST_CR0 = 0x6C00
    HOST_CR3 = 0x6C02
    HOST_CR4 = 0x6C04
    HOST_FS_BASE = 0x6C06
    HOST_GS_BASE = 0x6C08
    HOST_TR_BASE = 0x6C0A
    HOST_GDTR_BASE = 0x6C0C
    HOST_IDTR_BASE = 0x6C0E
    HOST_IA32_SYSENTER_ESP = 0x6C10
    HOST_IA32_SYSENTER_EIP = 0x6C12
    HOST_RSP = 0x6C14
    HOST_RIP = 0x6C16


def field_width(field: int) -> int:
    """Width in bits of a VMCS field from its encoding (bits 14:13)."""
    if field & 1:  # the high half of a 64-bit field is 32 bits
        return 32
    return (16, 64, 32, 64)[(field >> 13) & 3]


def field_is_read_only(field: int) -> bool:
    """True for VM-exit information fields (encoding type 1, bits 11:10)."""
    return (field >> 10) & 3 == 1


F = VmcsField

#: KVM ``vmcs_shadow_fields.h``, SHADOW_FIELD_RO: exitless VMREAD for L1.
SHADOW_FIELDS_RO: frozenset[int] = frozenset(
    {
        F.VM_EXIT_REASON,
        F.VM_EXIT_INTR_INFO,
        F.VM_EXIT_INSTRUCTION_LEN,
        F.IDT_VECTORING_INFO_FIELD,
        F.IDT_VECTORING_ERROR_CODE,
        F.VM_EXIT_INTR_ERROR_CODE,
        F.GUEST_CS_AR_BYTES,
        F.GUEST_SS_AR_BYTES,
        F.EXIT_QUALIFICATION,
        F.GUEST_LINEAR_ADDRESS,
        F.GUEST_PHYSICAL_ADDRESS,
    }
)

#: KVM ``vmcs_shadow_fields.h``, SHADOW_FIELD_RW: exitless VMREAD and VMWRITE.
#: Writes to these never dirty vmcs12: prepare_vmcs02 copies them on every
#: nested VM entry (nested.c, handle_vmwrite).
SHADOW_FIELDS_RW: frozenset[int] = frozenset(
    {
        F.GUEST_INTR_STATUS,
        F.GUEST_PML_INDEX,
        F.HOST_FS_SELECTOR,
        F.HOST_GS_SELECTOR,
        F.CPU_BASED_VM_EXEC_CONTROL,
        F.PIN_BASED_VM_EXEC_CONTROL,
        F.EXCEPTION_BITMAP,
        F.VM_ENTRY_EXCEPTION_ERROR_CODE,
        F.VM_ENTRY_INTR_INFO_FIELD,
        F.VM_ENTRY_INSTRUCTION_LEN,
        F.TPR_THRESHOLD,
        F.GUEST_INTERRUPTIBILITY_INFO,
        F.VMX_PREEMPTION_TIMER_VALUE,
        F.GUEST_RIP,
        F.GUEST_RSP,
        F.GUEST_CR0,
        F.GUEST_CR3,
        F.GUEST_CR4,
        F.GUEST_RFLAGS,
        F.CR0_GUEST_HOST_MASK,
        F.CR0_READ_SHADOW,
        F.CR4_READ_SHADOW,
        F.HOST_FS_BASE,
        F.HOST_GS_BASE,
    }
)


class CpuBased:
    """Primary processor-based VM-execution control bits (SDM 24.6.2)."""

    INTR_WINDOW_EXITING = 1 << 2
    HLT_EXITING = 1 << 7
    INVLPG_EXITING = 1 << 9
    RDTSC_EXITING = 1 << 12
    CR3_LOAD_EXITING = 1 << 15
    CR8_LOAD_EXITING = 1 << 19
    TPR_SHADOW = 1 << 21
    MOV_DR_EXITING = 1 << 23
    UNCOND_IO_EXITING = 1 << 24
    USE_IO_BITMAPS = 1 << 25
    USE_MSR_BITMAPS = 1 << 28
    ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class PinBased:
    """Pin-based VM-execution control bits (SDM 24.6.1)."""

    EXT_INTR_EXITING = 1 << 0
    NMI_EXITING = 1 << 3
    PREEMPTION_TIMER = 1 << 6
    POSTED_INTR = 1 << 7


class SecondaryExec:
    """Secondary processor-based VM-execution control bits (SDM 24.6.2)."""

    VIRTUALIZE_APIC_ACCESSES = 1 << 0
    ENABLE_EPT = 1 << 1
    VIRTUALIZE_X2APIC_MODE = 1 << 4
    ENABLE_VPID = 1 << 5
    APIC_REGISTER_VIRT = 1 << 8
    VIRTUAL_INTR_DELIVERY = 1 << 9
    SHADOW_VMCS = 1 << 14


#: The primary controls a KVM L1 puts in vmcs12 for its L2 (vmx.c,
#: setup_vmcs_config / exec_controls): HLT exiting, unconditional I/O exiting
#: (KVM does not use I/O bitmaps), MSR bitmaps, TPR shadow, secondary controls.
KVM_L1_CPU_BASED = (
    CpuBased.HLT_EXITING
    | CpuBased.UNCOND_IO_EXITING
    | CpuBased.USE_MSR_BITMAPS
    | CpuBased.TPR_SHADOW
    | CpuBased.ACTIVATE_SECONDARY_CONTROLS
)
KVM_L1_PIN_BASED = PinBased.EXT_INTR_EXITING | PinBased.NMI_EXITING
KVM_L1_SECONDARY = (
    SecondaryExec.ENABLE_EPT | SecondaryExec.ENABLE_VPID | SecondaryExec.VIRTUALIZE_APIC_ACCESSES
)
#: What a KVM L1 adds for its L2 when L0 exposes APICv to it (vmx.c,
#: pin_controls / secondary_exec_controls with enable_apicv): posted
#: interrupts, APIC-register virtualization, virtual-interrupt delivery,
#: x2APIC virtualization.
KVM_L1_PIN_APICV = PinBased.POSTED_INTR
KVM_L1_SECONDARY_APICV = (
    SecondaryExec.APIC_REGISTER_VIRT
    | SecondaryExec.VIRTUAL_INTR_DELIVERY
    | SecondaryExec.VIRTUALIZE_X2APIC_MODE
)


class Msr:
    """MSR indices used by the model (SDM Vol. 4; Linux ``msr-index.h``)."""

    IA32_TSC_ADJUST = 0x3B
    IA32_TSC_DEADLINE = 0x6E0
    STAR = 0xC0000081
    LSTAR = 0xC0000082
    SYSCALL_MASK = 0xC0000084
    KERNEL_GS_BASE = 0xC0000102
    TSC_AUX = 0xC0000103
    X2APIC_TPR = 0x808
    X2APIC_EOI = 0x80B
    X2APIC_ICR = 0x830
    X2APIC_SELF_IPI = 0x83F


#: MSRs a KVM L1 intercepts for its L2 (vmx.c, vmx_disable_intercept_for_msr
#: and vmx_update_msr_bitmap_x2apic): TSC_ADJUST always; the x2APIC ICR
#: always (no IPI virtualization before Sapphire Rapids); TPR, EOI and
#: SELF_IPI only without virtual-interrupt delivery. KERNEL_GS_BASE is
#: passed through for a 64-bit guest. TSC_DEADLINE always: the LAPIC timer
#: is emulated (it is not in vmx_possible_passthrough_msrs).
L1_INTERCEPTED_MSRS: frozenset[int] = frozenset(
    {Msr.IA32_TSC_ADJUST, Msr.X2APIC_ICR, Msr.IA32_TSC_DEADLINE}
)
L1_INTERCEPTED_MSRS_NO_APICV: frozenset[int] = L1_INTERCEPTED_MSRS | frozenset(
    {Msr.X2APIC_TPR, Msr.X2APIC_EOI, Msr.X2APIC_SELF_IPI}
)
