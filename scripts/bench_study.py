"""Studies' speed (issue 22): 1,000 samples of `xlio vmexit --level 2` with
--jobs 2 (target: at most 20 s here), and the executor's own cost per
sample on netperf runs (target: under 5% of a sample's time).

The second part runs the same netperf samples twice in this process,
interleaved: straight (``figures(task)`` in a loop) and through
``Executor(jobs=1).map`` (task keys, ordering, progress callback), and with
``--jobs 2`` against the straight loop's time halved (the work split over
two processes, pickling and forking included).

    python scripts/bench_study.py [--netperf-samples 12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from xlio.executor import Executor
from xlio.sim.presets import PRESETS
from xlio.study import Dist, Study, Task, figures
from xlio.sweep import Of, Point


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--netperf-samples", type=int, default=12)
    a = ap.parse_args()
    cmd = [sys.executable, "-m", "xlio", "vmexit", "--preset", "kvm-2019", "--level", "2",
           "--samples", "1000", "--jobs", "2", "--json"]  # fmt: skip
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    whole = time.perf_counter() - t
    print(f"vmexit --level 2 --samples 1000 --jobs 2: {whole:.1f} s (target 20 s): "
          f"{'met' if whole <= 20 else 'NOT MET'}")  # fmt: skip

    costs = PRESETS["turtles-2010"]
    point = Point(Of.NETPERF, "TCP_STREAM", "l1", costs, 0, {},
                  {"link": "1g", "duration": 0.2})  # fmt: skip
    tasks = Study(Task("netperf", (point,), (costs,)), a.netperf_samples, 1, Dist.UNIFORM).tasks
    figures(tasks[0])  # warm: imports and first-run caches belong to neither side
    straight = via = 0.0
    for i in range(len(tasks)):  # interleaved one by one, each side first in turn
        order = ("straight", "via") if i % 2 else ("via", "straight")
        for side in order:
            t = time.perf_counter()
            if side == "straight":
                figures(tasks[i])
                straight += time.perf_counter() - t
            else:
                Executor(1).map(figures, [tasks[i]], lambda: None)
                via += time.perf_counter() - t
    t = time.perf_counter()
    with Executor(2) as ex:
        ex.map(figures, tasks, lambda: None)
    two = time.perf_counter() - t
    per = straight / len(tasks)
    over = (via - straight) / len(tasks)
    print(f"netperf TCP_STREAM l1 0.2 s, {len(tasks)} samples: {per * 1000:.0f} ms each; "
          f"executor (jobs 1) {over * 1000:+.1f} ms per sample = {over / per:+.1%} "
          f"(target under 5%: {'met' if over / per < 0.05 else 'NOT MET'}); jobs 2: "
          f"{two:.1f} s against {straight / 2:.1f} s for half the straight loop "
          f"({two / (straight / 2) - 1:+.1%})")  # fmt: skip


if __name__ == "__main__":
    main()
