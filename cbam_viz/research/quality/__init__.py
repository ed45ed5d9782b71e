"""Explanation quality: do an attention model's CAMs localize the object better than the plain ResNet's?

The CBAM paper (Woo et al., ECCV 2018, arXiv 1807.06521, Fig. 4) shows it on a few pictures;
``python -m cbam_viz evaluate-cams`` measures it on boxed images, for every member of a lineup
against its reference. The public API, re-exported:

* :mod:`~cbam_viz.research.quality.boxes`: box CSV files (``Box``, :func:`read_boxes`);
* :mod:`~cbam_viz.research.quality.metrics`: localization metrics on one CAM and the catalogue ``METRICS``;
* :mod:`cbam_viz.stats` (a leaf, shared with training): bootstrap intervals, single and paired;
* :mod:`~cbam_viz.research.quality.run`: :func:`evaluate_cams` over a dataset;
* :mod:`~cbam_viz.research.quality.gates`: does a spatial gate itself localize (vs a centre Gaussian)?
* :mod:`~cbam_viz.research.quality.report`: the report's files (either version) and queries over it;
* :mod:`~cbam_viz.research.quality.forest`: the forest plot of the paired differences and its reading;
* :mod:`~cbam_viz.research.quality.view`: the app's Explanation-quality tab.

The faithfulness scores (no boxes) live in :mod:`cbam_viz.engine.faithfulness`, the pictures in
:mod:`cbam_viz.render`.
"""
from cbam_viz.research.quality.boxes import REQUIRED_COLUMNS, Box, BoxFileError, boxes_mask, check_boxes_fit, parse_boxes, read_boxes
from cbam_viz.research.quality.metrics import (
    DEFAULT_THRESHOLDS, METRICS, MetricInfo, box_hits_over_thresholds, box_iou, cam_to_box, energy_in_boxes,
    max_box_acc, per_image_text, pointing_game,
)
from cbam_viz.research.quality.report import (
    REPORT_VERSION, compared_member, load_report, load_report_cams, markdown_report, most_different_images,
    upgrade_report, write_report,
)
from cbam_viz.research.quality.forest import forest_figure, forest_plot, reading
from cbam_viz.research.quality.run import DEFAULT_FRACTIONS, DEFAULT_METHODS, evaluate_cams, summarize
from cbam_viz.stats import Interval, bootstrap, max_box_acc_stat, mean_stat, paired_bootstrap
from cbam_viz.research.quality.view import differing_images, load_app_report, record_image, render_record

__all__ = [
    "Box", "BoxFileError", "DEFAULT_FRACTIONS", "DEFAULT_METHODS", "DEFAULT_THRESHOLDS", "Interval", "METRICS",
    "MetricInfo", "REPORT_VERSION", "REQUIRED_COLUMNS", "bootstrap", "box_hits_over_thresholds", "box_iou",
    "boxes_mask", "cam_to_box", "check_boxes_fit", "differing_images", "energy_in_boxes", "evaluate_cams",
    "load_app_report", "load_report", "load_report_cams", "markdown_report", "max_box_acc", "max_box_acc_stat",
    "mean_stat", "most_different_images", "paired_bootstrap", "parse_boxes", "per_image_text", "pointing_game",
    "read_boxes", "record_image", "render_record", "summarize", "write_report", "compared_member", "upgrade_report",
    "forest_figure", "forest_plot", "reading",
]
