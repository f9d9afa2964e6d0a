"""Wall time per operation of the network workloads in process, now and at another commit.

Each cell is the best of ``--runs`` runs of ``measure`` (``--count``
operations after its warm-up) on ``kvm-2019``: microseconds of Python per
frame (tx, rx) or per request (echo). ``--batch`` is the frames (requests)
per burst, one kick or interrupt for the burst (1: one each). With ``--against REV`` the same runs
are made on that commit, checked out in a temporary git worktree and run
from there, alternating with this checkout's (A B A B, these machines are
noisy), so a speed change is measured in one minute, not across days.

    python scripts/bench_inproc.py [--count 3000] [--runs 5] [--batch 1] [--against REV]
"""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack

from worktree import checkout, run_json

ROWS = [(p, w) for p in ("l0", "l1") for w in ("echo", "rx", "tx")]
CHILD = """
import json, sys, time
from xlio.measure import measure
rows, count, batch = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
out = {}
for path, w in rows:
    measure(w, path, "kvm-2019", count=200, options={"batch": batch})
    t = time.perf_counter()
    measure(w, path, "kvm-2019", count=count, options={"batch": batch})
    out[f"{path} {w}"] = (time.perf_counter() - t) / count * 1e6
print(json.dumps(out))
"""


def _run(pythonpath: str | None, count: int, batch: int) -> dict[str, float]:
    return dict(run_json(CHILD, [json.dumps(ROWS), str(count), str(batch)], pythonpath))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--against", metavar="REV")
    a = ap.parse_args()
    with ExitStack() as stack:
        sides: dict[str, str | None] = {"now": None}
        if a.against:
            sides[a.against] = stack.enter_context(checkout(a.against))
        best: dict[str, dict[str, float]] = {k: {} for k in sides}
        for _ in range(a.runs):
            for side, pythonpath in sides.items():
                for row, us in _run(pythonpath, a.count, a.batch).items():
                    best[side][row] = min(us, best[side].get(row, us))
    names = list(sides)
    print(f"{'path':<6}{'workload':<10}" + "".join(f"{n + ' (us/op)':>18}" for n in names)
          + ("  now/" + names[1] if len(names) > 1 else ""))  # fmt: skip
    for path, w in ROWS:
        cells = [best[n][f"{path} {w}"] for n in names]
        line = f"{path:<6}{w:<10}" + "".join(f"{c:>18.1f}" for c in cells)
        if len(cells) > 1:
            line += f"  {cells[0] / cells[1]:.2f}"
        print(line)


if __name__ == "__main__":
    main()
