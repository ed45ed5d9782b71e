"""README.md: the Space front matter matches the pins, the first commands are the two that work, it stays short,
its links resolve, and the figures it and docs/model_card.md quote are the shipped records'."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MANIFEST = ROOT / "weights" / "manifest.json"
RUN_APP = "python3.11 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python app.py"
RUN_TESTS = ("python3.11 -m venv .venv && .venv/bin/pip install -r requirements.txt -r requirements-dev.txt "
             "&& .venv/bin/python -m pytest")


def _front_matter() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    assert text.startswith("---\n"), "README.md must start with the Space's YAML front matter"
    block = text[4:text.index("\n---\n", 4)]
    fields = {}
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        assert sep, f"front matter line is not 'key: value': {line!r}"
        fields[key.strip()] = value.strip().strip('"').strip("'")
    return fields


def _pin(package: str) -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(rf"^\s*{re.escape(package)}\s*==\s*([^\s;#]+)", line, re.IGNORECASE)
        if m:
            return m.group(1)
    raise AssertionError(f"{package} is not pinned in requirements.txt")


def test_front_matter_matches_the_pins():
    fm = _front_matter()
    assert fm["sdk"] == "gradio"
    assert fm["sdk_version"] == _pin("gradio")
    assert fm["python_version"] == "3.11"
    assert (ROOT / fm["app_file"]).is_file()
    assert fm["pinned"] == "false"
    for key in ("title", "emoji", "license"):
        assert fm.get(key), f"front matter lacks {key}"


def test_first_commands_are_the_two_that_work():
    text = README.read_text(encoding="utf-8")
    body = text[text.index("\n---\n", 4) + 5:]
    commands = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", body, re.DOTALL)
    first = [line.strip() for block in commands[:2] for line in block.strip().splitlines()]
    assert first == [RUN_APP, RUN_TESTS]
    assert body.lstrip().startswith("# "), "the title comes right after the front matter"
    assert body.index(RUN_APP) < body.index("## "), "the commands come before any section"


def _words(text: str) -> int:
    return len(text.split())  # what `wc -w` counts: code blocks and front matter included


def test_readme_is_short():
    words = _words(README.read_text(encoding="utf-8"))
    assert words <= 1500, f"README.md has {words} words; the detail belongs in docs/"


def test_readme_sections_and_the_docs_they_hand_over_to():
    """What the README summarises, docs/ holds: every section it hands over to is linked and exists."""
    text = README.read_text(encoding="utf-8")
    for section in ("## What you see", "## Lineups", "## From another program", "## Command line",
                    "## Your own models", "## Hugging Face Space and Docker", "## Documentation"):
        assert section in text, f"README lacks {section!r}"
    for doc in ("model_card.md", "explanation_quality.md", "performance.md", "reliability.md", "architecture.md",
                "out_of_distribution.md", "app.md", "cli.md", "data.md"):
        assert f"](docs/{doc}" in text, f"README does not link docs/{doc}"
    assert 'git lfs track "*.safetensors"' in text
    assert "-v ~/my-models:/models -e CBAM_VIZ_WEIGHTS_DIR=/models" in text  # Docker with a user's models


def test_every_relative_link_in_readme_and_docs_resolves():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"


def _manifest_figures() -> set[str]:
    """Every number in the shipped records' metrics, as the docs print it (x 100, two decimals)."""
    figures: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, float):
            figures.add(f"{100 * value:.2f}".replace("-", "−"))

    for record in json.loads(MANIFEST.read_text())["models"].values():
        walk(record.get("metrics", {}))
    return figures


def test_the_figures_the_readme_and_the_model_card_quote_are_the_manifests():
    """A figure quoted in the README's Lineups section, or as val top-1 in docs/model_card.md, is one
    the shipped records hold: retrained weights without updated docs fail here."""
    if not MANIFEST.is_file():
        pytest.skip("no shipped weights")
    figures = _manifest_figures()
    text = README.read_text(encoding="utf-8")
    lineups = text[text.index("## Lineups"):text.index("\n## ", text.index("## Lineups") + 1)]
    quoted = re.findall(r"(?<![\d.])([−-]?\d+\.\d\d)(?= %| points|\]|,)", lineups)
    assert len(quoted) >= 5, "the README quotes the val figures and the paired difference"
    for figure in quoted:
        assert figure.replace("-", "−") in figures, f"README quotes {figure}, which no shipped record holds"
    card = (ROOT / "docs" / "model_card.md").read_text(encoding="utf-8")
    top1 = re.search(r"\*\*val top-1\*\*[^|]*\|(.*)\|\s*$", card, re.MULTILINE)
    assert top1, "docs/model_card.md has a val top-1 row"
    for figure in re.findall(r"(\d+\.\d\d) %", top1.group(1)):
        assert figure in figures, f"docs/model_card.md quotes val top-1 {figure} %, which no shipped record holds"


def _command_lines(text: str) -> list[list[str]]:
    """Every ``python -m cbam_viz COMMAND ...`` line of the bash blocks, continuations joined, as words."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].replace("[", " ").replace("]", " ")
            words = line.split()
            if "cbam_viz" in words and words[words.index("cbam_viz") - 1] == "-m":
                lines.append(words[words.index("cbam_viz") + 1:])
    return lines


def test_every_command_and_option_the_docs_show_exists():
    """README.md and docs/cli.md show commands a user copies: each sub-command and --option must parse."""
    from cbam_viz.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    shown = [words for page in (README, ROOT / "docs" / "cli.md") for words in
             _command_lines(page.read_text(encoding="utf-8"))]
    assert len(shown) >= 10
    for words in shown:
        assert words[0] in commands, f"the docs show `python -m cbam_viz {words[0]}`, which is no command"
        known = commands[words[0]]._option_string_actions
        for option in (w.split("=")[0] for w in words[1:] if w.startswith("-")):
            assert option in known, f"the docs show `{words[0]} {option}`, which it does not take"


def test_every_setting_the_docs_name_is_read_by_the_code():
    code = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "app.py", *(ROOT / "cbam_viz").rglob("*.py")])
    for page in (README, ROOT / "docs" / "app.md", ROOT / "docs" / "cli.md"):
        for name in set(re.findall(r"\bCBAM_VIZ_[A-Z0-9_]+", page.read_text(encoding="utf-8"))):
            assert name in code, f"{page.name} names {name}, which no code reads"
