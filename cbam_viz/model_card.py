"""The About tab's model card: a pair's two manifest records side by side, in figures a reader can check.

A pair is only worth comparing if both models were trained alike and measured alike, so the card
puts the two records in one table (what each model is, its val accuracy, what trained it: hardware,
precision, wall time) and then says what the paired comparison found: CBAM − baseline on the same
val images with its bootstrap interval and McNemar's test (``evaluate --update-manifest`` stores
them), how the shipped weights were chosen, the recipe (once, when both share it) and per-class
accuracy. It reads the records only; no model runs. Missing figures are left out, never invented:
an untrained pair says so, a foreign pair (the ImageNet one) shows what its records hold.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cbam_viz.weights import WeightRecord

__all__ = ["model_card_markdown", "records_card", "choice_sentence", "paired_sentence"]

#: Recipe keys left out of the recipe line: the input's normalisation gets a line of its own.
_HIDDEN_RECIPE_KEYS = {"mean", "std"}


def model_card_markdown(pair) -> str:
    """A model card for a loaded ``pair`` (a :class:`cbam_viz.pair.ModelPair`) from its manifest records."""
    return records_card(pair.name, {role: (m.name, m.arch, m.record if m.trained else None)
                                    for role, m in (("baseline", pair.baseline), ("CBAM", pair.cbam))})


def records_card(pair_name: str, models: Mapping[str, tuple[str, str, WeightRecord | None]]) -> str:
    """The card from ``{"baseline": (name, arch, record or None), "CBAM": (...)}``: no model is loaded
    (``python -m cbam_viz model-card`` prints it for the README from the manifest alone)."""
    base_arch, cbam_arch = models["baseline"][1], models["CBAM"][1]
    lines = [f"### Pair `{pair_name}`: {base_arch} vs {cbam_arch}", ""]
    records = {role: record for role, (_, _, record) in models.items()}
    if not any(records.values()):
        return "\n".join(lines + ["Untrained: random weights, for trying the app only. Their numbers mean nothing."])
    lines += _side_by_side(models, records)
    base, cbam = records["baseline"], records["CBAM"]
    if base is not None and cbam is not None:
        for key, label in (("val_paired_difference", "CBAM − baseline on val"),
                           ("val_hflip_paired_difference", "With flip averaging (reported only; the app does not flip)")):
            diff = base.metrics.get(key)  # evaluate stores one difference in both records of the pair
            sentence = paired_sentence(diff) if isinstance(diff, dict) and diff == cbam.metrics.get(key) else None
            if sentence:
                lines += ["", f"**{label}**: {sentence}"]
    lines += [""] + _choice_and_recipe(records)
    per_class = _per_class_table(records)
    if per_class:
        lines += ["", "**Val top-1 per class**", ""] + per_class
    return "\n".join(lines)


def paired_sentence(diff: dict[str, Any]) -> str | None:
    """``evaluate``'s paired difference in one sentence: points, interval, discordant images, McNemar.

    None without a difference; a field that is missing or not a number is left out (a hand-edited
    manifest must not take the page down).
    """
    def num(key):
        v = diff.get(key)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    if num("cbam_minus_baseline") is None:
        return None
    text = f"{100 * diff['cbam_minus_baseline']:+.2f} points"
    ci = diff.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        boot = f", {num('n_boot'):,} resamples" if num("n_boot") else ""
        text += f", 95 % paired bootstrap interval [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]{boot}"
    if num("n") is not None:
        text += f", on the same {num('n'):,} images"
    if num("only_cbam_right") is not None and num("only_baseline_right") is not None:
        text += (f"; {num('only_cbam_right')} images only CBAM gets right, {num('only_baseline_right')} only "
                 f"the baseline")
    if num("mcnemar_p") is not None:
        text += f"; two-sided exact McNemar p = {num('mcnemar_p'):.2g}"
    return text + "."


def choice_sentence(training: dict[str, Any] | None) -> str | None:
    """How the shipped weights kind and input size were chosen, in words (None: no choice recorded).

    Either on the run's own held-out training files, or, for a final run on every training file,
    carried over from the pair that made it on its held-out files. Never on val.
    """
    sel = (training or {}).get("selection")
    if not isinstance(sel, dict) or "weights" not in sel or "input_size" not in sel:
        return None
    what = f"{'EMA' if sel['weights'] == 'ema' else sel['weights']} weights at {sel['input_size']} px"
    carried = sel.get("carried_from")
    source = carried if isinstance(carried, dict) else sel
    mean, images = source.get("mean_holdout_top1"), source.get("holdout_images", training.get("holdout_images"))
    score = f" (the pair's mean held-out top-1: {100 * mean:.2f} %)" if isinstance(mean, (int, float)) else ""
    files = f"{images} held-out training files" if images else "held-out training files"
    if isinstance(carried, dict):
        return (f"{what}, as pair `{carried.get('pair')}` chose on its {files}{score}; then trained again with "
                f"the same recipe on every training file, val untouched")
    return f"{what}, chosen on {files}, never on val{score}"


# ------------------------------------------------------------------------------------ parts

def _side_by_side(models: Mapping[str, tuple], records: dict) -> list[str]:
    """The two models in one table; a row appears when at least one model has a value for it."""
    def row(label: str, value) -> list[str]:
        cells = [value(r) if r is not None else None for r in records.values()]
        if all(c in (None, "") for c in cells):
            return []
        return [f"| {label} | " + " | ".join("–" if c in (None, "") else str(c) for c in cells) + " |"]

    base = records["baseline"]
    n_val = next((r.metrics.get("val_n") for r in records.values() if r is not None and r.metrics.get("val_n")), None)
    val = f"val top-1 ({n_val:,} images)" if n_val else "val top-1"
    header = " | ".join(f"{role}: `{name}`" + ("" if records[role] else " (untrained)")
                        for role, (name, _, _) in models.items())
    out = [f"| | {header} |", "|---|---|---|"]
    out += row("architecture", lambda r: r.arch)
    out += row("parameters", lambda r: f"{r.num_params:,}" + (
        f" ({100 * (r.num_params / base.num_params - 1):+.1f} %)" if base and r is not base and base.num_params else ""))
    out += row("input", lambda r: f"{r.input_size} px")
    out += row(val, lambda r: _pct(r.metrics.get("val_top1"), bold=True))
    out += row("val top-5", lambda r: _pct(r.metrics.get("val_top5")))
    out += row("val top-1, flip-averaged (reported only)", lambda r: _pct(r.metrics.get("val_hflip_top1")))
    out += row("reported ImageNet top-1", lambda r: _pct(r.metrics.get("reported_imagenet_top1")))
    out += row("weights from", lambda r: r.training.get("source"))  # a foreign pair's records say where from
    out += row("trained on", lambda r: ", ".join(r.training.get("hardware") or []))
    out += row("precision", lambda r: ", ".join(r.training.get("precision") or []))
    out += row("epochs, wall time", lambda r: _epochs_and_time(r.training))
    out += row("data", lambda r: r.training.get("data") or _training_files(r.training))
    out += row("software", lambda r: f"torch {r.training['torch']}" if r.training.get("torch") else None)
    out += row("weights file", lambda r: f"`{_file_name(r.file)}`" + (f" (sha256 `{r.sha256[:12]}…`)" if r.sha256 else ""))
    return out


def _choice_and_recipe(records: dict) -> list[str]:
    trained = {role: r for role, r in records.items() if r is not None}
    out = []
    choices = {role: choice_sentence(r.training) for role, r in trained.items()}
    if len(choices) == 2 and len(set(choices.values())) == 1 and None not in choices.values():
        out.append(f"- Shipped as (both): {next(iter(choices.values()))}")
    else:
        out += [f"- Shipped as ({role}): {c}" for role, c in choices.items() if c]
    recipes = {role: _recipe_text(r.recipe) for role, r in trained.items() if r.recipe}
    if len(set(recipes.values())) == 1 and len(recipes) == len(trained) > 1:
        out.append(f"- Recipe (the same for both): {next(iter(recipes.values()))}")
    else:
        out += [f"- Recipe ({role}): {text}" for role, text in recipes.items()]
    first = next(iter(trained.values()))
    out.append(f"- Input normalisation: mean {list(first.mean)}, std {list(first.std)}")
    commands = {r.metrics.get(k) for r in trained.values() for k in ("eval_command", "hflip_eval_command")} - {None}
    out += [f"- Measured with: `{c}`" for c in sorted(commands)]
    if not any(r.metrics for r in trained.values()):
        out.append("- Metrics: not measured yet")
    return out


def _per_class_table(records: dict) -> list[str]:
    trained = {role: r for role, r in records.items() if r is not None and r.metrics.get("val_per_class")}
    if not trained:
        return []
    first = next(iter(trained.values()))
    both = len(trained) == 2
    out = ["| class | " + " | ".join(trained) + (" | CBAM − baseline |" if both else " |"),
           "|---|" + "---:|" * (len(trained) + both)]
    for c in first.classes:
        values = [r.metrics["val_per_class"].get(c["id"]) for r in trained.values()]
        cells = [_pct(v) or "–" for v in values]
        if both:
            cells.append(f"{100 * (values[1] - values[0]):+.1f}" if None not in values else "–")
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
