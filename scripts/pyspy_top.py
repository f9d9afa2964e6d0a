"""Summarize a py-spy raw profile: top self time per function, or per layer.

    python scripts/pyspy_top.py prof.txt [--top N] [--layers] [--within FUNC]

``prof.txt`` is ``py-spy record -f raw`` output (one collapsed stack and its
sample count per line). Self time is the sample's innermost frame. With
``--layers`` each sample goes to the layer of xlio (or library) its innermost
frame lives in, so the shares add up to 100%. With ``--within FUNC`` only
the samples whose stack holds a frame of that function count (the steady
state, say ``TapSession.run``, without the start-up).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

#: Where a frame's file puts it, first match wins (path fragments).
LAYERS = (
    ("trio's event loop (epoll wait included)", ("trio/", "outcome/", "sniffio/")),
    ("tap edge (os.read/os.write)", ("backends/tap.py", "backends/wire.py")),
    ("model: machine operations", ("sim/nested.py", "sim/routing.py", "sim/accounting.py",
                                   "sim/vmcs.py", "sim/apic.py", "sim/refs.py")),
    ("guest-memory accessor", ("sim/memory.py",)),
    ("device: virtqueue and virtio-net", ("backends/virtqueue.py", "backends/device.py",
                                          "xlio/virtio.py")),
    ("L2 driver", ("frontends/",)),
    ("datapath glue", ("backends/datapath.py", "backends/direct.py")),
    ("L2 endpoint (packets)", ("xlio/packets.py",)),
    ("start-up (imports)", ("<frozen importlib", "attr/_make.py", "dataclasses.py")),
)  # fmt: skip
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):\d+\)$")


def _parse(path: str, within: str | None = None) -> tuple[int, Counter[str], Counter[str]]:
    total = 0
    by_func: Counter[str] = Counter()
    by_layer: Counter[str] = Counter()
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack or (within is not None and f"{within} (" not in stack):
                continue
            k = int(n)
            total += k
            leaf = stack.split(";")[-1]
            m = _FRAME.match(leaf)
            func, file = (m["func"], m["file"]) if m else (leaf, "")
            by_func[f"{func} {file.rsplit('/', 1)[-1]}"] += k
            by_layer[next((name for name, parts in LAYERS if any(p in file for p in parts)),
                          "other")] += k  # fmt: skip
    return total, by_func, by_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--layers", action="store_true")
    ap.add_argument("--within", metavar="FUNC", help="only samples with this function on the stack")
    a = ap.parse_args()
    total, by_func, by_layer = _parse(a.profile, a.within)
    rows = by_layer.most_common() if a.layers else by_func.most_common(a.top)
    print(f"== {'self time by layer' if a.layers else 'top self time'}, of {total} samples")
    for name, k in rows:
        print(f"{100 * k / max(total, 1):5.1f}% {name}")


if __name__ == "__main__":
    main()
