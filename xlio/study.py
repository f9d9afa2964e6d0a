"""Studies: one run repeated over parameter sets drawn within the parameters' ranges.

Theory of operation
-------------------
Every numeric parameter of a preset that is not published, derived or set
by the user spans a range (:func:`xlio.sim.costs.param_range`). A study
draws ``samples`` parameter sets by Latin hypercube
(``scipy.stats.qmc.LatinHypercube``, seeded: the same seed gives the same
sets) over the ranged parameters, each coordinate mapped into its range by
:class:`Dist` (uniform, log-uniform, or triangular with its mode at the
stated value; whole-cycle parameters rounded), and runs the same
:class:`Task` under each set through :class:`xlio.executor.Executor`. A
task is a picklable description of one run (the kind and its arguments) and
:func:`figures` turns it, under a parameter set, into its headline figures,
a flat ``{name: number}``. :func:`intervals` gives each figure its 5th,
50th and 95th percentile beside the value at the preset itself. A task
with two sides (``compare``) draws one unit vector per sample and maps it
into each side's ranges by parameter name, so a ratio is taken between
sides that share their uncertain parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from xlio.measure import UsageError
from xlio.sim.costs import CostModel, P, Range, param_range, with_params

MAX_SAMPLES = 1_000_000


class Dist(StrEnum):
    UNIFORM = "uniform"
    LOGUNIFORM = "loguniform"
    TRIANGULAR = "triangular"


def ranges(costs: CostModel) -> dict[str, Range]:
    """The parameters a study draws, with their ranges, in table order."""
    out = {}
    for k, p in costs.params.items():
        r = param_range(p)
        if r is not None and r.high > r.low:
            out[k] = r
    return out


def _inverse(u: Any, r: Range, mode: float, dist: Dist) -> Any:
    import numpy as np

    if dist is Dist.UNIFORM:
        return r.low + u * (r.high - r.low)
    if dist is Dist.LOGUNIFORM:
        lo = max(r.low, 1e-12)
        return np.exp(np.log(lo) + u * (np.log(r.high) - np.log(lo)))
    from scipy.stats import triang

    c = (mode - r.low) / (r.high - r.low)
    return triang.ppf(u, c, loc=r.low, scale=r.high - r.low)


def unit_samples(n: int, d: int, seed: int) -> Any:
    """``n`` points of a Latin hypercube in ``d`` dimensions (rows in [0, 1))."""
    from scipy.stats import qmc

    if d == 0:
        import numpy as np

        return np.zeros((n, 0))
    return qmc.LatinHypercube(d=d, seed=seed).random(n)


def costs_at(costs: CostModel, names: list[str], u: Any, dist: Dist, label: str) -> CostModel:
    """``costs`` with each of ``names`` it ranges set from its coordinate of ``u``."""
    rs = ranges(costs)
    changes = {}
    for k, x in zip(names, u, strict=True):
        r = rs.get(k)
        if r is None:
            continue
        p = costs.params[k]
        v = float(_inverse(x, r, float(p.value), dist))
        value: float | int = round(v) if isinstance(p.value, int) else v
        changes[k] = P(value, label, p.kind, p.unit)
    return with_params(costs, costs.name, costs.description, **changes)


# ---------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One run to repeat: ``kind`` (measure, vmexit, netperf, compare,
    estimate) and its arguments, with a cost model per side."""

    kind: str
    args: tuple[Any, ...]
    costs: tuple[CostModel, ...]


def figures(task: Task) -> dict[str, float]:
    """The task's headline figures under its cost models."""
    from xlio.sweep import run_point

    if task.kind == "vmexit":
        from xlio.sim.vmexit import run

        level, tests, apicv = task.args
        res = run(task.costs[0], level, list(tests), apicv=apicv)
        return {t: float(r["cycles"]) for t, r in res.items() if r.get("cycles") is not None}
    if task.kind in ("measure", "netperf"):
        (point,) = task.args
        from dataclasses import replace

        row = run_point(replace(point, costs=task.costs[0]))
        return _numbers(row, skip=set(point.values) | {"path", "per"})
    if task.kind == "compare":
        from dataclasses import replace

        out: dict[str, float] = {}
        sides = []
        for side, point, costs in zip("ab", task.args, task.costs, strict=True):
            row = _numbers(run_point(replace(point, costs=costs)),
                           skip=set(point.values) | {"path", "per"})  # fmt: skip
            sides.append(row)
            out.update({f"{side}.{k}": v for k, v in row.items()})
        for k in sides[0]:
            if k in sides[1] and sides[0][k]:
                out[f"ratio.{k}"] = sides[1][k] / sides[0][k]
        return out
    if task.kind == "estimate":
        from xlio.estimate import estimate_figures

        return estimate_figures(task.costs[0], *task.args)
    raise ValueError(f"unknown task kind {task.kind!r}")


def _numbers(row: dict[str, Any], skip: set[str]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k not in skip and isinstance(v, int | float) and not isinstance(v, bool)
    }


# ---------------------------------------------------------------- a study
@dataclass
class Study:
    """``samples`` parameter sets for ``task``, and what came of them."""

    task: Task
    samples: int
    seed: int
    dist: Dist
    names: list[str] = field(default_factory=list)  # the parameters drawn
    tasks: list[Task] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise UsageError(f"argument --samples: 1 to {MAX_SAMPLES:,}, got {self.samples}")
        names: list[str] = []
        for c in self.task.costs:
            names += [k for k in ranges(c) if k not in names]
        if not names:
            raise UsageError("nothing to sample: no parameter of the preset has a range")
        if self.dist is Dist.LOGUNIFORM:
            for c in self.task.costs:
                bad = [k for k, r in ranges(c).items() if r.low <= 0]
                if bad:
                    raise UsageError(f"--dist loguniform needs ranges above 0 ({bad[0]})")
        self.names = names
        u = unit_samples(self.samples, len(names), self.seed)
        self.tasks = [
            Task(self.task.kind, self.task.args,
                 tuple(costs_at(c, names, row, self.dist, f"sample {i} (seed {self.seed})")
                       for c in self.task.costs))
            for i, row in enumerate(u)
        ]  # fmt: skip


def intervals(
    point: dict[str, float], samples: list[dict[str, float] | None]
) -> dict[str, dict[str, float]]:
    """Each figure of ``point`` with its 5th, 50th and 95th percentile over the samples."""
    import numpy as np

    done = [s for s in samples if s is not None]
    out = {}
    for k, v in point.items():
        xs = np.array([s[k] for s in done if k in s and math.isfinite(s[k])], dtype=float)
        if not xs.size:
            continue
        p05, p50, p95 = (float(x) for x in np.percentile(xs, [5, 50, 95]))
        out[k] = {"value": v, "p05": p05, "p50": p50, "p95": p95}
    return out


def with_interval(value: float, iv: dict[str, float] | None, fmt: str = "{:,.0f}") -> str:
    """``13,142 [11,900-14,600]``."""
    if iv is None:
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(iv['p05'])}-{fmt.format(iv['p95'])}]"
