"""The Explanation-quality tab's one picture: a forest plot of the report, and its plain reading.

Each row is one comparison of the ``evaluate-cams`` report (:mod:`cbam_viz.research.quality.report`):
a member's paired difference from the lineup's reference, for one CAM method, with its 95 %
bootstrap interval; one panel per metric. The sign is turned so that **right is better** on every
panel (a metric where lower is better, such as the drop when the bottom pixels are removed, is
plotted as ``reference - member``), so a reader never has to remember a metric's direction. A
filled marker is an interval that excludes 0 (the images support the difference), a hollow one an
interval that straddles it. A lineup of one has nothing to compare: its panels show the model's own
values with their intervals.

:func:`reading` says the same in two lines of plain text. Both are pure functions of the report
dict (no file I/O); :func:`forest_plot` returns a PIL image for the app, :func:`forest_figure` the
matplotlib figure that ``write_report`` saves as ``summary.png``.
"""
from __future__ import annotations

import io
import math

from matplotlib.figure import Figure  # no pyplot: no global backend or figure state touched
from matplotlib.ticker import MaxNLocator
from PIL import Image

from cbam_viz.research.quality.metrics import PERCENT_METRICS

__all__ = ["comparisons", "forest_figure", "forest_plot", "reading", "verdict"]

_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")


def verdict(diff: dict, higher_is_better: bool) -> int | None:
    """Which side a paired interval supports: 1 the first model, -1 the second, 0 neither, None no value."""
    if diff.get("value") is None:
        return None
    if diff["low"] > 0 or diff["high"] < 0:
        return 1 if (diff["low"] > 0) == higher_is_better else -1
    return 0


def comparisons(report: dict) -> list[dict]:
    """Every (member, method, metric) comparison with the reference, in the report's order.

    Each: ``{"member", "method", "metric", "label", "diff" (interval dict), "better" (1: the
    member, -1: the reference, 0: unclear, None: no value), "scale" (100 for % metrics)}``.
    """
    out = []
    for member in report["members"]:
        for method, res in report["results"].items():
            for key, info in report["metrics"].items():
                d = res[key]["diff"].get(member)
                if d is None:
                    continue
                out.append({"member": member, "method": method, "metric": key, "label": info["label"], "diff": d,
                            "better": verdict(d, info["higher_is_better"]),
                            "scale": 100.0 if key in PERCENT_METRICS else 1.0})
    return out


def _rows(report: dict) -> list[tuple[str, str, int]]:
    """The plot's rows, top to bottom: ``(member, method, colour index)``."""
    compared = [m for m in report["members"] if m != report["reference"]] or [report["reference"]]
    return [(m, method, report["members"].index(m) % len(_COLOURS)) for m in compared for method in report["results"]]


def _point(report: dict, member: str, method: str, key: str) -> tuple[dict | None, float]:
    """The interval drawn for a row and its sign (+1, or -1 where lower is better)."""
    res = report["results"][method][key]
    if len(report["members"]) == 1:
        return res["models"][member], 1.0
    return res["diff"].get(member), 1.0 if report["metrics"][key]["higher_is_better"] else -1.0


def forest_figure(report: dict) -> Figure:
    """A matplotlib Figure: one panel per metric, one row per (member, method), right = better."""
    metrics = list(report["metrics"])
    rows = _rows(report)
    single = len(report["members"]) == 1
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(3.7 * ncols + 1.2, nrows * (0.32 * len(rows) + 1.3) + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    for ax, key in zip(axes, metrics):
        info = report["metrics"][key]
        scale = 100.0 if key in PERCENT_METRICS else 1.0
        for y, (member, method, colour) in enumerate(rows):
            iv, sign = _point(report, member, method, key)
            if iv is None or iv["value"] is None:
                continue
            lo, hi = sorted((sign * iv["low"] * scale, sign * iv["high"] * scale))
            x = sign * iv["value"] * scale
            clear = single or verdict(iv, True) != 0
            ax.errorbar(x, y, xerr=[[x - lo], [hi - x]], fmt="o", color=_COLOURS[colour], capsize=3,
                        markerfacecolor=_COLOURS[colour] if clear else "white")
        if not single:
            ax.axvline(0, color="black", lw=0.8)
        flipped = "" if info["higher_is_better"] or single else " (sign turned)"
        ax.set_title(f"{info['label']}{flipped}", fontsize=9)
        unit = " (points)" if scale == 100 else ""
        ax.set_xlabel(("value" if single else f"better than {report['reference']} →") + unit, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(5))
    axes[0].set_yticks(range(len(rows)), [f"{member} · {method}" for member, method, _ in rows])
    axes[0].set_ylim(len(rows) - 0.5, -0.5)  # first row on top (axes share y)
    n = len(report["images"])
    fig.suptitle((f"{report['reference']} alone, {n} images, 95 % bootstrap intervals (nothing to compare)" if single
                  else f"Each model − {report['reference']}, paired over {n} images, 95 % bootstrap intervals; "
                  "filled: the interval excludes 0"), fontsize=9)
    return fig


def forest_plot(report: dict, *, dpi: int = 110) -> Image.Image:
    """:func:`forest_figure` rendered to an RGB PIL image (for the app; no file written)."""
    buf = io.BytesIO()
    forest_figure(report).savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


def _effect(c: dict) -> str:
    d = c["diff"]
    if c["scale"] == 100:
        return f"{d['value'] * 100:+.1f} points [{d['low'] * 100:+.1f}, {d['high'] * 100:+.1f}]"
    return f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def reading(report: dict) -> str:
    """Two plain lines: how often each member is clearly better or worse than the reference, and the
    largest clear difference (or that there is none). A lineup of one says there is nothing to compare."""
    ref, n = report["reference"], len(report["images"])
    if len(report["members"]) == 1:
        return (f"One model ({ref}), {n} boxed images: nothing to compare it with.\n"
                "The panels show its own values with 95 % bootstrap intervals.")
    cs = comparisons(report)
    parts = []
    for member in report["members"]:
        mine = [c for c in cs if c["member"] == member]
        if mine:
            better, worse = sum(c["better"] == 1 for c in mine), sum(c["better"] == -1 for c in mine)
            parts.append(f"{member} better in {better}, worse in {worse}, unclear in {len(mine) - better - worse} "
                         f"of {len(mine)}")
    first = f"Against {ref} on {n} boxed images (95 % paired intervals): " + "; ".join(parts) + "."
    clear = [c for c in cs if c["better"] in (1, -1)]
    if not clear:
        return first + "\nNo interval excludes 0: on these images no model's CAMs differ measurably from the reference's."
    # The clearest: the largest difference for the width of its interval (a signal-to-noise ratio).
    top = max(clear, key=lambda c: abs(c["diff"]["value"]) / max(c["diff"]["high"] - c["diff"]["low"], 1e-12))
    who = top["member"] if top["better"] == 1 else ref
    return first + (f"\nClearest difference: {top['label']} with {top['method']}, {top['member']} − {ref} "
                    f"{_effect(top)}, in favour of {who}.")
