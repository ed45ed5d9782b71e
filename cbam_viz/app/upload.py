"""A local user's own checkpoint, added from the page (issue 29): upload, see what was detected, use it.

Off unless ``CBAM_VIZ_ALLOW_MODEL_UPLOAD=1``, and always off on a Hugging Face Space (``SPACE_ID``
set): a public server must not write files for strangers. The checkpoint goes through
:func:`cbam_viz.models.importer.add_model` (read safely: safetensors or ``weights_only``; the
architecture detected from the keys) into the user weights folder, with a lineup of one of the
same name, so the lineup dropdown offers it at once.

The user weights folder is the first folder of ``$CBAM_VIZ_WEIGHTS_DIR`` when that is set, else
:data:`DEFAULT_USER_WEIGHTS`, which is then searched before the shipped ``weights/``.
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from cbam_viz.app.content import Choices
from cbam_viz.app.page import lineup_choices
from cbam_viz.app.results import upload_paths
from cbam_viz.messages import UserFacingError, first_sentence
from cbam_viz.models.checkpoints import UnsafeCheckpointError
from cbam_viz.models.importer import NAME_PATTERN, add_lineup, add_model
from cbam_viz.models.weights import DEFAULT_WEIGHTS_DIR, WEIGHTS_DIR_ENV, read_manifest, weights_dirs

__all__ = ["ALLOW_ENV", "MAX_MODEL_BYTES", "DEFAULT_USER_WEIGHTS", "ModelAdded", "upload_allowed",
           "user_weights_dir", "search_user_weights", "add_model_view"]

ALLOW_ENV = "CBAM_VIZ_ALLOW_MODEL_UPLOAD"
#: Largest checkpoint the page takes (a ResNet-152 + CBAM is ~240 MB in float32).
MAX_MODEL_BYTES = 500 * 1024 * 1024
DEFAULT_USER_WEIGHTS = Path.home() / ".cache" / "cbam_viz" / "user-weights"
_LOCK = threading.Lock()  # one manifest write at a time


def upload_allowed() -> bool:
    """True on a local run with ``CBAM_VIZ_ALLOW_MODEL_UPLOAD=1``; never on a Space."""
    return os.environ.get(ALLOW_ENV, "0").strip() == "1" and not os.environ.get("SPACE_ID")


def user_weights_dir() -> Path:
    """Where uploaded models go: the first folder of ``$CBAM_VIZ_WEIGHTS_DIR``, else the user folder."""
    if os.environ.get(WEIGHTS_DIR_ENV, "").strip():
        return weights_dirs()[0]
    return DEFAULT_USER_WEIGHTS


def search_user_weights() -> None:
    """Make every loader search the user folder before the shipped ``weights/`` (uploads allowed,
    ``$CBAM_VIZ_WEIGHTS_DIR`` unset): the process's own setting, as if it had been started with it."""
    if upload_allowed() and not os.environ.get(WEIGHTS_DIR_ENV, "").strip():
        os.environ[WEIGHTS_DIR_ENV] = os.pathsep.join([str(DEFAULT_USER_WEIGHTS), str(DEFAULT_WEIGHTS_DIR)])


@dataclass(frozen=True)
class ModelAdded:
    """What the page shows after an upload: what was detected, and the lineup dropdown with it chosen."""

    markdown: str
    lineups: Choices


def _name_from(name: str | None, checkpoint: str, original: str | None) -> str:
    name = (name or "").strip()
    if not name:
        stem = Path(original or checkpoint).stem
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "my-model"
    if not NAME_PATTERN.match(name):
        raise UserFacingError(f"The name {name!r} cannot be used: use letters, digits, '_', '-' and '.', "
                              "up to 64 characters.")
    return name[:64]


def _checked_upload(checkpoint) -> tuple[str, str | None]:
    if not upload_allowed():
        raise UserFacingError(f"Adding models is switched off on this server; on your own computer, start the "
                              f"app with {ALLOW_ENV}=1.")
    paths, names = upload_paths(checkpoint)
    if not paths:
        raise UserFacingError("Please upload a checkpoint file (.pth, .pt or .safetensors).")
    size = Path(paths[0]).stat().st_size
    if size > MAX_MODEL_BYTES:
        raise UserFacingError(f"The checkpoint is {size / 2**20:.0f} MB; the page takes at most "
                              f"{MAX_MODEL_BYTES // 2**20} MB (add larger ones with `python -m cbam_viz add-model`).")
    return paths[0], names[0]


def add_model_view(checkpoint, classes=None, name: str | None = None) -> ModelAdded:
    """Add an uploaded checkpoint (+ an optional class file) as a model and a lineup of one.

    Raises:
        UserFacingError: uploads are off, no file, too large, a bad or taken name, a file that is no
            checkpoint, a pickle that would run code, an unknown layout, classes that do not match:
            one sentence each; nothing is half-written (the manifest is the commit point).
    """
    path, original = _checked_upload(checkpoint)
    name = _name_from(name, path, original)
    class_paths, _ = upload_paths(classes)
    folder = user_weights_dir()
    search_user_weights()
    with _LOCK:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            manifest = read_manifest(folder)
        except OSError as err:
            raise UserFacingError(f"The weights folder {folder} cannot be written: {first_sentence(err)}") from err
        if name in manifest["models"] or name in (manifest.get("lineups") or {}):
            raise UserFacingError(f"A model called {name!r} is already there; choose another name.")
        try:
            record, found = add_model(path, name=name, weights_dir=folder,
                                      classes=class_paths[0] if class_paths else None)
            add_lineup(name, [name], weights_dir=folder)
        except UnsafeCheckpointError as err:
            raise UserFacingError(f"{original or 'The file'} was refused: {first_sentence(err)}") from None
        except (ValueError, FileNotFoundError, OSError) as err:
            raise UserFacingError(first_sentence(err).replace(path, original or Path(path).name)) from None
    lines = "\n".join(f"- {line}" for line in found.lines())  # our own words and arch names
    text = (f"**Added `{name}`** to `{folder}` and chose its lineup below (a lineup of one: combine it with other "
            f"models by `python -m cbam_viz add-lineup`). What was found:\n\n{lines}\n- input size: "
            f"{record.input_size} px, {len(record.classes)} class names")
    return ModelAdded(text, Choices(lineup_choices(), name))
