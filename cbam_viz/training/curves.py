"""Training-curves figure for the model card: loss, train accuracy and monitored top-1 per epoch.

Reads the ``log.jsonl`` files the trainer appends to (one JSON object per epoch) and draws every
run on shared axes, so the members of a lineup trained with one recipe compare at a glance.
The third panel shows what the runs monitored: the held-out part of the training folder (raw and
weight-averaged), or ``--val`` for runs without a holdout; runs on every training file without
``--val`` monitored nothing and get no third panel. ``python -m cbam_viz plot-curves``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from matplotlib.figure import Figure

from cbam_viz.outputs import atomic_write

__all__ = ["read_log", "monitored_split", "plot_training_curves"]


def read_log(path: str | os.PathLike) -> list[dict]:
    """Per-epoch entries of one run, in order; a later line for the same epoch (a resumed,
    repeated epoch) replaces the earlier one."""
    by_epoch: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            by_epoch[int(entry["epoch"])] = entry
    return [by_epoch[k] for k in sorted(by_epoch)]


def monitored_split(log: list[dict]) -> str | None:
    """Which split a run scored while training: ``"holdout"``, ``"val"``, or None (a final run on
    every training file with no ``--val`` scores nothing)."""
    for split in ("holdout", "val"):
        if any(f"{split}_top1" in e for e in log):
            return split
    return None


def plot_training_curves(runs: dict[str, str | os.PathLike], out: str | os.PathLike, *,
                         eval_size: int | None = None) -> Path:
    """Draw ``{label: log.jsonl}`` runs into one PNG; returns the path.

    Three panels, or two when no run monitored anything (an empty axis would read as a failed run).
    ``eval_size``: the monitoring image size, for the third panel's title (the log omits it).
    """
    logs = {label: read_log(path) for label, path in runs.items()}
    splits = {label: monitored_split(log) for label, log in logs.items()}
    kinds = [k for k in ("holdout", "val") if k in splits.values()]
    fig = Figure(figsize=(13 if kinds else 8.8, 3.6), constrained_layout=True)  # no pyplot: no global state
    axes = fig.subplots(1, 3 if kinds else 2)
    for i, (label, log) in enumerate(logs.items()):
        ep, color = [e["epoch"] for e in log], f"C{i}"  # one colour per run in every panel
        axes[0].plot(ep, [e["train_loss"] for e in log], marker="o", ms=3, color=color, label=label)
        axes[1].plot(ep, [100 * e["train_acc"] for e in log], marker="o", ms=3, color=color, label=label)
        if splits[label] is None:
            continue
        for key, style, suffix in ((f"{splits[label]}_top1", "-", ""), (f"{splits[label]}_top1_ema", "--", " EMA")):
            points = [(e["epoch"], 100 * e[key]) for e in log if key in e]
            if points:
                axes[2].plot(*zip(*points), style, marker="s", ms=4, color=color, label=label + suffix)
    names = {"holdout": "held-out train top-1 %", "val": "val top-1 %"}
    titles = ["train loss (label-smoothed)", "train accuracy % (augmented)"]
    if kinds:
        titles.append(" / ".join(names[k] for k in kinds) + (f" ({eval_size} px)" if eval_size else ""))
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    return out
