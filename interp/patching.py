"""Batched exact activation patching: many variants per forward, the unpatched prefix computed once.

``patch_sweep`` runs the target prompts once per *variant* (one component, or a set of them) with
that variant's activations replaced by their values on the row-aligned source prompts, and
returns the metric per variant per prompt. Instead of one full forward per variant:

* variants are stacked along the batch: a forward holds ``variant x prompt`` rows, microbatched
  to ``max_batch_rows`` or a memory budget (halving and retrying on out-of-memory);
* a variant's lowest layer ``L`` is its *start layer*: everything below ``L`` is the unpatched
  target run, so the target's residual entering block ``L`` (``blocks.L.hook_resid_pre``) is
  cached once and only blocks ``>= L`` run for that layer's variants;
* the source activations come from one no-grad forward that keeps only the patched units;
* for the library's metrics, only the logit positions the metric reads are unembedded, and the
  leading positions where target and source agree (and no logit is read) are run once: no patch
  can change them, so the patched runs start after them, attending to their cached keys/values.
* under ``torch.distributed`` (world size > 1) each rank runs a contiguous block of the sweep's
  (variant, prompt) items and the values are summed over ranks, so every rank returns the full
  result; the unpatched target and source runs are repeated on every rank.

Skipping the lower blocks. ``TransformerBridge``'s ``start_at_layer`` feeds the residual to the
Hugging Face model as ``inputs_embeds`` and makes block ``L`` swap it in for its own input, but it
still executes blocks ``0..L-1`` and discards their output. For the duration of each call those
blocks are given a pass-through ``forward`` (an instance attribute, removed afterwards, also on
error). This is exact: block ``L`` replaces whatever reaches it with the cached residual, and the
rotary position embeddings and causal masks are still built by the model from the sequence
length, per layer type (sliding-window layers included), exactly as in a full forward.

Reusing the shared prefix relies on the bridge's key/value cache, which under transformers 5 needs
a keyword renamed for the attention bridges (see ``_attention_reads_cache``). Before a sweep uses
it, resuming the unpatched target after the prefix is checked against the plain run; where that
fails the sweep warns and runs every position.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.batching import TokenBatch, microbatches
from interp.components import KINDS, Component, ComponentSet, ComponentShape, Kind
from interp.distributed import Shard, all_reduce_sum, current_shard
from interp.hooks import HookSpec, hooked
from interp.memory import Backoff, free_memory_bytes
from interp.metrics import (
    CandidateAnswers,
    CandidateBatch,
    ExpectedValue,
    LogitDiff,
    Metric,
    PackedCandidateBatch,
    TokenSetProb,
)
from interp.results import SavedResult

Variant = Component | ComponentSet
_CPU_BUDGET_BYTES = 1 << 30  # default microbatch memory budget where free memory cannot be queried
_GPU_BUDGET_FRACTION = 0.5


# -- the result ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchingResult(SavedResult):
    """The metric of every variant on every prompt, with the unpatched target and source values."""

    RESULT = "PatchingResult"

    values: Float[Tensor, "variant prompt"]
    baseline: Float[Tensor, "prompt"]
    source_values: Float[Tensor, "prompt"]
    variants: list[ComponentSet]
    shape: ComponentShape | None = None  # the model's component counts, for full layer grids

    def __post_init__(self):
        n_variant, n_prompt = self.values.shape
        if n_variant != len(self.variants):
            raise ValueError(f"values has {n_variant} rows but there are {len(self.variants)} variants")
        if self.baseline.shape != (n_prompt,) or self.source_values.shape != (n_prompt,):
            raise ValueError(
                f"baseline {tuple(self.baseline.shape)} and source_values {tuple(self.source_values.shape)} "
                f"must both have one value per prompt ({n_prompt})"
            )

    @property
    def effects(self) -> Float[Tensor, "variant prompt"]:
        """Patched minus unpatched target metric."""
        return self.values - self.baseline

    @property
    def labels(self) -> list[str]:
        return [variant_label(v) for v in self.variants]

    def to_dataframe(self) -> pd.DataFrame:
        """Long form, one row per (variant, prompt).

        Columns: ``variant`` (position in ``variants``), ``label``, ``kind`` (``neuron``, ``head``
        or ``mixed``), ``layer`` (when all the variant's components share one), ``index`` (for a
        single component), ``prompt``, ``value``, ``effect``.
        """
        n_variant, n_prompt = self.values.shape
        described = pd.DataFrame(
            [_describe(v) for v in self.variants], columns=["label", "kind", "layer", "index"]
        ).astype({"label": str, "kind": str, "layer": "Int64", "index": "Int64"})
        frame = described.loc[np.repeat(np.arange(n_variant), n_prompt)].reset_index(drop=True)
        frame.insert(0, "variant", np.repeat(np.arange(n_variant), n_prompt))
        frame["prompt"] = np.tile(np.arange(n_prompt), n_variant)
        frame["value"] = self.values.numpy().reshape(-1)
        frame["effect"] = self.effects.numpy().reshape(-1)
        return frame

    def as_layer_grid(self, kind: Kind) -> Float[Tensor, "layer index"]:
        """Mean effect over prompts of each single-``kind``-component variant, as ``[layer, index]``.

        Components that were not swept are NaN. Multi-component variants are left out.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        singles = [(i, next(iter(v))) for i, v in enumerate(self.variants) if len(v) == 1]
        singles = [(i, c) for i, c in singles if c.kind == kind]
        if not singles:
            raise ValueError(f"this result has no single-{kind} variants to lay out as a grid")
        if self.shape is not None:
            grid_shape = (self.shape.n_layers, self.shape.per_layer(kind))
        else:
            grid_shape = (max(c.layer for _, c in singles) + 1, max(c.index for _, c in singles) + 1)
        grid = torch.full(grid_shape, float("nan"))
        rows = torch.tensor([i for i, _ in singles])
        layers = torch.tensor([c.layer for _, c in singles])
        indices = torch.tensor([c.index for _, c in singles])
        grid[layers, indices] = self.effects[rows].mean(-1)
        return grid

    def _tables(self) -> dict[str, pd.DataFrame]:
        n_variant, n_prompt = self.values.shape
        values = pd.DataFrame({"variant": np.repeat(np.arange(n_variant), n_prompt),
                               "prompt": np.tile(np.arange(n_prompt), n_variant),
                               "value": self.values.numpy().reshape(-1)})
        prompts = pd.DataFrame({"prompt": np.arange(n_prompt), "baseline": self.baseline.numpy(),
                                "source_value": self.source_values.numpy()})
        components = [(i, c.kind, c.layer, c.index) for i, variant in enumerate(self.variants) for c in variant]
        variants = pd.DataFrame(components, columns=["variant", "kind", "layer", "index"])
        return {"values": values, "prompts": prompts, "variants": variants}

    def _settings(self) -> dict:
        n_variant, n_prompt = self.values.shape
        shape = None if self.shape is None else vars(self.shape)
        return {"n_variants": n_variant, "n_prompts": n_prompt, "shape": shape}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> "PatchingResult":
        n_variant, n_prompt = settings["n_variants"], settings["n_prompts"]
        values = tables["values"].sort_values(["variant", "prompt"])
        prompts = tables["prompts"].sort_values("prompt")
        grouped = {v: ComponentSet.from_dataframe(rows) for v, rows in tables["variants"].groupby("variant")}
        return cls(
            values=torch.from_numpy(values["value"].to_numpy().reshape(n_variant, n_prompt).copy()),
            baseline=torch.from_numpy(prompts["baseline"].to_numpy().copy()),
            source_values=torch.from_numpy(prompts["source_value"].to_numpy().copy()),
            variants=[grouped[v] for v in range(n_variant)],
            shape=None if settings["shape"] is None else ComponentShape(**settings["shape"]),
        )


def variant_label(variant: ComponentSet) -> str:
    """``H3.2`` for one component, ``H3.2+N4.17`` for a set."""
    return "+".join(str(c) for c in variant)


def _describe(variant: ComponentSet) -> tuple[str, str, int | None, int | None]:
    kinds = {c.kind for c in variant}
    layers = {c.layer for c in variant}
    return (
        variant_label(variant),
        kinds.pop() if len(kinds) == 1 else "mixed",
        layers.pop() if len(layers) == 1 else None,
        next(iter(variant)).index if len(variant) == 1 else None,
    )


# -- input checks ----------------------------------------------------------------------------------
def _variant_sets(
    variants: Sequence[Variant] | Literal["heads", "neurons"], shape: ComponentShape
) -> list[ComponentSet]:
    if isinstance(variants, str):
        kinds = {"heads": "head", "neurons": "neuron"}
        if variants not in kinds:
            raise ValueError(
                f"variants must be 'heads', 'neurons' or a sequence of components, got {variants!r}"
            )
        kind = kinds[variants]
        return [ComponentSet([c]) for c in ComponentSet.all(shape, kind)]
    sets = []
    for i, variant in enumerate(variants):
        if isinstance(variant, Component):
            variant = ComponentSet([variant])
        if not isinstance(variant, ComponentSet):
            raise TypeError(f"variant {i} is a {type(variant).__name__}; give a Component or a ComponentSet")
        if not len(variant):
            raise ValueError(f"variant {i} is an empty ComponentSet: it would patch nothing")
        try:
            variant.validate(shape)
        except IndexError as err:
            raise IndexError(f"variant {i} does not fit the model: {err}") from None
        sets.append(variant)
    if not sets:
        raise ValueError("no variants given: pass 'heads', 'neurons' or a non-empty sequence of components")
    return sets


def _check_aligned(target: TokenBatch, source: TokenBatch) -> None:
    for name, batch in (("target", target), ("source", source)):
        if not isinstance(batch, TokenBatch):
            raise TypeError(
                f"{name} must be a TokenBatch (see interp.batching.tokenize), got {type(batch).__name__}"
            )
    if target.tokens.shape != source.tokens.shape:
        raise ValueError(
            f"target and source must have the same token shape [prompt, pos], got "
            f"{tuple(target.tokens.shape)} and {tuple(source.tokens.shape)}; patching replaces "
            "activations token by token, so pair each target prompt with a source of equal length"
        )
    lengths_t, lengths_s = target.lengths, source.lengths.to(target.lengths.device)
    if not torch.equal(target.attention_mask, source.attention_mask.to(target.attention_mask.device)):
        row = int((lengths_t != lengths_s).nonzero()[0]) if (lengths_t != lengths_s).any() else 0
        raise ValueError(
            f"target and source prompts must be token-aligned: prompt {row} has {int(lengths_t[row])} "
            f"tokens in target and {int(lengths_s[row])} in source"
        )


def _evaluate(metric: Metric, logits: Tensor, batch: TokenBatch, n_prompts: int) -> Float[Tensor, "prompt"]:
    out = metric(logits, batch)
    if not isinstance(out, Tensor) or out.shape != (n_prompts,):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the metric must return one value per prompt ({n_prompts}), got {got}")
    return out.detach().float()


@dataclass(frozen=True)
class _LogitReader:
    """Which logit positions the forward computes, and the batch the metric reads them with.

    The library's own metrics read logits only at each prompt's answer position (and, for
    multi-token candidates, along the candidate). For those, the model unembeds just the union of
    the positions read (``logits_to_keep``) and the batch's positions are renumbered onto them:
    the same values, without unembedding every position. Any other metric gets every position.
    """

    keep: Int[Tensor, "keep"] | None = None

    @classmethod
    def for_metric(cls, model, metric: Metric, batch: TokenBatch) -> "_LogitReader":
        hf_forward = getattr(getattr(model, "original_model", None), "forward", None)
        if hf_forward is None or "logits_to_keep" not in inspect.signature(hf_forward).parameters:
            return cls()
        if type(metric) in (LogitDiff, TokenSetProb):
            return cls(batch.answer_pos.unique())
        if type(metric) in (CandidateAnswers, ExpectedValue):
            candidates = metric if isinstance(metric, CandidateAnswers) else metric.candidates
            return cls(candidates.read_positions(batch).unique())
        return cls()

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


def _rows_per_batch(
    model, width: int, logit_positions: int, max_batch_rows: int | None, memory_budget_bytes: int | None
) -> int:
    """Rows per forward: the memory budget over one row's estimated peak, capped at ``max_batch_rows``."""
    for name, value in (("max_batch_rows", max_batch_rows), ("memory_budget_bytes", memory_budget_bytes)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if memory_budget_bytes is None:
        free = free_memory_bytes(model.cfg.device)
        if max_batch_rows is not None and free is None:
            return max_batch_rows
        memory_budget_bytes = _CPU_BUDGET_BYTES if free is None else int(free * _GPU_BUDGET_FRACTION)
    cfg = model.cfg
    # the logits and a float32 copy, a few residual- and MLP-wide activations, the attention scores
    floats = 2 * logit_positions * cfg.d_vocab + width * (
        8 * cfg.d_model + 4 * cfg.d_mlp + 2 * cfg.n_heads * width
    )
    rows = max(1, memory_budget_bytes // (4 * floats))
    return min(rows, max_batch_rows) if max_batch_rows is not None else rows


# -- running -----------------------------------------------------------------------------------
def _pass_through(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _blocks_skipped_below(model, layer: int) -> Iterator[None]:
    """Make blocks ``0..layer-1`` return their input untouched (see the module docstring)."""
    skipped = list(model.blocks)[:layer]
    try:
        for block in skipped:
            # Straight into the instance dict: the bridge's __setattr__ would forward a plain
            # ``block.forward = ...`` to the wrapped Hugging Face layer.
            vars(block)["forward"] = _pass_through
        yield
    finally:
        for block in skipped:
            vars(block).pop("forward", None)


@contextmanager
def _attention_reads_cache(model) -> Iterator[None]:
    """Hand each attention bridge the key/value cache under the keyword it reads.

    Transformers 5 decoder layers pass the cache as ``cache``; TransformerLens 4.3's attention
    bridges look for ``past_key_values`` and, not finding it, silently attend to the new positions
    only. For the duration of the call each one gets a ``forward`` that renames the keyword.
    """
    attentions = [block.attn for block in model.blocks]

    def renaming(attention):
        original = type(attention).forward

        def forward(*args, **kwargs):
            if "cache" in kwargs and "past_key_values" not in kwargs:
                kwargs["past_key_values"] = kwargs["cache"]
            return original(attention, *args, **kwargs)

        return forward

    try:
        for attention in attentions:
            vars(attention)["forward"] = renaming(attention)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            yield
    finally:
        for attention in attentions:
            vars(attention).pop("forward", None)


def _shared_prefix_length(run_target: TokenBatch, run_source: TokenBatch, reader: _LogitReader) -> int:
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
class _Prefix:
    """The shared prefix (its length, and its keys and values in the unpatched target run)."""

    length: int = 0
    cache: object = None  # a Hugging Face cache over every expanded target row

    @classmethod
    def build(cls, model, batch: TokenBatch, length: int, rows: int) -> "_Prefix":
        if length == 0:
            return cls()
        caches = []
        with _attention_reads_cache(model):
            for part in microbatches(len(batch), rows):
                tokens = batch.tokens[part, :length]
                _, cache = model(tokens, return_type="logits_and_cache", use_cache=True, logits_to_keep=1)
                caches.append(cache)
        merged = caches[0]
        for i, layer in enumerate(merged.layers):
            layer.keys = torch.cat([c.layers[i].keys for c in caches])
            layer.values = torch.cat([c.layers[i].values for c in caches])
        return cls(length, merged)

    def kwargs(self, rows: Int[Tensor, "row"]) -> dict:
        """Forward keywords giving the prefix of expanded target ``rows`` as past keys and values."""
        if not self.length:
            return {}
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        return {"past_key_values": cache}


def _resume(
    model,
    residual: Float[Tensor, "row pos d_model"],
    layer: int,
    batch: TokenBatch,
    rows: Int[Tensor, "row"],
    reader: _LogitReader,
    prefix: _Prefix,
    cache_rows: Int[Tensor, "row"] | None = None,
) -> Tensor:
    """Logits of ``batch``'s ``rows`` from ``residual`` entering block ``layer`` (after the prefix, if
    any, whose cached rows are ``cache_rows``, default ``rows``), lower blocks skipped."""
    layout = batch.take(rows).forward_kwargs(offset=prefix.length)
    kwargs = reader.kwargs(offset=prefix.length) | prefix.kwargs(rows if cache_rows is None else cache_rows) | layout
    with (
        _blocks_skipped_below(model, layer),
        _attention_reads_cache(model) if prefix.length else nullcontext(),
    ):
        return model(residual, start_at_layer=layer, **kwargs)


def _checked_prefix(
    model,
    batch: TokenBatch,
    metric: Metric,
    reader: _LogitReader,
    length: int,
    layer: int,
    residual: Float[Tensor, "row pos d_model"],
    baseline: Float[Tensor, "prompt"],
    rows_per_prompt: int,
    rows: int,
) -> _Prefix:
    """The shared prefix, once resuming after it reproduces the unpatched target; else no prefix.

    The check resumes the first microbatch of unpatched target rows from ``layer`` (given its
    ``residual``) after the prefix and compares the metric with ``baseline``.
    """
    if length == 0:
        return _Prefix()
    n_prompts = min(max(1, rows // rows_per_prompt), len(baseline))
    sample_rows = torch.arange(n_prompts * rows_per_prompt, device=residual.device)
    try:
        prefix = _Prefix.build(model, batch, length, rows)
        logits = _resume(model, residual[sample_rows, length:], layer, batch, sample_rows, reader, prefix)
    except (AttributeError, TypeError, ValueError, NotImplementedError, RuntimeError) as err:
        warnings.warn(
            f"cannot reuse the shared prompt prefix on this model ({err!r}); running every position",
            RuntimeWarning,
            stacklevel=3,
        )
        return _Prefix()
    got = _evaluate(metric, logits, reader.renumber(batch.take(sample_rows)), n_prompts)
    tolerance = 1e-3 if model.cfg.dtype == torch.float32 else 5e-2
    if not torch.allclose(got, baseline[:n_prompts], rtol=tolerance, atol=tolerance):
        warnings.warn(
            "resuming after the shared prompt prefix does not reproduce the unpatched run on this "
            "model; running every position",
            RuntimeWarning,
            stacklevel=3,
        )
        return _Prefix()
    return prefix


@dataclass(frozen=True)
class _SourceUnits:
    """The source activations of the patched units at one hook point: ``[row, pos, unit, ...]``."""

    index: Int[Tensor, "unit"]  # component index of each stored unit
    acts: Tensor
    slot: dict[int, int]  # component index -> position in ``index``


def _units_by_hook(sets: list[ComponentSet]) -> dict[str, list[int]]:
    units: dict[str, set[int]] = {}
    for variant in sets:
        for hook, indices in variant.by_hook().items():
            units.setdefault(hook, set()).update(indices)
    return {hook: sorted(indices) for hook, indices in units.items()}


def _run_unpatched(
    model,
    batch: TokenBatch,
    metric: Metric,
    reader: _LogitReader,
    capture: dict[str, Callable],
    rows_per_prompt: int,
    rows: int,
) -> tuple[dict[str, Tensor], Float[Tensor, "prompt"]]:
    """The metric on ``batch`` run as is, and ``capture[name](activation)`` at each named hook point."""
    pieces: dict[str, list[Tensor]] = {name: [] for name in capture}
    values = []

    def keep(name: str) -> HookSpec:  # keyed by our name: a bridge hook point may report an alias
        return name, lambda act, hook: pieces[name].append(capture[name](act))

    n_prompts = len(batch) // rows_per_prompt
    with hooked(model, [keep(name) for name in capture]):
        for prompts in microbatches(n_prompts, max(1, rows // rows_per_prompt)):
            part = batch.take(_expanded_rows(prompts, rows_per_prompt, batch.tokens.device))
            logits = model(part.tokens, **reader.kwargs(), **part.forward_kwargs())
            values.append(_evaluate(metric, logits, reader.renumber(part), prompts.stop - prompts.start))
    return {name: torch.cat(p) for name, p in pieces.items()}, torch.cat(values)


def _source_units(
    model, batch: TokenBatch, metric: Metric, units: dict[str, list[int]], rows_per_prompt: int, rows: int
) -> tuple[dict[str, _SourceUnits], Float[Tensor, "prompt"]]:
    device = batch.tokens.device
    index = {hook: torch.tensor(idx, device=device) for hook, idx in units.items()}
    capture = {hook: (lambda act, idx=idx: act.index_select(2, idx)) for hook, idx in index.items()}
    reader = _LogitReader.for_metric(model, metric, batch)
    acts, values = _run_unpatched(model, batch, metric, reader, capture, rows_per_prompt, rows)
    store = {
        hook: _SourceUnits(index[hook], acts[hook], {u: s for s, u in enumerate(units[hook])})
        for hook in units
    }
    return store, values


def _expanded_rows(prompts: slice, rows_per_prompt: int, device) -> Int[Tensor, "row"]:
    return torch.arange(prompts.start * rows_per_prompt, prompts.stop * rows_per_prompt, device=device)


def _patch_hooks(
    items: list[tuple[int, int]],
    patches: list[dict[str, list[int]]],
    store: dict[str, _SourceUnits],
    rows_per_prompt: int,
    offset: int,
    device,
) -> list[HookSpec]:
    """Hooks writing each item's source units into its rows of the stacked batch.

    Item ``i = (variant, prompt)`` owns stacked rows ``i*k .. i*k+k-1`` (``k`` expanded rows per
    prompt), which take their source values from expanded rows ``prompt*k ..``, at positions
    ``offset ..`` (the forward does not hold the shared prefix).
    """
    wanted: dict[str, tuple[list[int], list[int], list[int]]] = {}
    for i, (variant, prompt) in enumerate(items):
        for hook, slots in patches[variant].items():
            rows, source_rows, all_slots = wanted.setdefault(hook, ([], [], []))
            for j in range(rows_per_prompt):
                rows += [i * rows_per_prompt + j] * len(slots)
                source_rows += [prompt * rows_per_prompt + j] * len(slots)
                all_slots += slots
    hooks = []
    for hook, (rows, source_rows, slots) in wanted.items():
        units = store[hook]
        slots_t = torch.tensor(slots, device=device)
        hooks.append(
            (
                hook,
                _writer(
                    torch.tensor(rows, device=device),
                    units.index[slots_t],
                    units.acts[torch.tensor(source_rows, device=device), offset:, slots_t],
                ),
            )
        )
    return hooks


def _writer(rows: Int[Tensor, "entry"], units: Int[Tensor, "entry"], values: Tensor):
    def write(act, hook):
        act = act.clone()
        act[rows, :, units] = values.to(act.dtype)
        return act

    return write


def _local_items(
    by_layer: dict[int, list[tuple[int, int]]], shard: Shard
) -> dict[int, list[tuple[int, int]]]:
    """This rank's contiguous block of the sweep's items (in sweep order), still grouped by start layer."""
    flat = [(layer, item) for layer, items in by_layer.items() for item in items]
    mine = shard.indices(len(flat))
    local: dict[int, list[tuple[int, int]]] = {}
    if len(mine):
        for layer, item in flat[int(mine[0]) : int(mine[-1]) + 1]:
            local.setdefault(layer, []).append(item)
    return local


def patch_sweep(
    model,
    target: TokenBatch,
    source: TokenBatch,
    metric: Metric,
    variants: Sequence[Variant] | Literal["heads", "neurons"],
    *,
    max_batch_rows: int | None = None,
    memory_budget_bytes: int | None = None,
    progress: bool = False,
) -> PatchingResult:
    """Exact activation patching of every variant, from ``source`` into ``target``.

    Runs the ``target`` prompts with each variant's components (neurons at
    ``blocks.L.mlp.hook_post``, query heads at ``blocks.L.attn.hook_z``, all positions) set to their
    values on the row-aligned ``source`` prompts, and returns ``metric`` per variant per prompt.
    ``variants`` is a sequence of components or component sets, or ``"heads"`` / ``"neurons"``
    for every head / neuron of the model on its own. A metric that expands prompts (multi-token
    candidate answers) patches on the expanded rows, expanded identically for target and source.
    Launched with ``torchrun`` (an initialized process group of world size > 1), each rank patches
    a contiguous block of the (variant, prompt) items and every rank returns the full result.

    Args:
        max_batch_rows: most rows per forward (at least one prompt's expanded rows always go together).
        memory_budget_bytes: bytes a forward may use; default half the free GPU memory, 1 GiB on CPU.
        progress: show a progress bar over the stacked rows.
    """
    shape = ComponentShape.of(model)
    sets = _variant_sets(variants, shape)
    _check_aligned(target, source)
    device = torch.device(model.cfg.device)
    target, source = target.to(device), source.to(device)
    run_target, run_source = metric.expand(target), metric.expand(source)
    n_prompts = len(target)
    if run_target.tokens.shape != run_source.tokens.shape or len(run_target) % n_prompts:
        raise ValueError(
            f"the metric expanded the target to {tuple(run_target.tokens.shape)} and the source to "
            f"{tuple(run_source.tokens.shape)} tokens; it must expand both alike, to a whole number of "
            f"rows per prompt ({n_prompts} prompts)"
        )
    rows_per_prompt = len(run_target) // n_prompts
    reader = _LogitReader.for_metric(model, metric, run_target)
    width = run_target.tokens.shape[1]
    logit_positions = width if reader.keep is None else len(reader.keep)
    rows = _rows_per_batch(model, width, logit_positions, max_batch_rows, memory_budget_bytes)
    items_per_batch = max(1, rows // rows_per_prompt)
    start_of = [min(c.layer for c in v) for v in sets]
    starts = sorted(set(start_of))

    with torch.no_grad():
        units = _units_by_hook(sets)
        store, source_values = _source_units(model, run_source, metric, units, rows_per_prompt, rows)
        capture = {f"blocks.{layer}.hook_resid_pre": torch.clone for layer in starts}
        residuals, baseline = _run_unpatched(
            model, run_target, metric, reader, capture, rows_per_prompt, rows
        )
        residuals = {layer: residuals[f"blocks.{layer}.hook_resid_pre"] for layer in starts}
        shared = _shared_prefix_length(run_target, run_source, reader)
        prefix = _checked_prefix(
            model,
            run_target,
            metric,
            reader,
            shared,
            starts[0],
            residuals[starts[0]],
            baseline,
            rows_per_prompt,
            rows,
        )
        patches = [
            {hook: [store[hook].slot[u] for u in indices] for hook, indices in v.by_hook().items()}
            for v in sets
        ]
        by_layer = {
            layer: [(v, p) for v in range(len(sets)) if start_of[v] == layer for p in range(n_prompts)]
            for layer in starts
        }
        shard = current_shard()  # under torch.distributed each rank takes a block of the items
        if shard.world_size > 1:
            by_layer = _local_items(by_layer, shard)
        values = torch.zeros(len(sets), n_prompts, device=device)  # items of other ranks stay zero
        n_local = sum(len(items) for items in by_layer.values())
        bar = tqdm(total=n_local, disable=not progress, desc="patching", unit="run")
        # out-of-memory halves the batch and retries it; the smaller size carries over to later layers
        backoff = Backoff(items_per_batch, what="patching batch")
        for layer, items in by_layer.items():

            def run(chunk: slice, layer=layer, items=items) -> None:
                part = items[chunk]
                variant_idx = torch.tensor([v for v, _ in part], device=device)
                prompt_idx = torch.tensor([p for _, p in part], device=device)
                own_rows = prompt_idx[:, None] * rows_per_prompt + torch.arange(
                    rows_per_prompt, device=device
                )
                own_rows = own_rows.reshape(-1)  # the expanded target rows each stacked row repeats
                hooks = _patch_hooks(part, patches, store, rows_per_prompt, prefix.length, device)
                with hooked(model, hooks):
                    residual = residuals[layer][own_rows, prefix.length :]
                    logits = _resume(model, residual, layer, run_target, own_rows, reader, prefix)
                batch = reader.renumber(run_target.take(own_rows))
                values[variant_idx, prompt_idx] = _evaluate(metric, logits, batch, len(part))
                bar.update(len(part))

            for _ in backoff.batches(len(items), run):
                pass
        bar.close()
        if shard.world_size > 1:  # each value was computed by exactly one rank
            values = all_reduce_sum(values)
    return PatchingResult(
        values=values.cpu(),
        baseline=baseline.cpu(),
        source_values=source_values.cpu(),
        variants=sets,
        shape=shape,
    )


__all__ = ["PatchingResult", "Variant", "patch_sweep", "variant_label"]
