"""``xlio calibrate``: a preset fitted to kvm-unit-tests ``vmexit`` output
and ``perf kvm stat`` reports from a user's machine.

Theory of operation
-------------------
:func:`parse_vmexit` reads ``x86/vmexit.c`` output as users have it (a raw
console log of ``./x86/run`` or ``run_tests.sh``: the QEMU command line and
other lines around the results are skipped), one ``NAME CYCLES`` line per
test run (several runs of a test are all kept: their spread is information),
``NAME (skipped)`` lines, and the ``  ipi NAME N`` / ``  eoi NAME N``
sub-lines (kept apart, not fitted). Test names the model does not have are
listed, not fatal. :mod:`xlio.perf_kvm` reads perf kvm stat reports; each
of a report's reasons becomes a :class:`Row` matched to a run of the model
(:func:`perf_rows`: the run xlio's header names, else the first of
:data:`CANONICAL` that exits with the reason), its average per exit with
(xlio's table) or without (perf's, ``kvm_exit`` to ``kvm_entry``) the
hardware round trip: perf's form is what tells ``hw_exit`` from L0's
handlers, which every vmexit row adds together.

The fit runs each measured test through the code ``xlio vmexit`` uses
(:func:`xlio.sim.vmexit.run_test`) with a candidate preset, and
``scipy.optimize.least_squares`` moves the candidate's free parameters
(each a multiplicative factor on the base preset's value, bounded by
:data:`BOUNDS`) to minimise the relative residuals of every measured run.
Which parameter each row determines comes from the model itself: the
Jacobian of every test's cycles with respect to every parameter, taken at
the base preset by finite differences (the model is linear in the cycle
parameters, so one difference is exact). A parameter whose column is zero
for every measured row is *not identified* (kept at the base value; the
report names a test of the model whose cycles depend on it). A parameter
outside the null space of the rows' sensitivities (and resolved: 1%
noise, or a row's rounding if larger, moves it by at most :data:`WEAK`) is
*fitted*; any other enters the rows only together with others (the
hardware exit with every handler at level 1, L0's reflection with its
VMRESUME emulation in every nested exit) and is reported in a
*combination*, the sparsest well-printed measured row that holds it, whose
value the data fix; within what the rows cannot tell apart, a small
regularization moves the parameters least from the base, so its split is
kept as far as the data allow. L1's cache pollution is held (it only
multiplies handler cycles), which keeps the cycles linear: the fit runs on
the Jacobian and is checked on the model. Published and derived
parameters, booleans and the clock are *fixed*. A fit that cannot
converge, or leaves a used row more than :data:`MAX_RESIDUAL` off, raises
:class:`FitFailed` with the best point reached. Standard errors come from
the Jacobian at the solution: the residuals' variance plus each figure's
rounding as printed (perf prints 0.01 us, 23 cycles at 2.3 GHz), through
the sandwich of the least-squares solution; a combination's from the same
covariance.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from xlio.perf_kvm import Form, InputError, PerfReport, half_digit, read_text
from xlio.sim.costs import Arch, CostModel, P, param_range, with_params
from xlio.sim.svm_tests import LATENCY_LINES
from xlio.sim.svm_tests import run as run_svm_tests
from xlio.sim.vmexit import BY_NAME, LEVELS, TESTS, run_test

#: Physical bounds on a fitted parameter's value (cycles unless said):
#: no negative cycles, a hardware exit round trip no less than about 250.
BOUNDS: dict[str, tuple[float, float]] = {"hw_exit": (250.0, 20_000.0)}
DEFAULT_BOUNDS = (0.0, 2_000_000.0)
#: A fit that leaves a used row further off than this has not found the machine.
MAX_RESIDUAL = 0.25
#: A parameter the rows determine alone is reported fitted when 1% noise on
#: every row (or the row's rounding as printed, if larger) would move it by
#: at most this much (relative), twice the rows' own error: else it is only
#: as good as its row's combination.
WEAK = 0.02
FIT_KINDS = ("calibrated", "estimate", "user")  # kinds a calibration may move

_TEST_LINE = re.compile(r"^(?P<name>[A-Za-z][\w-]*)[ \t]+(?P<value>\S+)\s*$")
_SKIPPED = re.compile(r"^(?P<name>[A-Za-z][\w-]*)[ \t]+\(skipped\)\s*$")
_SUB_LINE = re.compile(r"^\s+(?P<part>ipi|eoi)\s+(?P<name>[\w-]+)\s+(?P<value>\S+)\s*$")
_TSC_HZ = re.compile(r"tsc[-_ ]frequency[=: ]+(?P<hz>\d+)", re.IGNORECASE)
#: x86/svm_tests.c's latency lines: ``    Latency VMRUN : max: 49300 min: 3160 avg: 3228``
_LATENCY = re.compile(
    r"^\s*Latency (?P<what>[A-Z]+)\s*:\s*max:\s*\S+\s+min:\s*\S+\s+avg:\s*(?P<value>\S+)\s*$"
)


#: svm_tests.c's lines as calibration rows: ``latency_run_exit.VMRUN`` -> (test, line).
LATENCY_LINES_BY_NAME = {f"{test}.{line}": (test, line) for line, test in LATENCY_LINES.items()}


def _modeled(name: str) -> bool:
    """A test name the model runs: vmexit.c's (not skipped), or an svm_tests.c line."""
    return name in LATENCY_LINES_BY_NAME or (name in BY_NAME and not BY_NAME[name].skip)


class CalibrationError(InputError):
    """A user's input cannot be calibrated from: one line, exit status 2."""


class FitFailed(Exception):
    """The fit did not converge: one line, exit status 1, with the best point."""

    def __init__(self, message: str, best: dict[str, float]) -> None:
        super().__init__(message)
        self.best = best


@dataclass
class VmexitRuns:
    """One level's measured runs: test -> cycles of each run."""

    level: int
    runs: dict[str, list[float]] = field(default_factory=dict)
    resolution: dict[str, float] = field(default_factory=dict)  # half the last digit printed
    parts: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    tsc_hz: int | None = None


def parse_level(text: str) -> int:
    """``l1``, ``l2``, ``1`` or ``2``."""
    t = text.strip().lower().removeprefix("l")
    if t not in ("1", "2"):
        raise CalibrationError(f"level {text!r}: a level is l1 (a plain VM) or l2 (nested)")
    return int(t)


def parse_vmexit(text: str, level: int, where: str, into: VmexitRuns | None = None) -> VmexitRuns:
    """The runs of one vmexit log (added to ``into``, for a level given twice)."""
    out = into if into is not None else VmexitRuns(level)
    found = 0
    for line in text.splitlines():
        m = _TSC_HZ.search(line)
        if m:
            hz = int(m["hz"])
            if out.tsc_hz is not None and out.tsc_hz != hz:
                raise CalibrationError(
                    f"{where}: level {level} was given with two clocks "
                    f"(tsc-frequency {out.tsc_hz} and {hz}): one machine per level"
                )
            out.tsc_hz = hz
        if _SKIPPED.match(line):
            out.skipped.append(line.split()[0])
            found += 1
            continue
        lat = _LATENCY.match(line)
        if lat:  # svm_tests.c: its figure is the average; the test runs as L1
            name = f"{LATENCY_LINES.get(lat['what'], 'latency')}.{lat['what']}"
            if lat["what"] not in LATENCY_LINES:
                out.unknown.append(name)
            else:
                out.runs.setdefault(name, []).append(_cycles(lat["value"], where, line))
                out.resolution[name] = max(out.resolution.get(name, 0.0), half_digit(lat["value"]))
            found += 1
            continue
        sub = _SUB_LINE.match(line)
        if sub:
            out.parts.setdefault(sub["name"], []).append(
                (sub["part"], _cycles(sub["value"], where, line))
            )
            continue
        m = _TEST_LINE.match(line)
        if not m:
            continue
        name, value = m["name"], m["value"]
        if name in BY_NAME:
            out.runs.setdefault(name, []).append(_cycles(value, where, line))
            out.resolution[name] = max(out.resolution.get(name, 0.0), half_digit(value))
            found += 1
        elif re.fullmatch(r"-?\d+(\.\d+)?", value) and re.fullmatch(r"[a-z][a-z0-9_-]*", name):
            if value.startswith("-"):
                raise CalibrationError(f"{where}: {line.strip()!r}: negative cycles")
            out.unknown.append(name)
            found += 1
    if not found:
        raise CalibrationError(
            f"{where}: no vmexit test line (NAME CYCLES) or svm_tests latency line found: is "
            "this kvm-unit-tests x86/vmexit.c or x86/svm_tests.c output?"
        )
    out.sources.append(where)
    return out


def _cycles(value: str, where: str, line: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise CalibrationError(f"{where}: {line.strip()!r}: cycles are not a number") from None
    if not math.isfinite(v) or v < 0:
        raise CalibrationError(f"{where}: {line.strip()!r}: negative or non-finite cycles")
    return v


def read_vmexit(level_text: str, path: str, runs: dict[int, VmexitRuns]) -> None:
    """``--vmexit LEVEL=FILE``: the file read and added to its level's runs."""
    level = parse_level(level_text)
    text = read_text(path, "vmexit")
    runs[level] = parse_vmexit(text, level, path, runs.get(level))


# ---------------------------------------------------------------- the model
#: Parameters a calibration holds fixed whatever their kind, and why.
HELD: dict[str, str] = {
    "l1_pollution": "it enters only multiplied by L1's handler cycles, so cycles cannot tell "
    "it from the handlers: kept at the base's value",
}


def free_parameters(base: CostModel) -> list[str]:
    """The parameters a calibration may move: numeric cycle costs of kind
    calibrated, estimate or user (not the clock, not :data:`HELD`). The
    model's cycles are linear in them."""
    out = []
    for k, p in base.params.items():
        if k == "clock_ghz" or k in HELD:
            continue
        if isinstance(p.value, bool) or not isinstance(p.value, int | float):
            continue
        if p.kind in FIT_KINDS and p.value > 0:
            out.append(k)
    return out


@dataclass(frozen=True)
class Spec:
    """A run of the model whose per-reason averages a perf kvm stat report is matched to."""

    workload: str
    path: str
    count: int
    switches: tuple[tuple[str, Any], ...] = ()
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Row:
    """One measured figure the fit matches: a vmexit test at a level
    (``spec`` None), or one exit reason's average in a perf kvm stat report
    of a run like ``spec`` (``l0_only``: perf's own form, without the
    exit's hardware round trip)."""

    test: str  # a vmexit test, or an exit reason
    level: int  # where the test or the workload ran
    spec: Spec | None = None
    exit_level: int | None = None  # xlio's form: the level that exited; None: any
    l0_only: bool = False

    @property
    def label(self) -> str:
        if self.spec is None:
            return self.test
        who = f" from L{self.exit_level}" if self.exit_level is not None else ""
        return f"perf {self.test}{who} ({self.spec.workload})"


#: The workloads a ``perf kvm stat report`` row of reason R is matched to,
#: first that exits with R (the report does not say what ran): L0's work per
#: exit of a reason is the same in every workload of the model but for
#: EPT violations and VMRESUME's merge.
CANONICAL = ("cpuid", "vmcall", "io-kick", "io-user", "mmio-kick", "timer-tick", "tx", "echo")
MODEL_COUNT = 200  # operations of a model run for a perf row: the steady state


def _averages(costs: CostModel, spec: Spec) -> dict[tuple[int | None, str], tuple[int, float]]:
    """(exiting level or None, reason) -> (exits, cycles) of a model run."""
    from xlio.measure import UsageError, measure

    try:
        r = measure(spec.workload, spec.path, costs, count=spec.count,
                    options=dict(spec.options), **dict(spec.switches))  # fmt: skip
    except UsageError as e:
        raise CalibrationError(f"the report's run cannot be made on the model: {e}") from None
    out: dict[tuple[int | None, str], tuple[int, float]] = {}
    for row in r["by_reason"]:
        for key in ((int(row["level"][1]), row["reason"]), (None, row["reason"])):
            n, c = out.get(key, (0, 0.0))
            out[key] = (n + row["count"], c + row["cycles"])
    return out


def model_cycles(costs: CostModel, rows: list[Row]) -> list[float]:
    """Cycles of each row as the model gives them: a vmexit test's cycles per
    iteration (``xlio vmexit``'s), a perf row's average per exit."""
    out = []
    runs: dict[Spec, dict[tuple[int | None, str], tuple[int, float]]] = {}
    latency: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.spec is None and row.test in LATENCY_LINES_BY_NAME:
            test, line = LATENCY_LINES_BY_NAME[row.test]
            if test not in latency:
                latency.update(run_svm_tests(costs, [test]))
            out.append(float(latency[test][line]))
            continue
        if row.spec is None:
            c = run_test(row.test, costs, row.level)["cycles"]
            out.append(float("nan") if c is None else float(c))
            continue
        if row.spec not in runs:
            runs[row.spec] = _averages(costs, row.spec)
        n, cycles = runs[row.spec].get((row.exit_level, row.test), (0, 0.0))
        if not n:
            out.append(float("nan"))
            continue
        out.append(cycles / n - (costs.hw_exit if row.l0_only else 0.0))
    return out


def perf_rows(
    report: PerfReport, base: CostModel
) -> tuple[list[tuple[Row, float, float]], list[str]]:
    """A report's rows matched to model runs, with their measured cycles and
    the rounding of the printed figure, and the reasons no model run exits with."""
    if report.workload is not None:  # xlio's header says what ran
        assert report.path is not None
        if (report.path == "single") != (report.level == 1):
            raise CalibrationError(
                f"{report.source}: a run on path {report.path} is level "
                f"{1 if report.path == 'single' else 2}, given as l{report.level}"
            )
        spec = Spec(report.workload, report.path, min(report.count or 1, MODEL_COUNT),
                    tuple(sorted(report.switches.items())),
                    tuple(sorted(report.options.items())))  # fmt: skip
        specs = {r.reason: spec for r in report.rows}
    else:
        path = "single" if report.level == 1 else "l1"
        specs = {}
        for w in CANONICAL:
            spec = Spec(w, path, MODEL_COUNT)
            for _, reason in _averages(base, spec):
                specs.setdefault(reason, spec)
    out, missing = [], list(report.unknown)
    l0_only = report.form is Form.PERF
    for r in report.rows:
        if r.reason not in specs:
            missing.append(r.reason)
            continue
        row = Row(r.reason, report.level, specs[r.reason], r.exit_level, l0_only)
        if math.isnan(model_cycles(base, [row])[0]):
            missing.append(r.reason if r.exit_level is None else f"L{r.exit_level} {r.reason}")
            continue
        out.append((row, r.avg_cycles, r.resolution))
    return out, missing


def with_values(
    base: CostModel, values: dict[str, float], source: str, *, whole: bool = True
) -> CostModel:
    """``base`` with ``values`` set (kind calibrated); ``whole``: integer
    parameters rounded to whole cycles, as a preset holds them."""
    params = {}
    for k, v in values.items():
        p = base.params[k]
        value: float | int = round(v) if whole and isinstance(p.value, int) else v
        params[k] = P(value, source, "calibrated", p.unit)
    return with_params(base, base.name, base.description, **params)


def jacobian(base: CostModel, names: list[str], rows: list[Row]) -> list[list[float]]:
    """d cycles / d (relative change of each parameter), per row, at ``base``."""
    at = model_cycles(base, rows)
    cols = []
    for k in names:
        v = float(base.params[k].value)
        h = 0.01
        bumped = with_params(base, base.name, "", **{k: P(v * (1 + h), "d", "user")})
        if isinstance(base.params[k].value, int):  # an integer parameter: a whole step
            step = max(1, round(v * h))
            bumped = with_params(base, base.name, "", **{k: P(int(v) + step, "d", "user")})
            h = step / v
        cols.append([(b - a) / h for a, b in zip(at, model_cycles(bumped, rows), strict=True)])
    return [list(r) for r in zip(*cols, strict=True)] if cols else [[] for _ in rows]


@dataclass
class Identified:
    """What the measured rows determine (:func:`identify`)."""

    moved: list[str]  # every parameter some measured row depends on: the fit moves them
    alone: list[str]  # of those, the ones the rows determine each by itself
    zero: list[str]  # no measured row depends on them
    combos: dict[str, dict[str, float]]  # a parameter not alone -> a determined combination


def identify(
    base: CostModel,
    names: list[str],
    J: list[list[float]],
    measured: list[float],
    rounding: list[float] | None = None,
) -> Identified:
    """From the model's own Jacobian ``J`` (rows x ``names``, d cycles / d
    relative change) at the base: the null space of the rows' relative
    sensitivities says what the rows cannot tell apart. A parameter outside
    it is determined alone. Every other one is part of a combination: the
    projection of its direction on the rows' space is a linear function of
    several parameters' values that the rows do determine, reported as the
    sparsest measured row that holds it."""
    import numpy as np

    A = np.array(J, dtype=float) / np.array(measured, dtype=float)[:, None]
    norms = np.linalg.norm(A, axis=0)
    top = float(norms.max()) if norms.size else 0.0
    zero = [k for k, n in zip(names, norms, strict=True) if n <= 1e-9 * max(top, 1e-300)]
    live = [i for i, k in enumerate(names) if k not in zero]
    if not live:
        return Identified([], [], zero, {})
    B = A[:, live] / norms[live]
    _, sv, vt = np.linalg.svd(B, full_matrices=True)
    rank = int((sv > 1e-8 * sv[0]).sum())
    null = vt[rank:].T
    proj = null @ null.T if null.size else np.zeros((len(live), len(live)))
    moved = [names[i] for i in live]
    # alone: outside the null space, and resolved: 1% noise on every row (or
    # the row's rounding as printed, if larger: a uniform +-q) moves it by at
    # most WEAK (else it is reported in its row's combination)
    sigma = np.full(len(measured), 0.01)
    if rounding is not None:
        q = np.array(rounding, dtype=float) / np.array(measured, dtype=float)
        sigma = np.maximum(sigma, q / math.sqrt(3))
    spread = np.sqrt((np.linalg.pinv(A[:, live]) ** 2) @ sigma**2)
    alone = [names[live[i]] for i in range(len(live))
             if abs(proj[i, i]) < 1e-8 and spread[i] <= WEAK]  # fmt: skip
    # a parameter not determined alone is reported in the sparsest measured
    # row that holds it: that row's cycles are one combination the data fix
    # (its weights: d cycles / d value, the times the row pays each cost)
    Jabs = np.array(J, dtype=float) / np.array(
        [float(base.params[k].value) for k in names], dtype=float
    )
    combos: dict[str, dict[str, float]] = {}
    for i in range(len(live)):
        k = names[live[i]]
        if k in alone:
            continue
        rows = [r for r in range(Jabs.shape[0]) if abs(Jabs[r, live[i]]) > 1e-9]
        # the sparsest row, of those printed to better than 1% if any (a perf
        # kvm stat average of 0.05 us is only known to 10%)
        best = min(rows, key=lambda r: (bool(sigma[r] > 0.01), int((np.abs(Jabs[r]) > 1e-9).sum())))
        combos[k] = {names[j]: round(float(Jabs[best, j]), 6) for j in range(len(names))
                     if abs(Jabs[best, j]) > 1e-9}  # fmt: skip
    return Identified(moved, alone, zero, combos)


def combination_label(weights: dict[str, float]) -> str:
    return " + ".join(
        m if abs(w - 1) < 1e-9 else f"{w:.3g} x {m}" for m, w in weights.items()
    ).replace("+ -", "- ")


def determined_by(base: CostModel, names: list[str]) -> dict[str, str | None]:
    """For each parameter, a test of the model (at a level) whose cycles depend on it."""
    rows = [Row(t.name, lv) for t in TESTS for lv in LEVELS if not t.skip]
    J = jacobian(base, names, rows)
    out: dict[str, str | None] = {}
    for i, k in enumerate(names):
        out[k] = next(
            (f"{r.test} at level {r.level}" for r, row in zip(rows, J, strict=True)
             if abs(row[i]) > 1e-6 and not math.isnan(row[i])),
            None,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------- the fit
def calibrate(
    base: CostModel,
    runs: dict[int, VmexitRuns],
    *,
    perf: list[PerfReport] | None = None,
    hold_out: list[str] | None = None,
    clock_ghz: float | None = None,
) -> dict[str, Any]:
    """Fit ``base``'s free parameters to the measured vmexit runs and perf
    kvm stat reports; the report."""
    import numpy as np
    from scipy.optimize import least_squares

    if clock_ghz is not None:
        base = with_params(base, base.name, base.description,
                           clock_ghz=P(clock_ghz, "--clock", "user", "GHz"))  # fmt: skip
    held = set(hold_out or [])
    measured = {(t, lv) for lv, r in runs.items() for t in r.runs}
    values: dict[Row, list[float]] = {}
    rounding: dict[Row, float] = {}  # half the last printed digit, cycles
    not_produced: list[str] = []
    for report in perf or []:
        rows, missing = perf_rows(report, base)
        not_produced += [f"l{report.level} {m} ({report.source})" for m in missing]
        for row, v, q in rows:
            values.setdefault(row, []).append(v)
            rounding[row] = max(rounding.get(row, 0.0), q)
    names_given = {t for t, _ in measured} | {r.test for r in values}
    missing_held = sorted(h for h in held if h not in names_given)
    if missing_held:
        raise CalibrationError(f"--hold-out {missing_held[0]}: no such test in the input")
    latency = sorted({(t, lv) for t, lv in measured if t in LATENCY_LINES_BY_NAME})
    if latency and Arch(base.arch) is not Arch.SVM:
        raise CalibrationError(
            f"{latency[0][0]}: svm_tests.c's latency lines need an SVM base (--base epyc-2019), "
            f"not {base.name} ({base.arch})"
        )
    if any(lv != 1 for _, lv in latency):
        raise CalibrationError(
            f"{latency[0][0]}: svm_tests.c's latency tests run the test as L1: give them as l1"
        )
    modelable = {(t, lv) for t, lv in measured if _modeled(t)}
    # a test the model runs at native speed at this level (no exit) has no figure to fit
    vm_rows = [Row(t, lv) for t, lv in sorted(modelable)]
    vm_rows = [r for r, c in zip(vm_rows, model_cycles(base, vm_rows), strict=True)
               if not math.isnan(c)]  # fmt: skip
    for r in vm_rows:
        values[r] = runs[r.level].runs[r.test]
        rounding[r] = runs[r.level].resolution.get(r.test, 0.5)
    all_rows = vm_rows + [r for r in values if r.spec is not None]
    used_rows = [r for r in all_rows if r.test not in held]
    if not used_rows:
        raise CalibrationError(
            "nothing to fit: every test given is held out or skipped by the model"
        )
    names = free_parameters(base)
    J = jacobian(base, names, used_rows)
    at_base = model_cycles(base, used_rows)
    ident = identify(base, names, J, at_base, [rounding[r] for r in used_rows])
    not_identified = ident.zero
    units = ident.moved  # each moved by a factor on its base value
    # every run is a residual row (relative), of its row
    obs = [(k, v) for k in used_rows for v in values[k]]
    x0 = np.ones(len(units))
    lo, hi = [], []
    for m in units:
        b = float(base.params[m].value)
        a, z = BOUNDS.get(m, DEFAULT_BOUNDS)
        lo.append(min(a / b, 0.999))  # the base itself always inside
        hi.append(max(z / b, 1.001))

    def values_of(x: Any) -> dict[str, float]:
        return {m: float(base.params[m].value) * float(f) for m, f in zip(units, x, strict=True)}

    # the model's cycles are linear in these parameters (L1's cache pollution
    # held): the fit runs on J, taken once at the base, and its answer is
    # checked on the model itself below
    index = {k: i for i, k in enumerate(used_rows)}
    rows_of = np.array([index[k] for k, _ in obs])
    meas = np.array([v for _, v in obs])
    col = {k: i for i, k in enumerate(names)}
    Ju = np.array(J, dtype=float)[:, [col[m] for m in units]]  # d cycles / d factor
    c0 = np.array(at_base, dtype=float)
    # within what the rows cannot tell apart, the fit moves the parameters
    # least (relative to the base): the base's split, kept as far as the data allow
    reg = 1e-4

    def residuals(x: Any) -> Any:
        pred = c0 + Ju @ (np.asarray(x) - 1.0)
        return np.concatenate([(pred[rows_of] - meas) / meas, reg * (np.asarray(x) - 1.0)])

    jac_rows = np.vstack([Ju[rows_of] / meas[:, None], reg * np.eye(len(units))])

    try:
        sol = least_squares(residuals, x0, jac=lambda x: jac_rows, bounds=(lo, hi),
                            method="trf", x_scale="jac", xtol=1e-14, ftol=1e-15, gtol=1e-15,
                            max_nfev=2000)  # fmt: skip
    except ValueError as e:
        raise FitFailed(f"the fit could not start: {e}", values_of(x0)) from None
    best = values_of(sol.x)
    if sol.status <= 0:
        raise FitFailed(f"the fit did not converge: {sol.message}", best)
    data = sol.fun[: len(obs)]
    worst = int(np.argmax(np.abs(data)))
    if abs(data[worst]) > MAX_RESIDUAL:
        row, v = obs[worst]
        at_bound = [m for m, xv, a, z in zip(units, sol.x, lo, hi, strict=True)
                    if xv <= a * (1 + 1e-9) or xv >= z * (1 - 1e-9)]  # fmt: skip
        raise FitFailed(
            f"the model cannot reach the measurements within its bounds: l{row.level} "
            f"{row.label} measured {v:,.0f}, best {v * (1 + data[worst]):,.0f}"
            + (f" (at a bound: {', '.join(at_bound)})" if at_bound else ""),
            best,
        )
    # standard errors: the residuals' scatter, plus each figure's rounding as
    # printed (a uniform error of +-half its last digit: variance q^2/3),
    # through the sandwich of the least-squares solution
    n, p = len(obs), len(units)
    res = sol.fun[:n]
    Jd = sol.jac[:n]
    dof = max(n - int(np.linalg.matrix_rank(Jd)), 1)
    s2 = float(res @ res) / dof
    q_rel = np.array([rounding[k] / v for k, v in obs])
    var = s2 + q_rel**2 / 3
    try:
        H = np.linalg.pinv(sol.jac.T @ sol.jac)
        cov = H @ (Jd.T * var) @ Jd @ H
        err = np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:
        cov = np.full((p, p), float("nan"))
        err = np.full(p, float("nan"))
    sources = sorted({f"l{r.level} {r.label}" for r in used_rows})
    files = sorted({s for r in runs.values() for s in r.sources}
                   | {rep.source for rep in perf or []})  # fmt: skip
    source = f"calibrated: fitted to {', '.join(sources)} from {', '.join(files)}"
    final = with_values(base, best, source)
    params: dict[str, dict[str, Any]] = {}
    scale = np.array([best[m] / f for m, f in zip(units, sol.x, strict=True)])  # base values
    errs = {m: float(s_ * e) for m, s_, e in zip(units, scale, err, strict=True)}
    ucol = {m: i for i, m in enumerate(units)}
    for k in units:
        if k in ident.alone:
            params[k] = {"value": best[k], "stderr": errs[k], "status": "fitted",
                         "source": source}  # fmt: skip
            continue
        w = ident.combos[k]
        combo = sum(v * best[m] for m, v in w.items())
        # the combination's standard error: its gradient in the factors through cov
        g = np.zeros(p)
        for m, v in w.items():
            if m in ucol:
                g[ucol[m]] = v * scale[ucol[m]]
        combo_err = float(np.sqrt(max(float(g @ cov @ g), 0.0)))
        label = combination_label(w)
        params[k] = {
            "value": best[k], "stderr": errs[k], "status": "combination",
            "source": f"{source}; determined only as {label} = {combo:,.1f} (within what the "
            "rows cannot tell apart, moved least from the base)",
            "combination": {"members": list(w), "weights": list(w.values()), "label": label,
                            "value": combo, "stderr": combo_err},
        }  # fmt: skip
    deciders = determined_by(base, not_identified) if not_identified else {}
    for m in not_identified:
        decider = deciders[m]
        why = "no measured test depends on it" + (
            f"; {decider} would determine it" if decider else "; no vmexit test does"
        )
        params[m] = {"value": float(base.params[m].value), "stderr": None,
                     "status": "not identified", "why": why,
                     "source": f"{base.params[m].source} ({why})"}  # fmt: skip
    for k, p_ in base.params.items():
        if k not in params:
            why = f"{p_.source} ({HELD[k]})" if k in HELD else p_.source
            params[k] = {"value": p_.value, "stderr": None, "status": "fixed", "source": why}
    pred_all = dict(zip(all_rows, model_cycles(final, all_rows), strict=True))
    residual_rows = []
    for row in all_rows:
        for v in values[row]:
            f = pred_all[row]
            residual_rows.append({
                "test": row.label, "level": row.level, "measured": v, "fitted": f,
                "residual_pct": (f - v) / v * 100 if v else None, "used": row in index,
                "input": "vmexit" if row.spec is None else "perf kvm stat",
            })  # fmt: skip
    everything = [Row(t.name, lv) for t in TESTS for lv in LEVELS if not t.skip]
    others = [r for r in everything if (r.test, r.level) not in measured]
    predictions = [
        {"test": r.test, "level": r.level, "cycles": c}
        for r, c in zip(others, model_cycles(final, others), strict=True)
        if not math.isnan(c)
    ]
    skipped_by_model = sorted({t for t, _ in measured if not _modeled(t)}
                              | {t for t, lv in modelable if Row(t, lv) not in values})  # fmt: skip
    return {
        "base": base.name, "clock_ghz": base.clock_ghz, "model": final,
        "parameters": params, "residuals": residual_rows, "predictions": predictions,
        "unknown_tests": sorted({t for r in runs.values() for t in r.unknown}),
        "not_modeled": skipped_by_model, "not_produced": not_produced,
        "held_out": sorted(held), "cost": float(sol.cost), "nfev": int(sol.nfev),
        "files": files,
    }  # fmt: skip


def PRESETS_BY_NAME() -> dict[str, CostModel]:  # noqa: N802 (imported late: presets build models)
    from xlio.sim.presets import PRESETS

    return PRESETS


def to_toml(r: dict[str, Any]) -> str:
    """The calibrated preset in the ``--costs`` format: ``base`` and ``[params]``."""
    lines = [
        "# xlio calibrate: a preset for `--costs FILE.toml` (every command takes it)",
        f'base = "{r["base"]}"',
        f'name = "calibrated-{r["base"]}"',
        f'description = "{r["base"]} calibrated to {", ".join(r["files"])}"'.replace("\\", "/"),
        "",
        "[params]",
    ]
    base = PRESETS_BY_NAME()[r["base"]]
    for k, p in r["parameters"].items():
        if p["status"] in ("fitted", "combination") or (
            k == "clock_ghz" and p["source"] == "--clock"
        ):
            v = p["value"]
            whole = isinstance(r["model"].params[k].value, int)
            value = round(v) if whole else v
            src = p["source"].replace("\\", "/").replace('"', "'")
            span = ""
            if p["status"] == "fitted" and p["stderr"] is not None:  # +-2 standard errors
                lo, hi = max(value - 2 * p["stderr"], 0.0), value + 2 * p["stderr"]
                basis = "calibrated: +-2 standard errors of the fit"
            else:  # the data fix only a combination: the base's range, moved with the value
                br = param_range(base.params[k])
                b = float(base.params[k].value)
                if br is None or not b:
                    lo = hi = None
                else:
                    lo, hi = br.low * value / b, br.high * value / b
                basis = "the base's range, moved with the value (the data fix only a combination)"
            if lo is not None and hi is not None and hi > lo:
                lo, hi = min(lo, value), max(hi, value)
                span = f', low = {lo!r}, high = {hi!r}, basis = "{basis}"'
            lines.append(f'"{k}" = {{ value = {value!r}, source = "{src}"{span} }}')
    return "\n".join(lines) + "\n"


def format_report(r: dict[str, Any]) -> str:
    out = [
        f"xlio calibrate: base {r['base']} at {r['clock_ghz']:g} GHz, from {', '.join(r['files'])}",
        "",
    ]
    out.append(f"{'test':<30}{'level':>6}{'measured':>12}{'fitted':>12}{'residual':>10}  used")
    for row in r["residuals"]:
        res = f"{row['residual_pct']:+.2f}%" if row["residual_pct"] is not None else ""
        out.append(f"{row['test']:<30}{row['level']:>6}{row['measured']:>12,.0f}{row['fitted']:>12,.0f}"
                   f"{res:>10}  {'yes' if row['used'] else 'held out'}")  # fmt: skip
    out.append("")
    out.append(f"{'parameter':<28}{'value':>12}{'stderr':>10}  status")
    for k, p in r["parameters"].items():
        if p["status"] == "fixed":
            continue
        err = (
            f"{p['stderr']:,.0f}" if p["stderr"] is not None and p["stderr"] == p["stderr"] else ""
        )
        v = p["value"]
        vs = f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        extra = ""
        if p["status"] == "combination":
            c = p["combination"]
            extra = f" ({c['label']} = {c['value']:,.1f} +- {c['stderr']:,.1f})"
        elif p["status"] == "not identified":
            extra = f" ({p['why']})"
        out.append(f"{k:<28}{vs:>12}{err:>10}  {p['status']}{extra}")
    if r["predictions"]:
        out.append("")
        out.append("predicted by the calibrated preset, not in the input:")
        out.extend(f"  l{p['level']} {p['test']} {p['cycles']:,.0f}" for p in r["predictions"])
    fixed = sum(1 for p in r["parameters"].values() if p["status"] == "fixed")
    out.append(f"({fixed} parameters fixed: published, derived, switches and the clock)")
    if r["unknown_tests"]:
        out.append("tests the model does not have (not fitted): " + ", ".join(r["unknown_tests"]))
    if r["not_produced"]:
        out.append(
            "perf kvm stat rows no run of the model exits with (not fitted): "
            + ", ".join(r["not_produced"])
        )
    if r["not_modeled"]:
        out.append(
            "tests the model skips (no exit, or not modeled): " + ", ".join(r["not_modeled"])
        )
    return "\n".join(out)
