"""Accounting for the model: exit counters, cycles by level, an optional trace.

Counters are plain integer attributes and dicts so the hot path stays a few
additions per exit. ``by_reason`` is keyed by (level that exited, exit reason)
and holds [count, cycles], where cycles are the exit's round trip plus L0's
work for it, the way ``perf kvm stat`` at L0 attributes time to an exit.
``by_cause`` says why an L1 exit happened (its handler's VMCS accesses, its
VMRESUME, its own host-state switching, its backend's device I/O, ...).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from .vmx import ExitReason

LEVEL_NAMES = ("L0", "L1", "L2")
TRACE_MAX = 100_000  # trace events kept (the latest): memory stays bounded on long runs

#: Keys of the summary dicts, in report order; the EPT and datapath models add theirs.
SUMMARY_KEYS = (
    "l0_exits",
    "l2_exits",
    "l1_exits",
    "reflected",
    "vmcs_emulated",
    "vmcs_exitless",
    "crossings",
    "l1_be_exits",
    "ept_violations_l0",
    "ept_violations_reflected",
    "invept_emulated",
    "invept_skipped",
    "ept01_entries_built",
    "ept02_entries_built",
    "ept02_entries_zapped",
    "ept12_writes_trapped",
    "ept12_leaves_resynced",
    "lock_acquisitions",
    "irqs_injected_l2",
    "irqs_injected_l1",
    "posted_interrupts",
    "wakeups",
    "nested_entries",
    "merges_full",
)


class Stats:
    """Counters of one model run."""

    def __init__(self, trace: bool = False) -> None:
        for k in SUMMARY_KEYS:
            setattr(self, k, 0)
        # cycles by where they are spent: switches (exit+entry round trips), L0, L1
        # (L2's own instructions are the same on every path, so they are not modeled)
        self.cycles_switch = 0.0
        self.cycles_l0 = 0.0
        self.cycles_l1 = 0.0
        self.by_reason: dict[tuple[int, int], list[float]] = {}
        self.by_cause: Counter[str] = Counter()
        # bounded: the last TRACE_MAX events (about 200 bytes each); trace_events counts all
        self.trace: deque[tuple[Any, ...]] | None = deque(maxlen=TRACE_MAX) if trace else None

    # the counters are set dynamically from SUMMARY_KEYS; declare for type checkers
    l0_exits: int
    l2_exits: int
    l1_exits: int
    reflected: int
    vmcs_emulated: int
    vmcs_exitless: int
    crossings: int
    l1_be_exits: int
    ept_violations_l0: int
    ept_violations_reflected: int
    invept_emulated: int
    invept_skipped: int  # EPT12 changes L1 made without an INVEPT (not present -> present)
    ept01_entries_built: int
    ept02_entries_built: int
    ept02_entries_zapped: int
    ept12_writes_trapped: int
    ept12_leaves_resynced: int  # kvm scheme: unsync EPT12 leaves resynced after an INVEPT
    lock_acquisitions: int
    irqs_injected_l2: int
    irqs_injected_l1: int
    posted_interrupts: int  # interrupts delivered by posting, with no exit of the target
    wakeups: int  # halted vCPUs (L2's, or L1's) woken by an interrupt
    nested_entries: int  # emulated VMRESUMEs that entered L2
    merges_full: int  # of those, entries that ran prepare_vmcs02_rare

    def exit(self, level: int, reason: int, cycles: float, count: int = 1) -> None:
        """Count ``count`` hardware exits from ``level`` into L0 costing ``cycles`` in all."""
        row = self.by_reason.get((level, reason))
        if row is None:
            self.by_reason[(level, reason)] = [count, cycles]
        else:
            row[0] += count
            row[1] += cycles

    @property
    def cycles(self) -> float:
        return self.cycles_switch + self.cycles_l0 + self.cycles_l1

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {k: getattr(self, k) for k in SUMMARY_KEYS}
        out["cycles"] = self.cycles
        return out

    def cycles_by_level(self) -> dict[str, float]:
        return {
            "switch": self.cycles_switch,
            "L0": self.cycles_l0,
            "L1": self.cycles_l1,
        }

    def reason_rows(self) -> list[dict[str, Any]]:
        rows = []
        for (level, reason), (count, cycles) in sorted(
            self.by_reason.items(), key=lambda kv: (kv[0][0], -kv[1][0], kv[0][1])
        ):
            rows.append(
                {
                    "level": LEVEL_NAMES[level],
                    "reason": ExitReason(reason).name,
                    "count": int(count),
                    "cycles": cycles,
                }
            )
        return rows
