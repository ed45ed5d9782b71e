"""The live app: start ``app.py`` on a free port and call its named endpoints with gradio_client."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.e2e_helpers import make_broken_image, make_image, running_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _opens(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        return im.size


def test_explain_endpoint_end_to_end(tmp_path):
    from gradio_client import Client, handle_file

    good = make_image(tmp_path / "street.png", size=(320, 240))
    broken = make_broken_image(tmp_path / "broken.png")
    with running_app(log_name="test_app-server.log") as app:
        client = Client(app.url, verbose=False)
        api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert {"/explain", "/info"} <= set(api)
        defaults = [p["parameter_name"] for p in api["/explain"]["parameters"] if not p["parameter_has_default"]]
        assert defaults == ["image"], "every input but the image has a default"

        summary, cam_base, cam_cbam, composite, attention, files = client.predict(
            handle_file(str(good)), api_name="/explain")
        for role in ("baseline", "cbam"):
            preds = summary["models"][role]["predictions"]
            assert preds and all(0.0 <= p["prob"] <= 1.0 for p in preds)
            assert summary["models"][role]["target"]["label"] in summary["metadata"]["classes"]
        assert summary["image"]["name"] == "street.png"
        assert _opens(cam_base) == _opens(cam_cbam) == (320, 240)
        assert _opens(composite)[0] > 320
        assert attention and all(_opens(item["image"]) for item in attention)
        assert any("spatial" in (item.get("caption") or "") for item in attention)
        by_suffix = {f.rsplit(".", 1)[-1]: f for f in files}
        assert json.loads(open(by_suffix["json"]).read())["models"]["cbam"]["predictions"]
        with np.load(by_suffix["npz"]) as z:
            assert {"baseline/cam", "cbam/cam"} <= set(z.files)

        # A broken upload: one readable sentence, no traceback, no server path.
        with pytest.raises(Exception) as err:
            client.predict(handle_file(str(broken)), api_name="/explain")
        message = str(err.value)
        assert "broken.png" in message and "not an image" in message
        assert "Traceback" not in message and "/tmp/gradio" not in message

        # The server keeps serving, with the other controls too.
        info = client.predict(api_name="/info")
        layer = info["layers"][-2]
        summary2, *_ = client.predict(handle_file(str(good)), "gradcam++", info["classes"][0], layer, 0.3,
                                      api_name="/explain")
        assert summary2["method"] == "gradcam++" and summary2["layer"] == layer
        assert summary2["models"]["baseline"]["target"]["label"] == info["classes"][0]
        with pytest.raises(Exception, match="Unknown layer"):
            client.predict(handle_file(str(good)), "gradcam", info["targets"][0], "layer9.9", 0.5,
                           api_name="/explain")
    assert app.proc.poll() is not None, "the server was stopped"
