"""The stacked-sweep engine shared by ``interp.patching`` (``patch_sweep``) and ``interp.sweeps``.

A sweep evaluates many *variants* (a component set patched or ablated) on the same prompts. Instead
of one full forward per variant:

* the unchanged forward runs once and keeps the residual stream entering each variant's lowest
  layer ``L`` (its *start layer*, ``blocks.L.hook_resid_pre``): nothing below ``L`` differs from
  it, so a variant's runs resume there (``interp.bridge.blocks_skipped_below``);
* the (variant, prompt) items of one start layer are stacked as rows of one forward, with hooks
  that make each row its own variant, microbatched to a row count from a memory budget and halved
  on out-of-memory (``Backoff``);
* for the library's metrics (those with ``logit_positions``) only the logit positions the metric
  reads are unembedded (``logits_to_keep``), and leading positions that no variant can change and
  no logit is read at (a shared prefix) can run once, the stacked rows resuming after them from
  their cached keys and values. Resuming after the prefix is checked against the plain run first;
  where it does not reproduce it, the sweep warns and runs every position;
* every forward runs on the Hugging Face attention kernels (``interp.bridge.fastest_attention``)
  when the attached hooks all fire there, as the sweeps' own do (MLP, ``hook_z``, residual stream).
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.batching import TokenBatch, microbatches
from interp.bridge import attention_reads_cache, blocks_skipped_below, fastest_attention, keeps_logits
from interp.components import ComponentSet
from interp.hooks import HookedModel, HookSpec, capturing, hooked
from interp.memory import Backoff, free_memory_bytes, row_bytes
from interp.metrics import CandidateBatch, Metric, PackedCandidateBatch

_CPU_BUDGET_BYTES = 1 << 30  # default microbatch memory budget where free memory cannot be queried
_GPU_BUDGET_FRACTION = 0.5
Item = tuple[int, int]  # (variant, prompt)


def metric_values(metric: Metric, logits: Tensor, batch: TokenBatch, n_prompts: int) -> Float[Tensor, "prompt"]:
    """``metric(logits, batch)``, checked to hold one value per prompt, detached, in float32."""
    out = metric(logits, batch)
    if not isinstance(out, Tensor) or out.shape != (n_prompts,):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the metric must return one value per prompt ({n_prompts}), got {got}")
    return out.detach().float()


@dataclass(frozen=True)
class LogitReader:
    """Which logit positions the forward computes, and the batch the metric reads them with.

    A metric with ``logit_positions(batch)`` (the library's own) reads logits only there: the model
    unembeds just those positions (``logits_to_keep``) and the batch's positions are renumbered onto
    them, the same values without unembedding every position. Any other metric gets every position.
    """

    keep: Int[Tensor, "keep"] | None = None

    @classmethod
    def for_metric(cls, model: HookedModel, metric: Metric, batch: TokenBatch) -> "LogitReader":
        positions = getattr(metric, "logit_positions", None)
        if positions is None or not keeps_logits(model):
            return cls()
        return cls(positions(batch))

    def kwargs(self, offset: int = 0) -> dict:
        """Forward keywords; ``offset``: how many leading positions the forward is not given."""
        return {} if self.keep is None else {"logits_to_keep": self.keep - offset}

    def renumber(self, batch: TokenBatch) -> TokenBatch:
        if self.keep is None:
            return batch
        moved = {"answer_pos": torch.searchsorted(self.keep, batch.answer_pos)}
        if isinstance(batch, CandidateBatch):
            moved["cand_start"] = torch.searchsorted(self.keep, batch.cand_start - 1) + 1
        if isinstance(batch, PackedCandidateBatch):
            moved["read_pos"] = torch.searchsorted(self.keep, batch.read_pos)
        return replace(batch, **moved)


def rows_per_batch(
    model: HookedModel, run: TokenBatch, reader: LogitReader, max_batch_rows: int | None,
    memory_budget_bytes: int | None,
) -> int:
    """Rows of ``run`` per forward: the memory budget over one row's estimated peak, capped at ``max_batch_rows``."""
    for name, value in (("max_batch_rows", max_batch_rows), ("memory_budget_bytes", memory_budget_bytes)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    width = run.tokens.shape[1]
    logit_positions = width if reader.keep is None else len(reader.keep)
    if memory_budget_bytes is None:
        free = free_memory_bytes(model.cfg.device)
        if max_batch_rows is not None and free is None:
            return max_batch_rows
        memory_budget_bytes = _CPU_BUDGET_BYTES if free is None else int(free * _GPU_BUDGET_FRACTION)
    rows = max(1, memory_budget_bytes // row_bytes(model.cfg, width, logit_positions))
    return min(rows, max_batch_rows) if max_batch_rows is not None else rows


def shared_prefix_length(run_target: TokenBatch, run_source: TokenBatch, reader: LogitReader) -> int:
    """Leading positions where every target row equals its source row and no logit is read.

    Source and target activations agree at these positions in every layer, and under a causal
    mask no later patch reaches them, so every patched run computes them exactly as the unpatched
    target run does. Zero when the metric may read any position.
    """
    if reader.keep is None:
        return 0
    differs = (run_target.tokens != run_source.tokens) & run_target.attention_mask.bool()
    first = torch.where(differs.any(-1), differs.int().argmax(-1), run_target.lengths)
    return int(min(int(first.min()), int(reader.keep.min())))


@dataclass(frozen=True)
class Prefix:
    """A shared prefix (its length, and its keys and values in a run of the batch's rows)."""

    length: int = 0
    cache: object = None  # a Hugging Face cache over every row

    @classmethod
    def build(cls, model: HookedModel, batch: TokenBatch, length: int, rows: int) -> "Prefix":
        if length == 0:
            return cls()
        parts = []
        with fastest_attention(model), attention_reads_cache(model):
            for part in microbatches(len(batch), rows):
                tokens = batch.tokens[part, :length]
                _, cache = model(tokens, return_type="logits_and_cache", use_cache=True, logits_to_keep=1)
                parts.append(cls(length, cache))
        return cls.joined(parts)

    @classmethod
    def joined(cls, parts: Sequence["Prefix"]) -> "Prefix":
        """One prefix over the rows of ``parts`` (of one length), in order."""
        merged = parts[0].cache
        for i, layer in enumerate(merged.layers):
            layer.keys = torch.cat([p.cache.layers[i].keys for p in parts])
            layer.values = torch.cat([p.cache.layers[i].values for p in parts])
        return cls(parts[0].length, merged)

    def kwargs(self, rows: Int[Tensor, "row"]) -> dict:
        """Forward keywords giving the prefix of cached ``rows`` as past keys and values."""
        if not self.length:
            return {}
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        return {"past_key_values": cache}


def resume(
    model: HookedModel,
    residual: Float[Tensor, "row pos d_model"],
    layer: int,
    batch: TokenBatch,
    rows: Int[Tensor, "row"],
    reader: LogitReader,
    prefix: Prefix,
    cache_rows: Int[Tensor, "row"] | None = None,
) -> Tensor:
    """Logits of ``batch``'s ``rows`` from ``residual`` entering block ``layer`` (after the prefix, if
    any, whose cached rows are ``cache_rows``, default ``rows``), lower blocks skipped."""
    layout = batch.take(rows).forward_kwargs(offset=prefix.length)
    kwargs = reader.kwargs(offset=prefix.length) | prefix.kwargs(rows if cache_rows is None else cache_rows) | layout
    with (
        fastest_attention(model),
        blocks_skipped_below(model, layer),
        attention_reads_cache(model) if prefix.length else nullcontext(),
    ):
        return model(residual, start_at_layer=layer, **kwargs)


def checked_prefix(
    model: HookedModel,
    batch: TokenBatch,
    metric: Metric,
    reader: LogitReader,
    length: int,
    layer: int,
    residual: Float[Tensor, "row pos d_model"],
    baseline: Float[Tensor, "prompt"],
    rows_per_prompt: int,
    rows: int,
) -> Prefix:
    """The shared prefix, once resuming after it reproduces the unchanged run; else no prefix.

    The check resumes the first microbatch of unchanged rows from ``layer`` (given its
    ``residual``) after the prefix and compares the metric with ``baseline``.
    """
    if length == 0:
        return Prefix()
    n_prompts = min(max(1, rows // rows_per_prompt), len(baseline))
    sample_rows = torch.arange(n_prompts * rows_per_prompt, device=residual.device)
    try:
        prefix = Prefix.build(model, batch, length, rows)
        logits = resume(model, residual[sample_rows, length:], layer, batch, sample_rows, reader, prefix)
    except (AttributeError, TypeError, ValueError, NotImplementedError, RuntimeError) as err:
        warnings.warn(
            f"cannot reuse the shared prompt prefix on this model ({err!r}); running every position",
            RuntimeWarning,
            stacklevel=3,
        )
        return Prefix()
    got = metric_values(metric, logits, reader.renumber(batch.take(sample_rows)), n_prompts)
    tolerance = 1e-3 if model.cfg.dtype == torch.float32 else 5e-2
    if not torch.allclose(got, baseline[:n_prompts], rtol=tolerance, atol=tolerance):
        warnings.warn(
            "resuming after the shared prompt prefix does not reproduce the unpatched run on this "
            "model; running every position",
            RuntimeWarning,
            stacklevel=3,
        )
        return Prefix()
    return prefix


def expanded_rows(prompts: slice, rows_per_prompt: int, device) -> Int[Tensor, "row"]:
    """The rows of ``prompts`` in a batch holding ``rows_per_prompt`` consecutive rows per prompt."""
    return torch.arange(prompts.start * rows_per_prompt, prompts.stop * rows_per_prompt, device=device)


def run_unchanged(
    model: HookedModel,
    batch: TokenBatch,
    capture: Mapping[str, Callable[[Tensor], Tensor]],
    rows_per_prompt: int,
    rows: int,
    metric: Metric | None = None,
    reader: LogitReader = LogitReader(),
) -> tuple[dict[str, Tensor], Float[Tensor, "prompt"] | None]:
    """``batch`` run as is in microbatches of ``rows``: ``capture[name](activation)`` at each named hook
    point and, given a ``metric``, its values (without one, the forward stops after the hook points)."""
    from interp.activations import stop_layer

    values = []
    n_prompts = len(batch) // rows_per_prompt
    with capturing(model, list(capture), lambda name, act: capture[name](act)) as captured, fastest_attention(model):
        for prompts in microbatches(n_prompts, max(1, rows // rows_per_prompt)):
            part = batch.take(expanded_rows(prompts, rows_per_prompt, batch.tokens.device))
            if metric is None:
                model(part.tokens, stop_at_layer=stop_layer(list(capture)), **part.forward_kwargs())
                continue
            logits = model(part.tokens, **reader.kwargs(), **part.forward_kwargs())
            values.append(metric_values(metric, logits, reader.renumber(part), prompts.stop - prompts.start))
    return captured.joined(), torch.cat(values) if values else None


def start_residuals(
    model: HookedModel, batch: TokenBatch, starts: list[int], rows_per_prompt: int, rows: int,
    metric: Metric | None = None, reader: LogitReader = LogitReader(),
) -> tuple[dict[int, Tensor], Float[Tensor, "prompt"] | None]:
    """The unchanged residual stream entering each start layer (and the metric's values, given one)."""
    capture = {f"blocks.{layer}.hook_resid_pre": torch.clone for layer in starts}
    captured, values = run_unchanged(model, batch, capture, rows_per_prompt, rows, metric, reader)
    return {layer: captured[f"blocks.{layer}.hook_resid_pre"] for layer in starts}, values


def start_layers(sets: Sequence[ComponentSet]) -> list[int]:
    """The distinct start layers (lowest layer of each set), in order."""
    return sorted({min(c.layer for c in s) for s in sets})


def items_by_start_layer(
    sets: Sequence[ComponentSet], n_prompts: int, prompt_order: Sequence[int] | None = None,
) -> dict[int, list[Item]]:
    """Every (variant, prompt) item, grouped by its variant's start layer, lowest first: variant by
    variant, or given ``prompt_order``, prompt by prompt in that order (a prompt's items together)."""
    start_of = [min(c.layer for c in s) for s in sets]
    if prompt_order is None:
        items = [(v, p) for v in range(len(sets)) for p in range(n_prompts)]
    else:
        items = [(v, int(p)) for p in prompt_order for v in range(len(sets))]
    return {layer: [(v, p) for v, p in items if start_of[v] == layer] for layer in start_layers(sets)}


# what makes the stacked rows of a part their items' variants: (part, its expanded rows) ->
# (hooks, the prefix to resume after, the prefix cache's row of each stacked row, default the rows themselves)
Setup = Callable[[list[Item], Int[Tensor, "row"]], tuple[list[HookSpec], Prefix, Int[Tensor, "row"] | None]]
# stores a part's values: (part, prompt of each item, its expanded rows, logits)
Record = Callable[[list[Item], Int[Tensor, "item"], Int[Tensor, "row"], Tensor], None]


def run_stacked(
    model: HookedModel, run: TokenBatch, by_layer: Mapping[int, list[Item]], residuals: Mapping[int, Tensor], *,
    rows_per_prompt: int, reader: LogitReader, setup: Setup, record: Record, backoff: Backoff, bar,
    trim: bool = False,
) -> None:
    """Run every (variant, prompt) item of ``by_layer`` (grouped by start layer), resumed from
    ``residuals``, the items of a layer stacked as rows of one forward: item ``i`` of a part owns
    stacked rows ``i*k .. i*k+k-1``, repeating its prompt's ``k`` expanded rows of ``run``.
    ``trim``: each forward is cut to the longest of its rows (logits of that width reach ``record``;
    for a reader of every position and no prefix)."""
    if trim and reader.keep is not None:
        raise ValueError("trimming forwards needs logits at every position")
    device = run.tokens.device
    for layer, items in by_layer.items():

        def forward(chunk: slice, layer=layer, items=items) -> None:
            part = items[chunk]
            prompt_idx = torch.tensor([p for _, p in part], device=device)
            own_rows = prompt_idx[:, None] * rows_per_prompt + torch.arange(rows_per_prompt, device=device)
            own_rows = own_rows.reshape(-1)  # the expanded rows each stacked row repeats
            hooks, prefix, cache_rows = setup(part, own_rows)
            batch, rows = run, own_rows
            if trim:  # the padding past the part's longest row reaches no real position: cut it
                if prefix.length:
                    raise ValueError("trimming forwards needs a run without a shared prefix")
                batch, rows = run.select(own_rows), torch.arange(len(own_rows), device=device)
            with hooked(model, hooks):
                residual = residuals[layer][own_rows, prefix.length : batch.tokens.shape[1]]
                logits = resume(model, residual, layer, batch, rows, reader, prefix, cache_rows)
            record(part, prompt_idx, own_rows, logits)
            bar.update(len(part))

        for _ in backoff.batches(len(items), forward):
            pass


__all__ = [
    "LogitReader", "Prefix", "checked_prefix", "expanded_rows", "items_by_start_layer", "metric_values", "resume",
    "rows_per_batch", "run_stacked", "run_unchanged", "shared_prefix_length", "start_layers", "start_residuals",
]
