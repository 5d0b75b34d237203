"""Ablation sweeps: one score per (component set, prompt), many sets per forward.

Each set is ablated on its own: zeroed, or set to given mean activations (``interp.ablation``'s
``mean`` values, over all positions or per position). The unablated residual stream entering each set's lowest
layer is computed once; the ablated runs resume from there with the lower blocks passed through
(exact: nothing below a set's lowest layer changes), and the sets of one layer are stacked as rows
of one forward, a block of prompt rows per set. Prompts run ``prompts_per_pass`` at a time, which
bounds the stored residual streams. Used for per-head utility and bias (FASP) and for re-scoring
top candidates exactly.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.batching import TokenBatch
from interp.components import Component, ComponentSet, ComponentShape
from interp.hooks import HookSpec, hooked
from interp.memory import backoff_batches
from interp.patching import _blocks_skipped_below

Score = Callable[[Float[Tensor, "row pos vocab"], Int[Tensor, "row"]], Float[Tensor, "row"]]


def _zeroing_hooks(
    sets: list[ComponentSet], variant_of_row: Int[Tensor, "row"], shape: ComponentShape,
    means: Mapping[str, Tensor] | None = None,
) -> list[HookSpec]:
    """Hooks setting, in each row, the units of that row's set to 0 (or to ``means[hook]``)."""
    hooks = []
    for hook in sorted({h for s in sets for h in s.by_hook()}):
        kind = "head" if hook.endswith("hook_z") else "neuron"
        units = torch.zeros(len(sets), shape.per_layer(kind), dtype=torch.bool)
        for v, s in enumerate(sets):
            units[v, s.by_hook().get(hook, [])] = True

        def zero(act, hook, units=units, mean=None if means is None else means[hook]):
            mask = units.to(act.device)[variant_of_row.to(act.device)]  # row unit
            mask = mask.reshape(mask.shape[0], 1, mask.shape[1], *([1] * (act.ndim - 3)))
            if mean is None:
                return act.masked_fill(mask, 0.0)
            mean = mean.to(act.device, act.dtype)
            mean = mean[: act.shape[1]] if mean.ndim == act.ndim - 1 else mean  # per position or not
            return torch.where(mask, mean.expand_as(act), act)

        hooks.append((hook, zero))
    return hooks


def ablation_sweep(
    model,
    batch: TokenBatch,
    variants: Sequence[Component | ComponentSet],
    score: Score,
    *,
    means: Mapping[str, Tensor] | None = None,
    rows_per_forward: int = 64,
    prompts_per_pass: int | None = None,
    progress: bool = False,
    desc: str = "ablation sweep",
) -> Float[Tensor, "variant prompt"]:
    """``score(logits, prompt_rows)`` for ``batch`` with each variant ablated on its own.

    Zero ablation, or mean ablation with ``means`` (``{hook: [d...] or [pos, d...]}``, as from
    ``interp.activations.mean_activations``). ``score`` gets the logits of a stack of rows (every
    position) and, per row, the index of its prompt in ``batch``; it returns one value per row.
    ``batch`` is what the model runs: for a batch-expanding metric pass its expansion, one row per
    prompt. ``rows_per_forward`` (halved on out-of-memory) bounds the rows of one forward; each
    variant's prompts stay together. ``prompts_per_pass`` (default all) bounds the prompts whose
    residual streams are kept at once.
    """
    shape = ComponentShape.of(model)
    sets = [ComponentSet([v]) if isinstance(v, Component) else ComponentSet(v) for v in variants]
    if not sets or any(len(s) == 0 for s in sets):
        raise ValueError("ablation_sweep needs at least one variant, each with at least one component")
    for s in sets:
        s.validate(shape)
    missing = sorted({h for s in sets for h in s.by_hook()} - set(means or {})) if means is not None else []
    if missing:
        raise ValueError(f"means lack {missing[:3]}; compute them with mean_activations(model, batch, hook_names)")
    device = torch.device(model.cfg.device)
    batch = batch.to(device)
    n_all = len(batch)
    step = n_all if prompts_per_pass is None else max(1, prompts_per_pass)
    values = torch.empty(len(sets), n_all)
    bar = tqdm(total=len(sets) * n_all, desc=desc, disable=not progress)
    for start in range(0, n_all, step):
        chunk = torch.arange(start, min(start + step, n_all))
        values[:, chunk] = _sweep_prompts(model, batch.take(chunk.to(device)), sets, shape, means,
                                          lambda logits, rows, start=start: score(logits, rows + start),
                                          rows_per_forward, bar)
    bar.close()
    return values


def _sweep_prompts(model, batch: TokenBatch, sets: list[ComponentSet], shape: ComponentShape, means,
                   score: Score, rows_per_forward: int, bar) -> Float[Tensor, "variant prompt"]:
    device = torch.device(model.cfg.device)
    n_prompts = len(batch)
    start_of = [min(c.layer for c in s) for s in sets]
    layers = sorted(set(start_of))
    residuals: dict[int, Tensor] = {}

    def keep(layer: int) -> HookSpec:
        return f"blocks.{layer}.hook_resid_pre", lambda act, hook: residuals.__setitem__(layer, act.detach().clone())

    values = torch.empty(len(sets), n_prompts)
    with torch.no_grad():
        with hooked(model, [keep(layer) for layer in layers]):
            model(batch.tokens, stop_at_layer=layers[-1] + 1, **batch.forward_kwargs())
        for layer in layers:
            members = [v for v in range(len(sets)) if start_of[v] == layer]

            def run(chunk: slice, layer=layer, members=members) -> None:
                chosen = members[chunk]
                variant_of_row = torch.arange(len(chosen)).repeat_interleave(n_prompts)
                prompt_rows = torch.arange(n_prompts).repeat(len(chosen)).to(device)
                rows = batch.take(prompt_rows)
                hooks = _zeroing_hooks([sets[v] for v in chosen], variant_of_row, shape, means)
                with hooked(model, hooks), _blocks_skipped_below(model, layer):
                    logits = model(residuals[layer][prompt_rows], start_at_layer=layer, **rows.forward_kwargs())
                out = score(logits, prompt_rows).detach().float().cpu()
                values[chosen] = out.reshape(len(chosen), n_prompts)
                bar.update(len(chosen) * n_prompts)

            for _ in backoff_batches(len(members), max(1, rows_per_forward // n_prompts), run, what="ablation batch"):
                pass
    return values


__all__ = ["ablation_sweep"]
