"""Ablating components: hooks that replace their activations, and the equivalent weight edits.

A neuron is ablated at ``blocks.{L}.mlp.hook_post`` and a head at ``blocks.{L}.attn.hook_z``
(per query head, so right under grouped-query attention). At both hooks the component axis is
axis 2 (``[batch, pos, neuron]``, ``[batch, pos, head, d_head]``). Replacement values:

- ``zero``: 0.
- ``mean``: means from :func:`interp.activations.mean_activations`, over all positions
  (``[d...]``) or per position (``[pos, d...]``). Per-position means must cover every position
  of the run; a longer run raises (compute them on a batch at least as long, e.g. the expanded one).
- ``resample``: the activations of another prompt of a reference batch (row ``i`` of the run
  takes row ``sigma(i)`` of ``source``, ``sigma`` a seeded derangement), position by position;
  where the donor prompt is shorter, its last real token's activation fills the rest.
- ``patch``: the activations of a counterfactual batch aligned row by row and token by token
  with the run (for a multi-token metric, pass ``metric.expand(counterfactual)``).

Resample and patch values come from one no-grad forward of ``source`` that keeps only the
ablated components' slices of the hooks they need.

The permanent form, :func:`prune_weights`, zeroes the weights that carry each component into
the residual stream (a neuron's column of the MLP output projection, a head's input slice of
the attention output projection) and equals zero ablation.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from interp.activations import mean_activations, stop_layer
from interp.batching import TokenBatch
from interp.components import Component, ComponentSet, ComponentShape
from interp.hooks import HookedModel, HookSpec, capturing, hooked

How = Literal["zero", "mean", "resample", "patch"]
HOWS: tuple[How, ...] = ("zero", "mean", "resample", "patch")


@dataclass(frozen=True, eq=False)
class Ablation:
    """Which components to ablate and how; ``means``/``source`` supply the replacement values."""

    components: ComponentSet
    how: How = "zero"
    means: Mapping[str, Tensor] | None = None
    source: TokenBatch | None = None
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.components, ComponentSet):
            object.__setattr__(self, "components", ComponentSet(self.components))
        if self.how not in HOWS:
            raise ValueError(f"ablation how={self.how!r} is not one of {HOWS}")
        if self.means is not None and self.how != "mean":
            raise ValueError(f"means are only used by how='mean', not how={self.how!r}")
        if self.how == "mean" and self.means is None and self.source is None:
            raise ValueError(
                "mean ablation needs means=mean_activations(model, batch, hook_names) or a "
                "source batch to compute them on"
            )
        if self.how in ("resample", "patch") and self.source is None:
            raise ValueError(f"how={self.how!r} needs a source batch to take activations from")
        if self.how == "zero" and self.source is not None:
            raise ValueError("zero ablation takes no source batch")


def check_components(model: HookedModel, components: Iterable[Component]) -> ComponentSet:
    """``components`` as a ComponentSet, checked against the model's layers, neurons and heads."""
    components = components if isinstance(components, ComponentSet) else ComponentSet(components)
    shape = ComponentShape.of(model)
    try:
        components.validate(shape)
    except IndexError as err:
        name = getattr(model, "model_id", None) or model.cfg.model_name
        raise ValueError(
            f"cannot address {err} in {name} ({shape.n_layers} layers, {shape.d_mlp} neurons "
            f"and {shape.n_heads} heads per layer)"
        ) from None
    return components


def _feature_shape(model: HookedModel, hook: str) -> tuple[int, ...]:
    if hook.endswith("hook_z"):
        return int(model.cfg.n_heads), int(model.cfg.d_head)
    return (int(model.cfg.d_mlp),)


def _source_slices(
    model: HookedModel, source: TokenBatch, index: Mapping[str, Int[Tensor, "unit"]]
) -> dict[str, Float[Tensor, "row pos unit ..."]]:
    """The ablated components' activations on ``source``, one no-grad forward, nothing else kept."""

    def sliced(name: str, act: Tensor) -> Tensor:
        return act[:, :, index[name].to(act.device)].detach().clone()

    source = source.to(model.cfg.device)
    with torch.no_grad(), capturing(model, list(index), sliced) as kept:
        model(source.tokens, stop_at_layer=stop_layer(list(index)), **source.forward_kwargs())
    return kept.joined()


def derangement(n: int, seed: int) -> Int[Tensor, "row"]:
    """A seeded uniformly random permutation of ``range(n)`` with no fixed point."""
    if n < 2:
        raise ValueError(f"resampling needs at least 2 prompts to swap between, got {n}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not (perm == torch.arange(n)).any():
            return perm


def _mean_values(
    model: HookedModel, ablation: Ablation, index: Mapping[str, Tensor], batch_size: int
) -> dict[str, Tensor]:
    means = ablation.means
    if means is None:
        means = mean_activations(model, ablation.source, list(index), batch_size=batch_size)
    values = {}
    for hook, idx in index.items():
        if hook not in means:
            raise ValueError(
                f"means lack {hook}; compute them with mean_activations(model, batch, {list(index)})"
            )
        mean = torch.as_tensor(means[hook])
        features = _feature_shape(model, hook)
        n = len(features)
        if mean.ndim not in (n, n + 1) or tuple(mean.shape[mean.ndim - n :]) != features:
            raise ValueError(
                f"means[{hook!r}] has shape {tuple(mean.shape)}; expected {list(features)} or "
                f"[pos, {', '.join(map(str, features))}]"
            )
        per_position = mean.ndim == n + 1
        values[hook] = mean[:, idx.to(mean.device)] if per_position else mean[idx.to(mean.device)]
    return values


def ablation_hooks(model: HookedModel, ablation: Ablation, *, batch_size: int = 32) -> list[HookSpec]:
    """Forward hooks that apply ``ablation``; attach them with :func:`interp.hooks.hooked`."""
    components = check_components(model, ablation.components)
    index = {hook: torch.tensor(idx, dtype=torch.long) for hook, idx in components.by_hook().items()}
    if not index:
        return []
    how = ablation.how
    if how == "mean":
        means = _mean_values(model, ablation, index, batch_size)
    elif how in ("resample", "patch"):
        stored = _source_slices(model, ablation.source, index)
        if how == "resample":
            donors = derangement(len(ablation.source), ablation.seed)
            donor_last = (ablation.source.lengths.cpu()[donors] - 1).to(model.cfg.device)
            stored = {hook: values[donors.to(values.device)] for hook, values in stored.items()}

    def replacement(hook: str, act: Tensor) -> Tensor | float:
        rows, width = act.shape[:2]
        if how == "zero":
            return 0.0
        if how == "mean":
            mean = means[hook]
            per_position = mean.ndim == act.ndim - 1
            if per_position and mean.shape[0] < width:
                raise ValueError(
                    f"per-position means of {hook} cover {mean.shape[0]} positions but the run has "
                    f"{width}; compute them on a batch at least as long, or use per_position=False"
                )
            return mean[:width] if per_position else mean
        values = stored[hook]
        if rows != values.shape[0] or (how == "patch" and width != values.shape[1]):
            kind = "rows" if how == "resample" else "rows x positions"
            raise ValueError(
                f"{how} source has {values.shape[0]} rows x {values.shape[1]} positions but the run has "
                f"{rows} x {width} at {hook}; the {kind} must match: pass a source aligned with what "
                "you run (for a multi-token metric, metric.expand(source))"
            )
        if how == "patch":
            return values
        positions = torch.arange(width, device=values.device)
        read = torch.minimum(positions[None, :], donor_last.to(values.device)[:, None])
        read = read.reshape(rows, width, *([1] * (values.ndim - 2))).expand(rows, width, *values.shape[2:])
        return values.gather(1, read)

    def make(name: str) -> HookSpec:
        def hook_fn(act, hook):
            value = replacement(name, act)
            out = act.clone()
            out[:, :, index[name].to(act.device)] = (
                value if isinstance(value, float) else value.to(act.device, act.dtype)
            )
            return out

        return name, hook_fn

    return [make(name) for name in index]


@contextmanager
def ablated(
    model: HookedModel,
    components: Iterable[Component],
    how: How = "zero",
    *,
    means: Mapping[str, Tensor] | None = None,
    source: TokenBatch | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> Iterator:
    """Run the model with ``components`` ablated inside a ``with`` block; hooks always come off.

    ``how`` is ``zero``, ``mean`` (``means`` from mean_activations, or else means over all
    positions of ``source``), ``resample`` (other prompts of ``source`` by a derangement seeded
    with ``seed``) or ``patch`` (``source`` aligned with the run). The module docstring gives
    the exact semantics; ``batch_size`` only sets the microbatches of computed means.
    """
    spec = Ablation(ComponentSet(components), how, means=means, source=source, seed=seed)
    with hooked(model, ablation_hooks(model, spec, batch_size=batch_size)):
        yield model


# -- weight edits ---------------------------------------------------------------------------


def _output_weight(model: HookedModel, component: Component) -> tuple[nn.Parameter, int, Int[Tensor, "unit"]]:
    """The weight that writes ``component`` into the residual stream, its input axis and slice."""
    block = model.blocks[component.layer]
    bridge = block.mlp.out if component.kind == "neuron" else block.attn.o
    module = getattr(bridge, "original_component", bridge)
    if isinstance(module, nn.Linear):
        axis = 1  # [out, in]
    elif type(module).__name__ == "Conv1D":
        axis = 0  # GPT-2 style [in, out]
    else:
        raise NotImplementedError(
            f"cannot edit the weights of {component}: its output projection is a "
            f"{type(module).__name__}, not a Linear or Conv1D"
        )
    if component.kind == "neuron":
        cols, width = torch.tensor([component.index]), int(model.cfg.d_mlp)
    else:
        d_head = int(model.cfg.d_head)
        cols = torch.arange(component.index * d_head, (component.index + 1) * d_head)
        width = int(model.cfg.n_heads) * d_head
    if module.weight.shape[axis] != width:
        raise NotImplementedError(
            f"cannot edit the weights of {component}: the output projection takes "
            f"{module.weight.shape[axis]} inputs, not the expected {width}"
        )
    return module.weight, axis, cols


class PrunedWeights:
    """Zeroed weight slices with their saved values; ``restore()`` (or leaving ``with``) undoes."""

    def __init__(self, edits: list[tuple[nn.Parameter, int, Tensor, Tensor]]):
        self._edits = edits

    def restore(self) -> None:
        with torch.no_grad():
            for weight, axis, cols, saved in reversed(self._edits):
                weight.index_copy_(axis, cols.to(weight.device), saved)
        self._edits = []

    def __enter__(self) -> PrunedWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def prune_weights(model: HookedModel, components: Iterable[Component]) -> PrunedWeights:
    """Zero, in place, the output weights of ``components``: the same model as zero ablation.

    A neuron loses its column of the MLP output projection, a head its ``d_head`` input slice of
    the attention output projection (its ``W_O[head]``). The edit stays until the returned
    handle's ``restore()``; used as ``with prune_weights(model, comps): ...`` it is undone on exit.
    """
    components = check_components(model, components)
    edits = []
    grouped: dict[int, tuple[nn.Parameter, int, list[Tensor]]] = {}
    for component in components:
        weight, axis, cols = _output_weight(model, component)
        grouped.setdefault(id(weight), (weight, axis, []))[2].append(cols)
    with torch.no_grad():
        for weight, axis, parts in grouped.values():
            cols = torch.cat(parts).to(weight.device)
            edits.append((weight, axis, cols, weight.index_select(axis, cols).clone()))
            weight.index_fill_(axis, cols, 0.0)
    return PrunedWeights(edits)


def _hf_state_dict(model: HookedModel) -> dict[str, Tensor]:
    """The wrapped Hugging Face model's weights under their own names (bridge wrappers removed)."""
    state = {}
    for key, value in model.original_model.state_dict().items():
        state.setdefault(key.replace("._original_component", ""), value)
    return state


def export_pruned(model: HookedModel, components: Iterable[Component], out_dir: str | Path) -> Path:
    """Write a Hugging Face directory of ``model`` with ``components`` pruned; returns its path.

    The weights are the ones the bridge runs (compatibility mode may have folded norms and
    centered the unembedding, untying it from the embedding, which the saved config then says),
    so ``interp.load_model(out_dir)`` gives the logits of the zero-ablated original. The
    pruned components are listed in ``pruned_components.json``.
    """
    components = check_components(model, components)
    out_dir = Path(out_dir)
    hf = model.original_model
    config = copy.deepcopy(hf.config)
    embed, unembed = hf.get_input_embeddings().weight, hf.get_output_embeddings().weight
    if embed.data_ptr() != unembed.data_ptr():
        config.tie_word_embeddings = False
        config.get_text_config().tie_word_embeddings = False
    with torch.device("meta"):
        clean = type(hf)(config)
    expected = set(clean.state_dict())
    with prune_weights(model, components):
        state = {k: v for k, v in _hf_state_dict(model).items() if k in expected}
        missing = expected - set(state)
        if missing:
            raise RuntimeError(f"cannot export: the bridge's model lacks weights {sorted(missing)[:5]}")
        clean.load_state_dict(state, strict=True, assign=True)
        clean.generation_config = copy.deepcopy(hf.generation_config)
        clean.save_pretrained(out_dir)
    model.tokenizer.save_pretrained(out_dir)
    listing = {
        "source_model": str(getattr(model, "model_id", model.cfg.model_name)),
        "components": [[c.kind, c.layer, c.index] for c in components],
    }
    (out_dir / "pruned_components.json").write_text(json.dumps(listing, indent=1))
    return out_dir


__all__ = [
    "HOWS",
    "Ablation",
    "PrunedWeights",
    "ablated",
    "ablation_hooks",
    "check_components",
    "derangement",
    "export_pruned",
    "prune_weights",
]
