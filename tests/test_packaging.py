"""The project installs as a library with a console command, and finds its shipped files when installed.

The slow test builds and installs the project into a fresh virtual environment the way a user would
(``pip install .``), but offline and without re-installing torch: the new environment sees this
environment's packages through a ``.pth`` file, and pip builds with ``--no-deps
--no-build-isolation``. It then runs ``cbam-viz`` and imports ``cbam_viz`` from another folder and
checks they come from the installed copy, with its own weights and reports.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from cbam_viz import resources

ROOT = Path(__file__).resolve().parent.parent
#: What a build reads (a fresh clone has these; nothing else is copied, so the test never builds in the tree).
BUILD_INPUTS = ("pyproject.toml", "README.md", "requirements.txt", "app.py", "cbam_viz", "weights", "docs", "examples")


def test_pyproject_lists_every_package():
    """A sub-package missing from pyproject.toml would be left out of the wheel without a word."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = {p for p in config["packages"] if not p.startswith("cbam_viz._shipped")}
    found = {".".join(d.relative_to(ROOT).parts) for d in (ROOT / "cbam_viz").rglob("*")
             if d.is_dir() and (d / "__init__.py").is_file()} | {"cbam_viz"}
    assert listed == found
    assert (ROOT / config["package-dir"]["cbam_viz._shipped.weights"] / "manifest.json").is_file()


def test_shipped_root_is_the_checkout_here_and_the_package_copy_when_installed(tmp_path):
    assert resources.SHIPPED_ROOT == ROOT  # this test runs from a checkout
    installed = tmp_path / "site-packages" / "cbam_viz"
    (installed / "_shipped" / "weights").mkdir(parents=True)
    assert resources.shipped_root(installed) == installed / "_shipped"  # no checkout around it
    assert resources.app_script() == ROOT / "app.py"


def _fresh_venv(path: Path) -> Path:
    """A venv without pip of its own that sees this interpreter's packages (pip, setuptools, torch...)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_pip_install_gives_library_and_console_command(tmp_path):
    source = tmp_path / "clone"
    source.mkdir()
    for name in BUILD_INPUTS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "candidates"))
        else:
            shutil.copy2(src, source / name)
    python = _fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CBAM_VIZ_", "PYTHON"))}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", str(source)], check=True, env=env, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "cbam_viz").mkdir(parents=True)  # an output folder named like the package, as /tmp has

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=elsewhere)

    where = run(str(python), "-c", "import cbam_viz, cbam_viz.resources as r, cbam_viz.models.weights as w; "
                "print(cbam_viz.__file__); print(r.SHIPPED_ROOT); print(w.resolve_weights_dir())")
    assert where.returncode == 0, where.stderr
    module, shipped, weights = (Path(line) for line in where.stdout.split())
    site = tmp_path / "venv" / "lib"
    assert site in module.parents and site in shipped.parents and site in weights.parents  # the installed copy
    assert (weights / "manifest.json").is_file() and (shipped / "app.py").is_file()
    assert (shipped / "docs" / "sanity" / "sanity.json").is_file()
    listed = run(str(python), "-c", "from cbam_viz.app.examples import list_examples; "
                 "print('\\n'.join(str(e.path) for e in list_examples(include_generated=False)))")
    photos = [Path(line) for line in listed.stdout.splitlines() if "imagenette" in line]
    assert listed.returncode == 0 and len(photos) == 10, listed.stderr  # the example photos ship in the wheel
    assert all(p.is_file() and shipped in p.parents for p in photos)
    assert (shipped / "examples" / "imagenette" / "LICENSE").is_file()

    helped = run(str(tmp_path / "venv" / "bin" / "cbam-viz"), "--help")
    assert helped.returncode == 0 and "usage: cbam-viz" in helped.stdout and "explain" in helped.stdout
    assert run(str(python), "-m", "cbam_viz", "explain", "--help").returncode == 0

    from tests.e2e_helpers import make_image

    photo = make_image(elsewhere / "photo.png", size=(96, 80))
    explained = run(str(tmp_path / "venv" / "bin" / "cbam-viz"), "explain", str(photo), "--out", "results",
                    "--no-progress", "-v")
    assert explained.returncode == 0, explained.stderr
    doc = json.loads((elsewhere / "results" / "photo.json").read_text())
    manifest = json.loads((weights / "manifest.json").read_text())
    # the shipped, trained lineup (a manifest's old pairs are lineups too): found from the installed package
    assert doc["lineup"] in {**manifest.get("pairs", {}), **manifest.get("lineups", {})}
    assert doc["members"] and all(m in manifest["models"] and doc["models"][m]["trained"] for m in doc["members"])
    assert "CAM of" in explained.stdout + explained.stderr
