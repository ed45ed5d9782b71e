"""The one place where the views' named parts meet ``app.py``'s components (the only Gradio here).

``app.py`` builds the layout and hands its components to :class:`ResultPanels` once; every event
that shows a result, a lineup or nothing maps its named view through it, so no caller counts
positions in a tuple of outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import gradio as gr

from cbam_viz.app.content import Choices
from cbam_viz.app.gates import ABLATION_COLUMNS
from cbam_viz.app.page import LineupView
from cbam_viz.app.results import ExplainView, ResultView
from cbam_viz.colour_scale import colour_scale_html

__all__ = ["update", "ResultPanels", "OwnModelInputs"]


def update(choices: Choices | None, **extra) -> Any:
    """A dropdown's new choices, value and visibility (None: leave it as it is)."""
    if choices is None:
        return gr.update(**extra)
    return gr.update(choices=choices.choices, value=choices.value, visible=choices.visible, **extra)


@dataclass
class ResultPanels:
    """The components that show one result: a column per member slot, a gate pane per slot, the rest."""

    member_col: list
    member_title: list
    member_label: list
    member_cam: list
    member_faith: list
    gate_col: list
    gate_title: list
    gate_sheet: list
    gate_channel: list
    compare_row: Any
    compare: Any
    compare_a: Any
    compare_b: Any
    gates_group: Any
    gate_member: Any
    probe_img: Any
    faithful_img: Any
    faithful_md: Any
    timings_line: Any
    timings: Any
    current: Any
    downloads: Any
    probe_plot: Any
    probe_md: Any
    ablation_plot: Any
    ablation_table: Any
    ablation_md: Any
    # Buttons of the area (inputs of events, never an output).
    ablate_btn: Any = field(default=None, metadata={"output": False})
    downloads_btn: Any = field(default=None, metadata={"output": False})

    @property
    def components(self) -> list:
        """Every component this maps onto (an event's ``outputs``)."""
        out = []
        for f in fields(self):
            if f.metadata.get("output", True):
                value = getattr(self, f.name)
                out += value if isinstance(value, list) else [value]
        return out

    @classmethod
    def build(cls, slots: int) -> ResultPanels:
        """Lay the result area out (inside ``gr.Blocks``): ``slots`` member columns, the compare slider,
        faithfulness, "what the gates did" (a pane per slot, the click probe, the gate ablation),
        timings and downloads."""
        parts: dict[str, Any] = {name: [] for name in ("member_col", "member_title", "member_label", "member_cam",
                                                       "member_faith", "gate_col", "gate_title", "gate_sheet",
                                                       "gate_channel")}
        with gr.Row(equal_height=True):
            for i in range(slots):
                _member_column(parts, i)
        gr.HTML(colour_scale_html(), elem_id="colour_scale")  # what the heatmaps' colours mean (no file)
        with gr.Row() as parts["compare_row"]:
            parts["compare"] = gr.ImageSlider(
                label="One model's CAM | another's on the same photo: drag across to compare", interactive=False,
                type="filepath", elem_id="cam_compare", scale=3, max_height=420)
            with gr.Column(scale=1, min_width=200):
                parts["compare_a"] = gr.Dropdown([], label="Left", elem_id="compare_a")
                parts["compare_b"] = gr.Dropdown([], label="Right", elem_id="compare_b")
        with gr.Row():
            parts["faithful_img"] = gr.Image(label="Faithfulness: each model's input with the top of its own CAM "
                                             "blurred away", interactive=False, elem_id="faithfulness", scale=3)
            parts["faithful_md"] = gr.Markdown(elem_id="faithfulness_note")
        with gr.Column(visible=False) as parts["gates_group"]:
            _gates_area(parts, slots)
        parts["timings_line"] = gr.Markdown(elem_id="timings_line")
        with gr.Accordion("Timings, step by step", open=False):
            parts["timings"] = gr.Markdown()
        with gr.Row():
            parts["downloads_btn"] = gr.Button("Build the downloads: composite PNG, JSON, raw maps (.npz)",
                                               elem_id="downloads_button")
            gr.DeepLinkButton("Share this result (copies a link)", copied_value="Link copied")
        parts["downloads"] = gr.File(label="Downloads: composite PNG, JSON, raw maps (.npz)", file_count="multiple",
                                     interactive=False, elem_id="downloads")
        parts["current"] = gr.Textbox(visible=False)  # the shown result's id (a deep link keeps it too)
        return cls(**parts)

    def columns(self, titles: list[str]) -> dict:
        """The member columns' headings and visibility: a column per title, the rest hidden.

        Only these (no component holding a result) are an output of the page load and of a lineup
        change: a shared link's restored result must stay (Gradio drops the restored values of a load
        event's outputs)."""
        out = {}
        for i, column in enumerate(self.member_col):
            title = titles[i] if i < len(titles) else None
            out[column] = gr.update(visible=title is not None)
            out[self.member_title[i]] = f"### {title}" if title else ""
        return out

    @property
    def headings(self) -> list:
        """The components :meth:`columns` fills."""
        return [*self.member_col, *self.member_title]

    def _slots(self, view: ResultView | None) -> dict:
        members = view.members if view else ()
        out = self.columns([m.title for m in members]) if view else {}
        for i in range(len(self.member_col)):
            m = members[i] if i < len(members) else None
            g = view.gates[i] if view and i < len(view.gates) else None
            out[self.member_label[i]] = gr.update(value=m.labels if m else None,
                                                  label=f"{m.title}: predictions" if m else "Predictions")
            out[self.member_cam[i]] = m.slider if m else None
            out[self.member_faith[i]] = m.faithfulness if m else ""
            out[self.gate_col[i]] = gr.update(visible=g is not None)
            out[self.gate_title[i]] = f"#### {g.title}" if g else ""
            out[self.gate_sheet[i]] = gr.update(value=g.sheet if g else None, visible=bool(g and g.sheet))
            out[self.gate_channel[i]] = gr.update(value=g.channel if g else None,
                                                  visible=bool(g and g.channel is not None))
        return out

    def show(self, view: ResultView | None) -> dict:
        """A result's named parts onto the components (None: empty them, the columns' headings stay);
        the answers about the previous result (downloads, probe, ablation) go."""
        out = self._slots(view)
        several = view is not None and view.compare is not None
        out.update({
            self.compare_row: gr.update(visible=several), self.compare: view.compare if several else None,
            self.compare_a: update(view.compare_a if view else None),
            self.compare_b: update(view.compare_b if view else None),
            self.gates_group: gr.update(visible=bool(view and view.gates)),
            self.gate_member: update(view.gate_member if view else None),
            self.probe_img: view.photo if view else None,
            self.faithful_img: view.faithfulness_image if view else None,
            self.faithful_md: view.faithfulness if view else "",
            self.timings_line: view.timings_line if view else "", self.timings: view.timings if view else "",
            self.current: view.result_id if view else "",
            self.downloads: None, self.probe_plot: None, self.probe_md: "", self.ablation_plot: None,
            self.ablation_table: None, self.ablation_md: "",
        })
        return out

    def explained(self, view: ExplainView, *, items_state, picker, status) -> dict:
        """Explain or an example: the batch's items, the picker, the notes, the first image."""
        return {items_state: view.items, picker: update(view.picker), status: view.status, **self.show(view.shown)}

    def lineup(self, view: LineupView, *, markdown, target, layer, card) -> dict:
        """A lineup chosen (or the page opened): its line, controls, card and member columns."""
        if view.error:
            gr.Warning(view.error)
        out = {markdown: view.markdown, target: update(view.targets), layer: update(view.layers), card: view.card}
        if view.members:
            out.update(self.columns([m.title for m in view.members]))
        return out


def _member_column(parts: dict[str, Any], i: int) -> None:
    with gr.Column(visible=i < 2, min_width=220) as column:
        parts["member_col"].append(column)
        parts["member_title"].append(gr.Markdown(elem_id=f"title_{i}"))
        parts["member_label"].append(gr.Label(num_top_classes=5, label="Predictions", elem_id=f"pred_{i}"))
        parts["member_cam"].append(gr.ImageSlider(label="Photo | CAM overlay (drag the bar)", interactive=False,
                                                  type="filepath", elem_id=f"cam_{i}", max_height=420))
        parts["member_faith"].append(gr.Markdown(elem_id=f"faithfulness_{i}"))


def _gates_area(parts: dict[str, Any], slots: int) -> None:
    gr.Markdown("### What the gates did")
    for i in range(slots):
        with gr.Column(visible=False) as column:
            parts["gate_col"].append(column)
            parts["gate_title"].append(gr.Markdown())
            parts["gate_sheet"].append(gr.Image(label="Spatial attention of every block (where each block looks)",
                                                interactive=False, elem_id=f"attention_{i}"))
            parts["gate_channel"].append(gr.LinePlot(
                x="rank", y="attention", color="block", y_lim=[0, 1], elem_id=f"channel_{i}",
                label="Channel attention of every block: how each block re-weights its feature maps, channels "
                      "sorted from most to least passed (hover: block, channel, value)",
                x_title="channels of the block, sorted by their gate", height=300,
                tooltip=["block", "channel", "attention"]))
    parts["gate_member"] = gr.Dropdown([], label="Model whose gates the click and the ablation ask",
                                       elem_id="gate_member")
    with gr.Row():
        parts["probe_img"] = gr.Image(label="Click the photo: every block's spatial attention at that point",
                                      interactive=False, elem_id="probe_image", height=300, scale=2)
        with gr.Column(scale=3):
            parts["probe_plot"] = gr.BarPlot(x="block", y="spatial attention", y_lim=[0, 1], elem_id="probe_plot",
                                             label="Spatial attention at the clicked point, per block", height=240,
                                             tooltip=["block", "spatial attention"])
            parts["probe_md"] = gr.Markdown()
    gr.Markdown("### Is this attention used?\nSwitch each gate of the chosen model off (set it to 1) on this photo, "
                "one block at a time and all at once, and see how the prediction and the CAM change (about 25 "
                "forwards of that model).")
    parts["ablate_btn"] = gr.Button("Switch each gate off and measure", elem_id="ablate_button")
    parts["ablation_md"] = gr.Markdown()
    with gr.Row():
        parts["ablation_plot"] = gr.BarPlot(x="ablation", y="prob_change", color="gate", y_lim=[-1, 1],
                                            x_label_angle=-45, elem_id="ablation_plot", height=300, sort=None,
                                            label="Change of the top-1 probability with the gate switched off",
                                            tooltip=["block", "gate", "prob_change", "cam_correlation"])
        parts["ablation_table"] = gr.Dataframe(headers=list(ABLATION_COLUMNS), interactive=False,
                                               label="Gate ablation: probability change, CAM correlation with the "
                                                     "intact model", elem_id="ablation_table")


@dataclass
class OwnModelInputs:
    """The "your own model" inputs (a local run with uploads allowed only: :mod:`cbam_viz.app.upload`)."""

    checkpoint: Any
    classes: Any
    name: Any
    button: Any
    result: Any

    @classmethod
    def build(cls, max_bytes: int, *, render: bool = True) -> OwnModelInputs:
        """The inputs in an accordion; ``render=False``: made but not on the page (uploads off), so no
        input of the page takes a checkpoint while the app's handler still names its outputs."""
        if not render:
            return cls._make(max_bytes, render=False)
        with gr.Accordion("Your own model (this computer only)", open=False):
            return cls._make(max_bytes, render=True)

    @classmethod
    def _make(cls, max_bytes: int, *, render: bool) -> OwnModelInputs:
        checkpoint = gr.File(label=f"Checkpoint (.pth, .pt, .safetensors; up to {max_bytes // 2**20} MB)",
                             type="filepath", file_types=[".pth", ".pt", ".safetensors", ".bin", ".ckpt"],
                             elem_id="own_checkpoint", render=render)
        classes = gr.File(label="Class names (optional: a text file, one per line, or JSON)", type="filepath",
                          file_types=[".txt", ".json"], elem_id="own_classes", render=render)
        name = gr.Textbox(label="Name (default: the file's name)", elem_id="own_name", render=render)
        button = gr.Button("Add this model", elem_id="own_add", render=render)
        result = gr.Markdown(elem_id="own_result", render=render)
        return cls(checkpoint, classes, name, button, result)
