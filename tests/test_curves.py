"""``plot-curves``: the model card's training-curves figure from the trainer's logs."""
from __future__ import annotations

import json

from PIL import Image

from cbam_viz.cli import main
from cbam_viz.training.curves import monitored_split, plot_training_curves, read_log


def _write_log(path, epochs, *, key="holdout_top1"):
    lines = []
    for e in range(1, epochs + 1):
        entry = {"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.1 * e}
        if e % 2 == 0:
            entry.update({key: 0.5 + 0.01 * e, f"{key}_ema": 0.51 + 0.01 * e})
        lines.append(json.dumps(entry))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_resumed_epoch_lines_are_replaced_by_the_later_one(tmp_path):
    log = _write_log(tmp_path / "log.jsonl", 3)
    with open(log, "a") as f:
        f.write(json.dumps({"epoch": 2, "train_loss": 9.0, "train_acc": 0.0}) + "\n")
    entries = read_log(log)
    assert [e["epoch"] for e in entries] == [1, 2, 3] and entries[1]["train_loss"] == 9.0


def test_cli_draws_both_runs_and_refuses_a_missing_log(tmp_path, capsys):
    a = _write_log(tmp_path / "a.jsonl", 6)
    b = _write_log(tmp_path / "b.jsonl", 6, key="val_top1")  # an older run, monitored on --val
    out = tmp_path / "docs" / "curves.png"
    assert main(["plot-curves", "--run", f"resnet18={a}", "--run", f"resnet18_cbam={b}", "--out", str(out),
                 "--eval-size", "192"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 800
    assert not list(out.parent.glob(".*tmp"))  # written atomically
    assert main(["plot-curves", "--run", f"x={tmp_path / 'missing.jsonl'}", "--out", str(out)]) == 2
    assert "LABEL=LOG" in capsys.readouterr().err


def test_runs_that_monitored_nothing_get_no_empty_panel(tmp_path, recwarn):
    """A final run on every training file scores no split; an empty third axis would read as a failure."""
    log = tmp_path / "full.jsonl"
    log.write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.2 * e}) + "\n"
                           for e in (1, 2, 3)))
    assert monitored_split(read_log(log)) is None
    assert monitored_split(read_log(_write_log(tmp_path / "h.jsonl", 4))) == "holdout"
    two, three = tmp_path / "two.png", tmp_path / "three.png"
    plot_training_curves({"resnet18": log, "resnet18_cbam": log}, two)
    plot_training_curves({"resnet18": log, "held-out run": tmp_path / "h.jsonl"}, three)
    with Image.open(two) as a, Image.open(three) as b:
        assert a.width < 0.75 * b.width and a.height == b.height
    assert not [w for w in recwarn if "legend" in str(w.message)]
