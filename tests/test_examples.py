"""The app's examples: one Imagenette val photo per class, credited, shipped, and classified right.

The photos are the only dataset images the project ships (Apache-2.0, the dataset's LICENSE beside
them); each must be credited in the README by its file and its original name, and the shipped
lineup must get each one right (that is why it was picked). Without shipped weights the last test
skips locally and fails under ``CI=true``, as the shipped-weights tests do.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from cbam_viz.app import examples
from cbam_viz.engine.lineup import load_lineup
from cbam_viz.engine.preprocess import open_image, to_model_tensor
from cbam_viz.models.weights import DEFAULT_WEIGHTS_DIR, read_manifest

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "examples" / "imagenette"
IN_CI = os.environ.get("CI", "").strip().lower() == "true"


def test_one_small_photo_per_class_with_the_dataset_licence():
    assert examples.imagenette_dir() == FOLDER  # this test runs from a checkout
    files = [file for file, _, _ in examples.IMAGENETTE_EXAMPLES]
    wnids = [original.split("/")[0] for _, _, original in examples.IMAGENETTE_EXAMPLES]
    assert len(files) <= 10 and len(set(wnids)) == len(wnids), "at most one photo per class"
    assert sorted(p.name for p in FOLDER.glob("*.JPEG")) == sorted(files), "every shipped photo is listed"
    for file in files:
        path = FOLDER / file
        assert path.stat().st_size < 100_000, f"{file} is not a small example"
        with Image.open(path) as im:
            assert im.format == "JPEG" and min(im.size) >= 64
    assert "Apache License" in (FOLDER / "LICENSE").read_text() and "Version 2.0" in (FOLDER / "LICENSE").read_text()


def test_every_photo_is_credited_in_the_readme_by_its_file_and_original_name():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "Apache-2.0" in readme and "examples/imagenette/LICENSE" in readme
    for file, _, original in examples.IMAGENETTE_EXAMPLES:
        assert f"`{file}`" in readme, f"README does not credit {file}"
        assert original.split("/")[1] in readme, f"README does not name {file}'s Imagenette val file"


def test_the_class_names_are_the_shipped_models_classes():
    manifest = read_manifest(DEFAULT_WEIGHTS_DIR)
    if not manifest["models"]:
        pytest.skip("no shipped weights")
    for record in manifest["models"].values():
        by_id = {c["id"]: c["name"] for c in record["classes"]}
        if set(by_id) != {original.split("/")[0] for _, _, original in examples.IMAGENETTE_EXAMPLES}:
            continue  # a model of other classes (a user's own folder)
        for _, name, original in examples.IMAGENETTE_EXAMPLES:
            assert by_id[original.split("/")[0]] == name


def test_the_photos_come_first_and_a_missing_one_is_left_out(tmp_path, monkeypatch):
    folder = tmp_path / "imagenette"
    folder.mkdir()
    for file in ("church.JPEG", "tench.JPEG"):
        (folder / file).write_bytes((FOLDER / file).read_bytes())
    monkeypatch.setattr(examples, "imagenette_dir", lambda: folder)
    monkeypatch.setenv("CBAM_VIZ_EXAMPLES_DIR", str(tmp_path / "drawn"))
    shown = examples.list_examples()
    assert [e.path for e in shown[:2]] == [folder / "tench.JPEG", folder / "church.JPEG"]  # in class order
    assert [e.caption for e in shown[:2]] == ["Tench (Imagenette val photo)", "Church (Imagenette val photo)"]
    assert all("Imagenette" not in e.caption for e in shown[2:]) and len(shown) > 2  # the unfamiliar ones follow
    assert (tmp_path / "drawn" / "generated_shapes.png").is_file()


def test_the_shipped_lineup_gets_every_photo_right():
    if not read_manifest(DEFAULT_WEIGHTS_DIR)["models"]:
        if IN_CI:
            pytest.fail("CI=true but no weights ship")
        pytest.skip("no shipped weights")
    lineup = load_lineup(weights_dir=DEFAULT_WEIGHTS_DIR, device="cpu")
    for file, name, _ in examples.IMAGENETTE_EXAMPLES:
        image = open_image(FOLDER / file)
        for member in lineup.members:
            x = to_model_tensor(image, member.input_size, member.mean, member.std)
            with member.lock, torch.no_grad():
                top1 = int(member.model(x).argmax(1))
            assert member.classes[top1] == name, f"{member.name} calls {file} a {member.classes[top1]}"
