"""VMCS objects (vmcs01, vmcs12, vmcs02) with per-field access accounting.

A :class:`Vmcs` holds field values and counts every read and write per field.
The hot path never touches these objects for the fixed field lists L0 works
through on every event (the dozen-odd fields synced on each reflection, the
merge on each VMRESUME): a list is *bound* once to the event counter that
says how often it ran, and per-field counts are derived when someone asks.
Irregular accesses (L1's VMREADs of its handler) are charged as batches keyed
by the identity of an immutable, long-lived tuple. Either way accounting
costs O(1) per event while the per-field view stays exact.

The field lists below are what Linux 6.1's ``nested.c`` touches; each names
the function it comes from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from .vmx import SHADOW_FIELDS_RO, SHADOW_FIELDS_RW, VmcsField

F = VmcsField

_SEGMENTS = ("ES", "CS", "SS", "DS", "FS", "GS", "TR", "LDTR")


def _seg_fields(parts: tuple[str, ...], segs: tuple[str, ...] = _SEGMENTS) -> tuple[int, ...]:
    return tuple(VmcsField[f"GUEST_{s}_{p}"] for s in segs for p in parts)


#: sync_vmcs02_to_vmcs12 (Linux 6.1 nested.c): what L0 reads from vmcs02 on
#: every reflected exit of a 64-bit L2 on EPT: CR0 and CR4 (kvm_read_cr0/4
#: for the guest-owned bits), RSP and RIP (register cache), RFLAGS, CS/SS
#: access rights, interruptibility, CR3, the guest linear address and, with
#: virtual-interrupt delivery, the guest interrupt status. The PDPTRs are read
#: only for PAE paging, which a 64-bit L2 does not use.
REFLECT_HOT_SYNC: tuple[int, ...] = (
    F.GUEST_CR0,
    F.GUEST_CR4,
    F.GUEST_RSP,
    F.GUEST_RIP,
    F.GUEST_RFLAGS,
    F.GUEST_CS_AR_BYTES,
    F.GUEST_SS_AR_BYTES,
    F.GUEST_INTERRUPTIBILITY_INFO,
    F.GUEST_CR3,
    F.GUEST_LINEAR_ADDRESS,
    F.GUEST_INTR_STATUS,
)

#: prepare_vmcs12: the exit information L0 stores into vmcs12 (memory, not
#: VMWRITEs) on every reflection; of these it VMREADs from vmcs02 only the
#: instruction length and instruction information (REFLECT_EXIT_READS), the
#: rest it already holds from its own exit path.
REFLECT_EXIT_INFO: tuple[int, ...] = (
    F.VM_EXIT_REASON,
    F.EXIT_QUALIFICATION,
    F.VM_EXIT_INTR_INFO,
    F.VM_EXIT_INTR_ERROR_CODE,
    F.IDT_VECTORING_INFO_FIELD,
    F.IDT_VECTORING_ERROR_CODE,
    F.VM_EXIT_INSTRUCTION_LEN,
    F.VMX_INSTRUCTION_INFO,
)
REFLECT_EXIT_READS: tuple[int, ...] = (F.VM_EXIT_INSTRUCTION_LEN, F.VMX_INSTRUCTION_INFO)

#: sync_vmcs02_to_vmcs12_rare: the 35 rarely used guest fields (segment
#: selectors, limits, access rights and bases other than CS/SS rights, GDTR,
#: IDTR, pending debug exceptions), read lazily, only when L1 asks for one.
REFLECT_RARE_SYNC: tuple[int, ...] = (
    _seg_fields(("SELECTOR", "LIMIT"))
    + (F.GUEST_GDTR_LIMIT, F.GUEST_IDTR_LIMIT)
    + _seg_fields(("AR_BYTES",), ("ES", "DS", "FS", "GS", "LDTR", "TR"))
    + _seg_fields(("BASE",))
    + (F.GUEST_GDTR_BASE, F.GUEST_IDTR_BASE, F.GUEST_PENDING_DBG_EXCEPTIONS)
)

#: load_vmcs12_host_state: after switching to vmcs01, L0 loads L1's state
#: from vmcs12's host-state area into vmcs01's *guest*-state area (L1 is
#: vmcs01's guest): RSP, RIP, RFLAGS, interruptibility, EFER, CR0/CR4 and
#: their read shadows, CR3, SYSENTER, GDTR/IDTR, PAT, all eight segments
#: (__vmx_set_segment writes selector, base, limit and access rights), DR7.
L1_HOST_STATE: tuple[int, ...] = (
    F.GUEST_RSP,
    F.GUEST_RIP,
    F.GUEST_RFLAGS,
    F.GUEST_INTERRUPTIBILITY_INFO,
    F.GUEST_IA32_EFER,
    F.GUEST_CR0,
    F.CR0_READ_SHADOW,
    F.GUEST_CR4,
    F.CR4_READ_SHADOW,
    F.GUEST_CR3,
    F.GUEST_SYSENTER_CS,
    F.GUEST_SYSENTER_ESP,
    F.GUEST_SYSENTER_EIP,
    F.GUEST_IDTR_BASE,
    F.GUEST_GDTR_BASE,
    F.GUEST_IDTR_LIMIT,
    F.GUEST_GDTR_LIMIT,
    F.GUEST_IA32_PAT,
    *_seg_fields(("SELECTOR", "BASE", "LIMIT", "AR_BYTES")),
    F.GUEST_DR7,
)

#: copy_shadow_to_vmcs12 on VMRESUME: L0 reads back the read-write shadow fields.
SHADOW_COPY_BACK: tuple[int, ...] = tuple(sorted(SHADOW_FIELDS_RW))

#: copy_vmcs12_to_shadow on reflection: L0 refreshes every shadowed field.
SHADOW_REFRESH: tuple[int, ...] = tuple(sorted(SHADOW_FIELDS_RO | SHADOW_FIELDS_RW))

#: prepare_vmcs02_early + prepare_vmcs02 (every nested entry): event
#: injection and interrupt state, the CR0/CR4 masks' shadows, TSC offset,
#: CR0/CR3/CR4, RFLAGS, RSP, RIP, EFER, DR7 and DEBUGCTL. The execution
#: controls are written only when they changed (the controls shadow cache).
MERGE_HOT: tuple[int, ...] = (
    F.TPR_THRESHOLD,
    F.GUEST_INTR_STATUS,
    F.VM_ENTRY_INTR_INFO_FIELD,
    F.VM_ENTRY_EXCEPTION_ERROR_CODE,
    F.VM_ENTRY_INSTRUCTION_LEN,
    F.GUEST_INTERRUPTIBILITY_INFO,
    F.CR0_GUEST_HOST_MASK,
    F.CR0_READ_SHADOW,
    F.CR4_READ_SHADOW,
    F.TSC_OFFSET,
    F.GUEST_CR0,
    F.GUEST_CR4,
    F.GUEST_CR3,
    F.GUEST_RFLAGS,
    F.GUEST_RSP,
    F.GUEST_RIP,
    F.GUEST_IA32_EFER,
    F.GUEST_DR7,
    F.GUEST_IA32_DEBUGCTL,
)

#: prepare_vmcs02_rare (only when vmcs12 is dirty): segments, SYSENTER,
#: pending debug exceptions, PDPTRs, BNDCFGS, the XSS exit bitmap, the
#: page-fault error-code mask and match, the EOI-exit bitmap, MSR-list counts.
MERGE_RARE: tuple[int, ...] = (
    _seg_fields(("SELECTOR", "LIMIT"))
    + (F.GUEST_GDTR_LIMIT, F.GUEST_IDTR_LIMIT)
    + _seg_fields(("AR_BYTES",))
    + _seg_fields(("BASE",))
    + (F.GUEST_GDTR_BASE, F.GUEST_IDTR_BASE)
    + (
        F.GUEST_SYSENTER_CS, F.GUEST_PENDING_DBG_EXCEPTIONS, F.GUEST_SYSENTER_ESP,
        F.GUEST_SYSENTER_EIP, F.GUEST_PDPTR0, F.GUEST_PDPTR1, F.GUEST_PDPTR2,
        F.GUEST_PDPTR3, F.GUEST_BNDCFGS, F.XSS_EXIT_BITMAP, F.PAGE_FAULT_ERROR_CODE_MASK,
        F.PAGE_FAULT_ERROR_CODE_MATCH, F.EOI_EXIT_BITMAP0, F.EOI_EXIT_BITMAP1,
        F.EOI_EXIT_BITMAP2, F.EOI_EXIT_BITMAP3, F.VM_EXIT_MSR_STORE_COUNT,
        F.VM_EXIT_MSR_LOAD_COUNT, F.VM_ENTRY_MSR_LOAD_COUNT,
    )
)  # fmt: skip

#: VMCS accesses L0 itself performs (native VMREAD/VMWRITE) on one reflection
#: and on one nested entry; what a preset's ``vmcs_native`` multiplies.
REFLECT_NATIVE_ACCESSES = len(REFLECT_HOT_SYNC) + len(REFLECT_EXIT_READS) + len(L1_HOST_STATE)
ENTRY_NATIVE_ACCESSES = len(MERGE_HOT)


class Vmcs:
    """One VMCS: field values plus per-field read and write counts."""

    __slots__ = (
        "name", "values", "_reads", "_writes", "_read_batches", "_write_batches", "_lists",
        "_bound",
    )  # fmt: skip

    def __init__(self, name: str) -> None:
        self.name = name
        self.values: dict[int, int] = {}
        self._reads: Counter[int] = Counter()
        self._writes: Counter[int] = Counter()
        # id(field tuple) -> times charged; _lists keeps each tuple alive so ids stay unique
        self._read_batches: dict[int, int] = {}
        self._write_batches: dict[int, int] = {}
        self._lists: dict[int, tuple[int, ...]] = {}
        self._bound: list[tuple[bool, tuple[int, ...], Callable[[], int]]] = []

    def bind(self, write: bool, fields: tuple[int, ...], times: Callable[[], int]) -> None:
        """Every field of ``fields`` is read (or written) ``times()`` times."""
        self._bound.append((write, fields, times))

    def read(self, field: int) -> int:
        self._reads[field] += 1
        return self.values.get(field, 0)

    def write(self, field: int, value: int) -> None:
        self._writes[field] += 1
        self.values[field] = value

    def charge_reads(self, fields: tuple[int, ...], times: int = 1) -> None:
        """Account ``times`` reads of every field in ``fields`` (values unchanged)."""
        self._charge(self._read_batches, fields, times)

    def charge_writes(self, fields: tuple[int, ...], times: int = 1) -> None:
        """Account ``times`` writes of every field in ``fields`` (values unchanged)."""
        self._charge(self._write_batches, fields, times)

    def _charge(self, batches: dict[int, int], fields: tuple[int, ...], times: int) -> None:
        k = id(fields)
        if k in batches:
            batches[k] += times
        else:
            batches[k] = times
            self._lists[k] = fields

    def _expand(self, write: bool) -> Counter[int]:
        out: Counter[int] = Counter(self._writes if write else self._reads)
        for k, times in (self._write_batches if write else self._read_batches).items():
            for f in self._lists[k]:
                out[f] += times
        for w, fields, fn in self._bound:
            if w == write:
                n = fn()
                for f in fields:
                    out[f] += n
        return +out  # drop zero counts

    def reads(self) -> Counter[int]:
        """Reads per field encoding."""
        return self._expand(False)

    def writes(self) -> Counter[int]:
        """Writes per field encoding."""
        return self._expand(True)

    def load(self, values: Iterable[tuple[int, int]]) -> None:
        """Set initial values without counting them as accesses."""
        self.values.update(values)
