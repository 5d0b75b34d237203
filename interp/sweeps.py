"""Zero-ablation sweeps: one score per (component set, prompt), many sets per forward.

Each set is zero-ablated on its own. The unablated residual stream entering each set's lowest
layer is computed once; the ablated runs resume from there with the lower blocks passed through
(exact: nothing below a set's lowest layer changes), and the sets of one layer are stacked as rows
of one forward, a block of prompt rows per set. Used for per-head utility (FASP) sweeps.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

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
    sets: list[ComponentSet], variant_of_row: Int[Tensor, "row"], shape: ComponentShape
) -> list[HookSpec]:
    """Hooks zeroing, in each row, the units of that row's set."""
    hooks = []
    for hook in sorted({h for s in sets for h in s.by_hook()}):
        kind = "head" if hook.endswith("hook_z") else "neuron"
        units = torch.zeros(len(sets), shape.per_layer(kind), dtype=torch.bool)
        for v, s in enumerate(sets):
            units[v, s.by_hook().get(hook, [])] = True

        def zero(act, hook, units=units):
            mask = units.to(act.device)[variant_of_row.to(act.device)]  # row unit
            mask = mask.reshape(mask.shape[0], 1, mask.shape[1], *([1] * (act.ndim - 3)))
            return act.masked_fill(mask, 0.0)

        hooks.append((hook, zero))
    return hooks


def ablation_sweep(
    model,
    batch: TokenBatch,
    variants: Sequence[Component | ComponentSet],
    score: Score,
    *,
    rows_per_forward: int = 64,
    progress: bool = False,
    desc: str = "ablation sweep",
) -> Float[Tensor, "variant prompt"]:
    """``score(logits, prompt_rows)`` for ``batch`` with each variant zero-ablated on its own.

    ``score`` gets the logits of a stack of rows (every position) and, per row, the index of its
    prompt in ``batch``; it returns one value per row. ``rows_per_forward`` (halved on
    out-of-memory) bounds the rows of one forward; each variant's prompts stay together.
    """
    shape = ComponentShape.of(model)
    sets = [ComponentSet([v]) if isinstance(v, Component) else ComponentSet(v) for v in variants]
    if not sets or any(len(s) == 0 for s in sets):
        raise ValueError("ablation_sweep needs at least one variant, each with at least one component")
    for s in sets:
        s.validate(shape)
    device = torch.device(model.cfg.device)
    batch = batch.to(device)
    n_prompts = len(batch)
    start_of = [min(c.layer for c in s) for s in sets]
    layers = sorted(set(start_of))
    residuals: dict[int, Tensor] = {}

    def keep(layer: int) -> HookSpec:
        return f"blocks.{layer}.hook_resid_pre", lambda act, hook: residuals.__setitem__(layer, act.detach().clone())

    values = torch.empty(len(sets), n_prompts)
    bar = tqdm(total=len(sets), desc=desc, disable=not progress)
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
                hooks = _zeroing_hooks([sets[v] for v in chosen], variant_of_row, shape)
                with hooked(model, hooks), _blocks_skipped_below(model, layer):
                    logits = model(residuals[layer][prompt_rows], start_at_layer=layer, **rows.forward_kwargs())
                out = score(logits, prompt_rows).detach().float().cpu()
                values[chosen] = out.reshape(len(chosen), n_prompts)
                bar.update(len(chosen))

            for _ in backoff_batches(len(members), max(1, rows_per_forward // n_prompts), run, what="ablation batch"):
                pass
    bar.close()
    return values


__all__ = ["ablation_sweep"]
