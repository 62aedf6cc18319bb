"""The web playground at ``/`` in a real headless Chromium (Playwright driving Debian's ``chromium``; Playwright's
own browser download is never used) against a live server on the default model: the API key kept in session
storage, the form starting from the model's recommended policy and steps (reset on choosing another model), a
generation from the form (the same pixels as the API gives for that request, shown as sharp pixels), a
side-by-side comparison (the screenshot in docs/ and the README, checked not blank), a cancel and a failure (the
status line and the Generate button after them), an A/B run's report link, and the page on a phone-width screen."""

from __future__ import annotations

import base64
import io
import json
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
DEFAULT_MODEL = "builtin:proving-ground"
PLAIN_MODEL = "builtin:tiny"  # no diffsteer.json: no recommendations
RECOMMENDED = json.loads((ROOT / "proving_ground" / "assets" / "model" / "diffsteer.json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(
        model=None,
        models=[PLAIN_MODEL],  # listed only; never loaded here
        api_keys=[KEY],
        max_steps=200,
        max_width=256,
        max_height=256,
        ab_dir=tmp_path_factory.mktemp("ab"),
        log_level="warning",
    ) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def new_page(browser, **options):
    page = browser.new_page(**options)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(TIMEOUT_MS)
    page.errors = errors
    return page


def open_with_key(page, server) -> None:
    page.goto(f"{server.url}/")
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.wait_for_selector("#policy-A-scale")


@pytest.fixture(scope="module")
def page(server, browser):
    page = new_page(browser, viewport={"width": 1280, "height": 860})
    page.goto(f"{server.url}/")
    yield page
    page.close()
    assert not page.errors, page.errors


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
    assert page.input_value("#model") == DEFAULT_MODEL


def policy_a(page) -> tuple[str, str]:
    return page.input_value('fieldset[data-slot="A"] .policy-name'), page.input_value("#policy-A-scale")


def test_the_form_starts_from_the_models_recommended_policy_and_steps(page, server):
    import httpx

    # the default model's recommendation, as its diffsteer.json says and GET /models answers
    assert RECOMMENDED["policy"] == "cfg:scale=1.5"
    listed = httpx.get(f"{server.url}/models", headers={"X-API-Key": KEY}, timeout=30).json()["models"]
    defaults = {m["name"]: m.get("defaults") or {} for m in listed}
    assert defaults[DEFAULT_MODEL]["policy"] == RECOMMENDED["policy"]
    assert defaults[DEFAULT_MODEL]["steps"] == RECOMMENDED["steps"]
    assert not defaults[PLAIN_MODEL].get("policy") and not defaults[PLAIN_MODEL].get("steps")

    # not the generic cfg 7.5 and 20 steps
    assert page.input_value("#steps") == str(RECOMMENDED["steps"]) and policy_a(page) == ("cfg", "1.5")
    hint = page.inner_text("#recommended")
    assert "recommended for this model" in hint and "cfg:scale=1.5" in hint and "30 steps" in hint
    assert page.is_hidden("#use-recommended")

    # an untouched form sends them
    page.fill("#seed", "5")
    before = page.locator(".gallery-entry").count()
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/jobs")) as sent:
        page.click("#generate")
    body = sent.value.post_data_json
    assert body["steps"] == RECOMMENDED["steps"] and body["policy"] == {"name": "cfg", "scale": 1.5}
    page.wait_for_function(f"document.querySelectorAll('.gallery-entry').length > {before}")
    figure = page.locator(".gallery-entry figure").first
    assert figure.get_attribute("data-policy") == "cfg:scale=1.5"
    assert f"{RECOMMENDED['steps']} steps" in figure.locator("summary").inner_text()

    # edited fields are marked so; the recommendation is one click away
    page.fill("#steps", "12")
    page.fill("#policy-A-scale", "4")
    assert "Edited" in page.inner_text("#recommended") and page.is_visible("#use-recommended")
    page.click("#use-recommended")
    assert page.input_value("#steps") == "30" and policy_a(page) == ("cfg", "1.5")
    assert page.is_hidden("#use-recommended")

    # choosing a model resets steps and policy A to its recommendation; without one, to the generic defaults
    page.fill("#steps", "12")
    page.select_option('fieldset[data-slot="A"] .policy-name', "apg")
    page.select_option("#model", PLAIN_MODEL)
    assert page.input_value("#steps") == "20" and policy_a(page) == ("cfg", "7.5")
    assert "No recommendations for this model" in page.inner_text("#recommended")
    page.select_option("#model", DEFAULT_MODEL)
    assert page.input_value("#steps") == "30" and policy_a(page) == ("cfg", "1.5")
    assert "recommended for this model" in page.inner_text("#recommended")


def test_a_recommendation_with_several_parameters_fills_the_policy_form(browser, server):
    """A recommended spec string with more parameters (Qwen-Image's 'cfg:scale=4,renorm=true', here given to the
    plain model by rewriting the page's GET /models answer) sets each of them in the form."""
    page = new_page(browser)

    def rewrite(route):
        answer = route.fetch()
        if answer.status != 200:  # the first load, before the key is given
            return route.fulfill(response=answer)
        data = answer.json()
        for m in data["models"]:
            if m["name"] == PLAIN_MODEL:
                m["defaults"] = {**(m.get("defaults") or {}), "policy": "apg:scale=12,eta=0.5", "steps": 9}
            else:
                m["defaults"] = {**m["defaults"], "policy": "cfg:scale=4,renorm=true,schedule=cosine", "steps": 50}
        route.fulfill(response=answer, json=data)

    try:
        page.route("**/models", rewrite)
        open_with_key(page, server)
        assert page.input_value("#steps") == "50" and policy_a(page) == ("cfg", "4")
        assert page.is_checked("#policy-A-renorm") and page.input_value("#policy-A-schedule") == "cosine"
        page.select_option("#model", PLAIN_MODEL)
        assert page.input_value("#steps") == "9" and policy_a(page) == ("apg", "12")
        assert page.input_value("#policy-A-eta") == "0.5"
        assert "apg:scale=12,eta=0.5, 9 steps" in page.inner_text("#recommended")
        assert not page.errors, page.errors
    finally:
        page.close()


def test_a_generation_from_the_form(page, server):
    page.fill("#prompt", "a red circle above a blue square")
    page.fill("#steps", "6")
    page.fill("#seed", "11")
    page.select_option('fieldset[data-slot="A"] .policy-name', "cfg")
    page.fill("#policy-A-scale", "3")
    before = page.locator(".gallery-entry").count()
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('.gallery-entry').length > {before}")
    figure = page.wait_for_selector(".gallery-entry figure")  # the newest entry comes first
    assert figure.get_attribute("data-seed") == "11" and figure.get_attribute("data-policy").startswith("cfg:scale=3")
    png = gallery_png(page, ".gallery-entry figure img")
    assert b"tEXt" in png or b"iTXt" in png  # the download carries the parameters
    body = {"prompt": "a red circle above a blue square", "steps": 6, "seed": 11, "policy": "cfg:scale=3"}
    expected = api_pixels(server, body)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), expected)
    assert "download" in figure.inner_text() and figure.eval_on_selector("a.download", "a => a.download").endswith(
        ".png"
    )
    # 64×64 shown scaled up, as sharp pixels rather than a blur
    shown = figure.eval_on_selector(
        "img", "img => [getComputedStyle(img).imageRendering, img.naturalWidth, img.getBoundingClientRect().width]"
    )
    assert shown[0] == "pixelated" and shown[1] == 64 and shown[2] >= 4 * 64


def test_side_by_side_runs_two_policies_on_one_seed(page, tmp_path):
    page.check("#side-by-side")
    page.fill("#seed", "2024")  # a fixed seed keeps docs/playground.png the same from run to run
    if page.is_visible("#use-recommended"):  # A: the model's recommended policy and steps
        page.click("#use-recommended")
    page.select_option('fieldset[data-slot="B"] .policy-name', "apg")
    page.fill("#policy-B-scale", "5")
    before = page.locator(".gallery-entry").count()
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('.gallery-entry').length > {before}")
    pair = page.locator(".gallery-entry.comparison").first.locator("figure")
    assert pair.count() == 2
    seeds = {pair.nth(i).get_attribute("data-seed") for i in range(2)}
    policies = [pair.nth(i).get_attribute("data-policy") for i in range(2)]
    assert seeds == {"2024"} and policies[0] == RECOMMENDED["policy"] and policies[1].startswith("apg:scale=5")

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
        assert page.inner_text("#status").startswith("Running") and page.is_disabled("#generate")
        preview = page.wait_for_selector(f'.run[data-job="{job_id}"] .previews img')  # step 1's preview
        assert preview.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
        page.click("#cancel:not([disabled])")
        page.wait_for_selector(f'.run.cancelled[data-job="{job_id}"]')
        page.wait_for_function("document.getElementById('status').textContent === 'Cancelled'")
        assert page.is_enabled("#generate")  # before the held step even ends
    wait_idle(engine)
    status = httpx.get(f"{server.url}/jobs/{job_id}", headers={"X-API-Key": KEY}, timeout=30).json()
    assert status["status"] == "cancelled" and status["progress"]["step"] < 40
    assert page.locator("#cancel").is_disabled()
    assert page.inner_text("#status") == "Cancelled" and page.is_enabled("#generate")
    assert page.inner_text(f'.run[data-job="{job_id}"] .run-state').startswith("cancelled at step")
    assert not page.eval_on_selector("#status", "s => s.classList.contains('error')")


def test_a_failed_run_says_why_and_frees_the_generate_button(page, server):
    page.uncheck("#side-by-side")
    page.fill("#steps", "500")  # above max_steps: refused by POST /jobs
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Failed: ')")
    assert "steps" in page.inner_text("#status") and page.is_enabled("#generate")
    assert page.eval_on_selector("#status", "s => s.classList.contains('error')")

    engine = server.app.state.engine
    unet = engine.models.get(engine.default_model).unet

    def broken(module, args, kwargs):
        raise RuntimeError("a broken UNet")

    page.fill("#steps", "4")
    handle = unet.register_forward_pre_hook(broken, with_kwargs=True)  # the job starts, then fails
    try:
        page.click("#generate")
        job_id = page.wait_for_selector(".run.failed[data-job]").get_attribute("data-job")
    finally:
        handle.remove()
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Failed: ')")
    assert "internal error (RuntimeError)" in page.inner_text("#status")
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")
    assert page.inner_text(f'.run[data-job="{job_id}"] .run-state').startswith("failed: internal error")
    wait_idle(engine)


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


def overflowing(page, width: int) -> list[str]:
    """Visible elements whose box reaches past the right edge of a ``width`` px viewport."""
    return page.evaluate(
        """(width) => [...document.querySelectorAll("body *")].filter((el) => {
            const r = el.getBoundingClientRect();
            return r.width > 0 && r.height > 0 && r.right > width + 0.5;
        }).map((el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + "." + el.className)""",
        width,
    )


def test_the_page_fits_a_phone_screen(browser, server):
    """At 390×844 (an iPhone): no horizontal scrolling, the form's controls stacked above the results, and the
    images as wide as the screen, with a side-by-side pair and an init image with its mask in place."""
    page = new_page(
        browser, viewport={"width": 390, "height": 844}, device_scale_factor=3, is_mobile=True, has_touch=True
    )
    try:
        open_with_key(page, server)
        scroll_width = "document.scrollingElement.scrollWidth"
        assert page.evaluate(scroll_width) <= 390, overflowing(page, 390)
        assert overflowing(page, 390) == []

        boxes = [page.locator(f"#{id}").bounding_box() for id in ("steps", "seed", "num-images", "width", "height")]
        assert len({round(b["x"]) for b in boxes}) == 1  # one above the other, not side by side
        assert all(a["y"] + a["height"] <= b["y"] for a, b in zip(boxes, boxes[1:]))
        assert all(b["width"] >= 300 for b in boxes)
        form, results = page.locator("#gen-form").bounding_box(), page.locator(".results").bounding_box()
        assert form["y"] + form["height"] <= results["y"] and form["width"] >= 350

        page.check("#side-by-side")
        page.fill("#steps", "4")
        page.fill("#seed", "3")
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
        page.set_input_files(
            "#init-image", files=[{"name": "in.png", "mimeType": "image/png", "buffer": buffer.getvalue()}]
        )
        page.wait_for_selector("#mask-canvas:visible")
        page.click("#init-remove")  # shown and removed: the generation itself is text-to-image
        page.click("#generate")
        page.wait_for_selector(".gallery-entry.comparison figure img")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')")
        images = page.locator(".gallery-entry.comparison figure img")
        assert images.count() == 2
        shown = [images.nth(i).bounding_box() for i in range(2)]
        assert all(300 <= b["width"] and b["x"] + b["width"] <= 390 for b in shown)  # scaled to the width
        assert shown[0]["y"] + shown[0]["height"] <= shown[1]["y"]  # stacked
        assert page.evaluate(scroll_width) <= 390, overflowing(page, 390)
        assert overflowing(page, 390) == []
        assert not page.errors, page.errors
    finally:
        page.close()
