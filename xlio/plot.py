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
