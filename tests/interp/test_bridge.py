import pytest
import torch

from interp.batching import tokenize
from interp.bridge import (
    GROUPED_SDPA,
    attention_reads_cache,
    blocks_skipped_below,
    cache_keyword,
    fastest_attention,
    keeps_logits,
    native_attention,
    skipped_by_native_attention,
)
from interp.hooks import attached_hook_count


def test_workarounds_leave_nothing_behind(tiny_model):
    with blocks_skipped_below(tiny_model, 2), attention_reads_cache(tiny_model):
        assert all("forward" in vars(b) for b in list(tiny_model.blocks)[:2])
        assert "forward" not in vars(tiny_model.blocks[2])
        assert all("forward" in vars(b.attn) for b in tiny_model.blocks)
    assert not any("forward" in vars(b) or "forward" in vars(b.attn) for b in tiny_model.blocks)


def test_skipped_blocks_resume_exactly(tiny_model):
    batch = tokenize(tiny_model, ["a short prompt", "another, longer prompt here"])
    with torch.no_grad():
        plain, cache = tiny_model.run_with_cache(batch.tokens)
        with blocks_skipped_below(tiny_model, 2):
            resumed = tiny_model(cache["blocks.2.hook_resid_pre"], start_at_layer=2, **batch.forward_kwargs())
    rows = torch.arange(len(batch))
    torch.testing.assert_close(resumed[rows, batch.answer_pos], plain[rows, batch.answer_pos], atol=1e-4, rtol=1e-4)
    assert keeps_logits(tiny_model)


@pytest.mark.parametrize("implementation", [GROUPED_SDPA, "sdpa"])
def test_native_attention_equals_the_bridges_onto_a_cache(tiny_model, implementation):
    """The Hugging Face kernels (and the grouped one) give the bridge's logits, on a padded batch and
    on tokens fed onto its key/value cache (the answer trees' use), and leave the bridge and config
    as they were."""
    hf = tiny_model.original_model
    batch = tokenize(tiny_model, ["a short prompt", "another, longer prompt here"])
    nxt = torch.tensor([[5, 6], [7, 8]])
    mask = torch.cat([batch.attention_mask, torch.ones(2, 2, dtype=batch.attention_mask.dtype)], -1)

    def run():
        with torch.no_grad(), attention_reads_cache(tiny_model):
            out = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask, use_cache=True)
            more = hf(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
        return out.logits, more.logits

    before = hf.config._attn_implementation
    bridge = run()
    with native_attention(tiny_model, implementation):
        assert all("forward" in vars(b.attn) for b in tiny_model.blocks)
        assert hf.config._attn_implementation == implementation
        native = run()
    for a, b in zip(bridge, native):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert hf.config._attn_implementation == before
    assert not any("forward" in vars(b.attn) for b in tiny_model.blocks)


def test_the_grouped_kernel_reads_each_key_value_head_once_under_a_mask(tiny_model, monkeypatch):
    """On a CPU, a masked forward of a grouped-query model (the tiny model: 4 query heads on 2
    key/value heads) runs ``enable_gqa`` on the unrepeated heads and equals Hugging Face's sdpa."""
    hf = tiny_model.original_model
    assert hf.config.num_attention_heads > hf.config.num_key_value_heads
    batch = tokenize(tiny_model, ["a short prompt", "another, longer prompt here"])
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def recording(query, key, value, **kwargs):
        masked = kwargs.get("attn_mask") is not None
        calls.append((query.shape[1], key.shape[1], kwargs.get("enable_gqa", False), masked))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)

    def run(implementation):
        calls.clear()
        with torch.no_grad(), native_attention(tiny_model, implementation):
            return hf(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits, list(calls)

    stock, stock_calls = run("sdpa")
    grouped, grouped_calls = run(GROUPED_SDPA)
    heads, kv = hf.config.num_attention_heads, hf.config.num_key_value_heads
    assert stock_calls and all(c == (heads, heads, False, True) for c in stock_calls)  # repeated heads
    assert len(grouped_calls) == len(stock_calls) and all(c == (heads, kv, True, True) for c in grouped_calls)
    torch.testing.assert_close(grouped, stock, atol=1e-6, rtol=1e-6)


def test_native_attention_hands_the_cache_over_by_the_modules_keyword(tiny_model, monkeypatch):
    """transformers before 5.2x (the GPU machine's 5.17) named the attention's cache ``past_key_values``
    and ignored a ``cache`` keyword: an attention class with that signature still gets the cache."""
    hf = tiny_model.original_model
    module = tiny_model.blocks[0].attn.original_component  # the Hugging Face attention the bridge wraps
    attention = type(module)
    batch = tokenize(tiny_model, ["a short prompt", "another, longer prompt here"])
    nxt = torch.tensor([[5, 6], [7, 8]])
    mask = torch.cat([batch.attention_mask, torch.ones(2, 2, dtype=batch.attention_mask.dtype)], -1)

    def run():
        with torch.no_grad(), attention_reads_cache(tiny_model), native_attention(tiny_model):
            out = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask, use_cache=True)
            return hf(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True).logits

    expected = run()
    current = cache_keyword(module)
    assert current == cache_keyword(hf) and current in ("cache", "past_key_values")
    original = attention.forward

    def older(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        kwargs.pop("cache", None)  # not a keyword of this signature: ignored, as the older release did
        return original(self, hidden_states, position_embeddings, attention_mask, **{current: past_key_values},
                        **kwargs)

    monkeypatch.setattr(attention, "forward", older)
    assert cache_keyword(module) == "past_key_values"
    torch.testing.assert_close(run(), expected)


def test_native_attention_is_undone_on_error(tiny_model):
    before = tiny_model.original_model.config._attn_implementation
    with pytest.raises(ValueError), native_attention(tiny_model):
        raise ValueError("inside")
    assert tiny_model.original_model.config._attn_implementation == before
    assert not any("forward" in vars(b.attn) for b in tiny_model.blocks)


def test_native_attention_fires_the_projection_mlp_and_residual_hooks_and_refuses_the_attentions_own(tiny_model):
    """Hooks at hook_z (a head zeroed), the MLP and the residual stream fire on the Hugging Face kernel
    and change its logits as they change the bridge's; a hook on a point only the bridge's attention
    runs is refused on entry and, attached inside, at the forward, with nothing left behind."""
    batch = tokenize(tiny_model, ["a short prompt", "another, longer prompt here"])
    seen = []

    def zero_head(z, hook):
        seen.append(hook.name)
        z[:, :, 1] = 0
        return z

    def scale(act, hook):
        seen.append(hook.name)
        return act * 0.5

    hooks = [("blocks.1.attn.hook_z", zero_head), ("blocks.0.mlp.hook_post", scale),
             ("blocks.2.hook_resid_pre", scale), ("blocks.0.attn.hook_q", scale)]
    with torch.no_grad(), tiny_model.hooks(fwd_hooks=hooks):
        bridge = tiny_model(batch.tokens)
        bridge_seen, seen[:] = sorted(seen), []
        assert skipped_by_native_attention(tiny_model) == []
        with native_attention(tiny_model):
            native = tiny_model(batch.tokens)
        assert sorted(seen) == bridge_seen and len(seen) == len(hooks)
    with torch.no_grad():
        plain = tiny_model(batch.tokens)
    torch.testing.assert_close(native, bridge, atol=1e-4, rtol=1e-4)
    assert (native - plain).abs().max() > 1e-2  # the hooks changed the logits

    with tiny_model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda x, hook: x)]):
        assert skipped_by_native_attention(tiny_model) == ["blocks.1.attn.hook_pattern"]
        with pytest.raises(RuntimeError, match="blocks.1.attn.hook_pattern does not fire"):
            with native_attention(tiny_model):
                pass
        with fastest_attention(tiny_model):  # the bridge's attention: the pattern hook fires
            assert not any("forward" in vars(b.attn) for b in tiny_model.blocks)
    with native_attention(tiny_model), tiny_model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", lambda x, hook: x)]):
        with pytest.raises(RuntimeError, match=r"blocks\.0\.(attn\.hook_out|hook_attn_out) does not fire"):
            tiny_model(batch.tokens)
    assert not any("forward" in vars(b.attn) for b in tiny_model.blocks)
    assert attached_hook_count(tiny_model) == 0


def test_fastest_attention_leaves_a_model_without_a_hugging_face_model_as_it_is():
    from types import SimpleNamespace

    class Legacy:  # the model protocol with no original_model, as a HookedTransformer
        cfg = tokenizer = None
        blocks = [SimpleNamespace(attn=torch.nn.Module())]
        __call__ = hooks = run_with_hooks = run_with_cache = to_tokens = lambda self, *args, **kwargs: None

    legacy = Legacy()
    with fastest_attention(legacy):
        assert "forward" not in vars(legacy.blocks[0].attn)
