"""The model card (About tab, ``python -m cbam_viz model-card``): a lineup's records side by side.

Records are built here (tiny, no training); the manifest tests write manifests into tmp_path and
never a weights file: the card must come from the records alone.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from cbam_viz.service import model_card
from cbam_viz.cli import main
from cbam_viz.engine.lineup import Lineup
from cbam_viz.service.model_card import (
    CardMember, choice_sentence, manifest_card, paired_sentence, records_card,
)
from cbam_viz.models.weights import WeightRecord, read_manifest, update_manifest
from tests.conftest import make_loaded

CLASSES = [{"id": "n0", "name": "tench"}, {"id": "n1", "name": "church"}]
RECIPE = {"epochs": 100, "sizes": [[0, 96], [90, 176]], "crop_scale": [0.25, 1.0], "mean": [0.5] * 3}


def record(name, arch, *, params=1000, top1=None, per_class=None, hardware="cpu: AMD EPYC, 2 threads",
           recipe=RECIPE, training=None, **metrics) -> WeightRecord:
    if top1 is not None:
        metrics.update(val_top1=top1, val_n=3925)
    if per_class is not None:
        metrics["val_per_class"] = per_class
    return WeightRecord(name=name, file=f"{name}.safetensors", arch=arch, sha256="ab" * 32, num_params=params,
                        classes=CLASSES, mean=[0.5] * 3, std=[0.5] * 3, input_size=192, recipe=recipe,
                        training=training or {"hardware": [hardware], "precision": ["bf16"], "epochs": 100,
                                              "wall_time_s": 8340.0, "holdout_images": 0},
                        metrics=metrics)


def diff_against(reference, value, *, low=-0.0092, high=0.0066, member_right=122, reference_right=127, p=0.8):
    return {"reference": reference, "difference": value, "ci95": [low, high], "n": 3925, "n_boot": 10000,
            "only_member_right": member_right, "only_reference_right": reference_right, "mcnemar_p": p}


def three_members() -> list[CardMember]:
    plain = record("r18", "resnet18", top1=0.8989, per_class={"n0": 0.9, "n1": 0.8})
    se = record("r18_se", "resnet18_se", params=1004, top1=0.9012, per_class={"n0": 0.92, "n1": 0.81},
                hardware="cuda: NVIDIA H100", val_paired_difference=diff_against("r18", 0.0023, p=0.46))
    cbam = record("r18_cbam", "resnet18_cbam", params=1008, top1=0.8976, per_class={"n0": 0.95, "n1": None},
                  val_paired_difference=diff_against("r18", -0.0013))
    return [CardMember(r.name, r.arch, r) for r in (plain, se, cbam)]


def test_every_member_side_by_side_with_its_difference_against_the_reference():
    card = records_card("family", three_members(), "r18")
    assert card.startswith("### Lineup `family`: resnet18 | resnet18_se | resnet18_cbam")
    assert "| | `r18` (reference) | `r18_se` | `r18_cbam` |" in card and "|---|---|---|---|" in card
    assert "| val top-1 (3,925 images) | **89.89 %** | **90.12 %** | **89.76 %** |" in card
    assert "| parameters | 1,000 | 1,004 (+0.4 %) | 1,008 (+0.8 %) |" in card
    assert "| trained on | cpu: AMD EPYC, 2 threads | cuda: NVIDIA H100 | cpu: AMD EPYC, 2 threads |" in card
    assert "| precision | bf16 | bf16 | bf16 |" in card and "| epochs, wall time | 100, 139 min |" in card
    assert "| val top-1 − reference (paired) | – | +0.23 [-0.92, +0.66], p = 0.46 | -0.13 [-0.92, +0.66], p = 0.8 |" in card
    assert ("- `r18_cbam` − `r18`: -0.13 points, 95 % paired bootstrap interval [-0.92, +0.66], 10,000 resamples, "
            "on the same 3,925 images; 122 images only this model gets right, 127 only the reference; "
            "two-sided exact McNemar p = 0.8.") in card
    assert card.count("− `r18`:") == 2 and "flip" not in card  # not measured: no row, no sentence
    assert "- Recipe (the same for all 3): epochs=100, sizes=0:96,90:176, crop_scale=0.25-1.0" in card
    assert "| class | `r18` | `r18_se` | `r18_cbam` | `r18_se` − ref | `r18_cbam` − ref |" in card
    assert "| tench | 90.00 % | 92.00 % | 95.00 % | +2.0 | +5.0 |" in card
    assert "| church | 80.00 % | 81.00 % | – | +1.0 | – |" in card


def test_a_difference_against_another_reference_or_a_stale_pair_difference_is_not_shown():
    plain, se, cbam = three_members()
    moved = replace(se.record, metrics={**se.record.metrics, "val_paired_difference": diff_against("r18_cbam", 0.01)})
    card = records_card("family", [plain, se._replace(record=moved), cbam], "r18")
    assert card.count("− `r18`:") == 1 and "`r18_se` − `r18`" not in card
    old = {"cbam_minus_baseline": -0.0079, "ci95": [-0.0153, -0.0003], "n": 3925, "n_boot": 10000,
           "only_cbam_right": 98, "only_baseline_right": 129, "mcnemar_p": 0.046}
    # the pair form, stored in both records: CBAM minus the plain reference
    base = replace(plain.record, metrics={**plain.record.metrics, "val_paired_difference": old})
    cb = replace(cbam.record, metrics={**cbam.record.metrics, "val_paired_difference": old})
    card = records_card("pair", [plain._replace(record=base), cbam._replace(record=cb)], "r18")
    assert ("- `r18_cbam` − `r18`: -0.79 points, 95 % paired bootstrap interval [-1.53, -0.03], 10,000 resamples, "
            "on the same 3,925 images; 98 images only this model gets right, 129 only the reference") in card
    assert "| val top-1 − reference (paired) | – | -0.79 [-1.53, -0.03], p = 0.046 |" in card
    # one record retrained since: its old difference is not the pair's any more
    card = records_card("pair", [plain, cbam._replace(record=cb)], "r18")
    assert "− `r18`:" not in card and "(paired)" not in card
    # the pair form read against a reference that is not the plain model would flip its sign: refused
    card = records_card("pair", [cbam._replace(record=cb), plain._replace(record=base)], "r18_cbam")
    assert "− `r18_cbam`:" not in card


def test_model_card_markdown_reads_a_loaded_lineup_and_says_untrained_plainly():
    plain, se, cbam = three_members()
    members = tuple(replace(make_loaded(m.arch, seed=i), name=m.name, record=m.record, trained=True)
                    for i, m in enumerate((plain, cbam)))
    lineup = Lineup(name="trained", members=members, reference="r18")
    card = model_card_markdown_of(lineup)
    assert "| | `r18` (reference) | `r18_cbam` |" in card and "**89.76 %**" in card
    untrained = Lineup(name="u", members=(make_loaded("resnet18"),), reference="tiny resnet18")
    card = model_card_markdown_of(untrained)
    assert "Untrained" in card and "val top-1" not in card
    half = Lineup(name="half", members=(replace(members[0], trained=False), members[1]), reference="r18")
    assert "| | `r18` (reference) (untrained) | `r18_cbam` |" in model_card_markdown_of(half)


def model_card_markdown_of(lineup) -> str:
    return model_card.model_card_markdown(lineup)


@pytest.mark.parametrize("carried", [False, True])
def test_the_card_says_how_weights_and_size_were_chosen(carried):
    selection = {"weights": "ema", "input_size": 192, "mean_holdout_top1": 0.90329}
    if carried:  # the earlier lineup's scores travel under carried_from
        selection = {"weights": "ema", "input_size": 192, "carried_from": {
            "pair": "resnet18-imagenette", "holdout_images": 729, "mean_holdout_top1": 0.90329}}
    training = {"holdout_images": 0 if carried else 729, "selection": selection}
    members = [CardMember(n, a, record(n, a, training=training)) for n, a in (("a", "resnet18"), ("b", "resnet18_se"),
                                                                             ("c", "resnet18_cbam"))]
    card = records_card("t", members, "a")
    assert card.count("- Shipped as (all 3): EMA weights at 192 px") == 1
    assert "mean held-out top-1: 90.33 %" in card
    if carried:
        assert "as `resnet18-imagenette` chose on its 729 held-out training files" in card
        assert "then trained again with the same recipe on every training file" in card
    else:
        assert "chosen on 729 held-out training files, never on val" in card
    assert choice_sentence({"holdout_images": 0}) is None  # a run that chose nothing says nothing
    # carried from a final lineup that carried it in turn: the sentence names where it was chosen
    twice = {"holdout_images": 0, "selection": {"weights": "ema", "input_size": 192, "carried_from": {
        "pair": "final", "holdout_images": 0, "via": {"pair": "held-out", "holdout_images": 729,
                                                      "mean_holdout_top1": 0.90329}}}}
    assert choice_sentence(twice).startswith("EMA weights at 192 px, as `held-out` chose on its 729 held-out "
                                             "training files (mean held-out top-1: 90.33 %)")
    unnumbered = choice_sentence({"selection": {"weights": "raw", "input_size": 160}})
    assert unnumbered == "raw weights at 160 px, chosen on held-out training files, never on val"
    lineup_carried = choice_sentence({"selection": {"weights": "ema", "input_size": 192,
                                                    "carried_from": {"lineup": "family"}}})
    assert lineup_carried.startswith("EMA weights at 192 px, as `family` chose on its held-out training files")


def test_different_recipes_and_a_half_trained_or_foreign_lineup_claim_nothing_for_the_others():
    plain, se, cbam = three_members()
    other = cbam._replace(record=replace(cbam.record, recipe={**RECIPE, "epochs": 90}))
    card = records_card("t", [plain, other], "r18")
    assert "- Recipe (`r18`): epochs=100" in card and "- Recipe (`r18_cbam`): epochs=90" in card
    foreign = WeightRecord(name="r", file="/srv/secret/folder/RN50_CBAM.pth", arch="resnet18_cbam", sha256="",
                           num_params=2, classes=CLASSES, mean=[0.5] * 3, std=[0.5] * 3, input_size=64,
                           training={"selection": {"weights": "ema", "input_size": 64}})
    card = records_card("t", [CardMember("base", "resnet18", None), CardMember("r", "resnet18_cbam", foreign)], "base")
    assert "- Shipped as (`r`): EMA weights at 64 px" in card and "(both)" not in card
    assert "`RN50_CBAM.pth`" in card and "/srv/secret" not in card  # the server's folders stay private
    assert "(untrained)" in card
    alone = records_card("one", [CardMember("r", "resnet18_cbam", foreign)], "r")
    assert "Reference:" not in alone and "(reference)" not in alone  # a lineup of one compares nothing


def test_a_malformed_difference_leaves_fields_out_instead_of_failing():
    assert paired_sentence({"n": 3}) is None  # no difference: no sentence
    assert paired_sentence({"difference": 0.01, "mcnemar_p": None}) == "+1.00 points."
    assert paired_sentence({"difference": 0.01, "ci95": ["x", 1], "n": "many", "only_member_right": 3}) == "+1.00 points."
    plain, _, cbam = three_members()
    broken = replace(cbam.record, metrics={**cbam.record.metrics,
                                           "val_paired_difference": {"reference": "r18", "difference": "big"}})
    card = records_card("t", [plain, cbam._replace(record=broken)], "r18")
    assert "(paired)" not in card and "− `r18`:" not in card


def _write_folder(folder, lineups: dict, records) -> None:
    folder.mkdir()
    for r in records:
        update_manifest(folder, record=r)
    for name, entry in lineups.items():
        update_manifest(folder, lineup=(name, entry))


def test_manifest_card_finds_a_lineup_in_any_weights_folder_without_reading_weights(tmp_path):
    plain, se, cbam = three_members()
    _write_folder(tmp_path / "mine", {"family": {"members": ["r18", "r18_se", "r18_cbam"], "reference": "r18"}},
                  [plain.record, se.record, cbam.record])
    _write_folder(tmp_path / "shipped", {"shipped": {"members": ["r18"], "reference": "r18", "default": True}},
                  [replace(plain.record, metrics={"val_top1": 0.5})])
    folders = f"{tmp_path / 'shipped'}:{tmp_path / 'mine'}"
    assert not list(tmp_path.rglob("*.safetensors"))  # records only: no weights file exists
    card = manifest_card("family", weights_dir=folders)  # the second folder's lineup, its own records
    assert "| val top-1 (3,925 images) | **89.89 %** | **90.12 %** | **89.76 %** |" in card
    assert manifest_card(weights_dir=folders).startswith("### Lineup `shipped`: resnet18")  # the default
    with pytest.raises(KeyError, match="known: family, shipped"):
        manifest_card("nope", weights_dir=folders)
    update_manifest(tmp_path / "mine", lineup=("gap", {"members": ["r18", "lost"], "reference": "r18"}))
    assert "lost" in read_manifest(tmp_path / "mine")["lineups"]["gap"]["members"]
    with pytest.raises(KeyError, match="'lost', which has no record"):
        manifest_card("gap", weights_dir=folders)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no lineup in"):
        manifest_card(weights_dir=empty)


def test_model_card_command_takes_a_lineup_and_the_old_pair_option(tmp_path, capsys):
    plain, se, cbam = three_members()
    _write_folder(tmp_path / "w", {"family": {"members": ["r18", "r18_se", "r18_cbam"], "reference": "r18"}},
                  [plain.record, se.record, cbam.record])
    assert main(["model-card", "--weights", str(tmp_path / "w"), "--lineup", "family"]) == 0
    assert "| | `r18` (reference) | `r18_se` | `r18_cbam` |" in capsys.readouterr().out
    out = tmp_path / "card.md"
    assert main(["model-card", "--weights", str(tmp_path / "w"), "--pair", "family", "--out", str(out)]) == 0
    assert out.read_text().startswith("### Lineup `family`")
    assert main(["model-card", "--weights", str(tmp_path / "w"), "--lineup", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no lineup 'nope'; known: family" in err and "Traceback" not in err
