"""Explained photos as files: one request folder per request (the page, ``/explain``), or the CLI's folder.

A request draws and writes only what its caller shows (``pictures=`` and ``write=`` of
:func:`explain_files`): the page a few JPEGs and builds the composite when a person asks for the
downloads (:func:`cbam_viz.service.results.build_downloads`, from the JSON and npz every request
writes), the ``/explain`` API only the JSON and npz (its pictures go back inside its answer).
Photo-like pictures are JPEG, charts PNG at a low zlib level; request folders are temporary, so
their files skip ``fsync`` (:func:`cbam_viz.outputs.atomic_write`). Each request writes into its own fresh folder, so users
never see each other's files. The files a person keeps (:func:`save`, the CLI) are durable.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cbam_viz import figures, outputs
from cbam_viz.engine.cam import method_kind
from cbam_viz.engine.controls import check_controls
from cbam_viz.messages import UserFacingError, first_sentence
from cbam_viz.service import access
from cbam_viz.service.analysis import ALL_PICTURES, Analysis, analyse_checked

__all__ = ["IMAGE_SUFFIXES", "ALL_FILES", "PAGE_FILES", "API_FILES", "ImageResult", "BatchResult", "save",
           "collect_images", "explain_files", "is_slow_method", "member_stems"]

#: What a request can write into its folder: ``photo`` the analysed photo, ``pictures`` every
#: picture drawn, ``composite`` the composite PNG, ``json`` and ``npz`` the downloads.
ALL_FILES = frozenset({"photo", "pictures", "composite", "json", "npz"})
#: The page: the composite waits for the downloads button.
PAGE_FILES = frozenset({"photo", "pictures", "json", "npz"})
#: ``/explain``: the JSON and the npz alone, what ``/downloads`` builds from (its pictures travel in
#: its answer, encoded in memory: no file for Gradio to copy into its cache and the caller to fetch).
API_FILES = frozenset({"json", "npz"})
#: File suffixes treated as images when a folder is given.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def save(analysis: Analysis, out_dir: str | os.PathLike, *, stem: str | None = None,
         formats: Iterable[str] = ("png", "json", "npz")) -> dict[str, Path]:
    """Write the composite PNG, the JSON and/or the npz of one analysis (atomically); return their paths.

    The composite is drawn here if the analysis did not draw it. These are files a person keeps:
    written durably (``fsync``), the PNG and the npz compressed.

    Raises:
        OSError: the folder cannot be written (permissions, disk full...).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or outputs.safe_stem(analysis.name)
    formats = set(formats)
    paths: dict[str, Path] = {}
    if "png" in formats:
        paths["png"] = outputs.write_png(composite_of(analysis), out_dir / f"{stem}.png")
    if "json" in formats:
        paths["json"] = outputs.write_json(analysis.summary, out_dir / f"{stem}.json")
    if "npz" in formats:
        paths["npz"] = outputs.write_npz(outputs.npz_arrays(analysis.explanation, analysis.image),
                                         out_dir / f"{stem}.npz")
    return paths


def composite_of(analysis: Analysis) -> Image.Image:
    if analysis.composite is not None:
        return analysis.composite
    return figures.composite(analysis.image, analysis.explanation, alpha=analysis.alpha)


def collect_images(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Files as given plus image files found (recursively, sorted) in folders; and the missing paths.

    A file given explicitly is kept whatever its suffix (it fails later with a clear reason if it
    is not an image); in folders only :data:`IMAGE_SUFFIXES` count, hidden files and folders not.
    """
    found: list[Path] = []
    missing: list[str] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                                and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            candidates = [path]
        else:
            missing.append(str(item))
            continue
        for p in candidates:
            if (key := p.resolve()) not in seen:
                seen.add(key)
                found.append(p)
    return found, missing


@dataclass(frozen=True)
class ImageResult:
    """One explained image with its pictures written to its own folder of the request (for the UI).

    What is there depends on the request's ``write=`` (see :func:`explain_files`): a picture that
    was not drawn or written is absent (an empty dict, None). Pictures are keyed by member name.
    """

    analysis: Analysis                         # its JSON (``files["json"]``) is ``analysis.summary``
    overlays: dict[str, Path]                  # every member's CAM overlay
    spatial_sheets: dict[str, Path]            # gated members' spatial sheets
    channel_overviews: dict[str, Path]         # gated members' channel overviews
    files: dict[str, Path]                     # "png" (the composite) / "json" / "npz", as written
    faithfulness: Path | None = None           # the confidence-drop picture
    photo: Path | None = None                  # the analysed photo (what the overlays are drawn on)
    result_id: str = ""                        # names the folder: see cbam_viz.outputs.result_dir

    @property
    def name(self) -> str:
        return self.analysis.name


@dataclass(frozen=True)
class BatchResult:
    results: list[ImageResult]
    failures: list[tuple[str, str]]            # (file name, one-sentence reason)
    out_dir: Path
    archive: Path | None                       # zip of every file when more than one image (if written)


def member_stems(names: Iterable[str]) -> dict[str, str]:
    """A file-name part per member: its position and a safe form of its name (``1_resnet18_cbam``)."""
    return {n: f"{i}_{outputs.safe_stem(n)}" for i, n in enumerate(names)}


# Request folders are temporary (removed after OUTPUT_MAX_AGE_S): atomic, not durable.
def _jpeg(image: Image.Image, path: Path) -> Path:
    return outputs.write_jpeg(image, path, durable=False)


def _png(image: Image.Image, path: Path) -> Path:
    return outputs.write_png(image, path, compress_level=outputs.PNG_FAST, durable=False)


def _write_pictures(analysis: Analysis, folder: Path) -> dict[str, object]:
    stems = member_stems(analysis.explanation.models)
    out: dict[str, object] = {
        "overlays": {n: _jpeg(im, folder / f"cam_{stems[n]}.jpg") for n, im in analysis.overlays.items()},
        "spatial_sheets": {n: _jpeg(im, folder / f"spatial_{stems[n]}.jpg")
                           for n, im in analysis.spatial_sheets.items()},
        "channel_overviews": {n: _png(im, folder / f"channel_{stems[n]}.png")
                              for n, im in analysis.channel_overviews.items() if im is not None},
        "faithfulness": None,
    }
    if analysis.faithfulness_image is not None:
        out["faithfulness"] = _png(analysis.faithfulness_image, folder / "faithfulness.png")
    return out


def _write_result(analysis: Analysis, folder: Path, stem: str, write: frozenset[str]) -> ImageResult:
    """The files ``write`` asks for; the JSON last, so that it holds the ``write_files`` time."""
    t = time.perf_counter()
    files: dict[str, Path] = {}
    photo = _jpeg(analysis.image, folder / "photo.jpg") if "photo" in write else None
    pictures = (_write_pictures(analysis, folder) if "pictures" in write
                else {"overlays": {}, "spatial_sheets": {}, "channel_overviews": {}, "faithfulness": None})
    if "composite" in write:
        files["png"] = _png(composite_of(analysis), folder / f"{stem}.png")
    if "npz" in write:
        # Uncompressed: ~1 ms instead of ~80 ms; np.load reads it the same. build_downloads reads it.
        files["npz"] = outputs.write_npz(outputs.npz_arrays(analysis.explanation, analysis.image),
                                         folder / f"{stem}.npz", compress=False, durable=False)
    analysis = analysis.with_timing("write_files", time.perf_counter() - t)
    if "json" in write:
        files["json"] = outputs.write_json(analysis.summary, folder / f"{stem}.json", durable=False)
    files = {k: files[k] for k in ("png", "json", "npz") if k in files}
    return ImageResult(analysis=analysis, files=files, photo=photo, result_id=f"{folder.parent.name}/{folder.name}",
                       **pictures)


def is_slow_method(method: str) -> bool:
    """True for the CAM methods that run many passes (Score-CAM, Ablation-CAM, ...): worth a progress bar."""
    try:
        return method_kind(method) == "library"
    except ValueError:
        return False


def _checked_sources(sources, names, max_images: int) -> list[tuple]:
    if names is None:
        names = [None] * len(sources)
    if len(names) != len(sources):
        raise ValueError(f"{len(names)} names for {len(sources)} sources")
    given = [(s, n) for s, n in zip(sources, names) if s]
    if not given:
        raise UserFacingError("Please upload an image first (or pick an example).")
    if len(given) > max_images:
        raise UserFacingError(f"Please upload at most {max_images} images at once (got {len(given)}).")
    return given


def explain_files(
    sources: Sequence[str | os.PathLike],
    *,
    lineup_name: str | None = None,
    method: str = "gradcam",
    target: str | int | None = None,
    layer: str | None = None,
    alpha: float = 0.5,
    names: Sequence[str | None] | None = None,
    out_root: str | os.PathLike | None = None,
    max_images: int = 16,
    pictures: Iterable[str] = ALL_PICTURES,
    write: Iterable[str] = ALL_FILES,
    progress: Callable[[float, str], object] | None = None,
) -> BatchResult:
    """Explain each file with every member of a lineup; write its pictures and downloads into one fresh
    request folder.

    A file that fails is listed in ``failures`` with its reason; the others go on. When every file
    fails (or a control is wrong), :class:`UserFacingError` is raised instead. The controls are
    checked once, up front, and travel checked to every photo.

    Args:
        sources: image file paths.
        names: what to call each file in captions, messages and download names (e.g. the name
            it was uploaded under); default: each path's file name.
        out_root: where the request folder is made (default :data:`cbam_viz.outputs.OUTPUT_ROOT`).
        pictures: what to draw (:data:`cbam_viz.service.analysis.PICTURES`).
        write: what to write (:data:`ALL_FILES`; the page: :data:`PAGE_FILES`, ``/explain``:
            :data:`API_FILES`). The zip of a batch is written when the composite is.
        progress: called as ``progress(fraction_done, description)`` before each image's steps
            (e.g. a ``gr.Progress``); its errors are not caught.
    """
    pictures, write = frozenset(pictures), frozenset(write)
    if unknown := write - ALL_FILES:
        raise ValueError(f"unknown files {sorted(unknown)}; choose from {', '.join(sorted(ALL_FILES))}")
    given = _checked_sources(sources, names, max_images)
    lineup = access.get_lineup(lineup_name)
    controls = check_controls(lineup, method=method, target=target, layer=layer, alpha=alpha)  # once, up front
    out_dir = outputs.new_request_dir(out_root)
    results: list[ImageResult] = []
    failures: list[tuple[str, str]] = []
    used: set[str] = set()
    n = len(given)
    for i, (source, name) in enumerate(given):
        display = name or Path(os.fspath(source)).name
        if progress is not None:
            what = (f"{controls.method}, {len(lineup.members)} model(s)"
                    + (" (many passes)" if is_slow_method(controls.method) else ""))
            progress(i / n, f"image {i + 1} of {n}: {display}: {what}")
        try:
            analysis = analyse_checked(source, lineup, controls, served=True, name=display, pictures=pictures)
            if progress is not None:
                progress((i + 0.9) / n, f"image {i + 1} of {n}: {display}: writing the pictures")
            stem = outputs.unique_stem(outputs.safe_stem(display), used)
            folder = out_dir / f"{i:02d}_{stem}"
            folder.mkdir()
            results.append(_write_result(analysis, folder, stem, write))
        except UserFacingError as err:
            failures.append((display, str(err)))
        except OSError as err:
            raise UserFacingError(f"The server could not write its output files: {first_sentence(err)}") from err
    if not results:
        if len(failures) == 1:
            raise UserFacingError(failures[0][1])
        raise UserFacingError("None of the images could be explained: "
                              + "; ".join(f"{n}: {m.rstrip('.')}" for n, m in failures) + ".")
    archive = None
    if len(results) > 1 and "composite" in write:
        archive = outputs.write_zip((p for r in results for p in r.files.values()), out_dir / "cbam_viz_results.zip",
                                    durable=False)
    return BatchResult(results=results, failures=failures, out_dir=out_dir, archive=archive)
