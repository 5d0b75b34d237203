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

The stacking, resuming and prefix reuse are ``interp.stacking``'s (shared with ``interp.sweeps``);
the bridge workarounds they need are ``interp.bridge``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.batching import TokenBatch
from interp.components import KINDS, Component, ComponentSet, ComponentShape, Kind
from interp.distributed import Shard, all_reduce_sum, current_shard
from interp.hooks import HookedModel, HookSpec
from interp.memory import Backoff
from interp.metrics import Metric
from interp.results import SavedResult
from interp.stacking import (
    LogitReader,
    checked_prefix,
    items_by_start_layer,
    metric_values,
    rows_per_batch,
    run_stacked,
    run_unchanged,
    shared_prefix_length,
    start_residuals,
)

Variant = Component | ComponentSet


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


def _source_units(
    model: HookedModel, batch: TokenBatch, metric: Metric, units: dict[str, list[int]], rows_per_prompt: int,
    rows: int,
) -> tuple[dict[str, _SourceUnits], Float[Tensor, "prompt"]]:
    device = batch.tokens.device
    index = {hook: torch.tensor(idx, device=device) for hook, idx in units.items()}
    capture = {hook: (lambda act, idx=idx: act.index_select(2, idx)) for hook, idx in index.items()}
    reader = LogitReader.for_metric(model, metric, batch)
    acts, values = run_unchanged(model, batch, capture, rows_per_prompt, rows, metric, reader)
    store = {
        hook: _SourceUnits(index[hook], acts[hook], {u: s for s, u in enumerate(units[hook])})
        for hook in units
    }
    return store, values


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
    model: HookedModel,
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
    reader = LogitReader.for_metric(model, metric, run_target)
    rows = rows_per_batch(model, run_target, reader, max_batch_rows, memory_budget_bytes)
    by_layer = items_by_start_layer(sets, n_prompts)
    starts = list(by_layer)

    with torch.no_grad():
        store, source_values = _source_units(model, run_source, metric, _units_by_hook(sets), rows_per_prompt, rows)
        residuals, baseline = start_residuals(model, run_target, starts, rows_per_prompt, rows, metric, reader)
        shared = shared_prefix_length(run_target, run_source, reader)
        prefix = checked_prefix(
            model, run_target, metric, reader, shared, starts[0], residuals[starts[0]], baseline, rows_per_prompt, rows
        )
        patches = [
            {hook: [store[hook].slot[u] for u in indices] for hook, indices in v.by_hook().items()}
            for v in sets
        ]
        shard = current_shard()  # under torch.distributed each rank takes a block of the items
        if shard.world_size > 1:
            by_layer = _local_items(by_layer, shard)
        values = torch.zeros(len(sets), n_prompts, device=device)  # items of other ranks stay zero
        n_local = sum(len(items) for items in by_layer.values())
        bar = tqdm(total=n_local, disable=not progress, desc="patching", unit="run")

        def setup(part, own_rows):
            return _patch_hooks(part, patches, store, rows_per_prompt, prefix.length, device), prefix, None

        def record(part, prompt_idx, own_rows, logits):
            variant_idx = torch.tensor([v for v, _ in part], device=device)
            batch = reader.renumber(run_target.take(own_rows))
            values[variant_idx, prompt_idx] = metric_values(metric, logits, batch, len(part))

        # out-of-memory halves the batch and retries it; the smaller size carries over to later layers
        backoff = Backoff(max(1, rows // rows_per_prompt), what="patching batch")
        run_stacked(model, run_target, by_layer, residuals, rows_per_prompt=rows_per_prompt, reader=reader,
                    setup=setup, record=record, backoff=backoff, bar=bar)
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
