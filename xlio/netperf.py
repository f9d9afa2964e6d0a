"""``xlio netperf``: run the timed model and report it the way netperf users read it.

Pure except for the caller's printing: :func:`netperf` returns the JSON-ready
result, :func:`format_netperf` renders it (netperf's result line, then what
netperf cannot show: CPU by level, exits per second, kicks and interrupts
per packet, the bottleneck).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xlio.backends.netperf import LINKS, NetperfModel, NetperfOptions, Path, Test
from xlio.measure import UsageError, costs_of
from xlio.sim.presets import CostModel

MAX_DURATION = 10.0  # modeled seconds


def netperf(
    test: str,
    path: str,
    preset: str | CostModel = "turtles-2010",
    *,
    link: str = "1g",
    duration: float = 1.0,
    size: int | None = None,
    seed: int = 1,
    burst: int = 1,
    l1_backend_vcpu: str = "other",
    l1_backend: str = "vhost",
    tso: bool | None = None,
    apicv: bool | None = None,
    virtual_idle: bool = False,
    ticks: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """One netperf test on one path; the result with its resolved configuration."""
    try:
        t = Test(test)
    except ValueError:
        raise UsageError(f"-t must be one of {', '.join(x.value for x in Test)}") from None
    try:
        p = Path(path)
    except ValueError:
        raise UsageError(f"--path must be one of {', '.join(x.value for x in Path)}") from None
    costs = costs_of(preset)
    if link not in LINKS:
        raise UsageError(f"--link must be one of {', '.join(LINKS)}")
    if not 0 < duration <= MAX_DURATION:
        raise UsageError(f"--duration must be above 0 and at most {MAX_DURATION:g} modeled s")
    if size is not None and not 1 <= size <= 65_000:
        raise UsageError("--size must be between 1 and 65000 bytes")
    if not 1 <= burst <= 64:
        raise UsageError("--burst must be between 1 and 64")
    if l1_backend_vcpu not in ("same", "other"):
        raise UsageError("--l1-backend-vcpu must be same or other")
    if l1_backend not in ("vhost", "qemu"):
        raise UsageError("--l1-backend must be vhost or qemu")
    opts = NetperfOptions(
        t, p, link=link, duration=duration, size=size, seed=seed, burst=burst,
        l1_backend_vcpu=l1_backend_vcpu, l1_backend=l1_backend, tso=tso, ticks=ticks,
    )  # fmt: skip
    model = NetperfModel(costs, opts, apicv=apicv, virtual_idle=virtual_idle)
    r = model.run(progress)
    r["config"] = {
        **model.m.cfg.describe(),
        "test": t.value,
        "path": p.value,
        "link": link,
        "duration_s": duration,
        "measured_s": min(model.env.now, duration) - model.measure_from,
        "size": model.payload,
        "seed": seed,
        "burst": burst,
        "l1_backend_vcpu": l1_backend_vcpu,
        "l1_backend": l1_backend,
        "tso": model.tso,
        "ticks": ticks,
        "guest_hz": costs.guest_hz,
    }
    return r


def format_netperf(r: dict[str, Any]) -> str:
    cfg = r["config"]
    lines = [
        f"xlio netperf: {cfg['test']} on path {cfg['path']}, link {cfg['link']}, preset "
        f"{cfg['preset']} (APICv {'on' if cfg['apicv'] else 'off'}, virtual idle "
        f"{'on' if cfg['virtual_idle'] else 'off'}, TSO {'on' if cfg['tso'] else 'off'}), "
        f"{cfg['size']}-byte payloads, {cfg['measured_s']:g} modeled s measured"
        + ("; INTERRUPTED: figures cover what was measured" if r.get("interrupted") else ""),
        "",
    ]
    if "transactions_per_s" in r:
        lat = r["latency_us"]
        lines.append(f"{'Trans/s':>12} {'P50 us':>9} {'P90 us':>9} {'P99 us':>9} {'Mb/s':>9}")
        lines.append(
            f"{r['transactions_per_s']:>12,.0f} {_f(lat['p50'])} {_f(lat['p90'])} "
            f"{_f(lat['p99'])} {r['throughput_mbps']:>9.2f}"
        )
    else:
        lines.append(f"{'Throughput (10^6 bits/s)':>26} {'packets/s':>12}")
        lines.append(f"{r['throughput_mbps']:>26.2f} {r['packets_per_s']:>12,.0f}")
    lines += ["", "CPU utilization (modeled CPUs; by level: L2 guest, L1, L0, switch):"]
    for name, lv in r["cpu_by_level"].items():
        parts = ", ".join(f"{k} {v:.1%}" for k, v in lv.items() if k != "total" and v)
        lines.append(f"  {name:<6} {lv['total']:>7.1%}   {parts}")
    pp = r["per_packet"]
    lines += [
        "",
        f"per packet sent: {pp['kicks']:.3f} kicks, {pp['interrupts']:.3f} interrupts, "
        f"{pp['l0_exits']:.2f} exits to L0 ({pp['reflected']:.2f} reflected to L1)",
        "exits per second by level and reason:",
    ]
    for k, v in sorted(r["exits_per_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {k:<28} {v:>12,.0f}")
    lines += ["", f"link utilization {r['link_utilization']:.1%}; bottleneck: {r['bottleneck']}"]
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return f"{'-':>9}" if v is None else f"{v:>9.1f}"
