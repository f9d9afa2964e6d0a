"""Plots of sweeps (matplotlib, the optional extra ``xlio[plot]``).

One line per path (or per value of a second parameter), labelled axes with
units, log scales where the values span more than a decade and a half.
"""

from __future__ import annotations

from typing import Any

from xlio.measure import UsageError


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _spans(values: list[float], factor: float) -> bool:
    pos = [v for v in values if v > 0]
    return len(pos) == len(values) and bool(pos) and max(pos) / min(pos) >= factor


def require_matplotlib() -> None:
    """A clear UsageError when the optional extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            "argument --plot: needs matplotlib, the optional extra: pip install 'xlio[plot]'"
        ) from None


def plot_sweep(
    rows: list[dict[str, Any]],
    params: list[str],
    metric: str,
    labels: tuple[str, str],
    title: str,
    out: str,
    ratio: tuple[str, str] | None = None,
) -> None:
    """Write ``out`` (.png or .svg): ``metric`` against the first swept parameter;
    ``labels`` are the x and y axis labels."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_name = params[0]
    xs = list(dict.fromkeys(r[x_name] for r in rows))
    numeric = _numeric(xs)
    series: dict[str, list[tuple[Any, float]]] = {}
    second = params[1] if len(params) > 1 else None
    for r in rows:
        if metric not in r:
            continue
        group = f"{second}={r[second]}" if second else ""
        if ratio:
            if r["path"] != ratio[0]:
                continue
            other = next(
                (o for o in rows if o["path"] == ratio[1] and o[x_name] == r[x_name]
                 and (not second or o[second] == r[second])), None,
            )  # fmt: skip
            if other is None or not other.get(metric):
                continue
            label = f"{ratio[0]} / {ratio[1]}" + (f", {group}" if group else "")
            series.setdefault(label, []).append((r[x_name], r[metric] / other[metric]))
        else:
            label = r["path"] + (f", {group}" if group else "")
            series.setdefault(label, []).append((r[x_name], r[metric]))
    if not series:
        raise UsageError(f"argument --metric: no point has {metric}")
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=110)
    markers = "osD^v<>px*"
    styles = ("-", "--", ":", "-.")
    for i, (label, pts) in enumerate(series.items()):
        # lines that coincide (single and l0 often do) stay visible: dashes, smaller marks
        look: dict[str, Any] = {
            "marker": markers[i % 10], "ls": styles[i % 4], "ms": max(3, 9 - 2 * i),
            "label": label, "lw": 1.6,
        }  # fmt: skip
        if numeric:
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], **look)
        else:
            pos = {x: j for j, x in enumerate(xs)}
            ax.plot([pos[p[0]] for p in pts], [p[1] for p in pts], **look)
    if numeric and _spans([float(x) for x in xs], 16):
        ax.set_xscale("log", base=2 if all(float(x).is_integer() for x in xs) else 10)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
    elif not numeric:
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([str(x) for x in xs])
    ys = [p[1] for pts in series.values() for p in pts]
    if _spans(ys, 100):
        ax.set_yscale("log")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(f"{ratio[0]} / {ratio[1]}: {labels[1]}" if ratio else labels[1])
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ratio:
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_estimate(
    results: list[dict[str, Any]],
    out: str,
    marks: list[tuple[str, dict[str, float]] | None] | None = None,
) -> None:
    """Write ``out``: for each estimate (a preset), each configuration's time as
    a stacked bar: the program's own work, then what each class of its
    events adds (``xlio estimate --plot``). ``marks``: per panel, a label and
    published times by configuration, drawn as markers beside the bars."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        rows = r["rows"]
        names = [row["config"] for row in rows]
        classes = list(rows[0]["breakdown"]["by_class_seconds"])
        bottoms = [row["seconds"] - row["breakdown"]["added_seconds"] for row in rows]
        ax.bar(names, bottoms, color="0.75", label="the program's own work (and waits)")
        cmap = plt.get_cmap("tab10")
        for i, cls in enumerate(classes):
            vals = [row["breakdown"]["by_class_seconds"][cls] for row in rows]
            if not any(v > 0 for v in vals):
                continue
            ax.bar(names, vals, bottom=bottoms, color=cmap(i), label=cls)
            bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
        for x, row in enumerate(rows):
            ax.text(x, row["seconds"], f"{row['seconds']:.1f} s", ha="center", va="bottom",
                    fontsize=8)  # fmt: skip
        mark = marks[results.index(r)] if marks else None
        if mark is not None:
            label, times = mark
            xs = [names.index(k) + 0.3 for k in times if k in names]
            ys = [v for k, v in times.items() if k in names]
            ax.plot(xs, ys, "k_", markersize=14, markeredgewidth=2.5, linestyle="none",
                    label=label)  # fmt: skip
        scaled = r["scale_to"]
        how = f", scaled to {scaled['config']}={scaled['seconds']:g} s" if scaled else ""
        ax.set_title(f"{r['provenance'].get('command', '')[:40]}\n{r['preset']}{how}", fontsize=9)
        ax.set_ylabel("modeled run time (s)")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_tornado(doc: dict[str, Any], out: str) -> None:
    """The tornado of a sensitivity study: each top parameter alone at its
    low and high end, as bars from the figure at the preset."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    bars = [r for r in doc["ranking"] if "at_low" in r]
    bars.sort(key=lambda r: abs(r["at_high"] - r["at_low"]))
    centre = doc["value"]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(bars)))
    for i, r in enumerate(bars):
        for end, colour in (("at_low", "tab:blue"), ("at_high", "tab:red")):
            ax.barh(i, r[end] - centre, left=centre, color=colour, alpha=0.8,
                    label=("parameter at its low end", "parameter at its high end")[
                        end == "at_high"] if i == len(bars) - 1 else None)  # fmt: skip
        ax.text(max(r["at_low"], r["at_high"]), i, f"  {r['low']:,.4g} .. {r['high']:,.4g}",
                va="center", fontsize=8)  # fmt: skip
    ax.axvline(centre, color="black", linewidth=1)
    ax.set_yticks(range(len(bars)), [r["parameter"] for r in bars])
    ax.set_xlabel(f"{doc['figure']} ({doc['command']}); line: the preset's value")
    ax.set_title(f"xlio sensitivity: {doc['figure']}, each parameter alone across its range")
    ax.legend(loc="best", fontsize=8)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.4g}"))
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise UsageError(f"argument --plot: cannot write {out}: {e.strerror}") from None
    finally:
        plt.close(fig)
