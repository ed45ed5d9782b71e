"""evaluate-cams end to end on generated images with a tiny untrained pair, through the CLI."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import cbam_viz.pair
from cbam_viz.cli import main
from cbam_viz.research.quality import (
    METRICS, REPORT_VERSION, BoxFileError, evaluate_cams, load_report, load_report_cams, markdown_report,
    most_different_images, render_record, summarize, write_report,
)
from cbam_viz.research.quality.view import DEFAULT_REPORT_DIR
from cbam_viz.render import render_comparison
from tests.conftest import make_image

pytestmark = pytest.mark.usefixtures("no_cbam_env")


def test_cli_end_to_end(boxed_folder, micro_pair, monkeypatch, tmp_path, capsys):
    data, csv = boxed_folder
    monkeypatch.setattr(cbam_viz.pair, "load_pair", lambda *a, **k: micro_pair)
    out = tmp_path / "report"
    rc = main(["evaluate-cams", "--data", str(data), "--boxes", str(csv), "--methods", "gradcam", "layercam",
               "--method-limit", "layercam=2", "--out", str(out), "--n-boot", "200", "--no-progress"])
    assert rc == 0
    assert "| gradcam | Pointing game" in capsys.readouterr().out
    for name in ("report.json", "report.md", "summary.png", "cams.npz"):
        assert (out / name).stat().st_size > 0
    json.loads((out / "report.json").read_text())  # strict JSON: no NaN
    report = load_report(out)
    assert [im["file"] for im in report["images"]] == [f"c{c}/im{i}.png" for c in range(3) for i in range(2)]
    assert report["images"][3]["boxes"][1] == [0.0, 0.0, 12.5, 10.0]
    assert [im["target"] for im in report["images"]] == [0, 0, 1, 1, 2, 2]
    assert set(report["results"]) == {"gradcam", "layercam"}
    for method, res in report["results"].items():
        n = 2 if method == "layercam" else 6
        assert set(res) == set(METRICS)
        for key, r in res.items():
            for part in ("baseline", "cbam", "diff"):
                iv = r[part]
                assert iv["n"] == n
                assert iv["low"] <= iv["value"] <= iv["high"]
            if key in ("pointing", "energy", "maxboxacc"):
                assert 0 <= r["baseline"]["value"] <= 1
            assert r["diff"]["value"] == pytest.approx(r["cbam"]["value"] - r["baseline"]["value"], abs=2e-4)
    per = report["per_image"]["gradcam"]
    assert len(per["cbam"]["energy"]) == 6 and len(per["cbam"]["ious"][0]) == 100
    assert report["timings"]["methods"]["layercam"]["images"] == 2  # Score-CAM's way to fit the budget
    assert "verdict" in (out / "report.md").read_text()
    gates = report["spatial_gates"]  # every CBAM block's spatial gate, scored like the CAMs
    assert gates["blocks"] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert set(gates["results"]) == {*gates["blocks"], "centre Gaussian"} and set(gates["vs_centre"]) == set(gates["blocks"])
    for iv in gates["results"]["layer4.1"].values():
        assert iv["n"] == 6 and iv["low"] <= iv["value"] <= iv["high"]
    assert "spatial gate itself localize" in (out / "report.md").read_text()

    recs = most_different_images(report, "energy", 3, method="gradcam")
    assert len(recs) == 3
    diffs = [abs(r["diff"]) for r in recs]
    assert diffs == sorted(diffs, reverse=True)
    assert recs[0]["path"].endswith(recs[0]["file"])
    png = render_record(report, recs[0])
    w, h = Image.open(recs[0]["path"]).size
    assert png.width > 3 * w and png.height > h
    box_recs = most_different_images(report, "maxboxacc", 6, method="gradcam", direction="cbam")
    assert all(r["baseline_box"] is None or len(r["baseline_box"]) == 4 for r in box_recs)


def test_missing_images_and_unknown_classes(boxed_folder, micro_pair, tmp_path):
    data, csv = boxed_folder
    csv.write_text(csv.read_text() + "c0,gone.png,1,1,5,5\n")
    with pytest.raises(BoxFileError, match="c0/gone.png"):
        evaluate_cams(data, csv, pair=micro_pair, methods=["gradcam"], progress=False)
    report, cams = evaluate_cams(data, csv, pair=micro_pair, methods=["gradcam"], allow_missing=True, n_boot=50,
                                 max_images=3, progress=False)
    assert report["missing_images"] == ["c0/gone.png"] and len(report["images"]) == 3
    assert cams["gradcam/cbam"].shape == (3, 112, 112) and cams["gradcam/cbam"].dtype == np.uint8
    (data / "zebra").mkdir()
    make_image(32, 32).save(data / "zebra" / "z.png")
    csv.write_text(csv.read_text() + "zebra,z.png,1,1,5,5\n")
    with pytest.raises(ValueError, match="zebra"):
        evaluate_cams(data, csv, pair=micro_pair, methods=["gradcam"], allow_missing=True, progress=False)
    with pytest.raises(ValueError, match="(?i)unknown CAM method"):
        evaluate_cams(data, csv, pair=micro_pair, methods=["nope"], progress=False)


def test_boxes_in_another_image_size_are_refused(boxed_folder, micro_pair):
    data, csv = boxed_folder
    csv.write_text(csv.read_text() + "c0,im0.png,100,100,400,300\n")
    with pytest.raises(BoxFileError, match="outside their image"):
        evaluate_cams(data, csv, pair=micro_pair, methods=["gradcam"], progress=False)


def _fake_report():
    iv = {"value": 0.5, "low": 0.4, "high": 0.6, "n": 3, "level": 0.95}
    per_role = lambda e, r: {"energy": e, "road": r, "pointing": [1, 0, 1], "box_iou": [0.5, 0.5, 0.5],  # noqa: E731
                             "best_threshold_index": 0, "morf_drop": [0, 0, 0], "lerf_drop": [0, 0, 0]}
    return {
        "data": "/nowhere", "models": {"baseline": {"name": "b", "trained": True}, "cbam": {"name": "c", "trained": True}},
        "settings": {"layer": "layer4.1", "n_boot": 10, "imputer": "blur", "fractions": [0.2], "device": "cpu",
                     "torch_threads": 2},
        "metrics": {k: {"label": m.label, "higher_is_better": m.higher_is_better, "help": m.help} for k, m in METRICS.items()},
        "images": [{"file": f"c/{i}.png", "class_name": "c", "target": 0, "size": [8, 8], "boxes": []} for i in range(3)],
        "per_image": {"gradcam": {"index": [0, 1, 2], "baseline": per_role([0.5, 0.5, 0.9], [0.1, 0.2, None]),
                                  "cbam": per_role([0.9, 0.4, 0.1], [0.3, 0.1, 0.5])}},
        "results": {"gradcam": {k: {"baseline": iv, "cbam": iv, "diff": {**iv, "value": 0.1, "low": 0.05, "high": 0.2}}
                                for k in METRICS}},
        "timings": {"total_wall_s": 1, "total_cpu_s": 1, "methods": {"gradcam": {"wall_s": 1, "images": 3}}},
    }


def test_most_different_images_order_and_direction():
    report = _fake_report()
    both = most_different_images(report, "energy", 3)
    assert [r["file"] for r in both] == ["c/2.png", "c/0.png", "c/1.png"]
    assert both[0]["diff"] == pytest.approx(-0.8)
    assert [r["file"] for r in most_different_images(report, "energy", 1, direction="cbam")] == ["c/0.png"]
    assert [r["file"] for r in most_different_images(report, "energy", 1, direction="baseline")] == ["c/2.png"]
    # An image without a value (None) is never returned.
    assert [r["file"] for r in most_different_images(report, "road", 5)] == ["c/0.png", "c/1.png"]
    with pytest.raises(ValueError, match="unknown metric"):
        most_different_images(report, "nope", 1)
    with pytest.raises(ValueError, match="not in this report"):
        most_different_images(report, "energy", 1, method="scorecam")
    md = markdown_report(report)
    assert md.count("**CBAM better**") == len(METRICS) - 1  # lerf_drop: lower is better
    assert "**baseline better**" in md


def test_render_comparison_draws_boxes():
    img = Image.new("RGB", (40, 30), (0, 0, 0))
    cam = np.zeros((30, 40), np.float32)
    out = render_comparison(img, cam, cam, [[5, 5, 20, 15]], cam_boxes=([0, 0, 10, 10], None))
    assert out.size[0] > 120 and out.size[1] > 30
    assert (0, 255, 0) in [c for _, c in out.getcolors(10000)]


def test_load_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate-cams"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not an evaluate-cams report"):
        load_report(tmp_path)


def test_main_tab_confidence_drop(micro_pair):
    from cbam_viz.explain import explain
    from cbam_viz.faithfulness import pair_confidence_drop
    from cbam_viz.render import confidence_drop_figure

    img = make_image(48, 40, seed=3)
    exp = explain(img, micro_pair, method="gradcam")[0]
    drops = pair_confidence_drop(img, exp, micro_pair)
    for role in ("baseline", "cbam"):
        d = drops[role]
        assert d.target == getattr(exp, role).target and 0 <= d.prob_after <= 1
        assert d.prob_before == pytest.approx(getattr(exp, role).top1.prob, abs=1e-4)  # target None: the top-1
    fig = confidence_drop_figure(drops, micro_pair)
    assert fig.width > 2 * micro_pair.cbam.input_size


def _fake_cams(value: int):
    return {f"gradcam/{role}": np.full((3, 112, 112), value, np.uint8) for role in ("baseline", "cbam")}


def test_write_report_failure_leaves_the_previous_report_intact(tmp_path, monkeypatch):
    """A write that fails half-way (disk full, killed) leaves the old files whole and no partial file."""
    out = tmp_path / "report"
    write_report({**_fake_report(), "version": REPORT_VERSION}, _fake_cams(7), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["cams.npz", "report.json", "report.md", "summary.png"]

    def disk_full(file, **arrays):  # writes the start of the zip, then fails
        if isinstance(file, (str, os.PathLike)):
            with open(file, "wb") as f:
                f.write(b"PK\x03\x04 half a zip")
        else:
            file.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez_compressed", disk_full)
    newer = {**_fake_report(), "version": REPORT_VERSION, "data": "/elsewhere"}
    with pytest.raises(OSError, match="No space"):
        write_report(newer, _fake_cams(9), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    report = load_report(out)
    assert report["data"] == "/nowhere" and (load_report_cams(report)["gradcam/cbam"] == 7).all()


def test_shipped_report_still_loads_and_reproduces_its_intervals():
    """docs/explanation_quality (what the app's tab shows) keeps loading: same format, same statistics."""
    report = load_report(DEFAULT_REPORT_DIR)
    cams = load_report_cams(report)
    for method, rec in report["per_image"].items():
        for role in ("baseline", "cbam"):
            assert cams[f"{method}/{role}"].shape == (len(rec["index"]), 112, 112)
            assert len(rec[role]["energy"]) == len(rec["index"])
    assert "| gradcam | Pointing game" in markdown_report(report)
    method = next(iter(report["per_image"]))
    s = report["settings"]
    assert summarize(report["per_image"][method], iou_threshold=s["iou_threshold"], n_boot=s["n_boot"],
                     seed=s["seed"]) == report["results"][method]


def test_a_gate_that_lights_up_the_box_beats_the_centre_and_a_flat_one_does_not():
    """Known answers: a gate map bright exactly on the (off-centre) box scores 100 % pointing and
    beats the centre Gaussian; a constant gate scores chance; the centre bump wins on a centred box."""
    from cbam_viz.research.quality.boxes import Box
    from cbam_viz.research.quality.gates import CENTRE, centre_gaussian, spatial_gate_scores

    size = (64, 64)
    corner = [Box(0, 0, 24, 24)]
    hit = np.zeros((8, 8), np.float32)
    hit[:3, :3] = 1.0  # the top-left 3x3 of the 8x8 feature map: inside the box
    flat = np.full((8, 8), 0.5, np.float32)
    gates = [{"layer1.0": hit, "layer4.1": flat}] * 5
    res = spatial_gate_scores(gates, [size] * 5, [corner] * 5, n_boot=200)
    assert res["results"]["layer1.0"]["pointing"]["value"] == 1.0
    assert res["results"][CENTRE]["pointing"]["value"] == 0.0  # its peak is in the middle
    assert res["vs_centre"]["layer1.0"]["energy"]["low"] > 0
    share = 24 * 24 / 64 ** 2
    assert res["results"]["layer4.1"]["pointing"]["value"] == pytest.approx(share, abs=1e-3)  # flat: chance
    centred = spatial_gate_scores(gates, [size] * 5, [[Box(20, 20, 44, 44)]] * 5, n_boot=200)
    assert centred["results"][CENTRE]["pointing"]["value"] == 1.0
    bump = centre_gaussian(size)
    assert bump.shape == (64, 64) and bump.argmax() in (32 * 64 + 32, 31 * 64 + 31, 31 * 64 + 32, 32 * 64 + 31)


def test_stored_ious_never_round_up_across_the_iou_threshold():
    """An IoU of 0.4996 misses at IoU >= 0.5; kept rounded to nearest (0.5) it would count as a hit."""
    from cbam_viz.research.quality.run import _per_image_record

    def image(iou):
        return {"ious": np.array([iou, 0.2], np.float32), "morf": np.zeros(2), "lerf": np.zeros(2), "p": 0.9,
                "pointing": 1.0, "energy": 0.5, "top1": True}

    values = {role: [image(0.4996), image(0.5), image(0.75)] for role in ("baseline", "cbam")}
    rec = _per_image_record(np.arange(3), values, iou_threshold=0.5)
    assert [row[0] for row in rec["cbam"]["ious"]] == [0.499, 0.5, 0.75]
    result = summarize(rec, iou_threshold=0.5, n_boot=50, seed=0)["maxboxacc"]
    assert result["cbam"]["value"] == pytest.approx(2 / 3)
    assert rec["cbam"]["box_iou"] == [0.499, 0.5, 0.75]
