"""Export finished training runs as a pair, whole or one half at a time.

A pair is two models trained with one recipe (only the architecture differs) that ship with one
held-out choice of weights (raw or EMA) and input size (:func:`cbam_viz.training.holdout.choose_for_pair`).
On these CPUs one model of the pair can take most of a session, and a run's checkpoint may not
outlive the session, so a pair may be trained in two sessions:

1. ``train --arch resnet18_cbam --export DIR`` with one architecture writes a *half*: both weight
   kinds (``<arch>_<name>_raw`` and ``<arch>_<name>_ema``; raw only with ``--ema-decay 0``) with their held-out scores at every
   candidate size, so the pair's choice can still be made later, on the same held-out files.
2. ``train --arch resnet18 --export weights --pair-with DIR`` checks that the half was trained with
   the same recipe on the same held-out files, makes the pair's choice over both models' scores,
   exports the new run and copies the half's chosen file, and sets the pair.

A *final* pair retrains a recipe whose choice is already made on every training file
(``--holdout 0 --settings-from weights``): the usual last step once the held-out split has done its
job, worth 8.7 % more training images. Nothing is held out, so nothing is re-chosen: the run ships
with the (weights, input size) the earlier pair of the same recipe chose on its held-out files
(:func:`carried_settings`), and its halves carry that choice so both of them ship with it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cbam_viz.training.holdout import WEIGHT_KINDS, choose_for_pair, holdout_scores
from cbam_viz.models import backbone_of
from cbam_viz.training.train import Recipe, TrainResult, export, json_differences, recipe_differences
from cbam_viz.weights import WeightRecord, read_manifest, sha256_file, update_manifest

__all__ = ["Half", "holdout_digest", "read_half", "carried_settings", "export_runs"]



def holdout_digest(files: Sequence[str]) -> str:
    """sha256 of the held-out file names: two runs can only be paired if they held out the same files."""
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()


@dataclass(frozen=True)
class Half:
    """One model of a pair, exported alone: a record per weight kind and the held-out scores of both."""

    arch: str
    records: Mapping[str, WeightRecord]  # kind -> record
    scores: Mapping[str, Any] | None  # holdout_scores() over every kind in records; None: nothing held out
    weights_dir: Path


def read_half(weights_dir: str | os.PathLike, *, name: str, recipe: Recipe, holdout_files: Sequence[str] | None,
              other_than: Sequence[str], settings: Mapping[str, Any] | None = None) -> Half:
    """The half in ``weights_dir`` whose architecture is not in ``other_than``, checked against this run.

    ``holdout_files=None`` skips the held-out files check (before training, when they are not read yet).
    ``settings``: this run's :func:`carried_settings` (a final pair); the half must carry the same.

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
                         f"({'; '.join(recipe_differences(saved, recipe))}); a pair shares one recipe")
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
                     pair: str | None = None) -> dict[str, Any]:
    """The (weights, input size) that ``pair`` of ``weights_dir`` chose on its held-out files, for a final run.

    A final run trains on every training file (``recipe.holdout == 0``), so it cannot choose for
    itself; it may take the choice of a pair trained with the same recipe in every other field, on
    the same architectures. Checked here, before any training.

    Args:
        pair: the pair whose choice is taken (default: the folder's default pair).

    Returns:
        ``{"weights": kind, "input_size": S, "rule": ..., "carried_from": {...}}``: the choice, and
        where it came from: the pair, its records' sha256, how many files it held out, and the
        held-out scores and rule behind its choice (those of the *earlier* models, so kept apart).

    Raises:
        ValueError: this run holds files out, or the folder has no such pair, or its pair was trained
            with another recipe or other architectures, or made no held-out choice.
    """
    from cbam_viz.pair import default_pair_name

    where = f"--settings-from {str(weights_dir)!r}"
    if recipe.holdout > 0:
        raise ValueError(f"{where} is for a final run on every training file (--holdout 0); a run that holds "
                         f"{recipe.holdout:g} of them out makes its own choice on them")
    try:
        manifest = read_manifest(weights_dir)
        pairs = manifest["pairs"]
        pair = pair or default_pair_name(weights_dir)
        if pair not in pairs:
            raise ValueError(f"no pair {pair!r} (known: {', '.join(sorted(pairs)) or 'none'})")
        records = [WeightRecord(**manifest["models"][pairs[pair][role]]) for role in ("baseline", "cbam")]
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: no readable pair in its manifest ({err})") from None
    backbones = {backbone_of(r.arch) for r in records}
    if not {backbone_of(a) for a in archs} <= backbones:
        raise ValueError(f"{where}: pair {pair!r} is {' and '.join(r.arch for r in records)}, not "
                         f"{', '.join(archs)}: its choice was made for other models")
    for rec in records:
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
    choices = [{k: v for k, v in r.training["selection"].items() if k != "scores"} for r in records]
    if any(c != choices[0] for c in choices) or any(r.input_size != choices[0]["input_size"] for r in records):
        raise ValueError(f"{where}: the records of pair {pair!r} disagree on their held-out choice")
    chosen = choices[0]
    if "carried_from" in chosen:  # a final pair: pass on the choice it carried, and say whence it came
        origin = chosen["carried_from"]
        newcomers = sorted(set(archs) - {r.arch for r in records})
        return {"weights": chosen["weights"], "input_size": chosen["input_size"],
                "rule": f"carried over from pair {pair!r} (trained on every training file), which carried it from "
                        f"pair {origin.get('pair')!r}'s choice on its {origin.get('holdout_images')} held-out training "
                        f"files; this run trained on every training file with the same recipe"
                        + (f" ({', '.join(newcomers)}: same backbone, other attention)" if newcomers else ""),
                "carried_from": {"pair": pair, "records": {r.name: r.sha256 for r in records}, "holdout": 0.0,
                                 "holdout_images": 0, "via": origin}}
    images = records[0].training.get("holdout_images")
    return {"weights": chosen["weights"], "input_size": chosen["input_size"],
            "rule": f"carried over from pair {pair!r}, which chose it on its {images} held-out training files; "
                    f"this run trained on every training file with the same recipe",
            "carried_from": {"pair": pair, "records": {r.name: r.sha256 for r in records},
                             "holdout": Recipe.from_json(records[0].recipe).holdout, "holdout_images": images,
                             **{k: v for k, v in chosen.items() if k not in ("weights", "input_size")}}}


def _scores_of(results: Mapping[str, TrainResult], *, recipe: Recipe, data_dir, sizes) -> dict[str, Any]:
    scores = {}
    for arch, result in results.items():
        models = {"raw": result.model, **({"ema": result.ema_model} if result.ema_model is not None else {})}
        scores[arch] = holdout_scores(models, data_dir, result.holdout_files, mean=recipe.mean, std=recipe.std,
                                      **({"sizes": sizes} if sizes else {}))
    return scores


def _copy_half(half: Half, choice: Mapping[str, Any], *, weights_dir: Path, name: str) -> WeightRecord:
    """Copy the half's chosen weights into ``weights_dir`` as ``<arch>_<name>``, with the pair's choice."""
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

    With a baseline and a CBAM model (trained now, or one of them read from ``pair_with``) the pair
    is exported with one held-out choice and set as the default. One architecture alone, with no
    ``pair_with``, is exported as a half (each weight kind it has), to be paired later. A final
    run (nothing held out) with ``settings`` (:func:`carried_settings`) ships with that choice; alone,
    its half holds only the chosen weight kind.

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
    lines = []
    scores = _scores_of(results, recipe=recipe, data_dir=data_dir, sizes=sizes) if recipe.holdout > 0 else {}
    archs = [*results, *([half.arch] if half else [])]
    if len(archs) == 1 and recipe.holdout > 0:
        (arch, result), = results.items()
        kinds = [k for k in WEIGHT_KINDS if k in scores[arch]["scores"]]  # the kinds scored: raw only with --ema-decay 0
        own = choose_for_pair(scores)  # this model's own best, recorded for reference only
        digest = holdout_digest(result.holdout_files)
        for kind in kinds:
            rec = export(result, arch=arch, recipe=recipe, classes=classes, weights_dir=weights_dir,
                         name=f"{arch}_{name}_{kind}", weights=kind, input_size=own["input_size"],
                         selection={"scores": scores[arch], "own_choice": own},
                         training_extra={"half": kind, "holdout_digest": digest})
            lines.append(f"exported half {rec.file} ({rec.sha256[:12]}) to {weights_dir}")
        return [*lines, _pair_it_later(weights_dir)]
    if len(archs) == 1 and settings is not None and f"{archs[0]}_{name}" not in settings["carried_from"]["records"]:
        # A new member of the family (SE or BAM beside a ResNet / CBAM pair): nothing to pair it
        # with, so it ships whole, with the choice its pair carried.
        (arch, result), = results.items()
        rec = export(result, arch=arch, recipe=recipe, classes=classes, weights_dir=weights_dir,
                     name=f"{arch}_{name}", weights=settings["weights"], input_size=settings["input_size"],
                     selection=dict(settings))
        return [f"exported {rec.file} ({rec.sha256[:12]}, {settings['weights']} weights at {rec.input_size} px as "
                f"carried from pair {settings['carried_from']['pair']}) to {weights_dir}; show it beside the pair "
                f"with add-lineup"]
    if len(archs) == 1 and settings is not None:
        (arch, result), = results.items()
        kind = settings["weights"]
        rec = export(result, arch=arch, recipe=recipe, classes=classes, weights_dir=weights_dir,
                     name=f"{arch}_{name}_{kind}", weights=kind, input_size=settings["input_size"],
                     training_extra={"half": kind, "holdout_digest": holdout_digest(()), "settings_from": dict(settings)})
        return [f"exported half {rec.file} ({rec.sha256[:12]}, {kind} weights at {rec.input_size} px as chosen by "
                f"{settings['carried_from']['pair']}) to {weights_dir}", _pair_it_later(weights_dir)]
    choice = dict(settings) if settings is not None else None
    if recipe.holdout > 0:
        choice = choose_for_pair({**scores, **({half.arch: half.scores} if half else {})},
                                 kinds=[k for k in WEIGHT_KINDS if not half or k in half.records])
        lines.append(f"held-out choice: {choice['weights']} weights at {choice['input_size']} px "
                     f"(mean held-out top-1 {choice['mean_holdout_top1']:.4f})")
    for arch, result in results.items():
        selection = {**choice, **({"scores": scores[arch]} if arch in scores else {})} if choice else None
        rec = export(result, arch=arch, recipe=recipe, classes=classes, weights_dir=weights_dir,
                     name=f"{arch}_{name}", weights=selection["weights"] if selection else "raw",
                     input_size=selection["input_size"] if selection else None, selection=selection)
        lines.append(f"exported {rec.file} ({rec.sha256[:12]}, {rec.input_size} px) to {weights_dir}")
    if half is not None:
        rec = _copy_half(half, choice, weights_dir=weights_dir, name=name)
        lines.append(f"copied {half.records[choice['weights']].file} from {half.weights_dir} as {rec.file} "
                     f"({rec.input_size} px)")
    cbam = [a for a in archs if "cbam" in a]
    base = [a for a in archs if "cbam" not in a]
    if len(cbam) == 1 and len(base) == 1:
        pair = f"{base[0]}-{name}"
        update_manifest(weights_dir, pair=(pair, {"baseline": f"{base[0]}_{name}", "cbam": f"{cbam[0]}_{name}",
                                                  "default": True}))
        lines.append(f"pair {pair!r} set as the default in {weights_dir / 'manifest.json'}")
    return lines
