"""Statistics for bias gaps: thin, validated wrappers on scipy.stats.

Conventions shared by every function here:
- NaN values in the inputs are invalid answers and are dropped before computing (the papers drop
  non-numeric answers); pass only finite values if dropping would hide a bug upstream.
- A statistic that is undefined on the data (too few values, zero variance) is NaN, and an
  ``UndefinedStatisticWarning`` says why.
- Resampling is seeded: the same inputs and seed give the same interval or p-value.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats


class UndefinedStatisticWarning(RuntimeWarning):
    """A statistic is NaN because the data cannot define it (the message says why)."""


def _finite(values, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional values, got shape {arr.shape}; flatten it first")
    if np.isinf(arr).any():
        raise ValueError(f"{what} holds infinite values; drop or fix them before computing statistics")
    return arr[~np.isnan(arr)]


def _undefined(reason: str) -> float:
    warnings.warn(reason, UndefinedStatisticWarning, stacklevel=3)
    return float("nan")


def _check_level(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _check_resamples(n_resamples: int) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")


def smd(a, b) -> float:
    """Standardized mean difference ``(mean(a) - mean(b)) / pooled SD`` (sample variances, ddof=1).

    The pooled SD is ``sqrt(((n_a-1) var_a + (n_b-1) var_b) / (n_a + n_b - 2))``. NaN (with a
    warning) when a side has fewer than 2 values or both sides have zero variance.
    """
    a, b = _finite(a, "a"), _finite(b, "b")
    if len(a) < 2 or len(b) < 2:
        return _undefined(f"SMD needs at least 2 valid values per side; got {len(a)} and {len(b)}")
    pooled_var = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    if pooled_var == 0:
        return _undefined("SMD is undefined: both sides have zero variance (every value identical)")
    return float((a.mean() - b.mean()) / np.sqrt(pooled_var))


def mann_whitney(a, b) -> tuple[float, float]:
    """Mann-Whitney U statistic of ``a`` against ``b`` and its two-sided p-value."""
    a, b = _finite(a, "a"), _finite(b, "b")
    if len(a) == 0 or len(b) == 0:
        nan = _undefined(f"Mann-Whitney U needs valid values on both sides; got {len(a)} and {len(b)}")
        return nan, nan
    result = stats.mannwhitneyu(a, b, alternative="two-sided")
    return float(result.statistic), float(result.pvalue)


def correlation(x, y, method: Literal["spearman", "pearson"] = "spearman") -> tuple[float, float]:
    """Correlation of paired ``x`` and ``y`` (Spearman's rho or Pearson's r) and its two-sided p-value.

    Pairs with a NaN on either side are dropped. NaN (with a warning) under 3 pairs or when a side
    is constant.
    """
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x_arr.ndim != 1 or x_arr.shape != y_arr.shape:
        raise ValueError(f"x and y must be paired 1-d values, got shapes {x_arr.shape} and {y_arr.shape}")
    keep = ~(np.isnan(x_arr) | np.isnan(y_arr))
    x_arr, y_arr = _finite(x_arr[keep], "x"), _finite(y_arr[keep], "y")
    if len(x_arr) < 3 or np.ptp(x_arr) == 0 or np.ptp(y_arr) == 0:
        nan = _undefined(f"a {method} correlation needs at least 3 pairs and no constant side; "
                         f"got {len(x_arr)} pairs")
        return nan, nan
    result = (stats.spearmanr if method == "spearman" else stats.pearsonr)(x_arr, y_arr)
    return float(result.statistic), float(result.pvalue)


def bootstrap_ci(
    data: tuple,
    statistic: Callable[..., float],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    paired: bool = False,
    method: Literal["percentile", "basic", "BCa"] = "percentile",
) -> tuple[float, float]:
    """Bootstrap confidence interval of ``statistic(*samples)`` (scipy.stats.bootstrap).

    ``data`` is a tuple of 1-d samples (NaN dropped per sample unless ``paired``, where a NaN in any
    sample drops that pair); ``statistic`` takes one array per sample and returns a float.
    ``paired=True`` resamples the same indices in every sample.
    """
    if not isinstance(data, tuple) or not data:
        raise ValueError("data must be a non-empty tuple of samples, e.g. (a,) or (a, b)")
    _check_level(confidence)
    _check_resamples(n_resamples)
    if paired:
        arrays = [np.asarray(d, dtype=float) for d in data]
        if len({len(x) for x in arrays}) != 1:
            raise ValueError(f"paired samples must have equal lengths, got {[len(x) for x in arrays]}")
        keep = ~np.any([np.isnan(x) for x in arrays], axis=0)
        samples = tuple(_finite(x[keep], f"data[{i}]") for i, x in enumerate(arrays))
    else:
        samples = tuple(_finite(d, f"data[{i}]") for i, d in enumerate(data))
    if min(len(s) for s in samples) < 2:
        nan = _undefined(f"bootstrap needs at least 2 valid values per sample; got {[len(s) for s in samples]}")
        return nan, nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(
            samples,
            statistic,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method=method,
            paired=paired,
            vectorized=False,
            rng=np.random.default_rng(seed),
        )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if np.isnan(low) or np.isnan(high):
        warnings.warn("bootstrap interval is NaN: the statistic is degenerate on these data",
                      UndefinedStatisticWarning, stacklevel=2)
    return low, high


def _mean_difference(x, y, axis):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def permutation_p_value(a, b, *, paired: bool = False, n_resamples: int = 5000, seed: int = 0) -> float:
    """Two-sided permutation p-value for the difference in means of ``a`` and ``b``.

    Unpaired: group labels are shuffled. Paired (``a[i]`` with ``b[i]``): each pair's two values are
    swapped at random; pairs with a NaN on either side are dropped.
    """
    _check_resamples(n_resamples)
    if paired:
        a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if a_arr.shape != b_arr.shape:
            raise ValueError(f"paired samples must have equal lengths, got {len(a_arr)} and {len(b_arr)}")
        keep = ~(np.isnan(a_arr) | np.isnan(b_arr))
        a, b = _finite(a_arr[keep], "a"), _finite(b_arr[keep], "b")
    else:
        a, b = _finite(a, "a"), _finite(b, "b")
    if len(a) < 1 or len(b) < 1 or (not paired and len(a) + len(b) < 3):
        return _undefined(f"a permutation test needs more valid values; got {len(a)} and {len(b)}")
    result = stats.permutation_test(
        (a, b),
        _mean_difference,
        permutation_type="samples" if paired else "independent",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def _level_codes(frame: pd.DataFrame, column: str) -> tuple[np.ndarray, int]:
    codes, levels = pd.factorize(frame[column], use_na_sentinel=False)
    return codes, len(levels)


def cluster_weights(
    frame: pd.DataFrame,
    clusters: Sequence[str],
    *,
    strata: Mapping[str, str | Sequence[str]] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """``[resample, row]`` multiplicities of a multi-way cluster bootstrap (see ``cluster_bootstrap``).

    Per resample, the distinct levels of every factor in ``clusters`` are drawn with replacement,
    independently per factor (within each stratum for a factor in ``strata``); a row's weight is the
    product over factors of how often its level was drawn.
    """
    clusters = list(clusters)
    strata = dict(strata or {})
    if frame.empty:
        raise ValueError("cluster bootstrap got an empty frame")
    if not clusters:
        raise ValueError("name at least one cluster column, e.g. clusters=['name', 'template']")
    missing = [c for c in clusters + [s for v in strata.values() for s in ([v] if isinstance(v, str) else v)]
               if c not in frame.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the frame; it has {list(frame.columns)}")
    unknown = [f for f in strata if f not in clusters]
    if unknown:
        raise ValueError(f"strata given for {unknown}, which are not cluster columns {clusters}")
    _check_resamples(n_resamples)

    factors = []  # per factor: (level code of each row, number of levels, level codes per stratum)
    for factor in clusters:
        codes, n_levels = _level_codes(frame, factor)
        if factor in strata:
            by = [strata[factor]] if isinstance(strata[factor], str) else list(strata[factor])
            per_level = frame.groupby(codes, sort=True)[by]
            if (per_level.nunique(dropna=False) > 1).any(axis=None):
                raise ValueError(f"{factor!r} is not nested in {by}: some of its levels appear in several strata")
            stratum_codes = per_level.first().groupby(by, sort=True, dropna=False).ngroup().to_numpy()
            pools = [np.flatnonzero(stratum_codes == s) for s in range(stratum_codes.max() + 1)]
        else:
            pools = [np.arange(n_levels)]
        factors.append((codes, n_levels, pools))

    rng = np.random.default_rng(seed)
    weights = np.ones((n_resamples, len(frame)), dtype=np.int64)
    for i in range(n_resamples):
        for codes, n_levels, pools in factors:
            drawn = np.concatenate([rng.choice(pool, size=len(pool), replace=True) for pool in pools])
            weights[i] *= np.bincount(drawn, minlength=n_levels)[codes]
    return weights


def _percentile_interval(estimates: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = estimates[~np.isnan(estimates)]
    if len(finite) == 0:
        nan = _undefined("every cluster resample gave a NaN statistic")
        return nan, nan
    if len(finite) < len(estimates):
        warnings.warn(f"{len(estimates) - len(finite)} of {len(estimates)} cluster resamples gave NaN and were "
                      "left out", UndefinedStatisticWarning, stacklevel=3)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def cluster_bootstrap(
    frame: pd.DataFrame,
    statistic: Callable[[pd.DataFrame], float],
    clusters: Sequence[str],
    *,
    strata: Mapping[str, str | Sequence[str]] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile CI of ``statistic(frame)`` when rows are clustered by one or more crossed factors.

    What is resampled: each column in ``clusters`` is a factor (e.g. ``"name"``, ``"template"``).
    Per resample, the distinct levels of every factor are drawn with replacement, independently per
    factor (a multi-way "pigeonhole" bootstrap for crossed designs). A row is kept as many times as
    the product, over factors, of how often its level was drawn; so a level drawn twice brings
    all its rows twice, a level not drawn removes all its rows. Rows are never resampled
    individually, and original labels are kept (a level drawn twice appears as duplicate rows
    under the same label).

    ``strata`` maps a factor to the column(s) it is nested in, e.g. ``{"name": "group"}``: that
    factor's levels are then drawn within each stratum, keeping per-stratum level counts fixed
    (so each resample has as many White names and Black names as the data).

    Resamples where the statistic is NaN are left out (with a warning); the result is NaN if all are.
    """
    _check_level(confidence)
    weights = cluster_weights(frame, clusters, strata=strata, n_resamples=n_resamples, seed=seed)
    rows = np.arange(len(frame))
    estimates = np.array([statistic(frame.iloc[np.repeat(rows, w)]) for w in weights], dtype=float)
    return _percentile_interval(estimates, confidence)


def gap_interval(
    frame: pd.DataFrame,
    value: str,
    group: str,
    group_a: Hashable,
    clusters: Sequence[str],
    *,
    strata: Mapping[str, str | Sequence[str]] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """``cluster_bootstrap`` of the gap ``mean(value | group == group_a) - mean(value | other rows)``,
    the same resamples, every resample's gap computed at once (a weighted mean, not a resampled frame)."""
    _check_level(confidence)
    weights = cluster_weights(frame, clusters, strata=strata, n_resamples=n_resamples, seed=seed)
    in_a = (frame[group] == group_a).to_numpy()
    return _percentile_interval(_weighted_gaps(weights, frame[value].to_numpy(float), in_a), confidence)


def _weighted_gaps(weights: np.ndarray, values: np.ndarray, in_a: np.ndarray) -> np.ndarray:
    """Per resample, weighted mean of ``values`` over group A rows minus over group B rows."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a = (weights[:, in_a] @ values[in_a]) / weights[:, in_a].sum(1)
        mean_b = (weights[:, ~in_a] @ values[~in_a]) / weights[:, ~in_a].sum(1)
    return mean_a - mean_b


POWER_Z = float(stats.norm.ppf(0.975) + stats.norm.ppf(0.80))  # two-sided 5% test, 80% power


def gap_change(
    frame: pd.DataFrame,
    before: str,
    after: str,
    *,
    group: str = "group",
    group_a: Hashable = "White",
    clusters: Sequence[str] = ("name", "variation"),
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float | bool]:
    """The change of a group gap, ``mean_A - mean_B`` of a per-prompt value, under an intervention.

    ``frame`` has one row per prompt with the value ``before`` and ``after`` (the same prompts:
    paired). One two-way cluster bootstrap over ``clusters`` (names drawn within their group) is
    drawn once and both gaps are computed on every resample, so the intervals are paired:

    - ``delta_gap`` = gap after - gap before, with ``delta_low``/``delta_high``;
    - ``share_removed`` = -delta_gap / gap before (signed: 1 removes the gap, > 1 overshoots,
      < 0 widens it), with ``share_low``/``share_high``;
    - ``after_low``/``after_high``: the after-gap's interval; ``overshoot`` when the after-gap has the
      opposite sign of the before-gap and its interval excludes zero;
    - ``gap_sd``: the bootstrap SD of the before-gap, and ``mde`` = (z_0.975 + z_0.80) * gap_sd, the
      smallest change of the gap a two-sided 5% test detects with 80% power (normal approximation,
      taking the SD of a change to be that of the gap itself);
    - ``reduction_resamples``: the old ratio ``1 - |after| / |before|`` on every resample.
    """
    _check_level(confidence)
    for column in (before, after, group):
        if column not in frame.columns:
            raise ValueError(f"column {column!r} is not in the frame; it has {list(frame.columns)}")
    in_a = (frame[group] == group_a).to_numpy()
    if in_a.all() or not in_a.any():
        raise ValueError(f"gap_change needs prompts of group {group_a!r} and of another group in column {group!r}")
    weights = cluster_weights(frame, clusters, strata={clusters[0]: group}, n_resamples=n_resamples, seed=seed)
    values_before, values_after = frame[before].to_numpy(float), frame[after].to_numpy(float)
    full = np.ones((1, len(frame)), dtype=np.int64)
    gap_before = float(_weighted_gaps(full, values_before, in_a)[0])
    gap_after = float(_weighted_gaps(full, values_after, in_a)[0])
    boot_before = _weighted_gaps(weights, values_before, in_a)
    boot_after = _weighted_gaps(weights, values_after, in_a)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = -(boot_after - boot_before) / boot_before
    delta_low, delta_high = _percentile_interval(boot_after - boot_before, confidence)
    share_low, share_high = _percentile_interval(share, confidence)
    after_low, after_high = _percentile_interval(boot_after, confidence)
    sign = np.sign(gap_before)
    gap_sd = float(np.nanstd(boot_before, ddof=1))
    return {
        "gap_before": gap_before,
        "gap_after": gap_after,
        "delta_gap": gap_after - gap_before,
        "delta_low": delta_low,
        "delta_high": delta_high,
        "share_removed": -(gap_after - gap_before) / gap_before if gap_before != 0 else float("nan"),
        "share_low": share_low,
        "share_high": share_high,
        "after_low": after_low,
        "after_high": after_high,
        "overshoot": bool(sign != 0 and (sign * after_high < 0)),
        "gap_sd": gap_sd,
        "mde": POWER_Z * gap_sd,
        "reduction_resamples": 1 - np.abs(boot_after) / np.abs(boot_before),
    }


__all__ = [
    "UndefinedStatisticWarning",
    "bootstrap_ci",
    "cluster_bootstrap",
    "cluster_weights",
    "gap_change",
    "gap_interval",
    "correlation",
    "mann_whitney",
    "permutation_p_value",
    "smd",
]
