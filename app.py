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
    CBAM_VIZ_SANITY_REPORT    sanity-check output whose failed CAM methods are flagged (default: docs/sanity)
    CBAM_VIZ_CHANNEL_PROFILES channel-profiles folder shown in the quality tab (default: docs/channel_profiles)
    CBAM_VIZ_MCP              "1": also serve ``/explain`` and ``/info`` as MCP tools (at /gradio_api/mcp)
    CBAM_VIZ_GPU_DURATION     seconds of GPU asked per request on a ZeroGPU Space (see cbam_viz/zerogpu.py)

API (``gradio_client``, and MCP with ``CBAM_VIZ_MCP=1``): ``/explain`` (one image) and ``/info``
(classes, layers, methods); see the "Use via API" link at the bottom of the page. Every other
event is the page's own (private).
"""
from __future__ import annotations

import os
import threading

import gradio as gr

from cbam_viz import app_views as views
from cbam_viz.colour_scale import colour_scale_html
from cbam_viz.controls import AUTO_LAYER, AUTO_TARGET, list_methods
from cbam_viz.messages import format_error
from cbam_viz.service import warm_up

CONCURRENCY = int(os.environ.get("CBAM_VIZ_CONCURRENCY", "2"))
QUEUE_SIZE = int(os.environ.get("CBAM_VIZ_QUEUE_SIZE", "32"))
MAX_FILE_SIZE = os.environ.get("CBAM_VIZ_MAX_FILE_SIZE", "20mb")
MAX_IMAGES = int(os.environ.get("CBAM_VIZ_MAX_IMAGES", "16"))
MCP_SERVER = os.environ.get("CBAM_VIZ_MCP", "0") == "1"
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


def on_load(pair_name=None, method=None, target=None, layer=None, result_id=None):
    """Fill the page once it is open: pairs, examples, the quality tab, the chosen pair's parts.

    Takes the controls' values and the shown result as the page opened: a shared link restores the
    result, and the page reopens with the controls that made it.
    """
    page = _run(views.page_view, method, pair_name=pair_name, target=target, layer=layer, result_id=result_id)
    return (_update(page.pairs), gr.Dataset(samples=[[path] for path, _ in page.examples],
                                            sample_labels=[caption for _, caption in page.examples],
                                            visible=bool(page.examples)),
            page.quality_markdown, gr.update(value=page.quality_figure, visible=page.quality_figure is not None),
            _update(page.quality_metrics), _update(page.quality_methods), _update(page.quality_directions),
            page.quality_note, page.method, page.method_note, *_pair_outputs(page.pair))


def on_pair_change(pair_name: str, target=None, layer=None):
    """Fill the pair-dependent parts of the page (classes, layers, warnings, model card); the target
    and layer stay where the pair offers them."""
    return _pair_outputs(views.pair_view(pair_name, target=target, layer=layer))


def on_method_change(method: str):
    """A CAM method that failed the model-randomisation sanity check is flagged beside its dropdown."""
    return views.method_note(method)


def explain_ui(image, files, pair_name, method, target, layer, alpha, progress=gr.Progress()):
    """The Explain button: one or several images -> the side-by-side view of the first one."""
    view = _run(views.explain_view, image, files, pair_name=pair_name, method=method, target=target, layer=layer,
                alpha=alpha, max_images=MAX_IMAGES, progress=progress)
    return (view.items, _update(view.picker), view.status, *view.shown)


def explain_example(index: int, pair_name, method, target, layer, alpha):
    """A click on an example: its explanation, at once from the cache after its first use."""
    view = _run(views.example_view, index, pair_name=pair_name, method=method, target=target, layer=layer,
                alpha=alpha)
    return (view.items, _update(view.picker), view.status, *view.shown)


def show_item(choice: str, items: list[dict]):
    """The image picker: show another image of the last batch."""
    return _run(views.show_item, choice, items)


def build_downloads(result_id: str, items: list[dict]):
    """The downloads button: the composite PNG, JSON and npz of the shown image, built now."""
    return _run(views.downloads_view, result_id, items)


def probe(result_id: str, evt: gr.SelectData):
    """A click on the photo: every CBAM block's spatial attention at that point."""
    return _run(views.probe_view, result_id, evt.index)


def ablate(result_id: str):
    """"Is this attention used?": switch each CBAM gate off on the shown photo."""
    return _run(views.ablation_view, result_id)


def show_quality_extras():
    """The quality tab's research sections: spatial-gate localization, channel profiles."""
    extras = _run(views.quality_extras)
    return (extras.spatial_gates, gr.update(value=extras.profiles_image, visible=extras.profiles_image is not None),
            gr.update(value=extras.profiles_rows, visible=extras.profiles_rows is not None), extras.profiles_note)


def explain_api(image, method="gradcam", target=AUTO_TARGET, layer=AUTO_LAYER, alpha=0.5, pair_name=None):
    """Explain one photo with a plain ResNet and its CBAM twin: predictions, CAMs, every CBAM gate's attention.

    Args:
        image: the photo (any common image format).
        method: CAM method, one of the names /info lists (default gradcam).
        target: class to explain: "auto (predicted class)", a class name, WordNet id or index.
        layer: residual block the CAM looks at: "auto (last block)" or a name such as layer3.1.
        alpha: opacity of the heat map over the photo, 0 to 1.
        pair_name: model pair (default: the first /info lists).

    Returns:
        summary JSON (both models' top-5 predictions, CAM targets, warnings, timings, metadata,
        faithfulness), baseline CAM overlay, CBAM CAM overlay, composite, CBAM attention pictures
        (spatial per block, then channel), and the JSON and npz (raw maps) files.
    """
    return _run(views.api_explain, image, method, target, layer, alpha, pair_name)


def info_api(pair_name=None):
    """The model pair's classes, layer choices, CAM methods and warnings (what /explain accepts).

    Args:
        pair_name: model pair (default: the first of "pairs" in the answer).
    """
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
                image = gr.Image(type="filepath", label="Photo", sources=["upload", "clipboard"], height=320,
                                 elem_id="input_image")
                files = gr.File(file_count="multiple", file_types=["image"], type="filepath",
                                label=f"Or several photos at once (up to {MAX_IMAGES})")
                # Filled on page load (the examples are written to the temp folder on first use).
                examples = gr.Dataset(components=[image], samples=[], type="index", visible=False,
                                      label="Examples (each answers at once after its first use)")
            with gr.Column(scale=2):
                pair = gr.Dropdown([], value=None, label="Model pair")  # the manifest's pairs, on page load
                method = gr.Dropdown(METHODS, value="gradcam" if "gradcam" in METHODS else METHODS[0],
                                     label="CAM method", elem_id="cam_method")
                method_md = gr.Markdown(elem_id="method_note")  # a failed sanity check, if any
                target = gr.Dropdown([AUTO_TARGET], value=AUTO_TARGET, allow_custom_value=True,
                                     label="Target class", info="auto = the class each model predicts",
                                     elem_id="target_class")
                layer = gr.Dropdown([AUTO_LAYER], value=AUTO_LAYER, allow_custom_value=True,
                                    label="Target layer", info="the block the CAM looks at")
                alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
                run = gr.Button("Explain", variant="primary", elem_id="run_button")

        status = gr.Markdown(elem_id="status")
        picker = gr.Dropdown([], label="Showing image", visible=False, interactive=True)
        with gr.Row(equal_height=True):
            with gr.Column():
                gr.Markdown("### Baseline ResNet")
                base_label = gr.Label(num_top_classes=5, label="Baseline: predictions", elem_id="pred_baseline")
                base_cam = gr.ImageSlider(label="Baseline: photo | CAM overlay (drag the bar)", interactive=False,
                                          type="filepath", elem_id="cam_baseline", max_height=420)
            with gr.Column():
                gr.Markdown("### ResNet + CBAM")
                cbam_label = gr.Label(num_top_classes=5, label="CBAM: predictions", elem_id="pred_cbam")
                cbam_cam = gr.ImageSlider(label="CBAM: photo | CAM overlay (drag the bar)", interactive=False,
                                          type="filepath", elem_id="cam_cbam", max_height=420)
        gr.HTML(colour_scale_html(), elem_id="colour_scale")  # what the heatmaps' colours mean (no file, no matplotlib)
        with gr.Row():
            compare = gr.ImageSlider(label="Baseline CAM | CBAM CAM on the same photo: drag across to compare",
                                     interactive=False, type="filepath", elem_id="cam_compare", scale=3,
                                     max_height=420)
            with gr.Column(scale=2):
                faithful_img = gr.Image(label="Faithfulness: each model's input with the top of its own CAM "
                                        "blurred away", interactive=False, elem_id="faithfulness")
                faithful_md = gr.Markdown()
        gr.Markdown("### What the CBAM gates did")
        spatial = gr.Image(label="CBAM spatial attention of every block (where each block looks)",
                           interactive=False, elem_id="attention_gallery")
        with gr.Row():
            probe_img = gr.Image(label="Click the photo: every block's spatial attention at that point",
                                 interactive=False, elem_id="probe_image", height=300, scale=2)
            with gr.Column(scale=3):
                probe_plot = gr.BarPlot(x="block", y="spatial attention", y_lim=[0, 1], elem_id="probe_plot",
                                        label="Spatial attention at the clicked point, per block", height=240,
                                        tooltip=["block", "spatial attention"])
                probe_md = gr.Markdown()
        channel = gr.LinePlot(x="rank", y="attention", color="block", y_lim=[0, 1], elem_id="channel_gallery",
                              label="CBAM channel attention of every block: how each block re-weights its feature "
                                    "maps, channels sorted from most to least passed (hover: block, channel, value)",
                              x_title="channels of the block, sorted by their gate", height=340,
                              tooltip=["block", "channel", "attention"])
        gr.Markdown("### Is this attention used?\nSwitch each CBAM gate off (set it to 1) on this photo, one block "
                    "at a time and all at once, and see how the prediction and the CAM change (about 25 forwards "
                    "of the CBAM model).")
        ablate_btn = gr.Button("Switch each gate off and measure", elem_id="ablate_button")
        ablation_md = gr.Markdown()
        with gr.Row():
            ablation_plot = gr.BarPlot(x="ablation", y="prob_change", color="gate", y_lim=[-1, 1], x_label_angle=-45,
                                       label="Change of the top-1 probability with the gate switched off",
                                       elem_id="ablation_plot", height=300, sort=None,
                                       tooltip=["block", "gate", "prob_change", "cam_correlation"])
            ablation_table = gr.Dataframe(headers=list(views.ABLATION_COLUMNS), interactive=False,
                                          label="Gate ablation: probability change, CAM correlation with the "
                                          "intact model", elem_id="ablation_table")
        timings_line = gr.Markdown(elem_id="timings_line")
        with gr.Accordion("Timings, step by step", open=False):
            timings = gr.Markdown()
        with gr.Row():
            downloads_btn = gr.Button("Build the downloads: composite PNG, JSON, raw maps (.npz)",
                                      elem_id="downloads_button")
            gr.DeepLinkButton("Share this result (copies a link)", copied_value="Link copied")
        downloads = gr.File(label="Downloads: composite PNG, JSON, raw maps (.npz)", file_count="multiple",
                            interactive=False, elem_id="downloads")
        current = gr.Textbox(visible=False)  # the shown result's id (a deep link keeps it too)

    with gr.Tab("Explanation quality") as quality_tab:
        quality_md = gr.Markdown("*Loading the measured results...*")
        quality_fig = gr.Image(label="Paired differences, CBAM - baseline (green: CBAM better, red: baseline "
                               "better, grey: no clear difference)", interactive=False, format="png", visible=False)
        gr.Markdown("### Where the two models differ most\n"
                    "Pick a metric to see the boxed photos behind the averages: green boxes are the "
                    "true objects, white boxes each CAM's own box at its best threshold.")
        with gr.Row():
            # Choices on page load: the quality package imports torchvision, which the start need not wait for.
            q_metric = gr.Dropdown([], value=None, label="Metric", elem_id="quality_metric")
            q_method = gr.Dropdown(["gradcam"], value="gradcam", label="CAM method")  # the report's, on load
            q_direction = gr.Radio([], value=None, label="Show")
            q_k = gr.Slider(1, 16, value=6, step=1, label="Images")
        q_note = gr.Markdown()
        q_gallery = gr.Gallery(label="Boxed photo | baseline CAM | CBAM CAM", columns=2, height="auto",
                               object_fit="contain", format="png", elem_id="quality_gallery")
        gates_md = gr.Markdown()
        profiles_md = gr.Markdown()
        profiles_img = gr.Image(label="Mean channel gate per class, per block", interactive=False, visible=False,
                                elem_id="channel_profiles")
        profiles_table = gr.Dataframe(label="How class-specific each block's channel gate is", interactive=False,
                                      visible=False, elem_id="channel_profiles_table")

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

    view = [base_label, base_cam, cbam_label, cbam_cam, compare, faithful_img, faithful_md, spatial, probe_img, channel,
            timings_line, timings, current, downloads, probe_plot, probe_md, ablation_plot, ablation_table, ablation_md]
    explained = [items_state, picker, status, *view]
    controls = [pair, method, target, layer, alpha]
    # preprocess=False: a shared link restores the pair's value before on_load gives the dropdown its choices.
    demo.load(on_load, inputs=[pair, method, target, layer, current], preprocess=False,
              outputs=[pair, examples, quality_md, quality_fig, q_metric, q_method, q_direction, q_note, method,
                       method_md, pair_md, target, layer, about_md], api_visibility="private")
    # The answers about the shown result (downloads, a clicked point, the gate ablation: seconds each)
    # are cancelled when another result is shown, so a late one never lands under the new photo
    # (the cancelled work itself finishes in its thread: Gradio cannot stop a running function).
    about_result = [
        downloads_btn.click(build_downloads, inputs=[current, items_state], outputs=[downloads],
                            api_visibility="private"),
        probe_img.select(probe, inputs=[current], outputs=[probe_plot, probe_md], api_visibility="private",
                         show_progress="hidden"),
        # ~25 forwards: one at a time, so that explanations keep the cores.
        ablate_btn.click(ablate, inputs=[current], outputs=[ablation_plot, ablation_table, ablation_md],
                         api_visibility="private", concurrency_limit=1, concurrency_id="research"),
    ]
    examples.click(load_example, inputs=[examples], outputs=[image], api_visibility="private",
                   show_progress="hidden", cancels=about_result).then(
        explain_example, inputs=[examples, *controls], outputs=explained, api_visibility="private")
    pair.change(on_pair_change, inputs=[pair, target, layer], outputs=[pair_md, target, layer, about_md],
                api_visibility="private")
    method.change(on_method_change, inputs=[method], outputs=[method_md], api_visibility="private", queue=False)
    # show_progress "full" (the default): the queue position while waiting, gr.Progress steps while running.
    run.click(explain_ui, inputs=[image, files, *controls], outputs=explained, api_name="explain_ui",
              api_visibility="undocumented", preprocess=False, cancels=about_result)
    # ``input``: a person's pick; Explain and the examples set the picker with the view already filled.
    picker.input(show_item, inputs=[picker, items_state], outputs=[status, *view], api_visibility="private",
                 cancels=about_result)
    api_button.click(explain_api, inputs=[image, method, target, layer, alpha, pair],
                     outputs=[api_summary, api_base, api_cbam, api_composite, api_attention, api_files],
                     api_name="explain", preprocess=False)
    # preprocess=False: the pair dropdown's choices arrive with the page, an API caller names any pair
    # (an unknown one gets its one sentence from get_pair, not Gradio's "not in the list of choices").
    info_button.click(info_api, inputs=[pair], outputs=[api_info], api_name="info", preprocess=False)
    q_inputs = [q_metric, q_method, q_direction, q_k]
    # One render at a time for this tab: explanations keep the cores. ``input``, not ``change``: a person's
    # choice renders, the page load filling the choices does not.
    gr.on([quality_tab.select, *(c.input for c in q_inputs)], show_differences, inputs=q_inputs,
          outputs=[q_gallery, q_note], api_visibility="private", concurrency_limit=1, concurrency_id="quality")
    quality_tab.select(show_quality_extras, outputs=[gates_md, profiles_img, profiles_table, profiles_md],
                       api_visibility="private", concurrency_limit=1, concurrency_id="quality")

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
        mcp_server=MCP_SERVER,
    )
