"""The HTML report of an A/B run, written from its ``results.json`` alone.

``report.html`` sits in the run's folder and refers to ``images/ARM/*.png`` and ``plots/*.png`` by relative
paths, so the folder can be moved or served as a whole. It holds: the arms with their mean metrics, one
statistics table per arm pair, two matplotlib figures (each metric's distribution per arm; NFE against each
quality metric, arm means with their prompt-bootstrap CIs) and, per prompt, a grid of images with one column
per arm and one row per seed. A small script checks on load that every image could be shown and says so at
the top of the page (``data-images-loaded`` / ``data-images-total`` on ``<body>``).

Regenerate a report from an existing run: ``python -m diffsteer.evaluation.report DIR``.
"""

from __future__ import annotations

import html
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

PLOT_DIR = "plots"
CAPTION_COLUMNS = ("verifier.passed", "nfe", "saturation", "oversaturation")


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a table: ``-`` for None, general format with ``digits`` significant digits."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def fmt_p(p: float) -> str:
    return "<1e-12" if p < 1e-12 else f"{p:.3g}"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _src(relpath: str) -> str:
    return _e(quote(relpath.replace("\\", "/")))


# ----------------------------------------------------------------------------- plots


def _is_binary(values: np.ndarray) -> bool:
    return values.size > 0 and bool(np.all((values == 0) | (values == 1)))


def _values(results: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    arms = [a["name"] for a in results["arms"]]
    cols = [m["name"] for m in results["metrics"]]
    out: dict[str, dict[str, list[float]]] = {a: {c: [] for c in cols} for a in arms}
    for img in results["images"]:
        for c in cols:
            v = img["metrics"].get(c)
            out[img["arm"]][c].append(np.nan if v is None else float(v))
    return {a: {c: np.asarray(v, dtype=np.float64) for c, v in by_c.items()} for a, by_c in out.items()}


def make_plots(results: Mapping[str, Any], out_dir: Path) -> list[tuple[str, str]]:
    """Write the figures under ``out_dir/plots``; returns (caption, relative path) pairs."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in a server thread

    plot_dir = out_dir / PLOT_DIR
    plot_dir.mkdir(parents=True, exist_ok=True)
    arms = [a["name"] for a in results["arms"]]
    values = _values(results)
    summary = results["summary"]
    columns = [m for m in results["metrics"] if any(np.isfinite(values[a][m["name"]]).any() for a in arms)]
    made: list[tuple[str, str]] = []
    colours = [f"C{k % 10}" for k in range(len(arms))]

    if columns:
        ncols = min(3, len(columns))
        nrows = math.ceil(len(columns) / ncols)
        fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), dpi=90, layout="constrained")
        rng = np.random.default_rng(0)
        for k, meta in enumerate(columns):
            ax = fig.add_subplot(nrows, ncols, k + 1)
            col = meta["name"]
            data = [values[a][col][np.isfinite(values[a][col])] for a in arms]
            if all(_is_binary(d) or d.size == 0 for d in data):
                means = [summary[a][col]["mean"] or 0.0 for a in arms]
                lows = [
                    m - (summary[a][col]["ci_low"] if summary[a][col]["ci_low"] is not None else m)
                    for a, m in zip(arms, means)
                ]
                highs = [
                    (summary[a][col]["ci_high"] if summary[a][col]["ci_high"] is not None else m) - m
                    for a, m in zip(arms, means)
                ]
                ax.bar(range(len(arms)), means, color=colours, yerr=[lows, highs], capsize=4)
                ax.set_ylim(0, 1.05)
                ax.set_ylabel("rate (95% CI)")
            else:
                ax.boxplot(data, positions=range(len(arms)), widths=0.5, showfliers=False)
                for j, d in enumerate(data):
                    ax.scatter(j + rng.uniform(-0.18, 0.18, d.size), d, s=8, alpha=0.5, color=colours[j])
            ax.set_xticks(range(len(arms)), arms, rotation=20 if len(arms) > 3 else 0)
            ax.set_title(f"{col} ({meta['direction']} is better)", fontsize=9)
        rel = f"{PLOT_DIR}/distributions.png"
        fig.savefig(out_dir / rel)
        made.append(
            ("Distribution of each metric per arm (binary metrics: rate with its prompt-bootstrap 95% CI)", rel)
        )

    quality = [
        m
        for m in columns
        if m["name"] not in ("nfe", "latency")
        and (not m["name"].startswith("verifier.") or m["name"] == "verifier.passed")
    ]
    if "nfe" in {m["name"] for m in columns} and quality:
        ncols = min(3, len(quality))
        nrows = math.ceil(len(quality) / ncols)
        fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), dpi=90, layout="constrained")
        for k, meta in enumerate(quality):
            ax = fig.add_subplot(nrows, ncols, k + 1)
            col = meta["name"]
            for j, a in enumerate(arms):
                x, y = summary[a]["nfe"], summary[a][col]
                if x["mean"] is None or y["mean"] is None:
                    continue
                ax.errorbar(
                    x["mean"],
                    y["mean"],
                    xerr=[[x["mean"] - x["ci_low"]], [x["ci_high"] - x["mean"]]],
                    yerr=[[y["mean"] - y["ci_low"]], [y["ci_high"] - y["mean"]]],
                    fmt="o",
                    color=colours[j],
                    capsize=3,
                    label=a,
                )
                ax.annotate(a, (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
            ax.set_xlabel("NFE per image (lower is better)")
            ax.set_ylabel(f"{col} ({meta['direction']} is better)")
            ax.set_title(f"NFE vs {col}", fontsize=9)
        rel = f"{PLOT_DIR}/nfe_vs_quality.png"
        fig.savefig(out_dir / rel)
        made.append(("NFE against quality: arm means with prompt-bootstrap 95% CIs", rel))
    return made


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1em; margin: 1.2em 0 .3em; }
table { border-collapse: collapse; margin: .4em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr.b-better td { background: #e6f4e6; } tr.a-better td { background: #fbe9e7; }
code { background: #f5f5f5; padding: 0 .2em; }
.grid td { text-align: center; } .grid img { image-rendering: pixelated; display: block; margin: auto; }
.cap { font-size: .75em; color: #555; max-width: 16em; }
.muted { color: #666; font-size: .9em; } #image-status.bad { color: #b00; font-weight: bold; }
figure { margin: 1em 0; } figcaption { font-size: .85em; color: #555; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  var el = document.getElementById("image-status");
  el.textContent = ok === imgs.length ? "All " + ok + " images loaded."
    : (imgs.length - ok) + " of " + imgs.length + " images could not be loaded (moved or deleted?).";
  if (ok !== imgs.length) el.className = "bad";
  document.body.setAttribute("data-images-loaded", String(ok));
  document.body.setAttribute("data-images-total", String(imgs.length));
});
"""


def _caption(metrics: Mapping[str, Any], columns: Sequence[str]) -> str:
    parts = []
    for c in columns:
        v = metrics.get(c)
        if c not in metrics:
            continue
        if c == "verifier.passed":
            parts.append("pass ✓" if v == 1 else "fail ✗" if v == 0 else "–")
        else:
            parts.append(f"{c} {fmt(v, 3)}")
    return " · ".join(parts)


def render_html(results: Mapping[str, Any], plots: Sequence[tuple[str, str]]) -> str:
    cfg = results["config"]
    arms = results["arms"]
    arm_names = [a["name"] for a in arms]
    metrics = results["metrics"]
    col_names = [m["name"] for m in metrics]
    prompts = results["prompts"]
    run = results["run"]
    summary = results["summary"]
    conf = int(round(100 * cfg["confidence"]))
    h: list[str] = []
    w = h.append
    title = " vs ".join(arm_names)
    w(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>A/B: {_e(title)}</title>")
    w(f"<style>{_CSS}</style></head><body>")
    w(f"<h1>A/B evaluation: {_e(title)}</h1>")
    w("<p id='image-status' class='muted'>Checking images…</p>")
    w(
        f"<p class='muted'>Prompts <code>{_e(prompts['source'])}</code> ({_e(prompts['kind'])}): "
        f"{prompts['n_prompts']} prompts × {prompts['seeds_per_prompt']} seeds = {prompts['n_items']} items per arm; "
        f"{cfg['steps']} steps, scheduler <code>{_e(cfg['scheduler'])}</code>. Images this run: "
        f"{run['generated']} generated, {run['skipped']} reused. Tests per <b>{_e(cfg['unit'])}</b>; "
        f"{conf}% CIs from {cfg['n_resamples']} bootstrap resamples of prompts. "
        f"<a href='results.json'>results.json</a></p>"
    )

    w("<h2>Arms</h2><table><tr><th class='l'>arm</th><th class='l'>policy</th><th class='l'>model</th><th>size</th>")
    for c in col_names:
        w(
            f"<th>{_e(c)}<br><span class='muted'>{_e(next(m['direction'] for m in metrics if m['name'] == c))}</span></th>"
        )
    w("</tr>")
    for a in arms:
        w(
            f"<tr><td class='l'><b>{_e(a['name'])}</b></td><td class='l'><code>{_e(a['policy'])}</code></td>"
            f"<td class='l'>{_e(a['model'])}</td><td>{a['width']}×{a['height']}</td>"
        )
        for c in col_names:
            s = summary[a["name"]][c]
            w(
                f"<td>{fmt(s['mean'])}<br><span class='muted'>[{fmt(s['ci_low'], 3)}, {fmt(s['ci_high'], 3)}]</span></td>"
            )
        w("</tr>")
    w(f"</table><p class='muted'>Mean per image with its {conf}% prompt-bootstrap CI.</p>")

    w("<h2>Paired statistics</h2>")
    for pair in results["statistics"]:
        a, b = pair["arm_a"], pair["arm_b"]
        w(f"<h3>{_e(b)} vs {_e(a)} <span class='muted'>(differences are {_e(b)} − {_e(a)})</span></h3>")
        w(
            "<table><tr><th class='l'>metric</th><th>better</th><th>mean "
            + _e(a)
            + "</th><th>mean "
            + _e(b)
            + f"</th><th>Δ mean</th><th>{conf}% CI of Δ</th><th>win / tie / loss<br>for {_e(b)}</th><th>sign p</th>"
            "<th>Wilcoxon p</th><th>prompts / images</th><th class='l'>verdict</th></tr>"
        )
        for col, m in pair["metrics"].items():
            cls = "b-better" if m["verdict"] == b else "a-better" if m["verdict"] == a else ""
            verdict = f"{m['verdict']} better" if m["verdict"] in (a, b) else m["verdict"]
            w(
                f"<tr class='{cls}'><td class='l'>{_e(col)}</td><td>{_e(m['direction'])}</td><td>{fmt(m['mean_a'])}</td>"
                f"<td>{fmt(m['mean_b'])}</td><td>{fmt(m['mean_diff'])}</td>"
                f"<td>[{fmt(m['ci_low'])}, {fmt(m['ci_high'])}]</td>"
                f"<td>{m['wins']} / {m['ties']} / {m['losses']}</td><td>{fmt_p(m['sign_test_p'])}</td>"
                f"<td>{fmt_p(m['wilcoxon_p'])}</td><td>{m['n_prompts']} / {m['n_images']}</td>"
                f"<td class='l'>{_e(verdict)}</td></tr>"
            )
        w("</table>")
    w(
        f"<p class='muted'>Win/tie/loss and the tests count {_e(cfg['unit'])}s "
        f"({'mean difference over each prompt' if cfg['unit'] == 'prompt' else 'single images'}); a win is "
        f"the later arm being better in the metric's direction. Verdict: the CI of Δ excludes 0 (given only with "
        f"at least 5 units and a CI of non-zero width). A per-batch figure (latency with batch_size > 1: every "
        f"image of a batch gets the batch's time) has means only, no paired test.</p>"
    )

    if plots:
        w("<h2>Plots</h2>")
        for caption, rel in plots:
            w(
                f"<figure><img src='{_src(rel)}' alt='{_e(caption)}' style='max-width:100%'>"
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )

    w("<h2>Images</h2>")
    by_item: dict[tuple[str, int], dict[str, Any]] = {(img["arm"], img["item"]): img for img in results["images"]}
    items_by_prompt: dict[str, list[int]] = {}
    for it in results["items"]:
        items_by_prompt.setdefault(it["prompt_id"], []).append(it["item"])
    shown = prompts["list"][: cfg["report_max_prompts"]]
    if len(shown) < len(prompts["list"]):
        w(
            f"<p class='muted'>The first {len(shown)} of {len(prompts['list'])} prompts; every image is in "
            f"<code>images/</code> and results.json.</p>"
        )
    cap_cols = [c for c in CAPTION_COLUMNS if c in col_names] + [c for c in col_names if c.startswith("reward:")][:2]
    size = {a["name"]: (a["width"], a["height"]) for a in arms}
    for p in shown:
        cat = f" <span class='muted'>[{_e(p['category'])}]</span>" if p.get("category") else ""
        w(f"<h3>{_e(p['prompt'])}{cat}</h3><table class='grid'><tr><th>seed</th>")
        for a in arm_names:
            w(f"<th>{_e(a)}</th>")
        w("</tr>")
        for i in items_by_prompt.get(p["prompt_id"], []):
            first = by_item[(arm_names[0], i)]
            w(f"<tr><td>{first['seed']}</td>")
            for a in arm_names:
                img = by_item[(a, i)]
                width, height = size[a]
                scale = max(1, 128 // max(width, height))
                tip = "; ".join(f"{k}={fmt(v, 4)}" for k, v in img["metrics"].items())
                w(
                    f"<td><img src='{_src(img['path'])}' width='{width * scale}' height='{height * scale}' "
                    f"alt='{_e(a)}, seed {img['seed']}' title='{_e(tip)}'>"
                    f"<div class='cap'>{_e(_caption(img['metrics'], cap_cols))}</div></td>"
                )
            w("</tr>")
        w("</table>")
    w(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(h)


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write the plots and ``report.html`` into the run's folder; returns the report's path."""
    out_dir = Path(out_dir)
    plots = make_plots(results, out_dir)
    path = out_dir / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(render_html(results, plots), encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m diffsteer.evaluation.report RUN_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    print(write_report(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
