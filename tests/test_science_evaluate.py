"""``evaluate`` reads each image's class from the record's class order, never from the sorted folder
order: checked per class id against a plain loop, with unequal class sizes (so every confusion row
differs) and a record whose class order is not the folders' sorted order."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cbam_viz.training.compare import paired_difference
from cbam_viz.training.evaluate import (
    ClassMismatchError, EvalResult, evaluate_record, image_batches, labelled_images, spread_indices,
)
from cbam_viz.models import create_model
from cbam_viz.engine.preprocess import open_image, to_model_batch
from cbam_viz.models.weights import WeightRecord, save_safetensors
from tests.synthetic import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

FOLDERS = ("n01", "n02", "n03", "n04", "n05", "n06")
RECORD_ORDER = ("n04", "n01", "n06", "n02", "n05", "n03")  # not sorted: index i is not folder i


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    data = make_image_folder(tmp / "val", FOLDERS, per_class=6, size=(36, 30))
    for j, cid in enumerate(FOLDERS):  # folder j keeps j + 1 images: 21 in all, every row its own size
        for f in sorted((data / cid).iterdir())[j + 1:]:
            f.unlink()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = create_model("resnet18", num_classes=6).eval()
    _fit_head(model, data)
    weights = tmp / "weights"
    digest = save_safetensors(model, weights / "m.safetensors")
    record = WeightRecord(
        name="m", file="m.safetensors", arch="resnet18", sha256=digest,
        num_params=sum(p.numel() for p in model.parameters()),
        classes=[{"id": c, "name": f"class {c}"} for c in RECORD_ORDER],
        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], input_size=32)
    return record, model, weights, data


def _fit_head(model, data) -> None:
    """Ridge-fit the linear head on these very images, to each image's record index for the even
    images and to the next index for the odd ones: predictions that vary with the image and a
    model that is partly right (a random head predicts one class for everything)."""
    files = sorted(data.glob("*/*.png"))
    x = to_model_batch([open_image(f) for f in files], 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    feats = []
    handle = model.fc.register_forward_hook(lambda m, args, out: feats.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    f = feats[0].double()
    mu, sd = f.mean(0), f.std(0) + 1e-6
    z = (f - mu) / sd
    labels = [(RECORD_ORDER.index(p.parent.name) + i % 2) % 6 for i, p in enumerate(files)]
    # plus a graded order of the other classes (steps of 0.12, varying per image): no near-ties at rank 5
    y = 3 * torch.nn.functional.one_hot(torch.tensor(labels), 6).double() + 0.6 * torch.tensor(
        [[((c + 2 * i) % 6) / 5 for c in range(6)] for i in range(len(files))], dtype=torch.float64)
    w = torch.linalg.solve(z.T @ z + torch.eye(z.shape[1], dtype=torch.float64), z.T @ (y - y.mean(0))).T
    with torch.no_grad():
        model.fc.weight.copy_(w / sd)
        model.fc.bias.copy_(-(w / sd) @ mu)


def _plain_loop(record, model, data, *, hflip=False):
    n = len(RECORD_ORDER)
    conf = np.zeros((n, n), int)
    top5 = []
    for f in sorted(data.glob("*/*.png")):
        label = RECORD_ORDER.index(f.parent.name)
        x = to_model_batch([open_image(f)], 32, record.mean, record.std)
        with torch.no_grad():
            p = model(x).softmax(1)
            if hflip:
                p = (p + model(torch.flip(x, dims=[3])).softmax(1)) / 2
        conf[label, int(p.argmax())] += 1
        top5.append(label in p[0].argsort(descending=True)[:5].tolist())
    return conf, float(np.mean(top5))


@pytest.mark.parametrize("hflip", [False, True])
def test_confusion_per_class_id_equals_a_plain_loop(setup, hflip):
    record, model, weights, data = setup
    res = evaluate_record(record, data, weights_dir=weights, batch_size=4, workers=1, hflip=hflip, progress=False)
    conf, top5 = _plain_loop(record, model, data, hflip=hflip)
    assert res.class_ids == RECORD_ORDER and res.n == 21 and res.hflip is hflip
    assert res.confusion == conf.tolist()
    assert [sum(row) for row in res.confusion] == [FOLDERS.index(c) + 1 for c in RECORD_ORDER]
    assert len(np.unique(np.asarray(res.confusion).argmax(1))) > 1 or hflip  # predictions vary
    assert res.top1 == pytest.approx(np.trace(conf) / 21)
    assert res.top5 == pytest.approx(top5) and 0 < res.top5 < 1
    for i, cid in enumerate(RECORD_ORDER):
        assert res.per_class[cid] == pytest.approx(conf[i, i] / conf[i].sum()), cid
    assert sum(res.correct) == np.trace(conf) and len(res.correct) == 21
    assert res.class_names == tuple(f"class {c}" for c in RECORD_ORDER)


def test_the_default_is_the_plain_prediction_without_the_flip_average(setup):
    record, model, weights, data = setup
    import time

    t0 = time.perf_counter()
    res = evaluate_record(record, data, weights_dir=weights, progress=False)
    assert 0 <= res.seconds <= time.perf_counter() - t0
    assert res.hflip is False and res.confusion == _plain_loop(record, model, data)[0].tolist()
    ones = list(image_batches(labelled_images(RECORD_ORDER, data), record, batch_size=1, progress=False))
    assert len(ones) == 21 and all(len(y) == 1 for _, y in ones)


def test_labels_are_indices_into_the_models_class_order(setup):
    record, _, _, data = setup
    images = labelled_images(RECORD_ORDER, data)
    for f, label in zip(images.files, images.labels):
        assert RECORD_ORDER[label] == f.split("/")[0], f
    assert images.files == tuple(sorted(images.files))
    batches = list(image_batches(images, record, batch_size=5, workers=1, progress=False))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 1]
    assert torch.cat([y for _, y in batches]).tolist() == list(images.labels)
    first = to_model_batch([open_image(data / images.files[0])], 32, record.mean, record.std)
    torch.testing.assert_close(batches[0][0][:1], first)
    some = labelled_images(RECORD_ORDER, data, max_images=6)
    assert some.files == tuple(images.files[i] for i in (0, 4, 8, 12, 16, 20))  # spread over the sorted list
    assert some.labels == tuple(images.labels[i] for i in (0, 4, 8, 12, 16, 20))
    with pytest.raises(ValueError):
        next(image_batches(images, record, batch_size=0, progress=False))
    with pytest.raises(ClassMismatchError, match="no folder for"):  # a class without a folder alone
        labelled_images(RECORD_ORDER + ("n07",), data)
    with pytest.raises(ClassMismatchError, match="does not know"):  # a folder the model lacks alone
        labelled_images(RECORD_ORDER[:5], data)


def test_spread_indices_cover_the_list_evenly():
    assert spread_indices(10, None).tolist() == list(range(10))
    assert spread_indices(10, 10).tolist() == list(range(10)) and spread_indices(4, 9).tolist() == [0, 1, 2, 3]
    assert spread_indices(10, 3).tolist() == [0, 4, 9] and spread_indices(10, 2).tolist() == [0, 9]
    assert spread_indices(10, 1).tolist() == [0] and spread_indices(10, 0).tolist() == [0]


def _result(correct, name="x"):
    return EvalResult(name=name, arch="a", data_dir="d", top1=float(np.mean(correct)), top5=1.0, per_class={},
                      confusion=[], n=len(correct), class_ids=(), class_names=(), seconds=0.0,
                      correct=tuple(correct), hflip=False)


def test_paired_difference_is_member_minus_reference_with_mcnemars_exact_p():
    base = _result([True] * 6 + [False] * 4, "plain")
    cbam = _result([True] * 4 + [False] * 2 + [True] * 3 + [False], "gated")  # 2 lost, 3 gained
    d = paired_difference(base, cbam, n_boot=500)
    assert d["difference"] == pytest.approx(0.1) and (d["member"], d["reference"]) == ("gated", "plain")
    assert (d["only_member_right"], d["only_reference_right"], d["n"]) == (3, 2, 10)
    assert d["mcnemar_p"] == pytest.approx(1.0)  # 2 * P(X <= 2 | Bin(5, 1/2)) = 1, capped at 1
    lopsided = paired_difference(_result([False] * 8), _result([True] * 7 + [False]), n_boot=500)
    assert lopsided["mcnemar_p"] == pytest.approx(2 / 2 ** 7)
    assert lopsided["ci95"][0] <= lopsided["difference"] <= lopsided["ci95"][1]
    tied = paired_difference(_result([True, True, False, False]), _result([False, False, True, True]), n_boot=100)
    assert tied["mcnemar_p"] == 1.0  # 2 * P(X <= 2 | Bin(4, 1/2)) = 22/16, capped at 1
    assert paired_difference(base, cbam)["n_boot"] == 10_000
    same = paired_difference(base, base, n_boot=100)
    assert same["mcnemar_p"] == 1.0 and same["difference"] == 0
    with pytest.raises(ValueError):
        paired_difference(base, _result([True]))
    with pytest.raises(ValueError):
        paired_difference(_result([]), _result([]))
