"""The files of ``python -m cbam_viz sanity-check``: ``sanity.md`` (one table per member, the
comparison with the reference) and ``sanity.json`` (last), from :func:`cbam_viz.research.sanity.sanity_dataset`'s
report; both atomic.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cbam_viz.outputs import atomic_write_text, prepare_output_dir, write_json

__all__ = ["markdown_report", "write_report"]


def _cell(iv: Mapping[str, Any]) -> str:
    return "n/a" if iv["value"] is None else f"{iv['value']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]"


def _vs_reference_markdown(report: Mapping[str, Any]) -> list[str]:
    vs = report.get("vs_reference") or {}
    if not vs:
        return []
    methods = list(next(iter(vs.values())))
    lines = [f"### Each model − {report['reference']}: rank correlation at the last step (lower: more dependent "
             "on the learnt weights), paired over the same images", "",
             "| model | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    lines += [f"| {name} | " + " | ".join(_cell(d[m]) for m in methods) + " |" for name, d in vs.items()]
    return lines + [""]


def markdown_report(report: Mapping[str, Any]) -> str:
    """One table per model: cascade step x method -> SSIM and rank correlation with 95 % intervals."""
    lines = [f"## Sanity check: cascading model randomisation (lineup {report.get('lineup', report.get('pair'))})", "",
             f"CAMs of the trained model vs the same model with its stages re-initialised top-down, cumulatively "
             f"(Adebayo et al., NeurIPS 2018), on `{report['data']}`. Values: mean over images [95 % bootstrap "
             f"interval]. A method passes when its mean rank correlation at the last step is below "
             f"{report['pass_threshold']}: its maps depend on the learnt weights.", ""]
    for m in report["models"].values():
        methods = list(m["methods"])
        lines += [f"### {m['name']} ({m['n']} images, layer {m['layer']})", ""]
        if not m["trained"]:
            lines += ["> **Untrained model**: the 'trained' CAMs come from a random network.", ""]
        lines += ["| re-initialised up to | " + " | ".join(f"{x} SSIM | {x} rank corr." for x in methods) + " |",
                  "|---|" + "---|---|" * len(methods)]
        for i, step in enumerate(m["steps"]):
            cells = [f"{_cell(m['methods'][x]['ssim'][i])} | {_cell(m['methods'][x]['rank_correlation'][i])}"
                     for x in methods]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        verdicts = ", ".join(f"{x}: {'passes' if m['methods'][x]['passes'] else '**FAILS**'}" for x in methods)
        lines += ["", f"Verdict: {verdicts}.", ""]
    lines += _vs_reference_markdown(report)
    lines += [f"Run time: {report['seconds']:.0f} s, {report['settings']['torch_threads']} threads.", ""]
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """Write ``sanity.md`` and ``sanity.json`` (last) to ``out``, atomically."""
    out = prepare_output_dir(out)
    paths = {"markdown": out / "sanity.md", "json": out / "sanity.json"}
    atomic_write_text(paths["markdown"], markdown_report(report))
    write_json(report, paths["json"])
    return paths
