"""Where the shipped files are: the weights, the reports the app reads and ``app.py`` itself.

Why a module of its own: the same code runs from a git checkout (``python -m cbam_viz`` in the
repository, ``pip install -e .``) and from an installed wheel (``pip install .``), and only the
location of the shipped files differs. In a checkout they sit beside the package (``weights/``,
``docs/``, ``app.py``); a wheel carries copies of them inside the package, under
``cbam_viz/_shipped/`` (``pyproject.toml`` maps the folders there). Every default path of the
library is :data:`SHIPPED_ROOT` joined with the same relative path, so one rule decides for all:

1. the checkout, when this package sits in one (a ``weights/manifest.json`` beside it);
2. else the copy inside the installed package.

The environment variables documented in ``app.py`` (``CBAM_VIZ_WEIGHTS_DIR`` and the report
variables) still override each default, installed or not.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["PACKAGE_DIR", "CHECKOUT_ROOT", "INSTALLED_ROOT", "SHIPPED_ROOT", "shipped_root", "app_script"]

PACKAGE_DIR = Path(__file__).resolve().parent
#: The repository root when the package runs from a checkout (editable installs included).
CHECKOUT_ROOT = PACKAGE_DIR.parent
#: Where a wheel puts its copies of ``weights/``, ``docs/`` (the reports) and ``app.py``.
INSTALLED_ROOT = PACKAGE_DIR / "_shipped"


def shipped_root(package_dir: Path = PACKAGE_DIR) -> Path:
    """The folder holding ``weights/``, ``docs/`` and ``app.py`` for a package at ``package_dir``.

    The checkout wins when it has a manifest: a developer's retrained weights are what they run,
    even if an older wheel is installed as well.
    """
    checkout = package_dir.parent
    if (checkout / "weights" / "manifest.json").is_file() and (checkout / "cbam_viz").is_dir():
        return checkout
    return package_dir / "_shipped"


#: Decided once, at import (a stat or two; no file is read).
SHIPPED_ROOT = shipped_root()


def app_script() -> Path:
    """The Gradio app's script (``cbam-viz app`` runs it as ``python app.py`` would).

    Raises:
        FileNotFoundError: neither the checkout nor the installed package has it.
    """
    path = SHIPPED_ROOT / "app.py"
    if not path.is_file():
        raise FileNotFoundError(f"the app script is missing: {path} (reinstall cbam-viz, or run from a checkout)")
    return path
