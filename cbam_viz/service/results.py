"""A written result read back: downloads built on demand, the click probe and the gate ablation.

:func:`cbam_viz.service.files.explain_files` leaves the JSON and the npz of every photo in its
request folder; what a person asks for later (the composite and the zip, the gate values under
a clicked pixel, what switching a gate off changes) is computed from those files, so nothing
has to stay in memory between clicks.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cbam_viz import figures, outputs, zerogpu
from cbam_viz.engine.explain import Explanation, ModelExplanation, Prediction
from cbam_viz.messages import UserFacingError, format_error
from cbam_viz.service import access

__all__ = ["SavedResult", "load_result", "build_downloads", "spatial_at", "ablate_result"]


@dataclass(frozen=True)
class SavedResult:
    """One image's result as its folder holds it: the JSON document and the raw arrays of the npz."""

    result_id: str
    folder: Path
    stem: str
    summary: dict[str, Any]
    json_path: Path
    npz_path: Path

    def arrays(self, prefix: str = "") -> dict[str, Any]:
        """The npz's arrays whose key starts with ``prefix`` (``"resnet18_cbam_imagenette/spatial/"``; "" for all)."""
        with np.load(self.npz_path) as z:
            return {k: z[k] for k in z.files if k.startswith(prefix)}

    @property
    def members(self) -> list[str]:
        return list(self.summary["members"])

    @property
    def image(self) -> Image.Image:
        """The analysed RGB photo (what the CAMs and attention maps were computed on)."""
        return Image.fromarray(self.arrays("image")["image"], "RGB")

    def explanation(self) -> Explanation:
        """The :class:`~cbam_viz.engine.explain.Explanation` again, from the JSON and the npz (for drawing)."""
        arrays = self.arrays()

        def model(name: str) -> ModelExplanation:
            m = self.summary["models"][name]
            return ModelExplanation(
                model_name=m["name"], predictions=tuple(Prediction(**p) for p in m["predictions"]),
                target=int(m["target"]["index"]), target_label=m["target"]["label"], cam=arrays[f"{name}/cam"],
                channel_attention={k.rsplit("/", 1)[1]: v for k, v in arrays.items()
                                   if k.startswith(f"{name}/channel/")},
                spatial_attention={k.rsplit("/", 1)[1]: v for k, v in arrays.items()
                                   if k.startswith(f"{name}/spatial/")},
                timings=dict(m["timings"]))

        size = self.summary["image"]["analysed_size"]
        return Explanation(image_size=(int(size[0]), int(size[1])), method=self.summary["method"],
                           layer=self.summary["layer"], reference=self.summary["reference"],
                           models={n: model(n) for n in self.members})

    def gated_member(self, member: str | None, kind: str) -> str:
        """``member`` if given (checked), else the last member whose JSON lists ``kind`` among its gates."""
        models = self.summary["models"]
        if member is not None:
            if member not in models:
                raise UserFacingError(f"No model {member!r} in this result (models: {', '.join(models)}).")
            return member
        gated = [n for n in self.members if kind in models[n].get("gates", ())]
        if not gated:
            raise UserFacingError(f"No model of this lineup has {kind} attention gates.")
        return gated[-1]


def load_result(result_id: str, *, root: str | os.PathLike | None = None) -> SavedResult:
    """The result :func:`~cbam_viz.service.files.explain_files` wrote under ``result_id``.

    Raises:
        UserFacingError: a malformed id, results that are gone, or a folder without its JSON and npz.
    """
    folder = outputs.result_dir(result_id, root)
    stem = folder.name.split("_", 1)[1]  # "00_<stem>" (three digits from the 101st image)
    json_path, npz_path = folder / f"{stem}.json", folder / f"{stem}.npz"
    try:
        summary = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserFacingError("These results are incomplete on the server; press Explain again.") from err
    if not npz_path.is_file():
        raise UserFacingError("These results are incomplete on the server; press Explain again.")
    return SavedResult(result_id=result_id, folder=folder, stem=stem, summary=summary, json_path=json_path,
                       npz_path=npz_path)


def build_downloads(result_ids: Sequence[str], *, root: str | os.PathLike | None = None) -> list[Path]:
    """The downloads of written results, built on demand: per image the composite PNG, its JSON and
    npz, and for several images one zip of them all (built once; a second call returns the files).

    Raises:
        UserFacingError: no results, or results that are gone.
    """
    if not result_ids:
        raise UserFacingError("Explain an image first.")
    saved = [load_result(r, root=root) for r in result_ids]
    files: list[Path] = []
    for s in saved:
        png = s.folder / f"{s.stem}.png"
        if not png.is_file():
            composite = figures.composite(s.image, s.explanation(), alpha=float(s.summary.get("alpha", 0.5)))
            outputs.write_png(composite, png, durable=False)
        files += [png, s.json_path, s.npz_path]
    if len(saved) > 1:
        archive = saved[0].folder.parent / "cbam_viz_results.zip"
        if not archive.is_file():
            outputs.write_zip(files, archive, durable=False)
        files.append(archive)
    return files


def spatial_at(result_id: str, x: float, y: float, *, member: str | None = None,
               root: str | os.PathLike | None = None) -> list[tuple[str, float]]:
    """Every spatial gate's value of one member at pixel ``(x, y)`` of the analysed photo.

    Each map covers the whole photo (the model sees it resized), so the point falls in cell
    ``(floor(y * h / H), floor(x * w / W))`` of an ``h x w`` map; that cell's gate value is returned.

    Args:
        member: the lineup member (default: the last one with spatial gates).

    Returns:
        ``[(block, value)]`` in forward order.

    Raises:
        UserFacingError: a point outside the photo, a member without spatial gates, results that are gone.
    """
    saved = load_result(result_id, root=root)
    member = saved.gated_member(member, "spatial")
    width, height = saved.summary["image"]["analysed_size"]
    if not (0 <= x < width and 0 <= y < height):
        raise UserFacingError(f"Click inside the photo ({width}x{height} pixels).")
    out = []
    for key, m in saved.arrays(f"{member}/spatial/").items():
        h, w = m.shape
        out.append((key.rsplit("/", 1)[1], float(m[min(h - 1, int(y * h / height)), min(w - 1, int(x * w / width))])))
    return out


def ablate_result(result_id: str, *, member: str | None = None, constant: str = "one",
                  root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Is this attention used? Gate ablation of one gated member on a written result's photo.

    Each gate set to ``constant`` (and all of them at once): the change of the top-1 probability
    and the CAM's correlation with the intact model's, from
    :func:`cbam_viz.research.gate_ablation.ablate_image` (it holds the model's lock).

    Args:
        member: the lineup member (default: the last one with gates).

    Raises:
        UserFacingError: results that are gone, a member without gates, or a lineup that no longer loads.
    """
    saved = load_result(result_id, root=root)
    models = saved.summary["models"]
    if member is None:
        gated = [n for n in saved.members if models[n].get("gates")]
        if not gated:
            raise UserFacingError("No model of this lineup has attention gates to switch off.")
        member = gated[-1]
    saved.gated_member(member, "")  # checks the name
    lineup = access.get_lineup(saved.summary["lineup"])
    try:
        return _ablation_work(lineup.name, member, saved.image, constant=constant, layer=saved.summary.get("layer"))
    except UserFacingError:
        raise
    except Exception as err:  # noqa: BLE001  one sentence for the person
        raise UserFacingError(format_error(err)) from err


@zerogpu.gpu
def _ablation_work(lineup, member: str, image: Image.Image, *, constant: str, layer: str | None
                   ) -> list[dict[str, Any]]:
    """The ablation's forwards, with a GPU attached on a ZeroGPU Space, as the analysis's model work."""
    # Imported here: research.gate_ablation pulls research.quality and matplotlib in (~1.1 s measured on
    # this 2-core box) that the app's cold start would pay for a button few press (tests/test_app.py).
    from cbam_viz.research.gate_ablation import ablate_image

    if isinstance(lineup, str):
        lineup = access.get_lineup(lineup)
    return ablate_image(lineup.member(member), image, constant=constant, layer=layer)
