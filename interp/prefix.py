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

``GrowingCache`` holds a prefilled batch and feeds nodes onto it (one token per row and slot,
each reading its prompt, chosen cached keys and chosen slots of its own feed): the answer trees
grow on it a round at a time, shared candidates feed their whole trie at once.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from interp.batching import TokenBatch
from interp.bridge import attention_reads_cache
from interp.hooks import HookedModel
from interp.metrics import log_normalizer


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


class GrowingCache:
    """The prompts' key/value cache (``prefill``: each shared prefix computed once), grown by every
    node fed onto it (never recomputed): a node is fed its last token at the position id it would
    have right after the prompt and its ancestors, and attends to its prompt, its ancestors' keys
    and itself. ``root``: the log-probabilities at each prompt's answer position. For the Hugging
    Face attention kernels (``interp.bridge.native_attention``: nothing here needs an attention
    hook): the answer trees (``interp.numeric``) and shared candidates (``CandidateAnswers.score_prefilled``)."""

    def __init__(self, model: HookedModel, batch: TokenBatch):
        self.model, self.hf = model, model.original_model
        self.device = next(self.hf.parameters()).device
        batch = batch.to(self.device)
        filled = prefill(model, batch)  # each shared prefix (system prompt, template) once
        self.root = filled.logits.float().log_softmax(-1).cpu()
        self.cache = filled.cache
        self.keys = batch.attention_mask.bool()  # row key: which cached keys a row's nodes may read
        self.lengths = batch.lengths
        self.rows = torch.arange(len(batch))  # the batch rows still in the cache, in cache order

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these batch rows (a subset of ``self.rows``, in order) in the cache."""
        at = {int(r): i for i, r in enumerate(self.rows)}
        index = torch.tensor([at[r] for r in rows], dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.keys, self.lengths = self.keys[index], self.lengths[index]
        self.rows = torch.tensor(list(rows), dtype=torch.long)

    def feed(self, tokens: Tensor, depth: Tensor, ancestors: Tensor, read: Sequence[int],
             sees: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Feed one token per (row, slot): ``tokens``/``depth`` ``[row, slot]`` (depth 0: a dummy
        slot), ``ancestors[row, slot, key]`` the cached keys (beyond the prompt) each slot reads,
        ``sees[slot, slot]`` the slots of this feed each slot reads (default: itself only; a whole
        trie fed at once reads its ancestors here). Returns the next-token logits of the ``read``
        token ids ``[row, slot, len(read)]`` and the log-normalizers ``[row, slot]`` (float32, on
        the CPU: only these leave the device); a log-probability is their difference."""
        rows, slots = tokens.shape
        prompt = self.keys[:, None, :].expand(-1, slots, -1).clone()
        prompt[:, :, : ancestors.shape[-1]] |= ancestors.to(self.device)
        real = (depth > 0).to(self.device)
        prompt &= real[:, :, None]
        own = torch.eye(slots, dtype=torch.bool) if sees is None else sees
        own = own.to(self.device)[None].expand(rows, -1, -1)
        mask = torch.cat([prompt, own], -1)
        positions = torch.where(real, self.lengths[:, None] - 1 + depth.to(self.device), 0)
        out = self.hf(input_ids=tokens.to(self.device), attention_mask=mask[:, None], position_ids=positions,
                      past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.keys = torch.cat([self.keys, torch.zeros(rows, slots, dtype=torch.bool, device=self.device)], -1)
        logits = out.logits.float()
        return logits[..., torch.tensor(read, device=self.device)].cpu(), log_normalizer(logits).cpu()


__all__ = ["GrowingCache", "Prefill", "prefill", "prefix_groups"]
