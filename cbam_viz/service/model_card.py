"""The About tab's model card: a lineup's manifest records side by side, in figures a reader can check.

A lineup is only worth comparing if its models were trained alike and measured alike, so the card
puts every member's record in one table (what each model is, its val accuracy, what trained it:
hardware, precision, wall time), then says what the paired comparisons found: each member minus
the reference on the same val images, with its bootstrap interval and McNemar's test (``evaluate
--update-manifest`` stores them), how the shipped weights were chosen, the recipe (once, when all
share it) and per-class accuracy. It reads the records only; no model runs. Missing figures are
left out, never invented: an untrained lineup says so, a foreign one (the ImageNet lineup) shows
what its records hold.

A member's paired difference is read from its own record, ``metrics["val_paired_difference"]``
(and ``"val_hflip_paired_difference"``), in either form ``evaluate`` has written:

- ``{"reference": REFERENCE, "difference": d, "ci95": [lo, hi], "n", "n_boot",
  "only_member_right", "only_reference_right", "mcnemar_p"}``: the member minus ``REFERENCE``;
- the pair form ``{"cbam_minus_baseline": d, ..., "only_cbam_right", "only_baseline_right"}``,
  stored identically in both records of a plain ResNet and its CBAM twin: read as the CBAM member
  minus the reference only when the reference's record holds the same dict.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any, NamedTuple

from cbam_viz.engine.lineup import default_lineup_name, lineup_specs
from cbam_viz.models.weights import MANIFEST_NAME, WeightRecord, read_manifest, weights_dirs

__all__ = ["CardMember", "model_card_markdown", "manifest_card", "records_card", "member_difference",
           "choice_sentence", "paired_sentence"]

#: Recipe keys left out of the recipe line: the input's normalisation gets a line of its own.
_HIDDEN_RECIPE_KEYS = {"mean", "std"}
#: (metrics key, what the card calls it).
_DIFFERENCES = (("val_paired_difference", "on val"),
                ("val_hflip_paired_difference", "with flip averaging (reported only; the app does not flip)"))


class CardMember(NamedTuple):
    """One member as the card needs it: its record name, architecture and record (None: untrained)."""

    name: str
    arch: str
    record: WeightRecord | None


def model_card_markdown(lineup) -> str:
    """The card of a loaded ``lineup`` (a :class:`cbam_viz.engine.lineup.Lineup`) from its members' records."""
    return records_card(lineup.name, [CardMember(m.name, m.arch, m.record if m.trained else None)
                                      for m in lineup.members], lineup.reference)


def manifest_card(name: str | None = None, *, weights_dir: str | os.PathLike | None = None) -> str:
    """The card of lineup ``name`` (default: the default lineup) from the manifests alone: no weights
    are read, so ``python -m cbam_viz model-card`` works where only the records are.

    Every weights folder is searched (``weights_dir`` or ``$CBAM_VIZ_WEIGHTS_DIR`` may list several);
    a lineup's records come from the folder that lists it.

    Raises:
        FileNotFoundError: no folder lists any lineup.
        KeyError: no lineup ``name``, or a member without a record (the message says which).
    """
    specs = lineup_specs(weights_dir)
    if not specs:
        folders = ", ".join(str(f / MANIFEST_NAME) for f in weights_dirs(weights_dir))
        raise FileNotFoundError(f"no lineup in {folders}; train and export one, or add one with add-lineup")
    name = name or default_lineup_name(weights_dir)
    if name not in specs:
        raise KeyError(f"no lineup {name!r}; known: {', '.join(sorted(specs))}")
    folder, spec = specs[name]
    records = read_manifest(folder)["models"]
    members = []
    for member in spec["members"]:
        if member not in records:
            raise KeyError(f"lineup {name!r} names {member!r}, which has no record in {folder / MANIFEST_NAME}")
        record = WeightRecord(**records[member])
        members.append(CardMember(member, record.arch, record))
    return records_card(name, members, spec.get("reference") or members[0].name)


def records_card(lineup_name: str, members: Sequence[CardMember], reference: str) -> str:
    """The card from the members' records, in display order; ``reference`` is a member's name."""
    records = {m.name: m.record for m in members}
    lines = [f"### Lineup `{lineup_name}`: " + " | ".join(m.arch for m in members), ""]
    if not any(records.values()):
        return "\n".join(lines + ["Untrained: random weights, for trying the app only. Their numbers mean nothing."])
    if len(members) > 1:
        lines += [f"Reference: `{reference}`; every difference below is a member minus the reference, on the "
                  "same images.", ""]
    lines += _side_by_side(members, reference)
    for key, label in _DIFFERENCES:
        sentences = [(m.name, paired_sentence(diff)) for m in members if m.name != reference
                     and (diff := member_difference(m, records.get(reference), reference, key))]
        if sentences:
            lines += ["", f"**Paired difference against `{reference}` {label}**", ""]
            lines += [f"- `{name}` − `{reference}`: {text}" for name, text in sentences if text]
    lines += [""] + _choice_and_recipe(records)
    per_class = _per_class_table(records, reference)
    if per_class:
        lines += ["", "**Val top-1 per class**", ""] + per_class
    return "\n".join(lines)


def member_difference(member: CardMember, reference_record: WeightRecord | None, reference: str,
                      key: str = "val_paired_difference") -> dict[str, Any] | None:
    """``member`` minus the reference, as stored under ``key``, in the new form (see the module's
    docstring); None when the records hold no difference that is this one."""
    if member.record is None or member.name == reference:
        return None
    diff = member.record.metrics.get(key)
    if not isinstance(diff, dict):
        return None
    if diff.get("reference") == reference and "difference" in diff:
        return diff
    pair_form = (reference_record is not None and "cbam_minus_baseline" in diff
                 and diff == reference_record.metrics.get(key) and "cbam" in member.arch)  # the pair's CBAM side
    if not pair_form:
        return None
    renamed = {"difference": "cbam_minus_baseline", "only_member_right": "only_cbam_right",
               "only_reference_right": "only_baseline_right"}
    return {"reference": reference, **{k: v for k, v in diff.items() if k not in renamed.values()},
            **{new: diff[old] for new, old in renamed.items() if old in diff}}


def paired_sentence(diff: Mapping[str, Any]) -> str | None:
    """A paired difference (the new form) in one sentence: points, interval, discordant images, McNemar.

    None without a difference; a field that is missing or not a number is left out (a hand-edited
    manifest must not take the page down).
    """
    def num(key):
        v = diff.get(key)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    if num("difference") is None:
        return None
    text = f"{100 * diff['difference']:+.2f} points"
    ci = diff.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        boot = f", {num('n_boot'):,} resamples" if num("n_boot") else ""
        text += f", 95 % paired bootstrap interval [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]{boot}"
    if num("n") is not None:
        text += f", on the same {num('n'):,} images"
    if num("only_member_right") is not None and num("only_reference_right") is not None:
        text += (f"; {num('only_member_right')} images only this model gets right, "
                 f"{num('only_reference_right')} only the reference")
    if num("mcnemar_p") is not None:
        text += f"; two-sided exact McNemar p = {num('mcnemar_p'):.2g}"
    return text + "."


def choice_sentence(training: dict[str, Any] | None) -> str | None:
    """How the shipped weights kind and input size were chosen, in words (None: no choice recorded).

    Either on the run's own held-out training files, or, for a final run on every training file,
    carried over from the lineup (or pair) that made it on its held-out files. Never on val.
    """
    sel = (training or {}).get("selection")
    if not isinstance(sel, dict) or "weights" not in sel or "input_size" not in sel:
        return None
    what = f"{'EMA' if sel['weights'] == 'ema' else sel['weights']} weights at {sel['input_size']} px"
    carried = sel.get("carried_from")
    source = carried if isinstance(carried, dict) else sel
    while isinstance(source.get("via"), dict):  # carried from a final lineup that carried it in turn
        source = source["via"]
    mean, images = source.get("mean_holdout_top1"), source.get("holdout_images", training.get("holdout_images"))
    score = f" (mean held-out top-1: {100 * mean:.2f} %)" if isinstance(mean, (int, float)) else ""
    files = f"{images} held-out training files" if images else "held-out training files"
    if isinstance(carried, dict):
        origin = source.get("lineup") or source.get("pair") or carried.get("lineup") or carried.get("pair")
        return (f"{what}, as `{origin}` chose on its {files}{score}; then trained again with "
                f"the same recipe on every training file, val untouched")
    return f"{what}, chosen on {files}, never on val{score}"


# ------------------------------------------------------------------------------------ parts

def _side_by_side(members: Sequence[CardMember], reference: str) -> list[str]:
    """Every member in one table; a row appears when at least one member has a value for it."""
    records = [m.record for m in members]
    ref = next((m.record for m in members if m.name == reference), None)

    def row(label: str, value) -> list[str]:
        cells = [value(r) if r is not None else None for r in records]
        if all(c in (None, "") for c in cells):
            return []
        return [f"| {label} | " + " | ".join("–" if c in (None, "") else str(c) for c in cells) + " |"]

    n_val = next((r.metrics.get("val_n") for r in records if r is not None and r.metrics.get("val_n")), None)
    val = f"val top-1 ({n_val:,} images)" if n_val else "val top-1"
    header = " | ".join(f"`{m.name}`" + (" (reference)" if m.name == reference and len(members) > 1 else "")
                        + ("" if m.record else " (untrained)") for m in members)
    out = [f"| | {header} |", "|---|" + "---|" * len(members)]
    out += row("architecture", lambda r: r.arch)
    out += row("parameters", lambda r: f"{r.num_params:,}" + (
        f" ({100 * (r.num_params / ref.num_params - 1):+.1f} %)" if ref and r is not ref and ref.num_params else ""))
    out += row("input", lambda r: f"{r.input_size} px")
    out += row(val, lambda r: _pct(r.metrics.get("val_top1"), bold=True))
    out += row("val top-5", lambda r: _pct(r.metrics.get("val_top5")))
    out += row("val top-1, flip-averaged (reported only)", lambda r: _pct(r.metrics.get("val_hflip_top1")))
    diffs = {m.name: member_difference(m, ref, reference) for m in members}
    out += row("val top-1 − reference (paired)", lambda r: _short_difference(diffs.get(r.name)))
    out += row("reported ImageNet top-1", lambda r: _pct(r.metrics.get("reported_imagenet_top1")))
    out += row("weights from", lambda r: r.training.get("source"))  # a foreign lineup's records say where from
    out += row("trained on", lambda r: "; ".join(r.training.get("hardware") or []))
    out += row("precision", lambda r: ", ".join(r.training.get("precision") or []))
    out += row("epochs, wall time", lambda r: _epochs_and_time(r.training))
    out += row("data", lambda r: r.training.get("data") or _training_files(r.training))
    out += row("software", lambda r: f"torch {r.training['torch']}" if r.training.get("torch") else None)
    out += row("weights file", lambda r: f"`{_file_name(r.file)}`" + (f" (sha256 `{r.sha256[:12]}…`)" if r.sha256 else ""))
    return out


def _short_difference(diff: Mapping[str, Any] | None) -> str | None:
    """``+0.25 [-0.40, +0.90], p = 0.46`` for the table; None without a difference."""
    value = diff.get("difference") if diff else None
    if not isinstance(value, (int, float)):
        return None
    text = f"{100 * value:+.2f}"
    ci = diff.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        text += f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"
    p = diff.get("mcnemar_p")
    return text + (f", p = {p:.2g}" if isinstance(p, (int, float)) and not isinstance(p, bool) else "")


def _choice_and_recipe(records: Mapping[str, WeightRecord | None]) -> list[str]:
    trained = {name: r for name, r in records.items() if r is not None}
    every = "both" if len(trained) == 2 else f"all {len(trained)}"
    out = []
    choices = {name: choice_sentence(r.training) for name, r in trained.items()}
    if len(choices) > 1 and len(set(choices.values())) == 1 and None not in choices.values():
        out.append(f"- Shipped as ({every}): {next(iter(choices.values()))}")
    else:
        out += [f"- Shipped as (`{name}`): {c}" for name, c in choices.items() if c]
    recipes = {name: _recipe_text(r.recipe) for name, r in trained.items() if r.recipe}
    if len(set(recipes.values())) == 1 and len(recipes) == len(trained) > 1:
        out.append(f"- Recipe (the same for {every}): {next(iter(recipes.values()))}")
    else:
        out += [f"- Recipe (`{name}`): {text}" for name, text in recipes.items()]
    first = next(iter(trained.values()))
    out.append(f"- Input normalisation: mean {list(first.mean)}, std {list(first.std)}")
    commands = {r.metrics.get(k) for r in trained.values() for k in ("eval_command", "hflip_eval_command")} - {None}
    out += [f"- Measured with: `{c}`" for c in sorted(commands)]
    if not any(r.metrics for r in trained.values()):
        out.append("- Metrics: not measured yet")
    return out


def _per_class_table(records: Mapping[str, WeightRecord | None], reference: str) -> list[str]:
    """Per-class val top-1 of every measured member, then each other member minus the reference."""
    trained = {name: r for name, r in records.items() if r is not None and r.metrics.get("val_per_class")}
    if not trained:
        return []
    first = next(iter(trained.values()))
    others = [name for name in trained if name != reference] if reference in trained else []
    out = ["| class | " + " | ".join(f"`{n}`" for n in trained) + "".join(f" | `{n}` − ref" for n in others) + " |",
           "|---|" + "---:|" * (len(trained) + len(others))]
    for c in first.classes:
        values = {name: r.metrics["val_per_class"].get(c["id"]) for name, r in trained.items()}
        cells = [_pct(v) or "–" for v in values.values()]
        base = values.get(reference)
        for name in others:
            v = values[name]
            cells.append(f"{100 * (v - base):+.1f}" if isinstance(v, (int, float)) and isinstance(base, (int, float))
                         else "–")
        out.append(f"| {c['name']} | " + " | ".join(cells) + " |")
    return out


def _recipe_text(recipe: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_recipe_value(k, v)}" for k, v in recipe.items()
                     if k not in _HIDDEN_RECIPE_KEYS and v not in ("", None))


def _recipe_value(key: str, value: Any) -> str:
    if key == "sizes" and isinstance(value, (list, tuple)):  # [[epoch, px], ...] as the CLI's --sizes takes it
        return ",".join(f"{e}:{s}" for e, s in value)
    if isinstance(value, (list, tuple)):
        return "-".join(str(v) for v in value)
    return str(value)


def _epochs_and_time(training: dict[str, Any]) -> str | None:
    epochs, seconds = training.get("epochs"), training.get("wall_time_s")
    if epochs is None and seconds is None:
        return None
    time = f"{seconds / 60:.0f} min" if isinstance(seconds, (int, float)) else "–"
    return f"{epochs if epochs is not None else '–'}, {time}"


def _training_files(training: dict[str, Any]) -> str | None:
    held = training.get("holdout_images")
    if held is None:
        return None
    return "every training file" if held == 0 else f"training files but {held} held out"


def _file_name(file: str) -> str:
    """A URL as it is; a local path by its name only (the page must not show the server's folders)."""
    return file if "://" in file else PurePath(file).name


def _pct(value, *, bold: bool = False) -> str | None:
    if not isinstance(value, (int, float)):
        return None
    text = f"{100 * value:.2f} %"
    return f"**{text}**" if bold else text
