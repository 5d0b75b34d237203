"""Shared-prefix prefill equals a plain prefill: answer logits and the cache later tokens run onto."""
import pytest
import torch

from interp.batching import pad_ids, pad_token_id
from interp.bridge import attention_reads_cache
from interp.prefix import prefill, prefix_groups


def prompts(tiny_model):
    """Two templates sharing a 'system prompt', names of different token lengths, one unrelated prompt."""
    system = list(range(200, 212))
    template_a, template_b = [300, 301, 302], [400, 401]
    names = [[500], [501, 502], [503, 504, 505]]
    rows = [system + template_a + name + [600, 601 + i] for i, name in enumerate(names)]
    rows += [system + template_b + name + [700] * (i + 1) for i, name in enumerate(names)]
    rows.append([900, 901, 902, 903, 904])
    return pad_ids(rows, pad_token_id(tiny_model.tokenizer))


def test_groups_share_the_longest_common_prefix():
    rows = [[1, 2, 3, 4, 9], [1, 2, 3, 5], [1, 2, 3, 4, 8], [7, 7]]
    assert sorted((sorted(m), p) for m, p in prefix_groups(rows, min_prefix=2)) == [([0, 1, 2], 3), ([3], 0)]
    assert sorted((sorted(m), p) for m, p in prefix_groups(rows, min_prefix=4)) == [([0, 2], 4), ([1], 0), ([3], 0)]
    # every row keeps a token after the prefix, even a row that is another's prefix
    assert prefix_groups([[1, 2, 3], [1, 2, 3, 4]], min_prefix=1) == [([0, 1], 2)]


def test_prefill_equals_a_plain_forward_and_continues_the_same(tiny_model):
    batch = prompts(tiny_model)
    hf = tiny_model.original_model
    with torch.no_grad(), attention_reads_cache(tiny_model):
        plain = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask, use_cache=True)
    rows = torch.arange(len(batch))
    shared = prefill(tiny_model, batch, min_prefix=4)
    torch.testing.assert_close(shared.logits, plain.logits[rows, batch.answer_pos], atol=1e-5, rtol=1e-4)
    assert shared.prefix_tokens < shared.plain_tokens  # the shared prefixes ran once
    # one more token per row, at its own next position, onto each cache
    nxt = torch.tensor([[11 + i] for i in range(len(batch))])
    mask = torch.cat([batch.attention_mask, torch.ones(len(batch), 1, dtype=batch.attention_mask.dtype)], -1)
    after = []
    for cache in (plain.past_key_values, shared.cache):
        with torch.no_grad(), attention_reads_cache(tiny_model):
            out = hf(input_ids=nxt, attention_mask=mask, position_ids=batch.lengths[:, None], past_key_values=cache)
        after.append(out.logits[:, 0])
    torch.testing.assert_close(after[1], after[0], atol=1e-5, rtol=1e-4)


def test_prefill_refuses_packed_layouts(tiny_model):
    from dataclasses import replace

    batch = prompts(tiny_model)
    width = batch.tokens.shape[1]
    packed = replace(batch, key_mask=torch.ones(len(batch), width, width, dtype=torch.bool),
                     position_ids=torch.zeros_like(batch.tokens))
    with pytest.raises(ValueError, match="plain prompts"):
        prefill(tiny_model, packed)
