"""``xlio estimate``: how long a profiled program takes natively, at one level and in L2.

Theory of operation
-------------------
A profile (:mod:`xlio.profile`) gives a program's events per second of its
own CPU work. For each configuration (:class:`~xlio.sim.guest_mmu.Paging`:
native, single level with EPT and with shadow paging, L2 under nested EPT,
shadow-on-EPT and shadow-on-shadow) the estimate runs those events through
the VMX model (:class:`~xlio.sim.guest_mmu.GuestPaging` on a
:class:`~xlio.sim.nested.NestedVmx`), one *time slice* at a time: the
events between two CR3 loads (a process switch), distributed by the rules
below, then the CR3 load. What the model charges for a CPU second's slices
is the time virtualization adds to each second of the program's work:

    seconds = scale x (cpu_seconds x (1 + added cycles per CPU second / clock)
                       + wall_seconds - cpu_seconds)   # waits are not stretched

``--scale-to CONFIG=SECONDS`` sets ``scale`` so that that row takes that
long (the one calibration a user makes to match a published run: a program
of the same shape, more or less of it); nothing else is fitted. First
touches of guest-physical memory and host swap are charged as the model's
``ept-touch`` and ``ept-churn`` workloads charge them, with the seed's
switches (static EPT, avoiding INVEPT, the virtual-EPT scheme, who
swaps). Block requests are virtio-blk requests served by L1's backend (a
kick reflected to L1, L1's own disk kick, the completion interrupt through
L1); the direct L0 path is for stateless network I/O only.

Rules, each an estimate stated here and in the README:

* faults of one slice land in leaf page tables ``FAULTS_PER_LEAF`` at a time;
* page-table writes outside faults (teardown, fork) come 512 to a leaf
  (``zap_pte_range`` and ``copy_page_range`` walk whole tables);
* each fork and exec writes ``UPPER_WRITES_PER_PROCESS`` upper-level entries.
"""

from __future__ import annotations

import math
from typing import Any

from xlio.measure import UsageError, costs_of
from xlio.profile import Profile
from xlio.sim.arch import machine_for
from xlio.sim.config import Config
from xlio.sim.costs import CostModel
from xlio.sim.guest_mmu import L2_MMUS, GuestPaging, Paging
from xlio.sim.machine import L1, NestedMachine
from xlio.sim.vmx import ExitReason
from xlio.sim.workloads import VIRTIO_NOTIFY_PORT

#: Estimate: consecutive faults of a process land in one 2 MiB leaf table
#: (heap and stack grow a page at a time; file faults map 16 pages around
#: the faulting one, fault_around_bytes = 64 KiB): 8 per leaf per slice.
FAULTS_PER_LEAF = 8
PTES_PER_LEAF = 512
#: Estimate: a new address space links its text, data, heap and stack
#: through about four upper-level entries.
UPPER_WRITES_PER_PROCESS = 4
SLICES = 16  # slices simulated per configuration (their events spread evenly)
CLASSES = ("page faults", "page-table writes", "CR3 loads", "INVLPG", "timer ticks",
           "block I/O", "first touch", "host swap")  # fmt: skip
#: Column heads of the classes in the text table.
SHORT = ("faults", "pt-writes", "CR3", "INVLPG", "ticks", "block", "1st-touch", "swap")
#: The order a slice's events run in: the CR3 load that ends it comes last.
CLASSES_IN_A_SLICE = ("page faults", "page-table writes", "INVLPG", "timer ticks", "block I/O",
                      "CR3 loads")  # fmt: skip


def _spread(total: float, n: int) -> list[int]:
    """``total`` events over ``n`` slices as whole numbers, evenly (Bresenham)."""
    out, acc, done = [], 0.0, 0
    for _ in range(n):
        acc += total / n
        k = round(acc) - done
        done += k
        out.append(k)
    return out


def block_request(m: NestedMachine) -> None:
    """One virtio-blk request: L2's kick, the backend's submission and the
    completion interrupt. Nested it is served by L1's backend: the kick is
    reflected, L1 submits to its own disk (an L1 kick, L0's device), and the
    completion comes back through L1 to L2."""
    if m.l2_exit(ExitReason.IO_INSTRUCTION, "io_kick", port=VIRTIO_NOTIFY_PORT) == L1:
        m.l1_exit(ExitReason.IO_INSTRUCTION, "io_kick", cause="l1-backend")
        m.l1_vmresume()
        m.l0_interrupt_l1()  # L1's disk completes while L2 runs
        m.l1_interrupt_l2()
        m.l1_vmresume()
    else:
        m.l0_interrupt_l2()
    m.l2_eoi()


def _machine(costs: CostModel, paging: Paging, switches: dict[str, Any]) -> NestedMachine:
    sw = {k: v for k, v in switches.items() if v is not None}
    return machine_for(Config.from_preset(costs, nested=paging.nested, **sw))


def added_cycles(
    prof: Profile,
    costs: CostModel,
    paging: Paging,
    switches: dict[str, Any],
    ept: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Cycles the model charges per CPU second of the program under ``paging``, by class."""
    if not paging.virtual:
        return {"cycles": 0.0, "by_class": dict.fromkeys(CLASSES, 0.0), "per_cpu_second": {}}
    r = prof.rates
    ept = ept or {}
    m = _machine(costs, paging, switches)
    g = GuestPaging(m, paging)
    slices_per_s = max(r["cr3_loads"], 1.0)
    n = SLICES
    # each rate is per CPU second; the n slices simulated hold n / slices_per_s of it
    faults = _spread((r["minor_faults"] + r["major_faults"]) / slices_per_s * n, n)
    writes = _spread(r["pte_writes"] / slices_per_s * n, n)
    uppers = _spread((r["forks"] + r["execs"]) * UPPER_WRITES_PER_PROCESS / slices_per_s * n, n)
    invlpgs = _spread(r["invlpgs"] / slices_per_s * n, n)
    ticks = _spread(r["timer_ticks"] / slices_per_s * n, n)
    blocks = _spread(r["block_requests"] / slices_per_s * n, n)
    # L1's own tick at the preset's guest_hz for every second L2 runs (nested only)
    l1_ticks = _spread(costs.guest_hz / slices_per_s * n, n)
    by_class = dict.fromkeys(CLASSES, 0.0)
    m.reset_stats()
    leaf_base = 1 << 20  # leaves written outside faults, apart from the faulting ones

    def slice_events(cls: str, i: int) -> None:
        if cls == "page faults":
            for k in range(faults[i]):
                g.page_fault(k // FAULTS_PER_LEAF)
        elif cls == "page-table writes":
            for k in range(writes[i]):
                g.pte_write(leaf_base + k // PTES_PER_LEAF)
            for _ in range(uppers[i]):
                g.pte_write(0, upper=True)
        elif cls == "INVLPG":
            for _ in range(invlpgs[i]):
                g.invlpg()
        elif cls == "timer ticks":
            for _ in range(ticks[i]):
                g.timer_tick()
            for _ in range(l1_ticks[i]):
                g.l1_timer_tick()
        elif cls == "block I/O":
            for _ in range(blocks[i]):
                block_request(m)
        else:
            g.cr3_load()  # the slice ends with a switch to the next process

    for i in range(n):
        for cls in CLASSES_IN_A_SLICE:
            before = m.stats.cycles
            slice_events(cls, i)
            by_class[cls] += m.stats.cycles - before
    s = m.stats
    scale = slices_per_s / n  # simulated n slices -> one CPU second
    memory = memory_cycles(prof, costs, paging, ept, switches)
    classes = {k: v * scale for k, v in by_class.items()} | memory
    return {
        "cycles": s.cycles * scale + sum(memory.values()),
        "by_class": classes,
        "per_cpu_second": {
            "l0_exits": s.l0_exits * scale,
            "l2_exits": s.l2_exits * scale,
            "l1_exits": s.l1_exits * scale,
            "reflected": s.reflected * scale,
            "vmcs_accesses": (s.vmcs_emulated + s.vmcs_exitless) * scale,
            "l0_cycles": s.cycles_l0 * scale,
            "l1_cycles": s.cycles_l1 * scale,
            "switch_cycles": s.cycles_switch * scale,
        },  # fmt: skip
    }


#: Which rows a first touch of guest-physical memory costs an EPT violation in,
#: and on which path of the model's ept-touch workload: the guest's own EPT
#: (single), EPT02 from EPT12 (nested EPT), or EPT01 for L1's page under L1's
#: shadow MMU (shadow-on-EPT: L1's own fault is in its page-fault handler).
#: Without EPT at L0 the host page is found in the shadow fault itself.
EPT_PATH = {Paging.SINGLE: "single", Paging.NESTED_EPT: "l1", Paging.SHADOW_ON_EPT: "single"}


def memory_cycles(
    prof: Profile, costs: CostModel, paging: Paging, ept: dict[str, Any], switches: dict[str, Any]
) -> dict[str, float]:
    """Cycles per CPU second of first touches (the ept-touch workload's cost per
    page) and, with ``swap`` and ``rate``, of host swap (the ept-churn
    workload's per second), on the rows with an EPT."""
    from xlio.measure import measure

    path = EPT_PATH.get(paging)
    out = {"first touch": 0.0, "host swap": 0.0}
    if path is None:
        return out
    sw = {k: v for k, v in switches.items() if v is not None}
    touch = {k: v for k, v in ept.items() if k not in ("swap", "rate")}
    if prof.rates["first_touches"] > 0:  # the cost of a page is the same for any working set
        r = measure("ept-touch", path, costs, count=1, options={"working_set_mib": 4, **touch},
                    **sw)  # fmt: skip
        per_page = r["per_op"]["cycles"]
        out["first touch"] = prof.rates["first_touches"] * per_page
    if ept.get("rate"):
        churn = measure("ept-churn", path, costs, count=1, options={**ept, "seconds": 1.0},
                        **sw)["per_op"]["cycles"]  # fmt: skip
        out["host swap"] = churn
    return out


def configurations(l2_mmu: str | None) -> list[Paging]:
    rows = [Paging.NATIVE, Paging.SINGLE, Paging.SINGLE_SHADOW]
    nested = [Paging.NESTED_EPT, Paging.SHADOW_ON_EPT, Paging.SHADOW_ON_SHADOW]
    return rows + ([L2_MMUS[l2_mmu]] if l2_mmu else nested)


def parse_scale_to(text: str | None) -> tuple[Paging, float] | None:
    """``CONFIG=SECONDS`` (CONFIG a row name: native, single, l2-nested-ept, ...)."""
    if text is None:
        return None
    name, sep, value = text.partition("=")
    names = {p.value: p for p in Paging}
    if not sep or name not in names:
        raise UsageError(f"--scale-to needs CONFIG=SECONDS with CONFIG one of {', '.join(names)}")
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"--scale-to {text}: {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"--scale-to {text}: the time must be positive")
    return names[name], seconds


def estimate(
    prof: Profile,
    preset: str | CostModel = "turtles-2010",
    *,
    l2_mmu: str | None = None,
    scale_to: tuple[Paging, float] | None = None,
    switches: dict[str, Any] | None = None,
    ept: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every configuration's predicted run time and where the extra time goes.

    ``switches``: the machine's (``shadow_vmcs``, ``vmcs_exits``, ...);
    ``ept``: the memory workloads' options (``static_ept``, ``virtual_ept``,
    ``avoid_invept``, ``swap`` and ``rate``), for the first touches and host swap."""
    costs = costs_of(preset)
    sw = switches or {}
    ept = ept or {}
    configs = configurations(l2_mmu)
    if scale_to is not None and scale_to[0] not in configs:
        configs.append(scale_to[0])  # needed to scale, shown too
    clock = costs.clock_ghz * 1e9
    cpu = prof.run["cpu_seconds"]
    waits = max(0.0, prof.run["wall_seconds"] - cpu)
    added = {p: added_cycles(prof, costs, p, sw, ept) for p in configs}
    stretch = {p: 1.0 + added[p]["cycles"] / clock for p in configs}
    scale = 1.0
    if scale_to is not None:
        target, seconds = scale_to
        scale = seconds / (cpu * stretch[target] + waits)
    rows = []
    for p in configs:
        t = scale * (cpu * stretch[p] + waits)
        rows.append((p, t))
    native = rows[0][1]
    single = next(t for p, t in rows if p is Paging.SINGLE)
    out_rows = []
    for p, t in rows:
        a = added[p]
        work = cpu * scale
        out_rows.append({
            "config": p.value, "seconds": t, "slowdown_vs_native": t / native,
            "slowdown_vs_single": t / single,
            "breakdown": {
                "added_seconds": work * a["cycles"] / clock,
                "by_class_seconds": {k: work * v / clock for k, v in a["by_class"].items()},
                "per_cpu_second": a["per_cpu_second"],
            },
        })  # fmt: skip
    return {
        "preset": costs.name, "clock_ghz": costs.clock_ghz, "scale": scale,
        "scale_to": None if scale_to is None else {"config": scale_to[0].value,
                                                   "seconds": scale_to[1]},
        "rows": out_rows, "rates": prof.rates, "provenance": prof.provenance, "run": prof.run,
        "rules": {"faults_per_leaf": FAULTS_PER_LEAF, "ptes_per_leaf": PTES_PER_LEAF,
                  "upper_writes_per_process": UPPER_WRITES_PER_PROCESS},
    }  # fmt: skip


def format_estimate(r: dict[str, Any]) -> str:
    lines = [
        f"xlio estimate: {r['provenance'].get('command', '?')} "
        f"(profile: {r['run']['cpu_seconds']:.2f} CPU s, {r['run']['wall_seconds']:.2f} s wall), "
        f"preset {r['preset']} at {r['clock_ghz']:g} GHz"
        + (
            f", CPU work scaled x{r['scale']:.3f} to {r['scale_to']['config']}="
            f"{r['scale_to']['seconds']:g} s"
            if r["scale_to"]
            else ""
        ),
        "",
        f"{'config':<22}{'seconds':>10}{'vs native':>11}{'vs single':>11}  "
        + " ".join(f"{c:>9}" for c in SHORT)
        + "   exits/CPU-s (L2, L1)",
    ]
    for row in r["rows"]:
        b = row["breakdown"]
        cls = b["by_class_seconds"]
        pcs = b["per_cpu_second"]
        exits = f"{pcs.get('l2_exits', 0):,.0f}, {pcs.get('l1_exits', 0):,.0f}" if pcs else "-"
        lines.append(
            f"{row['config']:<22}{row['seconds']:>10.1f}{row['slowdown_vs_native']:>10.2f}x"
            f"{row['slowdown_vs_single']:>10.2f}x  "
            + " ".join(f"{cls[c]:>8.2f}s" for c in CLASSES)
            + f"   {exits}"
        )
    lines.append("")
    lines.append(
        "each class column: the seconds that class of the guest's events adds (its exits, "
        "L0's and L1's handlers, VMCS accesses); exits per second of the program's CPU work"
    )
    return "\n".join(lines)


def estimate_figures(
    costs: CostModel,
    prof: Profile,
    l2_mmu: str | None,
    scale_to: tuple[Paging, float] | None,
    switches: dict[str, Any],
    ept: dict[str, Any],
) -> dict[str, float]:
    """An estimate's headline figures, flat: each configuration's seconds and
    slowdowns (``<config>.seconds``, ``<config>.slowdown_vs_single``), for a study."""
    r = estimate(prof, costs, l2_mmu=l2_mmu, scale_to=scale_to, switches=switches, ept=ept)
    out = {}
    for row in r["rows"]:
        for k in ("seconds", "slowdown_vs_native", "slowdown_vs_single"):
            out[f"{row['config']}.{k}"] = float(row[k])
    return out
