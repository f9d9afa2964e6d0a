"""L2's endpoint per frame, now and at another commit: its time, and that it answers the same.

Each side runs in a child process (``--against REV``: that commit's xlio
from a temporary worktree, :mod:`worktree`), alternating A B A B. A child
times ``Endpoint.handle`` and its caller's ``extend`` (as
``Datapath.l2_interrupt`` calls it) on 256 UDP frames to the discard port
and 256 echo requests (best of ``--loops`` loops of 100 passes, ns a
frame), then answers ``--frames`` frames mutated at random from a seeded
generator (UDP echo and discard, ICMP echo request and reply, ARP request
and reply; bytes changed, the frame cut, bytes inserted) and prints a
digest of every answer and of the endpoint's counters and kept replies:
equal digests, equal behaviour on those frames.

    python scripts/bench_endpoint.py [--against REV] [--runs 3] [--frames 300000]
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack

from worktree import checkout, run_json

CHILD = """
import hashlib, json, random, sys, time
import xlio.packets as pk
from xlio.backends.wire import GUEST_IP, GUEST_MAC, PEER_IP, PEER_MAC
loops, n_frames = int(sys.argv[1]), int(sys.argv[2])
out = {}
for port, name in ((pk.UDP_DISCARD_PORT, "discard"), (pk.UDP_ECHO_PORT, "echo")):
    ep = pk.Endpoint(GUEST_MAC, GUEST_IP)
    frames = [pk.udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, port, 64, i)
              for i in range(256)]
    handle, best = ep.handle, float("inf")
    for _ in range(loops):
        t = time.perf_counter()
        for _ in range(100):
            replies = []
            for f in frames:
                replies.extend(handle(f))
        best = min(best, (time.perf_counter() - t) / (100 * len(frames)) * 1e9)
    out[name] = best
rng = random.Random(1)
ep = pk.Endpoint(GUEST_MAC, GUEST_IP)
ep.record = True
bases = [
    pk.udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, pk.UDP_ECHO_PORT, 80, 1),
    pk.udp_frame_of_size(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, pk.UDP_DISCARD_PORT, 80, 1),
    pk.udp_frame(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, pk.UDP_ECHO_PORT, 4000, b"hello"),
    pk.icmp_echo_frame(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, 5, 6, b"x" * 20),
    pk.icmp_echo_frame(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, 5, 6, b"x" * 20, reply=True),
    pk.arp_frame(1, PEER_MAC, PEER_IP, bytes(6), GUEST_IP, pk.BROADCAST),
    pk.arp_frame(2, PEER_MAC, PEER_IP, GUEST_MAC, GUEST_IP, GUEST_MAC),
]
h = hashlib.sha256()
answered = 0
for _ in range(n_frames):
    f = bytearray(rng.choice(bases))
    for _ in range(rng.randrange(0, 4)):
        k = rng.randrange(0, 3)
        if k == 0 and f:
            f[rng.randrange(len(f))] = rng.randrange(256)
        elif k == 1:
            del f[rng.randrange(len(f) + 1):]
        else:
            i, j = rng.randrange(min(40, len(f) + 1)), rng.randrange(min(40, len(f) + 1))
            f[i:j] = bytes(rng.randrange(3))
    got = ep.handle(bytes(f))
    answered += bool(got)
    h.update(repr(got).encode())
kept = (ep.received, ep.answered, ep.discarded, ep.icmp_reply_count, ep.udp_reply_count,
        list(ep.udp_replies), list(ep.icmp_replies), ep.received_udp, sorted(ep.neighbors.items()))
h.update(repr(kept).encode())
out["answered"] = answered
out["digest"] = h.hexdigest()[:16]
print(json.dumps(out))
"""


def _run(pythonpath: str | None, loops: int, frames: int) -> dict[str, float | str]:
    return dict(run_json(CHILD, [str(loops), str(frames)], pythonpath))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", metavar="REV")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--loops", type=int, default=20)
    ap.add_argument("--frames", type=int, default=300_000)
    a = ap.parse_args()
    with ExitStack() as stack:
        sides: dict[str, str | None] = {"now": None}
        if a.against:
            sides[a.against] = stack.enter_context(checkout(a.against))
        runs: dict[str, list[dict[str, float | str]]] = {k: [] for k in sides}
        for _ in range(a.runs):
            for side, pythonpath in sides.items():
                runs[side].append(_run(pythonpath, a.loops, a.frames))
    for side, rs in runs.items():
        cells = ", ".join(
            f"{kind} {min(float(r[kind]) for r in rs):.0f}-{max(float(r[kind]) for r in rs):.0f} ns"
            for kind in ("discard", "echo")
        )
        digests = sorted({str(r["digest"]) for r in rs})
        print(f"{side}: a frame (best loop, over {a.runs} runs): {cells}; "
              f"{rs[0]['answered']:,} of {a.frames:,} mutated frames answered, "
              f"digest {', '.join(digests)}")  # fmt: skip
    if a.against:
        same = {str(r["digest"]) for rs in runs.values() for r in rs}
        print("answers and counters: " + ("identical" if len(same) == 1 else "DIFFERENT"))


if __name__ == "__main__":
    main()
