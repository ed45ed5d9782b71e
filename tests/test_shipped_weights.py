"""The weights that ship in ``weights/``: every record is checked against its file and its model.

(torchvision ``test/test_extended_models.py`` does the same for its ``Weights`` enums.) Without a
manifest these tests skip locally, but fail under ``CI=true``: a release must ship weights.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from cbam_viz.models import is_model
from cbam_viz.models.weights import DEFAULT_WEIGHTS_DIR, WeightRecord, load_record, read_manifest, sha256_file

WEIGHTS_DIR = DEFAULT_WEIGHTS_DIR
MANIFEST = WEIGHTS_DIR / "manifest.json"
MAX_FILE_BYTES = 25_000_000  # 25 MB per file
NUM_CLASSES = 10
IN_CI = os.environ.get("CI", "").strip().lower() == "true"

_DATA = read_manifest(WEIGHTS_DIR) if MANIFEST.exists() else {"models": {}, "pairs": {}}
RECORDS = sorted(_DATA["models"])
PAIRS = sorted(_DATA["pairs"])


def _record(name: str) -> WeightRecord:
    return WeightRecord(**_DATA["models"][name])


def test_manifest_ships():
    if not MANIFEST.exists():
        msg = f"{MANIFEST} does not exist yet (train and export: python -m cbam_viz train --export weights)"
        if IN_CI:
            pytest.fail(f"CI=true but {msg}; the weights must ship")
        pytest.skip(msg)
    assert RECORDS, f"{MANIFEST} lists no models"
    assert PAIRS, f"{MANIFEST} lists no pair for the app to show"


@pytest.mark.parametrize("name", RECORDS)
def test_record_fields(name):
    rec = _record(name)
    assert rec.name == name
    assert is_model(rec.arch), f"{name}: unknown architecture {rec.arch!r}"
    assert len(rec.classes) == NUM_CLASSES
    ids = [c.get("id") for c in rec.classes]
    names = [c.get("name") for c in rec.classes]
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == NUM_CLASSES
    assert all(isinstance(n, str) and n.strip() for n in names) and len(set(names)) == NUM_CLASSES
    # readable: a name is words, not the WordNet id again
    assert all(n != i for n, i in zip(names, ids)), f"{name}: class names are ids"
    for field in ("mean", "std"):
        values = getattr(rec, field)
        assert len(values) == 3 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
    assert all(0.0 <= v <= 1.0 for v in rec.mean) and all(v > 0 for v in rec.std)
    assert isinstance(rec.input_size, int) and 32 <= rec.input_size <= 1024


@pytest.mark.parametrize("name", RECORDS)
def test_file_checksum_size_and_strict_load(name):
    rec = _record(name)
    path = WEIGHTS_DIR / rec.file
    assert path.exists(), f"{path} is listed in the manifest but missing"
    size = path.stat().st_size
    assert size <= MAX_FILE_BYTES, f"{path} is {size / 1e6:.1f} MB > {MAX_FILE_BYTES / 1e6:.0f} MB"
    assert sha256_file(path) == rec.sha256, f"{path}: sha256 differs from the manifest"
    model = load_record(rec, WEIGHTS_DIR)  # strict
    assert sum(p.numel() for p in model.parameters()) == rec.num_params
    assert model.fc.out_features == NUM_CLASSES
    with torch.no_grad():
        out = model(torch.zeros(1, 3, rec.input_size, rec.input_size))
    assert out.shape == (1, NUM_CLASSES) and torch.isfinite(out).all()


@pytest.mark.parametrize("pair", PAIRS)
def test_pair_members_exist_and_match(pair):
    members = _DATA["pairs"][pair]
    assert set(members) >= {"baseline", "cbam"}
    for role in ("baseline", "cbam"):
        assert members[role] in _DATA["models"], f"pair {pair!r}: no record {members[role]!r}"
    base, cbam = _record(members["baseline"]), _record(members["cbam"])
    assert not base.arch.endswith("_cbam") and cbam.arch == f"{base.arch}_cbam"
    assert base.classes == cbam.classes
    assert (base.mean, base.std, base.input_size) == (cbam.mean, cbam.std, cbam.input_size)
    # the point of the pair: trained the same way
    assert base.recipe == cbam.recipe
