"""Tokenization of variable-length prompts into right-padded batches, and microbatching.

Prompts are right-padded: under a causal mask no real token attends to a pad that follows it, so
every real position computes exactly what it would unpadded. Each prompt's answer position (the
last prompt token, whose next-token logits are read) is recorded per prompt, never assumed.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interp.hooks import HookedModel


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded token ids with their mask and per-prompt answer positions.

    A batch may carry its own layout: ``position_ids`` and ``key_mask`` (which keys each query
    position attends to) for rows that pack several continuations of one prompt side by side.
    Run such a batch as ``model(batch.tokens, **batch.forward_kwargs())``; for a plain causal
    batch the keywords are empty.
    """

    tokens: Int[Tensor, "row pos"]
    attention_mask: Int[Tensor, "row pos"]
    answer_pos: Int[Tensor, "row"]
    position_ids: Int[Tensor, "row pos"] | None = None  # None: 0, 1, 2, ... in every row
    key_mask: Bool[Tensor, "row pos key"] | None = None  # None: causal

    def forward_kwargs(self, offset: int = 0) -> dict:
        """Forward keywords for ``tokens[:, offset:]`` (earlier positions given as a key/value cache)."""
        if self.key_mask is None:
            return {}
        return {"attention_mask": self.key_mask[:, None, offset:, :], "position_ids": self.position_ids[:, offset:]}

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def lengths(self) -> Int[Tensor, "row"]:
        return self.attention_mask.sum(-1)

    def to(self, device: torch.device | str) -> "TokenBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in moved.items() if isinstance(v, Tensor)})

    def take(self, rows: Int[Tensor, "row"]) -> "TokenBatch":
        """``rows`` of this batch (any subclass), every per-row field indexed, the width kept."""
        n = len(self)
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) and value.ndim and value.shape[0] == n:
                changes[f.name] = value[rows.to(value.device)]
        return replace(self, **changes)

    def select(self, index: slice | Tensor | Sequence[int]) -> "TokenBatch":
        """The rows at ``index`` (slice, row numbers or boolean mask), trimmed to their longest prompt."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, device=self.tokens.device)
            index = index.nonzero().flatten() if index.dtype == torch.bool else index.long()
        mask = self.attention_mask[index]
        width = int(mask.sum(-1).max()) if mask.numel() else 0
        return TokenBatch(
            self.tokens[index, :width],
            mask[:, :width],
            self.answer_pos[index],
            None if self.position_ids is None else self.position_ids[index, :width],
            None if self.key_mask is None else self.key_mask[index, :width, :width],
        )


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def encode(model: HookedModel, text: str, *, prepend_bos: bool | None = None) -> list[int]:
    """Token ids of ``text``; a BOS is prepended per the model's default unless already there."""
    tokenizer = model.tokenizer
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if prepend_bos is None:
        prepend_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def pad_ids(sequences: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """Right-pad token id lists into a batch; answer position = each sequence's last token."""
    if not sequences:
        raise ValueError("cannot build a batch from zero prompts")
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty after tokenization")
    width = max(lengths)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return TokenBatch(tokens, mask, torch.tensor(lengths, dtype=torch.long) - 1)


def tokenize(model: HookedModel, prompts: str | Sequence[str], *, prepend_bos: bool | None = None) -> TokenBatch:
    """Tokenize prompts into a right-padded batch on the model's device."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = [encode(model, p, prepend_bos=prepend_bos) for p in prompts]
    return pad_ids(ids, pad_token_id(model.tokenizer)).to(model.cfg.device)


def microbatches(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size`` items."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
