"""Every sub-command through a table of wrong arguments: one sentence, the right exit status, no traceback.

Exit statuses (cbam_viz.cli.errors): 2 for a wrong argument or an unusable input, 1 when some input
files of a run could not be used (listed). A sub-command without a row here fails
``test_every_sub_command_has_rows``: add rows for a new one to ``CASES``.
"""
from __future__ import annotations

import argparse

import pytest

from cbam_viz.cli import errors as cli_errors
from cbam_viz.cli import build_parser, main
from tests.e2e_helpers import make_image

pytestmark = pytest.mark.usefixtures("no_cbam_env", "use_service_lineup")

# {placeholders} are filled by the `paths` fixture: MISSING (no such path), EMPTY (an empty folder),
# DATA (a 3-class ImageFolder), BOXES (its box CSV), GARBAGE (binary junk), PHOTO (an image),
# FILE (a text file), WEIGHTS (a weights folder whose manifest holds no model, one lineup "other").
CASES = [
    # train
    ("train", ["--data", "{MISSING}"], 2, "no such folder"),
    ("train", ["--data", "{DATA}", "--epochs", "0"], 2, "--epochs must be 1 or more"),
    ("train", ["--data", "{DATA}", "--batch-size", "-3"], 2, "--batch-size must be 1 or more"),
    ("train", ["--data", "{DATA}", "--epochs", "many"], 2, "invalid int value"),
    ("train", ["--data", "{DATA}", "--crop-scale", "2,1"], 2, "--crop-scale"),
    ("train", ["--data", "{DATA}", "--arch", "resnet9"], 2, "--arch: unknown model 'resnet9'"),
    ("train", ["--data", "{EMPTY}", "--max-steps", "1", "--runs", "{OUT}"], 2, "{EMPTY}"),
    # evaluate
    ("evaluate", ["--pair", "x", "--data", "{MISSING}"], 2, "no such folder"),
    ("evaluate", ["--pair", "nope", "--data", "{DATA}", "--weights", "{WEIGHTS}"], 2, "nope"),
    ("evaluate", ["--model", "a", "--data", "{DATA}", "--weights", "{MISSING}"], 2, "no such folder"),
    ("evaluate", ["--model", "a", "--data", "{DATA}", "--batch-size", "0"], 2, "--batch-size must be 1"),
    # explain
    ("explain", ["{PHOTO}", "--out", "{OUT}", "--method", "scorecm"], 2, "did you mean scorecam"),
    ("explain", ["{PHOTO}", "--out", "{OUT}", "--layer", "fc"], 2, "no spatial map"),
    ("explain", ["{PHOTO}", "--out", "{OUT}", "--layer", "layer9"], 2, "Unknown layer 'layer9'"),
    ("explain", ["{PHOTO}", "--out", "{OUT}", "--target", "zebra"], 2, "Unknown target class"),
    ("explain", ["{PHOTO}", "--out", "{OUT}", "--alpha", "2"], 2, "--alpha must be a number from 0 to 1"),
    ("explain", ["{PHOTO}", "--out", "{OUT}", "--alpha", "half"], 2, "invalid float value"),
    ("explain", ["{PHOTO}", "--out", "{FILE}"], 2, "is a file, not a folder"),
    ("explain", ["{EMPTY}", "--out", "{OUT}"], 2, "no image files"),
    ("explain", ["{MISSING}", "{PHOTO}", "--out", "{OUT}"], 1, "no such file or folder"),  # per-file list
    ("explain", ["{GARBAGE}", "--out", "{OUT}"], 1, "not an image"),
    # plot-curves
    ("plot-curves", ["--run", "nolabel"], 2, "LABEL=LOG.jsonl"),
    ("plot-curves", ["--run", "a={MISSING}"], 2, "LABEL=LOG.jsonl"),
    ("plot-curves", ["--run", "a={GARBAGE}", "--out", "{OUT}/c.png"], 2, "should be text"),
    # model-card
    ("model-card", ["--weights", "{MISSING}"], 2, "no such folder"),
    ("model-card", ["--weights", "{EMPTY}"], 2, "manifest"),
    ("model-card", ["--weights", "{WEIGHTS}", "--pair", "nope"], 2, "nope"),
    # evaluate-cams
    ("evaluate-cams", ["--data", "{DATA}", "--boxes", "{MISSING}"], 2, "--boxes"),
    ("evaluate-cams", ["--data", "{DATA}", "--boxes", "{EMPTY}"], 2, "is a folder, not a file"),
    ("evaluate-cams", ["--data", "{DATA}", "--boxes", "{GARBAGE}", "--out", "{OUT}"], 2, "not a text (CSV) file"),
    ("evaluate-cams", ["--data", "{MISSING}", "--boxes", "{BOXES}"], 2, "no such folder"),
    ("evaluate-cams", ["--data", "{DATA}", "--boxes", "{BOXES}", "--methods", "scorecm"], 2, "did you mean scorecam"),
    ("evaluate-cams", ["--data", "{DATA}", "--boxes", "{BOXES}", "--method-limit", "scorecam=x"], 2, "METHOD=N"),
    ("evaluate-cams", ["--data", "{DATA}", "--boxes", "{BOXES}", "--fractions", "2"], 2, "--fractions"),
    ("evaluate-cams", ["--data", "{DATA}", "--boxes", "{BOXES}", "--max-images", "-3"], 2, "--max-images"),
    ("evaluate-cams", ["--data", "{DATA}", "--boxes", "{BOXES}", "--layer", "layer9", "--out", "{OUT}"], 2,
     "layer9"),
    # ablate-gates
    ("ablate-gates", ["--data", "{DATA}", "--max-images", "0"], 2, "--max-images must be 1 or more, not 0"),
    ("ablate-gates", ["--data", "{DATA}", "--max-images", "-3"], 2, "--max-images must be 1 or more, not -3"),
    ("ablate-gates", ["--data", "{MISSING}"], 2, "no such folder"),
    ("ablate-gates", ["--data", "{EMPTY}", "--out", "{OUT}"], 2, ""),
    ("ablate-gates", ["--data", "{DATA}", "--constant", "two"], 2, "invalid choice"),
    # channel-profiles
    ("channel-profiles", ["--data", "{DATA}", "--batch-size", "0"], 2, "--batch-size must be 1"),
    ("channel-profiles", ["--data", "{EMPTY}", "--out", "{OUT}"], 2, ""),
    ("channel-profiles", ["--data", "{FILE}"], 2, "is a file, not a folder"),
    # sanity-check
    ("sanity-check", ["--data", "{DATA}", "--layer", "layer9", "--out", "{OUT}", "--max-images", "1"], 2, "layer9"),
    ("sanity-check", ["--data", "{DATA}", "--methods", "nope"], 2, "Unknown CAM method"),
    ("sanity-check", ["--data", "{MISSING}"], 2, "no such folder"),
    ("sanity-check", ["--data", "{DATA}", "--threads", "0"], 2, "--threads must be 1"),
    # add-model / add-lineup (cbam_viz.cli.models)
    ("add-model", ["{MISSING}", "--name", "m", "--weights", "{WEIGHTS}"], 2, ""),
    ("add-model", ["{GARBAGE}", "--name", "m", "--weights", "{WEIGHTS}"], 2, ""),
    ("add-model", ["{GARBAGE}", "--name", "m", "--weights", "{MISSING}"], 2, "no such folder"),
    ("add-lineup", ["l", "nope", "--weights", "{WEIGHTS}"], 2, "nope"),
    # fit-ood (cbam_viz.research.ood_fit)
    ("fit-ood", ["--data", "{MISSING}"], 2, "no such folder"),
    ("fit-ood", ["--data", "{DATA}", "--batch-size", "0"], 2, "--batch-size must be 1"),
    ("fit-ood", ["--data", "{DATA}", "--method", "gradcam"], 2, "invalid choice"),
    # app (it starts a server: only its arguments are checked here)
    ("app", ["--port", "http"], 2, "invalid int value"),
    ("app", ["--what"], 2, "unrecognized arguments"),
]


@pytest.fixture()
def paths(tmp_path, boxed_folder, micro_lineup, monkeypatch):
    """The placeholders of CASES, and the research commands' lineup replaced by the tiny one."""
    import json

    import cbam_viz.engine.lineup

    monkeypatch.setattr(cbam_viz.engine.lineup, "load_lineup", lambda *a, **k: micro_lineup)  # research commands
    data, boxes = boxed_folder
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "text.txt").write_text("not a folder\n")
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "manifest.json").write_text(json.dumps(
        {"models": {}, "pairs": {}, "lineups": {"other": {"members": ["x"], "reference": "x"}}}))
    return {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty"), "DATA": str(data),
            "BOXES": str(boxes), "GARBAGE": str(tmp_path / "garbage.bin"), "FILE": str(tmp_path / "text.txt"),
            "PHOTO": str(make_image(tmp_path / "photo.png", size=(72, 72))), "OUT": str(tmp_path / "out"),
            "WEIGHTS": str(weights)}


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and everything printed; argparse's own refusals end in SystemExit(2)."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("command, args, status, phrase", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_wrong_argument_is_one_sentence(command, args, status, phrase, paths, capsys):
    argv = [command, *(a.format(**paths) for a in args)]
    if command in ("explain", "evaluate", "ablate-gates", "channel-profiles", "sanity-check", "evaluate-cams"):
        argv.append("--no-progress")
    code, text = run(argv, capsys)
    assert "Traceback" not in text
    assert code == status, text
    assert phrase.format(**paths) in text
    errors = [line for line in text.splitlines() if "error:" in line]
    if status == 2:
        assert len(errors) == 1, text  # exactly one sentence says what is wrong


def test_every_sub_command_has_rows():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = sorted(set(sub.choices) - {c[0] for c in CASES})
    assert not missing, f"sub-commands without wrong-argument rows in tests/test_cli_errors.py: {missing}"


def test_a_bug_is_one_sentence_with_status_3(monkeypatch, capsys, paths):
    """An exception nobody expected still ends in one line (and a pointer to the traceback)."""
    from cbam_viz import service

    def broken(*a, **k):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(service, "analyse_checked", broken)
    monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
    code, text = run(["explain", paths["PHOTO"], "--out", paths["OUT"], "--no-progress"], capsys)
    assert code == 3 and "Traceback" not in text
    assert "internal error (TypeError: unsupported operand.)" in text and cli_errors.DEBUG_ENV in text
    monkeypatch.setenv(cli_errors.DEBUG_ENV, "1")
    code, text = run(["explain", paths["PHOTO"], "--out", paths["OUT"] + "2", "--no-progress"], capsys)
    assert code == 3 and "Traceback" in text  # asked for


def test_interrupt_is_one_line(monkeypatch, capsys, paths):
    from cbam_viz import service

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(service, "analyse_checked", interrupted)
    code, text = run(["explain", paths["PHOTO"], "--out", paths["OUT"], "--no-progress"], capsys)
    assert code == 130 and "interrupted" in text and "Traceback" not in text
