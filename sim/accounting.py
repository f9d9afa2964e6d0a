"""Accounting for the model: exit counters, cycles by level, an optional trace.

Counters are plain integer attributes and dicts so the hot path stays a few
additions per exit. ``by_reason`` is keyed by (level that exited, exit reason)
and holds [count, cycles], where cycles are the exit's round trip plus L0's
work for it, the way ``perf kvm stat`` at L0 attributes time to an exit.
``by_cause`` says why an L1 exit happened (its handler's VMCS accesses, its
VMRESUME, its own host-state switching, its backend's device I/O, ...).
``work`` holds the cycles that belong to no exit, by what they are ("L1 exit
handlers", "L0 backend", "L0 copies", ...): the exit rows plus the work rows
are every cycle of the run, so a report's Time% adds up to 100%. Each row
of ``by_reason`` also keeps its cheapest and dearest single exit.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from enum import IntEnum
from typing import Any

from .vmx import ExitReason

LEVEL_NAMES = ("L0", "L1", "L2")

# rows of Stats.work that the machine itself charges (backends name their own
# with NestedVmx.l0_work/l1_work: "L0 backend", "L1 copies", "L0 nested MMU", ...)
L1_HANDLERS = "L1 exit handlers"  # L1's handler and exit framework for a reflected exit
L1_EXITLESS = "L1 shadowed VMREAD/VMWRITE"  # L1's VMCS accesses that do not exit
L1_IRQ = "L1 interrupt handlers"  # L1's own interrupt handlers after a wake-up
L1_WAKEUPS = "L1 vCPU wake-ups"  # L1 unblocking L2's vCPU thread
L0_WAKEUPS = "L0 vCPU wake-ups"  # L0 waking a halted vCPU thread (L2's or L1's)
L0_DELIVERY = "L0 interrupt delivery"  # posting or injecting an interrupt, no exit of its own
SYNTHESIZED = "L0 synthesized exits"  # exits L0 makes up for L1 while L2 is halted in L0
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

    def __init__(self, trace: bool = False, reasons: type[IntEnum] = ExitReason) -> None:
        self.reasons = reasons  # the architecture's exit codes: by_reason's keys name these
        for k in SUMMARY_KEYS:
            setattr(self, k, 0)
        # cycles by where they are spent: switches (exit+entry round trips), L0, L1
        # (L2's own instructions are the same on every path, so they are not modeled)
        self.cycles_switch = 0.0
        self.cycles_l0 = 0.0
        self.cycles_l1 = 0.0
        # (level, reason) -> [count, cycles, cheapest exit, dearest exit]
        self.by_reason: dict[tuple[int, int], list[float]] = {}
        self.by_cause: Counter[str] = Counter()
        self.work: defaultdict[str, float] = defaultdict(float)
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
        one = cycles / count
        if row is None:
            self.by_reason[(level, reason)] = [count, cycles, one, one]
        else:
            row[0] += count
            row[1] += cycles
            if one < row[2]:
                row[2] = one
            elif one > row[3]:
                row[3] = one

    @property
    def cycles(self) -> float:
        return self.cycles_switch + self.cycles_l0 + self.cycles_l1

    def work_rows(self) -> list[dict[str, Any]]:
        """Cycles that belong to no exit, by what they are, dearest first."""
        return [
            {"level": what.split(" ", 1)[0], "work": what.split(" ", 1)[1], "cycles": cycles}
            for what, cycles in sorted(self.work.items(), key=lambda kv: -kv[1])
            if cycles
        ]

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
        for (level, reason), (count, cycles, lo, hi) in sorted(
            self.by_reason.items(), key=lambda kv: (kv[0][0], -kv[1][0], kv[0][1])
        ):
            rows.append(
                {
                    "level": LEVEL_NAMES[level],
                    "reason": self.reasons(reason).name,
                    "count": int(count),
                    "cycles": cycles,
                    "min_cycles": lo,
                    "max_cycles": hi,
                }
            )
        return rows


#: What each counter of a summary means (``xlio measure --explain``).
GLOSSARY: dict[str, str] = {
    "l0_exits": "hardware VM exits into L0, from L2 or from L1 (what perf kvm stat counts at L0)",
    "l2_exits": "hardware VM exits of L2 (each lands in L0 first)",
    "l1_exits": "hardware VM exits of L1 into L0: its VMREAD/VMWRITE/VMRESUME (SVM: VMRUN "
    "and, without vls/vgif, VMLOAD/VMSAVE/STGI/CLGI), its own I/O, MSR, HLT and interrupt exits",
    "reflected": "L2 exits L0 hands to L1 (nested_vmx_vmexit; SVM: nested_svm_vmexit): "
    "L1's handler runs",
    "vmcs_emulated": "L1 VMREAD/VMWRITE that exit and L0 emulates against vmcs12 (VMX only)",
    "vmcs_exitless": "L1 VMREAD/VMWRITE served by the shadow VMCS without an exit",
    "crossings": "changes of the running level (L2->L0, L0->L1, L1->L0, L0->L2, ...): "
    "each is a world switch of the CPU",
    "l1_be_exits": "L1 exits caused by L1's backend forwarding L2's I/O through its own device",
    "ept_violations_l0": "EPT violations of L2 that L0 fixes alone (EPT02 from EPT12)",
    "ept_violations_reflected": "EPT violations of L2 that L0 reflects to L1 (EPT12 misses)",
    "invept_emulated": "INVEPTs of L1 that L0 emulates (SVM: L1's TLB_CONTROL flushes, "
    "which L0 serves by syncing its shadow NPT at the next nested VMRUN)",
    "invept_skipped": "EPT12 changes L1 made without an INVEPT (not present -> present)",
    "ept01_entries_built": "EPT01 entries L0 installed for L1's memory",
    "ept02_entries_built": "EPT02 entries L0 installed (the shadow of EPT12 on EPT01)",
    "ept02_entries_zapped": "EPT02 entries L0 dropped",
    "ept12_writes_trapped": "L1 writes to write-protected EPT12 pages that exit",
    "ept12_leaves_resynced": "unsync EPT12 leaves L0 resynced after an INVEPT (kvm scheme)",
    "lock_acquisitions": "MMU-lock round trips in L0",
    "irqs_injected_l2": "interrupts delivered to L2 (posted, or injected at entry)",
    "irqs_injected_l1": "interrupts delivered to L1",
    "posted_interrupts": "interrupts delivered by posting, with no exit of the target",
    "wakeups": "halted vCPUs (L2's or L1's) woken by an interrupt",
    "nested_entries": "emulated VMRESUMEs of L1 that entered L2 (nested_vmx_run; SVM: "
    "VMRUNs, nested_svm_vmrun)",
    "merges_full": "of those, entries that ran prepare_vmcs02_rare (vmcs12 dirty, or no "
    "dirty tracking): the full vmcs12 -> vmcs02 merge",
    "cycles": "every modeled cycle: exit round trips, L0's and L1's work",
    "time_us": "cycles at the preset's clock",
}

#: What each column of a measure report means (``xlio measure --explain``).
COLUMNS: dict[str, str] = {
    "level": "who exited (L2 or L1, into L0), or whose work a row without exits is",
    "event": "the exit reason, or the work that is no exit (handlers, backend, copies, "
    "interrupt delivery, wake-ups, MMU)",
    "samples": "exits of that level and reason in the steady state",
    "samples%": "share of all exits",
    "time%": "share of all modeled cycles; exit rows hold the round trip plus L0's work "
    "for the exit, work rows the rest, so the column adds up to 100%",
    "min/max/avg us": "cheapest, dearest and mean single exit of the row",
    "us/op": "the row's time per operation (frame, request, page, second)",
}
