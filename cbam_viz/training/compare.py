"""A lineup's accuracy compared member by member: each member against the reference, on the same images.

:mod:`cbam_viz.training.evaluate` measures every member of a lineup on one split; here each member
other than the reference is compared with it. The members saw the same images, so their errors are
correlated and an unpaired comparison of two accuracies would overstate the uncertainty: the
difference gets a paired bootstrap 95 % interval (the same image draws for both) and McNemar's
exact test on the images only one of the two gets right. The whole evaluation is written as one
JSON document and as a Markdown report (``python -m cbam_viz evaluate --lineup NAME --out X.json
--markdown X.md``); ``--update-manifest`` stores each member's difference in its own record.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cbam_viz.stats import paired_bootstrap
from cbam_viz.training.evaluate import EvalResult

__all__ = ["paired_difference", "lineup_differences", "check_comparisons", "member_comparisons", "parse_comparison", "format_paired",
           "evaluation_document", "evaluation_markdown"]


def paired_difference(reference: EvalResult, member: EvalResult, *, n_boot: int = 10_000,
                      seed: int = 0) -> dict[str, Any]:
    """``member`` minus ``reference`` top-1 on the same images: a paired bootstrap 95 % interval and
    McNemar's exact test.

    McNemar counts the images only one model gets right (``only_member_right``,
    ``only_reference_right``) and gives the two-sided exact binomial p-value, capped at 1.

    Raises:
        ValueError: the two results do not hold per-image outcomes on the same number of images.
    """
    if len(reference.correct) != len(member.correct) or not reference.correct:
        raise ValueError(f"{member.name} and {reference.name} need per-image outcomes on the same images")
    a = np.asarray(member.correct, dtype=np.float64)
    b = np.asarray(reference.correct, dtype=np.float64)
    iv = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
    only_member, only_reference = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    k, m = min(only_member, only_reference), only_member + only_reference
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
    return {"member": member.name, "reference": reference.name, "difference": iv.value, "ci95": [iv.low, iv.high],
            "n": iv.n, "n_boot": n_boot, "only_member_right": only_member, "only_reference_right": only_reference,
            "mcnemar_p": p, "hflip": member.hflip}


def lineup_differences(results: Sequence[EvalResult], reference: str, **kwargs) -> dict[str, dict[str, Any]]:
    """member name -> :func:`paired_difference` against ``reference``, for every other member in order.

    Raises:
        KeyError: ``reference`` is not among the results.
    """
    by_name = {r.name: r for r in results}
    if reference not in by_name:
        raise KeyError(f"the reference {reference!r} is not among the evaluated models ({', '.join(by_name)})")
    return {r.name: paired_difference(by_name[reference], r, **kwargs) for r in results if r.name != reference}


def parse_comparison(text: str) -> tuple[str, str]:
    """``"MEMBER:AGAINST"`` -> ``(member, against)``.

    Raises:
        ValueError: not two different non-empty names joined by one ``:``.
    """
    member, sep, against = text.partition(":")
    if not sep or not member or not against or ":" in against or member == against:
        raise ValueError(f"--compare wants MEMBER:AGAINST, two different record names of the lineup, got {text!r}")
    return member, against


def check_comparisons(names: Sequence[str], pairs: Sequence[tuple[str, str]]) -> None:
    """Fail before any forward pass when a ``--compare`` pair names a model that is not evaluated.

    Raises:
        KeyError: a name is not in ``names``.
    """
    for name in (n for pair in pairs for n in pair):
        if name not in names:
            raise KeyError(f"--compare names {name!r}, which is not a member here ({', '.join(names)})")


def member_comparisons(results: Sequence[EvalResult], pairs: Sequence[tuple[str, str]],
                       **kwargs) -> list[dict[str, Any]]:
    """:func:`paired_difference` of ``member`` against ``against`` for each pair, beside the reference's.

    The reference answers "what does attention add to the plain network"; a lineup of the family has
    a second question, CBAM against SE ("does the spatial gate add anything over channel
    attention?"), answered on the same images and outcomes, without a second evaluation.

    Raises:
        KeyError: a name is not among the results.
    """
    by_name = {r.name: r for r in results}
    check_comparisons(list(by_name), pairs)
    return [paired_difference(by_name[against], by_name[member], **kwargs) for member, against in pairs]


def format_paired(diff: dict[str, Any]) -> str:
    """One line: the difference in points, its interval, the discordant images and McNemar's p."""
    lo, hi = diff["ci95"]
    member, reference = diff["member"], diff["reference"]
    return (f"{member} - {reference} top-1: {100 * diff['difference']:+.2f} points, 95 % paired bootstrap "
            f"interval [{100 * lo:+.2f}, {100 * hi:+.2f}] over {diff['n']} images; McNemar: {member} alone right "
            f"on {diff['only_member_right']}, {reference} alone on {diff['only_reference_right']}, two-sided exact "
            f"p = {diff['mcnemar_p']:.3g}")


def evaluation_document(results: Sequence[EvalResult], *, lineup: str | None, reference: str,
                        differences: dict[str, dict[str, Any]],
                        comparisons: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The JSON of one evaluation: the lineup (None for a single model), its members' results in
    order, each member's difference against the reference and any ``--compare`` pairs."""
    first = results[0]
    return {"lineup": lineup, "reference": reference, "members": [r.name for r in results],
            "data_dir": first.data_dir, "n": first.n, "hflip": first.hflip,
            "results": {r.name: r.to_json() for r in results}, "differences": differences,
            "comparisons": list(comparisons)}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def _difference_row(label: str, d: dict[str, Any]) -> str:
    lo, hi = d["ci95"]
    return (f"| {label} | {100 * d['difference']:+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] | "
            f"{d['only_member_right']} | {d['only_reference_right']} | {d['mcnemar_p']:.3g} |")


def evaluation_markdown(doc: dict[str, Any]) -> str:
    """:func:`evaluation_document` as a Markdown report: accuracy per member, the paired differences
    against the reference, and per-class top-1 side by side."""
    results, reference = doc["results"], doc["reference"]
    what = f"lineup `{doc['lineup']}`" if doc["lineup"] else f"model `{reference}`"
    flip = ", each image's softmax averaged with its mirror image's" if doc["hflip"] else ""
    lines = [f"# Evaluation of {what}", "",
             f"{doc['n']} images of `{doc['data_dir']}`, decoded as the app decodes an upload{flip}.", "",
             "| member | architecture | top-1 | top-5 | images |", "|---|---|---:|---:|---:|"]
    for name in doc["members"]:
        r = results[name]
        label = f"`{name}`" + (" (reference)" if name == reference and len(results) > 1 else "")
        lines.append(f"| {label} | {r['arch']} | {_pct(r['top1'])} | {_pct(r['top5'])} | {r['n']} |")
    if doc["differences"]:
        lines += ["", f"## Against the reference `{reference}`", "",
                  "Top-1 of the member minus the reference's on the same images, with a paired bootstrap 95 % "
                  "interval; McNemar's exact test on the images only one of the two gets right.", "",
                  "| member | difference (points) | 95 % interval | only the member right | only the reference right "
                  "| McNemar p |", "|---|---:|---|---:|---:|---:|"]
        lines += [_difference_row(f"`{name}`", d) for name, d in doc["differences"].items()]
    if doc.get("comparisons"):
        lines += ["", "## Between members", "",
                  "The same paired test for the pairs asked for with `--compare MEMBER:AGAINST`.", "",
                  "| member − against | difference (points) | 95 % interval | only the member right "
                  "| only the other right | McNemar p |", "|---|---:|---|---:|---:|---:|"]
        lines += [_difference_row(f"`{d['member']}` − `{d['reference']}`", d) for d in doc["comparisons"]]
    classes = results[doc["members"][0]]["classes"]
    lines += ["", "## Top-1 per class", "", "| class | " + " | ".join(f"`{n}`" for n in doc["members"]) + " |",
              "|---|" + "---:|" * len(doc["members"])]
    for c in classes:
        cells = [_pct(results[n]["per_class"].get(c["id"])) for n in doc["members"]]
        lines.append(f"| {c['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
