"""What a newcomer meets on the command line: method spellings, --help, -v, --overwrite, default folders."""
from __future__ import annotations

import json

import pytest

from cbam_viz.cli import build_parser, main
from cbam_viz.engine.controls import check_layer, check_method
from cbam_viz.messages import UserFacingError
from tests.e2e_helpers import make_image

pytestmark = pytest.mark.usefixtures("no_cbam_env", "use_service_lineup")


@pytest.mark.parametrize("spelling, name", [
    ("Grad-CAM++", "gradcam++"), ("grad-cam++", "gradcam++"), ("GradCAMPlusPlus", "gradcam++"),
    ("Score-CAM", "scorecam"), ("HiResCAM", "hirescam"), ("XGrad-CAM", "xgradcam"), ("gradcam", "gradcam"),
])
def test_method_spellings(spelling, name):
    assert check_method(spelling) == name


def test_method_typo_suggests():
    with pytest.raises(UserFacingError, match="did you mean scorecam"):
        check_method("scorecm")


def test_layers_accepted_are_what_the_message_says(service_lineup):
    model = service_lineup.members[-1].model
    for name in ("layer3.1", "layer4", "conv1", "layer3.0.conv2"):
        assert check_layer(name, model) == name
    for name, phrase in (("fc", "no spatial map"), ("avgpool", "no spatial map"), ("layer9", "Unknown layer")):
        with pytest.raises(UserFacingError, match=phrase) as err:
            check_layer(name, model)
        assert "a stage (layer1 ... layer4)" in str(err.value) and "the stem" in str(err.value)


def test_help_lists_methods_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "gradcam++" in text and "scorecam" in text and "list_methods" not in text
    assert "(default: gradcam)" in text and "(default: 0.5)" in text and "--overwrite" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default: 100, from cbam_viz.training.recipe.Recipe)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "``" not in top and "exit status" in top


def test_verbose_names_the_explained_class_and_alias_reaches_the_json(tmp_path, capsys, service_lineup):
    photo = make_image(tmp_path / "p.png", size=(72, 72))
    out = tmp_path / "out"
    assert main(["explain", str(photo), "--out", str(out), "--no-progress", "-v", "--method", "Grad-CAM++",
                 "--target", "church"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    parts = line.removeprefix("p.png: ").split("; ")
    assert len(parts) == len(service_lineup.names)  # one part per member, in order
    for name, part in zip(service_lineup.names, parts):
        assert part.startswith(f"{name} ") and part.endswith("(CAM of 'church')"), line
    assert json.loads((out / "p.json").read_text())["method"] == "gradcam++"


def test_overwrite_is_refused_unless_asked(tmp_path, capsys):
    photo = make_image(tmp_path / "p.png", size=(72, 72))
    out = tmp_path / "out"
    assert main(["explain", str(photo), "--out", str(out), "--no-progress"]) == 0
    before = (out / "p.json").read_bytes()
    assert main(["explain", str(photo), "--out", str(out), "--no-progress", "--alpha", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "already holds p.png, p.json" in err and "--overwrite" in err
    assert (out / "p.json").read_bytes() == before  # nothing lost
    assert main(["explain", str(photo), "--out", str(out), "--no-progress", "--alpha", "0.2", "--overwrite"]) == 0
    assert json.loads((out / "p.json").read_text())["alpha"] == 0.2
    other = make_image(tmp_path / "q.png", size=(72, 72))
    assert main(["explain", str(other), "--out", str(out), "--no-progress"]) == 0  # new names: no clash


def test_report_commands_refuse_to_replace_a_report(tmp_path, capsys):
    out = tmp_path / "sanity"
    out.mkdir()
    (out / "sanity.json").write_text("{}")
    assert main(["sanity-check", "--data", str(tmp_path), "--out", str(out)]) == 2
    assert "already holds sanity.json" in capsys.readouterr().err
    assert (out / "sanity.json").read_text() == "{}"


def test_default_report_folders_are_where_the_app_reads():
    from cbam_viz.app import content, quality
    from cbam_viz.research.quality.view import DEFAULT_REPORT_DIR
    from cbam_viz.resources import SHIPPED_ROOT

    sub = build_parser()._subparsers._group_actions[0].choices
    defaults = {name: sub[name].get_default("out") for name in ("sanity-check", "channel-profiles", "evaluate-cams")}
    assert SHIPPED_ROOT / defaults["sanity-check"] == content.SANITY_REPORT.parent
    assert SHIPPED_ROOT / defaults["channel-profiles"] == quality.CHANNEL_PROFILES
    assert SHIPPED_ROOT / defaults["evaluate-cams"] == DEFAULT_REPORT_DIR


def test_app_command_runs_the_shipped_app_script(monkeypatch):
    """``cbam-viz app`` runs the same app.py as ``python app.py`` (the checkout's here, the wheel's copy installed)."""
    import sys

    from cbam_viz.cli import help as cli_help
    from cbam_viz.resources import SHIPPED_ROOT

    calls = []
    monkeypatch.setattr(cli_help.runpy, "run_path", lambda path, run_name: calls.append((path, run_name)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7860")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "127.0.0.1")
    assert main(["app", "--port", "7999", "--host", "0.0.0.0"]) == 0
    assert calls == [(str(SHIPPED_ROOT / "app.py"), "__main__")]
    import os

    assert os.environ["GRADIO_SERVER_PORT"] == "7999" and os.environ["GRADIO_SERVER_NAME"] == "0.0.0.0"


@pytest.mark.parametrize("command", ["evaluate", "model-card"])
def test_single_file_outputs_are_not_replaced_silently(tmp_path, capsys, command):
    """evaluate / model-card write one --out file: an existing one needs --overwrite."""
    from cbam_viz.cli import build_parser
    from cbam_viz.cli.checks import _overwrite

    out = tmp_path / "result.out"
    out.write_text("earlier result")
    required = {"evaluate": ["--pair", "p", "--data", str(tmp_path)], "model-card": []}[command]
    args = build_parser().parse_args([command, *required, "--out", str(out)])
    with pytest.raises(Exception, match="pass --overwrite to replace it"):
        _overwrite(args)
    _overwrite(build_parser().parse_args([command, *required, "--out", str(out), "--overwrite"]))
    assert out.read_text() == "earlier result"
