import numpy as np
import pytest
import torch
from scipy import stats

from circuits.evaluate.overlap import (
    chance_jaccard,
    context_overlap_test,
    jaccard,
    jaccard_curve,
    overlap_matrix,
    random_set_null,
    rank_biased_overlap,
    spearman,
    top_ranking,
)
from interp.components import ComponentSet, ComponentShape, Head, Neuron

SHAPE = ComponentShape(n_layers=3, d_mlp=8, n_heads=4)


def test_jaccard_known_values():
    a = ComponentSet([Neuron(0, 1), Neuron(1, 2), Head(0, 0)])
    b = ComponentSet([Neuron(1, 2), Head(0, 0), Head(2, 3)])
    assert jaccard(a, a) == 1.0
    assert jaccard(a, ComponentSet([Head(1, 1)])) == 0.0
    assert jaccard(a, b) == pytest.approx(2 / 4)
    assert jaccard(ComponentSet(), ComponentSet()) == 1.0


def test_chance_jaccard_is_the_exact_expectation():
    # Two random 2-sets of 4 items share 0, 1, 2 items with probability 1/6, 4/6, 1/6: E[J] = 4/6 * 1/3 + 1/6 = 7/18.
    assert chance_jaccard(4, 2, 2) == pytest.approx(7 / 18)
    assert chance_jaccard(10, 10, 10) == pytest.approx(1.0)
    assert chance_jaccard(10, 0, 0) == 1.0


def test_jaccard_curve_hand_example_and_agreement_with_sets():
    a = torch.tensor([[4.0, 3.0, 2.0, 1.0]])  # order 0, 1, 2, 3
    b = torch.tensor([[3.0, 4.0, 1.0, 2.0]])  # order 1, 0, 3, 2
    curve = jaccard_curve(a, b, [1, 2, 3, 4], "head")
    assert curve.jaccard == pytest.approx((0.0, 1.0, 2 / 4, 1.0))
    assert curve.chance[-1] == pytest.approx(1.0)
    frame = curve.to_dataframe()
    assert set(frame["series"]) == {"observed", "chance"} and len(frame) == 8
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 8, generator=generator), torch.randn(3, 8, generator=generator)
    ks = [1, 5, 12, 24]
    expected = [jaccard(ComponentSet.top_k(x, k, kind="neuron"), ComponentSet.top_k(y, k, kind="neuron")) for k in ks]
    assert jaccard_curve({"neuron": x}, {"neuron": y}, ks, "neuron").jaccard == pytest.approx(tuple(expected))
    with pytest.raises(ValueError, match="every k must lie in"):
        jaccard_curve(x, y, [25], "neuron")


def test_rank_biased_overlap_known_values():
    assert rank_biased_overlap([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert rank_biased_overlap([1, 2, 3], [4, 5, 6]) == 0.0
    # p = 0.5; overlaps X_1..3 = 0, 2, 2: (0 * .5 + 2/2 * .25 + 2/3 * .125) + 2/3 * .125 = 5/12.
    assert rank_biased_overlap([1, 2, 3], [2, 1, 4], p=0.5) == pytest.approx(5 / 12)
    # Uneven: S = [1, 4], L = [1, 2, 3], p = 0.5; X_1..3 = 1, 1, 1.
    # (.5 + 1/2 * .25 + 1/3 * .125) + 1 * (3 - 2) / (2 * 3) * .125 + (0 / 3 + 1 / 2) * .125 = 0.75.
    assert rank_biased_overlap([1, 4], [1, 2, 3], p=0.5) == pytest.approx(0.75)
    assert rank_biased_overlap([1, 2, 3], [1, 4], p=0.5) == pytest.approx(0.75)
    # A prefix of the other ranking extrapolates to full agreement.
    assert rank_biased_overlap([1, 2], [1, 2, 3], p=0.5) == pytest.approx(1.0)


def test_rank_biased_overlap_rejects_bad_input():
    with pytest.raises(ValueError, match="ranks some item twice"):
        rank_biased_overlap([1, 1], [1, 2])
    with pytest.raises(ValueError, match="is empty"):
        rank_biased_overlap([], [1])
    with pytest.raises(ValueError, match="p must lie in"):
        rank_biased_overlap([1], [1], p=1.0)


def test_top_ranking_and_spearman():
    scores = torch.tensor([[0.5, 3.0], [2.0, -1.0]])
    assert top_ranking(scores, "head") == [Head(0, 1), Head(1, 0), Head(0, 0), Head(1, 1)]
    assert top_ranking({"head": scores}, "head", 2) == [Head(0, 1), Head(1, 0)]
    assert spearman(scores, scores * 3 + 1) == pytest.approx(1.0)
    assert spearman(scores, -scores) == pytest.approx(-1.0)
    x, y = torch.randn(3, 10), torch.randn(3, 10)
    assert spearman({"neuron": x}, {"neuron": y}, "neuron") == pytest.approx(
        stats.spearmanr(x.flatten(), y.flatten()).statistic
    )
    with pytest.raises(ValueError, match="one shape"):
        spearman(x, y[:, :5])


def test_random_set_null_preserves_per_layer_counts():
    whole_layer = ComponentSet(Head(0, h) for h in range(4))
    # Every same-count draw from layer 0 is all of layer 0: the null is exactly 1, not chance.
    null = random_set_null(whole_layer, whole_layer, SHAPE, n_samples=200, seed=0)
    assert (null.samples == 1.0).all() and null.p_value == 1.0
    # Sets in different layers can never overlap.
    a, b = ComponentSet([Head(0, 0), Head(0, 1)]), ComponentSet([Head(1, 0), Head(1, 1)])
    assert (random_set_null(a, b, SHAPE, n_samples=200).samples == 0.0).all()


def test_random_set_null_mean_matches_exact_chance_and_is_seeded():
    a = ComponentSet([Neuron(1, 0), Neuron(1, 1)])
    b = ComponentSet([Neuron(1, 0), Neuron(1, 5)])
    null = random_set_null(a, b, SHAPE, n_samples=4000, seed=1)
    assert null.observed == pytest.approx(1 / 3)
    assert null.mean == pytest.approx(chance_jaccard(8, 2, 2), abs=0.02)
    # Null Jaccard is 0, 1/3 or 1 with probability 15/28, 12/28, 1/28 (> 2.5%).
    assert null.interval() == (0.0, 1.0)
    assert null.interval(0.9) == (0.0, pytest.approx(1 / 3))
    assert np.array_equal(null.samples, random_set_null(a, b, SHAPE, n_samples=4000, seed=1).samples)
    frame = null.to_dataframe()
    assert len(frame) == 4000 and set(frame.columns) == {"statistic", "method", "value", "observed"}


def _prompt_scores(mean: torch.Tensor, n_prompts: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return mean + torch.randn(n_prompts, *mean.shape, generator=generator)


def test_permutation_null_is_centred_on_exchangeable_contexts():
    mean = torch.linspace(0, 3, 40).view(2, 20)
    a, b = _prompt_scores(mean, 12, seed=0), _prompt_scores(mean, 15, seed=1)
    result = context_overlap_test(a, b, k=6, n_resamples=300, seed=0)
    for name in ("jaccard", "spearman"):
        null = result.nulls[name]
        assert abs(null.observed - null.mean) < 2 * null.samples.std()
        assert null.p_value > 0.05
    # The observed statistic is the overlap of the contexts' own mean scores.
    observed = jaccard(ComponentSet.top_k(a.mean(0), 6, kind="neuron"), ComponentSet.top_k(b.mean(0), 6, kind="neuron"))
    assert result.nulls["jaccard"].observed == pytest.approx(observed)
    assert result.nulls["spearman"].observed == pytest.approx(spearman(a.mean(0), b.mean(0)), abs=1e-6)
    summary = result.summary()
    assert list(summary["statistic"]) == ["jaccard", "spearman"]
    assert (summary["ci_low"] <= summary["ci_high"]).all()
    assert len(result.to_dataframe()) == 2 * (300 + 300)


@pytest.mark.usefixtures("unchecked")
def test_permutation_null_detects_context_specific_components():
    # Components 0-5 carry bias in both contexts (3.0); 6-11 more so in A only, 12-17 in B only (4.0).
    # Each context's top 6 is its own specific set (Jaccard 0); exchangeable pseudo-contexts share 0-5.
    mean_a, mean_b = torch.zeros(40), torch.zeros(40)
    mean_a[:6], mean_b[:6], mean_a[6:12], mean_b[12:18] = 3.0, 3.0, 4.0, 4.0
    a, b = _prompt_scores(mean_a.view(2, 20), 30, seed=0), _prompt_scores(mean_b.view(2, 20), 30, seed=1)
    result = context_overlap_test(a, b, k=6, n_resamples=200, seed=0)
    jacc = result.nulls["jaccard"]
    assert jacc.observed == 0.0 and jacc.mean > 0.5 and jacc.p_value <= 0.01
    assert result.nulls["spearman"].p_value <= 0.01
    with pytest.raises(ValueError, match="shapes differ"):
        context_overlap_test(a, b[:, :1], k=2)
    with pytest.raises(ValueError, match="k must lie in"):
        context_overlap_test(a, b, k=41)


def test_overlap_matrix_pairs_and_pivot():
    base = torch.arange(24.0).view(3, 8)
    scores = {"buy": {"neuron": base}, "sell": {"neuron": base.clone()}, "hire": {"neuron": -base}}
    matrix = overlap_matrix(scores, k=5, kind="neuron", n_null=100)
    jacc = matrix.pivot("jaccard")
    assert list(jacc.index) == ["buy", "sell", "hire"] and list(jacc.columns) == ["buy", "sell", "hire"]
    assert np.allclose(np.diag(jacc), 1.0)
    assert jacc.loc["buy", "sell"] == 1.0 and jacc.loc["buy", "hire"] == 0.0
    assert jacc.loc["hire", "buy"] == jacc.loc["buy", "hire"]
    assert matrix.pivot("spearman").loc["sell", "hire"] == pytest.approx(-1.0)
    assert matrix.pivot("rbo").loc["buy", "sell"] == pytest.approx(1.0)
    assert matrix.pivot("null_mean").loc["buy", "hire"] < 1.0
    assert len(matrix.to_dataframe()) == 9 * 7
    with pytest.raises(ValueError, match="unknown statistic 'kl'"):
        matrix.pivot("kl")
    with pytest.raises(ValueError, match="differ in shape"):
        overlap_matrix({"a": {"neuron": base}, "b": {"neuron": base[:2]}}, k=2, kind="neuron")
