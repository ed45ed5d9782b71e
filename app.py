"""cbam-viz web app: what attention gates (CBAM, SE, BAM) change inside a ResNet, model beside model.

Layout and event wiring only: each event function makes one call into :mod:`cbam_viz.app` (which
calls :mod:`cbam_viz.service`) and maps the named result onto the components. Importing this
module reads no file: the lineups, examples and the Explanation-quality report load with the page.
Run ``python app.py`` (127.0.0.1:7860; ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` override).

Environment (defaults in brackets): CBAM_VIZ_CONCURRENCY explanations at once [2]; CBAM_VIZ_QUEUE_SIZE
requests waiting at most [32]; CBAM_VIZ_MAX_FILE_SIZE largest upload [20mb, 500mb with model uploads
on]; CBAM_VIZ_MAX_IMAGES images per request [16]; CBAM_VIZ_WARMUP "0": no warm-up explanation at
start-up; CBAM_VIZ_WEIGHTS_DIR folders of manifest.json and weights, a path-separator list [weights/];
CBAM_VIZ_ALLOW_MODEL_UPLOAD "1": a local user may add a checkpoint from the page (never on a Space);
CBAM_VIZ_QUALITY_REPORT evaluate-cams output of the Explanation-quality tab [docs/explanation_quality];
CBAM_VIZ_DATA where that report's photos are, if moved; CBAM_VIZ_SANITY_REPORT sanity-check output whose
failed CAM methods are flagged [docs/sanity]; CBAM_VIZ_CHANNEL_PROFILES channel-profiles folder of the
quality tab [docs/channel_profiles]; CBAM_VIZ_MCP "1": ``/explain`` and ``/info`` as MCP tools too (at
/gradio_api/mcp); CBAM_VIZ_GPU_DURATION GPU seconds per request on a ZeroGPU Space (cbam_viz/zerogpu.py).

API (``gradio_client``, and MCP with ``CBAM_VIZ_MCP=1``): ``/explain`` (one image, every member of a
lineup) and ``/info`` (lineups, members, classes, layers, methods); see the "Use via API" link at the
bottom of the page. Every other event is the page's own (private).
"""
from __future__ import annotations

import os
import threading

import gradio as gr

from cbam_viz.app import api, content, gates, page, panels, quality, results, upload
from cbam_viz.engine.controls import AUTO_LAYER, AUTO_TARGET, list_methods
from cbam_viz.messages import format_error
from cbam_viz.service import warm_up

CONCURRENCY = int(os.environ.get("CBAM_VIZ_CONCURRENCY", "2"))
QUEUE_SIZE = int(os.environ.get("CBAM_VIZ_QUEUE_SIZE", "32"))
UPLOAD = upload.upload_allowed()
MAX_FILE_SIZE = os.environ.get("CBAM_VIZ_MAX_FILE_SIZE", "20mb" if not UPLOAD else "500mb")  # a checkpoint is larger
MAX_IMAGES = int(os.environ.get("CBAM_VIZ_MAX_IMAGES", "16"))
EXAMPLES_PER_PAGE = 16  # every example on one page: ten Imagenette classes + the unfamiliar ones
MCP_SERVER = os.environ.get("CBAM_VIZ_MCP", "0") == "1"
METHODS = list_methods()  # the registry's names: code, not files
SLOTS = range(page.MAX_MEMBERS)

INTRO = """\
# cbam-viz: what does attention change inside a ResNet?

**CBAM** (Convolutional Block Attention Module, [Woo et al., ECCV 2018](https://arxiv.org/abs/1807.06521))
adds two small gates to every residual block: a **channel gate** that re-weights *what* feature
maps matter (one weight per channel, from average- and max-pooled features through a shared MLP)
and then a **spatial gate** that re-weights *where* to look (one weight per position, from a 7x7
convolution over channel-pooled maps). **SE** (Hu et al., 2018) has the channel gate only; **BAM**
(Park et al., 2018) puts both, in parallel, at the stage transitions. Upload a photo to see a
lineup of models trained the same way side by side: their predictions, their Grad-CAM heatmaps,
and what every gate did to the features.
"""


# ------------------------------------------------------------------------------ event functions

def _run(fn, *args, **kwargs):
    """Call the library; any failure reaches the person as one sentence (the one error mapping)."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001  the server keeps serving; format_error logs the unexpected
        raise gr.Error(format_error(err), print_exception=False) from None


def on_load(lineup_name=None, method_value=None, target_value=None, layer_value=None, result_id=None):
    """Fill the page once it is open: lineups, examples, the quality tab, the chosen lineup's parts.

    Takes the controls' values and the shown result as the page opened: a shared link restores the
    result, and the page reopens with the controls that made it.
    """
    view = _run(page.page_view, method_value, lineup_name=lineup_name, target=target_value, layer=layer_value,
                result_id=result_id)
    samples = gr.Dataset(samples=[[path] for path, _ in view.examples], samples_per_page=EXAMPLES_PER_PAGE,
                         sample_labels=[caption for _, caption in view.examples], visible=bool(view.examples))
    return {lineup: panels.update(view.lineups), examples: samples, quality_md: view.quality_markdown,
            quality_reading: view.quality_reading,
            quality_fig: gr.update(value=view.quality_figure, visible=view.quality_figure is not None),
            q_metric: panels.update(view.quality_metrics), q_method: panels.update(view.quality_methods),
            q_direction: panels.update(view.quality_directions), q_member: panels.update(view.quality_members),
            q_note: view.quality_note, method: view.method,
            method_md: view.method_note,
            **ui.lineup(view.lineup, markdown=lineup_md, target=target, layer=layer, card=about_md)}


def on_lineup_change(lineup_name: str, target_value=None, layer_value=None):
    """Fill the lineup-dependent parts of the page (member columns, classes, layers, warnings, model
    card); the target and layer stay where the lineup offers them."""
    view = _run(page.lineup_view, lineup_name, target=target_value, layer=layer_value)
    return ui.lineup(view, markdown=lineup_md, target=target, layer=layer, card=about_md)


def on_lineup_pick(lineup_name: str, result_id: str, items: list[dict]):
    """A person picks another lineup: a result of the last one shown is emptied (not left under the new
    members' titles)."""
    return ui.show(None) if _run(page.shows_another_lineup, lineup_name, result_id, items) else {}


def on_method_change(method_value: str):
    """A CAM method that failed the model-randomisation sanity check is flagged beside its dropdown."""
    return content.method_note(method_value)


def explain_ui(image, files, lineup_name, method_value, target_value, layer_value, alpha_value,
               progress=gr.Progress()):
    """The Explain button: one or several images -> every member's view of the first one."""
    view = _run(results.explain_view, image, files, lineup_name=lineup_name, method=method_value, target=target_value,
                layer=layer_value, alpha=alpha_value, max_images=MAX_IMAGES, progress=progress)
    return ui.explained(view, items_state=items_state, picker=picker, status=status)


def explain_example(index: int, lineup_name, method_value, target_value, layer_value, alpha_value):
    """A click on an example: its explanation, at once from the cache after its first use."""
    view = _run(results.example_view, index, lineup_name=lineup_name, method=method_value, target=target_value,
                layer=layer_value, alpha=alpha_value)
    return ui.explained(view, items_state=items_state, picker=picker, status=status)


def show_item(choice: str, items: list[dict]):
    """The image picker: show another image of the last batch."""
    text, view = _run(results.show_item, choice, items)
    return {status: text, **ui.show(view)}


def compare_members(a: str, b: str, result_id: str, items: list[dict]):
    """The compare slider's two dropdowns: one member's CAM | another's."""
    return _run(results.compare_view, a, b, result_id, items)


def build_downloads(result_id: str, items: list[dict]):
    """The downloads button: the composite PNG, JSON and npz of the shown image, built now."""
    return _run(results.downloads_view, result_id, items)


def probe(result_id: str, member: str, items: list[dict], evt: gr.SelectData):
    """A click on the photo: every block's spatial attention at that point, of the chosen gated member."""
    return _run(gates.probe_view, result_id, evt.index, member, items)


def ablate(result_id: str, member: str, items: list[dict]):
    """"Is this attention used?": switch each gate of the chosen member off on the shown photo."""
    return _run(gates.ablation_view, result_id, member, items)


def add_own_model(checkpoint, classes, name: str):
    """A local user's checkpoint (+ class file): what was detected; its lineup chosen at once (the last
    result emptied)."""
    added = _run(upload.add_model_view, checkpoint, classes, name)
    return {own.result: added.markdown, lineup: panels.update(added.lineups), **ui.show(None)}


def show_quality_extras():
    """The quality tab's research sections: spatial-gate localization, channel profiles."""
    extras = _run(quality.quality_extras)
    return (extras.spatial_gates, gr.update(value=extras.profiles_images, visible=extras.profiles_images is not None),
            gr.update(value=extras.profiles_rows, visible=extras.profiles_rows is not None), extras.profiles_note)


def explain_api(image, method="gradcam", target=AUTO_TARGET, layer=AUTO_LAYER, alpha=0.5, lineup_name=None,
                pictures=True):
    """Explain one photo with every model of a lineup (e.g. ResNet-18, + SE, + BAM, + CBAM): predictions,
    CAMs, and what every attention gate did.

    Args:
        image: the photo (any common image format).
        method: CAM method, one of the names /info lists (default gradcam).
        target: class to explain: "auto (predicted class)", a class name, WordNet id or index.
        layer: residual block the CAM looks at: "auto (last block)" or a name such as layer3.1.
        alpha: opacity of the heat map over the photo, 0 to 1.
        lineup_name: the lineup of models (default: the first /info lists under "lineups").
        pictures: false for the summary alone (the pictures are long base64 text, e.g. for an MCP client).

    Returns:
        summary JSON ("models": each member's top-5 predictions, CAM target, gates, out-of-distribution
        score; faithfulness, warnings, timings, metadata; "result_id" for /downloads), and each member's
        pictures as data URIs ({name: {"caption", "cam_overlay", "spatial_sheet", "channel_overview"}};
        a gated member's attention only). The composite, JSON file and npz (raw maps): /downloads.
    """
    return _run(api.api_explain, image, method, target, layer, alpha, lineup_name, pictures)


def downloads_api(result_id: str):
    """The composite picture (every member side by side) with the JSON and npz of an /explain result,
    built on demand: /explain returns no composite, so a caller who wants it asks here.

    Args:
        result_id: the "result_id" of /explain's summary JSON.
    """
    return _run(results.downloads_view, result_id)


def info_api(lineup_name=None):
    """The lineups, and the chosen lineup's members, classes, layer choices, CAM methods and warnings
    (what /explain accepts).

    Args:
        lineup_name: the lineup (default: the first of "lineups" in the answer).
    """
    return _run(api.api_info, lineup_name)


def show_differences(metric: str, method_value: str, direction: str, k: float, member: str | None = None):
    """The Explanation-quality tab: the images where the reference's and a member's CAMs score most differently."""
    return _run(quality.quality_differences, metric, method_value, direction, k, member)


def load_example(index: int):
    """A click on an example: put its picture into the photo input."""
    return _run(content.example_image, index)


# ------------------------------------------------------------------------------------- layout

with gr.Blocks(title="cbam-viz: attention gates, side by side", delete_cache=(3600, 3600)) as demo:
    items_state = gr.State([])
    gr.Markdown(INTRO)
    lineup_md = gr.Markdown("*Loading the models...*")

    with gr.Tab("Explain"):
        with gr.Row():
            with gr.Column(scale=3):
                image = gr.Image(type="filepath", label="Photo", sources=["upload", "clipboard"], height=320,
                                 elem_id="input_image")
                files = gr.File(file_count="multiple", file_types=["image"], type="filepath",
                                label=f"Or several photos at once (up to {MAX_IMAGES})")
                # Filled on page load (the examples are written to the temp folder on first use).
                examples = gr.Dataset(components=[image], samples=[], type="index", visible=False,
                                      samples_per_page=EXAMPLES_PER_PAGE,
                                      label="Examples (each answers at once after its first use)")
            with gr.Column(scale=2):
                lineup = gr.Dropdown([], value=None, label="Lineup (models side by side)",
                                     elem_id="lineup")  # every lineup, on page load
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
                # Off by default and on a Space: then no input of the page takes a checkpoint.
                own = panels.OwnModelInputs.build(upload.MAX_MODEL_BYTES, render=UPLOAD)

        status = gr.Markdown(elem_id="status")
        picker = gr.Dropdown([], label="Showing image", visible=False, interactive=True)
        ui = panels.ResultPanels.build(page.MAX_MEMBERS)

    with gr.Tab("Explanation quality") as quality_tab:
        quality_reading = gr.Markdown(elem_id="quality_reading")
        quality_fig = gr.Image(label="Each model − the reference, paired over the same images, 95 % intervals "
                               "(right: better; filled: the interval excludes 0)", interactive=False, format="png",
                               visible=False, elem_id="quality_forest")
        with gr.Accordion("The measured tables and how they were made", open=False):
            quality_md = gr.Markdown("*Loading the measured results...*")
        gr.Markdown("### Where the two models differ most\n"
                    "Pick a metric to see the boxed photos behind the averages: green boxes are the "
                    "true objects, white boxes each CAM's own box at its best threshold.")
        with gr.Row():
            # Choices on page load: the quality package imports torchvision, which the start need not wait for.
            q_metric = gr.Dropdown([], value=None, label="Metric", elem_id="quality_metric")
            q_method = gr.Dropdown(["gradcam"], value="gradcam", label="CAM method")  # the report's, on load
            q_direction = gr.Radio([], value=None, label="Show")
            q_member = gr.Dropdown([], value=None, label="Compared with the reference", elem_id="quality_member")
            q_k = gr.Slider(1, 16, value=6, step=1, label="Images")
        q_note = gr.Markdown()
        q_gallery = gr.Gallery(label="Boxed photo | reference CAM | compared model's CAM", columns=2, height="auto",
                               object_fit="contain", format="png", elem_id="quality_gallery")
        gates_md = gr.Markdown()
        profiles_md = gr.Markdown()
        profiles_img = gr.Gallery(label="Mean channel gate per class, per block: one figure per gated member",
                                  columns=1, height="auto", object_fit="contain", format="png", visible=False,
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
        # The pictures as data URIs inside the answer: no file to cache and fetch (docs/performance.md).
        api_pictures = gr.JSON(label="each member's pictures (data URIs)")
        api_want_pictures = gr.Checkbox(value=True, label="pictures")
        api_info = gr.JSON(label="info")
        downloads_button = gr.Button("downloads (API)")
        api_result_id = gr.Textbox(label="result id")
        api_downloads = gr.File(file_count="multiple", label="composite PNG, JSON and npz")

    view = ui.components
    explained = [items_state, picker, status, *view]
    lineup_parts = [lineup_md, target, layer, about_md, *ui.headings]  # no result part: see ui.columns
    controls = [lineup, method, target, layer, alpha]
    # preprocess=False: a shared link restores the lineup's value before on_load gives the dropdown its choices.
    demo.load(on_load, inputs=[lineup, method, target, layer, ui.current], preprocess=False,
              outputs=[lineup, examples, quality_md, quality_reading, quality_fig, q_metric, q_method, q_direction,
                       q_member, q_note, method, method_md, *lineup_parts], api_visibility="private")
    # The answers about the shown result (downloads, a clicked point, the gate ablation: seconds each)
    # are cancelled when another result is shown, so a late one never lands under the new photo
    # (the cancelled work itself finishes in its thread: Gradio cannot stop a running function).
    about_result = [
        ui.downloads_btn.click(build_downloads, inputs=[ui.current, items_state], outputs=[ui.downloads],
                               api_visibility="private"),
        ui.probe_img.select(probe, inputs=[ui.current, ui.gate_member, items_state],
                            outputs=[ui.probe_plot, ui.probe_md], api_visibility="private", show_progress="hidden"),
        # ~25 forwards: one at a time, so that explanations keep the cores.
        ui.ablate_btn.click(ablate, inputs=[ui.current, ui.gate_member, items_state],
                            outputs=[ui.ablation_plot, ui.ablation_table, ui.ablation_md],
                            api_visibility="private", concurrency_limit=1, concurrency_id="research"),
    ]
    examples.click(load_example, inputs=[examples], outputs=[image], api_visibility="private",
                   show_progress="hidden", cancels=about_result).then(
        explain_example, inputs=[examples, *controls], outputs=explained, api_visibility="private")
    lineup.change(on_lineup_change, inputs=[lineup, target, layer], outputs=lineup_parts, api_visibility="private")
    lineup.input(on_lineup_pick, inputs=[lineup, ui.current, items_state], outputs=view, api_visibility="private")
    method.change(on_method_change, inputs=[method], outputs=[method_md], api_visibility="private", queue=False)
    # show_progress "full" (the default): the queue position while waiting, gr.Progress steps while running.
    run.click(explain_ui, inputs=[image, files, *controls], outputs=explained, api_name="explain_ui",
              api_visibility="undocumented", preprocess=False, cancels=about_result)
    # ``input``: a person's pick; Explain and the examples set the picker with the view already filled.
    picker.input(show_item, inputs=[picker, items_state], outputs=[status, *view], api_visibility="private",
                 cancels=about_result)
    gr.on([ui.compare_a.input, ui.compare_b.input], compare_members,
          inputs=[ui.compare_a, ui.compare_b, ui.current, items_state], outputs=[ui.compare],
          api_visibility="private", show_progress="hidden")
    # One model written at a time (the manifest is the commit point); preprocess=False: the uploads'
    # original names reach the messages.
    if UPLOAD:
        own.button.click(add_own_model, inputs=[own.checkpoint, own.classes, own.name],
                         outputs=[own.result, lineup, *view], api_visibility="private", preprocess=False,
                         concurrency_limit=1, concurrency_id="add_model")
    api_button.click(explain_api, inputs=[image, method, target, layer, alpha, lineup, api_want_pictures],
                     outputs=[api_summary, api_pictures],
                     api_name="explain", preprocess=False)
    # preprocess=False: the lineup dropdown's choices arrive with the page, an API caller names any lineup
    # (an unknown one gets its one sentence from get_lineup, not Gradio's "not in the list of choices").
    info_button.click(info_api, inputs=[lineup], outputs=[api_info], api_name="info", preprocess=False)
    downloads_button.click(downloads_api, inputs=[api_result_id], outputs=[api_downloads], api_name="downloads")
    q_inputs = [q_metric, q_method, q_direction, q_k, q_member]
    # One render at a time for this tab: explanations keep the cores. ``input``, not ``change``: a person's
    # choice renders, the page load filling the choices does not.
    gr.on([quality_tab.select, *(c.input for c in q_inputs)], show_differences, inputs=q_inputs,
          outputs=[q_gallery, q_note], api_visibility="private", concurrency_limit=1, concurrency_id="quality")
    quality_tab.select(show_quality_extras, outputs=[gates_md, profiles_img, profiles_table, profiles_md],
                       api_visibility="private", concurrency_limit=1, concurrency_id="quality")

demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)

if __name__ == "__main__":
    upload.search_user_weights()  # with uploads on: earlier uploads are listed beside the shipped lineups
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
