"""Tests of evaluation/stats.py: hand-computed cases, agreement with scipy.stats computed here, bootstrap behaviour."""

import json
import math
import time
from dataclasses import asdict
from math import comb, erfc, sqrt

import numpy as np
import pytest
from scipy import stats as sps

from diffsteer.evaluation.stats import (
    MetricComparison,
    PairComparison,
    cluster_bootstrap_ci,
    cluster_bootstrap_means,
    compare,
    improvements,
    percentile_interval,
    prompt_means,
    sign_test_pvalue,
    wilcoxon_signed_rank,
    win_tie_loss,
)

# 7 wins, 1 loss, 2 ties (B - A, higher is better).
SEVEN_ONE_TWO = [0.3, 0.1, 0.2, 0.5, 0.05, 0.4, 0.7, -0.2, 0.0, 0.0]


# --- win / tie / loss and the sign test -------------------------------------------------------------


def test_win_tie_loss_exact_ties_by_default():
    assert win_tie_loss(SEVEN_ONE_TWO) == win_tie_loss(np.array(SEVEN_ONE_TWO), 0.0)
    counts = win_tie_loss(SEVEN_ONE_TWO)
    assert (counts.wins, counts.ties, counts.losses) == (7, 2, 1)


def test_win_tie_loss_tolerance_is_inclusive():
    x = [0.01, -0.02, 0.5, -0.5, 0.0, 0.05, -0.05]
    assert asdict(win_tie_loss(x)) == {"wins": 3, "ties": 1, "losses": 3}
    assert asdict(win_tie_loss(x, tie_tol=0.05)) == {"wins": 1, "ties": 5, "losses": 1}
    with pytest.raises(ValueError):
        win_tie_loss(x, tie_tol=-1.0)


def test_improvements_orientation():
    d = np.array([1.0, -2.0, 0.0])
    np.testing.assert_array_equal(improvements(d, "higher"), d)
    np.testing.assert_array_equal(improvements(d, "lower"), -d)
    assert asdict(win_tie_loss(improvements(d, "lower"))) == {"wins": 1, "ties": 1, "losses": 1}
    assert win_tie_loss(improvements([3.0, 1.0], "lower")).losses == 2
    with pytest.raises(ValueError):
        improvements(d, "up")


def test_sign_test_hand_computed():
    counts = win_tie_loss(SEVEN_ONE_TWO)
    # ties dropped: n = 8, k = min(7, 1) = 1 -> 2 * (C(8,0) + C(8,1)) / 2^8
    assert sign_test_pvalue(counts.wins, counts.losses) == pytest.approx(2 * (1 + 8) / 2**8, rel=1e-12)
    assert sign_test_pvalue(1, 7) == pytest.approx(0.0703125, rel=1e-12)
    assert sign_test_pvalue(5, 0) == pytest.approx(2 * 1 / 2**5, rel=1e-12)
    assert sign_test_pvalue(9, 2) == pytest.approx(2 * (1 + 11 + 55) / 2**11, rel=1e-12)
    assert sign_test_pvalue(3, 3) == 1.0  # 2 * 42/64 > 1, clipped
    assert sign_test_pvalue(0, 0) == 1.0
    with pytest.raises(ValueError):
        sign_test_pvalue(-1, 3)


@pytest.mark.parametrize("seed", range(5))
def test_sign_test_matches_scipy_binomtest(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        wins, losses = (int(v) for v in rng.integers(0, 60, size=2))
        if wins + losses == 0:
            continue
        expected = sps.binomtest(wins, wins + losses, 0.5).pvalue
        assert sign_test_pvalue(wins, losses) == pytest.approx(expected, rel=1e-12, abs=1e-300)
        assert sign_test_pvalue(losses, wins) == pytest.approx(expected, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("n, k", [(30, 4), (2000, 950)])
def test_sign_test_matches_exact_binomial_sum(n, k):
    exact = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)  # integer arithmetic, then one division
    assert sign_test_pvalue(n - k, k) == pytest.approx(exact, rel=1e-9)
    assert sign_test_pvalue(k, n - k) == pytest.approx(exact, rel=1e-9)


# --- Wilcoxon signed-rank ------------------------------------------------------------------------------


def test_wilcoxon_exact_hand_computed_no_ties():
    d = [1.5, -0.5, 2.0, 3.0, 4.5]
    res = wilcoxon_signed_rank(d)
    # |d| ranks: 0.5->1, 1.5->2, 2->3, 3->4, 4.5->5; T+ = 2+3+4+5 = 14, T- = 1.
    assert res.statistic == 2 + 3 + 4 + 5
    assert res.method == "exact" and res.n == 5 and res.n_zero == 0
    # P(T+ >= 14) = P(T+ <= 1) = #{{}, {1}} / 2^5 = 2/32; two-sided doubles it.
    assert res.p_value == pytest.approx(2 * 2 / 2**5, rel=1e-15)


def test_wilcoxon_exact_with_ties_is_sign_flip_distribution():
    d = [1.0, -1.0, 2.0, 3.0]
    res = wilcoxon_signed_rank(d, method="exact")
    # mid-ranks 1.5, 1.5, 3, 4; T+ = 1.5 + 3 + 4 = 8.5. Doubled ranks {3, 3, 6, 8}, 2T+ = 17.
    # Subset sums of {3,3,6,8} that are >= 17: {3,6,8} twice and {3,3,6,8} -> 3 of 16.
    assert res.statistic == 8.5
    assert res.p_value == pytest.approx(2 * 3 / 16, rel=1e-15)
    perm = sps.wilcoxon(d, method=sps.PermutationMethod())
    assert res.p_value == pytest.approx(perm.pvalue, rel=1e-12)


ZEROS_TIES = [0.0, 0.0, 1.0, -1.0, 2.0, 2.0, 3.0, 4.0]


def test_wilcoxon_normal_approx_hand_computed_wilcox_zeros():
    res = wilcoxon_signed_rank(ZEROS_TIES, zero_method="wilcox")
    # zeros dropped: |d| = 1,1,2,2,3,4 -> ranks 1.5,1.5,3.5,3.5,5,6; T+ = 1.5+3.5+3.5+5+6
    t_plus = 1.5 + 3.5 + 3.5 + 5 + 6
    n = 6
    mean = n * (n + 1) / 4
    var = n * (n + 1) * (2 * n + 1) / 24 - ((2**3 - 2) + (2**3 - 2)) / 48
    z = (t_plus - mean - 0.5) / sqrt(var)
    assert res.method == "approx" and res.n == 6 and res.n_zero == 2
    assert res.statistic == t_plus == 19.5
    assert res.p_value == pytest.approx(erfc(z / sqrt(2)), rel=1e-12)
    z_raw = (t_plus - mean) / sqrt(var)
    res_nc = wilcoxon_signed_rank(ZEROS_TIES, zero_method="wilcox", correction=False)
    assert res_nc.p_value == pytest.approx(erfc(z_raw / sqrt(2)), rel=1e-12)


def test_wilcoxon_normal_approx_hand_computed_pratt_zeros():
    res = wilcoxon_signed_rank(ZEROS_TIES, zero_method="pratt")
    # ranked with zeros: 0,0 -> 1.5,1.5; 1,1 -> 3.5,3.5; 2,2 -> 5.5,5.5; 3 -> 7; 4 -> 8
    t_plus = 3.5 + 5.5 + 5.5 + 7 + 8
    n, n0 = 8, 2
    mean = (n * (n + 1) - n0 * (n0 + 1)) / 4
    var = (n * (n + 1) * (2 * n + 1) - n0 * (n0 + 1) * (2 * n0 + 1)) / 24 - ((2**3 - 2) + (2**3 - 2)) / 48
    z = (t_plus - mean - 0.5) / sqrt(var)
    assert res.statistic == t_plus == 29.5
    assert res.p_value == pytest.approx(erfc(z / sqrt(2)), rel=1e-12)
    assert res.p_value == pytest.approx(
        sps.wilcoxon(ZEROS_TIES, zero_method="pratt", correction=True, method="asymptotic").pvalue, rel=1e-12
    )


def test_wilcoxon_all_zero_and_symmetric():
    res = wilcoxon_signed_rank([0.0, 0.0, 0.0])
    assert (res.n, res.n_zero, res.p_value, res.statistic) == (0, 3, 1.0, 0.0)
    assert wilcoxon_signed_rank([0.0, 0.0], zero_method="pratt", method="exact").p_value == 1.0
    assert wilcoxon_signed_rank([]).p_value == 1.0
    # T+ equal to its mean: the continuity correction must not push the p-value below 1.
    assert wilcoxon_signed_rank([1.0, -1.0, 2.0, -2.0], method="approx").p_value == 1.0


def test_wilcoxon_method_selection():
    rng = np.random.default_rng(0)
    assert wilcoxon_signed_rank(rng.normal(size=50)).method == "exact"
    assert wilcoxon_signed_rank(rng.normal(size=51)).method == "approx"
    assert wilcoxon_signed_rank([1.0, 1.0, 2.0, -3.0]).method == "approx"  # tie
    assert wilcoxon_signed_rank([0.0, 1.0, 2.0, -3.0]).method == "approx"  # zero
    assert wilcoxon_signed_rank([1.0, 2.0, -3.0], method="approx").method == "approx"
    with pytest.raises(ValueError, match="approx"):
        wilcoxon_signed_rank(rng.normal(size=401), method="exact")
    # Exact with ties or zeros is the sign-flip enumeration: at most 13 values, Pratt's zeros included.
    tied = [1.0, 1.0, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    assert wilcoxon_signed_rank(tied + [12.0], method="exact").method == "exact"
    with pytest.raises(ValueError, match="approx"):
        wilcoxon_signed_rank(tied + [12.0, 13.0], method="exact")
    assert wilcoxon_signed_rank(tied + [0.0, 0.0], method="exact").n == 12
    with pytest.raises(ValueError, match="approx"):
        wilcoxon_signed_rank(tied + [0.0, 0.0], zero_method="pratt", method="exact")
    with pytest.raises(ValueError):
        wilcoxon_signed_rank([1.0, 2.0], zero_method="zsplit")
    with pytest.raises(ValueError):
        wilcoxon_signed_rank([1.0, float("nan")])


@pytest.mark.parametrize("n", [6, 17, 40, 50])
@pytest.mark.parametrize("seed", range(3))
def test_wilcoxon_exact_matches_scipy(n, seed):
    d = np.random.default_rng(seed).normal(0.4, 1.0, n)
    res = wilcoxon_signed_rank(d)
    ref = sps.wilcoxon(d, method="exact")
    assert res.method == "exact"
    assert res.statistic == sps.rankdata(np.abs(d))[d > 0].sum()
    assert min(res.statistic, n * (n + 1) / 2 - res.statistic) == ref.statistic
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert res.p_value == pytest.approx(sps.wilcoxon(d).pvalue, rel=1e-10)  # scipy's own "auto" is exact here too


def test_wilcoxon_large_sample_auto_is_scipy_asymptotic():
    d = np.random.default_rng(4).normal(0.3, 1.0, 51)
    res = wilcoxon_signed_rank(d)
    assert res.method == "approx"
    assert res.p_value == pytest.approx(sps.wilcoxon(d, correction=True, method="asymptotic").pvalue, rel=1e-10)
    assert res.p_value != pytest.approx(sps.wilcoxon(d, correction=False, method="asymptotic").pvalue, rel=1e-10)


def test_wilcoxon_auto_with_small_tied_sample_is_asymptotic_not_scipy_permutation():
    d = [1.0, 1.0, 2.0, -3.0, 4.0, 5.0]
    res = wilcoxon_signed_rank(d)
    assert res.method == "approx"
    assert res.p_value == pytest.approx(sps.wilcoxon(d, correction=True, method="asymptotic").pvalue, rel=1e-12)
    assert res.p_value != pytest.approx(sps.wilcoxon(d, method=sps.PermutationMethod()).pvalue, rel=1e-3)


@pytest.mark.parametrize("zero_method", ["wilcox", "pratt"])
@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_wilcoxon_approx_matches_scipy_with_ties_and_zeros(zero_method, correction, seed):
    d = np.round(np.random.default_rng(seed).normal(0.2, 1.0, 90), 1)  # rounding creates ties and zeros
    assert np.any(d == 0) and len(np.unique(np.abs(d))) < d.size
    res = wilcoxon_signed_rank(d, zero_method=zero_method, correction=correction)
    ref = sps.wilcoxon(d, zero_method=zero_method, correction=correction, method="asymptotic")
    assert res.method == "approx"
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    # T+ from scipy's ranks: Pratt ranks the zeros too, then drops them; Wilcox drops them first.
    ranked = d if zero_method == "pratt" else d[d != 0]
    ranks = sps.rankdata(np.abs(ranked))
    assert res.statistic == ranks[ranked > 0].sum()
    assert min(res.statistic, ranks[ranked != 0].sum() - res.statistic) == ref.statistic
    assert (res.n, res.n_zero) == (np.count_nonzero(d), np.count_nonzero(d == 0))


@pytest.mark.parametrize("zero_method", ["wilcox", "pratt"])
@pytest.mark.parametrize("seed", range(2))
def test_wilcoxon_exact_with_ties_matches_scipy_permutation(zero_method, seed):
    d = np.round(np.random.default_rng(seed).normal(0.5, 1.0, 10))
    assert np.any(d == 0) and len(np.unique(np.abs(d))) < d.size
    res = wilcoxon_signed_rank(d, zero_method=zero_method, method="exact")
    ref = sps.wilcoxon(d, zero_method=zero_method, method=sps.PermutationMethod())
    assert res.method == "exact"
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert res.p_value != pytest.approx(
        sps.wilcoxon(d, zero_method=zero_method, correction=True, method="asymptotic").pvalue, rel=1e-6
    )


# --- cluster bootstrap ------------------------------------------------------------------------------


def _clustered(rng, n_prompts, seeds, shift, prompt_sd, image_sd):
    prompt_ids = np.repeat([f"p{k}" for k in range(n_prompts)], seeds)
    effect = rng.normal(0.0, prompt_sd, n_prompts)
    diffs = shift + np.repeat(effect, seeds) + rng.normal(0.0, image_sd, n_prompts * seeds)
    return diffs, prompt_ids


def test_bootstrap_ci_of_known_shift_excludes_zero():
    diffs, ids = _clustered(np.random.default_rng(3), 30, 3, shift=1.0, prompt_sd=0.5, image_sd=0.3)
    low, high = cluster_bootstrap_ci(diffs, ids, seed=1)
    assert 0.0 < low < 1.0 < high
    assert low < diffs.mean() < high


def test_bootstrap_null_coverage_needs_prompt_resampling():
    """Over 200 null data sets the prompt-level CI covers 0 about 95% of the time; an image-level
    bootstrap (each image its own cluster) ignores the prompt effect and covers far less often."""
    rng = np.random.default_rng(7)
    covered_cluster = covered_iid = 0
    for sim in range(200):
        diffs, ids = _clustered(rng, 25, 4, shift=0.0, prompt_sd=1.0, image_sd=0.25)
        low, high = cluster_bootstrap_ci(diffs, ids, n_resamples=1000, seed=sim)
        covered_cluster += low <= 0.0 <= high
        low, high = cluster_bootstrap_ci(diffs, np.arange(diffs.size), n_resamples=1000, seed=sim)
        covered_iid += low <= 0.0 <= high
    assert 0.88 <= covered_cluster / 200 <= 0.99
    assert covered_iid / 200 < 0.8


def test_bootstrap_spread_matches_cluster_standard_error():
    diffs, ids = _clustered(np.random.default_rng(11), 40, 3, shift=0.2, prompt_sd=1.0, image_sd=0.5)
    means = cluster_bootstrap_means(diffs, ids, n_resamples=40_000, seed=0)
    per_prompt = diffs.reshape(40, 3).mean(axis=1)
    # Bootstrap SD of a mean of P equal clusters: population SD of the cluster means / sqrt(P).
    expected_sd = per_prompt.std(ddof=0) / sqrt(40)
    assert means.std() == pytest.approx(expected_sd, rel=0.03)
    assert means.mean() == pytest.approx(diffs.mean(), abs=0.1 * expected_sd)


def test_bootstrap_identical_images_equal_prompt_level_bootstrap():
    rng = np.random.default_rng(5)
    per_prompt = rng.normal(0.3, 1.0, 25)
    prompts = [f"prompt-{k}" for k in range(25)]
    image_ids = np.repeat(prompts, 4)
    image_diffs = np.repeat(per_prompt, 4)
    image_level = cluster_bootstrap_means(image_diffs, image_ids, n_resamples=5000, seed=9)
    prompt_level = cluster_bootstrap_means(per_prompt, prompts, n_resamples=5000, seed=9)
    np.testing.assert_allclose(image_level, prompt_level, rtol=1e-12, atol=1e-15)
    assert cluster_bootstrap_ci(image_diffs, image_ids, seed=2) == pytest.approx(
        cluster_bootstrap_ci(per_prompt, prompts, seed=2), rel=1e-12
    )
    # Resampling images instead would shrink the interval by about sqrt(4).
    iid_low, iid_high = cluster_bootstrap_ci(image_diffs, np.arange(100), seed=2)
    low, high = cluster_bootstrap_ci(image_diffs, image_ids, seed=2)
    assert (high - low) > 1.6 * (iid_high - iid_low)


def test_bootstrap_statistic_is_image_weighted_mean_of_drawn_prompts():
    # p0 has three images with d = 1, p1 one image with d = 4. Two draws from {p0, p1}:
    # (p0,p0) -> 1, (p1,p1) -> 4, mixed -> (1+1+1+4)/4 = 1.75 with probabilities 1/4, 1/4, 1/2.
    diffs = [1.0, 4.0, 1.0, 1.0]
    ids = ["p0", "p1", "p0", "p0"]
    means = cluster_bootstrap_means(diffs, ids, n_resamples=20_000, seed=0)
    values, counts = np.unique(means, return_counts=True)
    np.testing.assert_allclose(values, [1.0, (1 + 1 + 1 + 4) / 4, 4.0])
    np.testing.assert_allclose(counts / 20_000, [0.25, 0.5, 0.25], atol=0.015)


def test_bootstrap_is_deterministic_given_seed():
    diffs, ids = _clustered(np.random.default_rng(0), 12, 2, shift=0.1, prompt_sd=1.0, image_sd=0.1)
    a = cluster_bootstrap_means(diffs, ids, n_resamples=3000, seed=42)
    b = cluster_bootstrap_means(diffs, ids, n_resamples=3000, seed=42)
    c = cluster_bootstrap_means(diffs, ids, n_resamples=3000, seed=43)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert cluster_bootstrap_ci(diffs, ids, seed=42) == cluster_bootstrap_ci(diffs, ids, seed=42)
    assert cluster_bootstrap_means(diffs, ids).size == 10_000


def test_bootstrap_many_prompts_is_fast_and_every_chunk_is_filled():
    diffs, ids = _clustered(np.random.default_rng(1), 2000, 2, shift=0.0, prompt_sd=1.0, image_sd=0.1)
    start = time.perf_counter()
    means = cluster_bootstrap_means(diffs, ids, n_resamples=10_000, seed=0)
    assert time.perf_counter() - start < 5.0
    # 2000 prompts make the resamples come in several chunks: each part must be a proper bootstrap.
    expected_sd = diffs.reshape(2000, 2).mean(axis=1).std() / sqrt(2000)
    for part in np.array_split(means, 10):
        assert part.std() == pytest.approx(expected_sd, rel=0.1)
        assert part.mean() == pytest.approx(diffs.mean(), abs=0.2 * expected_sd)


def test_bootstrap_single_prompt_and_errors():
    assert cluster_bootstrap_ci([0.5, 1.5], ["p", "p"], n_resamples=100) == (1.0, 1.0)
    with pytest.raises(ValueError):
        cluster_bootstrap_ci([1.0, 2.0], ["a"])
    with pytest.raises(ValueError):
        cluster_bootstrap_ci([], [])
    with pytest.raises(ValueError):
        cluster_bootstrap_ci([1.0], ["a"], confidence=1.5)
    with pytest.raises(ValueError):
        cluster_bootstrap_means([1.0], ["a"], n_resamples=0)


def test_percentile_interval_and_prompt_means():
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0), rel=1e-12)
    assert percentile_interval([3.0, 1.0, 2.0], 0.5) == pytest.approx((1.5, 2.5), rel=1e-12)
    np.testing.assert_allclose(prompt_means([1.0, 2.0, 10.0, 3.0], ["b", "b", "a", "b"]), [2.0, 10.0])


# --- compare -------------------------------------------------------------------------------------------


def _hand_data():
    prompts = ["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4"]
    a = np.array([0.5, 0.6, 0.4, 0.3, 0.2, 0.8, 0.1, 0.9, 0.5, 0.5])
    b = a + np.array(SEVEN_ONE_TWO)
    return prompts, a, b


def test_compare_hand_computed_per_image():
    prompts, a, b = _hand_data()
    (pair,) = compare({"A": {"score": a}, "B": {"score": b}}, prompts, n_resamples=2000)
    assert isinstance(pair, PairComparison) and (pair.arm_a, pair.arm_b) == ("A", "B")
    m = pair.metrics["score"]
    assert isinstance(m, MetricComparison)
    assert (m.unit, m.n_images, m.n_prompts, m.direction) == ("image", 10, 5, "higher")
    assert (m.wins, m.ties, m.losses) == (7, 2, 1)
    assert m.sign_test_p == pytest.approx(2 * (1 + 8) / 2**8, rel=1e-12)
    assert m.mean_diff == pytest.approx(sum(SEVEN_ONE_TWO) / 10, rel=1e-12)
    assert (m.mean_a, m.mean_b) == (pytest.approx(a.mean()), pytest.approx(b.mean()))
    expected_ci = cluster_bootstrap_ci(b - a, prompts, n_resamples=2000, seed=0)
    assert (m.ci_low, m.ci_high) == pytest.approx(expected_ci, rel=1e-12)
    w = wilcoxon_signed_rank(b - a)
    assert (m.wilcoxon_statistic, m.wilcoxon_p, m.wilcoxon_method) == (w.statistic, w.p_value, "approx")


def test_compare_lower_is_better_flips_wins_not_difference():
    prompts, a, b = _hand_data()
    (pair,) = compare(
        {"A": {"score": a, "latency": a}, "B": {"score": b, "latency": b}},
        prompts,
        directions={"score": "higher", "latency": "lower"},
        n_resamples=500,
    )
    hi, lo = pair.metrics["score"], pair.metrics["latency"]
    assert (lo.wins, lo.ties, lo.losses) == (1, 2, 7)
    assert lo.direction == "lower"
    assert lo.mean_diff == hi.mean_diff > 0
    assert lo.sign_test_p == hi.sign_test_p and lo.wilcoxon_p == hi.wilcoxon_p


def test_compare_aggregate_per_prompt():
    prompts, a, b = _hand_data()
    (pair,) = compare({"A": {"s": a}, "B": {"s": b}}, prompts, aggregate_per_prompt=True, n_resamples=500)
    m = pair.metrics["s"]
    # prompt means of B - A: 0.2, 0.35, 0.225, 0.25, 0 -> 4 wins, 1 tie; sign p = 2 * 1 / 2^4.
    assert (m.unit, m.wins, m.ties, m.losses) == ("prompt", 4, 1, 0)
    assert m.sign_test_p == pytest.approx(2 / 2**4)
    # The CI is still the image-level mean difference bootstrapped over prompts.
    (image_pair,) = compare({"A": {"s": a}, "B": {"s": b}}, prompts, n_resamples=500)
    assert (m.ci_low, m.ci_high) == (image_pair.metrics["s"].ci_low, image_pair.metrics["s"].ci_high)


def test_compare_tie_tolerance_applies_to_counts_and_wilcoxon_zeros():
    prompts = ["a", "b", "c", "d", "e"]
    a = np.zeros(5)
    b = np.array([0.01, -0.02, 0.5, 0.6, 0.7])
    (pair,) = compare(
        {"A": {"s": a, "t": a}, "B": {"s": b, "t": b}}, prompts, tie_tol={"s": 0.05, "t": 0.0}, n_resamples=200
    )
    s, t = pair.metrics["s"], pair.metrics["t"]
    assert (s.wins, s.ties, s.losses, s.tie_tol) == (3, 2, 0, 0.05)
    assert (t.wins, t.ties, t.losses) == (4, 0, 1)
    assert s.wilcoxon_p == wilcoxon_signed_rank([0.0, 0.0, 0.5, 0.6, 0.7]).p_value
    assert s.wilcoxon_statistic == 6.0 and t.wilcoxon_method == "exact"


def test_compare_pairs_baseline_and_all():
    n = 6
    prompts = ["x", "y", "z"] * 2
    arms = {name: {"m": np.arange(n) + shift} for name, shift in [("base", 0.0), ("apg", 1.0), ("cfg", 2.0)]}
    every = compare(arms, prompts, n_resamples=100)
    assert [(p.arm_a, p.arm_b) for p in every] == [("base", "apg"), ("base", "cfg"), ("apg", "cfg")]
    assert [p.metrics["m"].mean_diff for p in every] == [1.0, 2.0, 1.0]
    vs_cfg = compare(arms, prompts, baseline="cfg", n_resamples=100)
    assert [(p.arm_a, p.arm_b) for p in vs_cfg] == [("cfg", "base"), ("cfg", "apg")]
    assert vs_cfg[0].metrics["m"].losses == n


def test_compare_result_is_json_serialisable():
    prompts, a, b = _hand_data()
    result = compare({"A": {"s": a, "n": a}, "B": {"s": b, "n": b}}, prompts, n_resamples=300)
    text = json.dumps([asdict(p) for p in result], allow_nan=False)
    back = json.loads(text)
    assert back[0]["metrics"]["s"]["wins"] == 7
    assert set(back[0]["metrics"]["s"]) == set(MetricComparison.__dataclass_fields__)
    assert all(type(v) in (int, float, str) for v in asdict(result[0].metrics["s"]).values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"arms": {"A": {"s": [1.0, 2.0]}}}, "two arms"),
        ({"arms": {"A": {"s": [1.0, 2.0]}, "B": {"t": [1.0, 2.0]}}}, "metrics"),
        ({"arms": {"A": {"s": [1.0, 2.0]}, "B": {"s": [1.0]}}}, "prompt_ids has 2"),
        ({"arms": {"A": {"s": [1.0, math.nan]}, "B": {"s": [1.0, 2.0]}}}, "NaN"),
        ({"directions": {"s": "up"}}, "direction"),
        ({"directions": {"other": "higher"}}, "missing"),
        ({"baseline": "C"}, "baseline"),
        ({"tie_tol": {"zzz": 0.1}}, "tie_tol"),
    ],
)
def test_compare_rejects_bad_input(kwargs, message):
    arms = kwargs.pop("arms", {"A": {"s": [1.0, 2.0]}, "B": {"s": [1.5, 2.0]}})
    with pytest.raises(ValueError, match=message):
        compare(arms, ["p", "q"], n_resamples=10, **kwargs)
