"""Shared helpers for the end-to-end tests (live server, browser, container).

Start ``app.py`` on a free port and wait until it answers; decide whether a missing tool is a
skip (a developer's machine) or a failure (CI, where ``CI=true``); make synthetic test images; and
run one real explanation through ``gradio_client`` against a URL (the container smoke command).

Usage from a test::

    from tests.e2e_helpers import running_app, require

    with running_app() as app:        # app.url == "http://127.0.0.1:<port>"
        ...

As a script (what ``tests/test_container.py`` hands ``container-smoke.sh`` as ``SMOKE_CMD``)::

    python tests/e2e_helpers.py client-smoke URL
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"
CONTAINER_SMOKE = SHARED_DIR / "tools" / "container-smoke.sh"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu",
    "--disable-background-networking", "--disable-component-update",
]
EXPLAIN_API = "/explain"


def in_ci() -> bool:
    """True when the environment says this is a CI run (``CI=true``, as GitHub and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require(condition: bool, reason: str) -> None:
    """Skip the test when ``condition`` is false, except under CI, where a skip would hide a gap.

    Raises:
        pytest.fail.Exception under CI, pytest.skip.Exception otherwise.
    """
    if condition:
        return
    import pytest

    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing prerequisite is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def artifacts_dir(*parts: str) -> Path:
    """A folder under ``$CBAM_ARTIFACTS`` (default ``<repo>/artifacts``), created on demand."""
    root = Path(os.environ.get("CBAM_ARTIFACTS", REPO_ROOT / "artifacts"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; small race, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, *, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 2xx.

    Raises:
        RuntimeError: the process exited, or nothing answered in ``timeout`` seconds; the message
            carries the tail of ``log`` so the failure explains itself.
    """
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if 200 <= resp.status < 300:
                    return
                last_error = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = repr(exc)
        time.sleep(0.5)
    raise RuntimeError(f"no answer from {url} after {timeout:.0f}s (last: {last_error}){_tail(log)}")


def _tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n--- server log (tail) ---\n" + "\n".join(text)


@dataclass
class App:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log, lines)


@contextlib.contextmanager
def running_app(
    *,
    app: str | os.PathLike = REPO_ROOT / "app.py",
    port: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 240.0,
    log_name: str = "app-server.log",
) -> Iterator[App]:
    """Run ``python app.py`` on 127.0.0.1:<free port> for the duration of the ``with`` block.

    The server's stdout/stderr go to ``artifacts/logs/<log_name>``. The process runs in its own
    session and its whole group is stopped on exit (SIGTERM, then SIGKILL after 10 s).

    Args:
        app: the script to run (default: the repo's ``app.py``).
        port: a fixed port; default a free one.
        env: extra environment variables for the server.
        timeout: seconds to wait for the first HTTP answer (importing torch + gradio and loading
            two models takes a while on a busy 2-core machine).
    """
    port = port or free_port()
    log = artifacts_dir("logs") / log_name
    child_env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(app)], cwd=REPO_ROOT, env=child_env,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", timeout=timeout, proc=proc, log=log)
        yield App(url=url, port=port, proc=proc, log=log)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def chromium_available() -> bool:
    return Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)


def podman_available() -> bool:
    return shutil.which("podman") is not None


# --------------------------------------------------------------------------- synthetic inputs
def make_image(path: str | os.PathLike, *, size: tuple[int, int] = (320, 240), seed: int = 0) -> Path:
    """Write a structured RGB test picture (gradient, shapes, noise): CAMs over it are not flat."""
    from cbam_viz.app.examples import synthetic_photo

    path = Path(path)
    synthetic_photo(size, seed).save(path)
    return path


def make_broken_image(path: str | os.PathLike) -> Path:
    """A file named like a picture whose bytes are not one (a truncated PNG header + text)."""
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really an image\n" * 4)
    return path


def image_stats(data: bytes) -> tuple[tuple[int, int], float]:
    """Decode image bytes with PIL; return ((W, H), pixel standard deviation)."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
        return im.size, float(arr.std())


# --------------------------------------------------------------------------- gradio_client smoke
def client_explain(url: str, image_path: str | os.PathLike, *, api_name: str = EXPLAIN_API) -> tuple:
    """Run one explanation through ``gradio_client`` against a running app; return the outputs.

    Only the image is passed by name; every other input of ``/explain`` keeps its default, so
    the smoke test survives the app adding options.
    """
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    info = client.view_api(return_format="dict", print_info=False)
    endpoint = info["named_endpoints"].get(api_name)
    if endpoint is None:
        raise AssertionError(f"{url} has no {api_name} endpoint; named: {sorted(info['named_endpoints'])}")
    params = endpoint["parameters"]
    image_params = [p for p in params if "image" in (p.get("component") or "").lower()
                    or "filepath" in str(p.get("python_type", {}).get("type", "")).lower()]
    if not image_params:
        raise AssertionError(f"{api_name} takes no image input: {params}")
    required = [p["parameter_name"] for p in params
                if not p.get("parameter_has_default") and p is not image_params[0]]
    if required:
        raise AssertionError(f"{api_name} has inputs without defaults besides the image: {required}")
    result = client.predict(**{image_params[0]["parameter_name"]: handle_file(str(image_path))}, api_name=api_name)
    return result if isinstance(result, tuple) else (result,)


def _client_smoke(url: str) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        image = make_image(Path(tmp) / "smoke.png", seed=1)
        t0 = time.perf_counter()
        outputs = client_explain(url, image)
        elapsed = time.perf_counter() - t0
    # /explain's pictures travel inside its answer as data URIs (image files, if an app returns them, too).
    images = {f: Path(f).read_bytes() for f in _flatten(outputs) if isinstance(f, str) and Path(f).is_file()
              and f.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))}
    images.update({f"{uri[:24]}... #{i}": base64.b64decode(uri.split(",", 1)[1])
                   for i, uri in enumerate(_data_uris(outputs))})
    print(f"client-smoke: {api_summary(outputs)}; {len(images)} picture(s); {elapsed:.1f}s")
    if not images:
        print("client-smoke: FAILED: /explain returned no picture", file=sys.stderr)
        return 1
    for f, data in images.items():
        size, std = image_stats(data)
        if std < 1.0:
            print(f"client-smoke: FAILED: {f} is blank ({size}, std {std:.2f})", file=sys.stderr)
            return 1
    print("client-smoke: OK")
    return 0


def _flatten(obj):
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _flatten(item)
    elif isinstance(obj, dict):
        for key in ("path", "image", "value"):
            if key in obj:
                yield from _flatten(obj[key])
    else:
        yield obj


def _data_uris(obj):
    """Every ``data:image/...;base64,`` string anywhere in an answer."""
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _data_uris(item)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _data_uris(value)
    elif isinstance(obj, str) and obj.startswith("data:image/"):
        yield obj


def api_summary(outputs: tuple) -> str:
    return ", ".join(type(o).__name__ for o in outputs)


if __name__ == "__main__":
    # Run as a script, sys.path starts at tests/: the repository root holds cbam_viz (make_image).
    sys.path.insert(0, str(REPO_ROOT))
    if len(sys.argv) >= 2 and sys.argv[1] == "client-smoke":
        sys.exit(_client_smoke(sys.argv[2] if len(sys.argv) > 2 else os.environ["SMOKE_URL"]))
    print(__doc__)
    sys.exit(2)
