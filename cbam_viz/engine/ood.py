"""Does a photo show one of the model's classes at all? An out-of-distribution score per model.

A ten-class softmax trained with label smoothing is confident about anything: Grace Hopper gets
"French horn" at 71 %. Each model record can therefore carry statistics of its penultimate
(global-average-pooled) features, fitted once on its training split (:mod:`cbam_viz.research.ood_fit`), and
a threshold that accepts 95 % of its in-class validation images. At explanation time a forward
hook on ``avgpool`` (:func:`penultimate_features`) reads the features of the forward that the
explanation already runs: no extra pass. A record without statistics falls back to the "unsure"
rule on the softmax and says so.

Scores (higher = less like the training classes), compared in ``docs/out_of_distribution.md``:

* ``msp``: minus the maximum softmax probability (Hendrycks & Gimpel, ICLR 2017);
* ``energy``: minus ``logsumexp`` of the logits (Liu et al., NeurIPS 2020);
* ``mahalanobis``: the smallest Mahalanobis distance to a class mean under one shared covariance
  (Lee et al., NeurIPS 2018; penultimate layer only, no input perturbation);
* ``knn``: the distance of the L2-normalised feature to its k-th nearest neighbour in a
  subsampled bank of normalised training features (Sun et al., ICML 2022).

Statistics live in a small safetensors file beside the weights (``<record>.ood.safetensors``),
referenced, with its sha256, method and threshold, from the record's ``metrics["ood"]`` entry
(the threshold is a measured quantile of the validation scores, hence a metric). Nothing here
knows about pairs: every model record stands alone.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "METHODS", "ACCEPT", "FEATURE_LAYER", "STATS_SUFFIX", "UNSURE_PROB", "UNSURE_MARGIN", "OODStats",
    "NoStats", "penultimate_features", "feature_dim", "fit_stats", "calibrate", "save_stats",
    "load_stats", "record_entry", "assess", "warning", "verbose_note",
]

METHODS = ("msp", "energy", "mahalanobis", "knn")
#: Share of in-class validation images the threshold accepts.
ACCEPT = 0.95
#: The module whose output is the penultimate feature vector (torchvision / timm ResNets).
FEATURE_LAYER = "avgpool"
STATS_SUFFIX = ".ood.safetensors"
#: The fallback rule for records without statistics: the same as the app's "unsure" warning
#: (:data:`cbam_viz.service.UNSURE_PROB` / ``UNSURE_MARGIN``; a test keeps them equal).
UNSURE_PROB = 0.5
UNSURE_MARGIN = 0.15
_KNN_K = 10
_BANK_SIZE = 2048
_SHRINK = 1e-4  # covariance ridge, relative to its mean diagonal: a rank-deficient covariance still inverts


@dataclass(frozen=True, eq=False)
class OODStats:
    """Fitted statistics of one model: ``score`` (higher = less like its classes) and its threshold."""

    method: str
    threshold: float = math.nan                     # nan until :func:`calibrate`
    k: int = _KNN_K                                 # knn only
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)  # means+precision / bank

    def score(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float scores from ``(N, D)`` penultimate features and ``(N, K)`` logits."""
        logits = logits.detach().float().cpu()
        if self.method == "msp":
            return -torch.softmax(logits, dim=1).amax(dim=1)
        if self.method == "energy":
            return -torch.logsumexp(logits, dim=1)
        features = features.detach().float().cpu()
        if self.method == "mahalanobis":
            diff = features[:, None, :] - self.tensors["means"][None]          # (N, K, D)
            dist = torch.einsum("nkd,de,nke->nk", diff, self.tensors["precision"], diff)
            return dist.amin(dim=1)
        if self.method == "knn":
            z = nn.functional.normalize(features, dim=1)
            dist = torch.cdist(z, self.tensors["bank"].float())
            k = min(self.k, dist.shape[1])
            return dist.topk(k, dim=1, largest=False).values[:, -1]
        raise ValueError(f"unknown out-of-distribution method {self.method!r}; choose one of {', '.join(METHODS)}")

    def check_fits(self, dim: int | None, num_classes: int) -> None:
        """Raise ValueError with one sentence when these statistics cannot belong to such a model."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}")
        if not math.isfinite(self.threshold):
            raise ValueError("no finite threshold")
        need = {"mahalanobis": ("means", "precision"), "knn": ("bank",)}.get(self.method, ())
        for name in need:
            if name not in self.tensors:
                raise ValueError(f"the {self.method} statistics lack {name!r}")
        if self.method == "mahalanobis":
            means, prec = self.tensors["means"], self.tensors["precision"]
            if means.ndim != 2 or means.shape[0] != num_classes:
                raise ValueError(f"class means of shape {tuple(means.shape)} for a model of {num_classes} classes")
            if prec.shape != (means.shape[1], means.shape[1]):
                raise ValueError(f"a precision matrix of shape {tuple(prec.shape)} for {means.shape[1]} features")
        stat_dim = next((t.shape[-1] for t in self.tensors.values()), None)
        if dim is not None and stat_dim is not None and stat_dim != dim:
            raise ValueError(f"statistics of {stat_dim} features for a model with {dim}")


@dataclass(frozen=True)
class NoStats:
    """A model without usable statistics, and why (shown to the person, with the fallback)."""

    reason: str


# ------------------------------------------------------------------------------- features


@contextlib.contextmanager
def penultimate_features(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect ``(N, D)`` pooled features of every forward run inside the block (hook removed after).

    A model without an ``avgpool`` module yields a list that stays empty (its records fall back).
    """
    module = dict(model.named_modules()).get(FEATURE_LAYER)
    captured: list[torch.Tensor] = []
    if module is None:
        yield captured
        return

    def hook(_module, _args, output):
        captured.append(output.detach().flatten(1).float().cpu())

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def feature_dim(model: nn.Module) -> int | None:
    """Width of the penultimate features (the classifier's input), or None if unknown."""
    fc = getattr(model, "fc", None)
    return int(fc.in_features) if isinstance(fc, nn.Linear) else None


# ------------------------------------------------------------------------------- fitting


def fit_stats(method: str, features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
              k: int = _KNN_K, bank_size: int = _BANK_SIZE, seed: int = 0) -> OODStats:
    """Statistics of ``method`` from training features ``(N, D)`` and labels ``(N,)`` (no threshold yet).

    Raises:
        ValueError: an unknown method, or a class without any training feature (Mahalanobis).
    """
    if method not in METHODS:
        raise ValueError(f"unknown out-of-distribution method {method!r}; choose one of {', '.join(METHODS)}")
    features = features.detach().double().cpu()
    labels = torch.as_tensor(labels).long().cpu()
    tensors: dict[str, torch.Tensor] = {}
    if method == "mahalanobis":
        counts = torch.bincount(labels, minlength=num_classes)
        if (counts == 0).any():
            missing = [int(i) for i in torch.nonzero(counts == 0).flatten()]
            raise ValueError(f"no training image of class index {missing[:5]}: cannot fit class means")
        means = torch.zeros(num_classes, features.shape[1], dtype=torch.float64).index_add_(0, labels, features)
        means /= counts[:, None]
        centred = features - means[labels]
        cov = centred.T @ centred / len(features)
        cov += _SHRINK * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
        tensors = {"means": means.float(), "precision": torch.linalg.inv(cov).float()}
    elif method == "knn":
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(features), generator=g)[:bank_size].sort().values
        tensors = {"bank": nn.functional.normalize(features[pick], dim=1).half()}
    return OODStats(method=method, k=int(k), tensors=tensors)


def calibrate(stats: OODStats, features: torch.Tensor, logits: torch.Tensor, *, accept: float = ACCEPT) -> OODStats:
    """The same statistics with the threshold that accepts ``accept`` of these (in-class) images."""
    scores = stats.score(features, logits).double()
    return replace(stats, threshold=float(torch.quantile(scores, accept)))


# ------------------------------------------------------------------------------- files


def save_stats(stats: OODStats, path: str | os.PathLike) -> str:
    """Write the statistics' tensors (atomically; an empty file for msp / energy); return its sha256."""
    from safetensors.torch import save

    from cbam_viz.outputs import atomic_write_bytes
    from cbam_viz.models.weights import sha256_file

    tensors = {k: v.contiguous() for k, v in stats.tensors.items()}
    meta = {"method": stats.method, "k": str(stats.k)}
    atomic_write_bytes(Path(path), save(tensors, metadata=meta))
    return sha256_file(path)


def record_entry(stats: OODStats, file: str, sha256: str, **info: Any) -> dict[str, Any]:
    """The record's ``metrics["ood"]`` entry: method, threshold, k, the file and its sha256, plus ``info``."""
    return {"method": stats.method, "threshold": stats.threshold, "k": stats.k, "accept": ACCEPT,
            "file": file, "sha256": sha256, **info}


def load_stats(record, weights_dir: str | os.PathLike, model: nn.Module) -> OODStats | NoStats:
    """The record's statistics, checked against its file and its model; never raises.

    Returns :class:`NoStats` with a reason when the record has none, the file is missing or
    altered, or the statistics do not fit the model (feature width, class count).
    """
    from safetensors.torch import load_file

    from cbam_viz.models.weights import sha256_file

    entry = (getattr(record, "metrics", None) or {}).get("ood")
    if not entry:
        return NoStats(f"the record {record.name!r} has no fitted out-of-distribution statistics")
    try:
        threshold = entry.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"its threshold {threshold!r} is not a finite number")
        path = Path(weights_dir) / entry["file"]
        if not path.is_file():
            raise ValueError(f"its statistics file {path.name} is missing")
        if sha256_file(path) != entry["sha256"]:
            raise ValueError(f"its statistics file {path.name} does not match the sha256 in the record")
        stats = OODStats(method=entry["method"], threshold=float(threshold), k=int(entry.get("k", _KNN_K)),
                         tensors=load_file(str(path)))
        stats.check_fits(feature_dim(model), len(record.classes))
    except (KeyError, TypeError, ValueError, OSError, RuntimeError) as err:
        what = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        return NoStats(f"the out-of-distribution statistics of {record.name!r} are unusable ({what})")
    return stats


# ------------------------------------------------------------------------------- results


def assess(stats: OODStats | NoStats | None, features: list[torch.Tensor], logits: torch.Tensor) -> list[dict[str, Any]]:
    """One ``out_of_distribution`` dict per image: ``score``, ``threshold``, ``flagged``, ``method``.

    ``features``: what :func:`penultimate_features` captured (the first forward's are used). Without
    statistics (or features), ``flagged`` is the "unsure" rule's verdict, ``score`` and
    ``threshold`` are None and ``fallback`` says why.
    """
    logits = logits.detach().float().cpu()
    n = logits.shape[0]
    feats = next((f for f in features if f.shape[0] == n), None)
    if isinstance(stats, OODStats) and (feats is not None or stats.method in ("msp", "energy")):
        scores = stats.score(feats if feats is not None else torch.zeros(n, 0), logits).tolist()
        return [{"method": stats.method, "score": float(s), "threshold": stats.threshold,
                 "flagged": bool(s > stats.threshold)} for s in scores]
    reason = stats.reason if isinstance(stats, NoStats) else (
        "no fitted out-of-distribution statistics" if stats is None else "the model's features were not captured")
    top = torch.softmax(logits, dim=1).topk(min(2, logits.shape[1]), dim=1).values
    out = []
    for row in top.tolist():
        second = row[1] if len(row) > 1 else 0.0
        unsure = row[0] < UNSURE_PROB or row[0] - second < UNSURE_MARGIN
        out.append({"method": "unsure rule", "score": None, "threshold": None, "flagged": bool(unsure),
                    "fallback": f"{reason}; the unsure rule (top-1 under {UNSURE_PROB:.0%} or a margin under "
                                f"{UNSURE_MARGIN:.0%}) decides instead"})
    return out


def _and(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def warning(results: Mapping[str, Mapping[str, Any] | None], classes_text: str) -> list[str]:
    """Plain sentences for the page and the JSON's warnings, from each model's result (title -> dict).

    One sentence when models find the photo unlike their classes (the heatmaps stay, with that
    caveat), one when a model has no statistics and falls back.
    """
    flagged = [t for t, r in results.items() if r and r.get("score") is not None and r.get("flagged")]
    fallback = [t for t, r in results.items() if r and r.get("score") is None]
    out = []
    if flagged:
        who = _and([f"the {t} model" for t in flagged])
        out.append(f"This photo looks unlike the classes the models know: {who} "
                   f"{'finds' if len(flagged) == 1 else 'find'} it farther from its training images than "
                   f"{ACCEPT:.0%} of its validation photos. {classes_text}; the predictions below may name a "
                   "class the photo does not show, and the heatmaps explain that guess, not the photo's content.")
    if fallback:
        who = _and([f"the {t} model" for t in fallback])
        out.append(f"No out-of-distribution check for {who} (no fitted statistics): only the unsure rule "
                   "flags photos unlike its classes; fit them with `python -m cbam_viz fit-ood --data FOLDER`.")
    return out


def verbose_note(results: Mapping[str, Mapping[str, Any] | None]) -> str:
    """The CLI's ``-v`` words about the photo (title -> result): ``""`` when every model accepts it."""
    parts = []
    for title, r in results.items():
        if not r:
            continue
        if r.get("score") is None:
            if r.get("flagged"):
                parts.append(f"{title} unsure (no OOD statistics: unsure rule)")
        elif r.get("flagged"):
            parts.append(f"{title} finds it unlike its classes (OOD score {r['score']:.3g} > {r['threshold']:.3g})")
    return "; ".join(parts) + ": its labels and heatmaps explain a guess" if parts else ""
