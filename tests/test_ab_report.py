"""The A/B report: its HTML (escaping, one grid cell per image, statistics tables, plots), regeneration from
results.json, and rendering in headless Chromium with every image loaded (apt package: chromium)."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from diffsteer.evaluation.ab import run_ab
from diffsteer.evaluation.report import main as report_main
from diffsteer.evaluation.report import render_html

PROMPTS = 'a red circle\na <b>bold</b> & "quoted" square\n'
N_GRID = 2 * 2 * 2  # arms x prompts x seeds


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[dict] = []
        self.rows = 0
        self.headings: list[str] = []
        self._in_h3 = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag == "tr":
            self.rows += 1
        elif tag == "h3":
            self._in_h3 = True
            self.headings.append("")

    def handle_endtag(self, tag):
        if tag == "h3":
            self._in_h3 = False

    def handle_data(self, data):
        if self._in_h3:
            self.headings[-1] += data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab_report")
    prompts = root / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    out = root / "run"
    results = run_ab(
        {
            "arms": ["base=cfg:scale=1", "strong=cfg:scale=8"],
            "prompts": str(prompts),
            "seeds": 2,
            "output_dir": str(out),
            "model": "builtin:tiny",
            "device": "cpu",
            "steps": 2,
            "n_resamples": 200,
            "metrics": "saturation,oversaturation,nfe,latency",
        }
    )
    return out, results


def parse(html: str) -> Collect:
    c = Collect()
    c.feed(html)
    return c


def test_report_html_structure(run):
    out, results = run
    html = (out / "report.html").read_text(encoding="utf-8")
    page = parse(html)
    grid = [i for i in page.imgs if i["src"].startswith("images/")]
    plots = [i for i in page.imgs if i["src"].startswith("plots/")]
    assert len(grid) == N_GRID and len(plots) == 2
    assert sorted(unquote(i["src"]) for i in grid) == sorted(i["path"] for i in results["images"])
    for img in page.imgs:
        assert (out / unquote(img["src"])).is_file()
    for img in grid:
        assert (img["width"], img["height"]) == ("128", "128")  # 32x32 shown at 4x
    for rel in ("plots/distributions.png", "plots/nfe_vs_quality.png"):
        with Image.open(out / rel) as im:
            assert im.format == "PNG" and im.width > 300 and np.asarray(im.convert("L")).std() > 5
    # Prompts are escaped, never interpreted as markup.
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot; square" in html
    assert 'a <b>bold</b> & "quoted" square' in page.headings
    assert "strong vs base" in page.headings[0]
    # Statistics: one row per metric in the pair's table, with the numbers of results.json.
    [pair] = results["statistics"]
    for col, m in pair["metrics"].items():
        assert re.search(rf"<td class='l'>{re.escape(col)}</td><td>{m['direction']}</td>", html)
    assert (
        f"{pair['metrics']['nfe']['wins']} / {pair['metrics']['nfe']['ties']} / {pair['metrics']['nfe']['losses']}"
        in html
    )


def test_report_limits_the_grids(run):
    _, results = run
    limited = json.loads(json.dumps(results))
    limited["config"]["report_max_prompts"] = 1
    grid = [i for i in parse(render_html(limited, [])).imgs if i["src"].startswith("images/")]
    assert len(grid) == 2 * 2  # one prompt: arms x seeds


def test_report_regenerates_from_results_json(run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run[0], out)
    before = (out / "report.html").read_text(encoding="utf-8")
    (out / "report.html").unlink()
    shutil.rmtree(out / "plots")
    assert report_main([str(out)]) == 0
    assert (out / "report.html").read_text(encoding="utf-8") == before
    assert (out / "plots" / "distributions.png").is_file()


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


WINDOW = (1200, 4000)  # tall enough for the whole test report


def find_in_screenshot(shot: np.ndarray, image: np.ndarray, scale: int) -> bool:
    """Whether ``image``, enlarged ``scale`` times with nearest-neighbour pixels (the report's
    image-rendering: pixelated), appears in the screenshot (mean absolute difference below 2 levels)."""
    big = image.repeat(scale, 0).repeat(scale, 1).astype(np.int16)
    h, w = big.shape[:2]
    candidates = np.argwhere(np.abs(shot - big[0, 0]).max(axis=-1) <= 2)
    for y, x in candidates[:20_000]:
        if y + h <= shot.shape[0] and x + w <= shot.shape[1] and np.abs(shot[y : y + h, x : x + w] - big).mean() < 2:
            return True
    return False


def render(page: Path, profile: Path, screenshot: Path | None = None) -> tuple[dict, str]:
    """Load ``page`` in headless Chromium; returns the <body> attributes after the load handler ran and the
    image-status text (and writes a screenshot)."""
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--virtual-time-budget=10000",
        "--dump-dom",
    ]
    if screenshot is not None:
        cmd.append(f"--screenshot={screenshot}")
    proc = subprocess.run([*cmd, page.resolve().as_uri()], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:2000]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    status = re.search(r'id="image-status"[^>]*>([^<]*)<', proc.stdout)
    return attrs, status.group(1) if status else ""


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (Debian/Ubuntu: apt-get install chromium)")
def test_report_renders_in_headless_chromium(run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run[0], out)
    shot = tmp_path / "shot.png"
    attrs, status = render(out / "report.html", tmp_path / "profile", shot)
    total = N_GRID + 2
    assert attrs.get("data-images-total") == str(total) and attrs.get("data-images-loaded") == str(total), attrs
    assert status == f"All {total} images loaded."
    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB")).astype(np.int16)
    assert rgb.shape[:2] == (WINDOW[1], WINDOW[0])
    assert rgb.std() > 20  # not a blank page
    # Every grid image is drawn, pixel for pixel (32x32 shown at 4x), in the screenshot.
    results = json.loads((out / "results.json").read_text())
    for img in results["images"]:
        with Image.open(out / img["path"]) as im:
            assert find_in_screenshot(rgb, np.asarray(im.convert("RGB")), 4), img["path"]
    assert not find_in_screenshot(rgb, np.zeros((32, 32, 3), np.uint8) + 77, 4)  # the search can fail

    # The check can fail: a missing image is counted and reported on the page.
    (out / results["images"][0]["path"]).unlink()
    attrs, status = render(out / "report.html", tmp_path / "profile2")
    assert attrs.get("data-images-loaded") == str(total - 1) and attrs.get("data-images-total") == str(total)
    assert status.startswith(f"1 of {total} images could not be loaded")
