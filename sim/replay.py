"""Recorded operations of the nested VMX model, replayed as counter deltas.

Theory of operation: the model is deterministic, so an operation (an exit,
L1's handler and its VMRESUME; an interrupt; a HLT) run from the same
machine state always has the same effect. :meth:`Replay.record` runs it
once on a :class:`~sim.machine.NestedMachine` and keeps that effect: counter
deltas, its exits by reason, VMCS access counts and charged batches, VMCS
values written, interrupts delivered, and the machine-state fields it
changed. Later runs are counted as pending and applied in bulk by
:meth:`Replay.add_to` when the counters are read. The machine owns *when*
to record or replay (``NestedMachine.replay``, its state signature); this
module owns what a record holds and how it is applied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .accounting import SUMMARY_KEYS, Stats
from .vmcs import Vmcs

if TYPE_CHECKING:
    from .machine import NestedMachine

COUNTERS = (*SUMMARY_KEYS, "cycles_switch", "cycles_l0", "cycles_l1")


def merge_reasons(
    into: dict[tuple[int, int], list[float]],
    rows: tuple[tuple[tuple[int, int], tuple[float, ...]], ...],
    n: int,
) -> None:
    """Add ``n`` times the exit rows of one operation to a by_reason table."""
    for key, (count, cycles, lo, hi) in rows:
        row = into.get(key)
        if row is None:
            into[key] = [count * n, cycles * n, lo, hi]
        else:
            row[0] += count * n
            row[1] += cycles * n
            if lo < row[2]:
                row[2] = lo
            if hi > row[3]:
                row[3] = hi


class Replay:
    """The recorded effect of one operation on a machine (see NestedMachine.replay)."""

    __slots__ = ("counters", "reasons", "causes", "work", "charges", "accesses", "values",
                 "changes", "delivered", "eager", "levels", "result")  # fmt: skip

    counters: tuple[tuple[str, float], ...]
    reasons: tuple[tuple[tuple[int, int], tuple[float, ...]], ...]  # by_reason rows
    causes: tuple[tuple[str, int], ...]
    work: tuple[tuple[str, float], ...]
    charges: tuple[tuple[int, bool, tuple[int, ...], int], ...]  # VMCS by index (_vmcss)
    accesses: tuple[tuple[int, bool, int, int], ...]
    values: tuple[tuple[int, int, int], ...]
    changes: tuple[tuple[int, Any], ...]  # signature fields the operation changes: (index, value)
    delivered: int  # interrupts the operation delivered (VirtualApicPage.delivered)
    eager: bool  # VMCS values to apply at once, not when counters are read
    levels: dict[str, float]  # cycles by level: switch, L0, L1
    result: Any

    @classmethod
    def record(cls, m: NestedMachine, operation: Callable[[], Any]) -> Replay:
        """Run ``operation`` on ``m`` (applied to its counters) and record its effect."""
        s = m.stats  # flushed
        before = [getattr(s, k) for k in COUNTERS]
        # the operation's exits go to a fresh table (its cheapest and dearest
        # exit are its own), merged into the machine's afterwards
        reasons, s.by_reason = s.by_reason, {}
        causes = dict(s.by_cause)
        work = dict(s.work)
        vmcss = m._vmcss()
        snap = [
            (dict(v._read_batches), dict(v._write_batches), dict(v._reads), dict(v._writes),
             dict(v.values)) for v in vmcss
        ]  # fmt: skip
        rec = cls()
        sig = m._signature()
        delivered = m.l2_apic.delivered
        rec.result = operation()
        s = m._stats
        rec.counters = tuple(
            (k, getattr(s, k) - b) for k, b in zip(COUNTERS, before, strict=True)
            if getattr(s, k) != b
        )  # fmt: skip
        mine, s.by_reason = s.by_reason, reasons
        rec.reasons = tuple((k, tuple(v)) for k, v in mine.items())
        merge_reasons(reasons, rec.reasons, 1)
        rec.causes = tuple(
            (k, v - causes.get(k, 0)) for k, v in s.by_cause.items() if v != causes.get(k, 0)
        )
        rec.work = tuple(
            (k, v - work.get(k, 0.0)) for k, v in s.work.items() if v != work.get(k, 0.0)
        )
        charges = []
        accesses = []
        values: list[tuple[int, int, int]] = []
        for i, (v, (rb, wb, r, w, vals)) in enumerate(zip(vmcss, snap, strict=True)):
            for write, now, old in ((False, v._read_batches, rb), (True, v._write_batches, wb)):
                for k, times in now.items():
                    if times != old.get(k, 0):
                        charges.append((i, write, v._lists[k], times - old.get(k, 0)))
            for write, now, old in ((False, v._reads, r), (True, v._writes, w)):
                for f, n in now.items():
                    if n != old.get(f, 0):
                        accesses.append((i, write, f, n - old.get(f, 0)))
            values.extend((i, f, x) for f, x in v.values.items() if vals.get(f) != x)
        rec.charges = tuple(charges)
        rec.accesses = tuple(accesses)
        rec.values = tuple(values)
        after = m._signature()
        rec.changes = tuple(
            (i, a) for i, (b, a) in enumerate(zip(sig, after, strict=True)) if a != b
        )
        rec.delivered = m.l2_apic.delivered - delivered
        rec.eager = bool(rec.values)  # deliveries are a count: applied with the counters
        d = dict(rec.counters)
        rec.levels = {
            "switch": d.get("cycles_switch", 0.0),
            "L0": d.get("cycles_l0", 0.0),
            "L1": d.get("cycles_l1", 0.0),
        }
        return rec

    @classmethod
    def traced(cls, m: NestedMachine, operation: Callable[[], Any]) -> Replay:
        """Run ``operation`` (tracing: nothing is recorded); only its cycles by level."""
        s = m.stats
        sw, l0, l1 = s.cycles_switch, s.cycles_l0, s.cycles_l1
        rec = cls()
        rec.result = operation()
        rec.levels = {
            "switch": s.cycles_switch - sw,
            "L0": s.cycles_l0 - l0,
            "L1": s.cycles_l1 - l1,
        }
        return rec

    def apply_eager(self, m: NestedMachine) -> None:
        vmcss = m._vmcss()
        for i, field, value in self.values:
            vmcss[i].values[field] = value

    def add_to(self, s: Stats, vmcss: tuple[Vmcs, ...], n: int) -> None:
        """Apply ``n`` replays of this record to the counters ``s`` and the VMCSs."""
        for name, d in self.counters:
            setattr(s, name, getattr(s, name) + d * n)
        merge_reasons(s.by_reason, self.reasons, n)
        for cause, d in self.causes:
            s.by_cause[cause] += d * n
        for what, w in self.work:
            s.work[what] += w * n
        for i, write, fields, times in self.charges:
            v = vmcss[i]
            v._charge(v._write_batches if write else v._read_batches, fields, times * n)
        for i, write, field, d in self.accesses:
            v = vmcss[i]
            (v._writes if write else v._reads)[field] += d * n
