"""Run a workload on a path under a configuration and report what it cost.

``measure()`` is pure (no I/O): it returns the JSON-ready result that
``xlio measure --json`` prints; :mod:`xlio.report` renders it for people, in
the form of ``perf kvm stat report``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xlio.backends.datapath import BUILDERS, DATAPATH_DEFAULTS, datapath_options
from xlio.sim.arch import machine_for
from xlio.sim.machine import NestedMachine
from xlio.sim.nested import Config
from xlio.sim.presets import PRESETS, CostModel
from xlio.sim.workloads import (
    EPT_DEFAULTS,
    L0_CHANGES,
    PAGING_WORKLOADS,
    PATHS,
    Workload,
    ept_options,
)
from xlio.sim.workloads import WORKLOADS as MODEL_WORKLOADS

#: Every workload ``xlio measure`` runs: the model's micro and memory workloads,
#: and the datapath's network workloads (per frame, or per request for echo).
WORKLOADS: dict[str, Workload] = {
    **MODEL_WORKLOADS,
    "tx": Workload("tx", BUILDERS["tx"], "L2 sends UDP frames to the peer", "frame", True),
    "rx": Workload("rx", BUILDERS["rx"], "the peer sends UDP frames to L2", "frame", True),
    "echo": Workload(
        "echo", BUILDERS["echo"], "the peer sends UDP echo requests, L2 answers", "request", True
    ),
}


class UsageError(ValueError):
    """A user's mistake: reported in one line, exit status 2."""


def costs_of(preset: str | CostModel) -> CostModel:
    """A preset by name, or a user's cost model as it is."""
    if isinstance(preset, CostModel):
        return preset
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[preset]


def make_config(
    preset: str | CostModel,
    path: str,
    *,
    shadow_vmcs: bool | None = None,
    vmcs_exits: bool = True,
    operand: str = "register",
    cache_reg: str | None = None,
    apicv: bool | None = None,
    virtual_idle: bool = False,
    trace: bool = False,
) -> Config:
    costs = costs_of(preset)
    if path not in PATHS:
        raise UsageError(f"unknown path {path!r} (choose from {', '.join(PATHS)})")
    try:
        return Config.from_preset(
            costs,
            nested=path != "single",
            shadow_vmcs=shadow_vmcs,
            vmcs_exits=vmcs_exits,
            operand=operand,
            cache_reg=cache_reg,
            apicv=apicv,
            virtual_idle=virtual_idle,
            trace=trace,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


#: Which workload options apply to which workloads (anything else is refused).
OPTION_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "network": (("tx", "rx", "echo"), tuple(k for k in DATAPATH_DEFAULTS if k != "count")),
    "memory": (("ept-touch", "ept-churn"), (*EPT_DEFAULTS, "virtual_ept", "avoid_invept")),
    "paging": (PAGING_WORKLOADS, ("l2_mmu",)),
}
#: The command-line flag of an option, where it is not --NAME-WITH-DASHES.
FLAGS = {
    "working_set_mib": "--working-set", "l2_mem_gib": "--l2-mem", "l1_mem_gib": "--l1-mem",
    "event_idx": "--no-event-idx",
}  # fmt: skip


def flag_of(option: str) -> str:
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def resolved_options(workload: str, options: dict[str, Any], costs: CostModel) -> dict[str, Any]:
    """The workload's options with every default filled in; an option that does
    not apply to the workload is a UsageError."""
    given = {k: v for k, v in options.items() if v is not None and k != "count"}
    for group, (workloads, keys) in OPTION_GROUPS.items():
        if workload in workloads:
            continue
        wrong = sorted(k for k in given if k in keys)
        if wrong:
            raise UsageError(
                f"{flag_of(wrong[0])} does not apply to workload {workload} "
                f"({group} options apply to {', '.join(workloads)})"
            )
    try:
        if workload in OPTION_GROUPS["network"][0]:
            o = datapath_options(given)
            return {k: o[k] for k in OPTION_GROUPS["network"][1]}
        if workload in OPTION_GROUPS["memory"][0]:
            return ept_options(given, costs)
        if workload in PAGING_WORKLOADS:
            return {"l2_mmu": given.get("l2_mmu", "nested-ept")}
    except ValueError as e:
        raise UsageError(str(e)) from None
    return {}


Progress = Callable[[int, int], None]


def _built(
    workload: str,
    path: str,
    preset: str | CostModel,
    options: dict[str, Any] | None,
    count: int,
    switches: dict[str, Any],
) -> tuple[NestedMachine, Workload, dict[str, Any], Any]:
    """A machine with ``workload`` built on ``path``: (machine, workload, its
    resolved options, its operation). Every mistake is a UsageError."""
    if workload not in WORKLOADS:
        raise UsageError(f"unknown workload {workload!r} (choose from {', '.join(WORKLOADS)})")
    cfg = make_config(preset, path, **switches)
    opts = resolved_options(workload, options or {}, cfg.costs)
    m = machine_for(cfg)
    w = WORKLOADS[workload]
    try:
        op = w.build(m, path, {"count": count, **opts})
    except ValueError as e:
        raise UsageError(str(e)) from None
    return m, w, opts, op


def measure(
    workload: str,
    path: str,
    preset: str | CostModel,
    *,
    count: int = 1,
    options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    **switches: Any,
) -> dict[str, Any]:
    """Build a machine, run one warm-up operation, then ``count`` operations.

    Set-up (device bring-up, delegation) and the first operation (cold
    caches, a sleeping backend, a full merge) are reported apart
    (``setup``, ``first_op``); ``per_op`` is the steady state. ``progress``
    is called with (done, count) as operations complete. Ctrl-C ends the
    run early: the result says ``interrupted`` and covers what was done.
    """
    if count < 1:
        raise UsageError(f"--count must be at least 1, got {count}")
    m, w, opts, op = _built(workload, path, preset, options, count, switches)
    setup = m.stats.summary()
    m.reset_stats()
    warmup = getattr(op, "warmup", None if w.once else op)
    first = None
    if warmup is not None:
        warmup()
        first = m.stats.summary()
        m.reset_stats()
    before = m.datapath.metrics() if m.datapath is not None else None
    units = 0.0
    done = 0
    total = 1 if w.once else count
    step = max(1, total // 200)
    interrupted = False
    if hasattr(op, "tick"):  # a network run: all frames in one operation, with progress
        op.tick = progress
    try:
        if w.once:  # one run: it says how many units (pages, seconds, frames) it was
            n = op()
            units = 1 if n is None else n
        else:  # one unit per operation (what an operation returns is not a count)
            while done < total:
                for _ in range(min(step, total - done)):
                    op()
                    done += 1
                units = done
                if progress is not None:
                    progress(done, total)
    except KeyboardInterrupt:
        interrupted = True
        units = done if not w.once else getattr(op, "done", 0)
        if not units:
            raise  # nothing measured yet: nothing to report
    r = result_of(m, workload, path, units, w.per, setup=setup, options=opts)
    if "devices" in r and before:  # the steady state's device counters
        r["devices"] = {
            dev: {k: v - before.get(dev, {}).get(k, 0) for k, v in metrics.items()}
            for dev, metrics in r["devices"].items()
        }
    if first is not None:
        r["first_op"] = first
    if interrupted:
        r["interrupted"] = True
    return r


MAX_TRACE_OPS = 100  # operations ``xlio trace`` prints (each can be hundreds of events)
#: Workloads with operations to trace (the memory workloads are one long run).
TRACEABLE = tuple(k for k in WORKLOADS if k not in OPTION_GROUPS["memory"][0])


def trace(
    workload: str,
    path: str,
    preset: str | CostModel,
    *,
    count: int = 1,
    options: dict[str, Any] | None = None,
    **switches: Any,
) -> dict[str, Any]:
    """The timeline of ``count`` operations after set-up and warm-up, event by event.

    An operation is one micro operation or one batch of frames (requests).
    Each event says its modeled time stamp (cycles since the first traced
    operation began, at the preset's clock), level, event, what (exit reason
    or VMCS field), detail (how it was handled, trapped or exitless), its
    cycles and the running total. Memory is bounded: at most
    ``MAX_TRACE_OPS`` operations, and the machine keeps the last
    ``TRACE_MAX`` events.
    """
    if not 1 <= count <= MAX_TRACE_OPS:
        raise UsageError(f"--count must be from 1 to {MAX_TRACE_OPS}, got {count}")
    if workload in WORKLOADS and workload not in TRACEABLE:
        raise UsageError(f"{workload} is one long run of model time: trace one of "
                         f"{', '.join(TRACEABLE)}")  # fmt: skip
    # one operation is one batch of a network workload
    batch = (options or {}).get("batch") or 1
    m, w, opts, op = _built(workload, path, preset, options, batch, {**switches, "trace": True})
    cfg = m.cfg
    getattr(op, "warmup", op)()
    m.reset_stats()
    clock = cfg.costs.clock_ghz * 1000.0
    ops: list[dict[str, Any]] = []
    start = 0.0
    for i in range(count):
        op()
        s = m.stats
        assert s.trace is not None
        events = []
        prev = start
        truncated = len(s.trace) == s.trace.maxlen
        if truncated:  # the op's first events were dropped: start from the first kept
            prev = s.trace[0][-1]
        for level, event, what, detail, where, total in s.trace:
            events.append({
                "t_us": prev / clock, "level": level, "event": event, "what": what,
                "detail": detail, "where": where, "cycles": whole(total - prev),
                "total_cycles": whole(total),
            })  # fmt: skip
            prev = total
        if s.cycles > prev:  # work after the op's last event (interrupt delivery, say)
            tail = whole(s.cycles - prev)
            events.append({
                "t_us": prev / clock, "level": "", "event": "untraced", "what": "", "detail": "",
                "where": "", "cycles": tail, "total_cycles": whole(s.cycles),
            })  # fmt: skip
        ops.append({"operation": i + 1, "cycles": whole(s.cycles - start), "events": events,
                    "truncated": truncated})  # fmt: skip
        start = s.cycles
        s.trace.clear()
    return {
        "workload": workload,
        "path": path,
        "per": "batch" if w.per in ("frame", "request") else "operation",
        "count": count,
        "config": {**cfg.describe(), "path": path, **opts, "options": sorted(opts)},
        "operations": ops,
    }


def result_of(
    m: NestedMachine,
    workload: str,
    path: str,
    units: float,
    per: str,
    *,
    setup: dict[str, float] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    s = m.stats
    totals = {k: whole(v) for k, v in s.summary().items()}
    totals["time_us"] = m.costs.cycles_to_us(totals["cycles"])
    per_op = {k: v / units for k, v in totals.items()}
    if per == "second":
        totals["cycles_per_second"] = totals["cycles"] / units
    if m.memory is not None:
        totals["host_resident_mib"] = m.memory[0].host.resident_bytes() / (1 << 20)
    out: dict[str, Any] = {
        "workload": workload,
        "path": path,
        "count": whole(units),
        "per": per,
        "config": {
            **m.cfg.describe(),
            "path": path,
            **(options or {}),
            "options": sorted(options or {}),
        },
        "per_op": per_op,
        "totals": totals,
        "cycles_by_level": s.cycles_by_level(),
        "by_reason": s.reason_rows(),
        "by_cause": dict(s.by_cause),
        "by_work": s.work_rows(),
    }
    changes = l0_changes(m, workload, path, options or {})
    if changes:
        out["l0_changes"] = changes
    if m.datapath is not None:
        out["devices"] = m.datapath.metrics()
    if setup is not None and setup.get("cycles"):
        out["setup"] = setup
    if s.trace is not None:
        out["trace"] = [list(e) for e in s.trace]
    return out


def whole(v: Any) -> Any:
    """``v`` with every whole float an int, through dicts and lists (JSON keeps
    integers integers)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: whole(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [whole(x) for x in v]
    return v


def l0_changes(m: NestedMachine, workload: str, path: str, options: dict[str, Any]) -> list[str]:
    """The changes to today's KVM (Linux 6.1) in L0 that this run's path assumes."""
    if path != "l0":
        return []
    network = workload in ("tx", "rx", "echo", "tap")
    out = []
    if network or workload in ("io-kick", "io-user", "mmio-kick"):
        out.append(L0_CHANGES["delegation"])
    if workload == "mmio-kick" or (network and options.get("kick") == "mmio"):
        out.append(L0_CHANGES["fast-mmio-in-guest-mode"])
    if network and m.cfg.apicv:
        out.append(L0_CHANGES["nested-posting"])
    return out


def demo(
    preset: str | CostModel = "turtles-2010",
    count: int = 200,
    switches: dict[str, Any] | None = None,
    progress: Progress | None = None,
    **opts: Any,
) -> dict[str, Any]:
    """The loopback echo on single, l1 and l0, per request, side by side.

    ``progress`` hears (requests done, requests in all). After Ctrl-C the
    result holds the paths measured so far (the last one partly) and says
    ``interrupted``.
    """
    sw = {k: v for k, v in (switches or {}).items() if v is not None}
    rows: dict[str, dict[str, Any]] = {}
    for i, p in enumerate(PATHS):

        def tick(done: int, _total: int, i: int = i) -> None:
            if progress is not None:
                progress(i * count + done, len(PATHS) * count)

        try:
            rows[p] = measure("echo", p, preset, count=count, options=opts, progress=tick, **sw)
        except KeyboardInterrupt:
            if not rows:
                raise
            break
        if rows[p].get("interrupted"):
            break
    first = next(iter(rows.values()))
    out: dict[str, Any] = {
        "workload": "echo",
        "preset": costs_of(preset).name,
        "count": count,
        "options": opts,
        "config": first["config"],
        "paths": {p: r["per_op"] for p, r in rows.items()},
        "devices": {p: r.get("devices", {}) for p, r in rows.items()},
        "l1_over_l0": (
            rows["l1"]["per_op"]["cycles"] / (rows["l0"]["per_op"]["cycles"] or 1.0)
            if "l0" in rows and not rows["l0"].get("interrupted") else None
        ),
    }  # fmt: skip
    if len(rows) < len(PATHS) or any(r.get("interrupted") for r in rows.values()):
        out["interrupted"] = True
        out["counts"] = {p: r["count"] for p, r in rows.items()}
    return out
