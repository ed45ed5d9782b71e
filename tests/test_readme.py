"""README.md: the Hugging Face Space front matter matches the pins, and the first commands are the two that work."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
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


def test_readme_files_it_links_exist_or_are_announced():
    text = README.read_text(encoding="utf-8")
    assert (ROOT / "docs" / "architecture.md").is_file() and "docs/architecture.md" in text
    for section in ("## Model card", "## Explanation quality", "## Performance", "## Reliability"):
        assert section in text
    assert 'git lfs track "*.safetensors"' in text
