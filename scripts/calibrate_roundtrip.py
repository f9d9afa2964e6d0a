"""The calibration's identifiability test, over many seeds (issue 21).

For each seed, kvm-2019's calibratable parameters are moved by factors
between 0.5x and 2x, `xlio vmexit`'s output at both levels is written with
that preset (with ``--noise P``, each figure then scaled by a factor drawn
uniformly within +-P%), and `xlio calibrate` starts from the unperturbed
preset. Reported: the worst error of a parameter called fitted and of a
combination, the worst fitted test, and how often each fitted parameter's
truth lies within two reported standard errors.

    python scripts/calibrate_roundtrip.py [--seeds 20] [--noise 3]
"""

from __future__ import annotations

import argparse
import random
import time

from xlio.calibrate import calibrate, free_parameters, parse_vmexit, with_values
from xlio.sim.presets import PRESETS
from xlio.sim.vmexit import format_lines, run


def one(seed: int, noise: float) -> dict[str, float]:
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
    r = calibrate(base, runs)
    fit_err, combo_err, covered, fitted = 0.0, 0.0, 0, 0
    for k, p in r["parameters"].items():
        if p["status"] == "fitted":
            fitted += 1
            fit_err = max(fit_err, abs(p["value"] / truth[k] - 1))
            covered += abs(p["value"] - truth[k]) <= 2 * (p["stderr"] or 0)
        elif p["status"] == "combination":
            c = p["combination"]
            t = sum(w * truth[m] for m, w in zip(c["members"], c["weights"], strict=True))
            combo_err = max(combo_err, abs(c["value"] / t - 1))
    worst = max(abs(x["residual_pct"]) for x in r["residuals"])
    return {"fit": fit_err, "combo": combo_err, "rows": worst, "covered": covered,
            "fitted": fitted}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--noise", type=float, default=3.0, help="percent, 0 for none")
    a = ap.parse_args()
    t = time.perf_counter()
    out = [one(s, a.noise / 100) for s in range(1, a.seeds + 1)]
    all_covered = sum(1 for o in out if o["covered"] == o["fitted"])
    lo, hi = min(o["fitted"] for o in out), max(o["fitted"] for o in out)
    print(f"{a.seeds} seeds, noise +-{a.noise:g}%: parameters called fitted per seed "
          f"{lo}-{hi}; worst fitted parameter "
          f"{max(o['fit'] for o in out) * 100:.2f}%, worst combination "
          f"{max(o['combo'] for o in out) * 100:.2f}%, worst test "
          f"{max(o['rows'] for o in out):.2f}% off; "
          + (f"every fitted parameter within 2 standard errors of its truth in {all_covered} "
             f"of {a.seeds} seeds " if hi else "no parameter fitted, so no coverage to count ")
          + f"({time.perf_counter() - t:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
