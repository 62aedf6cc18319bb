"""Paired statistics for A/B evaluation of guidance policies.

``diffsteer ab`` runs every arm (a guidance policy spec) on the same prompts x seeds, so image ``i`` of
arm A and image ``i`` of arm B share the prompt and the initial noise: they form a *pair*. Everything here
works on the paired differences ``d_i = b_i - a_i`` of one metric, where row ``i`` is the same
(prompt, seed) in every arm and ``prompt_ids[i]`` names its prompt.

Conventions used throughout:

* ``d = B - A`` in the metric's own units. The *improvement* is ``d`` for a higher-is-better metric and
  ``-d`` for a lower-is-better one, so "win" always means "B is better than A".
* Images of one prompt are correlated (same text, usually similar scores), so the prompt is the
  independent unit. The bootstrap CI always resamples prompts (a cluster bootstrap). Win/tie/loss counts
  and the two rank tests are computed per image by default, or per prompt (on the mean difference over
  that prompt's seeds) with ``aggregate_per_prompt=True``; with several seeds per prompt the per-image
  tests treat correlated images as independent and so overstate significance.
* Prompts are numbered in order of first appearance in ``prompt_ids``.

The sign test and the Wilcoxon signed-rank test are ``scipy.stats.binomtest`` and ``scipy.stats.wilcoxon``
(scipy >= 1.15: the method names ``"asymptotic"`` and ``PermutationMethod``); the wrappers here fix the
conventions above and report T+ rather than scipy's two-sided ``min(T+, T-)``. The cluster bootstrap is numpy.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike

Direction = Literal["higher", "lower"]
ZeroMethod = Literal["wilcox", "pratt"]
WilcoxonMethod = Literal["auto", "exact", "approx"]

DIRECTIONS: tuple[str, ...] = ("higher", "lower")
ZERO_METHODS: tuple[str, ...] = ("wilcox", "pratt")
WILCOXON_METHODS: tuple[str, ...] = ("auto", "exact", "approx")

# method="auto" uses the exact null distribution up to this many differences (as scipy does).
WILCOXON_AUTO_EXACT_MAX_N = 50
# method="exact" without ties or zeros: beyond this many differences the normal approximation is accurate anyway.
WILCOXON_EXACT_MAX_N = 400
# method="exact" with ties or zeros enumerates all 2**n sign flips (scipy's permutation test); as scipy's own
# "auto" rule, only this far (2**13 = 8192 flips).
WILCOXON_PERMUTATION_MAX_N = 13
# Upper bound on the prompt-index matrix materialised at once by the bootstrap (elements).
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class WinTieLoss:
    """Counts of pairs where B is better (win), equal within tolerance (tie) or worse (loss) than A."""

    wins: int
    ties: int
    losses: int


@dataclass(frozen=True)
class WilcoxonResult:
    """Outcome of :func:`wilcoxon_signed_rank`.

    ``statistic`` is T+, the sum of the ranks of the positive differences; ``n`` the number of non-zero
    differences and ``n_zero`` the number of zero ones; ``method`` is the one actually used
    (``"exact"`` or ``"approx"``).
    """

    statistic: float
    p_value: float
    n: int
    n_zero: int
    method: str
    zero_method: str


@dataclass(frozen=True)
class MetricComparison:
    """One metric compared between arm A and arm B (see :func:`compare` for the definitions)."""

    metric: str
    direction: str
    unit: str
    n_images: int
    n_prompts: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_low: float
    ci_high: float
    confidence: float
    n_resamples: int
    tie_tol: float
    wins: int
    ties: int
    losses: int
    sign_test_p: float
    wilcoxon_statistic: float
    wilcoxon_p: float
    wilcoxon_method: str
    zero_method: str


@dataclass(frozen=True)
class PairComparison:
    """All metrics of one arm pair; differences are ``arm_b - arm_a``. JSON-ready via ``dataclasses.asdict``."""

    arm_a: str
    arm_b: str
    metrics: dict[str, MetricComparison]


def prompt_index(prompt_ids: Sequence[Hashable]) -> tuple[np.ndarray, list[Hashable]]:
    """Number the prompts in order of first appearance.

    Returns ``(index, prompts)`` where ``index[i]`` is the position of ``prompt_ids[i]`` in ``prompts``.
    """
    positions: dict[Hashable, int] = {}
    index = np.fromiter(
        (positions.setdefault(p, len(positions)) for p in prompt_ids), dtype=np.intp, count=len(prompt_ids)
    )
    return index, list(positions)


def prompt_means(values: ArrayLike, prompt_ids: Sequence[Hashable]) -> np.ndarray:
    """Mean of ``values`` over the images of each prompt, prompts in order of first appearance."""
    x = _as_finite_1d(values, "values")
    index, prompts = prompt_index(prompt_ids)
    _check_length(x, len(index), "values")
    sums = np.bincount(index, weights=x, minlength=len(prompts))
    counts = np.bincount(index, minlength=len(prompts))
    return sums / counts


def improvements(diffs: ArrayLike, direction: Direction) -> np.ndarray:
    """Orient differences ``B - A`` so that a positive value means B is better.

    ``direction="higher"`` (higher is better) keeps ``diffs``; ``"lower"`` negates them.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if direction == "higher":
        return d
    if direction == "lower":
        return -d
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def win_tie_loss(improvement: ArrayLike, tie_tol: float = 0.0) -> WinTieLoss:
    """Count wins (``improvement > tie_tol``), ties (``|improvement| <= tie_tol``) and losses (the rest).

    ``improvement`` is oriented as returned by :func:`improvements`; the default tolerance 0 makes a tie
    exact equality of the two arms' values.
    """
    if not tie_tol >= 0:
        raise ValueError(f"tie_tol must be >= 0, got {tie_tol}")
    x = _as_finite_1d(improvement, "improvement")
    wins = int(np.count_nonzero(x > tie_tol))
    losses = int(np.count_nonzero(x < -tie_tol))
    return WinTieLoss(wins=wins, ties=int(x.size) - wins - losses, losses=losses)


def sign_test_pvalue(wins: int, losses: int) -> float:
    """Exact two-sided sign test; ties are dropped before calling.

    Under H0 each non-tied pair is a win with probability 1/2: ``scipy.stats.binomtest(wins, n, 0.5)`` with
    ``n = wins + losses``, which for the symmetric binomial is ``min(1, 2 * sum_{i=0..k} C(n, i) / 2**n)``
    with ``k = min(wins, losses)``. ``p = 1`` when ``n = 0``.
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0, got wins={wins}, losses={losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    return float(scipy.stats.binomtest(wins, n, 0.5, alternative="two-sided").pvalue)


def wilcoxon_signed_rank(
    diffs: ArrayLike,
    *,
    zero_method: ZeroMethod = "wilcox",
    method: WilcoxonMethod = "auto",
    correction: bool = True,
) -> WilcoxonResult:
    """Two-sided Wilcoxon signed-rank test of "the differences are symmetric about 0" (``scipy.stats.wilcoxon``).

    Ranks: mid-ranks of ``|d|``. Zero differences (exactly 0; :func:`compare` first sets
    ``|d| <= tie_tol`` to 0):

    * ``"wilcox"``: zeros are dropped, then the rest are ranked 1..n.
    * ``"pratt"``: all ``|d|`` are ranked, zeros included, then the zeros' ranks are dropped.

    Statistic: ``T+ = sum of the ranks r_i of the positive differences`` (scipy's one-sided statistic; its
    two-sided ``statistic`` is ``min(T+, T-)``). Under H0 every non-zero difference is positive or negative
    with probability 1/2 independently, given the ranks. The p-value is two-sided:

    * ``"exact"``: without ties or zeros, the Wilcoxon distribution of ``T+`` (scipy ``method="exact"``); with
      ties or zeros, the exact sign-flip distribution of ``T+`` over all ``2**n`` sign patterns (scipy's
      ``PermutationMethod`` with every pattern enumerated), for at most 13 values (the zeros count under
      ``"pratt"``). Larger tied samples raise ValueError: use ``"approx"``.
    * ``"approx"``: the normal approximation with the tie (and Pratt zero) corrected variance, the continuity
      correction with ``correction`` (scipy ``method="asymptotic"``).

    ``method="auto"`` is exact when there are at most 50 differences, none zero and no ties among ``|d|``,
    and approx otherwise (scipy's rule, except that scipy's own "auto" runs the permutation test for n <= 13
    with ties or zeros: ``method="exact"`` here). With no non-zero difference the p-value is 1.
    """
    if zero_method not in ZERO_METHODS:
        raise ValueError(f"zero_method must be one of {ZERO_METHODS}, got {zero_method!r}")
    if method not in WILCOXON_METHODS:
        raise ValueError(f"method must be one of {WILCOXON_METHODS}, got {method!r}")
    d = _as_finite_1d(diffs, "diffs")
    nonzero = d[d != 0]
    n, n_zero = int(nonzero.size), int(d.size - nonzero.size)
    plain = n_zero == 0 and np.unique(np.abs(nonzero)).size == n  # no zeros, no ties among |d|
    if method == "auto":
        method = "exact" if plain and d.size <= WILCOXON_AUTO_EXACT_MAX_N else "approx"
    if n == 0:
        return WilcoxonResult(statistic=0.0, p_value=1.0, n=0, n_zero=n_zero, method=method, zero_method=zero_method)

    # scipy's two-sided statistic is min(T+, T-); its one-sided statistic is T+ whatever the method.
    t_plus = scipy.stats.wilcoxon(d, zero_method=zero_method, alternative="greater", method="asymptotic").statistic
    if method == "approx":
        res = scipy.stats.wilcoxon(d, zero_method=zero_method, correction=correction, method="asymptotic")
    elif plain:
        if n > WILCOXON_EXACT_MAX_N:
            raise ValueError(
                f"exact Wilcoxon distribution limited to {WILCOXON_EXACT_MAX_N} differences, "
                f"got {n}; use method='approx'"
            )
        res = scipy.stats.wilcoxon(d, method="exact")
    else:
        flipped = nonzero if zero_method == "wilcox" else d  # a zero's sign flip changes nothing
        if flipped.size > WILCOXON_PERMUTATION_MAX_N:
            raise ValueError(
                f"exact Wilcoxon test with ties or zeros limited to {WILCOXON_PERMUTATION_MAX_N} differences "
                f"(2**n sign flips), got {flipped.size}; use method='approx'"
            )
        res = scipy.stats.wilcoxon(
            flipped,
            zero_method=zero_method,
            method=scipy.stats.PermutationMethod(n_resamples=2**flipped.size),
        )
    return WilcoxonResult(
        statistic=float(t_plus),
        p_value=float(res.pvalue),
        n=n,
        n_zero=n_zero,
        method=method,
        zero_method=zero_method,
    )


def cluster_bootstrap_means(
    diffs: ArrayLike,
    prompt_ids: Sequence[Hashable],
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> np.ndarray:
    """Bootstrap distribution of the mean paired difference, resampling prompts (clusters).

    Each resample draws P prompts uniformly with replacement from the P prompts and keeps all images of
    every drawn prompt; its statistic is the mean over the images drawn, i.e.
    ``sum_k c_k S_k / sum_k c_k n_k`` where ``c_k`` is how often prompt k was drawn, ``S_k`` the sum of its
    differences and ``n_k`` its number of images. With one image per prompt this is the ordinary
    bootstrap of the mean. Deterministic for a given ``seed`` (``numpy.random.default_rng``).
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    d = _as_finite_1d(diffs, "diffs")
    index, prompts = prompt_index(prompt_ids)
    _check_length(d, len(index), "diffs")
    if d.size == 0:
        raise ValueError("need at least one paired difference")
    n_prompts = len(prompts)
    sums = np.bincount(index, weights=d, minlength=n_prompts)
    counts = np.bincount(index, minlength=n_prompts).astype(np.float64)

    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples, dtype=np.float64)
    rows = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n_prompts)
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        drawn = rng.integers(0, n_prompts, size=(stop - start, n_prompts))
        out[start:stop] = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    return out


def percentile_interval(samples: ArrayLike, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval: the ``(1-c)/2`` and ``(1+c)/2`` quantiles of ``samples`` (linear interpolation)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    low, high = np.quantile(np.asarray(samples, dtype=np.float64), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def cluster_bootstrap_ci(
    diffs: ArrayLike,
    prompt_ids: Sequence[Hashable],
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean paired difference, resampling prompts with all their seeds.

    :func:`percentile_interval` of :func:`cluster_bootstrap_means`. With a single prompt the interval
    collapses to that prompt's mean: there is no between-prompt variation to estimate.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    means = cluster_bootstrap_means(diffs, prompt_ids, n_resamples=n_resamples, seed=seed)
    return percentile_interval(means, confidence)


def compare(
    metric_values_by_arm: Mapping[str, Mapping[str, ArrayLike]],
    prompt_ids: Sequence[Hashable],
    *,
    directions: Mapping[str, Direction] | None = None,
    baseline: str | None = None,
    tie_tol: float | Mapping[str, float] = 0.0,
    aggregate_per_prompt: bool = False,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    zero_method: ZeroMethod = "wilcox",
    wilcoxon_method: WilcoxonMethod = "auto",
    correction: bool = True,
) -> list[PairComparison]:
    """Compare arms pairwise on every metric of a paired A/B run.

    ``metric_values_by_arm[arm][metric]`` holds one value per image, row ``i`` being the same
    (prompt, seed) in every arm; ``prompt_ids[i]`` is that row's prompt. All arms must report the same
    metrics. ``directions[metric]`` is ``"higher"`` or ``"lower"`` (is better); ``None`` means every
    metric is higher-is-better, otherwise every metric must be listed. ``tie_tol`` is one tolerance or
    one per metric (then for every metric).

    Pairs: ``(baseline, other)`` for every other arm when ``baseline`` is given, else every pair
    ``(earlier, later)`` in the mapping's order; A is the first arm of a pair.

    For each pair and metric, with ``d = B - A`` per image:

    * ``mean_a``, ``mean_b``, ``mean_diff = mean(d)``: means over all images.
    * ``ci_low``, ``ci_high``: :func:`cluster_bootstrap_ci` of ``mean(d)`` over prompts, always at image
      level whatever ``aggregate_per_prompt`` says; every metric and pair uses the same ``seed``, hence
      the same prompt resamples.
    * ``unit`` is ``"image"``, or ``"prompt"`` with ``aggregate_per_prompt``, where the unit's difference
      is the mean of ``d`` over the prompt's images. On those units: ``wins``/``ties``/``losses`` from
      :func:`win_tie_loss` of the oriented improvement; ``sign_test_p`` = :func:`sign_test_pvalue`
      (ties dropped); the Wilcoxon test on the unit differences with ``|d| <= tie_tol`` set to 0, so that
      its zeros are exactly the ties.
    """
    arms = list(metric_values_by_arm)
    if len(arms) < 2:
        raise ValueError(f"need at least two arms, got {arms}")
    metrics = list(metric_values_by_arm[arms[0]])
    if not metrics:
        raise ValueError(f"arm {arms[0]!r} has no metrics")
    for arm in arms[1:]:
        if set(metric_values_by_arm[arm]) != set(metrics):
            raise ValueError(
                f"arm {arm!r} has metrics {sorted(metric_values_by_arm[arm])}, arm {arms[0]!r} has {sorted(metrics)}"
            )
    dirs = _resolve_per_metric(directions, metrics, "directions", default="higher")
    for metric, direction in dirs.items():
        if direction not in DIRECTIONS:
            raise ValueError(f"direction of {metric!r} must be one of {DIRECTIONS}, got {direction!r}")
    tols = _resolve_per_metric(tie_tol, metrics, "tie_tol")
    index, prompts = prompt_index(prompt_ids)
    if index.size == 0:
        raise ValueError("prompt_ids is empty")
    values = {
        arm: {m: _check_length(_as_finite_1d(v, f"{arm}/{m}"), index.size, f"{arm}/{m}") for m, v in by_m.items()}
        for arm, by_m in metric_values_by_arm.items()
    }
    if baseline is None:
        pairs = list(combinations(arms, 2))
    elif baseline not in values:
        raise ValueError(f"baseline {baseline!r} is not an arm; arms are {arms}")
    else:
        pairs = [(baseline, arm) for arm in arms if arm != baseline]

    return [
        PairComparison(
            arm_a=a,
            arm_b=b,
            metrics={
                m: _compare_metric(
                    m,
                    values[a][m],
                    values[b][m],
                    prompt_ids,
                    len(prompts),
                    direction=dirs[m],
                    tie_tol=tols[m],
                    aggregate_per_prompt=aggregate_per_prompt,
                    n_resamples=n_resamples,
                    confidence=confidence,
                    seed=seed,
                    zero_method=zero_method,
                    wilcoxon_method=wilcoxon_method,
                    correction=correction,
                )
                for m in metrics
            },
        )
        for a, b in pairs
    ]


def _compare_metric(
    metric: str,
    a: np.ndarray,
    b: np.ndarray,
    prompt_ids: Sequence[Hashable],
    n_prompts: int,
    *,
    direction: Direction,
    tie_tol: float,
    aggregate_per_prompt: bool,
    n_resamples: int,
    confidence: float,
    seed: int,
    zero_method: ZeroMethod,
    wilcoxon_method: WilcoxonMethod,
    correction: bool,
) -> MetricComparison:
    d = b - a
    low, high = cluster_bootstrap_ci(d, prompt_ids, n_resamples=n_resamples, confidence=confidence, seed=seed)
    unit_d = prompt_means(d, prompt_ids) if aggregate_per_prompt else d
    counts = win_tie_loss(improvements(unit_d, direction), tie_tol)
    wilcoxon = wilcoxon_signed_rank(
        np.where(np.abs(unit_d) <= tie_tol, 0.0, unit_d),
        zero_method=zero_method,
        method=wilcoxon_method,
        correction=correction,
    )
    return MetricComparison(
        metric=metric,
        direction=direction,
        unit="prompt" if aggregate_per_prompt else "image",
        n_images=int(d.size),
        n_prompts=n_prompts,
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        mean_diff=float(d.mean()),
        ci_low=low,
        ci_high=high,
        confidence=float(confidence),
        n_resamples=int(n_resamples),
        tie_tol=float(tie_tol),
        wins=counts.wins,
        ties=counts.ties,
        losses=counts.losses,
        sign_test_p=sign_test_pvalue(counts.wins, counts.losses),
        wilcoxon_statistic=wilcoxon.statistic,
        wilcoxon_p=wilcoxon.p_value,
        wilcoxon_method=wilcoxon.method,
        zero_method=zero_method,
    )


def _resolve_per_metric(value, metrics: list[str], name: str, default=None) -> dict:
    """Expand a scalar (or ``None`` -> ``default``) to every metric; a mapping must list exactly them."""
    if value is None:
        value = default
    if not isinstance(value, Mapping):
        return {m: value for m in metrics}
    missing, extra = set(metrics) - set(value), set(value) - set(metrics)
    if missing or extra:
        raise ValueError(
            f"{name} must list exactly the metrics {sorted(metrics)}; "
            f"missing {sorted(missing)}, unknown {sorted(extra)}"
        )
    return {m: value[m] for m in metrics}


def _as_finite_1d(values: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_length(x: np.ndarray, n: int, name: str) -> np.ndarray:
    if x.size != n:
        raise ValueError(f"{name} has {x.size} values but prompt_ids has {n}")
    return x
