import pytest
import torch

from circuits.pruning import (
    STRATEGIES,
    Strategy,
    common,
    fasp,
    random_layer_masks,
    random_set,
    select,
    shape_of_scores,
    top_k_heads,
    top_k_mixed,
    top_k_neurons,
    wanda_set_difference,
    weight_magnitude_scores,
)
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


@pytest.mark.usefixtures("unchecked")
def test_top_k_mixed_raw_and_zscore():
    # Raw: neuron scores are larger in unit, so neurons win.
    assert top_k_mixed(SCORES, 1) == ComponentSet([Neuron(1, 2)])
    # z-scores: N1.2 = (6 - 3.5) / sqrt(35/12) = 1.46; H0.1 = (0.5 - 0.275) / sqrt(0.021875) = 1.52.
    assert top_k_mixed(SCORES, 1, normalize="zscore") == ComponentSet([Head(0, 1)])
    assert top_k_mixed(SCORES, 2, normalize="zscore") == ComponentSet([Head(0, 1), Neuron(1, 2)])
    with pytest.raises(ValueError, match="normalize must be one of"):
        top_k_mixed(SCORES, 1, normalize="rank")


# Hand-worked FASP example: 2 layers x 3 heads, N = 6.
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


def test_strategy_dispatch_matches_the_functions():
    assert select(Strategy("top_k_neurons", k=2), SCORES) == top_k_neurons(SCORES, 2)
    assert select(Strategy("top_k_heads", k=1), SCORES) == top_k_heads(SCORES, 1)
    mixed = Strategy("top_k_mixed", k=2, normalize="zscore")
    assert select(mixed, SCORES) == top_k_mixed(SCORES, 2, normalize="zscore")
    utility = {"head": FASP_UTILITY}
    fasp_strategy = Strategy("fasp", gamma=0.5, alpha=0.34)
    assert select(fasp_strategy, {"head": FASP_BIAS}, utility=utility) == ComponentSet([Head(1, 0), Head(0, 1)])
    assert fasp_strategy.label == "fasp(gamma=0.5, alpha=0.34)"
    random = select(Strategy("random", kind="neuron", seed=4), SCORES, like=ComponentSet([Neuron(1, 0)]))
    assert len(random) == 1 and next(iter(random)).layer == 1
    wanda = Strategy("wanda_difference", top_fraction=0.34)
    expected = wanda_set_difference(NEURONS, -NEURONS, top_fraction=0.34)
    assert select(wanda, SCORES, contrast={"neuron": -NEURONS}) == expected


@pytest.mark.usefixtures("unchecked")
def test_strategy_errors_are_clear():
    known = ", ".join(STRATEGIES)
    with pytest.raises(ValueError, match=f"unknown pruning strategy 'magic'; known strategies: {known}"):
        Strategy("magic")
    with pytest.raises(ValueError, match="needs k >= 0"):
        Strategy("top_k_heads")
    with pytest.raises(ValueError, match="kind must be one of"):
        Strategy("random", k=1, kind="mlp")
    with pytest.raises(ValueError, match="needs utility="):
        select(Strategy("fasp"), {"head": FASP_BIAS})
    with pytest.raises(ValueError, match="needs contrast="):
        select(Strategy("wanda_difference"), SCORES)


def test_null_sets_keep_per_layer_neuron_counts_and_head_count():
    from circuits.pruning import null_sets
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
