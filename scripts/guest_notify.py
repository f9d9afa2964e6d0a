"""Does a real Linux guest notify like xlio's own driver? The README's table.

Boots the real guest (QEMU under TCG, ``xlio guest``) on ``xlio serve
--vhost-user`` on one path, runs a ping and a TCP stream in it, and prints
per frame: the kicks and interrupts of each queue as Linux's virtio-net made
and wanted them, and what the model charges for exactly those events on
every path (the chosen one served them, the other two are its shadows).
Beside them, xlio's own driver under ``xlio measure --workload echo`` and
``tx`` (one frame a kick, as the guest's ping and stream mostly are).

    python scripts/guest_notify.py [--path l1] [--preset turtles-2010] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from xlio.guestvm import run_guest
from xlio.sim.workloads import PATHS

WORKLOADS = {
    "ping": "ping -c 200 -i 0.02 -W 2 198.18.0.1 | tail -2",
    "tcp": "dd if=/dev/zero bs=1000 count=3000 2>/dev/null | nc 198.18.0.1 5001",
}
SINK = """
import socket
t = socket.socket(); t.bind(("198.18.0.1", 5001)); t.listen(1)
c, _ = t.accept(); got = 0
while got < 3000000:
    d = c.recv(1 << 20)
    if not d: break
    got += len(d)
c.close(); print(got)
"""


def guest_run(path: str, preset: str, workload: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="xlio-notify-") as tmp:
        sock = os.path.join(tmp, "vu.sock")
        ns = f"xlio-notify{os.getpid()}"
        serve = subprocess.Popen(
            [sys.executable, "-m", "xlio", "serve", "--path", path, "--preset", preset,
             "--vhost-user", sock, "--netns", ns, "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        sink = None
        try:
            assert serve.stderr is not None
            while "ready" not in serve.stderr.readline():
                if serve.poll() is not None:
                    raise SystemExit("guest_notify.py: xlio serve did not start")
            if workload == "tcp":
                sink = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SINK],
                                        stdout=subprocess.PIPE, text=True)  # fmt: skip
                time.sleep(0.5)
            r = run_guest(sock, WORKLOADS[workload], 120)
            if r.status != 0:
                raise SystemExit(f"guest_notify.py: the guest's {workload} failed:\n{r.console}")
            serve.send_signal(signal.SIGINT)
            out, _ = serve.communicate(timeout=60)
        finally:
            for p in (serve, sink):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
    rep = json.loads(out)
    q, tap = rep["vhost_user"]["queues"], rep["tap"]
    tx, rx = tap["frames_to_peer"], tap["frames_from_peer"]
    model = {path: {k: rep["per_op"][k] for k in ("l0_exits", "l1_exits", "time_us")},
             **{p: {k: v[k] for k in ("l0_exits", "l1_exits", "time_us")}
                for p, v in rep["other_paths"].items()}}  # fmt: skip
    return {
        "workload": workload, "served_on": path, "tx_frames": tx, "rx_frames": rx,
        "tx_kicks_per_frame": q["tx"]["kicks"] / max(tx, 1),
        "tx_interrupts_per_frame": q["tx"]["interrupts"] / max(tx, 1),
        "rx_kicks_per_frame": q["rx"]["kicks"] / max(rx, 1),
        "rx_interrupts_per_frame": q["rx"]["interrupts"] / max(rx, 1),
        "model_per_frame": model,
    }  # fmt: skip


def xlio_driver(preset: str, workload: str) -> dict[str, Any]:
    out = {}
    for path in PATHS:
        r = subprocess.run([sys.executable, "-m", "xlio", "measure", "--workload", workload,
                            "--path", path, "--preset", preset, "--json"],
                           capture_output=True, text=True, check=True)  # fmt: skip
        p = json.loads(r.stdout)
        frames = 2 if workload == "echo" else 1  # an echo request is a frame each way
        out[path] = {k: p["per_op"][k] / frames for k in ("l0_exits", "l1_exits", "time_us")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", choices=PATHS, default="l1")
    ap.add_argument("--preset", default="turtles-2010")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    rows = [guest_run(a.path, a.preset, w) for w in WORKLOADS]
    mine = {w: xlio_driver(a.preset, w) for w in ("echo", "tx")}
    print(f"real guest served on {a.path}, preset {a.preset}; per frame")
    print(
        f"{'workload':<10}{'frames tx/rx':>14}{'TX kicks':>10}{'TX irqs':>9}"
        f"{'RX kicks':>10}{'RX irqs':>9}   modeled us (L1 exits) single / l1 / l0, l1/l0"
    )
    for r in rows:
        m = r["model_per_frame"]
        us = " / ".join(f"{m[p]['time_us']:.1f} ({m[p]['l1_exits']:.1f})" for p in PATHS)
        print(
            f"{r['workload']:<10}{r['tx_frames']:>7}/{r['rx_frames']:<6}"
            f"{r['tx_kicks_per_frame']:>10.2f}{r['tx_interrupts_per_frame']:>9.2f}"
            f"{r['rx_kicks_per_frame']:>10.3f}{r['rx_interrupts_per_frame']:>9.2f}   {us}, "
            f"{m['l1']['time_us'] / m['l0']['time_us']:.2f}x"
        )
    for w, m in mine.items():
        us = " / ".join(f"{m[p]['time_us']:.1f} ({m[p]['l1_exits']:.1f})" for p in PATHS)
        print(
            f"xlio's driver, measure --workload {w}: {us}, "
            f"{m['l1']['time_us'] / m['l0']['time_us']:.2f}x"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"guest": rows, "xlio_driver": mine}, f, indent=1)


if __name__ == "__main__":
    main()
