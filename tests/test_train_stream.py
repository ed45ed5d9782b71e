"""The streamed data path: batches decoded per step from the files equal the cached ones, and the choice
between the two is made by the cache's size against a memory budget, and printed with its reason."""
from __future__ import annotations

import pytest
import torch

from cbam_viz import cli
from cbam_viz.training.data import load_cached_split, scan_image_folder
from cbam_viz.training.recipe import Recipe
from cbam_viz.training.stream import (
    FileSplit, cached_batches, choose_data_path, format_bytes, parse_bytes, streamed_batches,
)
from cbam_viz.training.train import train
from tests.synthetic import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("n001", "n002", "n003")
RECIPE = Recipe(epochs=2, batch_size=8, sizes=((0, 32),), cache_size=40, eval_size=32, bf16=False, lr=0.02,
                holdout=0.12, ema_decay=0.9, cutmix_alpha=1.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("stream") / "train", CLASSES, per_class=9, size=(50, 37))


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_are_the_cached_batches(data, workers):
    cached = load_cached_split(data, 40, progress=False)
    files = FileSplit.from_scan(scan_image_folder(data))
    steps = [torch.tensor([5, 0, 26]), torch.tensor([13]), torch.tensor([7, 8, 9, 2])]
    streamed = list(streamed_batches(files, 40, steps, workers=workers))
    expected = list(cached_batches(cached.images, cached.labels, steps))
    assert len(streamed) == len(expected) == 3
    for (images, labels), (want_images, want_labels) in zip(streamed, expected):
        assert images.dtype == torch.uint8 and images.shape == want_images.shape
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_a_streamed_run_is_the_cached_run_and_says_why_it_streams(data, tmp_path, capsys):
    """Same weights to the bit (same pixels, same crops and mixing draws), the held-out split and the
    weight average included; the choice is printed with the estimate that made it."""
    cached = train("resnet18", data, tmp_path / "cached", recipe=RECIPE, cache_dir=tmp_path / "cache", progress=False)
    assert "training images: decoded once into memory (27 files x 40 x 40 x 3 bytes = 126.6 KB, within the" \
        in capsys.readouterr().out
    streamed = train("resnet18", data, tmp_path / "streamed", recipe=RECIPE, progress=False, workers=2,
                     cache_budget=100_000)
    printed = capsys.readouterr().out
    assert ("training images: streamed from the files (27 files x 40 x 40 x 3 bytes = 126.6 KB, over the 97.7 KB "
            "memory budget (--cache-budget))") in printed
    a, b = cached.model.state_dict(), streamed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = cached.ema_model.state_dict(), streamed.ema_model.state_dict()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert cached.holdout_files == streamed.holdout_files and len(cached.holdout_files) == 3
    assert [h["train_loss"] for h in cached.history] == [h["train_loss"] for h in streamed.history]
    assert not list((tmp_path / "streamed").glob("split-*")) and len(list((tmp_path / "cache").iterdir())) == 1


def test_the_choice_follows_the_budget_and_the_processes_on_this_machine():
    assert not choose_data_path(100, 10, budget=30_000).stream  # 100 x 10 x 10 x 3 = 30,000 bytes: fits
    assert choose_data_path(100, 10, budget=29_999).stream
    two = choose_data_path(100, 10, budget=30_000, copies=2)  # each process holds its own copy
    assert two.stream and "x 2 processes = 58.6 KB, over the 29.3 KB" in two.reason
    assert choose_data_path(1, 1, stream=True).reason == "--stream"
    forced = choose_data_path(10**9, 500, stream=False, budget=1)
    assert not forced.stream and forced.reason == "--no-stream"
    # ImageNet's training split at 144 px, as issue 31 puts it: ~80 GB, streamed under a 64 GB budget
    imagenet = choose_data_path(1_281_167, 144, budget=parse_bytes("64G"))
    assert imagenet.stream and "= 74.2 GB" in imagenet.reason


@pytest.mark.parametrize("text, expected", [("8G", 8 * 1024**3), ("512M", 512 * 1024**2), ("1.5T", int(1.5 * 1024**4)),
                                            ("123", 123), ("64 GB", 64 * 1024**3), ("2k", 2048)])
def test_memory_sizes_read_as_people_write_them(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "eight", "8X", "-1G", "1e9"])
def test_a_bad_memory_size_is_one_sentence(text):
    with pytest.raises(ValueError, match="a memory size is a number with an optional unit K, M, G or T"):
        parse_bytes(text)


def test_bytes_print_in_their_largest_unit():
    assert [format_bytes(n) for n in (512, 2048, 3 * 1024**3)] == ["512 B", "2.0 KB", "3.0 GB"]


def test_cli_refuses_a_bad_budget_before_any_work(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path), "--runs", str(tmp_path / "r"), "--cache-budget", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--cache-budget: a memory size is a number with an optional unit" in err
    assert not (tmp_path / "r").exists()


def test_cli_passes_the_data_path_options(monkeypatch, tmp_path):
    seen = {}

    def fake_train(arch, data, run_dir, *, recipe, **kwargs):
        seen.update(kwargs)
        from cbam_viz.training.train import TrainResult
        return TrainResult(run_dir, torch.nn.Identity())

    monkeypatch.setattr("cbam_viz.training.train.train", fake_train)
    argv = ["train", "--arch", "resnet18", "--data", str(tmp_path), "--runs", str(tmp_path), "--bf16", "off"]
    assert cli.main([*argv, "--stream", "--workers", "3", "--cache-budget", "2G"]) == 0
    assert (seen["stream"], seen["workers"], seen["cache_budget"], seen["sync_bn"]) == (True, 3, 2 * 1024**3, False)
    assert cli.main([*argv, "--no-stream"]) == 0 and seen["stream"] is False and seen["cache_budget"] is None
    assert cli.main(argv) == 0 and seen["stream"] is None

