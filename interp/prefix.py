"""Prompts that share a leading prefix (a system prompt, a template's text up to the name) prefilled once.

``prefill`` returns what one forward of a right-padded batch with ``use_cache=True`` returns, the
logits at each prompt's answer position and the key/value cache of every prompt position, but runs
each group's shared prefix once: rows are sorted, runs of rows whose adjacent common prefix is at
least ``min_prefix`` tokens form a group, the group's common prefix runs as one row, and the rows'
suffixes run onto copies of its cache at the positions they have in the full prompt. The group
caches are then laid side by side in the batch's own row order and width (right-padded, padding
masked by ``batch.attention_mask``), so later tokens (an answer trie, generated tokens) run onto
the result exactly as onto a plain prefill. Exact up to float rounding (other matmul shapes).

Runs the model's underlying Hugging Face module (hooks added through ``interp.hooks`` still fire:
the bridge's components are that module's). Each row keeps at least its last token in the suffix
pass, so its answer logits always come from there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from interp.batching import TokenBatch
from interp.bridge import attention_reads_cache
from interp.hooks import HookedModel


@dataclass(frozen=True)
class Prefill:
    """Answer-position logits of every prompt and the batch's key/value cache (Hugging Face ``Cache``)."""

    logits: Float[Tensor, "prompt vocab"]
    cache: object
    prefix_tokens: int  # prompt tokens computed (shared prefixes once, plus every suffix)
    plain_tokens: int  # prompt tokens a plain prefill computes (every real position of every row)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(rows: list[list[int]], min_prefix: int) -> list[tuple[list[int], int]]:
    """Groups of row numbers with the length of their common prefix (0: no shared prefix worth a
    run); every row keeps at least one token after its group's prefix."""
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    groups: list[tuple[list[int], int]] = []
    members, shared = [order[0]], len(rows[order[0]]) - 1
    for prev, i in zip(order, order[1:]):
        common = min(shared, _common(rows[prev], rows[i]), len(rows[i]) - 1)
        if common >= min_prefix:
            members.append(i)
            shared = common
        else:
            groups.append((members, shared if len(members) > 1 and shared >= min_prefix else 0))
            members, shared = [i], len(rows[i]) - 1
    groups.append((members, shared if len(members) > 1 and shared >= min_prefix else 0))
    return groups


@torch.no_grad()
def prefill(model: HookedModel, batch: TokenBatch, *, min_prefix: int = 8) -> Prefill:
    """The answer logits and key/value cache of ``batch`` (right-padded, plain causal layout), each
    shared prefix of at least ``min_prefix`` tokens computed once (see the module docstring)."""
    if batch.key_mask is not None:
        raise ValueError("prefill takes plain prompts; run packed continuations onto its cache instead")
    from transformers import DynamicCache

    hf = model.original_model
    device = next(hf.parameters()).device
    batch = batch.to(device)
    lengths = batch.lengths.tolist()
    rows = [batch.tokens[i, :n].tolist() for i, n in enumerate(lengths)]
    n, width = len(rows), batch.tokens.shape[1]
    logits: Tensor | None = None
    merged: list[list[Tensor]] | None = None  # per layer: keys, values [prompt, kv_head, pos, d_head]
    computed = 0
    with attention_reads_cache(model):
        for members, p in prefix_groups(rows, min_prefix):
            index = torch.tensor(members, device=device)
            cache = None
            if p:
                out = hf(input_ids=batch.tokens[index[:1], :p], use_cache=True)
                cache = out.past_key_values
                cache.batch_repeat_interleave(len(members))
            top = max(lengths[i] for i in members)
            suffix = batch.tokens[index, p:top]
            mask = batch.attention_mask[index, :top]
            positions = torch.arange(p, top, device=device)[None].expand(len(members), -1)
            read, at = torch.unique(batch.answer_pos[index] - p, return_inverse=True)  # unembed these only
            out = hf(input_ids=suffix, attention_mask=mask, position_ids=positions, past_key_values=cache,
                     use_cache=True, logits_to_keep=read)
            computed += p + sum(lengths[i] - p for i in members)
            last = out.logits[torch.arange(len(members), device=device), at]
            if logits is None:
                logits = last.new_zeros(n, last.shape[-1])
            logits[index] = last
            layers = out.past_key_values.layers
            if merged is None:
                merged = [[layer.keys.new_zeros(n, *layer.keys.shape[1:2], width, layer.keys.shape[-1]),
                           layer.values.new_zeros(n, *layer.values.shape[1:2], width, layer.values.shape[-1])]
                          for layer in layers]
            for (keys, values), layer in zip(merged, layers):
                keys[index, :, :top] = layer.keys
                values[index, :, :top] = layer.values
    cache = DynamicCache(config=hf.config)
    for i, (keys, values) in enumerate(merged):
        cache.update(keys, values, i)
    return Prefill(logits, cache, computed, sum(lengths))


__all__ = ["Prefill", "prefill", "prefix_groups"]
