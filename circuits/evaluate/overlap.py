"""How much do the components found for different contexts overlap, and is that more than chance?

Set overlap (Jaccard, over k), ranking overlap (rank-biased overlap), score agreement (Spearman);
two nulls: random sets keeping per-layer counts, and context-label permutation over prompts (with
bootstrap CIs over prompts); pairwise tables over contexts. Scores are ``[layer, index]`` tensors,
higher = more bias-carrying.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations_with_replacement
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from scipy import stats
from scipy.special import gammaln
from torch import Tensor
from tqdm.auto import tqdm

from circuits.select.pruning import Scores, shape_of_scores
from interp.components import KINDS, Component, ComponentSet, ComponentShape, Kind

Alternative = Literal["greater", "less"]
PROMPT_STATISTICS = ("jaccard", "spearman")


def _as_scores(scores: Scores | Tensor, kind: Kind | None) -> Float[Tensor, "layer index"]:
    if not isinstance(scores, Tensor):
        if kind not in scores:
            raise ValueError(f"no {kind!r} scores in the mapping (have {sorted(scores)}); name kind='neuron' or 'head'")
        scores = scores[kind]
    if scores.ndim != 2:
        raise ValueError(f"scores must be [layer, index], got shape {tuple(scores.shape)}")
    values = scores.detach().float().cpu()
    if values.isnan().any():
        raise ValueError("scores contain NaN")
    return values


def _same_shape(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"the two score tensors must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _descending_order(values: Float[Tensor, "component"]) -> Int[Tensor, "component"]:
    """Indices from highest to lowest score, ties by position (the order of ``ComponentSet.top_k``)."""
    return values.argsort(descending=True, stable=True)


# -- set and ranking overlap ---------------------------------------------------------------------
def jaccard(a: ComponentSet, b: ComponentSet) -> float:
    """``|a & b| / |a | b|``; two empty sets count as identical (1)."""
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def chance_jaccard(n: int, k_a: int, k_b: int) -> float:
    """Expected Jaccard of independent uniformly random subsets of sizes ``k_a``, ``k_b`` of ``n`` items.

    The intersection size is hypergeometric; the expectation is exact, not simulated (the pmf is
    evaluated through log-gamma, fast for tens of thousands of components).
    """
    if not (0 <= k_a <= n and 0 <= k_b <= n):
        raise ValueError(f"subset sizes must lie in [0, {n}], got {k_a} and {k_b}")
    if k_a + k_b == 0:
        return 1.0
    x = np.arange(max(0, k_a + k_b - n), min(k_a, k_b) + 1)
    pmf = np.exp(_log_comb(k_a, x) + _log_comb(n - k_a, k_b - x) - _log_comb(n, k_b))
    return float(np.sum(pmf * x / (k_a + k_b - x)))


def _log_comb(n, k):
    return gammaln(np.add(n, 1)) - gammaln(np.add(k, 1)) - gammaln(np.subtract(n, k) + 1)


@dataclass(frozen=True)
class JaccardCurve:
    """Jaccard of the two contexts' top-k sets for each k, beside its chance level."""

    kind: Kind
    ks: tuple[int, ...]
    jaccard: tuple[float, ...]
    chance: tuple[float, ...]

    def to_dataframe(self) -> pd.DataFrame:
        """Long form: ``kind, k, series ('observed' | 'chance'), jaccard``."""
        frames = [
            pd.DataFrame({"kind": self.kind, "k": list(self.ks), "series": series, "jaccard": list(values)})
            for series, values in (("observed", self.jaccard), ("chance", self.chance))
        ]
        return pd.concat(frames, ignore_index=True)


def jaccard_curve(
    scores_a: Scores | Tensor, scores_b: Scores | Tensor, ks: Sequence[int], kind: Kind
) -> JaccardCurve:
    """Jaccard of the top-k sets of two score tensors, for every ``k`` in ``ks``.

    ``chance`` is the expected Jaccard of two uniformly random k-sets of all components.
    """
    a, b = _as_scores(scores_a, kind), _as_scores(scores_b, kind)
    _same_shape(a, b)
    n = a.numel()
    bad = [k for k in ks if not 0 <= k <= n]
    if bad:
        raise ValueError(f"every k must lie in [0, {n}] (the number of {kind}s), got {bad}")
    rank_a = torch.empty(n, dtype=torch.long)
    rank_a[_descending_order(a.flatten())] = torch.arange(n)
    rank_b = torch.empty(n, dtype=torch.long)
    rank_b[_descending_order(b.flatten())] = torch.arange(n)
    entered = torch.maximum(rank_a, rank_b)  # a component is in both top-k sets once k > entered
    shared = torch.bincount(entered, minlength=n).cumsum(0)
    values = tuple(1.0 if k == 0 else float(shared[k - 1]) / (2 * k - float(shared[k - 1])) for k in ks)
    return JaccardCurve(kind, tuple(int(k) for k in ks), values, tuple(chance_jaccard(n, k, k) for k in ks))


def top_ranking(scores: Scores | Tensor, kind: Kind, k: int | None = None) -> list[Component]:
    """Components of ``kind`` from highest to lowest score (the first ``k`` if given)."""
    values = _as_scores(scores, kind)
    width = values.shape[1]
    order = _descending_order(values.flatten())[: values.numel() if k is None else k].tolist()
    return [Component(kind, j // width, j % width) for j in order]


def rank_biased_overlap(ranking_a: Sequence[Hashable], ranking_b: Sequence[Hashable], p: float = 0.9) -> float:
    """Extrapolated rank-biased overlap (Webber, Moffat & Zobel 2010, eq. 32) of two rankings.

    1 for identical rankings, 0 for disjoint ones; depth ``d`` has weight proportional to
    ``p**(d-1)`` (expected depth of comparison ``1 / (1 - p)``). Rankings may differ in length and
    are read as prefixes of longer ones (agreement past the shorter one is extrapolated).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    for name, ranking in (("ranking_a", ranking_a), ("ranking_b", ranking_b)):
        if len(ranking) == 0:
            raise ValueError(f"{name} is empty; RBO needs at least one ranked item")
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"{name} ranks some item twice; a ranking holds distinct items")
    short, long_ = sorted((list(ranking_a), list(ranking_b)), key=len)
    s, n_long = len(short), len(long_)
    position = {item: i for i, item in enumerate(long_)}
    entered = [max(i, position[item]) for i, item in enumerate(short) if item in position]
    overlap = np.cumsum(np.bincount(np.asarray(entered, dtype=int), minlength=n_long))  # X_d for d = 1..n_long
    depth = np.arange(1, n_long + 1)
    weights = p**depth
    agreement = np.sum(overlap / depth * weights)
    x_s, x_l = overlap[s - 1], overlap[n_long - 1]
    beyond_short = np.sum(x_s * (depth[s:] - s) / (s * depth[s:]) * weights[s:])
    tail = ((x_l - x_s) / n_long + x_s / s) * p**n_long
    return float((1 - p) / p * (agreement + beyond_short) + tail)


def spearman(scores_a: Scores | Tensor, scores_b: Scores | Tensor, kind: Kind | None = None) -> float:
    """Spearman rank correlation of the two full score vectors (every component of ``kind``)."""
    a, b = _as_scores(scores_a, kind), _as_scores(scores_b, kind)
    _same_shape(a, b)
    return float(stats.spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


# -- nulls ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class NullDistribution:
    """An observed statistic and its null samples.

    ``alternative="greater"``: the p-value is the chance of a null value at least the observed one
    (overlap above chance); ``"less"``: at most the observed one (overlap below exchangeability).
    """

    statistic: str
    method: str
    observed: float
    samples: np.ndarray
    p_value: float
    alternative: Alternative

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples))

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """Central ``level`` interval of the null samples."""
        low, high = np.quantile(self.samples, [(1 - level) / 2, (1 + level) / 2])
        return float(low), float(high)

    def summary(self, level: float = 0.95) -> dict[str, float | str]:
        low, high = self.interval(level)
        return {"statistic": self.statistic, "method": self.method, "observed": self.observed,
                "null_mean": self.mean, "null_low": low, "null_high": high, "p_value": self.p_value,
                "alternative": self.alternative}

    def to_dataframe(self) -> pd.DataFrame:
        """One row per null sample: ``statistic, method, value, observed``."""
        return pd.DataFrame({"statistic": self.statistic, "method": self.method,
                             "value": self.samples, "observed": self.observed})


def random_set_null(
    a: ComponentSet, b: ComponentSet, shape: ComponentShape, *, n_samples: int = 1000, seed: int = 0
) -> NullDistribution:
    """Jaccard of ``a`` and ``b`` against random pairs of sets with the same per-layer counts.

    Each sample stands for two independent draws that take, per kind and layer, as many components
    as ``a`` (and ``b``) hold there, uniformly without replacement. The overlap of two such draws
    in a layer of width ``w`` is hypergeometric, so the per-layer overlap sizes are sampled
    directly (exactly the same distribution, far cheaper than drawing the sets). The p-value
    (``greater``) is ``(1 + #{null >= observed}) / (1 + n_samples)``.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    rng = np.random.default_rng(seed)
    shared = np.zeros(n_samples, dtype=np.int64)
    for kind in KINDS:
        counts_a = a.mask(kind, shape).sum(dim=1).tolist()
        counts_b = b.mask(kind, shape).sum(dim=1).tolist()
        width = shape.per_layer(kind)
        for count_a, count_b in zip(counts_a, counts_b):
            if count_a and count_b:
                shared += rng.hypergeometric(count_a, width - count_a, count_b, size=n_samples)
    total = len(a) + len(b)
    samples = np.ones(n_samples) if total == 0 else shared / (total - shared)
    observed = jaccard(a, b)
    p_value = (1 + np.sum(samples >= observed - 1e-12)) / (1 + n_samples)
    return NullDistribution("jaccard", "random_per_layer", observed, samples, float(p_value), "greater")


class _MeanScoreOverlap:
    """Overlap statistics of two groups' mean scores, the groups given as pooled-prompt indices.

    Vectorized for ``scipy.stats`` resampling: index arrays ``[..., n]`` in, one value per row out.
    Means are weights ``[row, prompt]`` times the pooled scores, so no resampled copy is materialized.
    Top-k here uses ``torch.topk`` (deterministic, but an exact tie at the k-th place may break
    differently from ``ComponentSet.top_k``; mean scores of real prompts practically never tie).
    """

    def __init__(self, pooled: Float[Tensor, "prompt feature"], k: int):
        self.pooled, self.k = pooled, k

    def means(self, indices: np.ndarray) -> Float[Tensor, "row feature"]:
        idx = torch.tensor(np.reshape(indices, (-1, np.shape(indices)[-1])), dtype=torch.long)
        weights = torch.zeros(idx.shape[0], self.pooled.shape[0])
        weights.scatter_add_(1, idx, torch.full(idx.shape, 1.0 / idx.shape[1]))
        return weights @ self.pooled

    def jaccard(self, idx_a: np.ndarray, idx_b: np.ndarray, axis: int = -1) -> np.ndarray:
        tops = []
        for means in (self.means(idx_a), self.means(idx_b)):
            mask = torch.zeros_like(means, dtype=torch.bool)
            mask.scatter_(1, means.topk(self.k, dim=1, sorted=False).indices, True)
            tops.append(mask)
        shared = (tops[0] & tops[1]).sum(dim=1).double()
        return (shared / (2 * self.k - shared)).numpy().reshape(np.shape(idx_a)[:-1])

    def spearman(self, idx_a: np.ndarray, idx_b: np.ndarray, axis: int = -1) -> np.ndarray:
        ranks_a = stats.rankdata(self.means(idx_a).double().numpy(), axis=1)
        ranks_b = stats.rankdata(self.means(idx_b).double().numpy(), axis=1)
        return stats.pearsonr(ranks_a, ranks_b, axis=1).statistic.reshape(np.shape(idx_a)[:-1])

    def both(self, idx_a: np.ndarray, idx_b: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.stack([self.jaccard(idx_a, idx_b), self.spearman(idx_a, idx_b)])


@dataclass(frozen=True, eq=False)
class ContextOverlapTest:
    """Observed top-k Jaccard and Spearman of two contexts' mean scores, with nulls and bootstrap CIs.

    ``nulls``: label-permutation null per statistic (``alternative="less"``: a small p-value says
    the contexts overlap less than if their prompts were exchangeable, i.e. context-specific
    components). ``bootstrap``: statistic recomputed on prompts resampled within each context;
    ``ci`` its ``level`` interval. Resampling noise lowers top-k overlap, so the bootstrap
    distribution sits below the observed value; compare against the permutation null, which has
    the observed value's own noise level.
    """

    k: int
    n_prompts: tuple[int, int]
    level: float
    nulls: dict[str, NullDistribution]
    bootstrap: dict[str, np.ndarray]
    ci: dict[str, tuple[float, float]]

    def summary(self) -> pd.DataFrame:
        """One row per statistic: observed, bootstrap CI, null mean/interval, p-value."""
        rows = []
        for name, null in self.nulls.items():
            row = null.summary(self.level)
            row.update(ci_low=self.ci[name][0], ci_high=self.ci[name][1], k=self.k)
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dataframe(self) -> pd.DataFrame:
        """Long form of all resamples: ``statistic, source ('permutation' | 'bootstrap'), value, observed``."""
        frames = []
        for name, null in self.nulls.items():
            for source, values in (("permutation", null.samples), ("bootstrap", self.bootstrap[name])):
                frames.append(pd.DataFrame({"statistic": name, "source": source, "value": values,
                                            "observed": null.observed}))
        return pd.concat(frames, ignore_index=True)


def context_overlap_test(
    prompt_scores_a: Float[Tensor, "prompt_a layer index"],
    prompt_scores_b: Float[Tensor, "prompt_b layer index"],
    *,
    k: int,
    n_resamples: int = 1000,
    level: float = 0.95,
    ci_method: Literal["percentile", "basic", "BCa"] = "percentile",
    seed: int = 0,
) -> ContextOverlapTest:
    """Test the overlap of two contexts' components against exchangeable prompts.

    Observed: Jaccard of the top-``k`` sets and Spearman of the mean scores of each context's
    prompts. Null: pool the prompts, shuffle the context labels (group sizes kept), recompute
    (``scipy.stats.permutation_test``). CIs: resample prompts within each context
    (``scipy.stats.bootstrap``). Per-prompt scores are one kind's ``[layer, index]`` per prompt.
    """
    for name, tensor in (("prompt_scores_a", prompt_scores_a), ("prompt_scores_b", prompt_scores_b)):
        if tensor.ndim != 3 or tensor.shape[0] < 2:
            raise ValueError(f"{name} must be [prompt, layer, index] with >= 2 prompts, got {tuple(tensor.shape)}")
    if prompt_scores_a.shape[1:] != prompt_scores_b.shape[1:]:
        raise ValueError(f"the contexts' [layer, index] shapes differ: "
                         f"{tuple(prompt_scores_a.shape[1:])} and {tuple(prompt_scores_b.shape[1:])}")
    n_a, n_b = prompt_scores_a.shape[0], prompt_scores_b.shape[0]
    pooled = torch.cat([prompt_scores_a, prompt_scores_b]).detach().float().cpu().flatten(start_dim=1)
    if pooled.isnan().any():
        raise ValueError("prompt scores contain NaN")
    if not 1 <= k <= pooled.shape[1]:
        raise ValueError(f"k must lie in [1, {pooled.shape[1]}] (components per prompt), got {k}")
    overlap = _MeanScoreOverlap(pooled, k)
    groups = (np.arange(n_a), np.arange(n_a, n_a + n_b))
    batch = max(1, 2**21 // pooled.shape[1])  # rows of [row, feature] means held at once
    nulls = {}
    for name in PROMPT_STATISTICS:
        result = stats.permutation_test(groups, getattr(overlap, name), vectorized=True, n_resamples=n_resamples,
                                        batch=batch, alternative="less", rng=np.random.default_rng(seed))
        nulls[name] = NullDistribution(name, "label_permutation", float(result.statistic),
                                       np.asarray(result.null_distribution, dtype=float), float(result.pvalue), "less")
    boot = stats.bootstrap(groups, overlap.both, vectorized=True, n_resamples=n_resamples, batch=batch,
                           confidence_level=level, method=ci_method, rng=np.random.default_rng(seed))
    bootstrap = {name: boot.bootstrap_distribution[i] for i, name in enumerate(PROMPT_STATISTICS)}
    ci = {name: (float(boot.confidence_interval.low[i]), float(boot.confidence_interval.high[i]))
          for i, name in enumerate(PROMPT_STATISTICS)}
    return ContextOverlapTest(k, (n_a, n_b), level, nulls, bootstrap, ci)


# -- pairwise tables -----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class OverlapMatrix:
    """Pairwise overlap of the contexts' top-k sets: one row per ordered pair of contexts.

    Columns: ``jaccard``; ``rbo`` (of the top-k rankings, persistence ``p``); ``spearman`` (full
    score vectors); ``null_mean``, ``null_low``, ``null_high``, ``p_value`` (Jaccard under random
    sets with the same per-layer counts).
    """

    contexts: tuple[str, ...]
    kind: Kind
    k: int
    p: float
    table: pd.DataFrame

    def to_dataframe(self) -> pd.DataFrame:
        """Long form: ``context_a, context_b, kind, k, statistic, value``."""
        long = self.table.melt(id_vars=["context_a", "context_b"], var_name="statistic", value_name="value")
        return long.assign(kind=self.kind, k=self.k)[["context_a", "context_b", "kind", "k", "statistic", "value"]]

    def pivot(self, statistic: str = "jaccard") -> pd.DataFrame:
        """A contexts x contexts table of one statistic."""
        known = [c for c in self.table.columns if c not in ("context_a", "context_b")]
        if statistic not in known:
            raise ValueError(f"unknown statistic {statistic!r}; choose one of {known}")
        wide = self.table.pivot(index="context_a", columns="context_b", values=statistic)
        return wide.reindex(index=list(self.contexts), columns=list(self.contexts))


def overlap_matrix(
    scores_by_context: Mapping[str, Scores],
    k: int,
    kind: Kind,
    *,
    p: float = 0.9,
    n_null: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> OverlapMatrix:
    """Jaccard, RBO, Spearman and the random-per-layer null for every pair of contexts' top-k sets."""
    if not scores_by_context:
        raise ValueError("overlap_matrix needs scores for at least one context")
    contexts = tuple(scores_by_context)
    scores = {c: _as_scores(scores_by_context[c], kind) for c in contexts}
    shapes = {c: tuple(s.shape) for c, s in scores.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"contexts' {kind} scores differ in shape: {shapes}")
    shape = shape_of_scores({kind: scores[contexts[0]]})
    rankings = {c: top_ranking(scores[c], kind, k) for c in contexts}
    sets = {c: ComponentSet(r) for c, r in rankings.items()}
    rows = []
    pairs = list(combinations_with_replacement(contexts, 2))
    for a, b in tqdm(pairs, desc="context pairs", disable=not progress):
        null = random_set_null(sets[a], sets[b], shape, n_samples=n_null, seed=seed)
        low, high = null.interval()
        row = {"jaccard": null.observed, "rbo": rank_biased_overlap(rankings[a], rankings[b], p),
               "spearman": spearman(scores[a], scores[b]), "null_mean": null.mean, "null_low": low,
               "null_high": high, "p_value": null.p_value}
        rows.append(dict(context_a=a, context_b=b, **row))
        if a != b:
            rows.append(dict(context_a=b, context_b=a, **row))
    return OverlapMatrix(contexts, kind, k, p, pd.DataFrame(rows))
