"""The web playground at ``/`` in a real headless Chromium (Playwright driving Debian's ``chromium``; Playwright's
own browser download is never used) against a live server on the default model: the API key kept in session
storage, a generation from the form (the same pixels as the API gives for that request), a side-by-side
comparison (the screenshot in docs/ and the README, checked not blank), a cancel, and an A/B run's report link."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_service_support import UNetGate, live_server, one_thread, wait_idle  # noqa: F401

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)"),
    pytest.mark.usefixtures("one_thread"),
]

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "playground.png"  # rewritten only with DIFFSTEER_UPDATE_SCREENSHOT=1
KEY = "playground-test-key"
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(
        model=None,
        api_keys=[KEY],
        max_steps=200,
        max_width=256,
        max_height=256,
        ab_dir=tmp_path_factory.mktemp("ab"),
        log_level="warning",
    ) as live:
        yield live


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{server.url}/")
        page.errors = errors
        yield page
        browser.close()
    assert not errors, errors


def api_pixels(server, body: dict) -> np.ndarray:
    import httpx

    r = httpx.post(f"{server.url}/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))


def gallery_png(page, selector: str) -> bytes:
    """A gallery image's file, read back through its blob URL (the bytes its download link gives)."""
    data = page.eval_on_selector(
        selector,
        """async (img) => {
        const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
        let text = ""; for (const b of bytes) text += String.fromCharCode(b); return btoa(text); }""",
    )
    raw = base64.b64decode(data)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return raw


def test_the_page_asks_for_the_key_and_keeps_it_in_session_storage_only(page):
    page.wait_for_function("document.getElementById('status').textContent.includes('API key')")
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.wait_for_selector("#policy-A-scale")  # /policies answered: the form is built from the schemas
    assert page.evaluate("sessionStorage.getItem('diffsteer.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0 and KEY not in page.evaluate("document.cookie")
    names = page.eval_on_selector_all('fieldset[data-slot="A"] .policy-name option', "os => os.map(o => o.value)")
    from diffsteer.guidance.registry import policy_names

    assert sorted(names) == sorted(policy_names())  # every registered policy, none hard-coded
    assert page.input_value("#model") == "builtin:proving-ground"


def test_a_generation_from_the_form(page, server):
    page.fill("#prompt", "a red circle above a blue square")
    page.fill("#steps", "6")
    page.fill("#seed", "11")
    page.select_option('fieldset[data-slot="A"] .policy-name', "cfg")
    page.fill("#policy-A-scale", "3")
    page.click("#generate")
    figure = page.wait_for_selector(".gallery-entry figure")
    assert figure.get_attribute("data-seed") == "11" and figure.get_attribute("data-policy").startswith("cfg:scale=3")
    png = gallery_png(page, ".gallery-entry figure img")
    assert b"tEXt" in png or b"iTXt" in png  # the download carries the parameters
    body = {"prompt": "a red circle above a blue square", "steps": 6, "seed": 11, "policy": "cfg:scale=3"}
    expected = api_pixels(server, body)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), expected)
    assert "download" in figure.inner_text() and figure.eval_on_selector("a.download", "a => a.download").endswith(
        ".png"
    )


def test_side_by_side_runs_two_policies_on_one_seed(page, tmp_path):
    page.check("#side-by-side")
    page.fill("#seed", "2024")  # a fixed seed keeps docs/playground.png the same from run to run
    page.select_option('fieldset[data-slot="A"] .policy-name', "cfg")
    page.select_option('fieldset[data-slot="B"] .policy-name', "apg")
    page.fill("#policy-B-scale", "5")
    before = page.locator(".gallery-entry").count()
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('.gallery-entry').length > {before}")
    pair = page.locator(".gallery-entry.comparison").first.locator("figure")
    assert pair.count() == 2
    seeds = {pair.nth(i).get_attribute("data-seed") for i in range(2)}
    policies = [pair.nth(i).get_attribute("data-policy") for i in range(2)]
    assert seeds == {"2024"} and policies[0] != policies[1] and policies[1].startswith("apg:scale=5")

    page.evaluate("window.scrollTo(0, 0); document.getElementById('gen-form').scrollTop = 0")
    shot_path = SCREENSHOT if os.environ.get("DIFFSTEER_UPDATE_SCREENSHOT") == "1" else tmp_path / "playground.png"
    page.screenshot(path=str(shot_path))
    shot = np.asarray(Image.open(shot_path).convert("RGB")).astype(np.float32)
    assert shot.shape[:2] == (860, 1280)
    assert shot.std() > 20  # not a blank page
    colours = np.unique(shot.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 500  # text, form and generated images, not a flat fill


def test_cancel_stops_a_running_generation(page, server):
    import httpx

    page.uncheck("#side-by-side")
    page.fill("#steps", "40")
    engine = server.app.state.engine
    unet = engine.models.get(engine.default_model).unet
    with UNetGate(unet, hold_at=3) as gate:  # the generation is held inside its 2nd step until cancelled
        page.click("#generate")
        assert gate.reached.wait(60)
        job_id = page.wait_for_selector(".run[data-job]").get_attribute("data-job")
        page.click("#cancel:not([disabled])")
        page.wait_for_selector(f'.run.cancelled[data-job="{job_id}"]')
    wait_idle(engine)
    status = httpx.get(f"{server.url}/jobs/{job_id}", headers={"X-API-Key": KEY}, timeout=30).json()
    assert status["status"] == "cancelled" and status["progress"]["step"] < 40
    assert page.locator("#cancel").is_disabled()


def test_an_ab_run_links_its_report(page, server):
    import httpx

    page.check("#side-by-side")
    page.fill("#steps", "4")
    page.click("#run-ab")
    page.wait_for_function(
        "document.querySelector(\"#ab-runs a[href$='report.html']\") || "
        "document.getElementById('status').classList.contains('error')",
        timeout=300_000,
    )
    assert not page.eval_on_selector("#status", "s => s.classList.contains('error')"), page.inner_text("#status")
    link = page.wait_for_selector("#ab-runs a[href$='report.html']")
    href = link.get_attribute("href")
    report = httpx.get(f"{server.url}{href}", auth=("any", KEY), timeout=60)
    assert report.status_code == 200 and "<html" in report.text.lower()
    assert page.evaluate("JSON.parse(sessionStorage.getItem('diffsteer.abRuns'))[0].report") == href


def data_url_image(url: str) -> Image.Image:
    head, _, data = url.partition(",")
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def painted_count(page) -> int:
    return page.evaluate(
        """() => { const c = document.getElementById('mask-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] >= 128; return n; }"""
    )


def test_an_init_image_with_a_painted_mask(page, server):
    page.uncheck("#side-by-side")
    page.fill("#steps", "4")
    page.fill("#seed", "7")
    page.fill("#width", "")
    page.fill("#height", "")
    page.select_option('fieldset[data-slot="A"] .policy-name', "cfg")
    rng = np.random.default_rng(3)
    upload = (rng.random((48, 64, 3)) * 255).astype(np.uint8)  # 64 wide, 48 high: the generation's size
    buffer = io.BytesIO()
    Image.fromarray(upload).save(buffer, format="PNG")
    page.set_input_files(
        "#init-image", files=[{"name": "in.png", "mimeType": "image/png", "buffer": buffer.getvalue()}]
    )
    canvas = page.wait_for_selector("#mask-canvas:visible")
    assert page.eval_on_selector("#init-preview", "img => img.src").startswith("data:image/png")
    assert page.evaluate(
        "[document.getElementById('mask-canvas').width, document.getElementById('mask-canvas').height]"
    ) == [64, 48]
    page.fill("#strength", "0.75")
    assert page.inner_text("#strength-value") == "0.75"

    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=5)
    page.mouse.move(box["x"] + box["width"] * 0.8, y, steps=5)
    page.mouse.up()
    painted = painted_count(page)
    assert 0 < painted < 64 * 48
    page.click("#mask-invert")
    assert painted_count(page) == 64 * 48 - painted
    page.click("#mask-invert")
    assert painted_count(page) == painted

    before = page.locator(".gallery-entry").count()
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/jobs")) as sent:
        page.click("#generate")
    body = sent.value.post_data_json
    page.wait_for_function(f"document.querySelectorAll('.gallery-entry').length > {before}")
    assert body["strength"] == 0.75 and body["width"] is None and body["height"] is None
    assert np.array_equal(np.asarray(data_url_image(body["init_image"]).convert("RGB")), upload)
    mask = np.asarray(data_url_image(body["mask"]).convert("L"))
    assert mask.shape == (48, 64) and set(np.unique(mask)) == {0, 255}
    assert int((mask == 255).sum()) == painted
    assert mask[24, 32] == 255 and mask[0, 0] == 0 and mask[47, 63] == 0  # the stroke across the middle only

    png = gallery_png(page, ".gallery-entry figure img")
    out = Image.open(io.BytesIO(png))
    assert out.size == (64, 48)
    assert "Denoising strength: 0.75" in out.text["parameters"]
    assert np.array_equal(np.asarray(out.convert("RGB")), api_pixels(server, body))  # what the API gives for it

    page.click("#mask-clear")
    assert painted_count(page) == 0
    page.click("#init-remove")
    assert page.locator("#init-tools").is_hidden() and page.input_value("#init-image") == ""
