"""Cost model: named parameters, each with a value and a source, grouped into presets.

A preset names a machine and an era. Every parameter is a :class:`Param`
whose ``kind`` says where its value comes from:

``published``   a figure from a paper, a patch or KVM's source, named in ``source``;
``calibrated``  solved so that the model lands on a published figure that the
                preset is calibrated on (and only those: everything else the
                model says is a prediction);
``derived``     computed from other parameters by a rule stated in ``source``;
``estimate``    no source exists; ``source`` states the basis of the guess;
``user``        set by a user (``--set``, ``--costs FILE.toml``); ``source`` says where.

Every numeric parameter but the published, derived and user-set ones also
spans a range, ``low`` to ``high`` (:func:`param_range`): given in its table
with its basis (a measured spread, two published figures), or by
:data:`RANGE_RULES` from its kind. Studies (``--samples``, ``xlio
sensitivity``) draw parameter sets within these ranges.

``turtles-2010`` is calibrated on Turtles (Ben-Yehuda et al., "The Turtles
Project", OSDI 2010, section 4.1; 2.9 GHz Nehalem-era Xeon, KVM at L0 and L1,
no VMCS shadowing): one L2 CPUID is 13 hardware exits, 11 of them emulated
VMREAD/VMWRITE, and costs about 58,000 cycles: about 12k mode switches, 38.5k
L0 and 8k L1. With the profiles of :mod:`sim.profiles`:

* L0 = reflect 7,500 + 11 x emulate 2,200 + VMRESUME 3,300 + full merge 3,500
  = 38,500;
* L1 = 1,500 x 3.33 (cache pollution) + exit framework 3,000 = 8,000;
* switches = 13 x 1,000 = 13,000.

``shadow-vmcs`` is a what-if, not a machine: Turtles' Nehalem costs with the
VMCS-shadowing hardware of Haswell, dirty-vmcs12 tracking and a full register
cache, so that a comparison isolates what those three change.

``kvm-2019`` (built and calibrated in :mod:`sim.presets`) is an Intel server
of 2019 (Skylake-SP class) with VMCS shadowing, APICv and posted interrupts,
running a KVM with the 2019 nested VMX optimizations at L0 and L1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

KINDS = ("published", "calibrated", "derived", "estimate", "user")


class Arch(StrEnum):
    """The virtualization extension a preset's machine has."""

    VMX = "vmx"  # Intel VT-x: sim.nested.NestedVmx
    SVM = "svm"  # AMD-V: sim.nested_svm.NestedSvm


@dataclass(frozen=True)
class Param:
    value: Any
    source: str
    kind: str = "estimate"
    unit: str = "cycles"
    low: float | None = None  # the range a study draws from (None: by RANGE_RULES)
    high: float | None = None
    basis: str = ""  # where the range comes from


#: The range of a parameter whose table gives none, by its kind: (low factor,
#: high factor, basis). Published and derived values, user settings,
#: booleans, names and zeros have none.
RANGE_RULES: dict[str, tuple[float, float, str]] = {
    "estimate": (0.5, 2.0, "estimate: x0.5-x2 of the stated value (no source gives its spread)"),
    "calibrated": (
        0.8, 1.25,
        "calibrated on a published total through estimated shares: x0.8-x1.25 (estimate)",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    basis: str


def param_range(p: Param) -> Range | None:
    """The range a study draws ``p`` from, or None (a fixed value)."""
    if p.low is not None and p.high is not None:
        return Range(float(p.low), float(p.high), p.basis or p.source)
    if isinstance(p.value, bool) or not isinstance(p.value, int | float) or p.value == 0:
        return None
    rule = RANGE_RULES.get(p.kind)
    if rule is None:
        return None
    return Range(p.value * rule[0], p.value * rule[1], rule[2])


@dataclass(frozen=True)
class CostModel:
    """Cycle costs and era switches; all cycle values in cycles of the preset's clock."""

    name: str
    clock_ghz: float
    hw_exit: int  # one hardware VM exit plus the matching entry, with KVM's fixed path
    reflect: float  # nested_vmx_vmexit fixed part (vmcs switch, MMU context, bookkeeping)
    vmcs_emulate_register: int  # L0 emulates one VMREAD/VMWRITE, register operand
    vmcs_memory_extra: int  # added for a memory operand: decode, L1 GVA walk, map/unmap
    vmcs_exitless: int  # a VMREAD/VMWRITE that does not exit (shadowed)
    vmresume: float  # nested_vmx_run fixed part: checks, vmcs switch, entry
    merge_rare: float  # prepare_vmcs02_rare: only when vmcs12 is dirty
    l1_pollution: float  # L1 exit-path handler cycles = L0 handler cycles x this factor
    l1_exit_framework: int  # L1's vmx_handle_exit/vcpu_enter_guest around a handler
    handlers: dict[str, int] = field(default_factory=dict)  # handler cycles when run in L0
    vmcs_native: float = 0.0  # one VMREAD/VMWRITE L0 itself does in a nested transition
    msr_bitmap_merge: int = 0  # nested_vmx_prepare_msr_bitmap on every nested entry
    ept12_walk_level: int = 150  # L0 reads one EPT12 entry from L1 memory
    ept02_build: int = 400  # L0 installs one EPT02 entry (and its reverse map)
    ept02_zap: int = 60  # L0 drops one EPT02 entry
    lock: int = 40  # one uncontended MMU-lock round trip
    swap_evict: int = 6_000  # reclaim one page (unmap, rmap walk, queue the write)
    swap_in: int = 6_000  # bring one page back (fault path; the disk is not modeled)
    backend_frame: int = 1_200  # a virtio-net backend handling one frame, copy excluded
    copy_byte: float = 0.25  # copying one byte of a frame between guest buffers
    vcpu_wakeup: int = 4_000  # waking a halted vCPU's thread until it runs again
    posted_intr: int = 300  # sending one posted interrupt (PIR bit, ON, notification IPI)
    thread_wakeup: int = 5_000  # waking a sleeping host kernel thread (a vhost worker)
    guest_tx_packet: int = 10_000  # the guest's network stack and driver sending one packet
    guest_rx_packet: int = 5_000  # ... receiving one packet
    guest_hz: int = 250  # the guest kernel's timer tick (CONFIG_HZ), stopped while idle (NOHZ)
    guest_copy_byte: float = 0.5  # the guest copying payload to or from a socket
    tso: bool = False  # TSO/GSO negotiated on the guest's virtio-net (64 KiB segments)
    peer_turnaround_us: float = 8.0  # the bare-metal peer: receive to answer (RR) or ACK
    shadow_vmcs: bool = False
    dirty_tracking: bool = False  # vmcs12 dirty tracking: skip merge_rare when clean
    cache_reg: str = "base"
    apicv: bool = False  # APICv: virtual-interrupt delivery, posted interrupts at L0 and L1
    lazy_fpu: bool = True  # CR0.TS toggled around a return to userspace (pre-4.x KVM)
    user_return_msrs: int = 5  # MSRs restored on a return to userspace, set again on entry
    cr0_wp_guest_owned: bool = False  # CR0.WP passed through with EPT (Linux 6.4+)
    virtual_ept: str = "vtlb"  # L0's nested-EPT scheme
    avoid_invept: bool = False  # L1 skips INVEPT for not-present -> present
    # AMD SVM (sim.nested_svm); unused on VMX
    arch: str = Arch.VMX
    vls: bool = False  # virtual VMLOAD/VMSAVE: L1's VMLOAD/VMSAVE do not exit
    vgif: bool = False  # virtual GIF: L1's STGI/CLGI do not exit
    vmrun_emulate: float = 0.0  # nested_svm_vmrun + enter_svm_guest_mode, fixed part
    svm_vmexit: float = 0.0  # nested_svm_vmexit, fixed part
    msrpm_merge: int = 0  # nested_svm_vmrun_msrpm: L1's MSR permission map read and merged
    vmcb_save_copy: int = 0  # nested_vmcb02_prepare_save's SEG, DT and DR groups
    clean_bits: bool = False  # L0 skips those groups when VMCB12 marks them clean
    asid_flush: int = 0  # the ASID flush and MMU sync of one nested transition
    vmcb_access: int = 0  # L1 reads or writes one VMCB12 field: plain memory
    vmload_native: int = 0  # VMLOAD run by the CPU in L1 (virtual VMLOAD)
    vmsave_native: int = 0
    stgi_native: int = 0  # STGI run by the CPU in L1 (virtual GIF)
    clgi_native: int = 0
    description: str = ""
    params: dict[str, Param] = field(default_factory=dict)  # every value with its source

    def cycles_to_us(self, cycles: float) -> float:
        return cycles / (self.clock_ghz * 1000.0)


_FIELD_NAMES = {f.name for f in fields(CostModel)} - {"name", "handlers", "params", "description"}


def build(name: str, description: str, params: dict[str, Param]) -> CostModel:
    """A preset from its parameter table (``handler.X`` keys fill ``handlers``)."""
    unknown = {k for k in params if not k.startswith("handler.") and k not in _FIELD_NAMES}
    if unknown:
        raise KeyError(f"unknown parameters {sorted(unknown)}")
    for k, p in params.items():
        if p.kind not in KINDS:
            raise ValueError(f"{k}: kind {p.kind!r}")
        if (p.low is None) != (p.high is None):
            raise ValueError(f"{k}: a range needs both low and high")
        if p.low is not None and p.high is not None:
            if p.low > p.high:
                raise ValueError(f"{k}: range low {p.low} > high {p.high}")
            if not p.low <= p.value <= p.high:
                raise ValueError(f"{k}: value {p.value} outside its range {p.low}-{p.high}")
    handlers = {k[8:]: int(p.value) for k, p in params.items() if k.startswith("handler.")}
    values = {k: p.value for k, p in params.items() if not k.startswith("handler.")}
    return CostModel(
        name=name, description=description, handlers=handlers, params=dict(params), **values
    )


def with_params(model: CostModel, name: str, description: str, **changes: Param) -> CostModel:
    """A new preset: ``model``'s table with ``changes`` applied."""
    return build(name, description, {**model.params, **changes})


def P(
    value: Any,
    source: str,
    kind: str = "estimate",
    unit: str = "cycles",
    *,
    low: float | None = None,
    high: float | None = None,
    basis: str = "",
) -> Param:
    return Param(value, source, kind, unit, low, high, basis)


T = "Turtles (OSDI 2010) 4.1"

TURTLES_PARAMS: dict[str, Param] = {
    "clock_ghz": P(2.9, f"{T}: 2.9 GHz Xeon", "published", "GHz"),
    "hw_exit": P(1_000, f"{T}: one exit plus entry about 1,000 cycles", "published"),
    "reflect": P(7_500, f"{T}: L0 share of nested CPUID = 38.5k", "calibrated"),
    "vmcs_emulate_register": P(2_200, f"{T}: L0 share of nested CPUID = 38.5k", "calibrated"),
    "vmcs_memory_extra": P(
        1_800,
        "handle_vmread/handle_vmwrite with a memory operand add get_vmx_mem_address, "
        "an L1 page walk and a map/unmap of L1 memory",
    ),
    "vmcs_exitless": P(30, "tens of cycles for a VMREAD/VMWRITE that does not exit"),
    "vmresume": P(3_300, f"{T}: L0 share of nested CPUID = 38.5k", "calibrated"),
    "merge_rare": P(3_500, f"{T}: L0 share of nested CPUID = 38.5k", "calibrated"),
    "l1_pollution": P(
        5_000 / 1_500, f"{T}: the CPUID handler costs 5,000 in L1, 1,500 in L0", "published", "x"
    ),
    "l1_exit_framework": P(3_000, f"{T}: L1 share of nested CPUID = 8k", "calibrated"),
    "vmcs_native": P(
        0, "folded into reflect and vmresume, which Turtles calibrates whole", "derived"
    ),
    "msr_bitmap_merge": P(0, "folded into vmresume, which Turtles calibrates whole", "derived"),
    "ept12_walk_level": P(150, "kvm_vcpu_read_guest of 8 bytes of L1 memory (gfn->hva, copy)"),
    "ept02_build": P(400, "mmu_set_spte plus rmap_add"),
    "ept02_zap": P(60, "drop one SPTE while freeing a shadow root"),
    "lock": P(40, "an uncontended spin lock; contention is counted, not costed"),
    "swap_evict": P(6_000, "try_to_unmap + add_to_swap for one 4 KiB page, same at L0 or L1"),
    "swap_in": P(6_000, "do_swap_page without the disk, same at L0 or L1"),
    "backend_frame": P(1_200, "vhost-net handle_tx/handle_rx per packet, without the copy"),
    "copy_byte": P(0.25, "4 bytes per cycle for a guest-to-guest copy with translation"),
    "vcpu_wakeup": P(
        4_000,
        "a halted vCPU's thread woken (try_to_wake_up, schedule, vcpu_load): a few "
        "microseconds; no halt polling before Linux 4.0",
    ),
    "posted_intr": P(300, "unused without APICv: setting a PIR bit and sending one IPI"),
    "thread_wakeup": P(
        5_000, "try_to_wake_up and a context switch to a sleeping vhost worker, a couple of us"
    ),
    "guest_tx_packet": P(
        8_403,
        "calibrated by scripts/calibrate_netperf.py: single-level virtio TCP_STREAM on 1 GbE at "
        "about 48% of a CPU (Turtles, OSDI 2010, read off its figure)",
        "calibrated",
    ),
    "guest_rx_packet": P(
        4_201, "half of guest_tx_packet: a pure ACK or small packet received, no user copy"
    ),
    "guest_copy_byte": P(0.5, "copy_from_user/copy_to_user at about 2 bytes per cycle"),
    "guest_hz": P(
        1_000,
        "estimate: 2.6.3x enterprise guest kernels (RHEL 6) were built with CONFIG_HZ=1000; "
        "NOHZ idle (2.6.21+) stops the tick of an idle guest",
        "estimate",
        "Hz",
        low=100,
        high=1_000,
        basis="CONFIG_HZ's choices in 2.6.3x kernels: 100, 250, 300, 1000",
    ),
    "tso": P(
        False, "the Turtles paper's virtio setup is not known to use TSO: off", "estimate", ""
    ),
    "peer_turnaround_us": P(
        8.0,
        "a bare-metal Linux peer from a packet's arrival to its answer or ACK",
        "estimate",
        "us",
    ),
    "shadow_vmcs": P(False, "Nehalem has no VMCS shadowing (Haswell added it)", "published", ""),
    "dirty_tracking": P(False, "2.6.3x KVM rebuilt vmcs02 on every entry", "published", ""),
    "cache_reg": P("base", "2.6.3x KVM cached only RIP and RSP (regs_avail)", "published", ""),
    "apicv": P(False, "APICv arrived with Ivy Bridge-EP servers (2013)", "published", ""),
    "lazy_fpu": P(True, "2.6.3x KVM switched the FPU lazily (CR0.TS)", "published", ""),
    "user_return_msrs": P(
        5, "STAR, LSTAR, CSTAR, SYSCALL_MASK, plus KERNEL_GS_BASE switched by hand", "published", ""
    ),
    "cr0_wp_guest_owned": P(
        False, "CR0.WP became guest-owned with EPT in Linux 6.4", "published", ""
    ),
    "virtual_ept": P("vtlb", "the slides' description of KVM's scheme", "published", ""),
    "avoid_invept": P(False, "2.6.3x KVM invalidated after every EPT12 change", "estimate", ""),
    # handler cycles when the handler runs in L0 (or in a single-level VM's host)
    "handler.cpuid": P(
        1_500, f"{T}: the CPUID handler costs about 1,500 cycles in L0", "published"
    ),
    "handler.vmcall": P(1_500, "a no-op hypercall, same order as CPUID's handler"),
    "handler.io_kick": P(1_500, "kvm_fast_pio -> ioeventfd signal, same order as CPUID"),
    "handler.io_kernel": P(1_500, "an in-kernel PIO device (the PIC's ELCR), same order as CPUID"),
    "handler.mmio_fast": P(1_500, "handle_ept_misconfig fast-MMIO bus -> ioeventfd, as io_kick"),
    "handler.mmio_kick": P(4_500, "instruction fetch + decode + emulate, 3x io_kick"),
    "handler.io_user": P(
        12_000, "KVM_EXIT_IO round trip to the VMM's userspace (2 ring crossings, dispatch)"
    ),
    "handler.ept_violation": P(2_000, "kvm_mmu_page_fault installing one EPT entry"),
    "handler.external_interrupt": P(1_000, "ack + dispatch of one interrupt"),
    "handler.msr_write": P(800, "kvm_set_msr_common for a user-return MSR"),
    "handler.msr_read": P(800, "kvm_get_msr_common, same as a write"),
    "handler.cr_access": P(600, "CR0.TS toggle, handle_cr/clts"),
    "handler.cr0_write": P(3_000, "kvm_set_cr0 changing WP: kvm_mmu_reset_context, 2x cpuid"),
    "handler.inject": P(300, "L0 writes VM-entry interruption info before entry"),
    "handler.hlt": P(1_500, "kvm_emulate_halt up to blocking (wake-up apart), as CPUID"),
    "handler.eoi": P(1_500, "x2APIC EOI write emulated: apic_set_eoi, as CPUID"),
    "handler.apic_access": P(4_500, "an xAPIC MMIO access decoded and emulated, as mmio_kick"),
    "handler.apic_write": P(1_500, "an APIC-write trap (no decode), as CPUID"),
    "handler.intr_window": P(1_000, "interrupt-window exit: inject the pending interrupt"),
    "handler.tpr_below_threshold": P(1_000, "TPR-below-threshold exit: inject, as intr_window"),
    "handler.ept_fault": P(
        1_500, "kvm_mmu_page_fault entry for an L2 EPT violation, before walk and build"
    ),
    "handler.ept12_write": P(
        3_000, "emulate L1's write to a write-protected EPT12 page (decode, write)"
    ),
    "handler.unsync": P(1_000, "mark an EPT12 leaf unsync and make it writable (no emulation)"),
    "handler.invept": P(1_500, "handle_invept: memory-operand descriptor, checks, free the roots"),
    # shadow paging of a guest's own page tables (REFERENCE 13): estimates from the
    # code paths, in units of this preset's other handlers; no published figure
    "handler.pf_inject": P(
        2_500,
        "FNAME(page_fault): walk the guest's 4-level table (FNAME(walk_addr)), the PTE is not "
        "present, queue the #PF back (kvm_inject_page_fault): a walk plus CPUID's 1,500",
    ),
    "handler.pf_fill": P(
        4_000,
        "FNAME(page_fault) walk + FNAME(fetch): gfn_to_pfn, mmu_set_spte, rmap_add, "
        "pte_prefetch: the walk of pf_inject plus an EPT-entry install (ept_violation's 2,000)",
    ),
    "handler.pte_unsync": P(
        2_500, "a write fault on a write-protected leaf table: walk, kvm_unsync_page, make writable"
    ),
    "handler.pte_emulate": P(
        6_000, "decode and emulate the write (as mmio_kick's 4,500) + kvm_mmu_pte_write's update"
    ),
    "handler.cr3_load": P(
        3_000,
        "kvm_set_cr3 -> kvm_mmu_new_pgd (cached roots) + kvm_mmu_sync_roots' walk, as cr0_write",
    ),
    "handler.sync_page": P(
        12_000,
        "FNAME(sync_page) of one unsync leaf table at a CR3 load: 512 guest PTE reads "
        "(kvm_vcpu_read_guest_atomic, ~20 cycles each) and the changed SPTEs updated",
    ),
    "handler.invlpg": P(2_000, "kvm_mmu_invlpg -> FNAME(invlpg): a shadow walk, one SPTE zapped"),
    "handler.invvpid": P(
        1_500, "handle_invvpid: memory-operand descriptor, checks, flush, as invept"
    ),
    "handler.tsc_deadline": P(
        2_000, "kvm_set_lapic_tscdeadline_msr -> start_apic_timer -> hrtimer_start"
    ),
    "handler.cr4_write": P(
        3_000, "kvm_set_cr4 changing PGE: kvm_mmu_reset_context, as cr0_write's WP change"
    ),
}

TURTLES_2010 = build(
    "turtles-2010",
    "Nehalem-era 2.9 GHz Xeon, no VMCS shadowing, no APICv, KVM of 2010 at L0 and L1 "
    "(calibrated on Turtles, OSDI 2010)",
    TURTLES_PARAMS,
)

SHADOW_VMCS = with_params(
    TURTLES_2010,
    "shadow-vmcs",
    "what-if, not a machine: Turtles-era cycle costs with VMCS-shadowing hardware, "
    "dirty-vmcs12 tracking and a full register cache",
    shadow_vmcs=P(
        True, "what-if: VMCS shadowing (Haswell+); KVM's vmcs_shadow_fields.h", "published", ""
    ),
    dirty_tracking=P(
        True, "what-if: nested.c dirty_vmcs12, prepare_vmcs02_rare when dirty", "published", ""
    ),
    cache_reg=P("extended", "what-if: modern KVM caches every hot field", "published", ""),
)

BASE_PRESETS: dict[str, CostModel] = {p.name: p for p in (TURTLES_2010, SHADOW_VMCS)}

__all__ = [
    "BASE_PRESETS", "KINDS", "CostModel", "P", "Param", "SHADOW_VMCS", "TURTLES_2010",
    "TURTLES_PARAMS", "build", "replace", "with_params",
]  # fmt: skip
