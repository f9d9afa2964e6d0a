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
    inject an interrupt into L2 (:meth:`l1_interrupt_l2`). It leaves with
    :meth:`l1_vmresume`: the entry epilogue, the deferred writes, and the
    VMRESUME that always traps and that L0 emulates by merging vmcs12 into
    vmcs02 (the rare part only when vmcs12 is dirty, or always on a KVM
    without dirty tracking). The machine is back in ``L2``.

With ``nested=False`` the same calls model a plain VM of L0: every exit of
the guest is L0's, and the guest's exits are counted as ``l2_exits`` (the
workload's guest) so that single-level and nested runs line up column by column.

Pure and deterministic: no I/O, no clocks. For speed, compiled handler
fragments and their costs are memoized per machine (:mod:`sim.config`: the
configuration is fixed for its life), and a whole operation can be
*replayed* (:meth:`replay`, :mod:`sim.replay`) from a machine state
(:meth:`_signature`). The machine's own methods add to the counters
directly (adding commutes with pending replays); only readers go through
:attr:`stats`. L2's APIC bits are :mod:`sim.apic`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .accounting import (
    L0_DELIVERY,
    L0_WAKEUPS,
    L1_EXITLESS,
    L1_HANDLERS,
    L1_IRQ,
    L1_WAKEUPS,
    SYNTHESIZED,
    Stats,
)
from .apic import NIC_VECTOR, PostedInterruptDescriptor, VirtualApicPage
from .config import Config
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
from .replay import Replay
from .routing import CR0_TS, CR0_WP, L1Controls, route_l2_exit
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
    Msr,
    VmcsField,
)

L0, L1, L2 = 0, 1, 2
R = ExitReason


class ModelError(RuntimeError):
    """A caller drove the state machine through a transition that cannot happen."""


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
        self._stats = Stats(trace=config.trace)
        # recorded effects of whole operations (see replay) and how many
        # replays of each the counters do not show yet
        self._replays: dict[Any, dict[tuple[Any, ...], Replay]] = {}
        self._pending: dict[Replay, int] = {}
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
        # L2's local APIC as L1 sees it (L1 owns it): the posted-interrupt
        # descriptor L1 set up for L2 and the virtual-APIC page's IRR and ISR
        self.l2_pid = PostedInterruptDescriptor()
        self.l2_apic = VirtualApicPage()
        self.l2_halted = False  # L2 executed HLT and waits for an interrupt
        self.l1_halted = False  # nested: L1 blocked L2's vCPU and halted its own
        self._memory: Any = None  # weak references to (VirtualEpt, L1Mmu), see memory
        self._datapath: Any = None  # a weak reference to the Datapath (network workloads)
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
        # L0's own work per reflection and per nested entry: the fixed part plus
        # its native VMREAD/VMWRITEs of the field lists (sim.vmcs) and, on
        # entry, the MSR-bitmap merge
        self._reflect_l0 = c.reflect + c.vmcs_native * REFLECT_NATIVE_ACCESSES
        self._entry_l0 = c.vmresume + c.vmcs_native * ENTRY_NATIVE_ACCESSES + c.msr_bitmap_merge

    # ------------------------------------------------------------------ helpers
    @property
    def datapath(self) -> Any:
        """The Datapath driving this machine (network workloads), or None.

        Held weakly: the Datapath holds the machine, and a sweep must not keep
        dead machines until the cyclic collector runs."""
        return None if self._datapath is None else self._datapath()

    @datapath.setter
    def datapath(self, dp: Any) -> None:
        self._datapath = None if dp is None else weakref.ref(dp)

    @property
    def memory(self) -> Any:
        """(VirtualEpt, L1Mmu) when a workload models memory, else None; held
        weakly for the same reason as :attr:`datapath` (both hold the machine)."""
        if self._memory is None:
            return None
        vept, mmu = self._memory[0](), self._memory[1]()
        return None if vept is None or mmu is None else (vept, mmu)

    @memory.setter
    def memory(self, parts: Any) -> None:
        self._memory = None if parts is None else tuple(weakref.ref(p) for p in parts)

    @property
    def stats(self) -> Stats:
        """The counters, with every replayed operation applied."""
        if self._pending:
            self._flush()
        return self._stats

    def reset_stats(self) -> None:
        """Start counting afresh (after set-up that a measurement excludes)."""
        self._pending.clear()
        self._stats = Stats(trace=self.cfg.trace)
        values = self.vmcs12.values
        self._new_vmcs()
        self.vmcs12.load(values.items())

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

    def _trace(self, level: str, event: str, what: str, detail: Any = "", where: Any = "") -> None:
        """One trace event: (level, event, what, detail, where, cycles so far)."""
        s = self._stats
        if s.trace is not None:
            s.trace.append((level, event, what, detail, where, s.cycles))

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

    # ------------------------------------------------------------- replay
    def _signature(self) -> tuple[Any, ...]:
        """Everything an operation's effect depends on, besides its arguments
        (the virtual-APIC page's ``delivered`` is a counter: a delta, not state)."""
        pid = self.l2_pid
        apic = self.l2_apic
        return (
            self.state, self._cache, self.vmcs12_dirty, self.l2_halted, self.l1_halted,
            self._l1_background, self.l1_controls.state(), pid.on, pid.pir, apic.irr, apic.isr,
        )  # fmt: skip

    _SIG_FIELDS = ("state", "_cache", "vmcs12_dirty", "l2_halted", "l1_halted", "_l1_background")
    _SIG_APIC = ("on", "pir", "irr", "isr")  # signature fields 7-10: l2_pid's, then l2_apic's

    def _restore(self, changes: tuple[tuple[int, Any], ...]) -> None:
        """Set the signature's fields that a replayed operation changes."""
        for i, value in changes:
            if i < 6:
                setattr(self, self._SIG_FIELDS[i], value)
            elif i == 6:
                self.l1_controls.restore(value)
            else:
                setattr(self.l2_pid if i < 9 else self.l2_apic, self._SIG_APIC[i - 7], value)

    def replay(self, key: Any, operation: Callable[[], Any]) -> Replay:
        """Run ``operation`` (machine calls only) or replay what it did before.

        The model is deterministic: an operation with the same ``key`` from
        the same machine state (:meth:`_signature`) always charges the same
        exits and cycles and leaves the same state. The first time, it runs
        and its effect is recorded (counter deltas, VMCS access counts, the
        state after); afterwards the state is set and the effect is counted
        as pending, applied to the counters when they are next read. A whole
        nested exit becomes a lookup and a few assignments. With tracing on,
        operations always run (the trace needs their events).
        """
        if self._stats.trace is not None:  # run it: the trace needs its events
            return Replay.traced(self, operation)
        table = self._replays.get(key)
        if table is None:
            table = self._replays[key] = {}
        return self._replay_in(table, self._signature(), operation)

    def _replay_in(
        self,
        table: dict[tuple[Any, ...], Replay],
        sig: tuple[Any, ...],
        operation: Callable[[], Any],
    ) -> Replay:
        rec = table.get(sig)
        if rec is None:
            rec = table[sig] = Replay.record(self, operation)
            return rec
        if rec.eager:  # rare: VMCS values, APIC deliveries
            rec.apply_eager(self)
        if rec.changes:
            self._restore(rec.changes)
        pending = self._pending
        pending[rec] = pending.get(rec, 0) + 1
        return rec

    def replayer(self, key: Any, operation: Callable[[], Any]) -> Callable[[], Replay]:
        """:meth:`replay` of one ``key`` and ``operation``, as a function to call often."""
        if self._stats.trace is not None:
            return lambda: Replay.traced(self, operation)
        table = self._replays.setdefault(key, {})
        replay_in = self._replay_in
        pid = self.l2_pid
        apic = self.l2_apic
        pending = self._pending

        def run() -> Replay:
            sig = (  # _signature(), inlined: this is the model's hottest line
                self.state, self._cache, self.vmcs12_dirty, self.l2_halted, self.l1_halted,
                self._l1_background, self.l1_controls.state(), pid.on, pid.pir, apic.irr,
                apic.isr,
            )  # fmt: skip
            rec = table.get(sig)
            if rec is None or rec.eager or rec.changes:
                return replay_in(table, sig, operation)  # the general case
            pending[rec] = pending.get(rec, 0) + 1  # the steady state: one count
            return rec

        return run

    def _flush(self) -> None:
        pending = list(self._pending.items())
        self._pending.clear()  # in place: replayers hold this dict
        for rec, n in pending:
            rec.add_to(self._stats, self._vmcss(), n)

    def _vmcss(self) -> tuple[Vmcs, Vmcs, Vmcs, Vmcs]:
        """The VMCS objects a replay record refers to by index."""
        return self.vmcs01, self.vmcs12, self.vmcs02, self.shadow_vmcs

    # ------------------------------------------------------------- L2 side
    def l2_exit(
        self,
        reason: ExitReason,
        handler: str,
        *,
        port: int = -1,
        msr: int = -1,
        vector: int = -1,
        cr: int = -1,
        bits: int = 0,
        to_l1: bool | None = None,
        l0_handler: str | None = None,
        l0_extra: float = 0.0,
        reflect_as: ExitReason | None = None,
        hardware: bool = True,
    ) -> int:
        """A hardware exit of L2 into L0; returns the level that handles it.

        ``handler`` names the L1 profile when reflected and, unless
        ``l0_handler`` is given, the L0 handler cost otherwise. ``to_l1``
        overrides routing for exits L0 sees first and then hands to L1 (an
        EPT violation that EPT12 does not map), ``reflect_as`` the reason L1
        sees (an EPT violation that L0 turns into an EPT misconfiguration for
        L1, nested_ept_inject_page_fault). ``l0_extra`` is L0 work done before
        the decision (a walk of EPT12). ``hardware=False``: L2 was not running
        (halted in L0) and L0 synthesizes the exit for L1 without a hardware
        exit. After a return of 1 the caller drives L1 and ends with
        :meth:`l1_vmresume`.
        """
        self._require(L2, "an L2 exit")
        s = self._stats
        c = self.costs
        hw = c.hw_exit if hardware else 0
        if hardware:
            s.l2_exits += 1
            s.l0_exits += 1
            s.crossings += 1
        s.cycles_switch += hw
        s.cycles_l0 += l0_extra
        if to_l1 is None:
            level = (
                route_l2_exit(
                    reason, self.l1_controls, port=port, msr=msr, vector=vector, cr=cr, bits=bits
                )
                if self.cfg.nested
                else L0
            )
        else:
            level = L1 if (to_l1 and self.cfg.nested) else L0
        if level == L0:
            h = c.handlers[l0_handler or handler]
            s.cycles_l0 += h
            s.crossings += 1
            if hardware:
                s.exit(L2, reason, hw + h + l0_extra)
            else:
                s.work[SYNTHESIZED] += h + l0_extra
            if self._stats.trace is not None:
                self._trace("L2", "exit", reason.name, "L0 handles", handler)
            return L0
        self._reflect(reflect_as or reason, handler, l0_extra, hw, reason)
        return L1

    def _reflect(
        self,
        reason: ExitReason,
        profile_name: str,
        l0_extra: float,
        hw: float,
        hw_reason: ExitReason,
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

    def l1_exit(
        self,
        reason: ExitReason,
        handler: str,
        *,
        cause: str,
        count: int = 1,
        background: bool = False,
    ) -> None:
        """``count`` hardware exits L1 takes to L0 on its own (L0 handles them).

        ``background``: on another of L1's vCPUs (see :meth:`l1_background`).
        """
        if not background:
            self._require_l1("an L1 exit")
        s = self._stats
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
        if self._stats.trace is not None:
            self._trace("L1", "exit", reason.name, cause if count == 1 else f"{cause} x{count}")

    def l1_work(self, cycles: float, what: str) -> None:
        """Cycles L1 spends without exiting: ``what`` names the work (a report row)."""
        self._stats.cycles_l1 += cycles
        self._stats.work["L1 " + what] += cycles
        if self._stats.trace is not None:
            self._trace("L1", "work", what)

    def l1_interrupt_l2(self, vector: int = NIC_VECTOR) -> None:
        """L1 (running on L2's vCPU, L2 out) raises an interrupt for L2.

        With APICv L1 posts it into L2's posted-interrupt descriptor and, at
        its next entry, syncs PIR into RVI (GUEST_INTR_STATUS, a shadowed
        field); without, it queues it in vmcs12's VM-entry interruption info.
        If L2 was halted, L1 also wakes the vCPU thread it had blocked.
        """
        self._require(L1, "L1 injecting into L2")
        if self.cfg.apicv:
            self.l2_pid.post(vector)
            self._run_fragment("inject_posted")
        else:
            self._run_fragment("inject_irq")
            self.l2_apic.irr |= 1 << vector
        if self.l2_halted:
            self.l2_halted = False
            self._stats.wakeups += 1
            self._stats.cycles_l1 += self.costs.vcpu_wakeup
            self._stats.work[L1_WAKEUPS] += self.costs.vcpu_wakeup
        self._stats.irqs_injected_l2 += 1
        if self._stats.trace is not None:
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
        s = self._stats
        c = self.costs
        full = self.vmcs12_dirty or not c.dirty_tracking
        l0 = self._entry_l0 + (c.merge_rare if full else 0)
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
        self.l2_apic.accept(self.l2_pid)  # vmcs02's PI descriptor is processed on entry
        if self._stats.trace is not None:
            self._trace("L1", "exit", "VMRESUME", "merge full" if full else "merge hot", "")

    # ------------------------------------------------------------- L0 side
    def l0_work(self, cycles: float, what: str) -> None:
        """Cycles L0 spends outside any exit handler: ``what`` names the work (a report row)."""
        self._stats.cycles_l0 += cycles
        self._stats.work["L0 " + what] += cycles
        if self._stats.trace is not None:
            self._trace("L0", "work", what)

    def l0_interrupt_l2(self, vector: int = NIC_VECTOR) -> None:
        """L0's backend thread raises an interrupt for L2 (single level, or the direct path).

        The one place that decides how an interrupt from L0 reaches L2:

        * single level: a posted interrupt with APICv (no exit while the guest
          runs), else a kick (an external-interrupt exit) and an injection;
          a halted guest is woken and takes it on entry;
        * nested, APICv: L0 posts into the posted-interrupt descriptor *L1*
          set up for L2, so L1's view of L2's APIC stays right; a running L2
          takes it without an exit (vmx_deliver_nested_posted_interrupt). If
          L2 is halted in L1, the notification is an interrupt for L1, which
          wakes, unblocks L2's vCPU and VMRESUMEs; with virtual idle L0 holds
          L2's HLT and re-enters it itself;
        * nested, no APICv: L1 gave L2 no descriptor, so L0 cannot deliver
          behind L1's emulated APIC: it interrupts L1 (a reflected
          external-interrupt exit, or a wake-up of a halted L1) and L1
          injects through vmcs12.
        """
        s = self._stats
        c = self.costs
        apicv = self.cfg.apicv
        if not self.cfg.nested:
            self._require(L2, "L0 interrupting the guest")
            if self.l2_halted:
                self._wake_l2_in_l0()
                d = c.posted_intr if apicv else c.handlers["inject"]
                s.cycles_l0 += d
                s.work[L0_DELIVERY] += d
            elif apicv:
                s.cycles_l0 += c.posted_intr
                s.work[L0_DELIVERY] += c.posted_intr
                s.posted_interrupts += 1
            else:
                self.l2_exit(R.EXTERNAL_INTERRUPT, "external_interrupt")
                s.cycles_l0 += c.handlers["inject"]
                s.work[L0_DELIVERY] += c.handlers["inject"]
            self.l2_apic.irr |= 1 << vector
            s.irqs_injected_l2 += 1
            if self._stats.trace is not None:
                self._trace("L0", "inject", "L2")
            return
        if apicv:
            self.l2_pid.post(vector)
            s.cycles_l0 += c.posted_intr
            s.work[L0_DELIVERY] += c.posted_intr
            s.posted_interrupts += 1
            s.irqs_injected_l2 += 1
            if self.state == L2 and not self.l2_halted:
                self.l2_apic.accept(self.l2_pid)  # nested posted interrupt, no exit
                if self._stats.trace is not None:
                    self._trace("L0", "post", "L2 running")
            elif self.state == L2:  # virtual idle: L0 holds L2's HLT
                self._wake_l2_in_l0()
                self.l2_apic.accept(self.l2_pid)
                if self._stats.trace is not None:
                    self._trace("L0", "post", "L2 halted in L0")
            elif not self.l1_halted:  # L1 runs on L2's vCPU: taken at its VMRESUME
                if self._stats.trace is not None:
                    self._trace("L0", "post", "L1 running")
            else:  # L2 halted in L1: the notification vector wakes L1
                self._wake_l1(notify=True)
                self.l2_halted = False
                s.wakeups += 1
                s.cycles_l1 += c.vcpu_wakeup  # L1 unblocks L2's vCPU thread
                s.work[L1_WAKEUPS] += c.vcpu_wakeup
                if self._stats.trace is not None:
                    self._trace("L0", "post", "L2 halted in L1: notify L1")
                self.l1_vmresume()
            return
        # no APICv: through L1's emulated APIC for L2
        self.l0_interrupt_l1()
        self.l1_interrupt_l2(vector)
        self.l1_vmresume()

    def _wake_l2_in_l0(self) -> None:
        self.l2_halted = False
        self._stats.wakeups += 1
        self._stats.cycles_l0 += self.costs.vcpu_wakeup
        self._stats.work[L0_WAKEUPS] += self.costs.vcpu_wakeup

    def _wake_l1(self, *, notify: bool) -> None:
        """L0 wakes L1's halted vCPU and delivers L1's interrupt on entry."""
        s = self._stats
        c = self.costs
        self.l1_halted = False
        s.wakeups += 1
        d = c.posted_intr if self.cfg.apicv else c.handlers["inject"]
        s.cycles_l0 += c.vcpu_wakeup + d
        s.work[L0_WAKEUPS] += c.vcpu_wakeup
        s.work[L0_DELIVERY] += d
        s.irqs_injected_l1 += 1
        # L1's interrupt handler (the PI wake-up vector, or its NIC's), in L1's
        # own kernel: not exit-path work, so no pollution factor
        s.cycles_l1 += c.handlers["external_interrupt"]
        s.work[L1_IRQ] += c.handlers["external_interrupt"]
        if self._stats.trace is not None:
            self._trace("L0", "wake", "L1", "notification" if notify else "interrupt")

    def l0_interrupt_l1(self) -> None:
        """L0 raises an interrupt for L1 (L1's own device, or a doorbell for L2's).

        With L2 running, L0 must first leave L2 and deliver the interrupt to L1
        as a reflected EXTERNAL_INTERRUPT exit (L1 asked for external-interrupt
        exiting in vmcs12; with APICv the notification vector for L1 arriving
        in L2 causes that exit): the machine ends in ``L1`` and the caller
        ends with :meth:`l1_vmresume`. A halted L1 is woken; with L2 halted
        in L0 (virtual idle) L0 synthesizes the reflection. With L1 running,
        a posted interrupt (APICv) costs no exit, else L1 takes one.
        """
        s = self._stats
        c = self.costs
        if self.state == L2:
            if self.l2_halted:  # virtual idle
                self._wake_l2_in_l0()
                self.l2_exit(R.EXTERNAL_INTERRUPT, "external_interrupt", to_l1=True, hardware=False)
            else:
                self.l2_exit(R.EXTERNAL_INTERRUPT, "external_interrupt", to_l1=True)
            s.irqs_injected_l1 += 1
            s.cycles_l0 += c.handlers["inject"]
            s.work[L0_DELIVERY] += c.handlers["inject"]
        elif self.l1_halted:
            self._wake_l1(notify=False)
        elif self.cfg.apicv:
            s.irqs_injected_l1 += 1
            s.posted_interrupts += 1
            s.cycles_l0 += c.posted_intr
            s.work[L0_DELIVERY] += c.posted_intr
        else:
            s.irqs_injected_l1 += 1
            s.cycles_l0 += c.handlers["inject"]
            s.work[L0_DELIVERY] += c.handlers["inject"]
            self.l1_exit(R.EXTERNAL_INTERRUPT, "external_interrupt", cause="l1-irq")

    # ------------------------------------------------------------- L1's other vCPUs
    def l1_ipi_exit(self) -> None:
        """L1, on a vCPU not running L2, sends an IPI (an x2APIC ICR write).

        L0 intercepts L1's ICR (no IPI virtualization before Sapphire Rapids):
        one L1 exit. Where the IPI lands is the caller's next step: for L2's
        vCPU, :meth:`l0_interrupt_l2` (L1 posts into L2's descriptor, or
        interrupts L1's vCPU 0 without APICv); for another L1 vCPU,
        :meth:`l0_interrupt_l1_vcpu`.
        """
        self.l1_exit(R.MSR_WRITE, "msr_write", cause="l1-ipi", background=True)

    def l0_interrupt_l1_vcpu(self, *, halted: bool) -> None:
        """L0 delivers an interrupt to one of L1's vCPUs that does not run L2.

        A halted vCPU is woken (its thread blocked in L0); a running one takes
        a posted interrupt without an exit (APICv) or an external-interrupt
        exit.
        """
        s = self._stats
        c = self.costs
        s.irqs_injected_l1 += 1
        if halted:
            s.wakeups += 1
            d = c.posted_intr if self.cfg.apicv else c.handlers["inject"]
            s.cycles_l0 += c.vcpu_wakeup + d
            s.work[L0_WAKEUPS] += c.vcpu_wakeup
            s.work[L0_DELIVERY] += d
        elif self.cfg.apicv:
            s.posted_interrupts += 1
            s.cycles_l0 += c.posted_intr
            s.work[L0_DELIVERY] += c.posted_intr
        else:
            s.cycles_l0 += c.handlers["inject"]
            s.work[L0_DELIVERY] += c.handlers["inject"]
            self.l1_exit(
                R.EXTERNAL_INTERRUPT, "external_interrupt", cause="l1-irq", background=True
            )

    def l1_halt_again(self) -> None:
        """L1, woken on L2's vCPU for its own work while L2 stays halted, halts again."""
        self._require(L1, "L1 halting")
        self.l1_exit(R.HLT, "hlt", cause="l1-idle")
        self.l1_halted = True

    def l1_vcpu_halt(self) -> None:
        """One of L1's vCPUs not running L2 has nothing to do: an L1 HLT exit."""
        self.l1_exit(R.HLT, "hlt", cause="l1-idle", background=True)

    # ------------------------------------------------------------- L2 side, again
    def l2_eoi(self) -> None:
        """L2's interrupt handler ends with an EOI (x2APIC EOI register).

        With virtual-interrupt delivery the EOI of an edge interrupt is
        virtualized (no exit); without, the WRMSR exits: L0's at a single
        level, and nested it is routed by L1's MSR bitmap for L2, which
        intercepts the EOI when L2 has no APICv (then L1 emulates it).
        """
        self.l2_apic.eoi()
        if self.cfg.apicv:
            return
        if self.l2_exit(R.MSR_WRITE, "eoi", msr=Msr.X2APIC_EOI) == L1:
            self.l1_vmresume()

    def l2_hlt(self) -> None:
        """L2 has nothing to do and executes HLT.

        Single level: L0 blocks the vCPU. Nested: L0 keeps it with virtual
        idle (DVH); otherwise the HLT is reflected (a KVM L1 sets HLT
        exiting), L1 emulates it, finds nothing pending, blocks L2's vCPU
        thread and, with nothing else to run, halts its own vCPU: an L1 HLT
        exit that L0 handles by blocking L1's vCPU thread.
        """
        self._require(L2, "L2 halting")
        if self.l2_halted:
            raise ModelError("L2 is already halted")
        if not self.cfg.nested or self.cfg.virtual_idle:
            self.l2_exit(R.HLT, "hlt", to_l1=False)
            self.l2_halted = True
            return
        self.l2_exit(R.HLT, "hlt")
        pending = self.l2_pid.on or self.l2_apic.irr
        if pending:
            self.l1_vmresume()
            return
        self.l2_halted = True
        self.l1_exit(R.HLT, "hlt", cause="l1-idle")
        self.l1_halted = True

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
