"""The README's netperf tables and figure, from the timed model.

1. turtles-2010, 1 GbE, TCP_STREAM on single, l1 and l0 (and l1 with QEMU's
   userspace backend): beside Turtles' netperf figure.
2. kvm-2019 at 10g and 25g, TCP_STREAM and TCP_RR, on the three paths.
3. A figure (needs the ``plot`` extra, matplotlib): kvm-2019 TCP_STREAM,
   throughput and busiest CPU against link speed, one line per path.

    python scripts/netperf_tables.py [--duration 1.0] [--figure FILE.png] [--jobs 2]
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from xlio.netperf import netperf

PATHS = ("single", "l1", "l0")


def _run(args: tuple[str, str, str, str, float, dict[str, Any]]) -> dict[str, Any]:
    test, path, preset, link, duration, extra = args
    return netperf(test, path, preset, link=link, duration=duration, **extra)


def _row(r: dict[str, Any]) -> str:
    c = r["config"]
    pp = r["per_packet"]
    label = c["path"]
    if c["path"] == "l1" and c["l1_backend"] == "qemu":
        label += " (QEMU backend)"
    if c["virtual_idle"]:
        label += " --virtual-idle"
    if "transactions_per_s" in r:
        lat = r["latency_us"]
        perf = f"{r['transactions_per_s']:,.0f} tps, p50 {lat['p50']:.1f} / p99 {lat['p99']:.1f} us"
    else:
        perf = f"{r['throughput_mbps']:,.0f} Mb/s"
    cpus = ", ".join(f"{k} {v:.0%}" for k, v in r["cpu"].items())
    return (
        f"| {c['preset']} | {c['test']} | {c['link']} | {label} | {perf} | {cpus} "
        f"| {pp['kicks']:.3f} | {pp['interrupts']:.3f} | {pp['l0_exits']:.2f} "
        f"| {pp['reflected']:.2f} | {r['bottleneck']} |"
    )


HEADER = (
    "| preset | test | link | path | result | CPU utilization | kicks/pkt | irqs/pkt "
    "| L0 exits/pkt | reflected/pkt | bottleneck |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=1.0)
    ap.add_argument("--figure", default=None, metavar="FILE.png")
    ap.add_argument("--figure-duration", type=float, default=0.2)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    Run = tuple[str, str, str, str, float, dict[str, Any]]
    runs: list[Run] = [("TCP_STREAM", p, "turtles-2010", "1g", a.duration, {}) for p in PATHS]
    runs.append(("TCP_STREAM", "l1", "turtles-2010", "1g", a.duration, {"l1_backend": "qemu"}))
    for link in ("10g", "25g"):
        for test in ("TCP_STREAM", "TCP_RR"):
            runs += [(test, p, "kvm-2019", link, a.duration, {}) for p in PATHS]
            if test == "TCP_RR":
                runs.append((test, "l0", "kvm-2019", link, a.duration, {"virtual_idle": True}))
    links = ("1g", "10g", "25g", "100g")
    fig_runs: list[Run] = [
        ("TCP_STREAM", p, "kvm-2019", lk, a.figure_duration, {}) for p in PATHS for lk in links
    ]
    with ProcessPoolExecutor(a.jobs) as ex:
        results = list(ex.map(_run, runs + (fig_runs if a.figure else [])))
    table = results[: len(runs)]
    print(HEADER)
    for r in table:
        print(_row(r))
    if not a.figure:
        return
    fig = results[len(runs) :]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("the figure needs matplotlib: pip install -e '.[plot]'") from None
    speeds = [1, 10, 25, 100]
    f, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"single": ("o", "-"), "l1": ("s", "--"), "l0": ("^", ":")}
    for i, path in enumerate(PATHS):
        rs = fig[i * len(links) : (i + 1) * len(links)]
        mk, ls = styles[path]
        ax1.plot(speeds, [r["throughput_mbps"] / 1000 for r in rs], marker=mk, ls=ls, label=path)
        cpu = [100 * r["cpu_busiest"]["utilization"] for r in rs]
        ax2.plot(speeds, cpu, marker=mk, ls=ls, label=path)
    ax1.plot(
        speeds, [s * 0.9415 for s in speeds], color="grey", lw=0.8, label="line rate (goodput)"
    )
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("link speed (Gb/s)")
    ax1.set_ylabel("TCP_STREAM throughput (Gb/s)")
    ax1.set_title("kvm-2019: throughput")
    ax2.set_xscale("log")
    ax2.set_ylim(0, 105)
    ax2.set_xlabel("link speed (Gb/s)")
    ax2.set_ylabel("busiest modeled CPU (%)")
    ax2.set_title("kvm-2019: busiest CPU")
    for ax in (ax1, ax2):
        ax.set_xticks(speeds)
        ax.set_xticklabels([str(s) for s in speeds])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    f.tight_layout()
    f.savefig(a.figure, dpi=110)
    print(f"\nfigure: {a.figure}")


if __name__ == "__main__":
    main()
