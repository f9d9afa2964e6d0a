"""``xlio sensitivity``: which parameters move a figure, and by how much.

Theory of operation
-------------------
The parameters with a range (:func:`xlio.study.ranges`) are the inputs of
a function: one xlio run (:class:`xlio.study.Task`) and one of its figures.
:func:`morris` screens them all with Morris' elementary effects (SALib's
``morris`` sampler and analyzer: ``mu_star``, the mean absolute effect of
moving one parameter across its range, ``sigma``, how much that effect
depends on the others); :func:`sobol` then apportions the figure's
variance among the ``top`` of them (Saltelli's sampling, SALib's ``sobol``
analyzer: first-order ``S1``, what a parameter does alone, and total
``ST``, with its interactions), the rest held at their values.
:func:`tornado` moves each of those alone to its low and high end. Each
takes an ``evaluate`` callback from a matrix of parameter values to the
figure's values, so the same code runs on xlio's model (through
:class:`xlio.executor.Executor`) and on a test function with known indices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

Evaluate = Callable[[Any], Any]  # (n x d parameter values) -> n figures


class Method(StrEnum):
    MORRIS = "morris"
    SOBOL = "sobol"


@dataclass(frozen=True)
class Problem:
    names: tuple[str, ...]
    bounds: tuple[tuple[float, float], ...]

    def salib(self) -> dict[str, Any]:
        return {"num_vars": len(self.names), "names": list(self.names),
                "bounds": [list(b) for b in self.bounds]}  # fmt: skip

    def subset(self, names: list[str]) -> Problem:
        i = [self.names.index(n) for n in names]
        return Problem(tuple(names), tuple(self.bounds[k] for k in i))


MORRIS_TRAJECTORIES = 20
MORRIS_LEVELS = 4


def morris(problem: Problem, evaluate: Evaluate, seed: int,
           trajectories: int = MORRIS_TRAJECTORIES) -> list[dict[str, Any]]:  # fmt: skip
    """Morris' screen: every parameter's ``mu_star`` and ``sigma``, most
    influential first (``trajectories`` x (d + 1) runs)."""
    import numpy as np
    from SALib.analyze import morris as analyze
    from SALib.sample import morris as sample

    X = sample.sample(problem.salib(), trajectories, num_levels=MORRIS_LEVELS, seed=seed)
    Y = np.asarray(evaluate(X), dtype=float)
    r = analyze.analyze(problem.salib(), X, Y, num_levels=MORRIS_LEVELS, seed=seed)
    rows = [
        {"parameter": n, "mu_star": float(r["mu_star"][i]), "sigma": float(r["sigma"][i]),
         "mu_star_conf": float(r["mu_star_conf"][i])}
        for i, n in enumerate(problem.names)
    ]  # fmt: skip
    return sorted(rows, key=lambda x: (-x["mu_star"], x["parameter"]))


def sobol(problem: Problem, evaluate: Evaluate, seed: int, n: int = 512) -> list[dict[str, Any]]:
    """Sobol indices (``S1``, ``ST`` and their 95% confidence), most total
    effect first (``n`` x (d + 2) runs; ``n`` a power of two)."""
    import numpy as np
    from SALib.analyze import sobol as analyze
    from SALib.sample import sobol as sample

    X = sample.sample(problem.salib(), n, calc_second_order=False, seed=seed)
    Y = np.asarray(evaluate(X), dtype=float)
    r = analyze.analyze(problem.salib(), Y, calc_second_order=False, seed=seed)
    rows = [
        {"parameter": nm, "S1": float(r["S1"][i]), "S1_conf": float(r["S1_conf"][i]),
         "ST": float(r["ST"][i]), "ST_conf": float(r["ST_conf"][i])}
        for i, nm in enumerate(problem.names)
    ]  # fmt: skip
    return sorted(rows, key=lambda x: (-x["ST"], x["parameter"]))


def tornado(problem: Problem, centre: list[float], evaluate: Evaluate) -> list[dict[str, Any]]:
    """The figure with each parameter alone at its low and at its high end."""
    import numpy as np

    d = len(problem.names)
    X = np.tile(np.asarray(centre, dtype=float), (2 * d, 1))
    for i, (lo, hi) in enumerate(problem.bounds):
        X[2 * i, i], X[2 * i + 1, i] = lo, hi
    Y = np.asarray(evaluate(X), dtype=float)
    return [
        {"parameter": n, "low": problem.bounds[i][0], "high": problem.bounds[i][1],
         "at_low": float(Y[2 * i]), "at_high": float(Y[2 * i + 1])}
        for i, n in enumerate(problem.names)
    ]  # fmt: skip
