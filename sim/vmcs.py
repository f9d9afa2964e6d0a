"""VMCS objects (vmcs01, vmcs12, vmcs02) with per-field access accounting.

A :class:`Vmcs` holds field values and counts every read and write per field.
The hot path never touches these objects for the fixed field lists L0 works
through on every event (the dozen-odd fields synced on each reflection, the
merge on each VMRESUME): a list is *bound* once to the event counter that
says how often it ran, and per-field counts are derived when someone asks.
Irregular accesses (L1's VMREADs of its handler) are charged as batches keyed
by the identity of an immutable, long-lived tuple. Either way accounting
costs O(1) per event while the per-field view stays exact.

The field lists below are what KVM's ``nested.c`` touches; each names the
function it comes from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from .vmx import SHADOW_FIELDS_RO, SHADOW_FIELDS_RW, VmcsField

F = VmcsField

#: sync_vmcs02_to_vmcs12: guest fields copied to vmcs12 on every reflected exit
#: (CR0/CR4 and their read shadows, RSP, RIP, RFLAGS, CS/SS access rights,
#: interruptibility, CR3 and PDPTRs, linear address).
REFLECT_HOT_SYNC: tuple[int, ...] = (
    F.GUEST_CR0,
    F.CR0_READ_SHADOW,
    F.GUEST_CR4,
    F.CR4_READ_SHADOW,
    F.GUEST_RSP,
    F.GUEST_RIP,
    F.GUEST_RFLAGS,
    F.GUEST_CS_AR_BYTES,
    F.GUEST_SS_AR_BYTES,
    F.GUEST_INTERRUPTIBILITY_INFO,
    F.GUEST_CR3,
    F.GUEST_PDPTR0,
    F.GUEST_PDPTR1,
    F.GUEST_PDPTR2,
    F.GUEST_PDPTR3,
    F.GUEST_LINEAR_ADDRESS,
)

#: prepare_vmcs12: exit information written into vmcs12 on every reflection.
REFLECT_EXIT_INFO: tuple[int, ...] = (
    F.VM_EXIT_REASON,
    F.EXIT_QUALIFICATION,
    F.VM_EXIT_INTR_INFO,
    F.VM_EXIT_INTR_ERROR_CODE,
    F.IDT_VECTORING_INFO_FIELD,
    F.IDT_VECTORING_ERROR_CODE,
    F.VM_EXIT_INSTRUCTION_LEN,
    F.VMX_INSTRUCTION_INFO,
    F.GUEST_PHYSICAL_ADDRESS,
)

#: sync_vmcs02_to_vmcs12_rare: the rarely used guest fields (segments, GDTR,
#: IDTR, DR7, SYSENTER, pending debug exceptions), copied lazily.
REFLECT_RARE_SYNC: tuple[int, ...] = tuple(
    f
    for f in VmcsField
    if f.name.startswith("GUEST_")
    and f not in REFLECT_HOT_SYNC
    and f not in (F.GUEST_PHYSICAL_ADDRESS, F.GUEST_INTR_STATUS, F.GUEST_PML_INDEX)
)

#: load_vmcs12_host_state: L1's host state written into vmcs01 before L1 runs.
L1_HOST_STATE: tuple[int, ...] = tuple(f for f in VmcsField if f.name.startswith("HOST_"))

#: copy_shadow_to_vmcs12 on VMRESUME: L0 reads back the read-write shadow fields.
SHADOW_COPY_BACK: tuple[int, ...] = tuple(sorted(SHADOW_FIELDS_RW))

#: copy_vmcs12_to_shadow on reflection: L0 refreshes every shadowed field.
SHADOW_REFRESH: tuple[int, ...] = tuple(sorted(SHADOW_FIELDS_RO | SHADOW_FIELDS_RW))

#: prepare_vmcs02 (every nested entry): the hot fields, the read-write shadow
#: list is exactly the set that must be copied every time.
MERGE_HOT: tuple[int, ...] = tuple(sorted(SHADOW_FIELDS_RW))

#: prepare_vmcs02_rare (only when vmcs12 is dirty): everything else that L1
#: may have set: controls, bitmaps, EPTP, segments, host state of L2's run.
MERGE_RARE: tuple[int, ...] = tuple(
    f for f in VmcsField if f not in SHADOW_FIELDS_RW and f not in SHADOW_FIELDS_RO
)


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
