"""Streaming activation statistics: means, per-feature norms, per-prompt means over marked positions,
attention paid to marked tokens.

Every statistic is a running float32 sum, taken by hooks that reduce each activation as it
passes through a microbatch and keep nothing else: no activation cache is ever built. Only real
(unpadded) positions of the right-padded batch count. A microbatch's reductions are added once its
forward is done: one that runs out of memory adds nothing and is retried at half the size.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.batching import TokenBatch
from interp.bridge import fastest_attention
from interp.hooks import HookedModel, capturing
from interp.memory import Backoff

_LAYER = re.compile(r"^blocks\.(\d+)\.")
_NOT_POSITIONAL = ("hook_pattern", "hook_attn_scores")  # [batch, head, query, key]


def check_hook_names(model: HookedModel, hook_names: Sequence[str]) -> list[str]:
    """The names as a list, or a clear error naming any hook the model does not have."""
    if isinstance(hook_names, str):
        hook_names = [hook_names]
    names = list(dict.fromkeys(hook_names))
    if not names:
        raise ValueError("no hook names given")
    known = model.hook_dict
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"the model has no hook point {name!r}{hint}")
    return names


def stop_layer(hook_names: Sequence[str]) -> int | None:
    """The block after the last one holding a hook, or None when a hook lies outside the blocks."""
    layers = [_LAYER.match(name) for name in hook_names]
    if not all(layers):
        return None
    return max(int(m.group(1)) for m in layers) + 1


def _positional(name: str) -> str:
    if name.endswith(_NOT_POSITIONAL):
        raise ValueError(
            f"{name} is indexed [batch, head, query, key], not [batch, pos, ...]; use "
            "attention_to_positions for attention patterns"
        )
    return name


def _stream(
    model: HookedModel,
    batch: TokenBatch,
    hook_names: Sequence[str],
    reduce: Callable[[str, Tensor, TokenBatch, slice], Callable[[], None]],
    *,
    batch_size: int,
    progress: bool,
    desc: str,
) -> None:
    """Run ``batch`` in microbatches; hand each activation at ``hook_names`` to ``reduce``.

    ``reduce(name, activation, microbatch, rows)`` sees the microbatch (trimmed to its own
    longest prompt) and the rows of ``batch`` it holds, and returns what adds its reduction to the
    running statistic; those are called once the microbatch's forward is done, so a microbatch
    that runs out of memory part-way adds nothing and is retried at half the size
    (``interp.memory.Backoff``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    stop = stop_layer(hook_names)
    device = model.cfg.device

    def run(rows: slice) -> tuple[slice, dict[str, list]]:
        mb = batch.select(rows).to(device)
        with (torch.no_grad(), capturing(model, hook_names, lambda name, act: reduce(name, act, mb, rows)) as seen,
              fastest_attention(model)):
            model(mb.tokens, stop_at_layer=stop)
        return rows, seen

    fired: set[str] = set()
    with tqdm(total=len(batch), disable=not progress, desc=desc, unit="prompt") as bar:
        for rows, seen in Backoff(batch_size, what="activation batch").batches(len(batch), run):
            for name, commits in seen.items():
                for commit in commits:
                    commit()
                if commits:
                    fired.add(name)
            bar.update(rows.stop - rows.start)
    silent = [name for name in hook_names if name not in fired]
    if silent:
        raise ValueError(f"hook points {silent} never fired in a forward pass of this model")


def _check_rows(name: str, act: Tensor, mb: TokenBatch) -> None:
    if tuple(act.shape[:2]) != tuple(mb.tokens.shape):
        raise ValueError(
            f"{name} gives activations of shape {tuple(act.shape)}, not [batch, pos, ...] = "
            f"[{mb.tokens.shape[0]}, {mb.tokens.shape[1]}, ...]"
        )


def mean_activations(
    model: HookedModel,
    batch: TokenBatch,
    hook_names: Sequence[str],
    *,
    per_position: bool = False,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Float[Tensor, "... d"]]:
    """Mean activation of each hook over prompts and their real positions.

    Returns ``[d...]`` per hook (the activation's trailing shape), or with ``per_position``
    ``[pos, d...]``, where position ``p`` is averaged over the prompts at least ``p + 1`` long.
    """
    names = [_positional(n) for n in check_hook_names(model, hook_names)]
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    width = batch.tokens.shape[1]

    def reduce(name: str, act: Tensor, mb: TokenBatch, rows: slice) -> Callable[[], None]:
        _check_rows(name, act, mb)
        mask = mb.attention_mask.to(act.device, torch.float32)
        if per_position:
            part, count = torch.einsum("bp,bp...->p...", mask, act.float()), mask.sum(0)
        else:
            part, count = torch.einsum("bp,bp...->...", mask, act.float()), mask.sum()
        # shapes taken here: the closure keeps no activation alive until the forward ends
        span, trailing = (slice(0, act.shape[1]) if per_position else ...), tuple(act.shape[2:])

        def commit() -> None:
            if name not in sums:
                lead = (width,) if per_position else ()
                sums[name] = part.new_zeros(lead + trailing)
                counts[name] = part.new_zeros(lead)
            sums[name][span] += part
            counts[name][span] += count

        return commit

    _stream(model, batch, names, reduce, batch_size=batch_size, progress=progress, desc="mean activations")
    out = {}
    for name in names:
        count = counts[name].reshape(counts[name].shape + (1,) * (sums[name].ndim - counts[name].ndim))
        out[name] = sums[name] / count
    return out


def activation_norms(
    model: HookedModel,
    batch: TokenBatch,
    hook_names: Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Float[Tensor, "... d"]]:
    """Per-feature L2 norm of each hook's activation over all real tokens of ``batch``.

    ``||x_j||_2`` over every (prompt, real position), the input-norm factor of Wanda-style
    weight scores ``|W_ij| * ||x_j||``; one value per feature, in the activation's trailing shape.
    """
    names = [_positional(n) for n in check_hook_names(model, hook_names)]
    squares: dict[str, Tensor] = {}

    def reduce(name: str, act: Tensor, mb: TokenBatch, rows: slice) -> Callable[[], None]:
        _check_rows(name, act, mb)
        mask = mb.attention_mask.to(act.device, torch.float32)
        part = torch.einsum("bp,bp...->...", mask, act.float().square())

        def commit() -> None:
            squares[name] = squares[name] + part if name in squares else part

        return commit

    _stream(model, batch, names, reduce, batch_size=batch_size, progress=progress, desc="activation norms")
    return {name: squares[name].sqrt() for name in names}


def masked_means(
    model: HookedModel,
    batch: TokenBatch,
    hook_names: Sequence[str],
    masks: Mapping[str, Bool[Tensor, "row pos"]],
    *,
    select: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, dict[str, Float[Tensor, "row ..."]]]:
    """Per prompt, the mean activation of each hook over the positions each mask marks.

    ``masks`` maps a label to a ``[batch, pos]`` mask on the batch's own grid (e.g. a word's
    tokens, or the answer position); ``select[name]`` maps the hook's ``[batch, pos, ...]``
    activation before averaging (e.g. one neuron's column), so only what is kept is summed. Returns
    ``out[name][label]`` of shape ``[batch, ...]``; a prompt with no marked position gives NaN.
    """
    names = [_positional(n) for n in check_hook_names(model, hook_names)]
    select = dict(select or {})
    checked = {}
    for label, mask in masks.items():
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(batch.tokens.shape):
            raise ValueError(f"mask {label!r} has shape {tuple(mask.shape)} but the batch's tokens are "
                             f"{tuple(batch.tokens.shape)}; mark positions on the batch's own [batch, pos] grid")
        checked[label] = mask.bool().cpu()
    out: dict[str, dict[str, Tensor]] = {name: {} for name in names}

    def reduce(name: str, act: Tensor, mb: TokenBatch, rows: slice) -> Callable[[], None]:
        _check_rows(name, act, mb)
        values = select[name](act) if name in select else act
        parts = {}
        for label, mask in checked.items():
            weights = mask[rows, : mb.tokens.shape[1]].to(values.device, torch.float32)
            part = torch.einsum("bp,bp...->b...", weights, values.float())
            parts[label] = part / weights.sum(1).reshape((-1,) + (1,) * (part.ndim - 1))  # 0/0: NaN, none marked

        def commit() -> None:
            for label, part in parts.items():
                if label not in out[name]:
                    out[name][label] = part.new_zeros((len(batch),) + tuple(part.shape[1:]))
                out[name][label][rows] = part

        return commit

    _stream(model, batch, names, reduce, batch_size=batch_size, progress=progress, desc="masked means")
    return {name: {label: values.cpu() for label, values in by_mask.items()} for name, by_mask in out.items()}


def attention_to_positions(
    model: HookedModel,
    batch: TokenBatch,
    key_mask: Bool[Tensor, "row pos"],
    *,
    query: Literal["answer", "all"] = "answer",
    batch_size: int = 32,
    progress: bool = False,
) -> Float[Tensor, "layer head"]:
    """Mean attention probability each head pays to the key positions marked in ``key_mask``.

    Per prompt, the attention mass on the marked keys is read from the answer position
    (``query="answer"``) or averaged over the prompt's real query positions (``"all"``); the
    result is the mean over prompts, from ``blocks.{L}.attn.hook_pattern``.
    """
    if query not in ("answer", "all"):
        raise ValueError(f"query must be 'answer' or 'all', got {query!r}")
    key_mask = torch.as_tensor(key_mask)
    if tuple(key_mask.shape) != tuple(batch.tokens.shape):
        raise ValueError(
            f"key_mask has shape {tuple(key_mask.shape)} but the batch's tokens are "
            f"{tuple(batch.tokens.shape)}; mark keys on the batch's own [batch, pos] grid"
        )
    key_mask = key_mask.bool().to(batch.tokens.device)
    if (key_mask & ~batch.attention_mask.bool()).any():
        raise ValueError("key_mask marks padding positions; mark only real tokens of each prompt")
    n_layers = int(model.cfg.n_layers)
    names = check_hook_names(model, [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)])
    total = torch.zeros(n_layers, int(model.cfg.n_heads), dtype=torch.float32, device=model.cfg.device)

    def reduce(name: str, pattern: Tensor, mb: TokenBatch, rows: slice) -> Callable[[], None]:
        keys = key_mask[rows, : mb.tokens.shape[1]].to(pattern.device, torch.float32)
        mass = torch.einsum("bhqk,bk->bhq", pattern.float(), keys)
        if query == "answer":
            prompt = torch.arange(mass.shape[0], device=mass.device)
            per_prompt = mass[prompt, :, mb.answer_pos.to(mass.device)]
        else:
            queries = mb.attention_mask.to(mass.device, torch.float32)
            per_prompt = torch.einsum("bhq,bq->bh", mass, queries) / queries.sum(-1, keepdim=True)
        part = per_prompt.sum(0).to(total.device)
        return lambda: total[int(_LAYER.match(name).group(1))].add_(part)

    _stream(model, batch, names, reduce, batch_size=batch_size, progress=progress, desc="attention to keys")
    return total / len(batch)
