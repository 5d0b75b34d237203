import json

import pytest
import torch

from interp import load_model
from interp.ablation import Ablation, ablated, ablation_hooks, derangement, export_pruned, prune_weights
from interp.activations import mean_activations
from interp.batching import tokenize
from interp.components import ComponentSet, Head, Neuron
from interp.hooks import attached_hook_count, hooked

PROMPTS = ["The seller asked for", "Hi there", "A longer prompt about a used bicycle"]
# Layer 1: its heads run before its MLP, so an ablated neuron there never alters a head.
NEURON_HOOK, HEAD_HOOK = "blocks.1.mlp.hook_post", "blocks.1.attn.hook_z"
MIXED = ComponentSet([Neuron(1, 3), Neuron(1, 40), Neuron(2, 95), Head(1, 1), Head(1, 2), Head(2, 0)])


@pytest.fixture(scope="module")
def batch(tiny_model):
    return tokenize(tiny_model, PROMPTS)


def _record(model, tokens, hooks=(NEURON_HOOK, HEAD_HOOK)) -> dict:
    """Activations as seen by a hook attached after any ablation hook at the same point."""
    seen = {}

    def keep(name):
        return name, lambda act, hook: seen.__setitem__(name, act.detach().clone())

    with torch.no_grad(), hooked(model, [keep(name) for name in hooks]):
        seen["logits"] = model(tokens)
    return seen


@pytest.fixture(scope="module")
def clean(tiny_model, batch):
    return _record(tiny_model, batch.tokens)


def _untouched(act, clean_act, index):
    keep = torch.ones(act.shape[2], dtype=torch.bool)
    keep[index] = False
    torch.testing.assert_close(act[:, :, keep], clean_act[:, :, keep])


def test_zero_ablation_zeroes_neurons_and_heads(tiny_model, batch, clean):
    with ablated(tiny_model, MIXED, "zero"):
        seen = _record(tiny_model, batch.tokens)
    assert (seen[NEURON_HOOK][:, :, [3, 40]] == 0).all()
    assert (seen[HEAD_HOOK][:, :, [1, 2]] == 0).all()
    assert clean[NEURON_HOOK][:, :, [3, 40]].abs().sum() > 0
    _untouched(seen[HEAD_HOOK], clean[HEAD_HOOK], [1, 2])
    assert not torch.allclose(seen["logits"], clean["logits"], atol=1e-3)


def test_mean_ablation_writes_given_means(tiny_model, batch, clean):
    width = batch.tokens.shape[1]
    means = {
        NEURON_HOOK: torch.arange(96, dtype=torch.float32),
        HEAD_HOOK: torch.arange(width * 4 * 16, dtype=torch.float32).reshape(width, 4, 16),  # per position
    }
    comps = ComponentSet([Neuron(1, 3), Neuron(1, 40), Head(1, 2)])
    with ablated(tiny_model, comps, "mean", means=means):
        seen = _record(tiny_model, batch.tokens)
    assert (seen[NEURON_HOOK][:, :, 3] == 3).all() and (seen[NEURON_HOOK][:, :, 40] == 40).all()
    for row in range(len(batch)):
        torch.testing.assert_close(seen[HEAD_HOOK][row, :, 2], means[HEAD_HOOK][:, 2])
    _untouched(seen[HEAD_HOOK], clean[HEAD_HOOK], [2])


def test_mean_ablation_from_source_uses_mean_activations(tiny_model, batch):
    comps = ComponentSet([Neuron(1, 7), Head(1, 3)])
    means = mean_activations(tiny_model, batch, [NEURON_HOOK, HEAD_HOOK])
    with ablated(tiny_model, comps, "mean", source=batch):
        seen = _record(tiny_model, batch.tokens)
    torch.testing.assert_close(seen[NEURON_HOOK][:, :, 7], means[NEURON_HOOK][7].expand(batch.tokens.shape))
    torch.testing.assert_close(seen[HEAD_HOOK][1, 0, 3], means[HEAD_HOOK][3])


def test_per_position_means_shorter_than_run_raise(tiny_model, batch):
    short = mean_activations(tiny_model, batch.select([1]), [NEURON_HOOK], per_position=True)
    too_long = pytest.raises(ValueError, match="cover 3 positions but the run has")
    with too_long, ablated(tiny_model, [Neuron(1, 1)], "mean", means=short):
        tiny_model(batch.tokens)
    with pytest.raises(ValueError, match=r"has shape \(5,\); expected \[96\] or \[pos, 96\]"):
        bad = {NEURON_HOOK: torch.zeros(5)}
        ablation_hooks(tiny_model, Ablation(MIXED.of_kind("neuron"), "mean", means=bad))
    with pytest.raises(ValueError, match="means lack blocks.1.attn.hook_z"):
        ablation_hooks(tiny_model, Ablation(ComponentSet([Head(1, 0)]), "mean", means=short))


def test_resample_takes_other_prompts_activations(tiny_model, batch, clean):
    donors = derangement(len(batch), seed=3)
    assert not (donors == torch.arange(len(batch))).any()
    assert torch.equal(donors, derangement(len(batch), seed=3))
    comps = ComponentSet([Neuron(1, 5), Head(1, 1)])
    with ablated(tiny_model, comps, "resample", source=batch, seed=3):
        seen = _record(tiny_model, batch.tokens)
    for row in range(len(batch)):
        donor = int(donors[row])
        last = int(batch.lengths[donor]) - 1
        for pos in range(batch.tokens.shape[1]):
            read = min(pos, last)  # a shorter donor's last real token fills the rest
            assert seen[NEURON_HOOK][row, pos, 5] == clean[NEURON_HOOK][donor, read, 5]
            torch.testing.assert_close(seen[HEAD_HOOK][row, pos, 1], clean[HEAD_HOOK][donor, read, 1])
    _untouched(seen[HEAD_HOOK], clean[HEAD_HOOK], [1])


def test_patch_takes_counterfactual_activations(tiny_model, batch, clean):
    swapped = ["The buyer asked for", "Hi here", "A longer prompt about a used car"]
    counterfactual = tokenize(tiny_model, swapped)
    assert counterfactual.tokens.shape == batch.tokens.shape
    cf = _record(tiny_model, counterfactual.tokens)
    comps = ComponentSet([Neuron(1, 11), Head(1, 0), Head(1, 3)])
    with ablated(tiny_model, comps, "patch", source=counterfactual):
        seen = _record(tiny_model, batch.tokens)
    torch.testing.assert_close(seen[NEURON_HOOK][:, :, 11], cf[NEURON_HOOK][:, :, 11])
    torch.testing.assert_close(seen[HEAD_HOOK][:, :, [0, 3]], cf[HEAD_HOOK][:, :, [0, 3]])
    _untouched(seen[HEAD_HOOK], clean[HEAD_HOOK], [0, 3])


def test_patch_from_the_run_itself_changes_nothing(tiny_model, batch, clean):
    with ablated(tiny_model, MIXED, "patch", source=batch):
        logits = tiny_model(batch.tokens)
    torch.testing.assert_close(logits, clean["logits"])


def test_patch_shape_mismatch_is_named(tiny_model, batch):
    mismatch = pytest.raises(ValueError, match=r"patch source has 2 rows x \d+ positions but the run has 3 x")
    with mismatch, ablated(tiny_model, [Head(1, 0)], "patch", source=batch.select([0, 1])):
        tiny_model(batch.tokens)


def test_no_hook_left_after_exception(tiny_model, batch):
    before = attached_hook_count(tiny_model)
    raised = pytest.raises(RuntimeError, match="inside the block")
    with raised, ablated(tiny_model, MIXED, "resample", source=batch):
        assert attached_hook_count(tiny_model) > before
        raise RuntimeError("inside the block")
    assert attached_hook_count(tiny_model) == before


def test_gradient_flows_through_unablated_components(tiny_model, batch):
    seen = {}

    def keep(act, hook):  # attached first, so it sees the activation before the ablation
        act.retain_grad()
        seen["act"] = act

    with hooked(tiny_model, [(NEURON_HOOK, keep)]), ablated(tiny_model, [Neuron(1, 3)], "zero"):
        tiny_model(batch.tokens, stop_at_layer=3).square().sum().backward()
    tiny_model.zero_grad(set_to_none=True)
    grad = seen["act"].grad
    assert (grad[:, :, 3] == 0).all()
    assert (grad[:, :, 4:].abs().sum(-1) > 0).all()


@pytest.mark.usefixtures("unchecked")
def test_bad_requests_get_clear_errors(tiny_model, batch):
    with pytest.raises(ValueError, match="N0.96: neuron index 96 is out of range"):
        ablation_hooks(tiny_model, Ablation(ComponentSet([Neuron(0, 96)])))
    with pytest.raises(ValueError, match="H3.0: layer 3 is out of range"):
        prune_weights(tiny_model, [Head(3, 0)])
    with pytest.raises(ValueError, match="not one of"):
        Ablation(MIXED, "noise")
    with pytest.raises(ValueError, match="needs a source batch"):
        Ablation(MIXED, "patch")
    with pytest.raises(ValueError, match="mean ablation needs"):
        Ablation(MIXED, "mean")
    with pytest.raises(ValueError, match="at least 2 prompts"):
        ablation_hooks(tiny_model, Ablation(MIXED, "resample", source=batch.select([0])))


def _assert_prune_equals_zero_hook(model, components, tokens):
    with torch.no_grad():
        base = model(tokens)
        with ablated(model, components, "zero"):
            hooked_logits = model(tokens)
        with prune_weights(model, components):
            pruned = model(tokens)
    assert (hooked_logits - base).abs().max() > 1e-3  # the ablation does something
    torch.testing.assert_close(pruned, hooked_logits, rtol=0, atol=1e-4)
    return base


def test_weight_edits_equal_zero_ablation(tiny_model, batch):
    base = _assert_prune_equals_zero_hook(tiny_model, MIXED, batch.tokens)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(batch.tokens), base, rtol=0, atol=0)  # restored on exit


def test_prune_weights_permanent_until_restored(tiny_model, batch, clean):
    handle = prune_weights(tiny_model, [Head(2, 3)])
    try:
        with torch.no_grad():
            assert not torch.allclose(tiny_model(batch.tokens), clean["logits"], atol=1e-4)
    finally:
        handle.restore()
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(batch.tokens), clean["logits"], rtol=0, atol=0)


def test_export_round_trip(tiny_model, batch, clean, tmp_path):
    out = export_pruned(tiny_model, MIXED, tmp_path / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(batch.tokens), clean["logits"], rtol=0, atol=0)  # original kept
        with ablated(tiny_model, MIXED, "zero"):
            expected = tiny_model(batch.tokens)
        reloaded = load_model(out, device="cpu")
        torch.testing.assert_close(reloaded(batch.tokens), expected, rtol=0, atol=1e-4)
    listed = json.loads((out / "pruned_components.json").read_text())["components"]
    assert sorted(map(tuple, listed)) == sorted((c.kind, c.layer, c.index) for c in MIXED)


@pytest.mark.slow
def test_weight_edits_equal_zero_ablation_smollm2(smollm2):
    batch = tokenize(smollm2, ["The seller asked for", "Hi"])
    neurons = [Neuron(0, 10), Neuron(17, 1500), Neuron(29, 0)]
    components = ComponentSet([*neurons, Head(0, 8), Head(12, 4), Head(29, 1)])
    _assert_prune_equals_zero_hook(smollm2, components, batch.tokens)
