"""cbam-viz web app: what CBAM changes inside a ResNet, side by side with its baseline twin.

Layout and event wiring only; everything it calls lives in :mod:`cbam_viz.service`.
Run ``python app.py`` (127.0.0.1:7860; ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` override).

Environment:
    CBAM_VIZ_CONCURRENCY      explanations run at once (default 2)
    CBAM_VIZ_QUEUE_SIZE       requests waiting at most before new ones are refused (default 32)
    CBAM_VIZ_MAX_FILE_SIZE    largest upload, e.g. "20mb" (default)
    CBAM_VIZ_MAX_IMAGES       images per request (default 16)
    CBAM_VIZ_WARMUP           "0": no warm-up explanation at start-up (default: one, in the background)
    CBAM_VIZ_WEIGHTS_DIR      folder with manifest.json and the weights (default: the repository's weights/)
    CBAM_VIZ_QUALITY_REPORT   evaluate-cams output shown in the Explanation-quality tab
                              (default: docs/explanation_quality)
    CBAM_VIZ_DATA             where that report's boxed photos are, if not where they were evaluated

API (``gradio_client``): ``/explain`` (one image) and ``/info`` (classes, layers, methods); see
the "Use via API" link at the bottom of the page.
"""
from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import gradio as gr

from cbam_viz import quality_view, service
from cbam_viz.examples import list_examples

ROOT = Path(__file__).resolve().parent
CONCURRENCY = int(os.environ.get("CBAM_VIZ_CONCURRENCY", "2"))
QUEUE_SIZE = int(os.environ.get("CBAM_VIZ_QUEUE_SIZE", "32"))
MAX_FILE_SIZE = os.environ.get("CBAM_VIZ_MAX_FILE_SIZE", "20mb")
MAX_IMAGES = int(os.environ.get("CBAM_VIZ_MAX_IMAGES", "16"))
QUALITY_DOC = ROOT / "docs" / "explanation_quality.md"

QUALITY_REPORT, QUALITY_NOTE = quality_view.load_app_report()
PAIRS = service.pair_names()
METHODS = service.list_methods()
EXAMPLES = list_examples()

INTRO = """\
# cbam-viz: what does CBAM change inside a ResNet?

**CBAM** (Convolutional Block Attention Module, [Woo et al., ECCV 2018](https://arxiv.org/abs/1807.06521))
adds two small gates to every residual block: a **channel gate** that re-weights *what* feature
maps matter (one weight per channel, from average- and max-pooled features through a shared MLP)
and then a **spatial gate** that re-weights *where* to look (one weight per position, from a 7x7
convolution over channel-pooled maps). Upload a photo to see a plain ResNet and its CBAM twin,
trained the same way, side by side: their predictions, their Grad-CAM heatmaps, and what every
CBAM gate did to the features.
"""

QUALITY_PLACEHOLDER = "Explanation quality: not measured yet."
QUALITY_FIGURE = ROOT / "docs" / "explanation_quality" / "summary.png"


def _quality_markdown() -> str:
    """docs/explanation_quality.md without its image lines (the tab shows the figure itself)."""
    try:
        text = QUALITY_DOC.read_text(encoding="utf-8")
    except OSError:
        return QUALITY_PLACEHOLDER
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("!["))


def _pair_markdown(info: service.PairInfo) -> str:
    lines = [f"**Loaded pair:** `{info.name}` ({info.baseline_name} vs {info.cbam_name}, on {info.device}). "
             f"{service.classes_sentence(info.classes)}."]
    lines += [f"\n> **Warning:** {w}" for w in info.warnings]
    return "\n".join(lines)


def _timings_markdown(timings: dict[str, float], per_model: dict[str, dict[str, float]]) -> str:
    rows = ["| step | seconds |", "|---|---:|"]
    rows += [f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in timings.items()]
    for role, t in per_model.items():
        rows += [f"| {role}: {k.replace('_', ' ')} | {v:.3f} |" for k, v in t.items()]
    return "\n".join(rows)


def _status_markdown(warnings, failures) -> str:
    lines = [f"> **Note:** {w}" for w in warnings]
    lines += [f"> **Skipped {name}:** {reason}" for name, reason in failures]
    return "\n\n".join(lines)


# ------------------------------------------------------------------------------ event functions

def on_load(pair_name: str):
    """Fill the pair-dependent parts of the page (classes, layers, warnings, model card)."""
    return on_pair_change(pair_name)


def on_pair_change(pair_name: str):
    try:
        pair = service.get_pair(pair_name)
    except service.UserFacingError as err:
        gr.Warning(str(err))
        return (f"> **Error:** {err}", gr.update(), gr.update(), f"> **Error:** {err}")
    info = service.describe_pair(pair)
    return (
        _pair_markdown(info),
        gr.update(choices=info.targets, value=service.AUTO_TARGET),
        gr.update(choices=info.layer_choices, value=service.AUTO_LAYER),
        service.model_card_markdown(pair),
    )


def _view(item: dict):
    """The components showing one image's result, from its stored (serialisable) dict."""
    return (
        item["labels"]["baseline"], item["overlays"]["baseline"],
        item["labels"]["cbam"], item["overlays"]["cbam"],
        item["faithfulness"], item["faithfulness_md"],
        item["spatial"], item["channel"], item["timings_md"], item["files"],
    )


def _channel_overview(gallery: list[tuple[str, str]]) -> str | None:
    """The one picture stacking every block's channel attention (the per-block strips repeat it)."""
    for path, caption in gallery:
        if caption == service.CHANNEL_OVERVIEW_CAPTION:
            return path
    return gallery[0][0] if gallery else None


def _uploads(*values) -> tuple[list[str], list[str | None]]:
    """Paths and original names of raw upload payloads (events run with ``preprocess=False``).

    We decode uploads ourselves (:func:`cbam_viz.service.open_image`) so a broken file gets our
    one-sentence message instead of Gradio's preprocessing error. Gradio still checks that every
    path lies in its upload folder before the function runs.
    """
    paths, names = [], []
    for value in values:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and item.get("path"):
                paths.append(item["path"])
                names.append(item.get("orig_name"))
            elif isinstance(item, str) and item:
                paths.append(item)
                names.append(None)
    return paths, names


def explain_ui(image, files, pair_name, method, target, layer, alpha):
    """The Explain button: one or several images -> the side-by-side view of the first one."""
    sources, names = _uploads(image, files)
    try:
        batch = service.explain_files(sources, names=names, pair_name=pair_name, method=method, target=target,
                                      layer=layer, alpha=alpha, max_images=MAX_IMAGES)
    except service.UserFacingError as err:
        raise gr.Error(str(err), print_exception=False) from None
    except Exception as err:  # noqa: BLE001  the server keeps serving; the person gets one sentence
        raise gr.Error(service.format_error(err)) from None
    items = []
    for r in batch.results:
        a = r.analysis
        files_out = [str(r.files[k]) for k in ("png", "json", "npz")]
        if batch.archive is not None:
            files_out.append(str(batch.archive))
        per_model = {role: getattr(a.explanation, role).timings for role in ("baseline", "cbam")}
        items.append({
            "name": a.name,
            "labels": {"baseline": a.labels("baseline"), "cbam": a.labels("cbam")},
            "overlays": {k: str(v) for k, v in r.overlays.items()},
            "spatial": r.spatial_gallery, "channel": _channel_overview(r.channel_gallery),
            "faithfulness": str(r.faithfulness) if r.faithfulness else None,
            "faithfulness_md": service.faithfulness_markdown(a.summary.get("faithfulness")),
            "timings_md": _timings_markdown(a.timings, per_model), "files": files_out,
            "warnings": list(a.warnings),
        })
    names = [f"{i + 1}. {it['name']}" for i, it in enumerate(items)]
    first = items[0]
    status = _status_markdown(first["warnings"], batch.failures)
    picker = gr.update(choices=names, value=names[0], visible=len(items) > 1)
    return (items, picker, status, *_view(first))


def show_item(choice: str, items: list[dict]):
    """The image picker: show another image of the last batch."""
    if not items or not choice:
        raise gr.Error("Explain an image first.", print_exception=False)
    index = int(choice.split(".", 1)[0]) - 1
    item = items[max(0, min(index, len(items) - 1))]
    return (_status_markdown(item["warnings"], []), *_view(item))


def explain_api(image, method, target, layer, alpha, pair_name):
    """``/explain``: one image -> (summary JSON, baseline CAM, CBAM CAM, composite, attention, files).

    The summary JSON holds both models' top-5 predictions, the CAM targets, the warnings, the
    timings and metadata (the same document as the JSON download).
    """
    sources, names = _uploads(image)
    if not sources:
        raise gr.Error("Please send an image file.", print_exception=False)
    try:
        batch = service.explain_files(sources[:1], names=names[:1], pair_name=pair_name, method=method,
                                      target=target, layer=layer, alpha=alpha, max_images=1)
    except service.UserFacingError as err:
        raise gr.Error(str(err), print_exception=False) from None
    except Exception as err:  # noqa: BLE001
        raise gr.Error(service.format_error(err)) from None
    r = batch.results[0]
    attention = r.spatial_gallery + r.channel_gallery
    files = [str(r.files[k]) for k in ("json", "npz")]
    return (r.analysis.summary, str(r.overlays["baseline"]), str(r.overlays["cbam"]), str(r.files["png"]),
            attention, files)


@functools.lru_cache(maxsize=8)
def _differing_images(metric: str, method: str, direction: str, k: int):
    # The report never changes while the app runs: the same choice gives the same pictures.
    return quality_view.differing_images(QUALITY_REPORT, metric, method, direction, k)


def show_differences(metric: str, method: str, direction: str, k: float):
    """The Explanation-quality tab: the images where the two CAMs score most differently."""
    if QUALITY_REPORT is None:
        return [], QUALITY_NOTE
    try:
        pictures, note = _differing_images(metric, method, quality_view.DIRECTIONS.get(direction, "both"),
                                           int(k))
    except (ValueError, KeyError, OSError) as err:
        raise gr.Error(service.format_error(err), print_exception=False) from None
    except Exception as err:  # noqa: BLE001  the server keeps serving; the person gets one sentence
        raise gr.Error(service.format_error(err)) from None
    return pictures, note


def info_api(pair_name):
    """``/info``: the pair's classes, layer choices, CAM methods and warnings."""
    try:
        pair = service.get_pair(pair_name)
    except service.UserFacingError as err:
        raise gr.Error(str(err), print_exception=False) from None
    info = service.describe_pair(pair)
    return {
        "pair": info.name, "pairs": PAIRS, "baseline": info.baseline_name, "cbam": info.cbam_name,
        "trained": info.baseline_trained and info.cbam_trained, "classes": list(info.classes),
        "targets": info.targets, "layers": info.layer_choices, "methods": METHODS,
        "warnings": list(info.warnings),
    }


# ------------------------------------------------------------------------------------- layout

with gr.Blocks(title="cbam-viz: CBAM attention, side by side", delete_cache=(3600, 3600)) as demo:
    items_state = gr.State([])
    gr.Markdown(INTRO)
    pair_md = gr.Markdown("*Loading the models...*")

    with gr.Tab("Explain"):
        with gr.Row():
            with gr.Column(scale=3):
                image = gr.Image(type="filepath", label="Photo", sources=["upload", "clipboard"], height=320)
                files = gr.File(file_count="multiple", file_types=["image"], type="filepath",
                                label=f"Or several photos at once (up to {MAX_IMAGES})")
                if EXAMPLES:
                    gr.Examples(examples=[[str(e.path)] for e in EXAMPLES], inputs=[image],
                                example_labels=[e.caption for e in EXAMPLES], label="Examples")
            with gr.Column(scale=2):
                pair = gr.Dropdown(PAIRS, value=PAIRS[0], label="Model pair")
                method = gr.Dropdown(METHODS, value="gradcam" if "gradcam" in METHODS else METHODS[0],
                                     label="CAM method")
                target = gr.Dropdown([service.AUTO_TARGET], value=service.AUTO_TARGET, allow_custom_value=True,
                                     label="Target class", info="auto = the class each model predicts")
                layer = gr.Dropdown([service.AUTO_LAYER], value=service.AUTO_LAYER, allow_custom_value=True,
                                    label="Target layer", info="the block the CAM looks at")
                alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
                run = gr.Button("Explain", variant="primary")

        status = gr.Markdown()
        picker = gr.Dropdown([], label="Showing image", visible=False, interactive=True)
        with gr.Row(equal_height=True):
            with gr.Column():
                gr.Markdown("### Baseline ResNet")
                base_label = gr.Label(num_top_classes=5, label="Baseline: predictions")
                base_cam = gr.Image(label="Baseline: CAM overlay", interactive=False, format="png")
            with gr.Column():
                gr.Markdown("### ResNet + CBAM")
                cbam_label = gr.Label(num_top_classes=5, label="CBAM: predictions")
                cbam_cam = gr.Image(label="CBAM: CAM overlay", interactive=False, format="png")
        with gr.Row():
            faithful_img = gr.Image(label="Faithfulness: each model's input with the top of its own CAM blurred away",
                                    interactive=False, format="png", scale=3)
            faithful_md = gr.Markdown()
        spatial = gr.Gallery(label="CBAM spatial attention of every block (where each block looks)",
                             columns=4, height="auto", object_fit="contain")
        channel = gr.Image(label="CBAM channel attention of every block (one bar per channel: how each block "
                                 "re-weights its feature maps)", interactive=False, format="png")
        with gr.Row():
            timings = gr.Markdown(label="Timings")
            downloads = gr.File(label="Downloads: composite PNG, JSON, raw maps (.npz)", file_count="multiple",
                                interactive=False)

    with gr.Tab("Explanation quality") as quality_tab:
        gr.Markdown(_quality_markdown())
        if QUALITY_FIGURE.is_file():
            gr.Image(str(QUALITY_FIGURE), label="Paired differences, CBAM - baseline (green: CBAM better, "
                     "red: baseline better, grey: no clear difference)", interactive=False, format="png")
        gr.Markdown("### Where the two models differ most\n"
                    "Pick a metric to see the boxed photos behind the averages: green boxes are the "
                    "true objects, white boxes each CAM's own box at its best threshold.")
        with gr.Row():
            q_metric = gr.Dropdown(quality_view.metric_choices(), value="energy", label="Metric")
            q_methods = quality_view.method_choices(QUALITY_REPORT) if QUALITY_REPORT else ["gradcam"]
            q_method = gr.Dropdown(q_methods, value=q_methods[0], label="CAM method")
            q_direction = gr.Radio(list(quality_view.DIRECTIONS), value=next(iter(quality_view.DIRECTIONS)),
                                   label="Show")
            q_k = gr.Slider(1, 16, value=6, step=1, label="Images")
        q_note = gr.Markdown(QUALITY_NOTE)
        q_gallery = gr.Gallery(label="Boxed photo | baseline CAM | CBAM CAM", columns=2, height="auto",
                               object_fit="contain", format="png")

    with gr.Tab("About"):
        gr.Markdown(INTRO.split("\n", 2)[2])
        about_md = gr.Markdown("*Loading the model card...*")

    # API-only outputs (hidden): what /explain returns to gradio_client.
    with gr.Group(visible=False):
        api_button = gr.Button("explain (API)")
        info_button = gr.Button("info (API)")
        api_summary = gr.JSON(label="summary")
        api_base = gr.Image(type="filepath", label="baseline CAM overlay", format="png")
        api_cbam = gr.Image(type="filepath", label="CBAM CAM overlay", format="png")
        api_composite = gr.Image(type="filepath", label="composite", format="png")
        api_attention = gr.Gallery(label="CBAM attention (spatial, then channel)", format="png")
        api_files = gr.File(file_count="multiple", label="JSON and npz")
        api_info = gr.JSON(label="info")

    view = [base_label, base_cam, cbam_label, cbam_cam, faithful_img, faithful_md, spatial, channel, timings,
            downloads]
    demo.load(on_load, inputs=[pair], outputs=[pair_md, target, layer, about_md], api_visibility="private")
    pair.change(on_pair_change, inputs=[pair], outputs=[pair_md, target, layer, about_md],
                api_visibility="private")
    run.click(explain_ui, inputs=[image, files, pair, method, target, layer, alpha],
              outputs=[items_state, picker, status, *view], api_name="explain_ui", api_visibility="undocumented",
              preprocess=False)
    picker.change(show_item, inputs=[picker, items_state], outputs=[status, *view], api_visibility="private")
    api_button.click(explain_api, inputs=[image, method, target, layer, alpha, pair],
                     outputs=[api_summary, api_base, api_cbam, api_composite, api_attention, api_files],
                     api_name="explain", preprocess=False)
    info_button.click(info_api, inputs=[pair], outputs=[api_info], api_name="info")
    q_inputs = [q_metric, q_method, q_direction, q_k]
    # One render at a time for this tab: explanations keep the cores.
    gr.on([quality_tab.select, *(c.change for c in q_inputs)], show_differences, inputs=q_inputs,
          outputs=[q_gallery, q_note], api_visibility="private", concurrency_limit=1, concurrency_id="quality")

demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)

if __name__ == "__main__":
    if os.environ.get("CBAM_VIZ_WARMUP", "1") != "0":
        # Load the models and pay the first explanation's import cost while the server starts.
        threading.Thread(target=service.warm_up, args=(PAIRS[0],), name="cbam-viz-warm-up", daemon=True).start()
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=MAX_FILE_SIZE,
        show_error=True,
    )
