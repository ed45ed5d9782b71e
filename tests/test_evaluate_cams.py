"""evaluate-cams end to end on generated images with a tiny untrained lineup of three (one member
without gates), through the CLI and the library; the shipped pair report (version 1) still loads."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import cbam_viz.engine.lineup
from cbam_viz.cli import main
from cbam_viz.research.quality import (
    METRICS, REPORT_VERSION, BoxFileError, evaluate_cams, forest_plot, load_report, load_report_cams,
    markdown_report, most_different_images, reading, render_record, summarize, upgrade_report, write_report,
)
from cbam_viz.research.quality.view import DEFAULT_REPORT_DIR
from cbam_viz.figures import render_comparison
from tests.conftest import make_image
from tests.research_lineups import make_lineup

pytestmark = pytest.mark.usefixtures("no_cbam_env")

REF, SE, CBAM = "tiny resnet18", "tiny resnet18_se", "tiny resnet18_cbam"


@pytest.fixture(scope="module")
def three():
    """The lineup of three at 32 px: plain ResNet-18 (reference, no gates), SE, CBAM."""
    return make_lineup()


def test_cli_end_to_end(boxed_folder, three, monkeypatch, tmp_path, capsys):
    data, csv = boxed_folder
    asked = []
    monkeypatch.setattr(cbam_viz.engine.lineup, "load_lineup", lambda *a, **k: asked.append(a) or three)
    out = tmp_path / "report"
    rc = main(["evaluate-cams", "--data", str(data), "--boxes", str(csv), "--methods", "gradcam", "layercam",
               "--method-limit", "layercam=2", "--out", str(out), "--n-boot", "200", "--no-progress",
               "--pair", "tiny-three"])  # --pair: the hidden alias of --lineup
    assert rc == 0 and asked == [("tiny-three",)]
    printed = capsys.readouterr()
    assert f"| gradcam | Pointing game ↑ | {CBAM} |" in printed.out and "untrained" in printed.err
    for name in ("report.json", "report.md", "summary.png", "cams.npz"):
        assert (out / name).stat().st_size > 0
    json.loads((out / "report.json").read_text())  # strict JSON: no NaN
    report = load_report(out)
    assert [im["file"] for im in report["images"]] == [f"c{c}/im{i}.png" for c in range(3) for i in range(2)]
    assert report["images"][3]["boxes"][1] == [0.0, 0.0, 12.5, 10.0]
    assert [im["target"] for im in report["images"]] == [0, 0, 1, 1, 2, 2]
    assert report["members"] == [REF, SE, CBAM] and report["reference"] == REF and report["lineup"] == "tiny-three"
    assert {n: m["gates"] for n, m in report["models"].items()} == {REF: [], SE: ["channel"],
                                                                    CBAM: ["channel", "spatial"]}
    assert set(report["results"]) == {"gradcam", "layercam"}
    for method, res in report["results"].items():
        n = 2 if method == "layercam" else 6
        assert set(res) == set(METRICS)
        for key, r in res.items():
            assert set(r["models"]) == {REF, SE, CBAM} and set(r["diff"]) == {SE, CBAM}  # each vs the reference
            for iv in [*r["models"].values(), *r["diff"].values()]:
                assert iv["n"] == n
                assert iv["low"] <= iv["value"] <= iv["high"]
            if key in ("pointing", "energy", "maxboxacc"):
                assert 0 <= r["models"][REF]["value"] <= 1
            for member in (SE, CBAM):
                assert r["diff"][member]["value"] == pytest.approx(
                    r["models"][member]["value"] - r["models"][REF]["value"], abs=2e-4)
    per = report["per_image"]["gradcam"]["models"]
    assert len(per[CBAM]["energy"]) == 6 and len(per[SE]["ious"][0]) == 100
    assert per[SE]["p"] != per[CBAM]["p"] != per[REF]["p"]  # each member scored with its own model
    assert report["timings"]["methods"]["layercam"]["images"] == 2  # Score-CAM's way to fit the budget
    assert "verdict" in (out / "report.md").read_text()
    assert list(report["spatial_gates"]) == [CBAM]  # SE and the plain ResNet have no spatial map
    gates = report["spatial_gates"][CBAM]  # every CBAM block's spatial gate, scored like the CAMs
    assert gates["blocks"] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert set(gates["results"]) == {*gates["blocks"], "centre Gaussian"} and set(gates["vs_centre"]) == set(gates["blocks"])
    for iv in gates["results"]["layer4.1"].values():
        assert iv["n"] == 6 and iv["low"] <= iv["value"] <= iv["high"]
    assert "spatial gate itself localize" in (out / "report.md").read_text()

    recs = most_different_images(report, "energy", 3, method="gradcam")
    assert len(recs) == 3 and recs[0]["member"] == CBAM and set(recs[0]["values"]) == {REF, CBAM}
    diffs = [abs(r["diff"]) for r in recs]
    assert diffs == sorted(diffs, reverse=True)
    assert recs[0]["path"].endswith(recs[0]["file"])
    png = render_record(report, recs[0])
    w, h = Image.open(recs[0]["path"]).size
    assert png.width > 3 * w and png.height > h
    box_recs = most_different_images(report, "maxboxacc", 6, method="gradcam", direction="member", member=SE)
    assert all(b is None or len(b) == 4 for r in box_recs for b in r["cam_boxes"].values())
    assert {r["member"] for r in box_recs} == {SE}
    picture = forest_plot(report)
    assert picture.mode == "RGB" and picture.width > picture.height
    assert reading(report).count("\n") == 1 and f"{SE} better in" in reading(report)


def test_missing_images_and_unknown_classes(boxed_folder, tmp_path):
    data, csv = boxed_folder
    one = make_lineup(("resnet18_cbam",), name="alone")  # a lineup of one: no comparisons
    csv.write_text(csv.read_text() + "c0,gone.png,1,1,5,5\n")
    with pytest.raises(BoxFileError, match="c0/gone.png"):
        evaluate_cams(data, csv, lineup=one, methods=["gradcam"], progress=False)
    report, cams = evaluate_cams(data, csv, lineup=one, methods=["gradcam"], allow_missing=True, n_boot=50,
                                 max_images=3, progress=False)
    assert report["missing_images"] == ["c0/gone.png"] and len(report["images"]) == 3
    key = "gradcam/tiny resnet18_cbam"
    assert list(cams) == [key] and cams[key].shape == (3, 112, 112) and cams[key].dtype == np.uint8
    assert all(r["diff"] == {} for r in report["results"]["gradcam"].values())
    assert "nothing to compare" in reading(report) and "| reference |" in markdown_report(report)
    assert forest_plot(report).width > 0
    (data / "zebra").mkdir()
    make_image(32, 32).save(data / "zebra" / "z.png")
    csv.write_text(csv.read_text() + "zebra,z.png,1,1,5,5\n")
    with pytest.raises(ValueError, match="zebra"):
        evaluate_cams(data, csv, lineup=one, methods=["gradcam"], allow_missing=True, progress=False)
    with pytest.raises(ValueError, match="(?i)unknown CAM method"):
        evaluate_cams(data, csv, lineup=one, methods=["nope"], progress=False)


def test_boxes_in_another_image_size_are_refused(boxed_folder, three):
    data, csv = boxed_folder
    csv.write_text(csv.read_text() + "c0,im0.png,100,100,400,300\n")
    with pytest.raises(BoxFileError, match="outside their image"):
        evaluate_cams(data, csv, lineup=three, methods=["gradcam"], progress=False)


def _fake_report():
    """A version-1 (pair) report as a pair run wrote it, read as version 2 (members "b", the reference, and "c")."""
    iv = {"value": 0.5, "low": 0.4, "high": 0.6, "n": 3, "level": 0.95}
    per_role = lambda e, r: {"energy": e, "road": r, "pointing": [1, 0, 1], "box_iou": [0.5, 0.5, 0.5],  # noqa: E731
                             "best_threshold_index": 0, "morf_drop": [0, 0, 0], "lerf_drop": [0, 0, 0]}
    return upgrade_report({
        "version": 1, "pair": "p",
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
    })


def test_most_different_images_order_and_direction():
    report = _fake_report()
    assert report["members"] == ["b", "c"] and report["reference"] == "b" and report["lineup"] == "p"
    both = most_different_images(report, "energy", 3)
    assert [r["file"] for r in both] == ["c/2.png", "c/0.png", "c/1.png"]
    assert both[0]["diff"] == pytest.approx(-0.8)
    assert [r["file"] for r in most_different_images(report, "energy", 1, direction="member")] == ["c/0.png"]
    assert [r["file"] for r in most_different_images(report, "energy", 1, direction="reference")] == ["c/2.png"]
    # An image without a value (None) is never returned.
    assert [r["file"] for r in most_different_images(report, "road", 5)] == ["c/0.png", "c/1.png"]
    with pytest.raises(ValueError, match="unknown metric"):
        most_different_images(report, "nope", 1)
    with pytest.raises(ValueError, match="not in this report"):
        most_different_images(report, "energy", 1, method="scorecam")
    with pytest.raises(ValueError, match="'zebra' is not a model of this report"):
        most_different_images(report, "energy", 1, member="zebra")
    md = markdown_report(report)
    assert md.count("**c better**") == len(METRICS) - 1  # lerf_drop: lower is better
    assert "**b better**" in md
    assert reading(report).startswith("Against b on 3 boxed images") and "c better in 5, worse in 1" in reading(report)


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


def test_main_tab_confidence_drop(micro_lineup):
    from cbam_viz.engine.explain import explain
    from cbam_viz.engine.faithfulness import lineup_confidence_drop
    from cbam_viz.figures import confidence_drop_figure

    img = make_image(48, 40, seed=3)
    exp = explain(img, micro_lineup, method="gradcam")[0]
    drops = lineup_confidence_drop(img, exp, micro_lineup)
    assert list(drops) == micro_lineup.names
    for name, d in drops.items():
        assert d.target == exp.models[name].target and 0 <= d.prob_after <= 1
        assert d.prob_before == pytest.approx(exp.models[name].top1.prob, abs=1e-4)  # target None: the top-1
    fig = confidence_drop_figure(drops, micro_lineup)
    assert fig.width > 2 * micro_lineup.reference_model.input_size


def _fake_cams(value: int):
    return {f"gradcam/{name}": np.full((3, 112, 112), value, np.uint8) for name in ("b", "c")}


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
    assert report["data"] == "/nowhere" and (load_report_cams(report)["gradcam/c"] == 7).all()


def test_shipped_report_is_the_default_lineups_and_reproduces_its_intervals():
    """docs/explanation_quality (what the app's tab shows) was written by the shipped default lineup:
    its members in order, each one's CAMs, the spatial gates of the members that have them, and
    intervals that :func:`summarize` and :func:`between_members` reproduce from its per-image values.
    (Version-1 pair reports keep loading: see the test above.)"""
    from cbam_viz.engine.lineup import default_lineup_name, lineup_specs
    from cbam_viz.research.quality.run import between_members

    name = default_lineup_name()
    if name is None:
        pytest.skip("no weights/manifest.json")
    spec = lineup_specs()[name][1]
    report = load_report(DEFAULT_REPORT_DIR)
    assert report["members"] == spec["members"] and report["reference"] == spec["reference"]
    cams = load_report_cams(report)
    for method, rec in report["per_image"].items():
        for member in report["members"]:
            assert cams[f"{method}/{member}"].shape == (len(rec["index"]), 112, 112)
            assert len(rec["models"][member]["energy"]) == len(rec["index"])
    md = markdown_report(report)
    assert all(f"| gradcam | Pointing game ↑ | {m} |" in md for m in report["members"])
    gated = [m for m in report["members"] if "spatial" in report["models"][m]["gates"]]
    assert list(report["spatial_gates"]) == gated
    s = report["settings"]
    kw = dict(iou_threshold=s["iou_threshold"], n_boot=s["n_boot"], seed=s["seed"])
    method = next(iter(report["per_image"]))
    assert summarize(report["per_image"][method], reference=report["reference"], **kw) == report["results"][method]
    pairs = [(c["member"], c["against"]) for c in report.get("comparisons", [])]
    assert between_members(report["per_image"], pairs, **kw) == report.get("comparisons", [])


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

    values = {name: [image(0.4996), image(0.5), image(0.75)] for name in ("b", "c")}
    rec = _per_image_record(np.arange(3), values, iou_threshold=0.5)
    assert [row[0] for row in rec["models"]["c"]["ious"]] == [0.499, 0.5, 0.75]
    result = summarize(rec, reference="b", iou_threshold=0.5, n_boot=50, seed=0)["maxboxacc"]
    assert result["models"]["c"]["value"] == pytest.approx(2 / 3)
    assert rec["models"]["c"]["box_iou"] == [0.499, 0.5, 0.75]


def test_compare_pairs_two_members_from_the_same_per_image_values(boxed_folder, three, tmp_path, capsys, monkeypatch):
    """``--compare CBAM:SE`` (does the spatial gate add to channel attention?) is the paired
    difference of the two members' per-image values, with no second pass over the images."""
    data, csv = boxed_folder
    report, _ = evaluate_cams(data, csv, lineup=three, methods=["gradcam"], n_boot=200, progress=False,
                              compare=[(CBAM, SE)])
    (pair,) = report["comparisons"]
    assert (pair["member"], pair["against"]) == (CBAM, SE) and set(pair["results"]) == {"gradcam"}
    models = report["per_image"]["gradcam"]["models"]
    for metric in ("energy", "pointing", "road"):
        diff = np.array(models[CBAM][metric], float) - np.array(models[SE][metric], float)
        assert pair["results"]["gradcam"][metric]["value"] == pytest.approx(np.nanmean(diff), abs=1e-4)
        assert pair["results"]["gradcam"][metric]["n"] == 6
    assert "### Between members" in markdown_report(report) and f"| {CBAM} − {SE} |" in markdown_report(report)
    assert "Between members" not in markdown_report({**report, "comparisons": []})
    with pytest.raises(ValueError, match="not a member"):
        evaluate_cams(data, csv, lineup=three, methods=["gradcam"], progress=False, compare=[(CBAM, "nope")])
    monkeypatch.setattr(cbam_viz.engine.lineup, "load_lineup", lambda *a, **k: three)
    out = tmp_path / "r"
    assert main(["evaluate-cams", "--data", str(data), "--boxes", str(csv), "--out", str(out), "--no-progress",
                 "--compare", f"{CBAM}"]) == 2
    assert "MEMBER:AGAINST" in capsys.readouterr().err and not out.exists()
