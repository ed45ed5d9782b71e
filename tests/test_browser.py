"""The app in a real browser: upload, explain, look at every output, change options, recover from a bad file;
drag the CAM sliders, click the photo for the attention there, build the downloads, share a deep link.

Runs ``python app.py`` on a free port and drives Debian's chromium through Playwright (no browser
download). Full-page screenshots go to ``artifacts/screenshots/``. Skipped without chromium or
Playwright, except under ``CI=true``, where that is a failure.

Components are found by ``elem_id`` (the contract with app.py); while an id is missing the test
falls back to the component's visible label, so a relabelled component fails loudly, not silently.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.e2e_helpers import (
    CHROMIUM, CHROMIUM_ARGS, REPO_ROOT, artifacts_dir, chromium_available, image_stats,
    make_broken_image, make_image, require, running_app,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# elem_id -> the label fallback (the start of the block's visible label / info text).
IDS = {
    "input_image": "Photo",
    "run_button": None,
    "cam_method": "CAM method",
    "target_class": "Target class",
    "lineup": "Lineup",
    "cam_compare": "One model's CAM | another's",
    "gate_member": "Model whose gates",
    "probe_image": "Click the photo",
    "probe_plot": "Spatial attention at the clicked point",
    "ablation_plot": "Change of the top-1 probability",
    "downloads_button": None,
    "ablate_button": None,
    "faithfulness": "Faithfulness",
    "quality_gallery": "Boxed photo",
    "quality_forest": "Each model",
    "quality_metric": "Metric",
    "downloads": "Downloads",
    "status": None,
}
MIN_STD = 2.0          # a blank or single-colour picture has std ~0; any real overlay is far above
RESULT_TIMEOUT_MS = 240_000
START_TIMEOUT = float(os.environ.get("CBAM_E2E_START_TIMEOUT", "600"))  # import torch+gradio, load 2 models on a busy 2-core box
SCREENSHOTS = "screenshots"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def app():
    require((REPO_ROOT / "app.py").is_file(), "app.py does not exist yet")
    with running_app(timeout=START_TIMEOUT, log_name="browser-app.log") as running:
        yield running


@pytest.fixture(scope="module")
def page(app):
    require(chromium_available(), f"no chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright is not installed (requirements-dev.txt)")
    with sync_playwright() as pw:  # launch() gives chromium a fresh temporary profile
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
        pg = context.new_page()
        pg.set_default_timeout(30_000)
        pg.goto(app.url, wait_until="domcontentloaded")
        pg.wait_for_selector("gradio-app .gradio-container", timeout=120_000)
        run_button(pg).wait_for(state="visible", timeout=120_000)
        wait_idle(pg, timeout=120_000)  # demo.load() fills the class and layer choices
        yield pg
        context.close()
        browser.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser-inputs")
    return {
        "first": make_image(d / "street.png", size=(360, 260), seed=3),
        "second": make_image(d / "field.jpg", size=(300, 300), seed=7),
        "broken": make_broken_image(d / "broken.png"),
    }


# --------------------------------------------------------------------------- page helpers
def comp(page, elem_id: str):
    """The component with ``elem_id``; else the block whose label matches the fallback regex."""
    by_id = page.locator(f"#{elem_id}")
    if by_id.count():
        return by_id.first
    label = IDS.get(elem_id)
    if label is None:
        return by_id.first  # no fallback: let the caller's wait fail with the id in the message
    labelled = page.locator(".block").filter(
        has=page.locator("[data-testid=block-label], [data-testid=block-info], label > span",
                         has_text=re.compile(rf"^\s*{re.escape(label)}")))
    return labelled.last  # .last: the innermost block when blocks nest


def run_button(page):
    by_id = page.locator("#run_button")
    if by_id.count():
        return by_id.first
    return page.get_by_role("button", name="Explain", exact=True).first


def upload(page, path: Path) -> None:
    comp(page, "input_image").locator("input[type=file]").set_input_files(str(path))
    page.wait_for_timeout(500)


def choose(page, elem_id: str, option: str) -> str:
    """Pick an option of a Gradio dropdown: type its text to filter the list, click the exact match."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = comp(page, elem_id).locator("input[role=combobox]")
    exact = page.locator(f"[role=listbox] [role=option][aria-label={json.dumps(option)}]").first
    for attempt in range(3):  # on a loaded CI machine a click can land before the list opens (seen once): open again
        box.click()
        box.fill(option)
        try:
            exact.wait_for(state="visible", timeout=15_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
    page.wait_for_timeout(300)  # the list re-renders while it filters
    try:
        exact.click(timeout=5000)
    except Exception:  # the option re-rendered under the pointer: Enter picks the filtered match
        box.click()
        box.fill(option)
        page.wait_for_timeout(500)
        box.press("Enter")
    page.wait_for_timeout(300)
    assert box.input_value() == option, f"{elem_id}: picked {option!r}, shows {box.input_value()!r}"
    return option


def image_srcs(page, elem_id: str) -> list[str]:
    return [s for s in comp(page, elem_id).locator("img").evaluate_all("els => els.map(e => e.src)") if s]


def fetch(page, url: str) -> bytes:
    if url.startswith("data:"):
        return base64.b64decode(url.split(",", 1)[1])
    # max_retries: Playwright re-sends a GET only on ECONNRESET (seen once in CI, most likely uvicorn closing an idle
    # keep-alive connection just as the pooled request reuses it); an HTTP error status still fails the test.
    resp = page.request.get(url, max_retries=2)
    assert resp.ok, f"GET {url} -> {resp.status}"
    return resp.body()


def wait_idle(page, timeout: float = RESULT_TIMEOUT_MS) -> None:
    """Wait until no Gradio status tracker shows progress (every tracker hidden again)."""
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid=status-tracker]')]
                 .every(e => e.classList.contains('hide') || e.offsetParent === null)""",
        timeout=timeout)
    page.wait_for_timeout(300)


def member_cams(page) -> list[str]:
    """The elem_ids of the shown members' photo | CAM sliders (a column per member of the lineup)."""
    return [f"cam_{i}" for i in range(4)
            if page.locator(f"#cam_{i}").count() and page.locator(f"#cam_{i}").is_visible()]


def gate_sheets(page) -> list[str]:
    """The elem_ids of the shown spatial-attention sheets (one per member with spatial gates)."""
    return [f"attention_{i}" for i in range(4)
            if page.locator(f"#attention_{i}").count() and page.locator(f"#attention_{i}").is_visible()]


def cam_overlay(page, elem_id: str) -> list[str]:
    """The CAM side of a photo | CAM slider (the photo side is the request's photo.jpg)."""
    return [s for s in image_srcs(page, elem_id) if not s.split("?")[0].endswith("photo.jpg")]


def explain_and_wait(page, *, before: dict[str, list[str]] | None = None, click=None) -> dict[str, list[str]]:
    """Click Explain (or ``click()``), wait until every member's CAM slider shows a new picture; return
    the CAM overlays' sources and the attention sheets'."""
    (click or run_button(page).click)()
    before = before or {}
    ids = member_cams(page)
    assert ids, "no member column is shown"
    page.wait_for_function(
        """([sels, before]) => sels.every(([id, sel]) => {
               const imgs = [...document.querySelectorAll(sel)].filter(i => i.src && i.complete && i.naturalWidth);
               return imgs.length && imgs.some(i => !(before[id] || []).includes(i.src));
           })""",
        arg=[[[i, _img_selector(page, i)] for i in ids], before],
        timeout=RESULT_TIMEOUT_MS,
    )
    wait_idle(page)
    return {**{i: cam_overlay(page, i) for i in member_cams(page)},
            "sheets": [src for sheet in gate_sheets(page) for src in image_srcs(page, sheet)]}


def _img_selector(page, elem_id: str) -> str:
    if page.locator(f"#{elem_id}").count():
        return f"#{elem_id} img"
    # Fallback: mark the labelled block so plain CSS can find it from inside the page.
    comp(page, elem_id).evaluate("(el, id) => el.setAttribute('data-e2e', id)", elem_id)
    return f"[data-e2e={elem_id}] img"


def screenshot(page, name: str) -> Path:
    path = artifacts_dir(SCREENSHOTS) / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def assert_real_image(page, src: str, what: str) -> tuple[int, int]:
    size, std = image_stats(fetch(page, src))
    assert size[0] > 8 and size[1] > 8, f"{what}: tiny image {size} ({src[:80]})"
    assert std > MIN_STD, f"{what}: looks blank (pixel std {std:.2f}, size {size})"
    return size


def page_error_text(page) -> str:
    """Text of Gradio's error toasts plus the status box (where the app puts notes)."""
    texts = page.locator("[data-testid=toast-body], .toast-body").all_inner_texts()
    if page.locator("#status").count():
        texts.append(page.locator("#status").inner_text())
    return "\n".join(t.strip() for t in texts if t.strip())


# --------------------------------------------------------------------------- the tests
def test_explain_flow(page, inputs):
    """Upload -> Explain -> predictions, two CAM overlays, attention gallery, downloads; then options."""
    upload(page, inputs["first"])
    first = explain_and_wait(page)

    # Both models' predictions: a Label shows its top class as a heading and the top-k as bars.
    cams = member_cams(page)
    for elem_id in [c.replace("cam_", "pred_") for c in cams]:
        label = comp(page, elem_id)
        rows = label.locator("[data-testid$=-confidence-set]")
        assert rows.count() >= 1, f"{elem_id}: no predictions shown: {label.inner_text()[:200]!r}"
        assert re.search(r"\d+(\.\d+)?%", label.inner_text()), f"{elem_id}: no probabilities shown"

    sizes = {}
    for elem_id in cams:
        assert first[elem_id], f"{elem_id}: no image"
        sizes[elem_id] = assert_real_image(page, first[elem_id][0], elem_id)
    for elem_id in [*cams, "cam_compare"]:  # photo | CAM, and one member's CAM | another's
        assert len(image_srcs(page, elem_id)) == 2, f"{elem_id}: a slider shows two pictures"
    # The compare slider's default: the reference (first column) | the last member.
    assert set(image_srcs(page, "cam_compare")) == {first[cams[0]][0], first[cams[-1]][0]}
    sheets = first["sheets"]
    assert sheets, "attention: no spatial sheet of a gated member"
    for sheet in sheets:  # one picture of every block per member with spatial gates
        size = assert_real_image(page, sheet, "attention sheet")
        assert size[0] > 2 * size[1] * 0.9, f"attention sheet {size}: not a grid of the blocks"
    channel = page.locator("[id^=channel_]:visible").first
    channel.scroll_into_view_if_needed()
    page.wait_for_function("el => el.querySelector('canvas, svg .mark-line, svg path')", arg=channel.element_handle(),
                           timeout=60_000)
    faithful = image_srcs(page, "faithfulness")
    assert faithful, "faithfulness: no image"
    assert_real_image(page, faithful[0], "faithfulness")
    assert re.search(r"'s probability from \d\.\d\d to \d\.\d\d", page.inner_text("body")), \
        "faithfulness: no sentence with both probabilities"
    assert re.search(r"Took \d+\.\d\d s: models \d+\.\d\d s, drawing and files \d+\.\d\d s",
                     page.inner_text("#timings_line")), "the one-line timings are missing"
    _assert_rendered(page, [*gate_sheets(page), *cams, "cam_compare"])

    # Downloads: built on demand, a valid PNG (the composite), valid JSON (the summary), the npz.
    assert not comp(page, "downloads").locator("a[href]").count(), "downloads exist before they were asked for"
    page.locator("#downloads_button").click()
    comp(page, "downloads").locator("a[href]").first.wait_for(timeout=RESULT_TIMEOUT_MS)
    wait_idle(page)
    links = comp(page, "downloads").locator("a[href]")
    hrefs = {a.get_attribute("download") or a.get_attribute("href"): a.get_attribute("href")
             for a in links.all()}
    png = [h for name, h in hrefs.items() if name.lower().endswith(".png")]
    js = [h for name, h in hrefs.items() if name.lower().endswith(".json")]
    npz = [h for name, h in hrefs.items() if name.lower().endswith(".npz")]
    assert png and js and npz, f"downloads: want a .png, a .json and a .npz link, got {sorted(hrefs)}"
    body = fetch(page, png[0])
    assert body[:8] == b"\x89PNG\r\n\x1a\n", "downloaded composite is not a PNG"
    assert image_stats(body)[1] > MIN_STD, "downloaded composite is blank"
    summary = json.loads(fetch(page, js[0]))
    assert isinstance(summary, dict) and all(summary["models"][m]["predictions"] for m in summary["members"]), \
        "downloaded JSON is empty"
    assert fetch(page, npz[0])[:2] == b"PK", "downloaded npz is not a zip of arrays"
    screenshot(page, "01-explained")

    # Another CAM method: both overlays change.
    new_method = _other_option(page, "cam_method")
    second = explain_and_wait(page, before=first)
    for elem_id in cams:
        assert_real_image(page, second[elem_id][0], f"{elem_id} ({new_method})")
        assert _pixels(page, second[elem_id][0]) != _pixels(page, first[elem_id][0]), \
            f"{elem_id}: the picture did not change after switching the CAM method to {new_method}"

    # Another target class: the overlays change again.
    new_target = _other_option(page, "target_class")
    third = explain_and_wait(page, before=second)
    changed = [e for e in cams
               if _pixels(page, third[e][0]) != _pixels(page, second[e][0])]
    assert changed, f"no CAM overlay changed after choosing target class {new_target!r}"
    screenshot(page, "02-other-method-and-target")


def test_sliders_drag_across(page):
    """Dragging a slider's handle moves the boundary between its two pictures."""
    for elem_id in ("cam_compare", "cam_0"):
        slider = comp(page, elem_id)
        slider.scroll_into_view_if_needed()
        before = _slider_position(slider)
        handle = slider.locator("[data-testid=slider]").bounding_box()
        frame = slider.locator("img").last.bounding_box()
        assert handle and frame, f"{elem_id}: no slider handle or picture"
        y = frame["y"] + frame["height"] / 2
        page.mouse.move(handle["x"] + handle["width"] / 2, y)
        page.mouse.down()
        page.mouse.move(frame["x"] + frame["width"] * 0.2, y, steps=12)
        page.mouse.up()
        page.wait_for_timeout(300)
        after = _slider_position(slider)
        assert before is not None and after is not None, f"{elem_id}: no clipped picture found"
        assert abs(after - before) > 15 and after < 35, f"{elem_id}: dragged to 20 %, boundary at {before} -> {after}"


def _slider_position(slider) -> float | None:
    """Where a gr.ImageSlider's boundary is, in % of the picture (its right picture's clip-path inset)."""
    styles = slider.evaluate("el => [...el.querySelectorAll('*')].map(e => e.getAttribute('style') || '')")
    for style in styles:
        m = re.search(r"clip-path:\s*inset\(0(?:px)? 0(?:px)? 0(?:px)? ([\d.]+)%\)", style)
        if m:
            return float(m.group(1))
    return None


def test_click_on_the_photo_shows_every_blocks_attention_there(page):
    picture = comp(page, "probe_image").locator("img").first
    picture.scroll_into_view_if_needed()
    box = picture.bounding_box()
    assert box, "no photo to click"
    picture.click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.6})
    page.wait_for_function("() => /At pixel \\(\\d+, \\d+\\)/.test(document.body.innerText)",
                           timeout=RESULT_TIMEOUT_MS)
    text = page.inner_text("body")
    x, y = (int(v) for v in re.search(r"At pixel \((\d+), (\d+)\)", text).groups())
    assert abs(x - 0.3 * 360) < 12 and abs(y - 0.6 * 260) < 12, f"clicked near (108, 156) of 360x260, got ({x}, {y})"
    plot = comp(page, "probe_plot")
    page.wait_for_function("el => el.querySelector('canvas, svg path, svg rect')", arg=plot.element_handle(),
                           timeout=60_000)
    screenshot(page, "06-probe")


def test_gate_ablation_button(page):
    page.locator("#ablate_button").click()
    page.wait_for_function("() => /largest fall of .+'s top-1 probability/.test(document.body.innerText)",
                           timeout=RESULT_TIMEOUT_MS)
    plot = comp(page, "ablation_plot")
    page.wait_for_function("el => el.querySelector('canvas, svg path, svg rect')", arg=plot.element_handle(),
                           timeout=60_000)
    assert re.search(r"layer1\.0\s+channel", page.inner_text("#ablation_table")), "the ablation table lacks its rows"


def test_deep_link_reopens_the_result(page, app):
    """The share button makes a link; opening it shows the same CAMs with the controls that made them
    (the explain flow left a non-default method and target), and the downloads still build from it."""
    shown = {i: cam_overlay(page, i) for i in member_cams(page)}
    controls = {e: comp(page, e).locator("input[role=combobox]").input_value() for e in ("cam_method", "target_class")}
    share = page.get_by_role("button", name=re.compile("Share this result"))
    with page.expect_response(lambda r: "gradio_api/deep_link" in r.url, timeout=60_000) as resp:
        share.click()
    token = resp.value.text().strip().strip('"')
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token), f"no deep link token: {token!r}"
    other = page.context.new_page()
    try:
        other.goto(f"{app.url}/?deep_link={token}", wait_until="domcontentloaded")
        other.wait_for_selector("gradio-app .gradio-container", timeout=120_000)
        wait_idle(other, timeout=120_000)
        last = list(shown)[-1]
        other.wait_for_function(f"() => document.querySelectorAll('#{last} img').length > 0", timeout=60_000)
        for elem_id, srcs in shown.items():
            assert [_pixels(other, s) for s in cam_overlay(other, elem_id)] == [_pixels(page, s) for s in srcs], \
                f"{elem_id}: the deep link shows another picture"
        reopened = {e: comp(other, e).locator("input[role=combobox]").input_value() for e in controls}
        assert reopened == controls, "the deep link reopened with other controls than the result's"
        other.locator("#downloads_button").click()
        comp(other, "downloads").locator("a[href]").first.wait_for(timeout=RESULT_TIMEOUT_MS)
    finally:
        other.close()


def test_an_example_answers(page):
    examples = page.locator(".gallery-item, [data-testid=dataset] button, table.gallery td").first
    if not examples.count():
        pytest.skip("no example pictures on this machine")
    assert not page.locator(".paginate").count(), "the examples are split over pages: a visitor sees only some"
    before = {i: cam_overlay(page, i) for i in member_cams(page)}
    explain_and_wait(page, before=before, click=examples.click)
    for elem_id in member_cams(page):
        assert_real_image(page, cam_overlay(page, elem_id)[0], f"{elem_id} of an example")


def test_broken_upload_shows_error_then_recovers(page, inputs):
    """A file that is not an image: a readable message in the page; the next good upload works."""
    before = {i: cam_overlay(page, i) for i in member_cams(page)}
    upload(page, inputs["broken"])
    run_button(page).click()
    # A toast with a sentence (its title "Error" shows first); #status keeps the last result's notes.
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid=toast-body], .toast-body')]
                 .some(e => /\\w+\\W+\\w+\\W+\\w+\\W+\\w+/.test(e.innerText || ''))""", timeout=RESULT_TIMEOUT_MS)
    message = page_error_text(page)
    screenshot(page, "03-broken-upload")
    assert message, "no error message in the page after uploading a broken file"
    assert "Traceback" not in message and not re.search(r"\b\w+Error:", message), \
        f"the message reads like a stack trace, not a sentence: {message!r}"
    assert re.search(r"image|picture|photo|file", message, re.I), f"message does not say what went wrong: {message!r}"

    for close in page.locator("[data-testid=toast-close], .toast-close").all():
        close.click()
    upload(page, inputs["second"])
    after = explain_and_wait(page, before=before)
    for elem_id in member_cams(page):
        assert_real_image(page, after[elem_id][0], f"{elem_id} after recovery")
    screenshot(page, "04-recovered")


def test_quality_tab_shows_the_most_different_images(page):
    """The Explanation-quality tab: the measured table, then the images behind a chosen metric."""
    page.get_by_role("tab", name="Explanation quality", exact=True).click()
    page.wait_for_function(
        """() => [...document.querySelectorAll('.block')].some(b =>
                 /Boxed photo/.test(b.innerText) && b.querySelector('img'))""", timeout=RESULT_TIMEOUT_MS)
    forest = image_srcs(page, "quality_forest")  # the tab leads with one picture: the forest plot
    assert forest, "the quality tab shows no forest plot"
    assert_real_image(page, forest[0], "forest plot")
    page.get_by_text("The measured tables and how they were made").click()  # the tables fold below
    page.wait_for_function("() => /Pointing game/.test(document.body.innerText)", timeout=60_000)
    first = image_srcs(page, "quality_gallery")
    assert len(first) >= 2, f"quality gallery: expected several pictures, got {len(first)}"
    assert_real_image(page, first[0], "quality gallery #0")
    choose(page, "quality_metric", "Pointing game (higher is better)")
    page.wait_for_function(
        """(old) => { const b = [...document.querySelectorAll('.block')].find(b => /Boxed photo/.test(b.innerText));
                      return b && b.querySelector('img') && b.querySelector('img').src !== old; }""",
        arg=first[0], timeout=RESULT_TIMEOUT_MS)
    if (REPO_ROOT / "docs" / "channel_profiles" / "channel_profiles.json").is_file():  # the shipped channel profiles
        page.locator("#channel_profiles img").first.wait_for(timeout=RESULT_TIMEOUT_MS)
        assert_real_image(page, image_srcs(page, "channel_profiles")[0], "channel profiles")
        assert "class_variance_ratio" in page.inner_text("#channel_profiles_table")
    screenshot(page, "05-quality-tab")
    page.get_by_role("tab", name="Explain", exact=True).click()


def test_screenshot_for_readme(page, inputs):
    """Re-render the first image with the default options and keep it as docs/screenshot.png."""
    page.reload(wait_until="domcontentloaded")  # every control back to its default
    page.wait_for_selector("gradio-app .gradio-container", timeout=120_000)
    run_button(page).wait_for(state="visible", timeout=120_000)
    wait_idle(page, timeout=120_000)
    upload(page, inputs["first"])
    explain_and_wait(page)
    page.evaluate("() => window.scrollTo(0, 0)")
    shot = screenshot(page, "00-readme")
    if os.environ.get("CBAM_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, REPO_ROOT / "docs" / "screenshot.png")


# --------------------------------------------------------------------------- small helpers
_pixel_cache: dict[str, bytes] = {}


def _pixels(page, src: str) -> bytes:
    """Decoded RGB pixels of an image URL (compare pictures, not URLs or encodings)."""
    if src not in _pixel_cache:
        import io

        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(fetch(page, src))) as im:
            _pixel_cache[src] = np.asarray(im.convert("RGB")).tobytes()
    return _pixel_cache[src]


def _assert_rendered(page, elem_ids: list[str]) -> None:
    """Every <img> of these components decodes in the browser (scrolled into view: lazy images)."""
    for elem_id in elem_ids:
        imgs = comp(page, elem_id).locator("img")
        for i in range(imgs.count()):
            imgs.nth(i).scroll_into_view_if_needed()
            page.wait_for_function("img => img.complete", arg=imgs.nth(i).element_handle(), timeout=30_000)
            width = imgs.nth(i).evaluate("img => img.naturalWidth")
            assert width > 0, f"{elem_id}: image #{i} does not render in the browser"
    page.evaluate("() => window.scrollTo(0, 0)")


def _other_option(page, elem_id: str) -> str:
    """Choose an option of a dropdown different from the current one (and from 'auto')."""
    box = comp(page, elem_id).locator("input[role=combobox]")
    current = box.input_value()
    box.click()
    options = page.locator("[role=listbox] [role=option]")
    options.first.wait_for()
    names = [o.get_attribute("aria-label") or o.inner_text().strip() for o in options.all()]
    page.keyboard.press("Escape")
    candidates = [n for n in names if n != current and not n.lower().startswith("auto")]
    assert candidates, f"{elem_id}: no other option than {current!r} (options: {names})"
    preferred = [n for n in candidates if n.lower() in {"eigencam", "layercam", "gradcam++", "xgradcam"}]
    return choose(page, elem_id, (preferred or candidates)[0])
