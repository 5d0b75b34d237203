"""Gradient attribution of a metric to every MLP neuron and attention head: AtP and integrated gradients.

For a clean prompt A and its token-aligned counterfactual B, the score of component ``c`` estimates
``metric(A) - metric(A with c's activation taken from B)``, summed over positions (and ``d_head``
for a head) and averaged over prompt pairs:

* ``atp`` (attribution patching): ``(act_c(A) - act_c(B)) . d metric / d act_c`` at A. Per
  microbatch: one no-grad forward on B, one forward on A with its activations captured, and one
  ``torch.autograd.grad`` call on the captured tensors.
* ``ig`` (integrated gradients, one layer at a time): for each hook point (one layer's neurons,
  or one layer's heads) the whole layer's activation is replaced by ``B + alpha (A - B)`` while
  the rest of the model runs normally, and the gradient at that replacement is averaged over
  ``ig_steps`` midpoints ``alpha = (k + 1/2) / ig_steps`` before multiplying by ``A - B``. Because
  the path is linear in the layer's activation, a layer's scores sum to the exact effect of
  patching the whole layer, ``metric(A) - metric(A with the layer from B)``, up to the midpoint
  rule's O(1/ig_steps^2) error (AtP only matches it to first order). It costs ``ig_steps``
  forward+backward runs of each prompt per hook point (several steps share a pass as extra rows
  when a microbatch holds fewer than ``batch_size`` pairs).

Everything streams over microbatches into float32 running sums; pad positions contribute nothing.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import einops
import numpy as np
import pandas as pd
import scipy.stats
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.batching import TokenBatch, microbatches
from interp.components import KINDS, Component, ComponentSet, ComponentShape, Kind, hook_name
from interp.distributed import all_reduce_sum, current_shard
from interp.hooks import HookedModel, capturing, hooked
from interp.memory import backoff_batches
from interp.metrics import Metric
from interp.patching import patch_sweep
from interp.results import SavedResult

Method = Literal["atp", "ig"]
METHODS: tuple[str, ...] = ("atp", "ig")
_GRAD_ENTRY = "blocks.0.hook_resid_pre"  # made to require grad, so frozen weights still give gradients


@dataclass(frozen=True)
class AttributionResult(SavedResult):
    """Per-component attribution scores, mean over prompt pairs (and optionally per pair)."""

    RESULT = "AttributionResult"

    scores: dict[Kind, Float[Tensor, "layer _index"]]
    per_prompt: dict[Kind, Float[Tensor, "prompt layer _index"]] | None
    n_prompts: int
    metric_clean: Float[Tensor, "prompt"]
    metric_corrupt: Float[Tensor, "prompt"]
    method: str
    ig_steps: int | None = None

    def to_dataframe(self, per_prompt: bool = False) -> pd.DataFrame:
        """Long form: ``kind, layer, index, score`` (and ``prompt`` with ``per_prompt=True``)."""
        if per_prompt and self.per_prompt is None:
            raise ValueError("this result holds no per-prompt scores; rerun attribute(..., per_prompt=True)")
        return score_frame(self.per_prompt if per_prompt else self.scores)

    def top(self, k: int, kind: Kind | None = None, absolute: bool = True) -> ComponentSet:
        """The ``k`` highest-scoring components (by ``|score|`` unless ``absolute=False``)."""
        if kind is not None and kind not in self.scores:
            raise ValueError(f"no {kind!r} scores in this result; it holds {sorted(self.scores)}")
        scores = self.scores if kind is None else {kind: self.scores[kind]}
        return ComponentSet.top_k(scores, k, absolute=absolute)

    def score_of(self, components: Iterable[Component]) -> Float[Tensor, "component"]:
        """The mean scores of ``components``, in the order given."""
        return torch.stack([self.scores[c.kind][c.layer, c.index] for c in components])

    def _tables(self) -> dict[str, pd.DataFrame]:
        tables = {"scores": self.to_dataframe(), "metrics": pd.DataFrame(
            {"prompt": np.arange(self.n_prompts), "metric_clean": self.metric_clean.numpy(),
             "metric_corrupt": self.metric_corrupt.numpy()})}
        return tables | ({} if self.per_prompt is None else {"per_prompt": self.to_dataframe(per_prompt=True)})

    def _settings(self) -> dict:
        return {"method": self.method, "ig_steps": self.ig_steps, "n_prompts": self.n_prompts,
                "shapes": {kind: list(t.shape) for kind, t in self.scores.items()}}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> "AttributionResult":
        n, shapes = settings["n_prompts"], _shapes(settings)
        metrics = tables["metrics"].sort_values("prompt")
        return cls(
            scores=_tensors_from_frame(tables["scores"], shapes),
            per_prompt=_tensors_from_frame(tables["per_prompt"], shapes, n) if "per_prompt" in tables else None,
            n_prompts=n,
            metric_clean=torch.tensor(metrics["metric_clean"].to_numpy()),
            metric_corrupt=torch.tensor(metrics["metric_corrupt"].to_numpy()),
            method=settings["method"],
            ig_steps=settings["ig_steps"],
        )


def score_frame(scores: dict[Kind, Tensor]) -> pd.DataFrame:
    """Long form of ``[layer, index]`` (or ``[prompt, layer, index]``) score tensors per kind:
    ``kind, (prompt,) layer, index, score``."""
    frames = []
    for kind, tensor in scores.items():
        values = tensor.numpy()
        grid = np.indices(values.shape).reshape(values.ndim, -1)
        columns = {"prompt": grid[0]} if values.ndim == 3 else {}
        columns |= {"layer": grid[-2], "index": grid[-1], "score": values.reshape(-1)}
        frames.append(pd.DataFrame({"kind": kind, **columns}))
    return pd.concat(frames, ignore_index=True)


def _shapes(settings: dict) -> dict[str, tuple[int, ...]]:
    return {kind: tuple(shape) for kind, shape in settings["shapes"].items()}


def _tensors_from_frame(frame: pd.DataFrame, shapes: dict[str, tuple[int, int]], n_prompts: int | None = None):
    out = {}
    for kind, shape in shapes.items():
        rows = frame[frame["kind"] == kind]
        full = shape if n_prompts is None else (n_prompts, *shape)
        values = np.zeros(full, dtype=np.float32)
        where = (rows["layer"].to_numpy(), rows["index"].to_numpy())
        if n_prompts is not None:
            where = (rows["prompt"].to_numpy(), *where)
        values[where] = rows["score"].to_numpy()
        out[kind] = torch.from_numpy(values)
    return out


# -- input checks ----------------------------------------------------------------------------------


def _check_kinds(kinds: Iterable[str]) -> tuple[Kind, ...]:
    kinds = tuple(dict.fromkeys([kinds] if isinstance(kinds, str) else kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}; got {kinds!r}")
    return kinds


def _check_pairs(clean: TokenBatch, corrupt: TokenBatch, d_vocab: int) -> None:
    for label, batch in (("clean", clean), ("corrupt", corrupt)):
        if not isinstance(batch, TokenBatch):
            raise TypeError(f"{label} must be a TokenBatch (interp.batching.tokenize), got {type(batch).__name__}")
        if batch.tokens.numel() and not 0 <= int(batch.tokens.min()) <= int(batch.tokens.max()) < d_vocab:
            raise ValueError(f"{label} holds token ids outside the model's vocabulary [0, {d_vocab})")
    if len(clean) != len(corrupt):
        raise ValueError(
            f"clean and corrupt must be row-aligned pairs: got {len(clean)} clean and {len(corrupt)} corrupt prompts"
        )
    if len(clean) == 0:
        raise ValueError("attribution needs at least one prompt pair")
    lengths_a, lengths_b = clean.lengths.cpu(), corrupt.lengths.cpu()
    differ = (lengths_a != lengths_b) | (clean.answer_pos.cpu() != corrupt.answer_pos.cpu())
    if differ.any():
        rows = differ.nonzero().flatten().tolist()
        raise ValueError(
            f"clean and corrupt prompts must be token-aligned (same length and answer position per pair); "
            f"pairs {rows[:10]} differ (clean lengths {lengths_a[rows[:10]].tolist()}, corrupt lengths "
            f"{lengths_b[rows[:10]].tolist()}). Choose counterfactuals with the same token count."
        )


def _check_metric(metric) -> None:
    if not (callable(metric) and callable(getattr(metric, "expand", None))):
        raise TypeError(
            f"metric must follow interp.metrics.Metric (an expand(batch) method and __call__(logits, batch)); "
            f"got {type(metric).__name__}"
        )


def _check_expanded(a: TokenBatch, b: TokenBatch, n_prompts: int) -> int:
    """Rows per prompt of the expanded batches, after checking they align."""
    if a.tokens.shape != b.tokens.shape or not torch.equal(a.attention_mask, b.attention_mask):
        raise ValueError(
            f"metric.expand gave clean and corrupt model batches of different layout ({tuple(a.tokens.shape)} vs "
            f"{tuple(b.tokens.shape)}); each pair must expand identically (same lengths, same candidates)"
        )
    if len(a) % n_prompts:
        raise ValueError(
            f"metric.expand returned {len(a)} rows for {n_prompts} prompts; attribution needs an equal, "
            "contiguous block of rows per prompt"
        )
    return len(a) // n_prompts


def _metric_values(metric: Metric, logits: Tensor, batch: TokenBatch, n_prompts: int) -> Float[Tensor, "prompt"]:
    values = metric(logits, batch)
    if values.shape != (n_prompts,):
        raise ValueError(
            f"the metric must return one value per prompt (shape ({n_prompts},)), got {tuple(values.shape)}"
        )
    return values


# -- the passes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HookPoint:
    kind: Kind
    layer: int

    @property
    def name(self) -> str:
        return hook_name(self.kind, self.layer)


def _hook_points(kinds: tuple[Kind, ...], n_layers: int) -> list[_HookPoint]:
    return [_HookPoint(kind, layer) for kind in kinds for layer in range(n_layers)]


def _require_grad(act, hook):
    return act if act.requires_grad else act.detach().requires_grad_(True)


def _run_capturing(model: HookedModel, batch: TokenBatch, points: list[_HookPoint], *, grad: bool):
    """Logits of ``batch`` and the activations at ``points`` (in the autograd graph when ``grad``)."""
    entry = [(_GRAD_ENTRY, _require_grad)] if grad else []
    with torch.set_grad_enabled(grad), hooked(model, entry), capturing(model, [p.name for p in points]) as store:
        logits = model(batch.tokens, **batch.forward_kwargs())
    return logits, store.joined()


def _contribution(
    delta: Float[Tensor, "row pos ..."], grad: Float[Tensor, "row pos ..."], kind: Kind
) -> Float[Tensor, "row index"]:
    """``sum over positions (and d_head) of delta * grad`` per row, in float32."""
    product = delta.float() * grad.float()
    if kind == "neuron":
        return einops.reduce(product, "row pos neuron -> row neuron", "sum")
    return einops.reduce(product, "row pos head d_head -> row head", "sum")


def _pad_mask(batch: TokenBatch, like: Tensor) -> Tensor:
    """The attention mask shaped to broadcast over ``like`` ([row, pos, ...])."""
    mask = batch.attention_mask.to(device=like.device, dtype=like.dtype)
    return mask.reshape(*mask.shape, *([1] * (like.ndim - 2)))


def _atp_batch(model: HookedModel, a: TokenBatch, b: TokenBatch, metric: Metric, points, n_prompts: int):
    logits_b, acts_b = _run_capturing(model, b, points, grad=False)
    with torch.no_grad():
        metric_b = _metric_values(metric, logits_b, b, n_prompts)
    del logits_b
    logits_a, acts_a = _run_capturing(model, a, points, grad=True)
    with torch.enable_grad():
        metric_a = _metric_values(metric, logits_a, a, n_prompts)
        grads = torch.autograd.grad(metric_a.sum(), [acts_a[p.name] for p in points], allow_unused=True)
    contributions = {}
    for point, grad in zip(points, grads):
        clean = acts_a[point.name].detach().float()
        delta = (clean - acts_b[point.name].float()) * _pad_mask(a, clean)
        grad = torch.zeros_like(clean) if grad is None else grad
        contributions[point] = _contribution(delta, grad, point.kind)
    return contributions, metric_a.detach(), metric_b


def _ig_batch(model: HookedModel, prompts: TokenBatch, a: TokenBatch, b: TokenBatch, metric: Metric, points, steps: int,
              steps_per_pass: int, bar):
    """Per-layer IG on one microbatch; ``steps_per_pass`` interpolation steps share each forward as rows."""
    n_prompts, n_rows = len(prompts), len(a)
    logits_b, acts_b = _run_capturing(model, b, points, grad=False)
    logits_a, acts_a = _run_capturing(model, a, points, grad=False)
    with torch.no_grad():
        metric_b = _metric_values(metric, logits_b, b, n_prompts)
        metric_a = _metric_values(metric, logits_a, a, n_prompts)
    del logits_a, logits_b
    chunks = list(microbatches(steps, steps_per_pass))
    stacked = {}  # steps in a pass -> the model batch of the prompts repeated that often, "(step row)"
    for k in {chunk.stop - chunk.start for chunk in chunks}:
        repeated = prompts.select(torch.arange(n_prompts, device=prompts.tokens.device).repeat(k))
        stacked[k] = metric.expand(repeated)
        if stacked[k].tokens.shape != (k * n_rows, a.tokens.shape[1]):
            raise ValueError("metric.expand must expand repeated prompts row by row as it expands each prompt")
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    contributions = {}
    for point in points:
        clean, corrupt = acts_a.pop(point.name), acts_b.pop(point.name)
        delta = clean - corrupt
        grad_sum = torch.zeros(clean.shape, dtype=torch.float32, device=clean.device)
        for chunk in chunks:
            k = chunk.stop - chunk.start
            alpha = einops.repeat(alphas[chunk], "step -> (step row)", row=n_rows).to(clean.device, clean.dtype)
            alpha = alpha.reshape(-1, *([1] * (clean.ndim - 1)))
            start = einops.repeat(corrupt, "row ... -> (step row) ...", step=k)
            step_delta = einops.repeat(delta, "row ... -> (step row) ...", step=k)
            interpolated = (start + alpha * step_delta).requires_grad_(True)
            with torch.enable_grad(), hooked(model, [(point.name, lambda act, hook, x=interpolated: x)]):
                logits = model(stacked[k].tokens, **stacked[k].forward_kwargs())
                value = _metric_values(metric, logits, stacked[k], k * n_prompts).sum()
                (grad,) = torch.autograd.grad(value, interpolated)
            grad_sum += einops.reduce(grad.float(), "(step row) ... -> row ...", "sum", step=k)
        masked = (clean.float() - corrupt.float()) * _pad_mask(a, clean)  # the difference in float32
        contributions[point] = _contribution(masked, grad_sum / steps, point.kind)
        bar.update(1)
    return contributions, metric_a, metric_b


def attribute(
    model: HookedModel,
    clean: TokenBatch,
    corrupt: TokenBatch,
    metric: Metric,
    *,
    kinds: Kind | Iterable[Kind] = KINDS,
    method: Method = "atp",
    ig_steps: int = 8,
    batch_size: int = 16,
    per_prompt: bool = False,
    progress: bool = False,
) -> AttributionResult:
    """Score every MLP neuron and attention head of ``model`` for ``metric`` on ``clean`` vs ``corrupt``.

    Args:
        clean, corrupt: row-aligned, token-aligned prompt pairs (A and its counterfactual B).
        metric: differentiable, one value per prompt; a batch-expanding metric (multi-token
            candidates) is expanded identically for A and B and its rows per prompt must be contiguous.
        kinds: ``"neuron"`` (``blocks.L.mlp.hook_post``) and/or ``"head"`` (``blocks.L.attn.hook_z``).
        method: ``"atp"`` (first order, two forwards and one backward per microbatch) or ``"ig"``
            (per-layer integrated gradients, ``ig_steps`` forward+backward passes per hook point).
        batch_size: prompt pairs per microbatch; with ``ig``, interpolation steps of a smaller
            microbatch are stacked as extra rows, up to ``batch_size`` pairs' worth per forward.
        per_prompt: also keep ``[prompt, layer, index]`` scores.

    Returns:
        An ``AttributionResult`` whose scores estimate ``metric(A) - metric(A with c from B)``.
    """
    kinds = _check_kinds(kinds)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "ig" and (not isinstance(ig_steps, int) or ig_steps < 1):
        raise ValueError(f"ig_steps must be a positive integer, got {ig_steps!r}")
    _check_metric(metric)
    _check_pairs(clean, corrupt, int(model.cfg.d_vocab))

    shape = ComponentShape.of(model)
    device = torch.device(model.cfg.device)
    points = _hook_points(kinds, shape.n_layers)
    n = len(clean)
    totals = {k: torch.zeros(shape.n_layers, shape.per_layer(k), dtype=torch.float32, device=device) for k in kinds}
    kept = ({k: torch.zeros(n, shape.n_layers, shape.per_layer(k), dtype=torch.float32) for k in kinds}
            if per_prompt else None)
    metric_a, metric_b = torch.zeros(n, dtype=torch.float32), torch.zeros(n, dtype=torch.float32)

    shard = current_shard()  # under torch.distributed each rank takes a block of pairs
    local = shard.indices(n)
    bar_total = len(local) if method == "atp" else None  # ig counts hook points per microbatch

    def run(part: slice) -> None:
        rows = local[part]
        a = clean.select(rows).to(device)
        b = corrupt.select(rows).to(device)
        n_rows = len(a)
        expanded_a, expanded_b = metric.expand(a), metric.expand(b)
        per_row = _check_expanded(expanded_a, expanded_b, n_rows)
        if method == "atp":
            contributions, m_a, m_b = _atp_batch(model, expanded_a, expanded_b, metric, points, n_rows)
            bar.update(n_rows)
        else:
            contributions, m_a, m_b = _ig_batch(
                model, a, expanded_a, expanded_b, metric, points, ig_steps, max(1, batch_size // n_rows), bar
            )
        by_prompt = {kind: einops.reduce(torch.stack([contributions[p] for p in points if p.kind == kind], dim=1),
                                         "(prompt rep) layer index -> prompt layer index", "sum", rep=per_row)
                     for kind in kinds}
        # added only once the whole microbatch is done: one that runs out of memory is retried from scratch
        metric_a[rows], metric_b[rows] = m_a.float().cpu(), m_b.float().cpu()
        for kind in kinds:
            totals[kind] += by_prompt[kind].sum(0)
            if kept is not None:
                kept[kind][rows] = by_prompt[kind].cpu()

    with tqdm(total=bar_total, disable=not progress, desc=f"{method} attribution") as bar:
        # out-of-memory halves the microbatch and retries it (reported once)
        for _ in backoff_batches(len(local), batch_size, run, what="attribution batch"):
            pass
    if shard.world_size > 1:  # sums over ranks; rows another rank owns are zero here
        for kind in kinds:
            all_reduce_sum(totals[kind])
            if kept is not None:
                kept[kind] = all_reduce_sum(kept[kind].to(device)).cpu()
        metric_a = all_reduce_sum(metric_a.to(device)).cpu()
        metric_b = all_reduce_sum(metric_b.to(device)).cpu()

    return AttributionResult(
        scores={k: (t / n).cpu() for k, t in totals.items()},
        per_prompt=kept,
        n_prompts=n,
        metric_clean=metric_a,
        metric_corrupt=metric_b,
        method=method,
        ig_steps=ig_steps if method == "ig" else None,
    )


# -- checking AtP against exact patching -------------------------------------------------------------


@dataclass(frozen=True)
class AttributionCheck(SavedResult):
    """AtP scores next to exact patching effects on a sample of components, with their rank correlation."""

    RESULT = "AttributionCheck"

    components: list[Component]
    atp: Float[Tensor, "component"]
    exact: Float[Tensor, "component"]
    from_top: list[bool]  # chosen as a top-|AtP| component (else drawn at random)
    spearman: float
    p_value: float
    n_prompts: int
    seed: int

    def to_dataframe(self) -> pd.DataFrame:
        """One row per component: ``kind, layer, index, atp, exact, selection`` (``top`` or ``random``)."""
        return pd.DataFrame(
            {
                "kind": [c.kind for c in self.components],
                "layer": [c.layer for c in self.components],
                "index": [c.index for c in self.components],
                "atp": self.atp.numpy(),
                "exact": self.exact.numpy(),
                "selection": ["top" if t else "random" for t in self.from_top],
            }
        )

    def _tables(self) -> dict[str, pd.DataFrame]:
        return {"components": self.to_dataframe()}

    def _settings(self) -> dict:
        return {"spearman": self.spearman, "p_value": self.p_value, "n_prompts": self.n_prompts, "seed": self.seed}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> "AttributionCheck":
        frame = tables["components"]
        return cls(
            components=[Component(k, int(layer), int(i))
                        for k, layer, i in frame[["kind", "layer", "index"]].itertuples(index=False)],
            atp=torch.tensor(frame["atp"].to_numpy()),
            exact=torch.tensor(frame["exact"].to_numpy()),
            from_top=(frame["selection"] == "top").tolist(),
            **settings,
        )


def atp_check(
    model: HookedModel,
    clean: TokenBatch,
    corrupt: TokenBatch,
    metric: Metric,
    *,
    n_components: int = 64,
    seed: int = 0,
    kinds: Kind | Iterable[Kind] = KINDS,
    batch_size: int = 16,
    attribution: AttributionResult | None = None,
    progress: bool = False,
) -> AttributionCheck:
    """Rank-correlate AtP with exact activation patching on a sample of components.

    The sample is the ``n_components // 2`` components with the largest ``|AtP|`` plus a seeded
    uniform draw of the rest from the remaining components of ``kinds``. The exact effect of a
    component is ``metric(A) - metric(A with it patched from B)``, averaged over prompts (the sign
    AtP estimates). Pass a precomputed AtP ``attribution`` to skip recomputing it.
    """
    kinds = _check_kinds(kinds)
    if attribution is None:
        attribution = attribute(model, clean, corrupt, metric, kinds=kinds, batch_size=batch_size, progress=progress)
    elif attribution.method != "atp" or attribution.n_prompts != len(clean):
        raise ValueError(
            f"the given attribution must be AtP on these {len(clean)} prompts; got method "
            f"{attribution.method!r} on {attribution.n_prompts} prompts"
        )
    missing = [k for k in kinds if k not in attribution.scores]
    if missing:
        raise ValueError(f"the given attribution has no {missing} scores; compute it with kinds={kinds}")
    scores = {k: attribution.scores[k] for k in kinds}
    total = sum(t.numel() for t in scores.values())
    if not 3 <= n_components <= total:
        raise ValueError(
            f"n_components must be between 3 and the {total} components of kinds {kinds}, got {n_components}")

    top = ComponentSet.top_k(scores, n_components // 2, absolute=True)
    shape = ComponentShape.of(model)
    pool = [c for kind in kinds for c in ComponentSet.all(shape, kind) if c not in top]
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randperm(len(pool), generator=generator)[: n_components - len(top)].sort().values
    components = list(top) + [pool[i] for i in drawn.tolist()]

    patched = patch_sweep(model, target=clean, source=corrupt, metric=metric, variants=components, progress=progress)
    exact = (patched.baseline[None, :] - patched.values).mean(-1).float()
    atp = attribution.score_of(components).float()
    correlation = scipy.stats.spearmanr(atp.numpy(), exact.numpy())
    return AttributionCheck(
        components=components,
        atp=atp,
        exact=exact,
        from_top=[c in top for c in components],
        spearman=float(correlation.statistic),
        p_value=float(correlation.pvalue),
        n_prompts=len(clean),
        seed=seed,
    )


# -- pair-free attribution of an ablation ------------------------------------------------------------


@dataclass(frozen=True)
class AblationAttribution(SavedResult):
    """First-order estimates of ablating each component, per prompt and weighted over prompts.

    For prompt ``i`` and component ``c``, ``e_i(c) = sum over positions (and d_head) of
    d metric_i / d act_c . (value_c - act_c)``, the linear estimate of ``metric_i(ablated) -
    metric_i``; ``scores[c] = sum_i weights_i e_i(c)``. ``per_prompt`` holds ``e_i`` unweighted.
    """

    RESULT = "AblationAttribution"

    scores: dict[Kind, Float[Tensor, "layer _index"]]
    per_prompt: dict[Kind, Float[Tensor, "prompt layer _index"]] | None
    weights: Float[Tensor, "prompt"]
    metric: Float[Tensor, "prompt"]
    how: str

    @property
    def n_prompts(self) -> int:
        return len(self.weights)

    def to_dataframe(self) -> pd.DataFrame:
        """Long form: ``kind, layer, index, score``."""
        return score_frame(self.scores)

    def top(self, k: int, kind: Kind | None = None, absolute: bool = True) -> ComponentSet:
        """The ``k`` components with the largest ``|score|`` (or score, ``absolute=False``)."""
        return ComponentSet.top_k(self.scores if kind is None else {kind: self.scores[kind]}, k, absolute=absolute)

    def score_of(self, components: Iterable[Component]) -> Float[Tensor, "component"]:
        return torch.stack([self.scores[c.kind][c.layer, c.index] for c in components])

    def _tables(self) -> dict[str, pd.DataFrame]:
        tables = {"scores": self.to_dataframe(), "prompts": pd.DataFrame(
            {"prompt": np.arange(self.n_prompts), "metric": self.metric.numpy(), "weight": self.weights.numpy()})}
        return tables | ({} if self.per_prompt is None else {"per_prompt": score_frame(self.per_prompt)})

    def _settings(self) -> dict:
        return {"how": self.how, "shapes": {k: list(t.shape) for k, t in self.scores.items()}}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> "AblationAttribution":
        prompts, shapes = tables["prompts"].sort_values("prompt"), _shapes(settings)
        return cls(
            scores=_tensors_from_frame(tables["scores"], shapes),
            per_prompt=_tensors_from_frame(tables["per_prompt"], shapes, len(prompts)) if "per_prompt" in tables
            else None,
            weights=torch.tensor(prompts["weight"].to_numpy(), dtype=torch.float32),
            metric=torch.tensor(prompts["metric"].to_numpy(), dtype=torch.float32),
            how=settings["how"],
        )


def _replacements(
    model: HookedModel, kinds: tuple[Kind, ...], how: str, means, source: TokenBatch | None, seed: int
) -> dict:
    """Per hook name, ``act -> the ablated value of every unit``, from ``interp.ablation``'s own hooks."""
    from interp.ablation import Ablation, ablation_hooks

    shape = ComponentShape.of(model)
    everything = ComponentSet()
    for kind in kinds:
        everything |= ComponentSet.all(shape, kind)
    spec = Ablation(everything, how, means=means, source=source, seed=seed)
    return dict(ablation_hooks(model, spec))


def ablation_attribution(
    model: HookedModel,
    batch: TokenBatch,
    metric: Metric,
    *,
    weights: Float[Tensor, "prompt"] | None = None,
    how: str = "zero",
    means=None,
    seed: int = 0,
    kinds: Kind | Iterable[Kind] = KINDS,
    batch_size: int = 16,
    per_prompt: bool = False,
    progress: bool = False,
) -> AblationAttribution:
    """Linear estimate of ablating each MLP neuron and attention head alone, on every prompt of ``batch``.

    No counterfactual is needed: the ablated value is the one ``interp.ablation.ablated`` would use
    (``zero``; ``mean`` with ``means``; ``resample`` from another prompt of the same microbatch,
    seeded), and the estimate for prompt ``i`` is ``grad metric_i . (value - act)`` summed over every
    real position of the metric's expanded batch (the ablation applies at all of them). One forward
    and one backward per microbatch; running float32 sums. With ``weights`` (default ``1/n``) the
    score is ``sum_i w_i e_i``: e.g. ``+1/n_A`` and ``-1/n_B`` give the estimated change of the gap
    mean(A) - mean(B). ``per_prompt`` keeps ``e_i`` for every component (``[prompt, layer, index]``).
    """
    kinds = _check_kinds(kinds)
    _check_metric(metric)
    if not isinstance(batch, TokenBatch) or len(batch) == 0:
        raise ValueError("ablation_attribution needs a non-empty TokenBatch (interp.batching.tokenize)")
    n = len(batch)
    weights = torch.full((n,), 1.0 / n) if weights is None else torch.as_tensor(weights, dtype=torch.float32).cpu()
    if weights.shape != (n,):
        raise ValueError(f"weights must hold one value per prompt ({n}), got shape {tuple(weights.shape)}")
    shape = ComponentShape.of(model)
    device = torch.device(model.cfg.device)
    points = _hook_points(kinds, shape.n_layers)
    fixed = None if how == "resample" else _replacements(model, kinds, how, means, None, seed)
    totals = {k: torch.zeros(shape.n_layers, shape.per_layer(k), dtype=torch.float32) for k in kinds}
    kept = ({k: torch.zeros(n, shape.n_layers, shape.per_layer(k), dtype=torch.float32) for k in kinds}
            if per_prompt else None)
    values = torch.zeros(n, dtype=torch.float32)

    def run(rows: slice) -> None:
        expanded = metric.expand(batch.select(rows).to(device))
        n_rows = rows.stop - rows.start
        if len(expanded) % n_rows:
            raise ValueError(f"metric.expand returned {len(expanded)} rows for {n_rows} prompts; need equal blocks")
        per_row = len(expanded) // n_rows
        replace = fixed or _replacements(model, kinds, how, means, expanded, seed)
        logits, acts = _run_capturing(model, expanded, points, grad=True)
        with torch.enable_grad():
            metric_values = _metric_values(metric, logits, expanded, n_rows)
            grads = torch.autograd.grad(metric_values.sum(), [acts[p.name] for p in points], allow_unused=True)
        del logits
        by_prompt = {}
        for point, grad in zip(points, grads):
            act = acts[point.name].detach()
            with torch.no_grad():
                delta = (replace[point.name](act, None).float() - act.float()) * _pad_mask(expanded, act)
            grad = torch.zeros_like(delta) if grad is None else grad
            row = _contribution(delta, grad, point.kind)
            by_prompt[point] = einops.reduce(row, "(prompt rep) index -> prompt index", "sum", rep=per_row).cpu()
        # added only once every hook point is done: a microbatch that runs out of memory is retried from scratch
        w = weights[rows]
        for point, values_of in by_prompt.items():
            totals[point.kind][point.layer] += w @ values_of
            if kept is not None:
                kept[point.kind][rows, point.layer] = values_of
        values[rows] = metric_values.detach().float().cpu()
        bar.update(n_rows)

    with tqdm(total=n, disable=not progress, desc=f"{how}-ablation attribution") as bar:
        for _ in backoff_batches(n, batch_size, run, what="attribution batch"):
            pass
    return AblationAttribution(scores=totals, per_prompt=kept, weights=weights, metric=values, how=how)
