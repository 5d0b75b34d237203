"""Batched sampling with the underlying Hugging Face model and its key/value cache (no hooks of its own).

``generate`` runs ``generate`` on the bridge's Hugging Face model (``model.original_model``), batched
over left-padded prompts. Each batch holds a few prompts, each repeated for its samples: the prompts
are read once (all but their last token, "prefill"), the cache is repeated per sample, and
``generate`` continues from it (inside ``interp.bridge.attention_reads_cache``, without which the
bridge's attention drops the cache). Hooks attached to the bridge (an ablation context, say) still
act, since the bridge's hook points wrap the Hugging Face modules. Sampling is plain: temperature
scaling only, no top-k/top-p truncation. Each batch is seeded from ``(seed, first prompt, first
sample)`` under a forked torch RNG, so the result is deterministic for given arguments
(``batch_size`` included) and leaves the global RNG alone.

A row stops at a special token (end of sequence / end of turn, not kept in the text), at the first
newline after some non-blank text (the text is cut there), or after ``max_new_tokens`` tokens.
Beside each reply's text, ``token_ids`` keeps its generated tokens up to and including the token that
stopped it (a special token, or the one holding the newline); a reply cut by ``max_new_tokens``
keeps all of them. So a reply can be read token by token, as a deterministic metric reads answers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from interp.batching import encode, pad_token_id
from interp.bridge import attention_reads_cache, cache_keyword
from interp.hooks import HookedModel


@dataclass(frozen=True)
class Replies:
    """``texts[p][s]``: sample ``s`` of prompt ``p``; ``token_ids[p][s]``: its generated tokens (see the
    module docstring); ``settings``: what decides the draws (samples, temperature, length, seed)."""

    texts: tuple[tuple[str, ...], ...]
    token_ids: tuple[tuple[tuple[int, ...], ...], ...]
    settings: dict


class _LineEnded(StoppingCriteria):
    """Stops a row once its reply holds a newline after some non-blank text."""

    def __init__(self, tokenizer, start: int):
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: Int[Tensor, "row pos"], scores, **kwargs) -> Bool[Tensor, "row"]:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], device=input_ids.device)


def reply_ids(tokenizer, new_ids: Sequence[int], stop_ids: set[int]) -> tuple[int, ...]:
    """A generated row's tokens up to and including the one that stopped it: the first stop token or
    the first token completing a newline after some non-blank text (all of them if neither)."""
    ids = [int(t) for t in new_ids]
    for i, t in enumerate(ids):
        if t in stop_ids:
            return tuple(ids[: i + 1])
        if "\n" in tokenizer.decode(ids[: i + 1]).lstrip():
            return tuple(ids[: i + 1])
    return tuple(ids)


def reply_text(tokenizer, new_ids: Sequence[int], stop_ids: set[int]) -> str:
    """The reply of one generated row: its tokens up to the first stop token, decoded, cut at the first
    newline after some non-blank text."""
    ids = list(new_ids)
    end = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    text = tokenizer.decode(ids[:end])
    body = text.lstrip()
    return text[: len(text) - len(body) + body.index("\n")] if "\n" in body else text


def _batch_seed(seed: int, prompt: int, sample: int) -> int:
    state = np.random.SeedSequence([seed, prompt, sample]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


@torch.no_grad()
def _generate_batch(
    hf, prompt_ids: Sequence[list[int]], n_samples: int, *, pad_id: int, config: GenerationConfig,
    stopping: StoppingCriteriaList | None = None,
) -> Int[Tensor, "row new"]:
    """``n_samples`` continuations of each prompt (rows prompt-major): prefill the left-padded prompts
    once, repeat their cache per sample, then ``generate`` on."""
    device = hf.device
    width = max(len(ids) for ids in prompt_ids)
    tokens = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    kwargs = {}
    if width > 1:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prefill = hf(input_ids=tokens[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                     use_cache=True)
        prefill.past_key_values.batch_repeat_interleave(n_samples)
        kwargs[cache_keyword(hf)] = prefill.past_key_values
    out = hf.generate(input_ids=tokens.repeat_interleave(n_samples, 0),
                      attention_mask=mask.repeat_interleave(n_samples, 0), generation_config=config,
                      stopping_criteria=stopping, **kwargs)
    return out[:, width:].cpu()


def generate(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    n_samples: int = 10,
    temperature: float = 0.6,
    max_new_tokens: int = 12,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> Replies:
    """Sample ``n_samples`` replies per prompt with the KV-cached ``generate`` of the underlying model.

    ``prompts`` are fed verbatim (a chat template and an answer prefix included, if present); a BOS
    is prepended per the model's default. ``temperature=0`` is greedy decoding. ``batch_size``
    counts rows (prompt x sample) per ``generate`` call: ``batch_size // n_samples`` prompts with
    all their samples, or one prompt's samples in chunks of ``batch_size``.
    """
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("prompts must be a non-empty sequence of strings (wrap a single prompt in a list)")
    if n_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"n_samples, max_new_tokens and batch_size must be >= 1; got {n_samples}, "
                         f"{max_new_tokens}, {batch_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    hf = getattr(model, "original_model", None)
    if hf is None or not hasattr(hf, "generate"):
        raise ValueError(f"sampling needs the model's Hugging Face model as .original_model (a bridge from "
                         f"interp.load_model); {type(model).__name__} has none")
    encoded = [encode(model, p) for p in prompts]
    longest = max(len(ids) for ids in encoded)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and longest + max_new_tokens > n_ctx:
        raise ValueError(f"the longest prompt has {longest} tokens; with max_new_tokens={max_new_tokens} it "
                         f"exceeds the model's context of {n_ctx}; shorten the prompt or generate fewer tokens")
    tokenizer = model.tokenizer
    stop_ids = (set(tokenizer.all_special_ids) | {tokenizer.eos_token_id}) - {None}
    pad_id = pad_token_id(tokenizer)
    config = GenerationConfig(
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_k=0, top_p=1.0,
        max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids), pad_token_id=pad_id, use_cache=True)
    per_batch, chunk = max(1, batch_size // n_samples), min(n_samples, batch_size)
    batches = [(p, s) for p in range(0, len(prompts), per_batch) for s in range(0, n_samples, chunk)]
    texts: list[list[str]] = [[] for _ in prompts]
    kept: list[list[tuple[int, ...]]] = [[] for _ in prompts]
    device = torch.device(hf.device)
    for p, s in tqdm(batches, desc="sampling", disable=not progress):
        chosen = range(p, min(p + per_batch, len(prompts)))
        n = min(chunk, n_samples - s)
        stopping = StoppingCriteriaList([_LineEnded(tokenizer, max(len(encoded[i]) for i in chosen))])
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with rng, attention_reads_cache(model):
            torch.manual_seed(_batch_seed(seed, p, s))
            new = _generate_batch(hf, [encoded[i] for i in chosen], n, pad_id=pad_id, config=config,
                                  stopping=stopping)
        for row, ids in enumerate(new.tolist()):
            texts[chosen[row // n]].append(reply_text(tokenizer, ids, stop_ids))
            kept[chosen[row // n]].append(reply_ids(tokenizer, ids, stop_ids))
    settings = {"n_samples": n_samples, "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}
    return Replies(tuple(tuple(row) for row in texts), tuple(tuple(row) for row in kept), settings)


__all__ = ["Replies", "generate", "reply_ids", "reply_text"]
