"""Whether a change moved the datapath model's answers: a digest of ``measure``.

Runs ``measure`` of tx, rx and echo on single, l0 and l1, with batches of
1, 8 and 64 frames and frames of 60, 1,500 and 9,000 bytes (300 operations
each), and of every other workload on single, l0 and l1 (50 operations
each), and kvm-unit-tests' vmexit tests at both levels with APICv as the
preset says, off and on, on every preset; each result is hashed whole
(per-operation figures, totals, device counters). With ``--against REV``
the same runs are made on that commit, checked out in a temporary git
worktree, and the configurations whose digests differ are listed.

    python scripts/model_digest.py [--against REV]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from contextlib import ExitStack

from worktree import checkout, run_json

CHILD = """
import hashlib, json
from xlio.measure import measure
from xlio.sim.presets import PRESETS
out = {}
for preset in sorted(PRESETS):
    for path in ("single", "l0", "l1"):
        for w in ("tx", "rx", "echo"):
            for batch in (1, 8, 64):
                for size in (60, 1500, 9000):
                    r = measure(w, path, preset, count=300,
                                options={"batch": batch, "frame_size": size})
                    text = json.dumps(r, sort_keys=True, default=str).encode()
                    out[f"{preset} {path} {w} batch {batch} frame {size}"] = \\
                        hashlib.sha1(text).hexdigest()
from xlio.sim.workloads import WORKLOADS
for preset in sorted(PRESETS):
    for path in ("single", "l0", "l1"):
        for w in WORKLOADS:
            r = measure(w, path, preset, count=50)
            text = json.dumps(r, sort_keys=True, default=str).encode()
            out[f"{preset} {path} {w}"] = hashlib.sha1(text).hexdigest()
from xlio.sim import vmexit
for preset in sorted(PRESETS):
    for level in (1, 2):
        for apicv in (None, False, True):
            try:
                r = vmexit.run(PRESETS[preset], level, apicv=apicv)
            except ValueError as e:  # a switch the architecture refuses
                r = {"refused": str(e)}
            text = json.dumps(r, sort_keys=True, default=str).encode()
            out[f"{preset} vmexit level {level} apicv {apicv}"] = hashlib.sha1(text).hexdigest()
print(json.dumps(out))
"""


def digests(pythonpath: str | None) -> dict[str, str]:
    return dict(run_json(CHILD, [], pythonpath))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", metavar="REV")
    a = ap.parse_args()
    now = digests(None)
    whole = hashlib.sha1(json.dumps(now, sort_keys=True).encode()).hexdigest()
    print(f"{len(now)} configurations, digest of all {whole}")
    if a.against:
        with ExitStack() as stack:
            then = digests(stack.enter_context(checkout(a.against)))
        differ = [k for k in now if now[k] != then.get(k)]
        print(f"against {a.against}: {len(differ)} of {len(now)} differ")
        for k in differ:
            print(f"  {k}")


if __name__ == "__main__":
    main()
