"""Nested VMX: what only VMX does, on :class:`sim.machine.NestedMachine`.

Theory of operation
-------------------
Three levels: L0 (the only hypervisor in VMX root mode), L1 (a guest
hypervisor) and L2 (L1's guest). A :class:`NestedVmx` is in one of two states:

``L2``
    L2 is running (on vmcs02). Anything it does that exits lands in L0
    (:meth:`l2_exit`). L0 routes the exit (:mod:`sim.routing`): either L0
    handles it and re-enters L2, or L0 *reflects* it to L1
    (``nested_vmx_vmexit``: sync vmcs02 into vmcs12, load L1's host state,
    enter L1 at its host RIP) and the machine moves to ``L1``.
``L1``
    L1 is handling a reflected exit. Its handler's VMCS accesses run from the
    exit's L1 handler profile (:mod:`sim.profiles`); each VMREAD/VMWRITE that
    VMCS shadowing does not cover is a hardware exit to L0, emulated against
    the cached vmcs12 (register or memory operand). L1 may take exits of its
    own (:meth:`l1_exit`: its backend kicking its own device, MSR writes) and
    inject an interrupt into L2 (:meth:`l1_interrupt_l2`). It leaves with
    :meth:`l1_vmresume`: the entry epilogue, the deferred writes, and the
    VMRESUME that always traps and that L0 emulates by merging vmcs12 into
    vmcs02 (the rare part only when vmcs12 is dirty, or always on a KVM
    without dirty tracking). The machine is back in ``L2``.

What every architecture shares (routing's skeleton, handlers, interrupts,
HLT, the replay cache) is :mod:`sim.machine`; this module is VMX's part:
vmcs01/vmcs12/vmcs02 and the shadow VMCS, routing by vmcs12's controls
(:mod:`sim.routing`), reflection as nested_vmx_vmexit, L1's VMCS
instructions and which of them exit, and VMRESUME as nested_vmx_run. For
speed, compiled handler fragments and their costs are memoized per machine
(:mod:`sim.config`: the configuration is fixed for its life).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from enum import IntEnum

from .accounting import (
    L1_EXITLESS,
    L1_HANDLERS,
    SYNTHESIZED,
)
from .config import Config
from .machine import L0, L1, L2, ModelError, NestedMachine
from .profiles import (
    EMPTY_CACHE,
    FRAGMENTS,
    PROFILES,
    READ,
    CacheState,
    Instruction,
    compile_fragment,
    flush_on_entry,
)
from .routing import CR0_TS, CR0_WP, CR4_PGE, PF_VECTOR, L1Controls, route_l2_exit
from .vmcs import (
    ENTRY_NATIVE_ACCESSES,
    L1_HOST_STATE,
    MERGE_HOT,
    MERGE_RARE,
    REFLECT_EXIT_INFO,
    REFLECT_HOT_SYNC,
    REFLECT_NATIVE_ACCESSES,
    SHADOW_COPY_BACK,
    SHADOW_REFRESH,
    Vmcs,
)
from .vmx import (
    KVM_L1_CPU_BASED,
    KVM_L1_PIN_APICV,
    KVM_L1_PIN_BASED,
    KVM_L1_SECONDARY,
    KVM_L1_SECONDARY_APICV,
    L1_INTERCEPTED_MSRS,
    L1_INTERCEPTED_MSRS_NO_APICV,
    SHADOW_FIELDS_RO,
    SHADOW_FIELDS_RW,
    CpuBased,
    ExitReason,
    VmcsField,
)

R = ExitReason
__all__ = ["L0", "L1", "L2", "Config", "ModelError", "NestedMachine", "NestedVmx"]


@dataclass(frozen=True)
class _Executed:
    """The aggregate effect of one run of L1 VMCS instructions (memoized)."""

    trapped_reads: tuple[int, ...]
    trapped_writes: tuple[int, ...]
    exitless_reads: tuple[int, ...]
    exitless_writes: tuple[int, ...]
    dirties: bool


class NestedVmx(NestedMachine):
    """Nested VMX: see the module docstring."""

    l1_controls: L1Controls

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        c = self.costs
        self._new_vmcs()
        apicv = config.apicv
        pin = KVM_L1_PIN_BASED | (KVM_L1_PIN_APICV if apicv else 0)
        secondary = KVM_L1_SECONDARY | (KVM_L1_SECONDARY_APICV if apicv else 0)
        self.l1_controls = L1Controls(
            cpu_based=KVM_L1_CPU_BASED,
            pin_based=pin,
            msr_bitmap=L1_INTERCEPTED_MSRS if apicv else L1_INTERCEPTED_MSRS_NO_APICV,
            cr0_mask=~(CR0_TS | (CR0_WP if c.cr0_wp_guest_owned else 0)),
        )
        self.vmcs12.load(
            [
                (VmcsField.CPU_BASED_VM_EXEC_CONTROL, KVM_L1_CPU_BASED),
                (VmcsField.PIN_BASED_VM_EXEC_CONTROL, pin),
                (VmcsField.SECONDARY_VM_EXEC_CONTROL, secondary),
            ]
        )
        self._compiled: dict[
            tuple[str, CacheState], tuple[tuple[Instruction, ...], CacheState]
        ] = {}
        self._executed: dict[tuple[Instruction, ...], _Executed] = {}
        self._handler_plans: dict[str, tuple[tuple[Instruction, ...], CacheState]] = {}
        self._entry_plans: dict[CacheState, tuple[tuple[Instruction, ...], CacheState]] = {}
        # per-instruction costs, fixed for the machine's life
        self._trap_l0 = c.vmcs_emulate_register + (
            c.vmcs_memory_extra if config.operand == "memory" else 0
        )
        self._shadow_refresh = len(SHADOW_REFRESH) * c.vmcs_exitless
        self._shadow_copy_back = len(SHADOW_COPY_BACK) * c.vmcs_exitless
        # L0's own work per reflection and per nested entry: the fixed part plus
        # its native VMREAD/VMWRITEs of the field lists (sim.vmcs) and, on
        # entry, the MSR-bitmap merge
        self._reflect_l0 = c.reflect + c.vmcs_native * REFLECT_NATIVE_ACCESSES
        self._entry_l0 = c.vmresume + c.vmcs_native * ENTRY_NATIVE_ACCESSES + c.msr_bitmap_merge

    def reset_stats(self) -> None:
        """Start counting afresh; vmcs12 keeps its values, the VMCS counters restart."""
        super().reset_stats()
        values = self.vmcs12.values
        self._new_vmcs()
        self.vmcs12.load(values.items())

    def _route(self, reason: ExitReason, **where: int) -> int:
        return route_l2_exit(reason, self.l1_controls, **where)

    def _new_vmcs(self) -> None:
        """Fresh VMCS objects, their fixed per-event field lists bound to the counters."""
        self.vmcs01 = Vmcs("vmcs01")
        self.vmcs12 = Vmcs("vmcs12")
        self.vmcs02 = Vmcs("vmcs02")
        self.shadow_vmcs = Vmcs("shadow-vmcs12")
        me = weakref.ref(self)  # the VMCSs belong to the machine: no cycle back to it
        reflected = lambda: me().stats.reflected  # type: ignore[union-attr]  # noqa: E731
        entries = lambda: me().stats.nested_entries  # type: ignore[union-attr]  # noqa: E731
        full = lambda: me().stats.merges_full  # type: ignore[union-attr]  # noqa: E731
        self.vmcs02.bind(False, REFLECT_HOT_SYNC, reflected)
        self.vmcs12.bind(True, REFLECT_HOT_SYNC, reflected)
        self.vmcs12.bind(True, REFLECT_EXIT_INFO, reflected)
        self.vmcs01.bind(True, L1_HOST_STATE, reflected)
        self.vmcs02.bind(True, MERGE_HOT, entries)
        self.vmcs02.bind(True, MERGE_RARE, full)
        if self.cfg.shadow_vmcs:
            self.shadow_vmcs.bind(True, SHADOW_REFRESH, reflected)
            self.shadow_vmcs.bind(False, SHADOW_COPY_BACK, entries)

    def _vmcss(self) -> tuple[Vmcs, Vmcs, Vmcs, Vmcs]:
        """The VMCS objects a replay record refers to by index."""
        return self.vmcs01, self.vmcs12, self.vmcs02, self.shadow_vmcs

    def _reflect(
        self,
        reason: IntEnum,
        profile_name: str,
        l0_extra: float,
        hw: float,
        hw_reason: IntEnum,
    ) -> None:
        """nested_vmx_vmexit, then L1's handler up to (not including) its entry epilogue."""
        profile = PROFILES[profile_name]
        s = self._stats
        c = self.costs
        s.reflected += 1
        l0 = self._reflect_l0 + (self._shadow_refresh if self.cfg.shadow_vmcs else 0)
        s.cycles_l0 += l0
        if hw:  # a synthesized reflection (L2 was halted in L0) is no hardware exit
            s.exit(L2, hw_reason, hw + l0 + l0_extra)
        else:
            s.work[SYNTHESIZED] += l0 + l0_extra
        s.crossings += 1  # L0 -> L1 at L1's host RIP
        self.state = L1
        self._cache = EMPTY_CACHE
        how = "reflected to L1" if reason is hw_reason else f"reflected to L1 as {reason.name}"
        if self._stats.trace is not None:
            self._trace("L2", "exit", hw_reason.name, how, profile_name)
        # the pollution factor applies here only: handler work in L1's exit path
        h1 = c.l1_exit_framework + self._l1_handler[profile.handler]
        s.cycles_l1 += h1
        s.work[L1_HANDLERS] += h1
        if s.trace is not None:
            self._trace("L1", "handler", profile_name, "exit framework + handler")
        # a reflection always starts from an empty register cache, so the
        # handler's fragments compile once per profile into one plan
        plan = self._handler_plans.get(profile_name)
        if plan is None:
            plan = self._compile(profile.fragments, EMPTY_CACHE, flush=False)
            self._handler_plans[profile_name] = plan
        instrs, self._cache = plan
        if instrs:
            self._execute(instrs, profile_name)
        for own in profile.own_exits(c):
            self.l1_exit(own.reason, own.handler, cause="l1-host-switch", count=own.count)
        if profile.sets_controls or profile.clears_controls:
            ctl = self.l1_controls
            ctl.cpu_based = (ctl.cpu_based | profile.sets_controls) & ~profile.clears_controls

    def _compile(
        self, fragments: tuple[str, ...], state: CacheState, *, flush: bool
    ) -> tuple[tuple[Instruction, ...], CacheState]:
        """Fragments run in order from ``state``; with ``flush``, plus the entry's writes."""
        out: list[Instruction] = []
        for name in fragments:
            instrs, state = compile_fragment(FRAGMENTS[name], state, self.cfg.cache_reg)
            out.extend(instrs)
        if flush:
            out.extend(flush_on_entry(state))
            state = EMPTY_CACHE
        return tuple(out), state

    def _run_fragment(self, name: str) -> None:
        key = (name, self._cache)
        hit = self._compiled.get(key)
        if hit is None:
            hit = self._compile((name,), self._cache, flush=False)
            self._compiled[key] = hit
        instrs, self._cache = hit
        if instrs:
            self._execute(instrs, name)

    def _classify(self, instrs: tuple[Instruction, ...]) -> _Executed:
        shadow = self.cfg.shadow_vmcs
        exitless_all = not self.cfg.vmcs_exits
        tr: list[int] = []
        tw: list[int] = []
        er: list[int] = []
        ew: list[int] = []
        dirties = False
        for op, f in instrs:
            if op == READ:
                free = exitless_all or (shadow and (f in SHADOW_FIELDS_RO or f in SHADOW_FIELDS_RW))
                (er if free else tr).append(f)
            else:
                free = exitless_all or (shadow and f in SHADOW_FIELDS_RW)
                (ew if free else tw).append(f)
                # nested.c handle_vmwrite: writes outside the read-write shadow
                # list dirty vmcs12 and force prepare_vmcs02_rare at the next entry
                if f not in SHADOW_FIELDS_RW:
                    dirties = True
        return _Executed(tuple(tr), tuple(tw), tuple(er), tuple(ew), dirties)

    def _execute(self, instrs: tuple[Instruction, ...], where: str) -> None:
        ex = self._executed.get(instrs)
        if ex is None:
            ex = self._classify(instrs)
            self._executed[instrs] = ex
        s = self._stats
        c = self.costs
        nr = len(ex.trapped_reads)
        nw = len(ex.trapped_writes)
        n = nr + nw
        if n:
            s.l0_exits += n
            s.l1_exits += n
            s.vmcs_emulated += n
            s.crossings += 2 * n
            s.cycles_switch += n * c.hw_exit
            s.cycles_l0 += n * self._trap_l0
            s.by_cause["vmcs-access"] += n
            if nr:
                s.exit(L1, R.VMREAD, nr * (c.hw_exit + self._trap_l0), nr)
                self.vmcs12.charge_reads(ex.trapped_reads)
            if nw:
                s.exit(L1, R.VMWRITE, nw * (c.hw_exit + self._trap_l0), nw)
                self.vmcs12.charge_writes(ex.trapped_writes)
        m = len(ex.exitless_reads) + len(ex.exitless_writes)
        if m:
            s.vmcs_exitless += m
            s.cycles_l1 += m * c.vmcs_exitless
            s.work[L1_EXITLESS] += m * c.vmcs_exitless
            self.shadow_vmcs.charge_reads(ex.exitless_reads)
            self.shadow_vmcs.charge_writes(ex.exitless_writes)
        if ex.dirties:
            self.vmcs12_dirty = True
        if s.trace is not None:
            trap = c.hw_exit + self._trap_l0
            total = s.cycles - n * trap - m * c.vmcs_exitless
            for op, f in instrs:
                kind = "VMREAD" if op == READ else "VMWRITE"
                trapped = f in (ex.trapped_reads if op == READ else ex.trapped_writes)
                exitless = not trapped and f in (
                    ex.exitless_reads if op == READ else ex.exitless_writes
                )
                total += trap if trapped else c.vmcs_exitless if exitless else 0
                detail = "trapped" if trapped else "exitless" if exitless else "cached"
                s.trace.append(("L1", kind, VmcsField(f).name, detail, where, total))

    def l1_vmresume(self) -> None:
        """L1's entry epilogue, deferred writes, then the VMRESUME L0 emulates."""
        self._require(L1, "VMRESUME")
        plan = self._entry_plans.get(self._cache)
        if plan is None:
            plan = self._compile(("entry_epilogue",), self._cache, flush=True)
            self._entry_plans[self._cache] = plan
        instrs, self._cache = plan
        if instrs:
            self._execute(instrs, "entry")
        s = self._stats
        c = self.costs
        full = self.vmcs12_dirty or not c.dirty_tracking
        l0 = self._entry_l0 + (c.merge_rare if full else 0)
        if self.cfg.shadow_vmcs:
            l0 += self._shadow_copy_back
        self._charge_l1_exits(R.VMRESUME, l0, "vmresume")  # L1 -> L0, L0 -> L2
        s.nested_entries += 1
        if full:
            s.merges_full += 1
        self.vmcs12_dirty = False
        self.state = L2
        self.l2_apic.accept(self.l2_pid)  # vmcs02's PI descriptor is processed on entry
        if self._stats.trace is not None:
            self._trace("L1", "exit", "VMRESUME", "merge full" if full else "merge hot", "")

    def l1_intercepts_guest_paging(self) -> None:
        """L1 without EPT for L2 (vmx_update_exception_bitmap: #PF with PFEC mask and
        match 0; CR3-load and INVLPG exiting; CR4.PGE not guest-owned without EPT,
        KVM_POSSIBLE_CR4_GUEST_BITS): vmcs12 as L1 sets it."""
        ctl = self.l1_controls
        ctl.exception_bitmap |= 1 << PF_VECTOR
        ctl.cpu_based |= CpuBased.CR3_LOAD_EXITING | CpuBased.INVLPG_EXITING
        ctl.cr4_mask |= CR4_PGE

    def l1_set_io_passthrough(self, ports: frozenset[int]) -> None:
        """L1 switches vmcs12 to I/O bitmaps with ``ports`` clear (delegation), or back."""
        ctl = self.l1_controls
        if ports:
            ctl.cpu_based = (ctl.cpu_based & ~CpuBased.UNCOND_IO_EXITING) | CpuBased.USE_IO_BITMAPS
        else:
            ctl.cpu_based = (ctl.cpu_based & ~CpuBased.USE_IO_BITMAPS) | CpuBased.UNCOND_IO_EXITING
        ctl.io_passthrough = ports
        self.vmcs12.write(VmcsField.CPU_BASED_VM_EXEC_CONTROL, ctl.cpu_based)
        self.vmcs12_dirty = True
