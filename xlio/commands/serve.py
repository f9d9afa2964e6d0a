"""``xlio serve``: the L2 guest on a real tap in a fresh namespace until stopped."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from xlio.commands.common import (
    emit,
    tap_ready,
)
from xlio.measure import (
    UsageError,
)
from xlio.options import (
    add_costs,
    cost_model,
    netns_name,
    seconds_in,
    socket_file,
    writable_file,
)
from xlio.report import format_measure
from xlio.sim.workloads import PATHS

NAME = "serve"


def add_parser(sub: Any) -> None:
    sv = sub.add_parser("serve", help="keep the L2 guest reachable on a real tap")
    sv.add_argument("--path", default="l1", choices=PATHS)
    sv.add_argument(
        "--netns", type=netns_name, default=None,
        help="namespace name: xlio- then letters, digits, -, _, . (default: a fresh one)",
    )  # fmt: skip
    sv.add_argument("--duration", type=seconds_in(7 * 86400), default=None, metavar="S")
    add_costs(sv)
    sv.add_argument(
        "--pcap", type=writable_file, default=None, metavar="FILE", help="capture every frame"
    )
    sv.add_argument("--json", action="store_true", help="one JSON document on stdout")
    sv.add_argument(
        "--interval", type=seconds_in(3600), default=None, metavar="S",
        help="one JSON line of metrics on stdout every S seconds (the interval's counts)",
    )  # fmt: skip
    sv.add_argument(
        "--vhost-user", type=socket_file, default=None, metavar="SOCKET",
        help="L2 is a real guest: serve its virtio-net rings to the VMM that connects "
        "to this unix socket (QEMU's -netdev vhost-user); see xlio guest",
    )  # fmt: skip
    sv.add_argument(
        "--no-other-paths", dest="other_paths", action="store_false",
        help="with --vhost-user: do not charge the guest's events on the other two paths "
        "(their shadow datapaths cost about as much model work again each)",
    )  # fmt: skip
    sv.add_argument(
        "--switch-every", type=seconds_in(3600), default=None, metavar="S",
        help="with --path l1: L1 delegates L2's NIC to L0, then revokes it, every S seconds",
    )  # fmt: skip


def _serve_text(r: dict[str, Any]) -> str:
    lines = [
        format_measure(r, command="serve"),
        "tap: " + ", ".join(f"{k} {v}" for k, v in r["tap"].items()),
    ]
    v = r.get("vhost_user")
    if v is not None:
        lines.append(
            f"vhost-user {v['socket']}: {v['connections']} connections, "
            f"{v['protocol_errors']} protocol errors"
        )
        for q, c in v["queues"].items():
            lines.append(f"  {q} queue: " + ", ".join(f"{k} {n}" for k, n in c.items()))
    for p, o in r.get("other_paths", {}).items():
        lines.append(
            f"the same events on path {p}, per frame: l0_exits {o['l0_exits']:.2f}, l1_exits "
            f"{o['l1_exits']:.2f}, l1_be_exits {o['l1_be_exits']:.2f}, modeled "
            f"{o['time_us']:.2f} us"
        )
    if "l2_nic" in r:
        shown = ", ".join(f"{k} {n}" for k, n in r["l2_nic"].items() if n)
        lines.append(f"L2's NIC, every backend it had: {shown or 'idle'}")
    if "switches" in r:
        lines.append(f"switches (delegate or revoke): {r['switches']}")
    for name, metrics in r.get("devices", {}).items():
        shown = ", ".join(f"{k} {v}" for k, v in metrics.items() if v)
        lines.append(f"device {name}: {shown or 'idle'}")
    return "\n".join(lines)


def run(a: argparse.Namespace) -> int:
    from xlio.backends.netns import HostSetupError
    from xlio.backends.tap import CaptureFailed, PcapBatcher, TapGone
    from xlio.tapsession import serve

    tap_ready()
    out = sys.stderr if a.json else sys.stdout

    def announce(text: str) -> None:
        print(text, file=out, flush=True)

    def ready(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def emit_metrics(metrics: dict[str, Any]) -> None:
        print(json.dumps(metrics, separators=(",", ":")), flush=True)

    if a.switch_every is not None and a.path != "l1":
        raise UsageError("--switch-every needs --path l1 (L1 delegates and revokes)")
    costs = cost_model(a)
    try:  # the capture is test-written before any namespace exists
        pcap = PcapBatcher(a.pcap) if a.pcap else None
    except CaptureFailed as e:
        raise UsageError(str(e)) from None

    try:
        r = serve(
            a.path, a.netns, a.duration, costs, pcap, announce, ready=ready,
            interval=a.interval, emit=emit_metrics, vhost_user=a.vhost_user,
            switch_every=a.switch_every, other_paths=a.other_paths,
        )  # fmt: skip
    except HostSetupError as e:
        raise UsageError(str(e)) from None
    except TapGone as e:
        print(f"xlio serve: error: {e}; namespace removed", file=sys.stderr)
        return 1
    except CaptureFailed as e:  # disk full during the run: the report still says what was done
        if e.report is not None:
            report = e.report
            emit(a, report, lambda: _serve_text(report))
        print(
            f"xlio serve: error: {e} after {e.written} frames captured; namespace removed",
            file=sys.stderr,
        )
        return 1

    emit(a, r, lambda: _serve_text(r))
    stopped = r["stopped_by"]
    return 128 + signal.Signals[stopped] if stopped else 0
