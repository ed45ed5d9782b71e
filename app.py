"""cbam-viz web app: what CBAM changes inside a ResNet, side by side with its baseline twin.

Layout and event wiring only: each event function makes one call into :mod:`cbam_viz.app_views`
(which calls :mod:`cbam_viz.service`) and hands the result to Gradio. Importing this module reads
no file: the pair names, examples and the Explanation-quality report load with the page.
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

import os
import threading

import gradio as gr

from cbam_viz import app_views as views
from cbam_viz.controls import AUTO_LAYER, AUTO_TARGET, list_methods
from cbam_viz.messages import format_error
from cbam_viz.quality.view import DIRECTIONS, metric_choices
from cbam_viz.service import warm_up

CONCURRENCY = int(os.environ.get("CBAM_VIZ_CONCURRENCY", "2"))
QUEUE_SIZE = int(os.environ.get("CBAM_VIZ_QUEUE_SIZE", "32"))
MAX_FILE_SIZE = os.environ.get("CBAM_VIZ_MAX_FILE_SIZE", "20mb")
MAX_IMAGES = int(os.environ.get("CBAM_VIZ_MAX_IMAGES", "16"))
METHODS = list_methods()  # the registry's names: code, not files

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


# ------------------------------------------------------------------------------ event functions

def _run(fn, *args, **kwargs):
    """Call the library; any failure reaches the person as one sentence (the one error mapping)."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001  the server keeps serving; format_error logs the unexpected
        raise gr.Error(format_error(err), print_exception=False) from None


def _update(choices: views.Choices | None):
    return gr.update() if choices is None else gr.update(choices=choices.choices, value=choices.value,
                                                         visible=choices.visible)


def _pair_outputs(view: views.PairView) -> tuple:
    if view.error:
        gr.Warning(view.error)
    return view.markdown, _update(view.targets), _update(view.layers), view.card


def on_load():
    """Fill the page once it is open: pairs, examples, the quality tab, the chosen pair's parts."""
    page = _run(views.page_view)
    return (_update(page.pairs), gr.Dataset(samples=[[path] for path, _ in page.examples],
                                            sample_labels=[caption for _, caption in page.examples],
                                            visible=bool(page.examples)),
            page.quality_markdown, gr.update(value=page.quality_figure, visible=page.quality_figure is not None),
            _update(page.quality_methods), page.quality_note, *_pair_outputs(page.pair))


def on_pair_change(pair_name: str):
    """Fill the pair-dependent parts of the page (classes, layers, warnings, model card)."""
    return _pair_outputs(views.pair_view(pair_name))


def explain_ui(image, files, pair_name, method, target, layer, alpha):
    """The Explain button: one or several images -> the side-by-side view of the first one."""
    view = _run(views.explain_view, image, files, pair_name=pair_name, method=method, target=target, layer=layer,
                alpha=alpha, max_images=MAX_IMAGES)
    return (view.items, _update(view.picker), view.status, *view.shown)


def show_item(choice: str, items: list[dict]):
    """The image picker: show another image of the last batch."""
    return _run(views.show_item, choice, items)


def explain_api(image, method="gradcam", target=AUTO_TARGET, layer=AUTO_LAYER, alpha=0.5, pair_name=None):
    """``/explain``: one image -> (summary JSON, baseline CAM, CBAM CAM, composite, attention, files).

    The summary JSON holds both models' top-5 predictions, the CAM targets, the warnings, the
    timings and metadata (the same document as the JSON download).
    """
    return _run(views.api_explain, image, method, target, layer, alpha, pair_name)


def info_api(pair_name=None):
    """``/info``: the pair's classes, layer choices, CAM methods and warnings."""
    return _run(views.api_info, pair_name)


def show_differences(metric: str, method: str, direction: str, k: float):
    """The Explanation-quality tab: the images where the two CAMs score most differently."""
    return _run(views.quality_differences, metric, method, direction, k)


def load_example(index: int):
    """A click on an example: put its picture into the photo input."""
    return _run(views.example_image, index)


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
                # Filled on page load (the examples are written to the temp folder on first use).
                examples = gr.Dataset(components=[image], samples=[], type="index", label="Examples",
                                      visible=False)
            with gr.Column(scale=2):
                pair = gr.Dropdown([], value=None, label="Model pair")  # the manifest's pairs, on page load
                method = gr.Dropdown(METHODS, value="gradcam" if "gradcam" in METHODS else METHODS[0],
                                     label="CAM method")
                target = gr.Dropdown([AUTO_TARGET], value=AUTO_TARGET, allow_custom_value=True,
                                     label="Target class", info="auto = the class each model predicts")
                layer = gr.Dropdown([AUTO_LAYER], value=AUTO_LAYER, allow_custom_value=True,
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
        quality_md = gr.Markdown("*Loading the measured results...*")
        quality_fig = gr.Image(label="Paired differences, CBAM - baseline (green: CBAM better, red: baseline "
                               "better, grey: no clear difference)", interactive=False, format="png", visible=False)
        gr.Markdown("### Where the two models differ most\n"
                    "Pick a metric to see the boxed photos behind the averages: green boxes are the "
                    "true objects, white boxes each CAM's own box at its best threshold.")
        with gr.Row():
            q_metric = gr.Dropdown(metric_choices(), value="energy", label="Metric")
            q_method = gr.Dropdown(["gradcam"], value="gradcam", label="CAM method")  # the report's, on load
            q_direction = gr.Radio(list(DIRECTIONS), value=next(iter(DIRECTIONS)), label="Show")
            q_k = gr.Slider(1, 16, value=6, step=1, label="Images")
        q_note = gr.Markdown()
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
    demo.load(on_load, outputs=[pair, examples, quality_md, quality_fig, q_method, q_note, pair_md, target, layer,
                                about_md], api_visibility="private")
    examples.click(load_example, inputs=[examples], outputs=[image], api_visibility="private",
                   show_progress="hidden")
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
        threading.Thread(target=warm_up, name="cbam-viz-warm-up", daemon=True).start()
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=MAX_FILE_SIZE,
        show_error=True,
    )
