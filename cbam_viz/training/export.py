"""Export finished training runs as a lineup: all members at once, or one model at a time.

The members of a lineup are trained with one recipe (only the architecture differs) and ship with
one held-out choice of weights (raw or EMA) and input size
(:func:`cbam_viz.training.holdout.choose_for_lineup`). Trained together (``train --arch A B
--export DIR``) they are exported at once, and the manifest gains the lineup (the plain ResNet as
its reference) as its default, beside the ``pairs`` entry older readers know. On these CPUs one
model can take most of a session, and a run's checkpoint may not outlive the session, so two
members may be trained in two sessions:

1. ``train --arch resnet18_cbam --export DIR`` with one architecture writes a *half*: both weight
   kinds (``<arch>_<name>_raw`` and ``<arch>_<name>_ema``; raw only with ``--ema-decay 0``) with
   their held-out scores at every candidate size, so the choice can still be made later, on the
   same held-out files.
2. ``train --arch resnet18 --export weights --pair-with DIR`` checks that the half was trained with
   the same recipe on the same held-out files, makes the choice over both models' scores, exports
   the new run, copies the half's chosen file, and sets the lineup.

A *final* lineup retrains a recipe whose choice is already made on every training file
(``--holdout 0 --settings-from weights``): the usual last step once the held-out split has done its
job, worth 8.7 % more training images. Nothing is held out, so nothing is re-chosen: the run ships
with the (weights, input size) the earlier lineup of the same recipe chose on its held-out files
(:func:`carried_settings`), and its halves carry that choice so every member ships with it. A
``carried_from`` records the lineup it came from under the key ``pair`` (the on-disk form the
shipped manifest has).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cbam_viz.engine.lineup import default_lineup_name, lineup_specs
from cbam_viz.models import backbone_of
from cbam_viz.models.imagenette import IMAGENETTE_NAMES
from cbam_viz.models.weights import WeightRecord, read_manifest, save_safetensors, sha256_file, update_manifest
from cbam_viz.training.holdout import WEIGHT_KINDS, choose_for_lineup, holdout_scores
from cbam_viz.training.recipe import Recipe, json_differences, recipe_differences
from cbam_viz.training.train import TrainResult

__all__ = ["Half", "holdout_digest", "read_half", "carried_settings", "export_runs"]



def holdout_digest(files: Sequence[str]) -> str:
    """sha256 of the held-out file names: two runs can only be paired if they held out the same files."""
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()


@dataclass(frozen=True)
class Half:
    """One model of a lineup, exported alone: a record per weight kind and the held-out scores of both."""

    arch: str
    records: Mapping[str, WeightRecord]  # kind -> record
    scores: Mapping[str, Any] | None  # holdout_scores() over every kind in records; None: nothing held out
    weights_dir: Path


def read_half(weights_dir: str | os.PathLike, *, name: str, recipe: Recipe, holdout_files: Sequence[str] | None,
              other_than: Sequence[str], settings: Mapping[str, Any] | None = None) -> Half:
    """The half in ``weights_dir`` whose architecture is not in ``other_than``, checked against this run.

    ``holdout_files=None`` skips the held-out files check (before training, when they are not read yet).
    ``settings``: this run's :func:`carried_settings` (a final lineup); the half must carry the same.

    Raises:
        ValueError: no half, more than one, or one made with another recipe, other held-out files
            (its scores would then not be comparable with this run's) or other carried settings.
    """
    weights_dir = Path(weights_dir)
    try:
        models = read_manifest(weights_dir)["models"]
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ValueError(f"--pair-with {str(weights_dir)!r}: no readable manifest ({err})") from None
    halves: dict[str, dict[str, WeightRecord]] = {}
    for rec_json in models.values():
        rec = WeightRecord(**rec_json)
        kind = rec.training.get("half")
        if kind in WEIGHT_KINDS and rec.name == f"{rec.arch}_{name}_{kind}" and rec.arch not in other_than:
            halves.setdefault(rec.arch, {})[kind] = rec
    if len(halves) != 1:
        found = ", ".join(sorted(halves)) or "none"
        raise ValueError(f"--pair-with {str(weights_dir)!r}: wanted one half named '<arch>_{name}_<raw|ema>' of an "
                         f"architecture other than {', '.join(other_than)}; found {found}")
    arch, records = next(iter(halves.items()))
    first = next(iter(records.values()))
    saved = Recipe.from_json(first.recipe)
    if saved != recipe:
        raise ValueError(f"--pair-with: {first.name} was trained with another recipe "
                         f"({'; '.join(recipe_differences(saved, recipe))}); the members of a lineup share one recipe")
    if holdout_files is not None and first.training.get("holdout_digest") != holdout_digest(holdout_files):
        raise ValueError(f"--pair-with: {first.name} held out other training files than this run "
                         f"({first.training.get('holdout_images')} vs {len(holdout_files)}): train both on one folder")
    carried = first.training.get("settings_from")
    wanted = dict(settings) if settings is not None else None
    if carried != wanted:
        what = ("; ".join(json_differences(carried, wanted)) if carried and wanted
                else f"the half: {'--settings-from' if carried else 'none'}, this run: {'--settings-from' if wanted else 'none'}")
        raise ValueError(f"--pair-with: {first.name} carries other settings than this run ({what}): give both "
                         f"halves the same --settings-from, unchanged between them")
    for rec in records.values():
        path = weights_dir / rec.file
        if not path.is_file() or sha256_file(path) != rec.sha256:
            raise ValueError(f"--pair-with: {path} is missing or does not match its sha256 in the manifest")
    return Half(arch, records, first.training.get("selection", {}).get("scores"), weights_dir)


def carried_settings(weights_dir: str | os.PathLike, *, recipe: Recipe, archs: Sequence[str],
                     lineup: str | None = None) -> dict[str, Any]:
    """The (weights, input size) that ``lineup`` of ``weights_dir`` chose on its held-out files, for a final run.

    A final run trains on every training file (``recipe.holdout == 0``), so it cannot choose for
    itself; it may take the choice of a lineup trained with the same recipe in every other field,
    on the same backbones. Checked here, before any training.

    Args:
        lineup: the lineup whose choice is taken (default: the folder's default lineup; a manifest's
            ``pairs`` count as lineups of two).

    Returns:
        ``{"weights": kind, "input_size": S, "rule": ..., "carried_from": {...}}``: the choice, and
        where it came from: the lineup, its records' sha256, how many files it held out, and the
        held-out scores and rule behind its choice (those of the *earlier* models, so kept apart).

    Raises:
        ValueError: this run holds files out, or the folder has no such lineup, or it was trained
            with another recipe or on other backbones, or made no held-out choice.
    """
    where = f"--settings-from {str(weights_dir)!r}"
    if recipe.holdout > 0:
        raise ValueError(f"{where} is for a final run on every training file (--holdout 0); a run that holds "
                         f"{recipe.holdout:g} of them out makes its own choice on them")
    lineup, records = _lineup_records(weights_dir, lineup, where)
    backbones = {backbone_of(r.arch) for r in records}
    if not {backbone_of(a) for a in archs} <= backbones:
        raise ValueError(f"{where}: lineup {lineup!r} is {_and(r.arch for r in records)}, not "
                         f"{', '.join(archs)}: its choice was made for other models")
    for rec in records:
        _check_carried_record(rec, recipe, where)
    choices = [{k: v for k, v in r.training["selection"].items() if k != "scores"} for r in records]
    if any(c != choices[0] for c in choices) or any(r.input_size != choices[0]["input_size"] for r in records):
        raise ValueError(f"{where}: the records of lineup {lineup!r} disagree on their held-out choice")
    chosen = choices[0]
    if "carried_from" in chosen:  # a final lineup: pass on the choice it carried, and say whence it came
        origin = chosen["carried_from"]
        newcomers = sorted(set(archs) - {r.arch for r in records})
        return {"weights": chosen["weights"], "input_size": chosen["input_size"],
                "rule": f"carried over from lineup {lineup!r} (trained on every training file), which carried it "
                        f"from lineup {origin.get('pair')!r}'s choice on its {origin.get('holdout_images')} held-out "
                        f"training files; this run trained on every training file with the same recipe"
                        + (f" ({', '.join(newcomers)}: same backbone, other attention)" if newcomers else ""),
                "carried_from": {"pair": lineup, "records": {r.name: r.sha256 for r in records}, "holdout": 0.0,
                                 "holdout_images": 0, "via": origin}}
    images = records[0].training.get("holdout_images")
    return {"weights": chosen["weights"], "input_size": chosen["input_size"],
            "rule": f"carried over from lineup {lineup!r}, which chose it on its {images} held-out training files; "
                    f"this run trained on every training file with the same recipe",
            "carried_from": {"pair": lineup, "records": {r.name: r.sha256 for r in records},
                             "holdout": Recipe.from_json(records[0].recipe).holdout, "holdout_images": images,
                             **{k: v for k, v in chosen.items() if k not in ("weights", "input_size")}}}


def _and(names) -> str:
    names = list(names)
    return " and ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} and {names[-1]}"


def _lineup_records(weights_dir: str | os.PathLike, lineup: str | None, where: str) -> tuple[str, list[WeightRecord]]:
    """The name and member records of ``lineup`` (default: the folder's default) in one folder's manifest."""
    try:
        manifest = read_manifest(weights_dir)
        specs = {name: spec for name, (_, spec) in lineup_specs(weights_dir).items()}
        lineup = lineup or default_lineup_name(weights_dir)
        if lineup not in specs:
            raise ValueError(f"no lineup {lineup!r} (known: {', '.join(sorted(specs)) or 'none'})")
        return lineup, [WeightRecord(**manifest["models"][member]) for member in specs[lineup]["members"]]
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: no readable lineup in its manifest ({err})") from None


def _check_carried_record(rec: WeightRecord, recipe: Recipe, where: str) -> None:
    """A record whose choice a final run may carry: it made one on held-out files (or carried one),
    with this recipe in every field but ``holdout``."""
    saved = Recipe.from_json(rec.recipe)
    selection = rec.training.get("selection")
    chose = saved.holdout > 0 or (saved.holdout == 0 and isinstance(selection, dict) and "carried_from" in selection)
    if not chose or not isinstance(selection, dict) or not {"weights", "input_size"} <= set(selection):
        raise ValueError(f"{where}: {rec.name} held no files out, so it made no held-out choice to carry over")
    diffs = [d for d in recipe_differences(saved, recipe) if not d.startswith("holdout:")]
    if diffs:
        hint = (" (--bf16 auto turns bfloat16 off on a CPU without AVX-512 BF16 / AMX; this recipe needs such "
                "a CPU or a GPU)" if any(d.startswith("bf16:") for d in diffs) else "")
        raise ValueError(f"{where}: {rec.name} was trained with another recipe ({'; '.join(diffs)}); only "
                         f"--holdout may differ{hint}")


def export_record(result: TrainResult, *, arch: str, recipe: Recipe, classes: list[str], weights_dir: str | os.PathLike,
           name: str, class_names: dict[str, str] | None = None, weights: str = "raw", input_size: int | None = None,
           selection: dict[str, Any] | None = None, training_extra: dict[str, Any] | None = None) -> WeightRecord:
    """Write the trained model as ``<weights_dir>/<name>.safetensors`` and record it in the manifest.

    Args:
        weights: ``"raw"`` (the last SGD iterate) or ``"ema"`` (the run's weight average).
        input_size: the size the app runs the model at (default: the recipe's ``eval_size``);
            normally the one :func:`cbam_viz.training.holdout.choose_for_lineup` chose on the held-out files.
        selection: that choice and the held-out scores behind it, recorded under ``training``.
        training_extra: more fields for ``training`` (e.g. what marks a half).
    """
    names = {**IMAGENETTE_NAMES, **(class_names or {})}
    source = result.ema_model if weights == "ema" else result.model
    if source is None:
        raise ValueError(f"this run kept no {weights!r} weights (recipe ema_decay = {recipe.ema_decay})")
    model = source.to(memory_format=torch.contiguous_format)
    file = f"{name}.safetensors"
    digest = save_safetensors(model, Path(weights_dir) / file)
    hist = result.history
    hardware = sorted({h["device"] for h in hist if "device" in h})
    precision = sorted({h["precision"] for h in hist if "precision" in h})
    training = {"wall_time_s": round(result.wall_time_s, 1),
                "img_per_s_last_epoch": round(hist[-1]["img_per_s"], 1) if hist else None,
                "epochs": len(hist), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "hardware": hardware, "precision": precision, "weights": weights,
                "holdout_images": len(result.holdout_files)}
    if selection is not None:
        training["selection"] = selection
    if result.init is not None:
        training["init"] = result.init
    training.update(training_extra or {})
    record = WeightRecord(
        name=name, file=file, arch=arch, sha256=digest,
        num_params=sum(p.numel() for p in model.parameters()),
        classes=[{"id": c, "name": names.get(c, c)} for c in classes],
        mean=list(recipe.mean), std=list(recipe.std), input_size=input_size or recipe.eval_size,
        recipe=recipe.to_json(), training=training,
        metrics={k: hist[-1][k] for k in ("val_top1", "val_top5") if hist and k in hist[-1]},
    )
    update_manifest(weights_dir, record=record)
    return record


def _scores_of(results: Mapping[str, TrainResult], *, recipe: Recipe, data_dir, sizes) -> dict[str, Any]:
    scores = {}
    for arch, result in results.items():
        models = {"raw": result.model, **({"ema": result.ema_model} if result.ema_model is not None else {})}
        scores[arch] = holdout_scores(models, data_dir, result.holdout_files, mean=recipe.mean, std=recipe.std,
                                      **({"sizes": sizes} if sizes else {}))
    return scores


def _copy_half(half: Half, choice: Mapping[str, Any], *, weights_dir: Path, name: str) -> WeightRecord:
    """Copy the half's chosen weights into ``weights_dir`` as ``<arch>_<name>``, with the lineup's choice."""
    source = half.records[choice["weights"]]
    record_name = f"{half.arch}_{name}"
    file = f"{record_name}.safetensors"
    weights_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(half.weights_dir / source.file, weights_dir / file)
    # What marks a half goes; what is left is what the run trained now records (see export()).
    training = {k: v for k, v in source.training.items()
                if k not in ("half", "selection", "settings_from", "holdout_digest")}
    selection = {**choice, **({"scores": half.scores} if half.scores is not None else {})}
    record = replace(source, name=record_name, file=file, input_size=choice["input_size"],
                     training={**training, "selection": selection})
    update_manifest(weights_dir, record=record)
    return record


def _pair_it_later(weights_dir: Path) -> str:
    return (f"pair it later: train the other architecture with the same options and "
            f"--export weights --pair-with {weights_dir}")


def export_runs(results: Mapping[str, TrainResult], *, recipe: Recipe, classes: list[str], data_dir,
                weights_dir: str | os.PathLike, name: str, sizes: Sequence[int] | None = None,
                pair_with: str | os.PathLike | None = None, settings: Mapping[str, Any] | None = None) -> list[str]:
    """Export finished runs (all with ``recipe``) to ``weights_dir``; return what was done, a line each.

    Two or more models (trained now, or one of them read from ``pair_with``) are exported with one
    held-out choice and set as the default lineup. One architecture alone, with no ``pair_with``,
    is exported as a half (each weight kind it has), to be completed later; a final run (nothing
    held out) with ``settings`` (:func:`carried_settings`) ships with that choice: alone, its half
    holds only the chosen weight kind, and a model new to the lineup it carries from ships whole.

    Raises:
        ValueError: ``pair_with`` holds no matching half (see :func:`read_half`), or ``settings`` are
            given for a run that held files out.
    """
    weights_dir = Path(weights_dir)
    if settings is not None and recipe.holdout > 0:
        raise ValueError("carried settings are for a run that held nothing out (holdout 0)")
    half = None
    if pair_with is not None:
        any_run = next(iter(results.values()))
        half = read_half(pair_with, name=name, recipe=recipe, holdout_files=any_run.holdout_files,
                         other_than=list(results), settings=settings)
    scores = _scores_of(results, recipe=recipe, data_dir=data_dir, sizes=sizes) if recipe.holdout > 0 else {}
    common = {"recipe": recipe, "classes": classes, "weights_dir": weights_dir, "name": name}
    if half is None and len(results) == 1:
        (arch, result), = results.items()
        if recipe.holdout > 0:
            return _export_half(arch, result, scores, **common)
        if settings is not None and f"{arch}_{name}" not in settings["carried_from"]["records"]:
            return _export_newcomer(arch, result, settings, **common)
        if settings is not None:
            return _export_final_half(arch, result, settings, **common)
    return _export_together(results, half, scores, settings, **common)


def _export_half(arch: str, result: TrainResult, scores: Mapping[str, Any], *, recipe: Recipe, classes: list[str],
                 weights_dir: Path, name: str) -> list[str]:
    """One model alone, with held-out files: every weight kind it has, with its scores, to be paired later."""
    kinds = [k for k in WEIGHT_KINDS if k in scores[arch]["scores"]]  # the kinds scored: raw only with --ema-decay 0
    own = choose_for_lineup(scores)  # this model's own best, recorded for reference only
    digest = holdout_digest(result.holdout_files)
    lines = []
    for kind in kinds:
        rec = export_record(result, arch=arch, recipe=recipe, classes=classes, weights_dir=weights_dir,
                            name=f"{arch}_{name}_{kind}", weights=kind, input_size=own["input_size"],
                            selection={"scores": scores[arch], "own_choice": own},
                            training_extra={"half": kind, "holdout_digest": digest})
        lines.append(f"exported half {rec.file} ({rec.sha256[:12]}) to {weights_dir}")
    return [*lines, _pair_it_later(weights_dir)]


def _export_newcomer(arch: str, result: TrainResult, settings: Mapping[str, Any], *, recipe: Recipe,
                     classes: list[str], weights_dir: Path, name: str) -> list[str]:
    """A new member of the family (SE or BAM beside a ResNet / CBAM lineup): nothing to pair it with,
    so it ships whole, with the choice its lineup carried."""
    rec = export_record(result, arch=arch, recipe=recipe, classes=classes, weights_dir=weights_dir,
                        name=f"{arch}_{name}", weights=settings["weights"], input_size=settings["input_size"],
                        selection=dict(settings))
    return [f"exported {rec.file} ({rec.sha256[:12]}, {settings['weights']} weights at {rec.input_size} px as "
            f"carried from lineup {settings['carried_from']['pair']}) to {weights_dir}; show it beside the pair "
            f"with add-lineup"]


def _export_final_half(arch: str, result: TrainResult, settings: Mapping[str, Any], *, recipe: Recipe,
                       classes: list[str], weights_dir: Path, name: str) -> list[str]:
    """One model of a final lineup alone: the carried weight kind only, marked as a half."""
    kind = settings["weights"]
    rec = export_record(result, arch=arch, recipe=recipe, classes=classes, weights_dir=weights_dir,
                        name=f"{arch}_{name}_{kind}", weights=kind, input_size=settings["input_size"],
                        training_extra={"half": kind, "holdout_digest": holdout_digest(()),
                                        "settings_from": dict(settings)})
    return [f"exported half {rec.file} ({rec.sha256[:12]}, {kind} weights at {rec.input_size} px as chosen by "
            f"{settings['carried_from']['pair']}) to {weights_dir}", _pair_it_later(weights_dir)]


def _export_together(results: Mapping[str, TrainResult], half: Half | None, scores: Mapping[str, Any],
                     settings: Mapping[str, Any] | None, *, recipe: Recipe, classes: list[str], weights_dir: Path,
                     name: str) -> list[str]:
    """Every model with one choice (made now on the held-out scores, or carried), then the lineup."""
    lines = []
    choice = dict(settings) if settings is not None else None
    if recipe.holdout > 0:
        choice = choose_for_lineup({**scores, **({half.arch: half.scores} if half else {})},
                                   kinds=[k for k in WEIGHT_KINDS if not half or k in half.records])
        lines.append(f"held-out choice: {choice['weights']} weights at {choice['input_size']} px "
                     f"(mean held-out top-1 {choice['mean_holdout_top1']:.4f})")
    for arch, result in results.items():
        selection = {**choice, **({"scores": scores[arch]} if arch in scores else {})} if choice else None
        rec = export_record(result, arch=arch, recipe=recipe, classes=classes, weights_dir=weights_dir,
                            name=f"{arch}_{name}", weights=selection["weights"] if selection else "raw",
                            input_size=selection["input_size"] if selection else None, selection=selection)
        lines.append(f"exported {rec.file} ({rec.sha256[:12]}, {rec.input_size} px) to {weights_dir}")
    if half is not None:
        rec = _copy_half(half, choice, weights_dir=weights_dir, name=name)
        lines.append(f"copied {half.records[choice['weights']].file} from {half.weights_dir} as {rec.file} "
                     f"({rec.input_size} px)")
    archs = [*results, *([half.arch] if half else [])]
    if len(archs) > 1:
        lines.append(write_lineup(weights_dir, archs, name=name))
    return lines


def write_lineup(weights_dir: str | os.PathLike, archs: Sequence[str], *, name: str) -> str:
    """Set the exported ``<arch>_<name>`` records as the folder's default lineup; return a line saying so.

    The reference is the plain network (the first architecture that is its own backbone, else the
    first one) and comes first; the lineup is named ``<reference arch>-<name>``. A plain ResNet
    beside exactly one CBAM twin is also written as a ``pairs`` entry, the form older readers know.
    """
    plain = [a for a in archs if backbone_of(a) == a]
    reference = plain[0] if plain else archs[0]
    members = [f"{a}_{name}" for a in [reference, *(a for a in archs if a != reference)]]
    lineup = f"{reference}-{name}"
    update_manifest(weights_dir, lineup=(lineup, {"members": members, "reference": members[0], "default": True}))
    cbam = [a for a in archs if a.endswith("_cbam")]
    if len(archs) == 2 and len(plain) == 1 and len(cbam) == 1:
        update_manifest(weights_dir, pair=(lineup, {"baseline": members[0], "cbam": members[1], "default": True}))
    return (f"lineup {lineup!r} ({', '.join(members)}; reference {members[0]}) set as the default in "
            f"{Path(weights_dir) / 'manifest.json'}")
