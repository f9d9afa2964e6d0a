"""Stop soak: ``xlio serve`` stopped by a signal at random moments, many times.

Each round starts ``xlio serve --netns xlio-stopsoak<pid>-<n>`` with default
signal dispositions, sends SIGTERM (or ``--signal``) after a delay drawn
uniformly from ``--from`` to ``--to`` seconds (the default spans importing,
building the namespace and serving), and checks what a user must always
see: exit status 128 + the signal, no traceback or "Exception ignored" on
stderr, and the round's namespace gone. A round that fails is printed whole
(delay, status, output) and its namespace removed. Needs CAP_NET_ADMIN and
CAP_SYS_ADMIN (root).

    python scripts/stop_soak.py [--rounds 60] [--from 0.3] [--to 1.6] [--signal TERM]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys


def _defaults() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--from", dest="lo", type=float, default=0.3)
    ap.add_argument("--to", dest="hi", type=float, default=1.6)
    ap.add_argument("--signal", default="TERM", choices=("INT", "TERM", "HUP"))
    a = ap.parse_args()
    sig = signal.Signals["SIG" + a.signal]
    xlio = [sys.executable, "-m", "xlio"]
    bad = 0
    for n in range(a.rounds):
        ns = f"xlio-stopsoak{os.getpid()}-{n}"
        delay = random.uniform(a.lo, a.hi)
        p = subprocess.Popen(
            [*xlio, "serve", "--netns", ns], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=_defaults,
        )  # fmt: skip
        try:
            p.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(sig)
        out, err = p.communicate(timeout=30)
        left = ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        text = err.decode(errors="replace")
        ok = (
            p.returncode == 128 + sig
            and "Traceback" not in text
            and "Exception ignored" not in text
        )
        if not ok or left:
            bad += 1
            print(f"round {n}: delay {delay:.3f} s, status {p.returncode}, namespace left: {left}")
            print("  stdout: " + out.decode(errors="replace").replace("\n", "\n  "))
            print("  stderr: " + text.replace("\n", "\n  "), flush=True)
            if left:
                subprocess.run(["ip", "netns", "del", ns], check=False)
    print(f"stop soak: {a.rounds} rounds, SIG{a.signal} after {a.lo}-{a.hi} s, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
