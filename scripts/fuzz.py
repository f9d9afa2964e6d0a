"""The long mode of the guest-interface fuzzer: at least 100,000 examples.

Walks through seeds on each backend (``single``, ``l1``, ``l0``), a fresh
device every ``--rebuild`` examples, checking every invariant of
:mod:`xlio.guestfuzz` after every step. Stops at the first broken invariant
and prints its seed (``--seed S --examples 1 --paths P`` replays it).

    python scripts/fuzz.py [--examples 100000] [--seed 0] [--paths single,l1,l0]
                           [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

from xlio.guestfuzz import PATHS, Fuzzer, InvariantBroken, Tally, new_datapath


def run(path: str, first: int, n: int, rebuild: int) -> Tally:
    total = Tally()
    f = Fuzzer(new_datapath(path))
    for seed in range(first, first + n):
        if f.tally.examples == rebuild:
            _merge(total, f.tally)
            f = Fuzzer(new_datapath(path))
        try:
            f.example(seed)
        except InvariantBroken as e:
            print(f"{path}: seed {seed}: {e}", file=sys.stderr)
            sys.exit(1)
    _merge(total, f.tally)
    return total


def _merge(into: Tally, t: Tally) -> None:
    into.examples += t.examples
    into.steps += t.steps
    into.actions.update(t.actions)
    into.errors.update(t.errors)
    into.needs_reset += t.needs_reset
    into.refusals += t.refusals
    into.frames_checked += t.frames_checked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=100_000, help="in all, split over the paths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--rebuild", type=int, default=2000, help="examples per fresh device")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    paths = a.paths.split(",")
    per = -(-a.examples // len(paths))
    out: dict[str, dict[str, object]] = {}
    reasons: Counter[str] = Counter()
    t0 = time.perf_counter()
    for path in paths:
        t = time.perf_counter()
        tally = run(path, a.seed, per, a.rebuild)
        wall = time.perf_counter() - t
        reasons.update(tally.errors)
        out[path] = {
            "examples": tally.examples, "steps": tally.steps, "needs_reset": tally.needs_reset,
            "delegations_refused": tally.refusals, "frames_checked": tally.frames_checked,
            "chains_dropped_by_reason": dict(tally.errors.most_common()),
            "actions": dict(tally.actions), "wall_s": round(wall, 1), "violations": 0,
        }  # fmt: skip
        print(f"{path:<7} {tally.examples:>8,} examples {tally.steps:>9,} steps "
              f"{sum(tally.errors.values()):>8,} bad chains/rings counted "
              f"{tally.needs_reset:>6,} NEEDS_RESET {tally.refusals:>5,} refusals "
              f"{tally.frames_checked:>8,} frames checked  0 violations  {wall:.0f} s")  # fmt: skip
    examples = per * len(paths)
    print(f"total: {examples:,} examples in "
          f"{time.perf_counter() - t0:.0f} s, no invariant broken; reasons counted:")  # fmt: skip
    for reason, n in reasons.most_common():
        print(f"  {n:>8,}  {reason}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
