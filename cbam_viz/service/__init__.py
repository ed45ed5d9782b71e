"""What the app, the API and the ``explain`` command call: a photo through a lineup, its pictures and files.

It imports no Gradio. Every error a person can cause or fix becomes a
:class:`~cbam_viz.messages.UserFacingError` whose message is one plain sentence.

* :mod:`.access`: which lineup (:func:`get_lineup`), what the page says about it (:func:`describe_lineup`);
* :mod:`.analysis`: one photo in memory (:func:`analyse`): explanations, faithfulness, pictures;
* :mod:`.summary`: its JSON document, keyed by member name;
* :mod:`.files`: request folders and the CLI's files (:func:`explain_files`, :func:`save`);
* :mod:`.results`: a written result read back (downloads, click probe, gate ablation).

Tests replace the lineup a request gets by patching ``cbam_viz.service.access.get_lineup``.
"""
from cbam_viz.service.access import LineupInfo, MemberInfo, describe_lineup, get_lineup, lineup_names, member_title
from cbam_viz.service.analysis import (
    ALL_PICTURES, API_PICTURES, DISPLAY_MAX_SIDE, FAITHFULNESS_FRACTION, PAGE_PICTURES, PICTURES, UNSURE_MARGIN,
    UNSURE_PROB, Analysis, analyse, analyse_checked, open_image, warm_up,
)
from cbam_viz.service.files import (
    ALL_FILES, API_FILES, IMAGE_SUFFIXES, PAGE_FILES, BatchResult, ImageResult, collect_images, explain_files,
    is_slow_method, member_stems, save,
)
from cbam_viz.service.results import SavedResult, ablate_result, build_downloads, load_result, spatial_at
from cbam_viz.service.summary import faithfulness_summary

__all__ = [
    "LineupInfo", "MemberInfo", "describe_lineup", "get_lineup", "lineup_names", "member_title",
    "ALL_PICTURES", "API_PICTURES", "DISPLAY_MAX_SIDE", "FAITHFULNESS_FRACTION", "PAGE_PICTURES", "PICTURES",
    "UNSURE_MARGIN", "UNSURE_PROB", "Analysis", "analyse", "analyse_checked", "open_image", "warm_up",
    "ALL_FILES", "API_FILES", "IMAGE_SUFFIXES", "PAGE_FILES", "BatchResult", "ImageResult", "collect_images",
    "explain_files", "is_slow_method", "member_stems", "save",
    "SavedResult", "ablate_result", "build_downloads", "load_result", "spatial_at", "faithfulness_summary",
]
