"""Container check of a user's own models: ``docker run -v MODELS:/models -e CBAM_VIZ_WEIGHTS_DIR=...``.

Run by ``tests/test_container.py`` through container-smoke.sh's ``SMOKE_CMD`` once the image is
built and answers (podman's settings for this host are in ``$CONTAINERS_CONF`` then):

    python tests/container_mount.py IMAGE_TAG

It writes a user's folder (tests/own_models.py), starts a second container of the image with the
folder mounted read-only and listed before the shipped weights, as the README tells a user to,
then asks ``/info`` and ``/explain`` for the user's lineup and checks the user's classes answer.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_WEIGHTS = "/home/app/cbam-viz/weights"  # the Dockerfile's WORKDIR + weights/


def main(image_tag: str) -> int:
    sys.path.insert(0, str(REPO_ROOT))
    from gradio_client import Client, handle_file

    from tests.e2e_helpers import free_port, make_image, wait_http
    from tests.own_models import USER_CLASSES, USER_LINEUP, write_user_folder

    with tempfile.TemporaryDirectory() as tmp:
        models = write_user_folder(Path(tmp) / "my-models")
        os.chmod(tmp, 0o755)  # the container's user (uid 1000) reads the mounted folder
        port = free_port()
        name = f"cbam-mount-{os.getpid()}"
        subprocess.run(["podman", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:7860",
                        "-v", f"{models}:/models:ro", "-e", f"CBAM_VIZ_WEIGHTS_DIR=/models:{IMAGE_WEIGHTS}",
                        image_tag], check=True, stdout=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/", timeout=600)
            client = Client(url, verbose=False)
            info = client.predict(USER_LINEUP, api_name="/info")
            assert USER_LINEUP in info["lineups"] and info["classes"] == list(USER_CLASSES), info
            t0 = time.perf_counter()
            photo = make_image(Path(tmp) / "pet.png", size=(96, 80))
            summary, *_ = client.predict(handle_file(str(photo)), "gradcam", "auto (predicted class)",
                                         "auto (last block)", 0.5, USER_LINEUP, api_name="/explain")
            labels = {p["label"] for m in summary["members"] for p in summary["models"][m]["predictions"]}
            assert summary["lineup"] == USER_LINEUP and labels <= set(USER_CLASSES), summary
            print(f"mount-smoke: OK (lineups {info['lineups']}; /explain of {USER_LINEUP} "
                  f"{time.perf_counter() - t0:.1f}s)")
            return 0
        except Exception as err:  # noqa: BLE001  reported with the container's log
            logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True).stdout[-3000:]
            print(f"mount-smoke: FAILED: {err}\n--- container log (tail)\n{logs}", file=sys.stderr)
            return 1
        finally:
            subprocess.run(["podman", "rm", "-f", "-t", "0", name], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.environ["IMAGE_TAG"]))
