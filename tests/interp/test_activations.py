import pytest
import torch

from interp.activations import activation_norms, attention_to_positions, masked_means, mean_activations
from interp.batching import tokenize

PROMPTS = ["The seller asked for", "Hi", "A much longer prompt about buying a used bicycle from"]
HOOKS = ["blocks.0.mlp.hook_post", "blocks.1.attn.hook_z", "blocks.2.hook_resid_pre"]


@pytest.fixture(scope="module")
def batch(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    assert len(set(batch.lengths.tolist())) == 3  # padding present
    return batch


@pytest.fixture(scope="module")
def cache(tiny_model, batch):
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(batch.tokens)
    return {name: cache[name] for name in HOOKS} | {
        f"blocks.{layer}.attn.hook_pattern": cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(3)
    }


def _real(batch):
    return batch.attention_mask.bool()


def test_mean_over_real_positions(tiny_model, batch, cache):
    means = mean_activations(tiny_model, batch, HOOKS, batch_size=2)
    for name in HOOKS:
        expected = cache[name][_real(batch)].mean(0)
        torch.testing.assert_close(means[name], expected, rtol=1e-5, atol=1e-5)
        with_pads = cache[name].flatten(0, 1).mean(0)
        assert not torch.allclose(means[name], with_pads, atol=1e-3)  # pads were really left out


def test_mean_per_position_over_prompts_that_have_it(tiny_model, batch, cache):
    means = mean_activations(tiny_model, batch, HOOKS, per_position=True, batch_size=2)
    real = _real(batch)
    for name in HOOKS:
        act = cache[name]
        assert means[name].shape == act.shape[1:]
        for pos in range(act.shape[1]):
            expected = act[real[:, pos], pos].mean(0)
            torch.testing.assert_close(means[name][pos], expected, rtol=1e-5, atol=1e-5)


def test_activation_norms_over_real_tokens(tiny_model, batch, cache):
    norms = activation_norms(tiny_model, batch, HOOKS[:2], batch_size=1)
    for name, norm in norms.items():
        expected = cache[name][_real(batch)].norm(dim=0)
        torch.testing.assert_close(norm, expected, rtol=1e-5, atol=1e-5)


def _marked_keys(batch):
    key_mask = torch.zeros_like(batch.tokens, dtype=torch.bool)
    key_mask[:, 1] = True  # the first token after BOS, in every prompt
    key_mask[2, 3:5] = True
    return key_mask


def test_attention_to_positions_from_answer(tiny_model, batch, cache):
    key_mask = _marked_keys(batch)
    got = attention_to_positions(tiny_model, batch, key_mask, query="answer", batch_size=2)
    expected = torch.zeros(3, 4)
    for layer in range(3):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # batch head query key
        for row in range(len(batch)):
            at_answer = pattern[row, :, batch.answer_pos[row]]
            expected[layer] += at_answer[:, key_mask[row]].sum(-1) / len(batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_attention_to_positions_over_real_queries(tiny_model, batch, cache):
    key_mask = _marked_keys(batch)
    got = attention_to_positions(tiny_model, batch, key_mask, query="all", batch_size=3)
    expected = torch.zeros(3, 4)
    for layer in range(3):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        for row in range(len(batch)):
            n = int(batch.lengths[row])
            to_keys = pattern[row, :, :n][:, :, key_mask[row]].sum(-1)  # head query
            expected[layer] += to_keys.mean(-1) / len(batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_masked_means_per_prompt(tiny_model, batch, cache):
    keys = _marked_keys(batch)
    answer = torch.zeros_like(keys)
    answer[torch.arange(len(batch)), batch.answer_pos] = True
    nothing = torch.zeros_like(keys)
    hooks = HOOKS[:2]
    select = {HOOKS[0]: lambda act: act[..., 5]}  # one neuron
    got = masked_means(tiny_model, batch, hooks, {"keys": keys, "answer": answer, "none": nothing},
                       select=select, batch_size=2)
    for row in range(len(batch)):
        neuron = cache[HOOKS[0]][row, :, 5]
        torch.testing.assert_close(got[HOOKS[0]]["keys"][row], neuron[keys[row]].mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[HOOKS[0]]["answer"][row], neuron[batch.answer_pos[row]], rtol=1e-5, atol=1e-6)
        z = cache[HOOKS[1]][row]  # pos head d_head
        torch.testing.assert_close(got[HOOKS[1]]["keys"][row], z[keys[row]].mean(0), rtol=1e-5, atol=1e-6)
    assert got[HOOKS[1]]["keys"].shape == (3, 4, 16)
    assert got[HOOKS[0]]["none"].isnan().all()
    with pytest.raises(ValueError, match="mask 'short' has shape"):
        masked_means(tiny_model, batch, hooks, {"short": torch.ones(3, 2, dtype=torch.bool)})


@pytest.mark.usefixtures("unchecked")
def test_bad_inputs_get_clear_errors(tiny_model, batch):
    with pytest.raises(ValueError, match="no hook point 'blocks.0.mlp.hook_pots'"):
        mean_activations(tiny_model, batch, ["blocks.0.mlp.hook_pots"])
    with pytest.raises(ValueError, match="attention_to_positions"):
        mean_activations(tiny_model, batch, ["blocks.0.attn.hook_pattern"])
    with pytest.raises(ValueError, match="batch_size"):
        activation_norms(tiny_model, batch, HOOKS[:1], batch_size=0)
    with pytest.raises(ValueError, match="key_mask has shape"):
        attention_to_positions(tiny_model, batch, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding"):
        attention_to_positions(tiny_model, batch, torch.ones_like(batch.tokens, dtype=torch.bool))
    with pytest.raises(ValueError, match="query must be"):
        attention_to_positions(tiny_model, batch, _marked_keys(batch), query="last")


def test_a_microbatch_that_runs_out_of_memory_part_way_adds_nothing_and_is_retried_smaller(tiny_model, batch,
                                                                                           monkeypatch):
    """Out of memory in block 2, after blocks 0 and 1 reduced their activations: same statistics, said once."""
    import warnings

    keys = _marked_keys(batch)
    runs = {
        "mean": lambda: mean_activations(tiny_model, batch, HOOKS, batch_size=3),
        "per position": lambda: mean_activations(tiny_model, batch, HOOKS, per_position=True, batch_size=3),
        "norms": lambda: activation_norms(tiny_model, batch, HOOKS, batch_size=3),
        "masked": lambda: masked_means(tiny_model, batch, HOOKS, {"keys": keys}, batch_size=3),
        "attention": lambda: attention_to_positions(tiny_model, batch, keys, query="all", batch_size=3),
    }
    reference = {label: run() for label, run in runs.items()}
    block = tiny_model.blocks[2]
    real_forward = block.forward

    def small_memory(*args, **kwargs):
        rows = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).shape[0]
        if rows > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_forward(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setitem(vars(block), "forward", small_memory)
        for label, run in runs.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                shrunk = run()
            assert sum("out of memory at activation batch size" in str(w.message) for w in caught) == 1, label
            torch.testing.assert_close(shrunk, reference[label], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, label=label: f"{label}: {m}")
