"""Is a preference file's smoothed preference calibrated? SmPO's p against the proving-ground verifier.

SmPO (training/smpo.py) weights each pair's DPO margin by 2p − 1, where p = σ((n^0 − n^1)/τ) comes from the
reward scores the pairs were labelled with: it bets that a larger score gap is a surer preference. On the proving
ground that bet can be checked, because the verifier (which never labels or trains anything) says whether each
image is right. Orienting every pair winner-first by the reward, its *verifier signal* is

    v = pass(winner) − pass(loser)  ∈ {−1, 0, +1}

(+1: the verifier agrees that the winner is better, −1: it disagrees, 0: it passes or fails both). Binned by the
confidence |2p − 1|, a calibrated p has E[v] rising with the bin. Per unit of push, Diffusion-DPO's binary label
puts E[v] behind the pairs it trains on, SmPO's weighting Σ|2p − 1|·v / Σ|2p − 1|.

    python benchmarks/preference_calibration.py PAIRS.parquet [--temperature 0.1] [--bins 5]

PAIRS: a file ``diffsteer data pairs`` wrote from proving-ground prompts (its captions must parse as proving-ground
scenes). The normalisation bounds are the file's own score range unless given, as in ``diffsteer train smpo``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def calibration_table(confidence: np.ndarray, signal: np.ndarray, bins: int) -> list[dict[str, float]]:
    """Pairs split into ``bins`` equal-count bins of confidence |2p − 1|: count, the share whose verdicts differ,
    the verifier's agreement among those, and E[v]."""
    order = np.argsort(confidence, kind="stable")
    rows = []
    for part in np.array_split(order, bins):
        if len(part) == 0:
            continue
        v = signal[part]
        differ = v != 0
        rows.append(
            {
                "confidence": [float(confidence[part].min()), float(confidence[part].max())],
                "pairs": int(len(part)),
                "verdicts_differ": float(differ.mean()),
                "agreement_when_differ": float((v[differ] > 0).mean()) if differ.any() else float("nan"),
                "mean_signal": float(v.mean()),
            }
        )
    return rows


def weighted_signals(confidence: np.ndarray, signal: np.ndarray) -> dict[str, float]:
    """E[v] per unit of push: Diffusion-DPO (every pair weight 1) and SmPO (weight |2p − 1|)."""
    total = float(confidence.sum())
    return {
        "dpo": float(signal.mean()),
        "smpo": float((confidence * signal).sum() / total) if total > 0 else float("nan"),
    }


def verifier_signal(pairs, preference: np.ndarray) -> np.ndarray:
    """v per pair, oriented by the reward's preference p (image 0 wins where p ≥ ½); each image verified once."""
    import hashlib

    from diffsteer.guidance.errors import InvalidInput
    from diffsteer.proving_ground.verifier import verify
    from diffsteer.proving_ground.world import parse_caption
    from diffsteer.training.preference_data import read_image

    verdicts: dict[tuple[str, str], float] = {}

    def passed(pair, which: int) -> float:
        source = pair.image_0 if which == 0 else pair.image_1
        image_id = hashlib.sha256(source).hexdigest() if isinstance(source, bytes) else str(source)
        key = (pair.caption, image_id)  # the same image in several pairs is verified once
        if key not in verdicts:
            try:
                spec = parse_caption(pair.caption)
            except ValueError as e:
                raise InvalidInput(
                    "caption", f"row {pair.row}: {pair.caption!r} is not a proving-ground scene ({e})"
                ) from None
            verdicts[key] = float(verify(np.asarray(read_image(source)), spec).passed)
        return verdicts[key]

    v = np.array([passed(p, 0) - passed(p, 1) for p in pairs])
    return np.where(preference >= 0.5, v, -v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", help="preference file (.parquet or .jsonl) with reward scores")
    ap.add_argument("--temperature", type=float, default=0.1, help="SmPO's tau (preference_temperature)")
    ap.add_argument("--score-min", type=float, default=None, help="normalisation lower bound (default: the data's)")
    ap.add_argument("--score-max", type=float, default=None, help="normalisation upper bound (default: the data's)")
    ap.add_argument("--bins", type=int, default=5, help="equal-count bins of |2p - 1|")
    args = ap.parse_args(argv)
    if args.bins < 1:
        ap.error(f"--bins: must be at least 1, got {args.bins}")

    from diffsteer.guidance.errors import InvalidInput
    from diffsteer.training.preference_data import load_preference_pairs
    from diffsteer.training.smpo import pairs_preference, preference_bounds

    try:
        data = load_preference_pairs(args.pairs, field="pairs")
        low, high = preference_bounds(data, args.score_min, args.score_max)
        preference = pairs_preference(data.scores, (low, high), args.temperature).numpy()
        signal = verifier_signal(data.iter_pairs(), preference)
    except (InvalidInput, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    confidence = np.abs(2 * preference - 1)
    from scipy.stats import spearmanr

    rho = spearmanr(confidence, signal)
    report = {
        "pairs": len(data),
        "temperature": args.temperature,
        "score_bounds": [low, high],
        "mean_confidence": float(confidence.mean()),
        "by_confidence": calibration_table(confidence, signal, args.bins),
        "spearman_confidence_signal": [float(rho[0]), float(rho[1])],
        "signal_per_unit_push": weighted_signals(confidence, signal),
    }
    print("| |2p - 1| | pairs | verdicts differ | verifier agrees (when they differ) | E[v] |")
    print("| --- | --- | --- | --- | --- |")
    for row in report["by_confidence"]:
        lo, hi = row["confidence"]
        print(
            f"| {lo:.2f}-{hi:.2f} | {row['pairs']} | {row['verdicts_differ']:.2f} | "
            f"{row['agreement_when_differ']:.3f} | {row['mean_signal']:+.3f} |"
        )
    w = report["signal_per_unit_push"]
    print(
        f"mean |2p - 1| {report['mean_confidence']:.3f}; Spearman(|2p - 1|, v) {rho[0]:+.3f} (p {rho[1]:.2g}); "
        f"E[v] per unit push: Diffusion-DPO {w['dpo']:+.3f}, SmPO {w['smpo']:+.3f}"
    )
    print(json.dumps(report), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
