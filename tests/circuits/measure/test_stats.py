import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from circuits.measure.stats import (
    UndefinedStatisticWarning,
    bootstrap_ci,
    cluster_bootstrap,
    gap_interval,
    mann_whitney,
    permutation_p_value,
    smd,
)


def test_smd_known_value_and_against_numpy():
    assert smd([1, 2, 3], [3, 4, 5]) == pytest.approx(-2.0)
    rng = np.random.default_rng(1)
    a, b = rng.normal(1, 2, 40), rng.normal(0, 1, 25)
    pooled = np.sqrt((39 * a.var(ddof=1) + 24 * b.var(ddof=1)) / 63)
    assert smd(a, b) == pytest.approx((a.mean() - b.mean()) / pooled)
    assert smd(b, a) == pytest.approx(-smd(a, b))


def test_smd_drops_nan_and_keeps_one_sided_variance():
    assert smd([1, 2, 3, np.nan], [3, 4, 5]) == pytest.approx(-2.0)
    assert np.isfinite(smd([1, 1, 1], [2, 3, 4]))


@pytest.mark.parametrize("a,b,reason", [
    ([1.0], [1.0, 2.0], "at least 2"),
    ([1.0, np.nan], [1.0, 2.0], "at least 2"),
    ([3.0, 3.0], [3.0, 3.0, 3.0], "zero variance"),
])
def test_smd_undefined_is_nan_with_reason(a, b, reason):
    with pytest.warns(UndefinedStatisticWarning, match=reason):
        assert np.isnan(smd(a, b))


def test_smd_rejects_bad_input():
    with pytest.raises(ValueError, match="one-dimensional"):
        smd([[1, 2], [3, 4]], [1, 2])
    with pytest.raises(ValueError, match="infinite"):
        smd([1, np.inf], [1, 2])


def test_mann_whitney_matches_scipy_and_exact_value():
    u, p = mann_whitney([1, 2, 3], [4, 5, 6])
    assert (u, p) == (0.0, pytest.approx(0.1))  # exact: 2 of 20 splits as extreme
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=30), rng.normal(0.5, 1, 35)
    ref = sps.mannwhitneyu(a, b, alternative="two-sided")
    assert mann_whitney(np.append(a, np.nan), b) == pytest.approx((ref.statistic, ref.pvalue))
    with pytest.warns(UndefinedStatisticWarning):
        assert np.isnan(mann_whitney([], [1.0])[1])


def _mean_diff(x, y):
    return np.mean(x) - np.mean(y)


def test_bootstrap_ci_matches_scipy_and_is_seeded():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1, 1, 30), rng.normal(0, 1, 30)
    low, high = bootstrap_ci((a, b), _mean_diff, n_resamples=500, seed=7)
    ref = sps.bootstrap((a, b), _mean_diff, n_resamples=500, method="percentile", vectorized=False,
                        rng=np.random.default_rng(7)).confidence_interval
    assert (low, high) == pytest.approx((ref.low, ref.high))
    assert low < a.mean() - b.mean() < high
    assert bootstrap_ci((a, b), _mean_diff, n_resamples=500, seed=7) == (low, high)
    assert bootstrap_ci((a, b), _mean_diff, n_resamples=500, seed=8) != (low, high)


def test_bootstrap_ci_paired_drops_incomplete_pairs():
    a = np.array([1.0, 2.0, 3.0, 4.0, np.nan, 6.0])
    b = np.array([0.5, 1.5, np.nan, 3.0, 4.0, 5.5])
    got = bootstrap_ci((a, b), _mean_diff, n_resamples=300, paired=True, seed=0)
    keep = ~(np.isnan(a) | np.isnan(b))
    ref = sps.bootstrap((a[keep], b[keep]), _mean_diff, n_resamples=300, paired=True, method="percentile",
                        vectorized=False, rng=np.random.default_rng(0)).confidence_interval
    assert got == pytest.approx((ref.low, ref.high))
    with pytest.raises(ValueError, match="equal lengths"):
        bootstrap_ci((a, b[:3]), _mean_diff, paired=True)


@pytest.mark.usefixtures("unchecked")
def test_bootstrap_ci_input_checks():
    with pytest.raises(ValueError, match="tuple"):
        bootstrap_ci([1, 2, 3], np.mean)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(([1, 2, 3],), np.mean, confidence=95)
    with pytest.warns(UndefinedStatisticWarning):
        assert np.isnan(bootstrap_ci(([1.0],), np.mean)[0])


def test_permutation_p_value_exact_small_cases():
    # All 20 relabelings are enumerated; the observed split and its mirror are the extremes.
    assert permutation_p_value([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    # Paired: 8 sign patterns, the observed one (all a > b) and its mirror are the extremes.
    assert permutation_p_value([2, 4, 6], [1, 2, 3], paired=True) == pytest.approx(0.25)
    assert permutation_p_value([2, 4, 6, np.nan], [1, 2, 3, 9], paired=True) == pytest.approx(0.25)


def test_permutation_p_value_seeded_and_sensitive():
    rng = np.random.default_rng(4)
    same = rng.normal(size=(2, 40))
    shifted = rng.normal(2, 1, 40)
    assert permutation_p_value(same[0], same[1], n_resamples=999) > 0.05
    assert permutation_p_value(same[0], shifted, n_resamples=999) < 0.01
    p1 = permutation_p_value(same[0], same[1], n_resamples=999, seed=3)
    assert p1 == permutation_p_value(same[0], same[1], n_resamples=999, seed=3)


def _crossed_frame(n_names=6, n_templates=4, reps=1, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for n in range(n_names):
        group = "W" if n < n_names // 2 else "B"
        for t in range(n_templates):
            for _ in range(reps):
                rows.append({"name": f"n{n}", "group": group, "template": f"t{t}", "value": rng.normal()})
    return pd.DataFrame(rows)


def test_cluster_bootstrap_resamples_whole_crossed_clusters_within_strata():
    frame = _crossed_frame()
    seen = []

    def record(resample):
        counts = pd.crosstab(resample.name, resample.template).to_numpy()
        # crossed draws: rows of (name, template) = draws(name) * draws(template), a rank-1 table
        np.testing.assert_array_equal(counts * counts.sum(), np.outer(counts.sum(1), counts.sum(0)))
        seen.append((resample.groupby("group").size().to_dict(), resample.name.nunique(),
                     resample.template.nunique()))
        return resample.value.mean()

    cluster_bootstrap(frame, record, ["name", "template"], strata={"name": "group"}, n_resamples=60, seed=1)
    assert len(seen) == 60
    # 3 names drawn per group x 4 templates drawn: every resample has 12 rows per group
    assert all(groups == {"W": 12, "B": 12} for groups, _, _ in seen)
    assert any(n < 6 for _, n, _ in seen) and any(t < 4 for _, _, t in seen)  # levels really are resampled


def test_cluster_bootstrap_width_follows_clusters_not_rows():
    rng = np.random.default_rng(5)
    effects = rng.normal(0, 1, 12)
    frame = pd.DataFrame({"name": np.repeat(np.arange(12), 40),
                          "value": np.repeat(effects, 40) + rng.normal(0, 0.01, 480)})
    low, high = cluster_bootstrap(frame, lambda f: f.value.mean(), ["name"], n_resamples=2000, seed=0)
    assert low < frame.value.mean() < high
    by_cluster = sps.bootstrap((effects,), np.mean, n_resamples=2000, method="percentile",
                               rng=np.random.default_rng(0)).confidence_interval
    assert (high - low) == pytest.approx(by_cluster.high - by_cluster.low, rel=0.2)
    row_low, row_high = bootstrap_ci((frame.value.to_numpy(),), np.mean, n_resamples=500)
    assert (high - low) > 4 * (row_high - row_low)
    assert cluster_bootstrap(frame, lambda f: f.value.mean(), ["name"], n_resamples=200, seed=3) == \
        cluster_bootstrap(frame, lambda f: f.value.mean(), ["name"], n_resamples=200, seed=3)


def test_gap_interval_equals_the_cluster_bootstrap_of_the_gap():
    """The vectorized gap interval is the resampled-frame bootstrap of the same statistic, resample for
    resample; a resample without one side is left out the same way."""
    frame = _crossed_frame(n_names=8, n_templates=3, reps=2, seed=4)

    def gap(f):
        in_a = f.group == "W"
        return f.value[in_a].mean() - f.value[~in_a].mean() if in_a.any() and not in_a.all() else np.nan

    kw = dict(n_resamples=300, seed=2, confidence=0.9)
    strata = {"name": "group"}
    assert gap_interval(frame, "value", "group", "W", ["name", "template"], strata=strata, **kw) == pytest.approx(
        cluster_bootstrap(frame, gap, ["name", "template"], strata=strata, **kw), rel=1e-12)
    with pytest.warns(UndefinedStatisticWarning, match="left out"):  # names drawn across groups: some lack a side
        unstratified = gap_interval(frame, "value", "group", "W", ["name"], **kw)
    with pytest.warns(UndefinedStatisticWarning):
        assert unstratified == pytest.approx(cluster_bootstrap(frame, gap, ["name"], **kw), rel=1e-12)


def test_cluster_bootstrap_nan_resamples_and_errors():
    frame = _crossed_frame()
    calls = iter(range(10_000))

    def sometimes_nan(f):
        return np.nan if next(calls) % 2 else f.value.mean()

    with pytest.warns(UndefinedStatisticWarning, match="50 of 100"):
        low, high = cluster_bootstrap(frame, sometimes_nan, ["name"], n_resamples=100)
    assert low <= high
    with pytest.warns(UndefinedStatisticWarning, match="every"):
        assert np.isnan(cluster_bootstrap(frame, lambda f: np.nan, ["name"], n_resamples=5)[0])
    with pytest.raises(ValueError, match="not in the frame"):
        cluster_bootstrap(frame, np.mean, ["speaker"])
    with pytest.raises(ValueError, match="not nested"):
        cluster_bootstrap(frame, np.mean, ["template"], strata={"template": "group"})
    with pytest.raises(ValueError, match="not cluster columns"):
        cluster_bootstrap(frame, np.mean, ["name"], strata={"template": "group"})
    with pytest.raises(ValueError, match="empty"):
        cluster_bootstrap(frame.iloc[:0], np.mean, ["name"])


def _design(values_before, values_after, names, groups, variations):
    return pd.DataFrame({"name": names, "group": groups, "variation": variations,
                         "before": values_before, "after": values_after})


def test_gap_change_interval_by_hand_on_two_names_per_group():
    from circuits.measure.stats import gap_change

    # one template; White names w1, w2 lose 2 and 6 of their value, Black names nothing. A resample
    # draws two White names with replacement: the change of the gap is -2, -4 or -6 (probabilities
    # 1/4, 1/2, 1/4), so the 95% percentile interval is exactly [-6, -2].
    names = ["w1", "w1", "w2", "w2", "b1", "b1", "b2", "b2"]
    groups = ["White"] * 4 + ["Black"] * 4
    before = np.array([10.0, 12.0, 11.0, 13.0, 5.0, 6.0, 4.0, 5.0])
    after = before - np.array([2, 2, 6, 6, 0, 0, 0, 0])
    got = gap_change(_design(before, after, names, groups, ["t"] * 8), "before", "after", n_resamples=2000)
    gap_before = before[:4].mean() - before[4:].mean()
    assert got["gap_before"] == pytest.approx(gap_before)
    assert got["delta_gap"] == pytest.approx(-4.0)
    assert (got["delta_low"], got["delta_high"]) == (pytest.approx(-6.0), pytest.approx(-2.0))
    assert got["share_removed"] == pytest.approx(4.0 / gap_before)
    assert got["share_low"] <= 4.0 / gap_before <= got["share_high"]
    assert not got["overshoot"]
    assert got["mde"] == pytest.approx(2.8016 * got["gap_sd"], rel=1e-3)


def test_gap_change_matches_a_hand_written_paired_cluster_bootstrap_and_flags_overshoot():
    from circuits.measure.stats import gap_change

    rng = np.random.default_rng(4)
    names = [f"{g}{i}" for g in "wb" for i in range(4) for _ in range(3)]
    groups = ["White" if n[0] == "w" else "Black" for n in names]
    variations = [f"t{j}" for _ in range(8) for j in range(3)]
    before = rng.normal(0, 1, 24) + np.where(np.array(groups) == "White", 5.0, 0.0)
    after = before - np.where(np.array(groups) == "White", 9.0, 0.0) + rng.normal(0, 0.1, 24)
    frame = _design(before, after, names, groups, variations)

    def gap(f, column):
        return f.loc[f.group == "White", column].mean() - f.loc[f.group == "Black", column].mean()

    got = gap_change(frame, "before", "after", n_resamples=500, seed=3)
    kwargs = dict(clusters=["name", "variation"], strata={"name": "group"}, n_resamples=500, seed=3)
    delta = cluster_bootstrap(frame, lambda f: gap(f, "after") - gap(f, "before"), **kwargs)
    share = cluster_bootstrap(frame, lambda f: -(gap(f, "after") - gap(f, "before")) / gap(f, "before"), **kwargs)
    after_ci = cluster_bootstrap(frame, lambda f: gap(f, "after"), **kwargs)
    assert (got["delta_low"], got["delta_high"]) == pytest.approx(delta)
    assert (got["share_low"], got["share_high"]) == pytest.approx(share)
    assert (got["after_low"], got["after_high"]) == pytest.approx(after_ci)
    assert got["gap_before"] > 0 and after_ci[1] < 0 and got["overshoot"]  # the gap flipped beyond its interval
    assert got["share_removed"] > 1
