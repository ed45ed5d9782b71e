"""The Explanation-quality tab's pictures: most different images, photos found or drawn on grey."""
import shutil

import numpy as np
import pytest
from PIL import Image

from cbam_viz.research.quality import METRICS, evaluate_cams, load_report, write_report
from cbam_viz.research.quality import view as quality_view
from tests.research_lineups import make_lineup

pytestmark = pytest.mark.usefixtures("no_cbam_env")


@pytest.fixture
def report_dir(boxed_folder, tmp_path):
    data, csv = boxed_folder
    report, cams = evaluate_cams(data, csv, lineup=make_lineup(), methods=["gradcam"], n_boot=50, progress=False)
    write_report(report, cams, tmp_path / "report")
    return tmp_path / "report", data


def test_pictures_use_the_photos_when_present(report_dir):
    path, data = report_dir
    report, note = quality_view.load_app_report(path)
    assert report is not None and note == ""
    pictures, note = quality_view.differing_images(report, "energy", "gradcam", "both", 3)
    assert len(pictures) == 3 and note == ""
    for picture, caption in pictures:
        # the reference and the compared member (default: the last), by name
        assert "Energy in box" in caption and "tiny resnet18 " in caption and "tiny resnet18_cbam" in caption
        assert picture.width > 3 * 40 and picture.height > 40
        # the first panel is the photo itself: not the grey placeholder
        assert np.asarray(picture)[30:38, 10:40].std() > 1


def test_missing_photos_are_drawn_on_grey_and_found_through_data_dir(report_dir, tmp_path, monkeypatch):
    path, data = report_dir
    moved = tmp_path / "elsewhere"
    shutil.move(str(data), moved)
    report, _ = quality_view.load_app_report(path)
    pictures, note = quality_view.differing_images(report, "pointing", None, "member", 2, member="tiny resnet18_se")
    assert len(pictures) == 2 and "CBAM_VIZ_DATA" in note
    first_panel = np.asarray(pictures[0][0])[42:46, 24:28]  # inside the box outline, below the text
    assert (first_panel == quality_view.PLACEHOLDER_GREY).all()
    pictures, note = quality_view.differing_images(report, "pointing", None, "member", 2, data_dir=moved)
    assert note == ""
    monkeypatch.setenv("CBAM_VIZ_DATA", str(moved))
    assert quality_view.differing_images(report, "road", None, "reference", 1)[1] == ""


def test_report_problems_become_a_note(report_dir, tmp_path, monkeypatch):
    path, _ = report_dir
    report, note = quality_view.load_app_report(tmp_path / "nowhere")
    assert report is None and "No per-image results" in note
    (path / "cams.npz").unlink()
    report, note = quality_view.load_app_report(path)
    assert report is None and "cams.npz" in note
    monkeypatch.setenv("CBAM_VIZ_QUALITY_REPORT", str(tmp_path / "nowhere"))
    assert quality_view.load_app_report()[0] is None


def test_bad_choice_is_a_clear_error(report_dir):
    report = load_report(report_dir[0])
    with pytest.raises(ValueError, match="unknown metric"):
        quality_view.differing_images(report, "accuracy", None)
    with pytest.raises(ValueError, match="not in this report"):
        quality_view.differing_images(report, "energy", "scorecam")


def test_metric_choices_cover_every_metric():
    assert [key for _, key in quality_view.metric_choices()] == list(METRICS)


def test_shipped_report_renders_every_metric():
    """The committed report and CAMs (docs/explanation_quality) are what the app tab shows."""
    report, note = quality_view.load_app_report()
    assert report is not None, note
    for key in METRICS:
        pictures, _ = quality_view.differing_images(report, key, quality_view.method_choices(report)[0], "both", 2)
        assert len(pictures) == 2
        assert isinstance(pictures[0][0], Image.Image) and pictures[0][0].width > pictures[0][0].height


def test_the_tab_sets_any_member_beside_the_reference(report_dir, monkeypatch):
    """The tab's "compared with" choice: every member but the reference, the last first (the default),
    and the chosen one is the CAM drawn beside the reference's."""
    from cbam_viz.app import content, quality

    path, _ = report_dir
    report, _ = quality_view.load_app_report(path)
    others = [m for m in report["members"] if m != report["reference"]]
    assert len(others) == 2 and quality.compared_members(report) == others[::-1]
    assert quality.compared_members({"members": ["a"], "reference": "a"}) == ["a"]  # a lineup of one
    assert quality.compared_members(None) == []
    monkeypatch.setattr(content, "quality_report", lambda: (report, ""))
    monkeypatch.setattr(quality, "quality_report", lambda: (report, ""))
    for member in others:
        pictures, _ = quality.quality_differences("energy", "gradcam", "both", 2, member)
        assert pictures and all(member in caption for _, caption in pictures)
        assert all(o not in caption for o in others if o != member for _, caption in pictures)
    default, _ = quality.quality_differences("energy", "gradcam", "both", 2)
    assert [c for _, c in default] == [c for _, c in quality.quality_differences("energy", "gradcam", "both", 2,
                                                                                  others[-1])[0]]
