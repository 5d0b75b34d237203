from types import SimpleNamespace

import pytest
import torch

from circuits.select.pruning import (
    STRATEGIES,
    common,
    fasp,
    random_layer_masks,
    random_set,
    select,
    shape_of_scores,
    strategy_reads,
    top_k_heads,
    top_k_neurons,
    wanda_set_difference,
    weight_magnitude_scores,
)
from circuits.select.scoring import Baselines
from interp.components import ComponentSet, ComponentShape, Head, Neuron

NEURONS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
HEADS = torch.tensor([[0.1, 0.5], [0.2, 0.3]])
SCORES = {"neuron": NEURONS, "head": HEADS}


def test_top_k_per_kind():
    assert top_k_neurons(SCORES, 2) == ComponentSet([Neuron(1, 2), Neuron(1, 1)])
    assert top_k_heads(SCORES, 2) == ComponentSet([Head(0, 1), Head(1, 1)])
    assert top_k_heads({"head": -HEADS}, 1, absolute=True) == ComponentSet([Head(0, 1)])
    with pytest.raises(ValueError, match="no 'head' scores"):
        top_k_heads({"neuron": NEURONS}, 1)


FASP_UTILITY = torch.tensor([[0.9, 0.1, 0.5], [0.3, 0.8, 0.2]])
FASP_BIAS = torch.tensor([[5.0, 1.0, 4.0], [2.0, 3.0, -1.0]])


def test_fasp_hand_worked_example():
    # gamma = 0.5: protect floor(3.0) = 3 heads with the highest utility damage: H0.0 (0.9), H1.1 (0.8), H0.2 (0.5).
    # alpha = 0.34: prune floor(2.04) = 2 of the rest {H0.1: 1.0, H1.0: 2.0, H1.2: -1.0} by bias reduction.
    assert fasp(FASP_BIAS, FASP_UTILITY, gamma=0.5, alpha=0.34) == ComponentSet([Head(1, 0), Head(0, 1)])
    # Without protection the two most biased heads go, though utility needs them.
    assert fasp(FASP_BIAS, FASP_UTILITY, gamma=0.0, alpha=0.34) == ComponentSet([Head(0, 0), Head(0, 2)])
    assert fasp(FASP_BIAS, FASP_UTILITY, gamma=0.5, alpha=0.0) == ComponentSet()
    # Protect 3, prune the other 3: every unprotected head.
    assert fasp(FASP_BIAS, FASP_UTILITY, gamma=0.5, alpha=0.5) == ComponentSet([Head(0, 1), Head(1, 0), Head(1, 2)])


def test_fasp_counts_are_robust_to_float_error():
    bias = torch.arange(100.0).view(1, 100)
    # 0.29 * 100 is 28.999999999999996 in floating point; FASP must still prune 29 heads.
    assert len(fasp(bias, torch.zeros_like(bias), gamma=0.0, alpha=0.29)) == 29


@pytest.mark.parametrize(
    "gamma, alpha, message",
    [(1.2, 0.1, "gamma must be a fraction"), (0.5, -0.1, "alpha must be a fraction"), (0.6, 0.5, "gamma \\+ alpha")],
)
def test_fasp_rejects_bad_fractions(gamma, alpha, message):
    with pytest.raises(ValueError, match=message):
        fasp(FASP_BIAS, FASP_UTILITY, gamma=gamma, alpha=alpha)


@pytest.mark.usefixtures("unchecked")
def test_fasp_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        fasp(FASP_BIAS, FASP_UTILITY[:, :2])


def test_common_all_and_min_count():
    sets = [
        ComponentSet([Head(0, 0), Head(0, 1), Neuron(1, 2)]),
        ComponentSet([Head(0, 0), Neuron(1, 2), Neuron(2, 2)]),
        ComponentSet([Head(0, 0), Head(0, 1), Neuron(2, 2)]),
    ]
    assert common(sets) == ComponentSet([Head(0, 0)])
    assert common(sets, min_count=2) == ComponentSet([Head(0, 0), Head(0, 1), Neuron(1, 2), Neuron(2, 2)])
    with pytest.raises(ValueError, match="min_count must be in \\[1, 3\\]"):
        common(sets, min_count=4)
    with pytest.raises(ValueError, match="at least one"):
        common([])


def test_random_layer_masks_keep_counts():
    masks = random_layer_masks([0, 3, 5], 8, 50, torch.Generator().manual_seed(0))
    assert masks.shape == (50, 3, 8)
    assert (masks.sum(dim=-1) == torch.tensor([0, 3, 5])).all()
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 1
    with pytest.raises(ValueError, match="per-layer counts"):
        random_layer_masks([9], 8, 1, torch.Generator())


def test_random_set_is_seeded_and_can_match_per_layer_counts():
    shape = ComponentShape(n_layers=3, d_mlp=96, n_heads=4)
    first = random_set(shape, "neuron", 10, seed=1)
    assert len(first) == 10 and first == random_set(shape, "neuron", 10, seed=1)
    assert first != random_set(shape, "neuron", 10, seed=2)
    like = ComponentSet([Neuron(0, 1), Neuron(0, 5), Neuron(2, 7), Head(1, 0)])
    matched = random_set(shape, "neuron", seed=3, per_layer_like=like)
    assert matched.mask("neuron", shape).sum(dim=1).tolist() == [2, 0, 1]
    assert matched == random_set(shape, "neuron", 3, seed=3, per_layer_like=like)
    with pytest.raises(ValueError, match="k=5 but per_layer_like holds 3"):
        random_set(shape, "neuron", 5, seed=0, per_layer_like=like)
    with pytest.raises(ValueError, match="k must be in \\[0, 12\\]"):
        random_set(shape, "head", 13, seed=0)


@pytest.mark.usefixtures("unchecked")
def test_wanda_set_difference_is_per_layer():
    score_a = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]])
    score_b = torch.tensor([[5.0, 0, 0, 0, 0, 4], [0, 0, 0, 0, 9, 0]])
    # floor(0.34 * 6) = 2 per layer. Layer 0: A {0, 1} minus B {0, 5} = {1}.
    # Layer 1: A {5, 4} minus B {4, 0} (tie at 0 broken by position) = {5}.
    assert wanda_set_difference(score_a, score_b, top_fraction=0.34) == ComponentSet([Neuron(0, 1), Neuron(1, 5)])
    assert wanda_set_difference(score_a, score_a, top_fraction=0.5) == ComponentSet()
    assert wanda_set_difference(score_a, score_b, top_fraction=0.34, kind="head") == ComponentSet(
        [Head(0, 1), Head(1, 5)]
    )
    with pytest.raises(ValueError, match="one shape"):
        wanda_set_difference(score_a, score_b[:, :3])


def test_weight_magnitude_scores_on_tiny_model(tiny_model):
    scores = weight_magnitude_scores(tiny_model)
    assert scores["neuron"].shape == (3, 96) and scores["head"].shape == (3, 4)
    assert (scores["neuron"] > 0).all() and (scores["head"] > 0).all()
    # Check against the Hugging Face weights directly (out_features x in_features layouts).
    layer = tiny_model.original_model.model.layers[1]
    mlp, o_proj = layer.mlp, layer.self_attn.o_proj.weight
    neuron = mlp.down_proj.weight[:, 7].norm() * mlp.up_proj.weight[7].norm() * mlp.gate_proj.weight[7].norm()
    assert scores["neuron"][1, 7].item() == pytest.approx(neuron.item(), rel=1e-5)
    assert scores["head"][1, 2].item() == pytest.approx(o_proj[:, 32:48].norm().item(), rel=1e-5)


def test_shape_of_scores():
    assert shape_of_scores(SCORES) == ComponentShape(2, 3, 2)
    assert shape_of_scores({"head": HEADS}) == ComponentShape(2, 0, 2)
    with pytest.raises(ValueError, match="number of layers"):
        shape_of_scores({"neuron": NEURONS, "head": HEADS[:1]})


def test_the_registry_picks_each_context_then_the_common_sets():
    settings = SimpleNamespace(neuron_ks=(2,), head_ks=(1,), fasp_gamma=0.5, fasp_alphas=(0.34,), seed=4)
    scores = {"a": SCORES, "b": {"neuron": NEURONS.flip(1), "head": HEADS}}
    wanda = ComponentSet([Neuron(0, 0)])
    inputs = {"baselines": {c: Baselines(wanda, HEADS) for c in scores},
              "head_bias": {c: FASP_BIAS for c in scores}, "head_utility": FASP_UTILITY}
    picked = select(list(STRATEGIES), settings, scores, inputs)
    per_context = ["top_k_neurons", "random", "top_k_heads", "attention_to_name", "fasp", "wanda_difference"]
    assert [(name, ctx) for name, _, ctx, _ in picked] == [(n, c) for c in scores for n in per_context] + [
        ("common_neurons", "common"), ("common_heads", "common")]
    sets = {(name, ctx): (k, components) for name, k, ctx, components in picked}
    assert sets["top_k_neurons", "a"] == (2, top_k_neurons(SCORES, 2))
    assert sets["fasp", "a"] == (2, ComponentSet([Head(1, 0), Head(0, 1)]))
    assert sets["wanda_difference", "b"] == (1, wanda)
    assert sets["attention_to_name", "b"] == (1, top_k_heads(SCORES, 1))
    assert {c.layer for c in sets["random", "a"][1]} == {1}  # as many per layer as the top-k set
    assert sets["common_neurons", "common"] == (2, common([top_k_neurons(s, 2) for s in scores.values()]))
    assert strategy_reads(["fasp", "top_k_heads"]) == {"head_bias", "head_utility"}
    with pytest.raises(ValueError, match="unknown pruning strategy"):
        select(["magic"], settings, scores)


def test_null_sets_keep_per_layer_neuron_counts_and_head_count():
    from circuits.select.pruning import null_sets
    from interp.components import ComponentSet, ComponentShape, Head, Neuron

    shape = ComponentShape(4, 50, 6)
    chosen = ComponentSet([Neuron(0, 1), Neuron(0, 9), Neuron(2, 3), Neuron(3, 0), Neuron(3, 5), Neuron(3, 7),
                           Head(1, 2), Head(1, 3), Head(3, 0)])
    draws = null_sets(chosen, shape, n_draws=6, seed=2)
    assert len(draws) == 6 and len({frozenset(d) for d in draws}) == 6
    want = chosen.mask("neuron", shape).sum(1)
    head_layers = set()
    for drawn in draws:
        assert torch.equal(drawn.mask("neuron", shape).sum(1), want)
        assert drawn.mask("head", shape).sum() == 3
        head_layers |= {c.layer for c in drawn if c.kind == "head"}
        assert set(drawn) != set(chosen)
    assert len(head_layers) > 2  # heads are uniform over layers, not tied to the set's layers
    assert [set(d) for d in null_sets(chosen, shape, n_draws=6, seed=2)] == [set(d) for d in draws]
    assert null_sets(ComponentSet([Head(0, 0)]), shape, n_draws=2)[0].mask("neuron", shape).sum() == 0
