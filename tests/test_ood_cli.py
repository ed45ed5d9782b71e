"""``python -m cbam_viz fit-ood`` and the out-of-distribution note of ``explain -v`` (:mod:`cbam_viz.research.ood_fit`)."""
from __future__ import annotations

import json

import pytest

from cbam_viz.engine.loading import clear_cache
from cbam_viz.models.weights import read_manifest
from conftest import make_image
from test_ood import _folder, weights_dir  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("no_cbam_env")


def test_cli_fit_ood_and_the_verbose_line(weights_dir, tmp_path, capsys, monkeypatch):
    from cbam_viz import cli

    data = _folder(tmp_path / "data")
    assert cli.main(["fit-ood", "--data", str(data), "--weights", str(weights_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "base: mahalanobis threshold" in out and "cb: mahalanobis threshold" in out
    assert {"base", "cb"} <= {n for n, r in read_manifest(weights_dir)["models"].items() if "ood" in r["metrics"]}
    # A lineup of one member (the lineups the manifest lists beside its pairs) fits that member only.
    manifest = read_manifest(weights_dir)
    manifest["lineups"] = {"solo": {"members": ["cb"], "reference": "cb", "default": False}}
    (weights_dir / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["fit-ood", "--data", str(data), "--weights", str(weights_dir), "--lineup", "solo",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "cb: mahalanobis threshold" in out and "base:" not in out

    # Thresholds below any score: every photo is flagged, and the -v line says so.
    data_json = read_manifest(weights_dir)
    for name in ("base", "cb"):
        data_json["models"][name]["metrics"]["ood"]["threshold"] = -1e9
    (weights_dir / "manifest.json").write_text(json.dumps(data_json))
    clear_cache()
    monkeypatch.setenv("CBAM_VIZ_WEIGHTS_DIR", str(weights_dir))
    image = tmp_path / "photo.png"
    make_image(48, 40).save(image)
    assert cli.main(["explain", str(image), "--out", str(tmp_path / "out"), "-v", "--no-progress"]) == 0
    out = capsys.readouterr().out
    # members by their record names (the manifest's pair "tiny": base, then cb)
    assert "photo.png: base finds it unlike its classes (OOD score" in out and "cb finds it" in out
    saved = json.loads((tmp_path / "out" / "photo.json").read_text())
    assert saved["models"]["cb"]["out_of_distribution"]["flagged"] is True


def test_cli_fit_ood_bad_folder_is_one_sentence(weights_dir, tmp_path, capsys):
    from cbam_viz import cli

    (tmp_path / "empty").mkdir()
    code = cli.main(["fit-ood", "--data", str(tmp_path / "empty"), "--weights", str(weights_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "has no train/ folder" in err and "Traceback" not in err
    code = cli.main(["fit-ood", "--data", str(tmp_path / "empty"), "--weights", str(weights_dir), "--lineup", "nope"])
    assert code == 2 and "no lineup 'nope'" in capsys.readouterr().err
