"""The live server serves no file outside its allowed paths; upload size and pixel limits hold.

Gradio 6 serves files on ``/gradio_api/file=<path>`` (and the older spellings ``/file=<path>``,
``/gradio_api/file/<path>``), its own front-end on ``/static/``, ``/assets/``, ``/svelte/``, and
proxies Hugging Face Spaces on ``/gradio_api/proxy=``. Every ``../``, absolute, URL-encoded and
double-encoded variant must answer 403/404 without the file's bytes; a file a user really uploaded
must still come back (otherwise the 403s would prove nothing). Paths smuggled into an API call
instead of an upload must be refused before the app opens them.
"""
from __future__ import annotations

import http.client
import json
import re
import tempfile
import urllib.request
import uuid
from pathlib import Path

import pytest

from cbam_viz.engine.preprocess import MAX_PIXELS, ImageError, open_image
from tests.bad_inputs import DEFAULT_UPLOAD_LIMIT, TEST_PAIR, _png_chunk, good_image, write_test_weights
from tests.e2e_helpers import REPO_ROOT, running_app

FILE_ROUTES = ("/gradio_api/file=", "/file=", "/gradio_api/file/", "/file/")
STATIC_ROUTES = ("/static/", "/assets/", "/svelte/")


def _get(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` byte for byte (no client-side normalisation of ``..`` or ``%2e``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _upload(url: str, name: str, data: bytes) -> tuple[int, bytes]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "/gradio_api/upload", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _call(url: str, api: str, data: list) -> str:
    """POST /gradio_api/call/<api>, then read its event stream to the end; return the stream text."""
    req = urllib.request.Request(f"{url}/gradio_api/call/{api}", data=json.dumps({"data": data}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        event_id = json.loads(resp.read())["event_id"]
    with urllib.request.urlopen(f"{url}/gradio_api/call/{api}/{event_id}", timeout=240) as resp:
        return resp.read().decode(errors="replace")


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    """Files the server must never hand out: marker text -> path (plus an image outside the upload folder)."""
    token = f"cbam-viz-secret-content-{uuid.uuid4().hex}"  # inside the file, not in its name (403s echo names)
    stem = f"cbam-viz-secret-{uuid.uuid4().hex}"
    secret_txt = Path(tempfile.gettempdir()) / f"{stem}.txt"
    secret_txt.write_text(token + "\n")
    secret_png = good_image(Path(tempfile.gettempdir()) / f"{stem}.png", seed=3, size=(61, 47))
    yield {"token": token, "txt": secret_txt, "png": secret_png}
    secret_txt.unlink(missing_ok=True)
    secret_png.unlink(missing_ok=True)


pytestmark = pytest.mark.usefixtures("no_cbam_env")  # the server's limits are the defaults, not the shell's


@pytest.fixture(scope="module")
def app(no_cbam_env_module, tmp_path_factory):
    weights = write_test_weights(tmp_path_factory.mktemp("weights"))
    with running_app(env={"CBAM_VIZ_WEIGHTS_DIR": str(weights), "CBAM_VIZ_WARMUP": "0"},
                     log_name="file-access-server.log") as running:
        yield running


def _attacks(secrets) -> list[tuple[str, bytes]]:
    """(path after the route prefix, bytes that must not appear in the answer)."""
    tmp = tempfile.gettempdir()
    token = secrets["token"].encode()
    passwd = b"root:x:0:0"
    out = [
        ("/etc/passwd", passwd),
        ("../../../../../../etc/passwd", passwd),
        ("..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd", passwd),
        ("%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd", passwd),
        ("%2E%2E/%2E%2E/%2E%2E/%2E%2E/%2E%2E/%2E%2E/etc/passwd", passwd),
        ("%252e%252e%252f%252e%252e%252fetc%252fpasswd", passwd),
        ("%2Fetc%2Fpasswd", passwd),
        ("//etc/passwd", passwd),
        ("....//....//....//....//etc/passwd", passwd),
        ("..\\..\\..\\..\\etc\\passwd", passwd),
        (f"{tmp}/gradio/../../etc/passwd", passwd),
        (f"{tmp}/gradio/..%2f..%2fetc%2fpasswd", passwd),
        ("/proc/self/environ", b"GRADIO_SERVER_PORT"),
        ("/proc/self/cmdline", b"app.py"),
        (str(secrets["txt"]), token),
        (str(secrets["txt"]).replace("/", "%2F"), token),
        (f"{tmp}/gradio/../{secrets['txt'].name}", token),
        ("app.py", b"gr.Blocks"),
        ("./app.py", b"gr.Blocks"),
        (str(REPO_ROOT / "app.py"), b"gr.Blocks"),
        ("pyproject.toml", b"[project]"),
        (str(REPO_ROOT / "pyproject.toml"), b"[project]"),
        ("cbam_viz/service.py", b"UserFacingError"),
    ]
    return out


@pytest.mark.slow
def test_file_routes_serve_nothing_outside_allowed_paths(app, secrets):
    # Positive control: a file a user uploaded does come back on the file route.
    marker = f"uploaded-{uuid.uuid4().hex}".encode()
    status, body = _upload(app.url, "note.txt", marker)
    assert status == 200, body
    (uploaded,) = json.loads(body)
    status, body = _get(app.port, "/gradio_api/file=" + uploaded)
    assert status == 200 and body == marker

    attacks = _attacks(secrets)
    leaks, wrong_status = [], []
    for prefix in FILE_ROUTES + STATIC_ROUTES:
        for path, secret in attacks:
            status, body = _get(app.port, prefix + path)
            if secret in body:
                leaks.append((prefix + path, status))
            elif status not in (403, 404):
                wrong_status.append((prefix + path, status, body[:120]))
    for path, secret in attacks[:4]:
        status, body = _get(app.port, "/gradio_api/proxy=" + path)
        assert secret not in body and status >= 400, (path, status)
    assert not leaks, f"files leaked: {leaks}"
    assert not wrong_status, f"answers other than 403/404: {wrong_status[:10]}"


@pytest.mark.slow
def test_api_refuses_server_paths_given_as_uploads(app, secrets):
    """/explain with a path the user did not upload: refused before the app opens the image."""
    # The last input, pictures=False: the summary alone.
    controls = ["gradcam", "auto (predicted class)", "auto (last block)", 0.5, TEST_PAIR, False]
    status, body = _upload(app.url, "mine.png", secrets["png"].read_bytes())
    assert status == 200
    (mine,) = json.loads(body)
    ok = _call(app.url, "explain", [{"path": mine, "meta": {"_type": "gradio.FileData"}}, *controls])
    assert "event: complete" in ok, ok[:500]
    data = json.loads(ok.split("event: complete", 1)[1].split("data:", 1)[1].strip().splitlines()[0])
    assert data[0]["image"]["analysed_size"] == [61, 47]  # the control: this call form does work

    for path in (str(secrets["png"]), f"{tempfile.gettempdir()}/gradio/../{secrets['png'].name}",
                 str(REPO_ROOT / "app.py"), "app.py", "/etc/passwd"):
        stream = _call(app.url, "explain", [{"path": path, "meta": {"_type": "gradio.FileData"}}, *controls])
        assert "event: complete" not in stream and "event: error" in stream, (path, stream[:500])
        assert "root:x:0:0" not in stream and "analysed_size" not in stream
    assert app.proc.poll() is None


@pytest.mark.slow
def test_upload_size_limit_is_enforced_by_the_server(app):
    config = json.loads(urllib.request.urlopen(app.url + "/config", timeout=30).read())
    assert config["max_file_size"] == DEFAULT_UPLOAD_LIMIT
    status, body = _upload(app.url, "big.bmp", b"BM" + b"\0" * DEFAULT_UPLOAD_LIMIT)
    assert status == 413 and b"maximum allowed size" in body, (status, body[:200])
    status, body = _upload(app.url, "small.bin", b"\0" * (DEFAULT_UPLOAD_LIMIT // 4))
    assert status == 200, body[:200]
    # The app keeps serving after refusing.
    status, _ = _get(app.port, "/config")
    assert status == 200


def _header_only_png(width: int, height: int) -> bytes:
    ihdr = _png_chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0]))
    return b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IEND", b"")


def test_pixel_limit_is_exact_and_checked_on_the_header():
    assert MAX_PIXELS == 40_000_000
    # One pixel over: refused as too large, from the header alone.
    with pytest.raises(ImageError, match=r"too large.*limit is 40 megapixels"):
        open_image(_header_only_png(8000, 5001))
    with pytest.raises(ImageError, match="too large"):
        open_image(_header_only_png(MAX_PIXELS + 1, 1))
    # Exactly at the limit: the size is accepted (this header-only file then fails as damaged).
    with pytest.raises(ImageError) as err:
        open_image(_header_only_png(8000, 5000))
    assert "too large" not in str(err.value) and re.search("damaged|truncated|not an image", str(err.value))


def test_limits_are_documented_with_the_values_the_code_uses():
    doc = (REPO_ROOT / "docs" / "reliability.md").read_text()
    app_src = (REPO_ROOT / "app.py").read_text()
    size = re.search(r'CBAM_VIZ_MAX_FILE_SIZE", "(\d+)mb"', app_src)
    assert size and int(size.group(1)) * 1024 * 1024 == DEFAULT_UPLOAD_LIMIT
    assert f"{size.group(1)} MB" in doc and "CBAM_VIZ_MAX_FILE_SIZE" in doc
    assert f"{MAX_PIXELS / 1e6:.0f} megapixels" in doc and "MAX_PIXELS" in doc
