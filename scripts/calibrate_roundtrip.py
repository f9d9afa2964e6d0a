"""The calibration's identifiability test, over many seeds (issue 21).

For each seed, kvm-2019's calibratable parameters are moved by factors
between 0.5x and 2x, `xlio vmexit`'s output at both levels is written with
that preset (with ``--noise P``, each figure then scaled by a factor drawn
uniformly within +-P%), and `xlio calibrate` starts from the unperturbed
preset. ``--perf cpuid,io-user,timer-tick`` adds, for each workload, the
report `xlio measure --perf-kvm-stat` prints at both levels under the
perturbed preset (the noise scales its averages too). Reported: the worst
error of a parameter called fitted and of a combination, the worst fitted
test, and how often each fitted parameter's (and combination's) truth lies
within two reported standard errors.

    python scripts/calibrate_roundtrip.py [--seeds 20] [--noise 3] [--perf WORKLOAD,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

from xlio.calibrate import calibrate, free_parameters, parse_vmexit, with_values
from xlio.measure import measure
from xlio.perf_kvm import parse_perf_kvm_stat
from xlio.report import format_perf_kvm_stat
from xlio.sim.presets import PRESETS
from xlio.sim.vmexit import format_lines, run


def one(seed: int, noise: float, workloads: list[str]) -> dict[str, float]:
    base = PRESETS["kvm-2019"]
    rng = random.Random(seed)
    truth = {k: float(base.params[k].value) * rng.uniform(0.5, 2) for k in free_parameters(base)}
    model = with_values(base, truth, "perturbed")
    runs = {}
    for lv in (1, 2):
        lines = []
        for line in format_lines(run(model, lv)).splitlines():
            parts = line.split()
            if noise and len(parts) == 2 and parts[1].isdigit():
                line = f"{parts[0]} {round(int(parts[1]) * rng.uniform(1 - noise, 1 + noise))}"
            lines.append(line)
        runs[lv] = parse_vmexit("\n".join(lines), lv, f"l{lv}")
    perf = []
    for w in workloads:
        for lv, path in ((1, "single"), (2, "l1")):
            text = format_perf_kvm_stat(measure(w, path, model, count=100), model.hw_exit)
            rep = parse_perf_kvm_stat(text, lv, f"{w}-l{lv}", base.clock_ghz)
            rep.rows = [dataclasses.replace(r, avg_cycles=r.avg_cycles * rng.uniform(
                1 - noise, 1 + noise)) for r in rep.rows]  # fmt: skip
            perf.append(rep)
    r = calibrate(base, runs, perf=perf)
    fit_err, combo_err, covered, fitted, combo_covered, combos = 0.0, 0.0, 0, 0, 0, 0
    for k, p in r["parameters"].items():
        if p["status"] == "fitted":
            fitted += 1
            fit_err = max(fit_err, abs(p["value"] / truth[k] - 1))
            covered += abs(p["value"] - truth[k]) <= 2 * (p["stderr"] or 0)
        elif p["status"] == "combination":
            c = p["combination"]
            t = sum(w * truth[m] for m, w in zip(c["members"], c["weights"], strict=True))
            combo_err = max(combo_err, abs(c["value"] / t - 1))
            combos += 1
            combo_covered += abs(c["value"] - t) <= 2 * c["stderr"]
    worst = max(abs(x["residual_pct"]) for x in r["residuals"])
    return {"fit": fit_err, "combo": combo_err, "rows": worst, "covered": covered,
            "fitted": fitted, "combo_covered": combo_covered, "combos": combos}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--noise", type=float, default=3.0, help="percent, 0 for none")
    ap.add_argument("--perf", default="", metavar="WORKLOAD,...",
                    help="add xlio measure --perf-kvm-stat reports of these workloads")  # fmt: skip
    a = ap.parse_args()
    t = time.perf_counter()
    workloads = [w for w in a.perf.split(",") if w]
    out = [one(s, a.noise / 100, workloads) for s in range(1, a.seeds + 1)]
    all_covered = sum(1 for o in out if o["covered"] == o["fitted"])
    lo, hi = min(o["fitted"] for o in out), max(o["fitted"] for o in out)
    print(f"{a.seeds} seeds, noise +-{a.noise:g}%"
          + (f", perf kvm stat of {', '.join(workloads)}" if workloads else "")
          + ": parameters called fitted per seed "
          f"{lo}-{hi}; worst fitted parameter "
          f"{max(o['fit'] for o in out) * 100:.2f}%, worst combination "
          f"{max(o['combo'] for o in out) * 100:.2f}%, worst test "
          f"{max(o['rows'] for o in out):.2f}% off; "
          + (f"every fitted parameter within 2 standard errors of its truth in {all_covered} "
             f"of {a.seeds} seeds; " if hi else "no parameter fitted, so no coverage to count; ")
          + f"combinations within 2 standard errors: {sum(o['combo_covered'] for o in out)} of "
          f"{sum(o['combos'] for o in out)} ({time.perf_counter() - t:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
