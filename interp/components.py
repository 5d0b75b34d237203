"""Addressing model components: MLP neurons and attention heads, and sets of them.

A neuron ``(layer, i)`` is unit ``i`` of ``blocks.{layer}.mlp.hook_post``; a head ``(layer, h)``
is query head ``h`` of ``blocks.{layer}.attn.hook_z`` (per query head, so it is right under
grouped-query attention, where several query heads share one key/value head).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from interp.hooks import HookedModel

Kind = Literal["neuron", "head"]
KINDS: tuple[Kind, ...] = ("neuron", "head")
HOOK_TEMPLATES: dict[Kind, str] = {
    "neuron": "blocks.{layer}.mlp.hook_post",
    "head": "blocks.{layer}.attn.hook_z",
}


@dataclass(frozen=True, order=True)
class Component:
    """One MLP neuron or one attention (query) head."""

    kind: Kind
    layer: int
    index: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"component kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def hook_name(self) -> str:
        return hook_name(self.kind, self.layer)

    def __str__(self) -> str:
        return f"{'N' if self.kind == 'neuron' else 'H'}{self.layer}.{self.index}"


def Neuron(layer: int, index: int) -> Component:
    return Component("neuron", int(layer), int(index))


def Head(layer: int, index: int) -> Component:
    return Component("head", int(layer), int(index))


def hook_name(kind: Kind, layer: int) -> str:
    return HOOK_TEMPLATES[kind].format(layer=layer)


@dataclass(frozen=True)
class ComponentShape:
    """How many components of each kind a model has: ``[n_layers, d_mlp]`` and ``[n_layers, n_heads]``."""

    n_layers: int
    d_mlp: int
    n_heads: int

    @classmethod
    def of(cls, model: HookedModel) -> "ComponentShape":
        return cls(int(model.cfg.n_layers), int(model.cfg.d_mlp), int(model.cfg.n_heads))

    def per_layer(self, kind: Kind) -> int:
        return self.d_mlp if kind == "neuron" else self.n_heads

    def count(self, kind: Kind) -> int:
        return self.n_layers * self.per_layer(kind)

    def check(self, component: Component) -> None:
        width = self.per_layer(component.kind)
        if not 0 <= component.layer < self.n_layers:
            raise IndexError(f"{component}: layer {component.layer} is out of range [0, {self.n_layers})")
        if not 0 <= component.index < width:
            label = "neuron" if component.kind == "neuron" else "head"
            raise IndexError(f"{component}: {label} index {component.index} is out of range [0, {width})")


class ComponentSet:
    """An immutable set of components with set algebra, top-k selection and a DataFrame form."""

    __slots__ = ("_items",)

    def __init__(self, components: Iterable[Component] = ()):
        items = frozenset(components)
        bad = [c for c in items if not isinstance(c, Component)]
        if bad:
            raise TypeError(f"ComponentSet holds Component objects, got {bad[:3]}")
        self._items = items

    # -- set algebra -----------------------------------------------------------------------
    def __or__(self, other: "ComponentSet") -> "ComponentSet":
        return ComponentSet(self._items | other._items)

    def __and__(self, other: "ComponentSet") -> "ComponentSet":
        return ComponentSet(self._items & other._items)

    def __sub__(self, other: "ComponentSet") -> "ComponentSet":
        return ComponentSet(self._items - other._items)

    union, intersection, difference = __or__, __and__, __sub__

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Component]:
        return iter(sorted(self._items))

    def __contains__(self, item) -> bool:
        return item in self._items

    def __eq__(self, other) -> bool:
        return isinstance(other, ComponentSet) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        shown = ", ".join(str(c) for c in list(self)[:6])
        return f"ComponentSet({len(self)}: {shown}{', ...' if len(self) > 6 else ''})"

    def of_kind(self, kind: Kind) -> "ComponentSet":
        return ComponentSet(c for c in self._items if c.kind == kind)

    # -- addressing ------------------------------------------------------------------------
    def validate(self, shape: ComponentShape) -> "ComponentSet":
        for component in self:
            shape.check(component)
        return self

    def by_hook(self) -> dict[str, list[int]]:
        """Sorted component indices grouped by the hook point they live at."""
        grouped: dict[str, list[int]] = {}
        for c in self:
            grouped.setdefault(c.hook_name, []).append(c.index)
        return grouped

    def mask(self, kind: Kind, shape: ComponentShape) -> torch.Tensor:
        """Boolean ``[n_layers, per_layer]`` mask of this set's components of ``kind``."""
        out = torch.zeros(shape.n_layers, shape.per_layer(kind), dtype=torch.bool)
        for c in self.of_kind(kind).validate(shape):
            out[c.layer, c.index] = True
        return out

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_mask(cls, kind: Kind, mask: torch.Tensor) -> "ComponentSet":
        return cls(Component(kind, int(layer), int(i)) for layer, i in mask.nonzero().tolist())

    @classmethod
    def all(cls, shape: ComponentShape, kind: Kind) -> "ComponentSet":
        return cls.from_mask(kind, torch.ones(shape.n_layers, shape.per_layer(kind), dtype=torch.bool))

    @classmethod
    def top_k(
        cls,
        scores: Mapping[Kind, Float[Tensor, "layer _index"]] | Float[Tensor, "layer index"],
        k: int,
        *,
        kind: Kind | None = None,
        absolute: bool = False,
        largest: bool = True,
    ) -> "ComponentSet":
        """The ``k`` components with the highest (or lowest) score, across all given kinds.

        ``scores`` is one ``[layer, index]`` tensor (name its ``kind``) or a mapping of kind to
        tensor (mixed selection: neurons and heads compete on one scale). Ties break by position.
        """
        if not isinstance(scores, Mapping):
            if kind is None:
                raise ValueError("top_k on a single score tensor needs kind='neuron' or kind='head'")
            scores = {kind: scores}
        keys, flat = [], []
        for kind_, tensor in scores.items():
            if tensor.ndim != 2:
                raise ValueError(f"{kind_} scores must be [layer, index], got shape {tuple(tensor.shape)}")
            values = tensor.detach().float().cpu()
            values = values.abs() if absolute else values
            flat.append(values.flatten())
            keys += [(kind_, layer, i) for layer in range(values.shape[0]) for i in range(values.shape[1])]
        total = len(keys)
        if not 0 <= k <= total:
            raise ValueError(f"k={k} is out of range: there are {total} scored components")
        if torch.cat(flat).isnan().any():
            raise ValueError("scores contain NaN; top-k would be meaningless")
        order = torch.cat(flat).argsort(descending=largest, stable=True)[:k]
        return cls(Component(*keys[j]) for j in order.tolist())

    # -- tables ----------------------------------------------------------------------------
    def to_dataframe(self) -> pd.DataFrame:
        rows = [(c.kind, c.layer, c.index) for c in self]
        return pd.DataFrame(rows, columns=["kind", "layer", "index"]).astype(
            {"kind": str, "layer": int, "index": int}
        )

    @classmethod
    def from_dataframe(cls, frame: pd.DataFrame) -> "ComponentSet":
        missing = {"kind", "layer", "index"} - set(frame.columns)
        if missing:
            raise ValueError(f"component table lacks columns {sorted(missing)}")
        rows = frame[["kind", "layer", "index"]].itertuples(index=False)
        return cls(Component(str(k), int(layer), int(i)) for k, layer, i in rows)
