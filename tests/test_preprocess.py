import io

import numpy as np
import pytest
import torch
from PIL import Image

from cbam_viz.engine import preprocess
from cbam_viz.engine.preprocess import ImageError, is_display_rgb, open_image, to_model_batch, to_model_tensor, to_rgb


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_alpha_composited_on_white():
    rgba = Image.new("RGBA", (4, 3), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = to_rgb(rgba)
    assert out.mode == "RGB" and out.size == (4, 3)
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency():
    p = Image.new("P", (2, 2), 0)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    out = open_image(_png(p))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (10, 20, 30)


def test_sixteen_bit_and_float_scaled():
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(a)  # uint16 -> "I;16"
    assert img16.mode == "I;16"
    assert [to_rgb(img16).getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]
    assert [open_image(_png(img16)).getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [to_rgb(f).getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]
    f2 = Image.fromarray(np.array([[-10.0, 0.0, 10.0]], dtype=np.float32))
    assert [to_rgb(f2).getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_other_modes_and_tiny():
    for mode in ("1", "L", "CMYK", "YCbCr", "RGB", "P", "HSV"):
        out = to_rgb(Image.new(mode, (1, 1)))
        assert out.mode == "RGB" and out.size == (1, 1)
    t = to_model_tensor(Image.new("RGB", (1, 1), (255, 255, 255)), 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert t.shape == (1, 3, 8, 8) and torch.allclose(t, torch.ones_like(t))


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    data = _png(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = open_image(data)
    assert out.size == (20, 40)
    r, g, b = out.getpixel((10, 3))  # the left band is now at the top
    assert r > 200 and b < 60
    assert to_rgb(out).size == (20, 40) and is_display_rgb(out)  # applied once, never twice
    with Image.open(io.BytesIO(data)) as raw:  # an RGB image straight from PIL, tag still set
        assert raw.mode == "RGB" and not is_display_rgb(raw)
        t = to_model_batch([raw], 8, (0, 0, 0), (1, 1, 1))
    assert t[0, 0, 0].mean() > 0.7 and t[0, 0, -1].mean() < 0.3  # red on top after rotation


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    data = _png(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    with Image.open(io.BytesIO(data)) as im:
        im.seek(1)
        assert to_rgb(im).getpixel((4, 4))[0] > 200
    assert open_image(data).getpixel((4, 4))[0] > 200


def test_to_model_tensor_stretches_and_normalises():
    img = Image.new("RGB", (100, 20), (255, 0, 0))
    t = to_model_tensor(img, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert t.shape == (1, 3, 32, 32) and t.dtype == torch.float32
    assert t[0, 0].allclose(torch.tensor((1 - 0.485) / 0.229)) and t[0, 1].allclose(torch.tensor(-0.456 / 0.224))
    batch = to_model_batch([img, Image.new("L", (5, 50), 0)], 16, (0, 0, 0), (1, 1, 1))
    assert batch.shape == (2, 3, 16, 16) and batch[1].abs().max() == 0


@pytest.mark.parametrize("data, match", [
    (b"<!DOCTYPE html><html><body>Not found</body></html>", "not an image"),
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 10, "not an image|damaged"),
])
def test_open_image_errors(data, match):
    with pytest.raises(ImageError, match=match) as err:
        open_image(data)
    assert isinstance(err.value, ValueError)


def test_truncated_and_missing_files(tmp_path):
    data = _png(Image.effect_noise((64, 64), 40).convert("RGB"))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="damaged or truncated"):
        open_image(path)
    fake = tmp_path / "page.png"
    fake.write_text("<html>404</html>")
    with pytest.raises(ImageError, match="page.png is not an image"):
        open_image(fake)
    with pytest.raises(ImageError, match="does not exist"):
        open_image(tmp_path / "missing.jpg")


def test_pixel_limit(monkeypatch):
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="too large"):
        to_rgb(Image.new("RGB", (11, 10)))
    with pytest.raises(ImageError, match="too large"):
        open_image(_png(Image.new("RGB", (11, 10))))
    assert to_rgb(Image.new("RGB", (10, 10))).size == (10, 10)


def test_decompression_bomb_message(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(ImageError, match="too large"):
        open_image(_png(Image.new("RGB", (10, 10))))
