"""The research commands under ``torchrun --nproc_per_node 2`` (issue 31): two gloo processes share
the images and rank 0 writes the files one process writes, with the same numbers.

Each test runs its command once in this process (the one-process report) and once under torchrun
(one launch per command: they cost seconds), on a tiny lineup of four seeded ResNet-18s written
as a weights folder (plain = the reference, SE, CBAM, BAM: every kind of gate) and a few tiny
images (odd counts: uneven shards). Every file both runs write is compared: JSON value by value
(floats to 1e-5), npz arrays, Markdown text and PNG pixels, leaving out only what measures time
(``created``, ``seconds``, ``timings``, the Markdown's "Run time" line). ``--threads 1`` on both
sides: torchrun gives each rank one thread, and the reports record the count.

``evaluate-cams`` and ``sanity-check`` explain one image per forward (``--batch-size 1``) on both
sides: two ranks batch the images differently, and the float noise of another batch turns into a
stored CAM one level (of 255) off or a tie of a rank correlation broken the other way (2e-6 on a
mean of 0.1): as large as what a mix-up of images within a rank changes. With one image per forward
both sides compute the same numbers. ``ablate-gates`` and ``channel-profiles`` keep batches of 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbam_viz import distributed
from cbam_viz.cli import main
from cbam_viz.distributed import DistContext
from cbam_viz.models.weights import WeightRecord, save_safetensors, update_manifest
from cbam_viz.research import shards
from cbam_viz.training.evaluate import LabelledImages, spread_indices
from tests.conftest import TINY_CLASSES, make_model
from tests.synthetic import make_image_folder
from tests.test_distributed import free_port

pytestmark = pytest.mark.usefixtures("no_cbam_env")

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("resnet18", "resnet18_se", "resnet18_cbam", "resnet18_bam")
LINEUP = "tiny-four"
#: Keys whose values measure time: the only ones allowed to differ.
TIMING_KEYS = {"created", "seconds", "timings"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A weights folder with the four tiny members as the default lineup: 3 classes, 48 px (layer4 maps of
    2 x 2: at 32 px they are 1 x 1 and every CAM is flat)."""
    folder = tmp_path_factory.mktemp("weights")
    names = []
    for seed, arch in enumerate(ARCHS):
        model, name = make_model(arch, seed=seed), f"tiny-{arch}"
        digest = save_safetensors(model, folder / f"{name}.safetensors")
        update_manifest(folder, record=WeightRecord(
            name=name, file=f"{name}.safetensors", arch=arch, sha256=digest,
            num_params=sum(p.numel() for p in model.parameters()),
            classes=[{"id": f"c{i}", "name": c} for i, c in enumerate(TINY_CLASSES)],
            mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], input_size=48))
        names.append(name)
    update_manifest(folder, lineup=(LINEUP, {"members": names, "reference": names[0], "default": True}))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """9 images of 3 classes: shards of 5 and 4."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "val", ["c0", "c1", "c2"], per_class=3, size=(36, 30))


def _one_process(args: list[str], out: Path) -> None:
    before = torch.get_num_threads()
    try:
        assert main([*args, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(before)


def _two_processes(args: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
              and not k.startswith("CBAM_VIZ_")}, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           "-m", "cbam_viz", *args, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_same_json(a, b, where: str) -> None:
    """``b`` equals ``a`` value by value (floats to 1e-5), keys in the same order, timing keys left out."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for key in a:
            if key not in TIMING_KEYS:
                assert_same_json(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_json(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_same_files(one: Path, two: Path) -> list[str]:
    """The two folders hold the same files with the same contents (see the module docstring); their names."""
    names = sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    for name in names:
        a, b = one / name, two / name
        if a.suffix == ".json":
            assert_same_json(json.loads(a.read_text()), json.loads(b.read_text()), name)
        elif a.suffix == ".npz":
            with np.load(a) as x, np.load(b) as y:
                assert x.files == y.files, name
                for key in x.files:
                    assert x[key].dtype == y[key].dtype, f"{name}:{key}"
                    if x[key].dtype.kind not in "biuf":  # class ids and names
                        assert np.array_equal(x[key], y[key]), f"{name}:{key}"
                        continue
                    np.testing.assert_allclose(y[key].astype(np.float64), x[key].astype(np.float64), rtol=1e-5,
                                               atol=1e-6, err_msg=f"{name}:{key}")
        elif a.suffix == ".md":
            untimed = [[line for line in p.read_text().splitlines() if not line.startswith("Run time:")] for p in (a, b)]
            assert untimed[0] == untimed[1], name
        elif a.suffix == ".png":
            with Image.open(a) as x, Image.open(b) as y:
                assert np.array_equal(np.asarray(x), np.asarray(y)), name
        else:
            assert a.read_bytes() == b.read_bytes(), name
    return names


def _printed_once(two: subprocess.CompletedProcess) -> None:
    """Rank 0 alone prints the report and warns; rank 1 prints nothing."""
    assert two.stdout.count("wrote ") == 1, two.stdout[-2000:]
    assert two.stderr.count("untrained") <= 1, two.stderr[-2000:]


def test_evaluate_cams_on_two_processes_writes_the_one_process_report(weights, boxed_folder, tmp_path):
    """Each rank scores its share of every method's images (gradcam on the 6 boxed images; layercam
    on 1 of them: rank 1's share is empty) and of the spatial gates (CBAM's blocks, BAM's modules);
    rank 0 writes the report, the forest plot and every stored CAM."""
    data, boxes = boxed_folder
    args = ["evaluate-cams", "--data", str(data), "--boxes", str(boxes), "--weights", str(weights),
            "--methods", "gradcam", "layercam", "--method-limit", "layercam=1", "--batch-size", "1",
            "--n-boot", "200", "--threads", "1", "--no-progress"]
    _one_process(args, tmp_path / "one")
    two = _two_processes(args, tmp_path / "two")
    _printed_once(two)
    names = assert_same_files(tmp_path / "one", tmp_path / "two")
    assert names == ["cams.npz", "report.json", "report.md", "summary.png"]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["per_image"]["gradcam"]["index"] == list(range(6))
    assert report["per_image"]["layercam"]["index"] == spread_indices(6, 1).tolist() == [0]
    assert list(report["spatial_gates"]) == ["tiny-resnet18_cbam", "tiny-resnet18_bam"]


def test_ablate_gates_on_two_processes_writes_the_one_process_report(weights, images, tmp_path):
    """Mean ablation: every rank needs the gate means of all 9 images before it ablates (partial
    sums added up everywhere); rank 0 gathers each image's outcomes and bootstraps the drops."""
    args = ["ablate-gates", "--data", str(images), "--weights", str(weights), "--constant", "mean",
            "--batch-size", "2", "--threads", "1", "--no-progress"]
    _one_process(args, tmp_path / "one")
    two = _two_processes(args, tmp_path / "two")
    _printed_once(two)
    names = assert_same_files(tmp_path / "one", tmp_path / "two")
    assert [n for n in names if n.startswith("gate_means_")] == [
        "gate_means_tiny-resnet18_bam.npz", "gate_means_tiny-resnet18_cbam.npz", "gate_means_tiny-resnet18_se.npz"]
    report = json.loads((tmp_path / "two" / "gate_ablation.json").read_text())
    assert all(m["n"] == 9 for m in report["models"].values())


def test_channel_profiles_on_two_processes_write_the_one_process_files(weights, images, tmp_path):
    """Per-class sums of each rank's share, added up on rank 0: the profiles one process averages."""
    args = ["channel-profiles", "--data", str(images), "--weights", str(weights), "--batch-size", "2",
            "--threads", "1", "--no-progress"]
    _one_process(args, tmp_path / "one")
    two = _two_processes(args, tmp_path / "two")
    _printed_once(two)
    names = assert_same_files(tmp_path / "one", tmp_path / "two")
    assert len([n for n in names if n.endswith("profiles.npz")]) == 3  # SE, CBAM, BAM; the plain one skipped
    doc = json.loads((tmp_path / "two" / "channel_profiles.json").read_text())
    for folder in doc["folders"].values():
        member = json.loads((tmp_path / "two" / folder / "channel_profiles.json").read_text())
        assert member["counts"] == {"c0": 3, "c1": 3, "c2": 3}


def test_sanity_check_on_two_processes_writes_the_one_process_report(weights, images, tmp_path):
    """Each rank runs the seeded cascade on its share; rank 0 gathers per-image SSIM and rank
    correlations and bootstraps them as one process does."""
    args = ["sanity-check", "--data", str(images), "--weights", str(weights), "--methods", "gradcam",
            "--max-images", "5", "--batch-size", "1", "--threads", "1", "--no-progress"]
    _one_process(args, tmp_path / "one")
    two = _two_processes(args, tmp_path / "two")
    _printed_once(two)
    assert assert_same_files(tmp_path / "one", tmp_path / "two") == ["sanity.json", "sanity.md"]
    report = json.loads((tmp_path / "two" / "sanity.json").read_text())
    assert [m["n"] for m in report["models"].values()] == [5, 5, 5, 5]


def test_partial_sums_add_up_in_rank_order_and_a_rank_without_images_adds_nothing(monkeypatch):
    """What rank 0 does with the ranks' sums (the gather itself is torch's): nested sums added key
    by key, a block only some ranks saw kept, in the first rank's order; None on the other ranks."""
    parts = [{"n": 3, "sums": {"layer1.0": np.array([1.0, 2.0]), "layer2.0": np.array([5.0])}},
             {"n": 2, "sums": {"layer1.0": np.array([0.5, 0.5])}},
             {"n": 0, "sums": {}}]  # a rank whose share was empty
    monkeypatch.setattr(shards.distributed, "gather_ordered", lambda pairs, ctx: parts)
    total = shards.merge_partial_sums(parts[0], DistContext(rank=0, world=3))
    assert total["n"] == 5 and list(total["sums"]) == ["layer1.0", "layer2.0"]
    np.testing.assert_array_equal(total["sums"]["layer1.0"], [1.5, 2.5])
    np.testing.assert_array_equal(total["sums"]["layer2.0"], [5.0])
    np.testing.assert_array_equal(parts[0]["sums"]["layer1.0"], [1.0, 2.0])  # the ranks' own sums untouched
    monkeypatch.setattr(shards.distributed, "gather_ordered", lambda pairs, ctx: None)
    assert shards.merge_partial_sums(parts[1], DistContext(rank=1, world=3)) is None


def test_one_process_takes_every_image_and_gets_its_own_sums_back(tmp_path):
    labelled = LabelledImages(tmp_path, ("c0/a.png", "c0/b.png", "c1/c.png"), (0, 0, 1))
    assert shards.image_share(labelled, DistContext()) == (labelled, [0, 1, 2])
    second, mine = shards.image_share(labelled, DistContext(rank=1, world=2))
    assert mine == [1] and second.files == ("c0/b.png",) and second.labels == (0,)
    assert shards.merge_partial_sums({"n": 2}, DistContext()) == {"n": 2}
    assert distributed.gather_everywhere([(1, "b"), (0, "a")], DistContext()) == ["a", "b"]
