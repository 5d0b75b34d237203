import pytest
import torch
import torch.nn.functional as F

from interp.ablation import ablated
from interp.batching import tokenize
from interp.components import ComponentSet, Head, Neuron
from interp.hooks import attached_hook_count
from interp.sweeps import ablation_sweep

TEXTS = ["The weather was mild all week.", "She read the letter twice", "Trains run late"]


@pytest.fixture(scope="module")
def batch(tiny_model):
    return tokenize(tiny_model, TEXTS)


def _final_logprob(batch):
    """Score: each row's log-probability of token 42 at its own last position (padding matters)."""
    def score(logits, prompts):
        rows = torch.arange(len(prompts))
        return logits[rows, batch.answer_pos[prompts]].log_softmax(-1)[:, 42]

    return score


def test_sweep_equals_one_ablated_run_per_variant(tiny_model, batch):
    variants = [Head(0, 1), Head(2, 3), Neuron(1, 5), ComponentSet([Head(1, 0), Neuron(2, 7), Neuron(1, 90)])]
    score = _final_logprob(batch)
    before = attached_hook_count(tiny_model)
    got = ablation_sweep(tiny_model, batch, variants, score, rows_per_forward=4)  # several forwards per layer
    assert got.shape == (len(variants), len(TEXTS))
    prompts = torch.arange(len(TEXTS))
    for i, variant in enumerate(variants):
        with torch.no_grad(), ablated(tiny_model, variant if isinstance(variant, ComponentSet) else [variant], "zero"):
            expected = score(tiny_model(batch.tokens), prompts)
        torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-4)
    assert attached_hook_count(tiny_model) == before
    assert not any("forward" in vars(b) for b in tiny_model.blocks)  # lower blocks restored


def test_sweep_leaves_no_hooks_after_an_error(tiny_model, batch):
    before = attached_hook_count(tiny_model)

    def broken(logits, prompts):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ablation_sweep(tiny_model, batch, [Head(1, 1)], broken)
    assert attached_hook_count(tiny_model) == before
    assert not any("forward" in vars(b) for b in tiny_model.blocks)


def test_sweep_rejects_empty_variants(tiny_model, batch):
    with pytest.raises(ValueError, match="at least one"):
        ablation_sweep(tiny_model, batch, [ComponentSet()], _final_logprob(batch))


@pytest.mark.parametrize("measure", ["kl", "perplexity"])
def test_head_utility_is_the_per_head_kl_or_perplexity_increase(tiny_model, measure):
    from circuits.evaluation import UtilityProbe, head_utility

    probe = UtilityProbe.build(tiny_model, TEXTS)
    got = head_utility(tiny_model, probe, n_texts=3, measure=measure, progress=False)
    assert got.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)
    unablated = probe.measure(tiny_model)
    for layer, head in [(0, 0), (2, 3)]:
        with ablated(tiny_model, [Head(layer, head)], "zero"):
            expected = probe.measure(tiny_model)[measure] - (unablated[measure] if measure == "perplexity" else 0)
        assert got[layer, head] == pytest.approx(expected, rel=1e-3, abs=1e-5)
    if measure == "kl":
        assert (got >= -1e-6).all() and got.max() > 0


@pytest.mark.parametrize("per_position", [False, True])
def test_mean_sweep_in_prompt_chunks_equals_one_mean_ablated_run_per_variant(tiny_model, batch, per_position):
    from interp.activations import mean_activations
    from interp.components import hook_name

    names = [hook_name(k, layer) for k in ("neuron", "head") for layer in range(tiny_model.cfg.n_layers)]
    means = mean_activations(tiny_model, batch, names, per_position=per_position)
    variants = [Head(0, 1), Neuron(2, 7), ComponentSet([Head(1, 0), Neuron(1, 90)])]
    score = _final_logprob(batch)
    got = ablation_sweep(tiny_model, batch, variants, score, means=means, rows_per_forward=4, prompts_per_pass=2)
    prompts = torch.arange(len(TEXTS))
    for i, variant in enumerate(variants):
        with torch.no_grad(), ablated(tiny_model, variant if isinstance(variant, ComponentSet) else [variant], "mean",
                                      means=means):
            expected = score(tiny_model(batch.tokens), prompts)
        torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="means lack"):
        ablation_sweep(tiny_model, batch, variants, score, means={names[0]: means[names[0]]})
