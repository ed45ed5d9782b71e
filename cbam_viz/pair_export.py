"""Export finished training runs as a pair, whole or one half at a time.

A pair is two models trained with one recipe (only the architecture differs) that ship with one
held-out choice of weights (raw or EMA) and input size (:func:`cbam_viz.holdout.choose_for_pair`).
On these CPUs one model of the pair can take most of a session, and a run's checkpoint may not
outlive the session, so a pair may be trained in two sessions:

1. ``train --arch resnet18_cbam --export DIR`` with one architecture writes a *half*: both weight
   kinds (``<arch>_<name>_raw`` and ``<arch>_<name>_ema``; raw only with ``--ema-decay 0``) with their held-out scores at every
   candidate size, so the pair's choice can still be made later, on the same held-out files.
2. ``train --arch resnet18 --export weights --pair-with DIR`` checks that the half was trained with
   the same recipe on the same held-out files, makes the pair's choice over both models' scores,
   exports the new run and copies the half's chosen file, and sets the pair.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cbam_viz.holdout import WEIGHT_KINDS, choose_for_pair, holdout_scores
from cbam_viz.train import Recipe, TrainResult, export, recipe_differences
from cbam_viz.weights import WeightRecord, read_manifest, sha256_file, update_manifest

__all__ = ["Half", "holdout_digest", "read_half", "export_runs"]


def holdout_digest(files: Sequence[str]) -> str:
    """sha256 of the held-out file names: two runs can only be paired if they held out the same files."""
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()


@dataclass(frozen=True)
class Half:
    """One model of a pair, exported alone: a record per weight kind and the held-out scores of both."""

    arch: str
    records: Mapping[str, WeightRecord]  # kind -> record
    scores: Mapping[str, Any]  # holdout_scores() result covering every kind in records
    weights_dir: Path


def read_half(weights_dir: str | os.PathLike, *, name: str, recipe: Recipe, holdout_files: Sequence[str] | None,
              other_than: Sequence[str]) -> Half:
    """The half in ``weights_dir`` whose architecture is not in ``other_than``, checked against this run.

    ``holdout_files=None`` skips the held-out files check (before training, when they are not read yet).

    Raises:
        ValueError: no half, more than one, or one made with another recipe or other held-out files
            (its scores would then not be comparable with this run's).
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
    for rec in records.values():
        path = weights_dir / rec.file
        if not path.is_file() or sha256_file(path) != rec.sha256:
            raise ValueError(f"--pair-with: {path} is missing or does not match its sha256 in the manifest")
    return Half(arch, records, first.training["selection"]["scores"], weights_dir)


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
    training = {k: v for k, v in source.training.items() if k not in ("half", "selection")}
    record = replace(source, name=record_name, file=file, input_size=choice["input_size"],
                     training={**training, "selection": {**choice, "scores": half.scores}})
    update_manifest(weights_dir, record=record)
    return record


def export_runs(results: Mapping[str, TrainResult], *, recipe: Recipe, classes: list[str], data_dir,
                weights_dir: str | os.PathLike, name: str, sizes: Sequence[int] | None = None,
                pair_with: str | os.PathLike | None = None) -> list[str]:
    """Export finished runs (all with ``recipe``) to ``weights_dir``; return what was done, a line each.

    With a baseline and a CBAM model (trained now, or one of them read from ``pair_with``) the pair
    is exported with one held-out choice and set as the default. One architecture alone, with no
    ``pair_with``, is exported as a half (each weight kind it has), to be paired later.

    Raises:
        ValueError: ``pair_with`` holds no matching half (see :func:`read_half`).
    """
    weights_dir = Path(weights_dir)
    half = None
    if pair_with is not None:  # a half always held files out, so its recipe check covers holdout = 0 here
        any_run = next(iter(results.values()))
        half = read_half(pair_with, name=name, recipe=recipe, holdout_files=any_run.holdout_files,
                         other_than=list(results))
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
        lines.append(f"pair it later: train the other architecture with the same options and "
                     f"--export weights --pair-with {weights_dir}")
        return lines
    choice = None
    if recipe.holdout > 0:
        choice = choose_for_pair({**scores, **({half.arch: half.scores} if half else {})},
                                 kinds=[k for k in WEIGHT_KINDS if not half or k in half.records])
        lines.append(f"held-out choice: {choice['weights']} weights at {choice['input_size']} px "
                     f"(mean held-out top-1 {choice['mean_holdout_top1']:.4f})")
    for arch, result in results.items():
        selection = {**choice, "scores": scores[arch]} if choice else None
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
