"""Ablation sweeps: many component sets evaluated on the same prompts in stacked forwards.

Each set is ablated on its own: zeroed, or set to given mean activations (``interp.ablation``'s
``mean`` values, over all positions or per position). The machinery is ``interp.stacking``'s
(shared with ``patch_sweep``): the unablated forward runs once and keeps the residual stream entering each
set's lowest layer (``blocks.L.hook_resid_pre``); the ablated runs resume from there with the
lower blocks passed through (exact: nothing below a set's lowest layer changes); the sets of one
start layer are stacked as rows of one forward, one row per (set, expanded prompt row), with a
hook that ablates, in each row, that row's set only; and for the library's metrics only the logit
positions the metric reads are unembedded. By default (``share_prefix``), where every prompt starts with
the same tokens (a system prompt, the template up to the name), each set's ablated run of that prefix
is the same for every prompt: it runs once per set (one row), and the stacked rows resume after it
from its cached keys and values (``patch_sweep``'s prefix reuse, checked the same way). Microbatches halve on
out-of-memory (``Backoff``).

- :func:`metric_sweep`: any ``interp.metrics.Metric`` (a batch-expanding one, such as packed
  candidate answers, runs on ``metric.expand(batch)``), one value per (set, prompt), with the
  unablated values from the same clean pass. Used by the study's evaluation stage
  (``circuits.evaluate.evaluation.evaluate``).
- :func:`ablation_sweep`: a free-form ``score(logits, prompt_rows)`` on every position (per-head
  utility), each forward cut to its longest row, the rows stacked longest first.

Prompts run ``prompts_per_pass`` at a time, which bounds the stored residual streams.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.batching import TokenBatch, microbatches
from interp.components import Component, ComponentSet, ComponentShape
from interp.hooks import HookedModel, HookSpec, hooked
from interp.memory import Backoff
from interp.metrics import Metric
from interp.patching import variant_label
from interp.stacking import (
    LogitReader,
    Prefix,
    checked_prefix,
    items_by_start_layer,
    metric_values,
    rows_per_batch,
    run_stacked,
    shared_prefix_length,
    start_layers,
    start_residuals,
)

Score = Callable[[Float[Tensor, "row pos vocab"], Int[Tensor, "row"]], Float[Tensor, "row"]]
# values of a stack of items from their logits: (logits, expanded rows, prompt of each item) -> [item, ...]
_ValueOf = Callable[[Tensor, Int[Tensor, "row"], Int[Tensor, "item"]], Tensor]


@dataclass(frozen=True)
class AblationSweep:
    """The metric with each set ablated alone, on every prompt, and without any ablation."""

    values: Float[Tensor, "variant prompt"]
    baseline: Float[Tensor, "prompt"]
    variants: list[ComponentSet]
    how: str = "zero"

    @property
    def effects(self) -> Float[Tensor, "variant prompt"]:
        """Ablated minus unablated metric."""
        return self.values - self.baseline

    def to_dataframe(self) -> pd.DataFrame:
        """Long form: ``variant``, ``label``, ``n_components``, ``prompt``, ``value``, ``effect``."""
        n_variant, n_prompt = self.values.shape
        return pd.DataFrame({
            "variant": np.repeat(np.arange(n_variant), n_prompt),
            "label": np.repeat([variant_label(v) for v in self.variants], n_prompt),
            "n_components": np.repeat([len(v) for v in self.variants], n_prompt),
            "prompt": np.tile(np.arange(n_prompt), n_variant),
            "value": self.values.numpy().reshape(-1),
            "effect": self.effects.numpy().reshape(-1),
        })


def _as_sets(variants: Sequence[Component | ComponentSet], shape: ComponentShape) -> list[ComponentSet]:
    sets = [ComponentSet([v]) if isinstance(v, Component) else ComponentSet(v) for v in variants]
    if not sets or any(len(s) == 0 for s in sets):
        raise ValueError("an ablation sweep needs at least one variant, each with at least one component")
    for s in sets:
        s.validate(shape)
    return sets


def _check_means(sets: list[ComponentSet], means: Mapping[str, Tensor] | None, shape: ComponentShape) -> None:
    if means is None:
        return
    missing = sorted({h for s in sets for h in s.by_hook()} - set(means))
    if missing:
        raise ValueError(f"means lack {missing[:3]}; compute them with mean_activations(model, batch, hook_names)")


def _ablation_hooks(
    sets: list[ComponentSet], variant_of_row: Int[Tensor, "row"], shape: ComponentShape,
    means: Mapping[str, Tensor] | None = None, offset: int = 0,
) -> list[HookSpec]:
    """Hooks setting, in each row, the units of that row's set to 0 (or to ``means[hook]``); the
    forward holds positions ``offset ..`` (for per-position means)."""
    hooks = []
    for hook in sorted({h for s in sets for h in s.by_hook()}):
        kind = "head" if hook.endswith("hook_z") else "neuron"
        units = torch.zeros(len(sets), shape.per_layer(kind), dtype=torch.bool)
        for v, s in enumerate(sets):
            units[v, s.by_hook().get(hook, [])] = True

        def ablate(act, hook, name=hook, units=units, mean=None if means is None else means[hook]):
            mask = units.to(act.device)[variant_of_row.to(act.device)]  # row unit
            mask = mask.reshape(mask.shape[0], 1, mask.shape[1], *([1] * (act.ndim - 3)))
            if mean is None:
                return act.masked_fill(mask, 0.0)
            mean = torch.as_tensor(mean).to(act.device, act.dtype)
            if mean.ndim == act.ndim - 1:  # per position
                if mean.shape[0] < offset + act.shape[1]:
                    raise ValueError(
                        f"per-position means of {name} cover {mean.shape[0]} positions but the run has "
                        f"{offset + act.shape[1]}; compute them on a batch at least as long, or use per_position=False")
                mean = mean[offset : offset + act.shape[1]]
            return torch.where(mask, mean.expand_as(act), act)

        hooks.append((hook, ablate))
    return hooks


def _set_prefixes(
    model: HookedModel, run: TokenBatch, sets: list[ComponentSet], shape: ComponentShape, means, length: int, rows: int,
) -> Prefix:
    """Each set's ablated run of the first ``length`` positions (which every row of ``run`` shares),
    one cached row per set in ``sets``' order, ``rows`` sets per forward; no prefix for length 0."""
    if not length:
        return Prefix()
    parts = []
    for chunk in microbatches(len(sets), rows):
        chosen = sets[chunk]
        first_row = torch.zeros(len(chosen), dtype=torch.long, device=run.tokens.device)
        with hooked(model, _ablation_hooks(chosen, torch.arange(len(chosen)), shape, means)):
            parts.append(Prefix.build(model, run.take(first_row), length, len(chosen)))
    return Prefix.joined(parts)


def _stacked(
    model: HookedModel, run: TokenBatch, sets: list[ComponentSet], shape: ComponentShape, means, *,
    residuals: Mapping[int, Tensor], reader: LogitReader, value_of: _ValueOf, rows_per_prompt: int,
    backoff: Backoff, bar, prefix: int = 0, trim: bool = False,
) -> Tensor:
    """``[variant, prompt, ...]``: every set ablated alone on every prompt of ``run``, stacked by start layer.

    ``prefix``: leading positions every row of ``run`` shares (same tokens, no logit read there). Each
    set's ablated run of them is the same for every prompt, so it is computed once per set (one
    row per set, from the embeddings, before any stacked forward), and the stacked rows resume after
    it, attending to its cached keys and values. ``trim`` (one row per prompt): items go prompt by
    prompt, longest first, and each forward is cut to its longest row."""
    device = run.tokens.device
    n_prompts = len(run) // rows_per_prompt
    order = torch.argsort(run.lengths.cpu(), descending=True, stable=True).tolist() if trim else None
    by_layer = items_by_start_layer(sets, n_prompts, order)
    out: Tensor | None = None
    cached = _set_prefixes(model, run, sets, shape, means, prefix, backoff.size * rows_per_prompt)

    def setup(part, own_rows):
        chosen = sorted({v for v, _ in part})
        local = {v: i for i, v in enumerate(chosen)}
        variant_of_row = torch.tensor([local[v] for v, _ in part]).repeat_interleave(rows_per_prompt)
        cache_rows = torch.tensor([v for v, _ in part], device=device).repeat_interleave(rows_per_prompt)
        hooks = _ablation_hooks([sets[v] for v in chosen], variant_of_row, shape, means, offset=prefix)
        return hooks, cached, cache_rows if prefix else None

    def record(part, prompt_idx, own_rows, logits):
        nonlocal out
        got = value_of(logits, own_rows, prompt_idx).detach().float().cpu()
        if out is None:
            out = torch.full((len(sets), n_prompts, *got.shape[1:]), float("nan"))
        out[torch.tensor([v for v, _ in part]), prompt_idx.cpu()] = got

    run_stacked(model, run, by_layer, residuals, rows_per_prompt=rows_per_prompt, reader=reader, setup=setup,
                record=record, backoff=backoff, bar=bar, trim=trim)
    return out


def _prepared(model: HookedModel, variants, means, batch: TokenBatch, prompts_per_pass: int | None):
    """A sweep's checked inputs: the model's shape, the variants as sets (means checked against them),
    the device, the batch on it and the prompts per pass."""
    shape = ComponentShape.of(model)
    sets = _as_sets(variants, shape)
    _check_means(sets, means, shape)
    device = torch.device(model.cfg.device)
    step = len(batch) if prompts_per_pass is None else max(1, prompts_per_pass)
    return shape, sets, device, batch.to(device), step


def metric_sweep(
    model: HookedModel,
    batch: TokenBatch,
    metric: Metric,
    variants: Sequence[Component | ComponentSet],
    *,
    means: Mapping[str, Tensor] | None = None,
    max_batch_rows: int | None = None,
    memory_budget_bytes: int | None = None,
    prompts_per_pass: int | None = None,
    backoff: Backoff | None = None,
    share_prefix: bool = True,
    groups: Sequence | np.ndarray | Tensor | None = None,
    progress: bool = False,
    desc: str = "ablation sweep",
) -> AblationSweep:
    """``metric`` on every prompt of ``batch`` with each variant ablated on its own, and unablated.

    Zero ablation, or mean ablation with ``means`` (``{hook: [d...] or [pos, d...]}``, as from
    ``interp.activations.mean_activations``; per-position means must cover the expanded batch).
    The model runs ``metric.expand(batch)``, which must hold a whole number of rows per prompt.
    Equal, to float tolerance, to one ablated forward per variant (``interp.ablation.ablated`` and
    ``run_metric``), with the blocks below each variant's lowest layer run once for all of them.

    Args:
        max_batch_rows / memory_budget_bytes: rows per forward, as for ``patch_sweep`` (a prompt's
            expanded rows go together); ``backoff`` (a ``Backoff`` counting (variant, prompt) items)
            shares a size found too large across calls instead.
        prompts_per_pass: prompts whose residual streams are kept at once (default all).
        share_prefix: run the leading positions that every prompt shares (a system prompt, the text
            before the name) once per set instead of once per (set, prompt), for the library's
            metrics (which say where they read logits). Resuming after the prefix is checked against
            the unablated run first; where it does not reproduce it, every position runs (a warning).
            On SmolLM2 on CPU (2026-12-04), 3 sets x 16 lending_approval prompts of one template, whose
            24-position chat preamble of 75 is shared: 12.3 s with it, 15.0 s without, values equal.
        groups: a label per prompt (e.g. its template); each group runs as its own passes, so the
            prefix its prompts share (up to the name, say) runs once per set and group.
    """
    shape, sets, device, batch, step = _prepared(model, variants, means, batch, prompts_per_pass)
    n_all = len(batch)
    if groups is None:
        passes = [torch.arange(b, min(b + step, n_all)) for b in range(0, n_all, step)]
    else:
        groups = torch.as_tensor(np.asarray(groups))
        if groups.shape != (n_all,):
            raise ValueError(f"groups must give one label per prompt ({n_all}), got shape {tuple(groups.shape)}")
        members = [torch.nonzero(groups == g).flatten() for g in torch.unique(groups)]
        passes = [m[b : b + step] for m in members for b in range(0, len(m), step)]
    values, baseline = torch.empty(len(sets), n_all), torch.empty(n_all)
    bar = tqdm(total=len(sets) * n_all, desc=desc, disable=not progress)
    starts = start_layers(sets)
    with torch.no_grad():
        for chunk in passes:
            chunk = chunk.to(device)
            prompts = batch.take(chunk)
            run = metric.expand(prompts)
            if len(run) % len(prompts):
                raise ValueError(f"the metric expanded {len(prompts)} prompts to {len(run)} rows; an ablation "
                                 "sweep needs a whole number of rows per prompt")
            k = len(run) // len(prompts)
            reader = LogitReader.for_metric(model, metric, run)
            rows = rows_per_batch(model, run, reader, max_batch_rows, memory_budget_bytes)
            backoff = backoff or Backoff(max(1, rows // k), what="ablation batch")
            residuals, clean = start_residuals(model, run, starts, k, rows, metric, reader)
            prefix = 0
            if share_prefix:  # leading positions every row shares; used once resuming after them is checked
                same = run.take(torch.zeros(len(run), dtype=torch.long, device=device))
                length = shared_prefix_length(run, same, reader)
                first = torch.arange(k, device=device)  # checked on the first prompt's rows: one resumed prompt
                prefix = checked_prefix(model, run.take(first), metric, reader, length, starts[0],
                                        residuals[starts[0]][first], clean[:1], k, k).length

            def value_of(logits, own_rows, prompt_idx, run=run, reader=reader):
                return metric_values(metric, logits, reader.renumber(run.take(own_rows)), len(prompt_idx))

            chunk = chunk.cpu()
            values[:, chunk] = _stacked(model, run, sets, shape, means, residuals=residuals, reader=reader,
                                        value_of=value_of, rows_per_prompt=k, backoff=backoff, bar=bar,
                                        prefix=prefix)
            baseline[chunk] = clean.float().cpu()
            del residuals
    bar.close()
    return AblationSweep(values, baseline, sets, "zero" if means is None else "mean")


def ablation_sweep(
    model: HookedModel,
    batch: TokenBatch,
    variants: Sequence[Component | ComponentSet],
    score: Score,
    *,
    means: Mapping[str, Tensor] | None = None,
    rows_per_forward: int = 64,
    prompts_per_pass: int | None = None,
    progress: bool = False,
    desc: str = "ablation sweep",
) -> Float[Tensor, "variant prompt ..."]:
    """``score(logits, prompt_rows)`` for ``batch`` with each variant ablated on its own.

    Zero ablation, or mean ablation with ``means`` (``{hook: [d...] or [pos, d...]}``, as from
    ``interp.activations.mean_activations``). ``score`` gets the logits of a stack of rows and, per
    row, the index of its prompt in ``batch``; it returns one value per row (or a fixed-shape vector
    per row, kept as trailing axes). The logits hold positions ``0 .. w-1``, ``w`` the longest of
    those rows (the padding past it is not run: rows go longest first, a forward cut to its longest),
    so a score reads ``batch``'s per-position tensors through ``[:, :logits.shape[1]]``. ``batch`` is
    what the model runs: for a batch-expanding metric pass its expansion, one row per prompt (or use
    :func:`metric_sweep`).
    ``rows_per_forward`` (halved on out-of-memory) bounds the rows of one forward.
    ``prompts_per_pass`` (default all) bounds the prompts whose residual streams are kept at once.
    """
    shape, sets, device, batch, step = _prepared(model, variants, means, batch, prompts_per_pass)
    n_all = len(batch)
    starts = start_layers(sets)
    backoff = Backoff(max(1, rows_per_forward), what="ablation batch")
    bar = tqdm(total=len(sets) * n_all, desc=desc, disable=not progress)
    parts = []
    with torch.no_grad():
        for begin in range(0, n_all, step):
            chunk = torch.arange(begin, min(begin + step, n_all), device=device)
            run = batch.take(chunk)
            residuals, _ = start_residuals(model, run, starts, 1, max(1, rows_per_forward))

            def value_of(logits, own_rows, prompt_idx, begin=begin):
                return score(logits, prompt_idx + begin)

            parts.append(_stacked(model, run, sets, shape, means, residuals=residuals, reader=LogitReader(),
                                  value_of=value_of, rows_per_prompt=1, backoff=backoff, bar=bar, trim=True))
            del residuals
    bar.close()
    return torch.cat(parts, dim=1)


__all__ = ["AblationSweep", "ablation_sweep", "metric_sweep"]
