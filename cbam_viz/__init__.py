"""cbam-viz: see what CBAM changes inside a ResNet (CBAM: Woo et al., ECCV 2018, arXiv 1807.06521).

The public API, re-exported. Importing the package pulls in torch, numpy and PIL only;
pytorch-grad-cam (and its OpenCV / scikit-learn imports) loads on the first CAM.
"""
from cbam_viz.engine.attention import record_attention
from cbam_viz.engine.explain import Explanation, ModelExplanation, Prediction, explain, explain_model, list_methods
from cbam_viz.engine.lineup import Lineup, lineup_names, load_available_lineups, load_lineup
from cbam_viz.engine.loading import LoadedModel, ModelLoadError, load_model, select_device
from cbam_viz.engine.preprocess import ImageError, open_image, to_model_batch, to_model_tensor, to_rgb
from cbam_viz.figures import composite
from cbam_viz.models import create_model, list_models
from cbam_viz.render import attention_gallery, channel_attention_image, overlay

__all__ = [
    "Explanation", "ImageError", "Lineup", "LoadedModel", "ModelExplanation", "ModelLoadError", "Prediction",
    "attention_gallery", "channel_attention_image", "composite", "create_model", "explain", "explain_model",
    "lineup_names", "list_methods", "list_models", "load_available_lineups", "load_lineup", "load_model",
    "open_image", "overlay", "record_attention", "select_device", "to_model_batch", "to_model_tensor", "to_rgb",
]
