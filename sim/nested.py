"""The nested VMX state machine: who runs, and what every crossing costs.

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
    inject an interrupt into L2 (:meth:`l1_inject_l2_irq`). It leaves with
    :meth:`l1_vmresume`: the entry epilogue, the deferred writes, and the
    VMRESUME that always traps and that L0 emulates by merging vmcs12 into
    vmcs02 (the rare part only when vmcs12 is dirty, or always on a KVM
    without dirty tracking). The machine is back in ``L2``.

With ``nested=False`` the same calls model a plain VM of L0: every exit of
the guest is L0's, and the guest's exits are counted as ``l2_exits`` (the
workload's guest) so that single-level and nested runs line up column by column.

Pure and deterministic: no I/O, no clocks. For speed, compiled handler
fragments and their costs are memoized per machine (the configuration is
fixed for a machine's life), so an exit costs a few additions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .accounting import Stats
from .costs import CostModel
from .profiles import (
    CACHE_MODES,
    EMPTY_CACHE,
    FRAGMENTS,
    PROFILES,
    READ,
    CacheState,
    Instruction,
    compile_fragment,
    flush_on_entry,
)
from .routing import L1Controls, route_l2_exit
from .vmcs import (
    L1_HOST_STATE,
    MERGE_HOT,
    MERGE_RARE,
    REFLECT_EXIT_INFO,
    REFLECT_HOT_SYNC,
    SHADOW_COPY_BACK,
    SHADOW_REFRESH,
    Vmcs,
)
from .vmx import (
    KVM_L1_CPU_BASED,
    KVM_L1_PIN_BASED,
    KVM_L1_SECONDARY,
    SHADOW_FIELDS_RO,
    SHADOW_FIELDS_RW,
    CpuBased,
    ExitReason,
    VmcsField,
)

L0, L1, L2 = 0, 1, 2
R = ExitReason
OPERANDS = ("register", "memory")


class ModelError(RuntimeError):
    """A caller drove the state machine through a transition that cannot happen."""


@dataclass(frozen=True)
class Config:
    """A resolved configuration: the cost preset plus every switch."""

    costs: CostModel
    nested: bool = True
    shadow_vmcs: bool = False
    vmcs_exits: bool = True  # False: Turtles' hypothetical exitless VMREAD/VMWRITE
    operand: str = "register"
    cache_reg: str = "base"
    trace: bool = False

    @classmethod
    def from_preset(cls, costs: CostModel, **overrides: Any) -> Config:
        """Defaults from the preset (shadowing, cache mode), then the overrides."""
        base: dict[str, Any] = {"shadow_vmcs": costs.shadow_vmcs, "cache_reg": costs.cache_reg}
        base.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(costs=costs, **base)
        if cfg.operand not in OPERANDS:
            raise ValueError(f"operand must be one of {', '.join(OPERANDS)}")
        if cfg.cache_reg not in CACHE_MODES:
            raise ValueError(f"cache_reg must be one of {', '.join(CACHE_MODES)}")
        return cfg

    def describe(self) -> dict[str, Any]:
        return {
            "preset": self.costs.name,
            "clock_ghz": self.costs.clock_ghz,
            "nested": self.nested,
            "shadow_vmcs": self.shadow_vmcs,
            "vmcs_exits": self.vmcs_exits,
            "operand": self.operand,
            "cache_reg": self.cache_reg,
            "dirty_tracking": self.costs.dirty_tracking,
        }


@dataclass(frozen=True)
class _Executed:
    """The aggregate effect of one run of L1 VMCS instructions (memoized)."""

    trapped_reads: tuple[int, ...]
    trapped_writes: tuple[int, ...]
    exitless_reads: tuple[int, ...]
    exitless_writes: tuple[int, ...]
    dirties: bool


class NestedVmx:
    """L0's view of one L2 vCPU and its L1: see the module docstring."""

    def __init__(self, config: Config) -> None:
        self.cfg = config
        c = config.costs
        self.costs = c
        self.stats = Stats(trace=config.trace)
        self._new_vmcs()
        self.l1_controls = L1Controls(cpu_based=KVM_L1_CPU_BASED, pin_based=KVM_L1_PIN_BASED)
        self.vmcs12.load(
            [
                (VmcsField.CPU_BASED_VM_EXEC_CONTROL, KVM_L1_CPU_BASED),
                (VmcsField.PIN_BASED_VM_EXEC_CONTROL, KVM_L1_PIN_BASED),
                (VmcsField.SECONDARY_VM_EXEC_CONTROL, KVM_L1_SECONDARY),
            ]
        )
        self.memory: Any = None  # (VirtualEpt, L1Mmu) when a workload models memory
        self.datapath: Any = None  # the Datapath, for the network workloads
        self.state = L2
        self._l1_background = 0
        self.vmcs12_dirty = False
        self._cache: CacheState = EMPTY_CACHE
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
        self._l1_handler = {k: v * c.l1_pollution for k, v in c.handlers.items()}
        self._shadow_refresh = len(SHADOW_REFRESH) * c.vmcs_exitless
        self._shadow_copy_back = len(SHADOW_COPY_BACK) * c.vmcs_exitless

    # ------------------------------------------------------------------ helpers
    def reset_stats(self) -> None:
        """Start counting afresh (after set-up that a measurement excludes)."""
        self.stats = Stats(trace=self.cfg.trace)
        values = self.vmcs12.values
        self._new_vmcs()
        self.vmcs12.load(values.items())

    def _new_vmcs(self) -> None:
        """Fresh VMCS objects, their fixed per-event field lists bound to the counters."""
        self.vmcs01 = Vmcs("vmcs01")
        self.vmcs12 = Vmcs("vmcs12")
        self.vmcs02 = Vmcs("vmcs02")
        self.shadow_vmcs = Vmcs("shadow-vmcs12")
        reflected = lambda: self.stats.reflected  # noqa: E731
        entries = lambda: self.stats.nested_entries  # noqa: E731
        full = lambda: self.stats.merges_full  # noqa: E731
        self.vmcs02.bind(False, REFLECT_HOT_SYNC, reflected)
        self.vmcs12.bind(True, REFLECT_HOT_SYNC, reflected)
        self.vmcs12.bind(True, REFLECT_EXIT_INFO, reflected)
        self.vmcs01.bind(True, L1_HOST_STATE, reflected)
        self.vmcs02.bind(True, MERGE_HOT, entries)
        self.vmcs02.bind(True, MERGE_RARE, full)
        if self.cfg.shadow_vmcs:
            self.shadow_vmcs.bind(True, SHADOW_REFRESH, reflected)
            self.shadow_vmcs.bind(False, SHADOW_COPY_BACK, entries)

    def _trace(self, *event: Any) -> None:
        if self.stats.trace is not None:
            self.stats.trace.append(event)

    def _require(self, state: int, what: str) -> None:
        if self.state != state:
            raise ModelError(f"{what} needs {('L0', 'L1', 'L2')[state]} running")

    def _require_l1(self, what: str) -> None:
        if self.state != L1 and not self._l1_background:
            raise ModelError(f"{what} needs L1 running")

    @contextmanager
    def l1_background(self) -> Iterator[None]:
        """L1 work on another of L1's vCPUs, one not running L2 (L1's kswapd, say).

        Its exits are L1 exits to L0 while this L2 vCPU keeps its state; it
        cannot VMRESUME this L2.
        """
        self._l1_background += 1
        try:
            yield
        finally:
            self._l1_background -= 1

    # ------------------------------------------------------------- L2 side
    def l2_exit(
        self,
        reason: ExitReason,
        handler: str,
        *,
        port: int = -1,
        msr: int = -1,
        to_l1: bool | None = None,
        l0_handler: str | None = None,
        l0_extra: float = 0.0,
    ) -> int:
        """A hardware exit of L2 into L0; returns the level that handles it.

        ``handler`` names the L1 profile when reflected and, unless
        ``l0_handler`` is given, the L0 handler cost otherwise. ``to_l1``
        overrides routing for exits L0 sees first and then hands to L1 (an
        EPT violation that EPT12 does not map). ``l0_extra`` is L0 work done
        before the decision (a walk of EPT12). After a return of 1 the
        caller drives L1 and ends with :meth:`l1_vmresume`.
        """
        self._require(L2, "an L2 exit")
        s = self.stats
        c = self.costs
        s.l2_exits += 1
        s.l0_exits += 1
        s.crossings += 1
        s.cycles_switch += c.hw_exit
        s.cycles_l0 += l0_extra
        if to_l1 is None:
            level = (
                route_l2_exit(reason, self.l1_controls, port=port, msr=msr)
                if self.cfg.nested
                else L0
            )
        else:
            level = L1 if (to_l1 and self.cfg.nested) else L0
        if level == L0:
            h = c.handlers[l0_handler or handler]
            s.cycles_l0 += h
            s.crossings += 1
            s.exit(L2, reason, c.hw_exit + h + l0_extra)
            self._trace("L2", "exit", reason.name, "L0 handles", handler)
            return L0
        self._reflect(reason, handler, l0_extra)
        return L1

    def _reflect(self, reason: ExitReason, profile_name: str, l0_extra: float) -> None:
        """nested_vmx_vmexit, then L1's handler up to (not including) its entry epilogue."""
        profile = PROFILES[profile_name]
        s = self.stats
        c = self.costs
        s.reflected += 1
        l0 = c.reflect + (self._shadow_refresh if self.cfg.shadow_vmcs else 0)
        s.cycles_l0 += l0
        s.exit(L2, reason, c.hw_exit + l0 + l0_extra)
        s.crossings += 1  # L0 -> L1 at L1's host RIP
        self.state = L1
        self._cache = EMPTY_CACHE
        self._trace("L2", "exit", reason.name, "reflected to L1", profile_name)
        s.cycles_l1 += c.l1_exit_framework + self._l1_handler[profile.handler]
        # a reflection always starts from an empty register cache, so the
        # handler's fragments compile once per profile into one plan
        plan = self._handler_plans.get(profile_name)
        if plan is None:
            plan = self._compile(profile.fragments, EMPTY_CACHE, flush=False)
            self._handler_plans[profile_name] = plan
        instrs, self._cache = plan
        if instrs:
            self._execute(instrs, profile_name)
        for own in profile.own_exits:
            self.l1_exit(own.reason, own.handler, cause="l1-host-switch", count=own.count)

    # ------------------------------------------------------------- L1 side
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
        s = self.stats
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
            self.shadow_vmcs.charge_reads(ex.exitless_reads)
            self.shadow_vmcs.charge_writes(ex.exitless_writes)
        if ex.dirties:
            self.vmcs12_dirty = True
        if s.trace is not None:
            for op, f in instrs:
                kind = "VMREAD" if op == READ else "VMWRITE"
                trapped = f in (ex.trapped_reads if op == READ else ex.trapped_writes)
                s.trace.append(
                    ("L1", kind, VmcsField(f).name, "trapped" if trapped else "exitless", where)
                )

    def l1_exit(self, reason: ExitReason, handler: str, *, cause: str, count: int = 1) -> None:
        """``count`` hardware exits L1 takes to L0 on its own (L0 handles them)."""
        self._require_l1("an L1 exit")
        s = self.stats
        c = self.costs
        h = c.handlers[handler]
        s.l1_exits += count
        s.l0_exits += count
        s.crossings += 2 * count
        s.cycles_switch += count * c.hw_exit
        s.cycles_l0 += count * h
        s.exit(L1, reason, count * (c.hw_exit + h), count)
        s.by_cause[cause] += count
        if cause == "l1-backend":
            s.l1_be_exits += count
        self._trace("L1", "exit", reason.name, cause, count)

    def l1_work(self, cycles: float) -> None:
        """Cycles L1 spends without exiting (its backend copying a frame)."""
        self.stats.cycles_l1 += cycles

    def l1_inject_l2_irq(self) -> None:
        """L1 queues an interrupt for L2 in vmcs12's VM-entry interruption info."""
        self._require(L1, "L1 injecting into L2")
        self._run_fragment("inject_irq")
        self.stats.irqs_injected_l2 += 1
        self._trace("L1", "inject", "L2")

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
        s = self.stats
        c = self.costs
        full = self.vmcs12_dirty or not c.dirty_tracking
        l0 = c.vmresume + (c.merge_rare if full else 0)
        if self.cfg.shadow_vmcs:
            l0 += self._shadow_copy_back
        s.l0_exits += 1
        s.l1_exits += 1
        s.crossings += 2  # L1 -> L0, L0 -> L2
        s.cycles_switch += c.hw_exit
        s.cycles_l0 += l0
        s.exit(L1, R.VMRESUME, c.hw_exit + l0)
        s.by_cause["vmresume"] += 1
        s.nested_entries += 1
        if full:
            s.merges_full += 1
        self.vmcs12_dirty = False
        self.state = L2
        self._trace("L1", "exit", "VMRESUME", "merge full" if full else "merge hot", "")

    # ------------------------------------------------------------- L0 side
    def l0_work(self, cycles: float) -> None:
        """Cycles L0 spends outside any exit handler (its backend thread)."""
        self.stats.cycles_l0 += cycles

    def l0_inject_l2_irq(self, *, in_exit: bool) -> None:
        """L0 injects an interrupt into L2 (vmcs02's entry interruption info).

        Inside an exit L0 is handling, the write rides on the next entry. From
        outside (a backend thread), L0 first kicks L2's vCPU, which costs an
        external-interrupt exit of L2 that L0 handles itself.
        """
        self._require(L2, "L0 injecting into L2")
        if not in_exit:
            self.l2_exit(R.EXTERNAL_INTERRUPT, "external_interrupt")
        self.stats.cycles_l0 += self.costs.handlers["inject"]
        self.stats.irqs_injected_l2 += 1
        self._trace("L0", "inject", "L2")

    def l0_interrupt_l1(self) -> None:
        """L0 raises an interrupt for L1 (L1's own device).

        With L2 running, L0 must first leave L2 and deliver the interrupt to L1
        as a reflected EXTERNAL_INTERRUPT exit (L1 asked for external-interrupt
        exiting in vmcs12): the machine ends in ``L1`` and the caller ends with
        :meth:`l1_vmresume`. With L1 running, L1 takes the interrupt's exit.
        """
        s = self.stats
        s.irqs_injected_l1 += 1
        s.cycles_l0 += self.costs.handlers["inject"]
        if self.state == L2:
            self.l2_exit(R.EXTERNAL_INTERRUPT, "external_interrupt", to_l1=True)
        else:
            self.l1_exit(R.EXTERNAL_INTERRUPT, "external_interrupt", cause="l1-irq")

    # ------------------------------------------------------------- control
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
