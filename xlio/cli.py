"""The ``xlio`` commands: each takes its parsed options (:mod:`xlio.options`,
the grammar), runs a sans-IO module and prints what it found.

A user's mistake (unknown name, bad number) is one line on stderr and exit
status 2; everything else lives in sans-IO modules. The process's entry
point, with its signal handling, is :mod:`xlio.__main__`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from xlio import __version__
from xlio.measure import (
    WORKLOADS,
    UsageError,
    demo,
    measure,
    trace,
    whole,
)
from xlio.options import (
    MAX_TAP_DEMO_COUNT,
    build_parser,
    cost_model,
    model_switches,
    workload_options,
)
from xlio.report import format_demo, format_measure
from xlio.sim.presets import PRESETS, CostModel
from xlio.sim.workloads import PATHS
from xlio.stop import Stopped, StopState
from xlio.sweep import Of

SCHEMA_VERSION = 1  # of every --json document (README: "JSON results")


def envelope(command: str, obj: dict[str, Any]) -> dict[str, Any]:
    """A command's result as the one JSON schema: version keys first, whole
    numbers as integers."""
    return {
        "schema_version": SCHEMA_VERSION,
        "xlio_version": __version__,
        "command": command,
        **whole(obj),
    }


def _emit(a: argparse.Namespace, obj: dict[str, Any], text: Callable[[], str]) -> int:
    """One JSON document, or the text a person reads, on stdout."""
    if a.json:
        json.dump(envelope(a.command, obj), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(text())
    return 0


def _cmd_measure(a: argparse.Namespace) -> int:
    costs = cost_model(a)
    with _progress(1, f"xlio measure: {a.workload} on {a.path}") as advance:
        r = measure(
            a.workload, a.path, costs, count=a.count, options=workload_options(a),
            progress=advance, **model_switches(a),
        )  # fmt: skip
    _emit(a, r, lambda: format_measure(r, a.explain))
    return _interrupted(a, r)


def _interrupted(a: argparse.Namespace, r: dict[str, Any]) -> int:
    """After a stop signal the result printed covers what was measured: say
    so, exit 128 + the signal (130 for Ctrl-C)."""
    if r.get("interrupted"):
        status = StopState.status()
        print(f"xlio {a.command}: stopped by {signal.Signals(status - 128).name}", file=sys.stderr)
        return status
    return 0


def _cmd_trace(a: argparse.Namespace) -> int:
    from xlio.report import format_trace

    opts = {
        "batch": a.batch, "frame_size": a.frame_size, "queue_size": a.queue_size,
        "event_idx": False if a.no_event_idx else None, "kick": a.kick, "l2_mmu": a.l2_mmu,
    }  # fmt: skip
    r = trace(
        a.workload, a.path, cost_model(a), count=a.count,
        options={k: v for k, v in opts.items() if v is not None}, **model_switches(a),
    )  # fmt: skip
    return _emit(a, r, lambda: format_trace(r))


def _cmd_sweep(a: argparse.Namespace) -> int:
    import csv

    from xlio.report import figure, render, table
    from xlio.sweep import (
        DEFAULT_METRIC,
        Interrupted,
        check_metric,
        grid,
        metric_label,
        param_label,
        run_all,
    )

    of = Of(a.of)
    costs = cost_model(a)
    paths = a.path or (["single", "l1"] if of is Of.VMEXIT else list(PATHS))
    if a.ratio and not set(a.ratio) <= set(paths):
        raise UsageError(f"argument --ratio: {'/'.join(a.ratio)} needs both paths in --path")
    points = grid(
        of, a.workload, paths, costs, a.params, count=a.count, switches={}, options={},
        sets=_set_values(a, costs),
    )  # fmt: skip
    metric = a.metric or DEFAULT_METRIC[of]
    check_metric(of, metric)
    if a.plot:
        from xlio.plot import require_matplotlib

        require_matplotlib()  # before the sweep runs, not after
    swept = [n for n, v in a.params if len(v) > 1]
    interrupted = False
    with _progress(len(points), f"xlio sweep: {len(points)} points") as advance:
        try:
            rows = run_all(points, a.jobs, lambda row: advance())
        except Interrupted as e:
            rows, interrupted = e.rows, True
    if rows and metric not in rows[0]:
        keys = ", ".join(k for k in rows[0] if k not in swept and k not in ("path", "per"))
        raise UsageError(f"argument --metric: no figure {metric!r}; the rows have: {keys}")
    per = rows[0]["per"] if rows else WORKLOADS[a.workload].per if a.workload in WORKLOADS else ""
    doc = {
        "of": of.value, "workload": a.workload, "paths": paths, "metric": metric,
        "params": {n: v for n, v in a.params}, "swept": swept, "count": a.count,
        "preset": costs.name,
        "costs": {k: p.value for k, p in sorted(costs.params.items())},
        "costs_set": {k: p.source for k, p in costs.params.items() if p.kind == "user"},
        "interrupted": interrupted, "rows": rows,
    }  # fmt: skip
    if a.csv:
        cols = [*swept, "path", "per", metric]
        cols += sorted({k for r in rows for k in r} - set(cols))
        with open(a.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    if a.json and a.json != "-":
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(envelope("sweep", doc), f, indent=1)
            f.write("\n")
    if a.plot and rows:
        from xlio.plot import plot_sweep

        title = f"xlio sweep: {a.of} {a.workload}, preset {costs.name}" + (
            f", {a.count:,} per point" if of is Of.MEASURE else ""
        )
        labels = (param_label(swept[0], costs), metric_label(metric, per))
        plot_sweep(rows, swept, metric, labels, title, a.plot, a.ratio)
    if a.json == "-":
        json.dump(envelope("sweep", doc), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        cols = [*swept, "path", metric]
        body = [[str(r[c]) if c in swept or c == "path" else figure(r.get(c, "")) for c in cols]
                for r in rows]  # fmt: skip
        if a.ratio:
            cols.append(f"{a.ratio[0]}/{a.ratio[1]}")
            for r, line in zip(rows, body, strict=True):
                other = next((o for o in rows if o["path"] == a.ratio[1] and all(
                    o[n] == r[n] for n in swept)), None)  # fmt: skip
                ok = r["path"] == a.ratio[0] and other and other.get(metric)
                line.append(f"{r[metric] / other[metric]:.2f}" if ok else "")  # type: ignore[index]
        head = (f"xlio sweep: {a.of} {a.workload}, preset {costs.name}, {metric_label(metric, per)}"
                + ("; INTERRUPTED: the rows done so far" if interrupted else ""))  # fmt: skip
        print(render(head, table(cols, body, left=len(swept) + 1)))
    return 130 if interrupted else 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from xlio.compare import describe, diff
    from xlio.report import figure, render, signed, table
    from xlio.sweep import Point, with_setting

    if a.files:
        if len(a.files) != 2 or a.a_sets or a.b_sets or a.workload:
            raise UsageError("give two result files, or --workload with --a and --b settings")
        docs = []
        for name in a.files:
            try:
                with open(name, encoding="utf-8") as f:
                    docs.append(json.load(f))
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read {name} as a JSON result: {e}") from None
            if not isinstance(docs[-1], dict):
                raise UsageError(f"{name} is not a JSON result object")
        da, db = docs
        la, lb = a.files
        b_total = None  # a result file says what it covered, not what it was asked for
    else:
        if a.workload is None or not (a.a_sets or a.b_sets):
            raise UsageError("give --workload and at least one --a or --b setting (or two files)")
        costs = cost_model(a)
        base = Point(Of.MEASURE, a.workload, "l1", costs, a.count)
        sets = _set_values(a, costs)
        points = []
        for settings in (a.a_sets, a.b_sets):
            p = base
            for name, value in settings:
                p = with_setting(p, name, value, sets)
            points.append(p)
        sides: list[dict[str, Any]] = []
        total = sum(p.count for p in points)
        b_total = points[1].count
        with _progress(total, f"xlio compare: {a.workload}, A then B") as advance:
            for k, p in enumerate(points):

                def tick(done: int, _total: int, before: int = points[0].count * k) -> None:
                    advance(before + done, total)

                r = measure(p.workload, p.path, p.costs, count=p.count, options=p.options,
                            progress=tick, **p.switches)  # fmt: skip
                sides.append(envelope("measure", r))
                if r.get("interrupted"):
                    break
        if len(sides) < 2:  # Ctrl-C while A ran: nothing to compare it with
            print("xlio compare: stopped by SIGINT before B was measured", file=sys.stderr)
            return 130
        da, db = sides
        la = " ".join(f"{k}={v}" for k, v in a.a_sets) or "(defaults)"
        lb = " ".join(f"{k}={v}" for k, v in a.b_sets) or "(defaults)"
    rows = diff(da, db)
    interrupted = bool(db.get("interrupted"))
    obj = {
        "a": {"label": la, "what": describe(da), "config": da.get("config", {})},
        "b": {"label": lb, "what": describe(db), "config": db.get("config", {})},
        "rows": rows,
        "interrupted": interrupted,
    }

    def text() -> str:
        body = [
            [r["figure"], figure(r["a"]) if r["a"] is not None else "",
             figure(r["b"]) if r["b"] is not None else "",
             signed(r["delta"]) if r["delta"] is not None else "",
             f"{r['ratio']:.3f}x" if r["ratio"] is not None else ""]
            for r in rows
        ]  # fmt: skip
        head = f"xlio compare: A = {la} ({describe(da)})\n              B = {lb} ({describe(db)})"
        if interrupted:
            of = f" of {b_total:,}" if b_total is not None else ""
            head += f"\nINTERRUPTED: B covers {db['count']:,}{of} operations"
        return render(head, table(("figure", "A", "B", "B - A", "B / A"), body))

    _emit(a, obj, text)
    return _interrupted(a, obj)


def _set_values(a: argparse.Namespace, costs: CostModel) -> dict[str, Any]:
    """The --set values, to apply again on a swept preset."""
    return {k: p.value for k, p in costs.params.items() if p.kind == "user" and p.source == "--set"}


@contextlib.contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[..., None]]:
    """A progress bar on stderr (never stdout), shown once the work takes over a
    second, also when no step has finished yet (a timer shows it)."""
    import threading

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)  # a pipe or a file gets no progress at all
    bar: Progress | None = None
    task = None
    done = 0
    lock = threading.Lock()

    def show() -> None:
        nonlocal bar, task
        with lock:
            if bar is None:
                bar = Progress(
                    "{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, transient=True,
                )  # fmt: skip
                bar.start()
                task = bar.add_task(what, total=total, completed=done)

    def advance(now: int | None = None, of: int | None = None) -> None:
        """One more done, or ``now`` done of ``of``."""
        nonlocal done, total
        done = done + 1 if now is None else now
        total = total if of is None else of
        if bar is not None and task is not None:
            bar.update(task, completed=done, total=total)

    timer = threading.Timer(1.0, show) if console.is_terminal else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield advance
    finally:
        if timer is not None:
            timer.cancel()
        with lock:
            if bar is not None:
                bar.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return COMMANDS[a.command](a)
    except UsageError as e:
        print(f"xlio {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP during a tap run
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"xlio {a.command}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # `xlio ... | head`: the reader left, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _tap_ready() -> None:
    from xlio.backends.netns import HostSetupError, check_privileges

    try:
        check_privileges()
    except HostSetupError as e:
        raise UsageError(str(e)) from None


def _serve_text(r: dict[str, Any]) -> str:
    lines = [
        format_measure(r, command="serve"),
        "tap: " + ", ".join(f"{k} {v}" for k, v in r["tap"].items()),
    ]
    for name, metrics in r.get("devices", {}).items():
        shown = ", ".join(f"{k} {v}" for k, v in metrics.items() if v)
        lines.append(f"device {name}: {shown or 'idle'}")
    return "\n".join(lines)


def _cmd_serve(a: argparse.Namespace) -> int:
    from xlio.backends.netns import HostSetupError
    from xlio.backends.tap import CaptureFailed, PcapBatcher, TapGone
    from xlio.tapsession import serve

    _tap_ready()
    out = sys.stderr if a.json else sys.stdout

    def announce(text: str) -> None:
        print(text, file=out, flush=True)

    def ready(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def emit(metrics: dict[str, Any]) -> None:
        print(json.dumps(metrics, separators=(",", ":")), flush=True)

    costs = cost_model(a)
    try:  # the capture is test-written before any namespace exists
        pcap = PcapBatcher(a.pcap) if a.pcap else None
    except CaptureFailed as e:
        raise UsageError(str(e)) from None

    try:
        r = serve(
            a.path, a.netns, a.duration, costs, pcap, announce, ready=ready,
            interval=a.interval, emit=emit,
        )  # fmt: skip
    except HostSetupError as e:
        raise UsageError(str(e)) from None
    except TapGone as e:
        print(f"xlio serve: error: {e}; namespace removed", file=sys.stderr)
        return 1
    except CaptureFailed as e:  # disk full during the run: the report still says what was done
        if e.report is not None:
            report = e.report
            _emit(a, report, lambda: _serve_text(report))
        print(
            f"xlio serve: error: {e} after {e.written} frames captured; namespace removed",
            file=sys.stderr,
        )
        return 1

    _emit(a, r, lambda: _serve_text(r))
    stopped = r["stopped_by"]
    return 128 + signal.Signals[stopped] if stopped else 0


def _cmd_demo(a: argparse.Namespace) -> int:
    if a.tap:
        from xlio.tapsession import demo_tap, format_demo_tap

        if a.count > MAX_TAP_DEMO_COUNT:
            raise UsageError(f"--count with --tap must be at most {MAX_TAP_DEMO_COUNT}")
        if a.batch is not None or a.frame_size is not None:
            raise UsageError("--batch and --frame-size do not apply to --tap")

        costs = cost_model(a)
        _tap_ready()
        n = a.count
        status = 0
        with _progress(3, "xlio demo --tap: single, l1, l0") as advance:
            try:
                rows = demo_tap(costs, n, advance)
            except Stopped as e:
                rows = getattr(e, "rows", {})
                if not rows:
                    raise
                print(f"xlio demo: stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
                status = 128 + e.signum
        obj = {"workload": "echo", "tap": True, "preset": costs.name, "count": n, "paths": rows,
               "interrupted": bool(status)}  # fmt: skip
        _emit(a, obj, lambda: format_demo_tap(rows, costs.name, n))
        return status
    opts = {k: v for k, v in (("batch", a.batch), ("frame_size", a.frame_size)) if v}
    switches = {"apicv": a.apicv, "virtual_idle": a.virtual_idle}
    costs = cost_model(a)
    with _progress(1, "xlio demo: echo on single, l1, l0") as advance:
        d = demo(costs, a.count, switches=switches, progress=advance, **opts)
    _emit(a, d, lambda: format_demo(d))
    return _interrupted(a, d)


def _cmd_netperf(a: argparse.Namespace) -> int:
    from xlio.netperf import format_netperf, netperf

    costs = cost_model(a)
    with _progress(100, f"xlio netperf: {a.test} on {a.path}") as advance:
        r = netperf(
            a.test, a.path, costs, link=a.link, duration=a.duration, size=a.size, seed=a.seed,
            burst=a.burst, l1_backend_vcpu=a.l1_backend_vcpu, l1_backend=a.l1_backend, tso=a.tso,
            ticks=a.ticks,
            apicv=a.apicv,
            virtual_idle=a.virtual_idle, progress=advance,
        )  # fmt: skip
    _emit(a, r, lambda: format_netperf(r))
    return _interrupted(a, r)


def _cmd_vmexit(a: argparse.Namespace) -> int:
    from xlio.sim.vmexit import format_lines, run

    costs = cost_model(a)
    try:
        res = run(costs, a.level, a.tests, apicv=a.apicv)
    except KeyError as e:
        raise UsageError(f"unknown test {e.args[0]}") from None
    obj = {
        "preset": costs.name,
        "level": a.level,
        "apicv": costs.apicv if a.apicv is None else a.apicv,
        "tests": {k: v["cycles"] for k, v in res.items()},
        "config": {
            "preset": costs.name,
            "clock_ghz": costs.clock_ghz,
            "level": a.level,
            "costs": {k: p.value for k, p in sorted(costs.params.items())},
            "costs_set": {k: p.source for k, p in sorted(costs.params.items()) if p.kind == "user"},
        },
        "detail": res,
    }
    return _emit(a, obj, lambda: format_lines(res))


def _cmd_presets(a: argparse.Namespace) -> int:
    from xlio.report import render, table
    from xlio.sim.presets import format_value, parameter_rows

    if a.name is None:
        listing = {name: p.description for name, p in PRESETS.items()}
        return _emit(
            a, {"presets": listing},
            lambda: render(table(("preset", "what it describes"), listing.items(), left=2)),
        )  # fmt: skip
    p = PRESETS[a.name]
    rows = parameter_rows(p)
    obj = {
        "preset": a.name, "description": p.description, "clock_ghz": p.clock_ghz,
        "params": {k: {"value": v.value, "unit": v.unit, "kind": v.kind, "source": v.source}
                   for k, v in rows},
    }  # fmt: skip

    def text() -> str:
        body = [(k, format_value(v.value), v.unit, v.kind, v.source) for k, v in rows]
        cols = ("parameter", "value", "unit", "kind", "source")
        t = table(cols, body, left=1)
        for c in t.columns[2:]:
            c.justify = "left"
        t.columns[-1].no_wrap = False
        return render(f"{a.name}: {p.description}", t)

    return _emit(a, obj, text)


def _cmd_cleanup(a: argparse.Namespace) -> int:
    from xlio.backends.netns import reap_orphans

    _tap_ready()
    removed = reap_orphans()
    return _emit(
        a,
        {"removed": removed},
        lambda: (
            "\n".join(f"removed {n} (its owner is dead)" for n in removed)
            or "nothing to remove: every xlio- namespace has a live owner"
        ),
    )


def _cmd_profile(a: argparse.Namespace) -> int:
    from xlio.profile import CommandFailed, profile, to_toml

    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    try:
        p = profile(cmd, use_perf=False if a.no_perf else None)
    except CommandFailed as e:
        raise UsageError(f"{e}; no profile written") from None
    text = to_toml(p)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text)
    if a.json:
        print(json.dumps(envelope("profile", p.as_dict()), indent=1))
    elif not a.output:
        sys.stdout.write(text)
    else:
        print(f"xlio profile: {a.output}: {p.run['cpu_seconds']:.2f} CPU s "
              f"({p.provenance['counters']})", file=sys.stderr)  # fmt: skip
    return 0


def _cmd_estimate(a: argparse.Namespace) -> int:
    from xlio.estimate import estimate, format_estimate
    from xlio.profile import ProfileError, load
    from xlio.profiles import SHIPPED

    costs = cost_model(a)
    try:
        prof = load(SHIPPED.get(a.profile, a.profile))
    except ProfileError as e:
        raise UsageError(str(e)) from None
    switches = {"shadow_vmcs": a.shadow_vmcs, "vmcs_exits": not a.no_vmcs_exits}
    ept = {
        "virtual_ept": a.virtual_ept, "static_ept": a.static_ept or None,
        "avoid_invept": a.avoid_invept, "swap": a.swap, "rate": a.rate,
    }  # fmt: skip
    if a.swap and not a.rate:
        raise UsageError("--swap needs --rate (EPT modifications per second)")
    r = estimate(prof, costs, l2_mmu=a.l2_mmu, scale_to=a.scale_to, switches=switches,
                 ept={k: v for k, v in ept.items() if v is not None})  # fmt: skip
    if a.plot:
        from xlio.plot import plot_estimate

        plot_estimate([r], a.plot)
    return _emit(a, r, lambda: format_estimate(r))


COMMANDS = {
    "profile": _cmd_profile,
    "estimate": _cmd_estimate,
    "measure": _cmd_measure,
    "trace": _cmd_trace,
    "sweep": _cmd_sweep,
    "compare": _cmd_compare,
    "demo": _cmd_demo,
    "serve": _cmd_serve,
    "vmexit": _cmd_vmexit,
    "netperf": _cmd_netperf,
    "cleanup": _cmd_cleanup,
    "presets": _cmd_presets,
}


if __name__ == "__main__":
    raise SystemExit(main())
