"""Peak resident memory of the EPT model for a 16 GiB L2 inside a 32 GiB L1.

Each scenario runs in a fresh child process, which reports its own peak
(VmHWM, read by the child: ``wait4``'s figure would include the parent); the
first row is the bare interpreter with xlio imported, for reference. Target
(issue 3): under 200 MB for the 16 GiB L2 model. The last two rows run
machine after machine in one process, as a sweep does: a dead machine must
be freed at once, not wait for the cyclic collector (issue 11).

    python scripts/bench_memory.py [--against REV]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from contextlib import ExitStack

from worktree import checkout, child_env

SCENARIOS = {
    "import only": "",
    "on demand, 1 GiB working set touched": (
        "measure('ept-touch', 'l1', 'turtles-2010', options=dict(working_set_mib=1024,"
        " avoid_invept=True))"
    ),
    "static EPT12 (all 16 GiB), 1 GiB touched": (
        "measure('ept-touch', 'l1', 'turtles-2010', options=dict(working_set_mib=1024,"
        " static_ept=True))"
    ),
    "static EPT12 + EPT02 (all 16 GiB)": (
        "measure('ept-touch', 'l1', 'turtles-2010', options=dict(working_set_mib=16384,"
        " static_ept02=True))"
    ),
    "static EPT12 + EPT02, 2 MiB pages": (
        "measure('ept-touch', 'l1', 'turtles-2010', options=dict(working_set_mib=16384,"
        " static_ept02=True, page_size='2m'))"
    ),
    # a sweep's pattern: machine after machine in one process (a dead one must go at once)
    "60 echo measurements (l0, 20 requests) in a row": (
        "for _ in range(60): measure('echo', 'l0', 'kvm-2019', count=20)"
    ),
    "the same, gc.collect() after each": (
        "import gc\nfor _ in range(60): measure('echo', 'l0', 'kvm-2019', count=20); gc.collect()"
    ),
}


#: Printed by each child at its end: its own peak (VmHWM). ru_maxrss from wait4
#: would include the parent's resident set at fork time.
REPORT = (
    "\nwith open('/proc/self/status') as f:\n"
    "    print(next(l.split()[1] for l in f if l.startswith('VmHWM:')))\n"
)


def peak_rss_mib(code: str, pythonpath: str | None = None) -> float:
    prog = f"from xlio.measure import measure\n{code}\n{REPORT}"
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          env=child_env(pythonpath), cwd=tempfile.gettempdir())  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"scenario failed: {code}\n{proc.stderr}")
    return int(proc.stdout.split()[-1]) / 1024  # KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", metavar="REV", help="also run each scenario on that commit")
    a = ap.parse_args()
    with ExitStack() as stack:
        other = stack.enter_context(checkout(a.against)) if a.against else None
        head = f"{'scenario (16 GiB L2 in 32 GiB L1, 4 KiB pages unless said)':<58}"
        head += f"{'peak RSS MiB':>14}"
        print(head + (f"{a.against:>14}" if a.against else ""))
        for name, code in SCENARIOS.items():
            line = f"{name:<58}{peak_rss_mib(code):>14.1f}"
            if other is not None:
                line += f"{peak_rss_mib(code, other):>14.1f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
