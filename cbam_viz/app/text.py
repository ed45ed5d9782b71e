"""The page's sentences and tables, as markdown: the loaded lineup, timings, notes, faithfulness.

Pure functions of plain values (no file, no model): the views put them into the page.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cbam_viz.messages import classes_sentence, escape_markdown

__all__ = ["lineup_markdown", "timings_markdown", "timings_line", "status_markdown", "faithfulness_markdown",
           "member_faithfulness_markdown", "CACHED_PREFIX"]

#: How an example's answer from the cache starts its timings line.
CACHED_PREFIX = "**Answered from the example cache**"
#: Relative drops closer than this are "about equally faithful".
EQUAL_DROP = 0.05


def lineup_markdown(info) -> str:
    """The "Loaded lineup" line (members by title, the reference, the device, the classes) and warnings.

    ``info``: a :class:`cbam_viz.service.LineupInfo` (name, members with titles, reference, classes,
    device, warnings).
    """
    titles = [m.title for m in info.members]
    reference = next((m.title for m in info.members if m.name == info.reference), info.reference)
    compared = f", compared with {escape_markdown(reference)}" if len(titles) > 1 else ""
    lines = [f"**Loaded lineup:** `{info.name}` ({' | '.join(escape_markdown(t) for t in titles)}{compared}; "
             f"on {info.device}). {classes_sentence(info.classes)}."]
    lines += [f"\n> **Warning:** {w}" for w in info.warnings]
    return "\n".join(lines)


def timings_markdown(timings: Mapping[str, float], per_model: Mapping[str, Mapping[str, float]]) -> str:
    """Every step's seconds, then each member's own steps (``per_model``: title -> timings)."""
    rows = ["| step | seconds |", "|---|---:|"]
    rows += [f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in timings.items()]
    for title, t in per_model.items():
        rows += [f"| {escape_markdown(title)}: {k.replace('_', ' ')} | {v:.3f} |" for k, v in t.items()]
    return "\n".join(rows)


def timings_line(timings: Mapping[str, float]) -> str:
    """One line: the request's total, the models' share and the drawing's (pictures and files)."""
    model = sum(timings.get(k, 0.0) for k in ("wait_for_model", "explain", "faithfulness"))
    drawing = timings.get("render", 0.0) + timings.get("write_files", 0.0)
    total = timings.get("total", 0.0) + timings.get("write_files", 0.0)
    return f"**Took {total:.2f} s**: models {model:.2f} s, drawing and files {drawing:.2f} s."


def cached_timings_line(first_run: str) -> str:
    """The timings line of an example answered from the cache (its first run's line, said as such)."""
    first = first_run.replace("**", "").replace("Took", "the first run took", 1)
    return f"{CACHED_PREFIX} ({first.rstrip('.')})."


def status_markdown(warnings, failures) -> str:
    """The notes of a result and the files of its batch that were skipped, with why."""
    lines = [f"> **Note:** {w}" for w in warnings]
    lines += [f"> **Skipped {escape_markdown(name)}:** {escape_markdown(reason)}" for name, reason in failures]
    return "\n\n".join(lines)


def _change(d: Mapping[str, float]) -> str:
    if d["drop"] >= 0:
        return f"from {d['prob_before']:.2f} to {d['prob_after']:.2f} (drop {d['relative_drop']:.0%})"
    return f"from {d['prob_before']:.2f} to {d['prob_after']:.2f} (it rose)"


def member_faithfulness_markdown(summary: Mapping[str, Any] | None, member: str, title: str) -> str:
    """One member's confidence drop in a sentence (under its column), or "" when not measured."""
    d = ((summary or {}).get("models") or {}).get(member)
    if not d:
        return ""
    return (f"**Faithfulness:** blurring away the top {summary['fraction']:.0%} of its own CAM takes "
            f"{escape_markdown(title)}'s probability {_change(d)}.")


def faithfulness_markdown(summary: Mapping[str, Any] | None, titles: Mapping[str, str],
                          reference: str | None = None) -> str:
    """A few plain sentences comparing the members' confidence drops with the reference's.

    Args:
        summary: the JSON's ``faithfulness`` (``fraction``, ``models``: member -> drop), or None.
        titles: member -> its title, in display order.
        reference: the member the others are compared with (default: the first).
    """
    models = (summary or {}).get("models") or {}
    members = [m for m in titles if m in models]
    if not members:
        return ""
    frac = f"{summary['fraction']:.0%}"
    said = [f"{escape_markdown(titles[m])}'s {'probability ' if i == 0 else ''}{_change(models[m])}"
            for i, m in enumerate(members)]
    listed = said[0] if len(said) == 1 else f"{', '.join(said[:-1])} and {said[-1]}"
    lines = [f"**Faithfulness, without boxes:** blurring away the top {frac} of its own CAM takes {listed}."]
    reference = reference if reference in models else members[0]
    ref = models[reference]["relative_drop"]
    for m in (m for m in members if m != reference):
        gap = models[m]["relative_drop"] - ref
        if abs(gap) < EQUAL_DROP:
            lines.append(f"{escape_markdown(titles[m])}'s CAM and {escape_markdown(titles[reference])}'s are "
                         "about equally faithful on this photo.")
        else:
            more, less = (m, reference) if gap > 0 else (reference, m)
            lines.append(f"{escape_markdown(titles[more])}'s CAM points more at what its model relies on than "
                         f"{escape_markdown(titles[less])}'s.")
    if len(members) > 1:
        lines.append("One photo proves little: see the Explanation-quality tab for the measured averages.")
    return " ".join(lines)
