"""The nested hypervisor's state machine, whatever the architecture: who runs, and what it costs.

Theory of operation
-------------------
Three levels: L0 (the only hypervisor in root mode), L1 (a guest
hypervisor) and L2 (L1's guest). A :class:`NestedMachine` is in one of two
states: ``L2`` (L2 runs; anything it does that exits lands in L0,
:meth:`~NestedMachine.l2_exit`, which routes it: L0 handles it and re-enters
L2, or reflects it to L1) and ``L1`` (L1 handles a reflected exit, may take
exits of its own, inject an interrupt into L2, and re-enters L2 through L0).
What is the same on every architecture lives here: routing an exit to the
level that wants it (the architecture says who intercepts what), L0's and
L1's handlers and their exits, interrupts to L2 and L1 (posted or
injected), HLT and wake-ups, and the replay cache that makes the model fast
(:meth:`~NestedMachine.replay`, :mod:`sim.replay`). What differs is the
architecture's: :class:`sim.nested.NestedVmx` (vmcs12, nested_vmx_vmexit,
VMREAD/VMWRITE and shadowing, nested_vmx_run) and
:class:`sim.nested_svm.NestedSvm` (VMCB12, nested_svm_vmexit, L1's
CLGI/VMLOAD/VMRUN/VMSAVE/STGI, nested_svm_vmrun) supply the hooks at the
end of the class; :func:`sim.arch.machine_for` picks one by the preset.

With ``nested=False`` the same calls model a plain VM of L0: every exit of
the guest is L0's, and the guest's exits are counted as ``l2_exits`` (the
workload's guest) so that single-level and nested runs line up column by column.

Pure and deterministic: no I/O, no clocks. The machine's own methods add
to the counters directly (adding commutes with pending replays); only
readers go through :attr:`~NestedMachine.stats`. L2's APIC bits are
:mod:`sim.apic`.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import Any, Protocol

from .accounting import (
    L0_DELIVERY,
    L0_WAKEUPS,
    L1_IRQ,
    L1_WAKEUPS,
    SYNTHESIZED,
    Stats,
)
from .apic import NIC_VECTOR, PostedInterruptDescriptor, VirtualApicPage
from .config import Config
from .profiles import EMPTY_CACHE, CacheState
from .replay import Replay
from .vmcs import Vmcs
from .vmx import ExitReason, Msr

L0, L1, L2 = 0, 1, 2
R = ExitReason


class ModelError(RuntimeError):
    """A caller drove the state machine through a transition that cannot happen."""


class Intercepts(Protocol):
    """What L1 asked to intercept for L2 (vmcs12's controls, VMCB12's intercepts),
    as the replay cache sees it: one hashable state, and its restoration."""

    def state(self) -> tuple[Any, ...]: ...

    def restore(self, st: tuple[Any, ...]) -> None: ...


class NestedMachine(ABC):
    """L0's view of one L2 vCPU and its L1, whatever the architecture: see the
    module docstring. A subclass supplies the architecture's hooks.

    Callers say what the guest did in :class:`~sim.vmx.ExitReason`'s words;
    ``EXIT_CODES`` is the architecture's own enum of exit codes, and
    :meth:`exit_code` turns the one into the other for the counters and
    the trace (the identity on VMX).
    """

    EXIT_CODES: type[IntEnum] = ExitReason

    def exit_code(self, reason: ExitReason, cr: int = -1) -> IntEnum:
        """The exit code the hardware reports for ``reason`` (``cr``: which CR)."""
        return reason

    def __init__(self, config: Config) -> None:
        self.cfg = config
        c = config.costs
        self.costs = c
        self._stats = Stats(trace=config.trace, reasons=self.EXIT_CODES)
        # recorded effects of whole operations (see replay) and how many
        # replays of each the counters do not show yet
        self._replays: dict[Any, dict[tuple[Any, ...], Replay]] = {}
        self._pending: dict[Replay, int] = {}
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
        # replay keys on these (see _signature): L1's register cache of VMCS
        # fields and whether its writes left vmcs12 dirty, on VMX; their
        # architecture's own meaning elsewhere
        self.vmcs12_dirty = False
        self._cache: CacheState = EMPTY_CACHE
        self.l1_controls: Intercepts  # what L1 intercepts: set by the architecture
        self._l1_handler = {k: v * c.l1_pollution for k, v in c.handlers.items()}

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
        self._stats = Stats(trace=self.cfg.trace, reasons=self.EXIT_CODES)

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
    def _signature_reader(self) -> Callable[[], tuple[Any, ...]]:
        """A function that reads :meth:`_signature` (the replayer's hot line):
        everything an operation's effect depends on, besides its arguments
        (the virtual-APIC page's ``delivered`` is a counter: a delta, not
        state). It reads the fields :data:`_SIG_LAYOUT` names, in that order
        (written out here: this is the hottest line); an architecture with
        less state reads less and names less."""
        pid = self.l2_pid
        apic = self.l2_apic
        ctl = self.l1_controls

        def sig() -> tuple[Any, ...]:
            return (
                self.state, self._cache, self.vmcs12_dirty, self.l2_halted, self.l1_halted,
                self._l1_background, ctl.state(), pid.on, pid.pir, apic.irr, apic.isr,
            )  # fmt: skip

        return sig

    def _signature(self) -> tuple[Any, ...]:
        return self._signature_reader()()

    #: Where each field of the signature lives, in the signature's order:
    #: (the part of the machine holding it, "" for the machine itself; the
    #: attribute, None for L1's controls, which restore their own state).
    _SIG_LAYOUT: tuple[tuple[str, str | None], ...] = (
        ("", "state"), ("", "_cache"), ("", "vmcs12_dirty"), ("", "l2_halted"),
        ("", "l1_halted"), ("", "_l1_background"), ("l1_controls", None),
        ("l2_pid", "on"), ("l2_pid", "pir"), ("l2_apic", "irr"), ("l2_apic", "isr"),
    )  # fmt: skip
    _sig_targets: tuple[tuple[Any, str | None], ...] = ()

    def _restore(self, changes: tuple[tuple[int, Any], ...]) -> None:
        """Set the signature's fields that a replayed operation changes."""
        targets = self._sig_targets
        if not targets:  # resolved once: the parts are the machine's for its life
            # (None for the machine itself: holding it here would be a cycle)
            targets = self._sig_targets = tuple(
                (getattr(self, part) if part else None, field) for part, field in self._SIG_LAYOUT
            )
        for i, value in changes:
            target, field = targets[i]
            if field is None:
                target.restore(value)
            else:
                setattr(self if target is None else target, field, value)

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
        if rec.eager:  # rare: VMCS values
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
        sig_of = self._signature_reader()
        pending = self._pending

        def run() -> Replay:
            sig = sig_of()  # the model's hottest line
            rec = table.get(sig)
            if rec is None or rec.eager:
                return replay_in(table, sig, operation)  # the general case
            if rec.changes:  # a state change (L2 -> L1 -> L2, a halt): set it
                restore(rec.changes)
            pending[rec] = pending.get(rec, 0) + 1  # the steady state: one count
            return rec

        restore = self._restore
        return run

    def _flush(self) -> None:
        pending = list(self._pending.items())
        self._pending.clear()  # in place: replayers hold this dict
        for rec, n in pending:
            rec.add_to(self._stats, self._vmcss(), n)
            if rec.delivered:  # a count, read by nothing between flushes
                self.l2_apic.delivered += rec.delivered * n

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
                self._route(reason, port=port, msr=msr, vector=vector, cr=cr, bits=bits)
                if self.cfg.nested
                else L0
            )
        else:
            level = L1 if (to_l1 and self.cfg.nested) else L0
        code = self.exit_code(reason, cr)
        if level == L0:
            h = c.handlers[l0_handler or handler]
            s.cycles_l0 += h
            s.crossings += 1
            if hardware:
                s.exit(L2, code, hw + h + l0_extra)
            else:
                s.work[SYNTHESIZED] += h + l0_extra
            if self._stats.trace is not None:
                self._trace("L2", "exit", code.name, "L0 handles", handler)
            return L0
        seen = code if reflect_as is None else self.exit_code(reflect_as, cr)
        self._reflect(seen, handler, l0_extra, hw, code)
        return L1

    # ------------------------------------------------------------- L1 side
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
        code = self.exit_code(reason)
        self._charge_l1_exits(code, self.costs.handlers[handler], cause, count)
        if self._stats.trace is not None:
            self._trace("L1", "exit", code.name, cause if count == 1 else f"{cause} x{count}")

    def _charge_l1_exits(self, code: IntEnum, l0: float, cause: str, count: int = 1) -> None:
        """``count`` hardware exits of L1 (``code``), each a round trip plus ``l0``
        cycles of L0's work, for ``cause``: every L1 exit's accounting."""
        s = self._stats
        hw = self.costs.hw_exit
        s.l1_exits += count
        s.l0_exits += count
        s.crossings += 2 * count
        s.cycles_switch += count * hw
        s.cycles_l0 += count * l0
        s.exit(L1, code, count * (hw + l0), count)
        s.by_cause[cause] += count
        if cause == "l1-backend":
            s.l1_be_exits += count

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

    # ------------------------------------------------------------- the architecture's part
    @abstractmethod
    def _route(self, reason: ExitReason, **where: int) -> int:
        """The level that handles an L2 exit, by what L1 asked to intercept."""

    @abstractmethod
    def _reflect(
        self, reason: IntEnum, profile_name: str, l0_extra: float, hw: float,
        hw_reason: IntEnum,
    ) -> None:  # fmt: skip
        """L0 hands an L2 exit to L1, and L1's handler runs up to its entry epilogue."""

    @abstractmethod
    def _run_fragment(self, name: str) -> None:
        """L1 runs one of its code fragments (sim.profiles) with their exits."""

    @abstractmethod
    def l1_vmresume(self) -> None:
        """L1 re-enters L2, through L0."""

    @abstractmethod
    def l1_intercepts_guest_paging(self) -> None:
        """L1 shadow-pages L2 (no nested EPT/NPT for L2): it intercepts L2's page
        faults, CR3 loads and INVLPG."""

    @abstractmethod
    def l1_set_io_passthrough(self, ports: frozenset[int]) -> None:
        """L1 lets L2 reach ``ports`` without an exit to L1 (delegation), or, empty, takes
        every port back."""

    @abstractmethod
    def _vmcss(self) -> tuple[Vmcs, ...]:
        """The control structures a replay record refers to by index."""
