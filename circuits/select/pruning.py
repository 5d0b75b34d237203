"""Pruning strategies: from component scores to the ``ComponentSet`` to ablate.

Scores are ``{kind: [layer, index]}`` tensors (``kind`` is ``"neuron"`` or ``"head"``); unless a
function says otherwise, a higher score means the component carries more bias, so it is pruned first.

Strategies: top-k per kind, FASP (Zayed et al. 2024), the "common" set of several
contexts (Ma et al. 2025), and the baselines: random sets (optionally matching another set's
per-layer counts), weight magnitude, and the Wanda set difference between two groups' scores.
``null_sets`` draws the random sets of the same kind and size that a strategy is compared against.
``STRATEGIES`` is the registry a study chooses from by name (``select`` applies it).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interp.components import KINDS, ComponentSet, ComponentShape, Kind
from interp.hooks import HookedModel
from interp.weights import weight_norms

Scores = Mapping[Kind, Float[Tensor, "layer _index"]]


def _floor_fraction(fraction: float, n: int) -> int:
    """``floor(fraction * n)``, robust to float error (``0.7 * 10`` is 7, not 6)."""
    return math.floor(fraction * n + 1e-9)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")


def shape_of_scores(scores: Scores) -> ComponentShape:
    """The ``ComponentShape`` that ``scores`` cover (width 0 for a kind that is absent)."""
    layers = {kind: tensor.shape[0] for kind, tensor in scores.items()}
    if len(set(layers.values())) > 1:
        raise ValueError(f"scores disagree on the number of layers: {layers}")
    widths = {kind: _kind_scores(scores, kind).shape[1] for kind in scores}
    return ComponentShape(next(iter(layers.values()), 0), widths.get("neuron", 0), widths.get("head", 0))


def _kind_scores(scores: Scores, kind: Kind) -> Float[Tensor, "layer index"]:
    if kind not in scores:
        raise ValueError(f"no {kind!r} scores given (have {sorted(scores)}); pass scores[{kind!r}] as [layer, index]")
    tensor = scores[kind]
    if tensor.ndim != 2:
        raise ValueError(f"{kind} scores must be [layer, index], got shape {tuple(tensor.shape)}")
    return tensor.detach().float().cpu()


# -- top-k ---------------------------------------------------------------------------------------
def top_k_neurons(scores: Scores, k: int, *, absolute: bool = False) -> ComponentSet:
    """The ``k`` MLP neurons with the highest score (``absolute``: highest magnitude)."""
    return ComponentSet.top_k(_kind_scores(scores, "neuron"), k, kind="neuron", absolute=absolute)


def top_k_heads(scores: Scores, k: int, *, absolute: bool = False) -> ComponentSet:
    """The ``k`` attention heads with the highest score (``absolute``: highest magnitude)."""
    return ComponentSet.top_k(_kind_scores(scores, "head"), k, kind="head", absolute=absolute)


# -- FASP ----------------------------------------------------------------------------------------
def fasp(
    head_bias: Float[Tensor, "layer head"],
    head_utility: Float[Tensor, "layer head"],
    *,
    gamma: float = 0.5,
    alpha: float = 0.1,
) -> ComponentSet:
    """FASP head selection (Zayed et al. 2024): protect the heads utility needs, prune the most biased.

    With ``N`` heads in all:
    1. protect the ``floor(gamma * N)`` heads with the highest ``head_utility``: the damage to
       utility when that head alone is removed (perplexity or KL increase; higher = more needed);
    2. among the other heads, prune the ``floor(alpha * N)`` with the highest ``head_bias``: the
       bias reduction when that head alone is removed, ``bias(full model) - bias(model without h)``.

    The paper prunes "the heads whose removal gives the lowest bias"; ``bias(full model)`` is a
    constant, so lowest bias-without-``h`` is highest ``head_bias`` here. If you have the paper's
    ``z_bias`` (bias of the model without ``h``), pass ``-z_bias``. Ties break by position.
    """
    _check_fraction("gamma", gamma)
    _check_fraction("alpha", alpha)
    if gamma + alpha > 1.0 + 1e-9:
        raise ValueError(f"gamma + alpha must be <= 1 (protected and pruned heads are disjoint), got {gamma} + {alpha}")
    if head_bias.ndim != 2 or head_bias.shape != head_utility.shape:
        raise ValueError(
            f"head_bias and head_utility must both be [layer, head] of one shape, got "
            f"{tuple(head_bias.shape)} and {tuple(head_utility.shape)}"
        )
    bias = head_bias.detach().float().cpu().flatten()
    utility = head_utility.detach().float().cpu().flatten()
    if bias.isnan().any() or utility.isnan().any():
        raise ValueError("head_bias or head_utility contains NaN; score every head before selecting")
    n = bias.numel()
    n_protect, n_prune = _floor_fraction(gamma, n), _floor_fraction(alpha, n)
    protected = utility.argsort(descending=True, stable=True)[:n_protect]
    candidates = torch.ones(n, dtype=torch.bool)
    candidates[protected] = False
    ranked = bias.masked_fill(~candidates, -math.inf).argsort(descending=True, stable=True)
    pruned = torch.zeros(n, dtype=torch.bool)
    pruned[ranked[:n_prune]] = True
    return ComponentSet.from_mask("head", pruned.view_as(head_bias))


# -- sets of several contexts --------------------------------------------------------------------
def common(sets: Sequence[ComponentSet], *, min_count: int | None = None) -> ComponentSet:
    """Components selected in at least ``min_count`` of ``sets`` (default: in all of them).

    Ma et al. (2025) built their generalized pruning sets this way: the heads (or weights)
    selected for every training item.
    """
    if len(sets) == 0:
        raise ValueError("common() needs at least one component set")
    needed = len(sets) if min_count is None else min_count
    if not 1 <= needed <= len(sets):
        raise ValueError(f"min_count must be in [1, {len(sets)}] (the number of sets), got {min_count}")
    counts = Counter(c for s in sets for c in s)
    return ComponentSet(c for c, n in counts.items() if n >= needed)


# -- baselines -----------------------------------------------------------------------------------
def random_layer_masks(
    counts: Sequence[int], width: int, n_samples: int, generator: torch.Generator
) -> Bool[Tensor, "sample layer index"]:
    """``n_samples`` uniformly random masks choosing ``counts[layer]`` of ``width`` units in each layer."""
    if any(not 0 <= c <= width for c in counts):
        raise ValueError(f"per-layer counts must lie in [0, {width}], got {list(counts)}")
    masks = torch.zeros(n_samples, len(counts), width, dtype=torch.bool)
    for layer, count in enumerate(counts):
        if count:
            chosen = torch.rand(n_samples, width, generator=generator).topk(count, dim=1).indices
            masks[:, layer].scatter_(1, chosen, True)
    return masks


def random_set(
    shape: ComponentShape,
    kind: Kind,
    k: int | None = None,
    *,
    seed: int,
    per_layer_like: ComponentSet | None = None,
) -> ComponentSet:
    """``k`` components of ``kind`` drawn uniformly at random (same ``seed``, same set).

    With ``per_layer_like``, draw as many per layer as that set holds of ``kind`` (then ``k`` may be
    omitted; if given it must equal that set's size of ``kind``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    generator = torch.Generator().manual_seed(seed)
    width = shape.per_layer(kind)
    if per_layer_like is not None:
        counts = per_layer_like.mask(kind, shape).sum(dim=1).tolist()
        if k is not None and k != sum(counts):
            raise ValueError(f"k={k} but per_layer_like holds {sum(counts)} {kind}s; omit k or make them agree")
        return ComponentSet.from_mask(kind, random_layer_masks(counts, width, 1, generator)[0])
    total = shape.count(kind)
    if k is None or not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}] (the number of {kind}s), got {k}")
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.rand(total, generator=generator).topk(k).indices] = True
    return ComponentSet.from_mask(kind, mask.view(shape.n_layers, width))


def null_sets(components: ComponentSet, shape: ComponentShape, *, n_draws: int, seed: int = 0) -> list[ComponentSet]:
    """``n_draws`` seeded random sets of the same kind and size as ``components``: the null of a strategy.

    Neurons keep the set's per-layer counts; heads are drawn uniformly over all heads (same number).
    Draw ``d`` of a given ``seed`` is always the same set.
    """
    if n_draws < 0:
        raise ValueError(f"n_draws must be >= 0, got {n_draws}")
    counts = {kind: sum(1 for c in components if c.kind == kind) for kind in KINDS}
    draws = []
    for draw in range(n_draws):
        drawn = ComponentSet()
        if counts["neuron"]:
            drawn |= random_set(shape, "neuron", seed=seed * 7919 + 2 * draw, per_layer_like=components)
        if counts["head"]:
            drawn |= random_set(shape, "head", counts["head"], seed=seed * 7919 + 2 * draw + 1)
        draws.append(drawn)
    return draws


def weight_magnitude_scores(model: HookedModel) -> dict[Kind, Float[Tensor, "layer _index"]]:
    """Weight-norm importance of every neuron and head (the magnitude baseline).

    Neuron ``(L, i)``: product of the L2 norms of its weight vectors, input column of ``W_in``,
    gate column of ``W_gate`` (gated MLPs only) and output row of ``W_out``. Head ``(L, h)``: the
    Frobenius norm of its ``W_O[L, h]`` slice ``[d_head, d_model]`` (norms from ``interp.weights``).
    """
    norms = weight_norms(model)
    shape = ComponentShape.of(model)
    neuron = norms["W_out"] * norms["W_in"]
    if norms["W_gate"] is not None:
        neuron = neuron * norms["W_gate"]
    head = torch.linalg.vector_norm(norms["W_O"], dim=-1)  # the Frobenius norm of W_O[L, h]
    expected = {"neuron": (shape.n_layers, shape.d_mlp), "head": (shape.n_layers, shape.n_heads)}
    scores = {"neuron": neuron, "head": head}
    for kind, tensor in scores.items():
        if tuple(tensor.shape) != expected[kind]:
            raise ValueError(f"{kind} weight scores have shape {tuple(tensor.shape)}, expected {expected[kind]}")
    return scores


def wanda_set_difference(
    score_a: Float[Tensor, "layer index"],
    score_b: Float[Tensor, "layer index"],
    *,
    top_fraction: float = 0.15,
    kind: Kind = "neuron",
) -> ComponentSet:
    """Units in group A's top ``top_fraction`` of their layer and not in group B's (Ma et al. 2025).

    ``score_a``/``score_b`` are per-unit Wanda-style importances computed from each group's own
    calibration prompts, with each layer's real inputs. Unlike the paper, which scored single
    weights (unstructured), we score structured units (whole neurons or heads), so pruning one is
    a clean ablation. Per layer, the top ``floor(top_fraction * width)`` units of each group are
    taken (ties by position) and the difference kept; the result is the union over layers.
    """
    _check_fraction("top_fraction", top_fraction)
    if score_a.ndim != 2 or score_a.shape != score_b.shape:
        raise ValueError(
            f"score_a and score_b must both be [layer, index] of one shape, got "
            f"{tuple(score_a.shape)} and {tuple(score_b.shape)}"
        )
    n_top = _floor_fraction(top_fraction, score_a.shape[1])

    def top_mask(scores: Tensor) -> Tensor:
        values = scores.detach().float().cpu()
        if values.isnan().any():
            raise ValueError("Wanda scores contain NaN")
        mask = torch.zeros_like(values, dtype=torch.bool)
        mask.scatter_(1, values.argsort(dim=1, descending=True, stable=True)[:, :n_top], True)
        return mask

    return ComponentSet.from_mask(kind, top_mask(score_a) & ~top_mask(score_b))


# -- the strategy registry ---------------------------------------------------------------------
@runtime_checkable
class SelectionSettings(Protocol):
    """The settings a strategy reads (a study config has them)."""

    neuron_ks: Sequence[int]
    head_ks: Sequence[int]
    fasp_gamma: float
    fasp_alphas: Sequence[float]
    seed: int


Picked = Iterator[tuple[str, int, ComponentSet]]  # (strategy name, k, components)


@dataclass(frozen=True)
class Strategy:
    """A pruning strategy: ``pick(settings, scores, inputs)`` yields its sets for one context from the
    context's scores and the study results named in ``reads`` (``inputs[name]``); a ``common``
    strategy picks once from every context's scores (``{context: scores}``)."""

    doc: str
    pick: Callable[..., Picked]
    reads: tuple[str, ...] = ()
    common: bool = False


def _top_k_neurons(c: SelectionSettings, scores: Scores, inputs) -> Picked:
    for k in c.neuron_ks:
        yield "top_k_neurons", k, top_k_neurons(scores, k)


def _random(c: SelectionSettings, scores: Scores, inputs) -> Picked:
    for k in c.neuron_ks:
        like = top_k_neurons(scores, k)
        yield "random", k, random_set(shape_of_scores(scores), "neuron", k, seed=c.seed, per_layer_like=like)


def _top_k_heads(c: SelectionSettings, scores: Scores, inputs) -> Picked:
    for k in c.head_ks:
        yield "top_k_heads", k, top_k_heads(scores, k)


def _attention_to_name(c: SelectionSettings, scores: Scores, inputs) -> Picked:
    for k in c.head_ks:
        yield "attention_to_name", k, top_k_heads({"head": inputs["baselines"].attention_to_name}, k)


def _fasp(c: SelectionSettings, scores: Scores, inputs) -> Picked:
    for alpha in c.fasp_alphas:
        chosen = fasp(inputs["head_bias"], inputs["head_utility"], gamma=c.fasp_gamma, alpha=alpha)
        yield "fasp", len(chosen), chosen


def _wanda_difference(c: SelectionSettings, scores: Scores, inputs) -> Picked:
    chosen = inputs["baselines"].wanda_difference
    yield "wanda_difference", len(chosen), chosen


def _common(c: SelectionSettings, scores: Mapping[str, Scores], inputs) -> Picked:
    for kind, ks in (("neuron", c.neuron_ks), ("head", c.head_ks)):
        for k in ks:
            sets = [ComponentSet.top_k(s[kind], k, kind=kind) for s in scores.values()]
            yield f"common_{kind}s", k, common(sets, min_count=max(2, len(sets) - 1))


STRATEGIES: dict[str, Strategy] = {  # in the order their sets are listed
    "top_k_neurons": Strategy("top-k AtP neurons per context", _top_k_neurons),
    "random": Strategy("random neurons, per layer as many as the top-k set", _random),
    "top_k_heads": Strategy("top-k AtP heads per context", _top_k_heads),
    "attention_to_name": Strategy("the paper's head ranking: heads attending most to the name",
                                  _attention_to_name, ("baselines",)),
    "fasp": Strategy("FASP: protect utility-critical heads, prune the most bias-carrying of the rest",
                     _fasp, ("head_bias", "head_utility")),
    "wanda_difference": Strategy("the paper's neuron method: group A's top Wanda units not in group B's",
                                 _wanda_difference, ("baselines",)),
    "common": Strategy("neurons (and heads) in the top-k of all but at most one training context (at least two)",
                       _common, common=True),
}


def strategy_reads(names: Sequence[str]) -> set[str]:
    """The study results the strategies ``names`` read beside the scores."""
    return {r for name in names for r in STRATEGIES[name].reads}


def select(
    names: Sequence[str], settings: SelectionSettings, scores: Mapping[str, Scores],
    inputs: Mapping[str, Mapping[str, object] | object] | None = None,
) -> list[tuple[str, int, str, ComponentSet]]:
    """``(strategy, k, train context, components)`` of every set the strategies ``names`` pick from
    each context's ``scores``: per context in registry order, then the common sets. ``inputs[name]``
    is a per-context result as ``{context: value}`` or a whole-study one (the strategies' ``reads``)."""
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown pruning strategy {unknown}; known: {list(STRATEGIES)}")
    inputs = inputs or {}
    chosen = [s for n, s in STRATEGIES.items() if n in names]
    out = []
    for ctx, ctx_scores in scores.items():
        here = {r: v[ctx] if isinstance(v, Mapping) else v for r, v in inputs.items()}
        for strategy in (s for s in chosen if not s.common):
            picked = strategy.pick(settings, ctx_scores, here)
            out += [(name, int(k), ctx, components) for name, k, components in picked]
    for strategy in (s for s in chosen if s.common):
        out += [(name, int(k), "common", components) for name, k, components in strategy.pick(settings, scores, inputs)]
    return out
