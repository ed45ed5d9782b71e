"""ImageFolder scan, the decoded-tensor cache and batched augmentation, on a generated tiny dataset."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import cbam_viz.training.data as data
from cbam_viz.training.data import (
    load_cached_split, load_rgb, normalize, random_resized_crop_flip, resize_batch, scan_image_folder,
)
from tests.synthetic import make_image_folder

CLASSES = ("n001", "n002", "n003")


@pytest.fixture()
def folder(tmp_path):
    return make_image_folder(tmp_path / "train", CLASSES)


def test_scan_lists_classes_files_and_labels(folder):
    (folder / "n002" / "notes.txt").write_text("not an image")
    (folder / ".hidden").mkdir()
    scan = scan_image_folder(folder)
    assert scan.classes == CLASSES
    assert len(scan.files) == 48 and len(scan.labels) == 48
    assert scan.files[0] == "n001/img00.png" and scan.labels[0] == 0
    assert scan.labels.count(2) == 16
    assert not any(f.endswith(".txt") for f in scan.files)


def test_scan_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        scan_image_folder(tmp_path / "empty")


def test_load_rgb_converts_modes(tmp_path):
    Image.new("L", (5, 4), 128).save(tmp_path / "g.png")
    Image.new("P", (5, 4)).save(tmp_path / "p.png")
    for name in ("g.png", "p.png"):
        im = load_rgb(tmp_path / name)
        assert im.mode == "RGB" and im.size == (5, 4)


def test_cached_split_shapes_and_reuse(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = load_cached_split(folder, 24, cache_dir=cache, progress=False)
    assert ds.images.shape == (48, 3, 24, 24) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [i // 16 for i in range(48)]
    assert ds.classes == CLASSES and len(ds) == 48
    # class colour survives the decode: channel i dominates in class i
    means = ds.images.float().mean((2, 3))
    assert (means.argmax(1) == ds.labels).all()
    files = list(cache.iterdir())
    assert len(files) == 1

    # The second call must come from the cache file: decoding is made impossible.
    def boom(*a, **k):
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(data, "decode_images", boom)
    again = load_cached_split(folder, 24, cache_dir=cache, progress=False)
    assert torch.equal(again.images, ds.images) and again.files == ds.files

    # Another size is another cache entry.
    with pytest.raises(AssertionError, match="decoded again"):
        load_cached_split(folder, 16, cache_dir=cache, progress=False)


def test_edited_dataset_invalidates_cache(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load_cached_split(folder, 16, cache_dir=cache, progress=False)
    calls = []
    real = data.decode_images
    monkeypatch.setattr(data, "decode_images", lambda *a, **k: calls.append(1) or real(*a, **k))

    load_cached_split(folder, 16, cache_dir=cache, progress=False)
    assert calls == []
    Image.new("RGB", (40, 48), (255, 0, 0)).save(folder / "n001" / "new.png")  # a file added
    ds = load_cached_split(folder, 16, cache_dir=cache, progress=False)
    assert calls == [1] and len(ds) == 49
    (folder / "n003" / "img00.png").unlink()  # a file removed
    ds = load_cached_split(folder, 16, cache_dir=cache, progress=False)
    assert calls == [1, 1] and len(ds) == 48
    Image.new("RGB", (40, 48), (0, 0, 0)).save(folder / "n002" / "img05.png")  # a file rewritten
    ds = load_cached_split(folder, 16, cache_dir=cache, progress=False)
    assert calls == [1, 1, 1]
    assert ds.images[ds.files.index("n002/img05.png")].max() == 0


def test_normalize_and_resize():
    x = torch.randint(0, 256, (2, 3, 10, 12), dtype=torch.uint8)
    a = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    b = normalize(x.float() / 255, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.testing.assert_close(a, b)
    assert a.dtype == torch.float32
    assert resize_batch(b, 7).shape == (2, 3, 7, 7)
    assert resize_batch(b, 7).shape == resize_batch(resize_batch(b, 7), 7).shape


def _ramp(b=32, size=24):
    """Each pixel's red value is its column: flips reverse it, crops shrink its range."""
    col = torch.linspace(0, 1, size)
    img = torch.zeros(b, 3, size, size)
    img[:, 0] = col.view(1, 1, size)
    img[:, 1] = torch.linspace(0, 1, size).view(1, size, 1)
    return img


def test_random_resized_crop_flip_shapes_and_determinism():
    x = _ramp(8, 24)
    out = random_resized_crop_flip(x, 16, generator=torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32
    again = random_resized_crop_flip(x, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    other = random_resized_crop_flip(x, 16, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out, other)


def test_flip_happens_about_half_the_time():
    x = _ramp(64, 24)
    out = random_resized_crop_flip(x, 24, generator=torch.Generator().manual_seed(0), scale=(1.0, 1.0),
                                   ratio=(1.0, 1.0))
    red = out[:, 0, 12]  # one row of the red ramp
    increasing = (red[:, -1] > red[:, 0])
    flipped = (~increasing).sum().item()
    assert 16 <= flipped <= 48
    # full-image "crops" are the image itself or its mirror
    torch.testing.assert_close(out[increasing], x[increasing], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[~increasing], x[~increasing].flip(-1), atol=1e-5, rtol=0)
    no_flip = random_resized_crop_flip(x, 24, generator=torch.Generator().manual_seed(0), scale=(1.0, 1.0),
                                       ratio=(1.0, 1.0), flip=False)
    torch.testing.assert_close(no_flip, x, atol=1e-5, rtol=0)


def test_crop_happens_and_respects_scale():
    x = _ramp(64, 24)
    out = random_resized_crop_flip(x, 24, generator=torch.Generator().manual_seed(0), scale=(0.25, 0.25),
                                   ratio=(1.0, 1.0), flip=False)
    # a quarter of the area at aspect 1 is half the width and half the height of the ramp
    red_span = out[:, 0].amax((1, 2)) - out[:, 0].amin((1, 2))
    green_span = out[:, 1].amax((1, 2)) - out[:, 1].amin((1, 2))
    assert (red_span < 0.6).all() and (red_span > 0.4).all()
    assert (green_span < 0.6).all() and (green_span > 0.4).all()
    # the crop positions vary
    assert out[:, 0].mean((1, 2)).std() > 0.05


def test_load_rgb_honours_exif_orientation_like_the_app(tmp_path):
    """A phone photo stored sideways (EXIF orientation 6) is loaded upright, as the app shows it, so
    training, evaluation and the quality report measure what a user sees."""
    from cbam_viz.engine.preprocess import open_image

    img = Image.new("RGB", (40, 20), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, 10, 20))  # a blue band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "sideways.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_rgb(tmp_path / "sideways.jpg")
    assert loaded.size == (20, 40)
    assert loaded.tobytes() == open_image(tmp_path / "sideways.jpg").tobytes()
    top = np.asarray(loaded)[:5].mean((0, 1))
    assert top[2] > top[0]  # the stored left band is now the top


def test_importing_the_decoder_leaves_pil_limits_alone():
    """The image-size limit applies where the project opens images, not to the whole process
    (checked in a fresh interpreter: reloading the module here would fork its exception class)."""
    import subprocess
    import sys

    code = ("from PIL import Image; before = Image.MAX_IMAGE_PIXELS; import cbam_viz.engine.preprocess; "
            "print(before, Image.MAX_IMAGE_PIXELS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1], out


def _constant_batch(b: int = 6, size: int = 20) -> torch.Tensor:
    """Image i is the constant i + 1, so every mixed pixel tells whose it is."""
    return (torch.arange(b, dtype=torch.float32) + 1).view(b, 1, 1, 1).expand(b, 3, size, size).clone()


def test_mixing_off_returns_the_batch_and_draws_nothing():
    from cbam_viz.training.data import mix_batch

    x, gen = _constant_batch(), torch.Generator().manual_seed(3)
    state = gen.get_state()
    out, partner, lam = mix_batch(x, generator=gen)
    assert out is x and lam == 1.0 and partner.tolist() == list(range(6))
    assert torch.equal(gen.get_state(), state)  # runs without mixing draw the same augmentation as before


def test_cutmix_pastes_one_box_of_the_partner_and_lam_is_the_unpasted_share():
    from cbam_viz.training.data import mix_batch

    x = _constant_batch()
    for seed in range(20):
        out, partner, lam = mix_batch(x, generator=torch.Generator().manual_seed(seed), cutmix_alpha=1.0)
        assert sorted(partner.tolist()) == list(range(6))
        own = out == x
        pasted = out == x[partner]
        assert bool((own | pasted).all())  # each pixel is the image's own or its partner's
        for i in range(6):
            if partner[i] == i:
                continue
            mask = pasted[i, 0]
            rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
            if len(rows):  # the pasted pixels fill one axis-aligned box
                assert bool(mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all())
            assert own[i, 0].float().mean().item() == pytest.approx(lam)
        assert 0.0 <= lam <= 1.0


def test_mixup_blends_with_the_partner_by_lam_and_is_deterministic():
    from cbam_viz.training.data import mix_batch

    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out, partner, lam = mix_batch(x, generator=torch.Generator().manual_seed(1), mixup_alpha=0.4)
    assert 0.0 < lam < 1.0
    assert torch.allclose(out, lam * x + (1 - lam) * x[partner])
    again = mix_batch(x, generator=torch.Generator().manual_seed(1), mixup_alpha=0.4)
    assert torch.equal(again[0], out) and torch.equal(again[1], partner) and again[2] == lam
    assert torch.equal(x, torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)))  # input untouched


def test_with_both_alphas_a_coin_picks_cutmix_or_mixup():
    from cbam_viz.training.data import mix_batch

    x = _constant_batch()
    kinds = set()
    for seed in range(30):
        out, partner, _ = mix_batch(x, generator=torch.Generator().manual_seed(seed), cutmix_alpha=1.0, mixup_alpha=1.0)
        kinds.add("cutmix" if bool(((out == x) | (out == x[partner])).all()) else "mixup")
    assert kinds == {"cutmix", "mixup"}
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alphas must be finite and >= 0"):
            mix_batch(x, generator=torch.Generator(), cutmix_alpha=bad)
