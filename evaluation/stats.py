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

Only numpy and the standard library are needed; tests/test_ab_stats.py checks the tests against ``scipy.stats``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

Direction = Literal["higher", "lower"]
ZeroMethod = Literal["wilcox", "pratt"]
WilcoxonMethod = Literal["auto", "exact", "approx"]

DIRECTIONS: tuple[str, ...] = ("higher", "lower")
ZERO_METHODS: tuple[str, ...] = ("wilcox", "pratt")
WILCOXON_METHODS: tuple[str, ...] = ("auto", "exact", "approx")

# method="auto" uses the exact null distribution up to this many non-zero differences (as scipy does).
WILCOXON_AUTO_EXACT_MAX_N = 50
# The exact distribution costs O(n^3) time; beyond this the normal approximation is accurate anyway.
WILCOXON_EXACT_MAX_N = 400
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

    Under H0 each non-tied pair is a win with probability 1/2, so with ``n = wins + losses`` and
    ``k = min(wins, losses)``::

        p = min(1, 2 * sum_{i=0..k} C(n, i) / 2**n)

    which equals ``scipy.stats.binomtest(wins, n, 0.5).pvalue`` (the binomial is symmetric at 1/2).
    Computed in exact integer arithmetic; ``p = 1`` when ``n = 0``.
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0, got wins={wins}, losses={losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail, term = 0, 1
    for i in range(min(wins, losses) + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, 2 * tail / 2**n)


def average_ranks(values: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Ranks 1..n of ``values`` with tied values sharing the mean of their ranks (mid-ranks).

    Returns ``(ranks, tie_sizes)``, ``tie_sizes`` holding the size of every group of equal values.
    """
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if x.size else np.zeros(0, np.intp)
    ends = np.r_[starts[1:], x.size]
    group_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks, ends - starts


def wilcoxon_signed_rank(
    diffs: ArrayLike,
    *,
    zero_method: ZeroMethod = "wilcox",
    method: WilcoxonMethod = "auto",
    correction: bool = True,
) -> WilcoxonResult:
    """Two-sided Wilcoxon signed-rank test of "the differences are symmetric about 0".

    Ranks: mid-ranks of ``|d|``. Zero differences (exactly 0; :func:`compare` first sets
    ``|d| <= tie_tol`` to 0):

    * ``"wilcox"``: zeros are dropped, then the rest are ranked 1..n.
    * ``"pratt"``: all ``|d|`` are ranked, zeros included, then the zeros' ranks are dropped.

    Statistic: ``T+ = sum of the ranks r_i of the positive differences``. Under H0 every non-zero
    difference is positive or negative with probability 1/2 independently, given the ranks, so
    ``T+ = sum_i r_i B_i`` with ``B_i ~ Bernoulli(1/2)``:

    * exact: the distribution of ``T+`` is enumerated over all ``2**n`` sign patterns (a subset-sum count
      on the doubled ranks, which are integers). Without ties and zeros this is the classical Wilcoxon
      distribution; with ties it is the exact permutation (sign-flip) distribution, as
      ``scipy.stats.wilcoxon(method=PermutationMethod())`` gives for small n.
      ``p = min(1, 2 * min(P(T+ <= t), P(T+ >= t)))``.
    * approx: normal with ``mean = sum r_i / 2`` and ``var = sum r_i**2 / 4``. These are the textbook
      ``n(n+1)/4`` and ``n(n+1)(2n+1)/24 - sum(t**3 - t)/48`` (t: sizes of tied groups of non-zero
      ``|d|``), and for Pratt ``(n(n+1) - n0(n0+1))/4`` and
      ``(n(n+1)(2n+1) - n0(n0+1)(2n0+1))/24 - sum(t**3 - t)/48`` with n counting the zeros. With
      ``correction``, ``|T+ - mean|`` is reduced by 1/2 (not below 0: T+ and the mean are multiples of
      1/2, so this never differs from scipy's rule). ``p = erfc(|z| / sqrt(2))``.

    ``method="auto"`` is exact when there are at most 50 differences, none zero and no ties among
    ``|d|``, and approx otherwise (scipy's rule, except that scipy switches to a permutation test for
    n <= 13 with ties: ``method="exact"`` here). With no non-zero difference the p-value is 1.
    """
    if zero_method not in ZERO_METHODS:
        raise ValueError(f"zero_method must be one of {ZERO_METHODS}, got {zero_method!r}")
    if method not in WILCOXON_METHODS:
        raise ValueError(f"method must be one of {WILCOXON_METHODS}, got {method!r}")
    d = _as_finite_1d(diffs, "diffs")
    is_zero = d == 0
    n_zero = int(np.count_nonzero(is_zero))
    if zero_method == "wilcox":
        d = d[~is_zero]
        ranks, tie_sizes = average_ranks(np.abs(d))
    else:
        all_ranks, tie_sizes = average_ranks(np.abs(d))
        ranks, d = all_ranks[~is_zero], d[~is_zero]
    n = int(d.size)
    t_plus = float(ranks[d > 0].sum())
    has_ties = bool(np.any(tie_sizes > 1))

    if method == "auto":
        exact = n_zero == 0 and not has_ties and n + n_zero <= WILCOXON_AUTO_EXACT_MAX_N
        method = "exact" if exact else "approx"
    if n == 0:
        p = 1.0
    elif method == "exact":
        p = _signed_rank_exact_p(ranks, t_plus)
    else:
        p = _signed_rank_normal_p(ranks, t_plus, correction)
    return WilcoxonResult(
        statistic=t_plus, p_value=p, n=n, n_zero=n_zero, method=method, zero_method=zero_method
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
                f"arm {arm!r} has metrics {sorted(metric_values_by_arm[arm])}, "
                f"arm {arms[0]!r} has {sorted(metrics)}"
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
                    m, values[a][m], values[b][m], prompt_ids, len(prompts),
                    direction=dirs[m], tie_tol=tols[m], aggregate_per_prompt=aggregate_per_prompt,
                    n_resamples=n_resamples, confidence=confidence, seed=seed,
                    zero_method=zero_method, wilcoxon_method=wilcoxon_method, correction=correction,
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
        zero_method=zero_method, method=wilcoxon_method, correction=correction,
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


def _signed_rank_exact_p(ranks: np.ndarray, t_plus: float) -> float:
    """Two-sided p of T+ under the sign-flip distribution of ``ranks`` (all non-zero differences)."""
    if ranks.size > WILCOXON_EXACT_MAX_N:
        raise ValueError(
            f"exact Wilcoxon distribution limited to {WILCOXON_EXACT_MAX_N} non-zero differences, "
            f"got {ranks.size}; use method='approx'"
        )
    doubled = np.rint(2 * ranks).astype(np.int64)  # mid-ranks are multiples of 1/2
    pmf = np.zeros(int(doubled.sum()) + 1)
    pmf[0] = 1.0
    reach = 0
    for r in doubled:
        # Each rank joins T+ or not with probability 1/2: pmf <- (pmf + pmf shifted by r) / 2.
        pmf[r : reach + r + 1] += pmf[: reach + 1].copy()
        pmf[: reach + r + 1] *= 0.5
        reach += r
    t = int(round(2 * t_plus))
    p = 2.0 * min(pmf[: t + 1].sum(), pmf[t:].sum())
    return float(min(1.0, p))


def _signed_rank_normal_p(ranks: np.ndarray, t_plus: float, correction: bool) -> float:
    """Two-sided p of T+ from the normal with the sign-flip mean and variance of ``ranks``."""
    mean = ranks.sum() / 2.0
    sd = math.sqrt(float(np.square(ranks).sum()) / 4.0)
    deviation = abs(t_plus - mean)
    if correction:
        deviation = max(deviation - 0.5, 0.0)
    return float(math.erfc(deviation / sd / math.sqrt(2.0)))


def _resolve_per_metric(value, metrics: list[str], name: str, default=None) -> dict:
    """Expand a scalar (or ``None`` -> ``default``) to every metric; a mapping must list exactly them."""
    if value is None:
        value = default
    if not isinstance(value, Mapping):
        return {m: value for m in metrics}
    missing, extra = set(metrics) - set(value), set(value) - set(metrics)
    if missing or extra:
        raise ValueError(f"{name} must list exactly the metrics {sorted(metrics)}; "
                         f"missing {sorted(missing)}, unknown {sorted(extra)}")
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
