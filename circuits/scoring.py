"""Component scores for a context: which neurons and heads carry its bias.

The main score is attribution patching (AtP) of the context's deterministic metric over its
counterfactual pairs: for each component, the estimated drop in ``metric(A) - metric(B)`` when
that component's activation on A is replaced by its value on B. Scores are *oriented*
(multiplied by the sign of the measured gap, so positive means "carries the gap as measured")
and *scaled* by the width of the context's answer grid, so contexts with different units
compare. Top candidates can be refined by exact patching. The papers' scores are baselines:
Wanda-style per-group activation-weighted norms with set difference, attention paid to the
name, weight magnitude and random.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from circuits.evaluation import EvalSet
from circuits.pruning import wanda_set_difference, weight_magnitude_scores
from interp.activations import activation_norms, attention_to_positions
from interp.attribution import AttributionResult, attribute
from interp.components import ComponentSet, ComponentShape, hook_name
from interp.patching import patch_sweep


@dataclass(frozen=True)
class ContextScores:
    """Oriented, grid-scaled scores of every neuron and head for one context."""

    context: str
    scores: dict[str, Float[Tensor, "layer index"]]
    attribution: AttributionResult
    orientation: float
    scale: float
    refined: pd.DataFrame | None = None
    settings: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        return float((self.attribution.metric_clean - self.attribution.metric_corrupt).mean())

    def per_prompt(self) -> dict[str, Float[Tensor, "prompt layer index"]]:
        if self.attribution.per_prompt is None:
            raise ValueError("no per-prompt scores; score with per_prompt=True")
        return {k: v * self.orientation / self.scale for k, v in self.attribution.per_prompt.items()}

    def top(self, k: int, kind: str | None = None) -> ComponentSet:
        scores = self.scores if kind is None else {kind: self.scores[kind]}
        return ComponentSet.top_k(scores, k)

    def to_dataframe(self) -> pd.DataFrame:
        frames = []
        for kind, values in self.scores.items():
            layers, index = torch.meshgrid(torch.arange(values.shape[0]), torch.arange(values.shape[1]), indexing="ij")
            frames.append(pd.DataFrame({"context": self.context, "kind": kind, "layer": layers.flatten().numpy(),
                                        "index": index.flatten().numpy(), "score": values.flatten().numpy()}))
        return pd.concat(frames, ignore_index=True)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        self.attribution.save(out / "attribution")
        if self.refined is not None:
            self.refined.to_parquet(out / "refined.parquet", index=False)
        meta = {"context": self.context, "orientation": self.orientation, "scale": self.scale, **self.settings}
        (out / "scores.json").write_text(json.dumps(meta, indent=2, default=str))
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> "ContextScores":
        out = Path(out_dir)
        meta = json.loads((out / "scores.json").read_text())
        attribution = AttributionResult.load(out / "attribution")
        refined = pd.read_parquet(out / "refined.parquet") if (out / "refined.parquet").exists() else None
        context, orientation, scale = meta.pop("context"), meta.pop("orientation"), meta.pop("scale")
        return _oriented(context, attribution, orientation, scale, refined, meta)


def _oriented(context, attribution, orientation, scale, refined, settings) -> ContextScores:
    scores = {k: v * orientation / scale for k, v in attribution.scores.items()}
    if refined is not None:
        for row in refined.itertuples(index=False):
            scores[row.kind][row.layer, row.index] = row.exact * orientation / scale
    return ContextScores(context, scores, attribution, orientation, scale, refined, settings)


def grid_scale(metric) -> float:
    """Width of the metric's answer grid (max - min value), 1 for metrics without a grid."""
    values = getattr(getattr(metric, "candidates", None), "values", None)
    return float(max(values) - min(values)) if values else 1.0


def score_context(
    model,
    eval_set: EvalSet,
    *,
    method: str = "atp",
    refine_top: int = 0,
    per_prompt: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> ContextScores:
    """AtP (or IG) scores of every neuron and head for one context's pairs (A = clean rows).

    ``refine_top`` > 0 replaces the scores of that many top |AtP| components by their exact
    patching effect (one batched sweep).
    """
    pairs = eval_set.pairs
    result = attribute(model, pairs.clean, pairs.corrupt, eval_set.metric, method=method,
                       batch_size=batch_size, per_prompt=per_prompt, progress=progress)
    gap = float((result.metric_clean - result.metric_corrupt).mean())
    orientation = 1.0 if gap >= 0 else -1.0
    refined = None
    if refine_top > 0:
        top = list(result.top(refine_top))
        sweep = patch_sweep(model, pairs.clean, pairs.corrupt, eval_set.metric, [ComponentSet([c]) for c in top],
                            progress=progress)
        exact = (sweep.baseline[None, :] - sweep.values).mean(-1)
        refined = pd.DataFrame({"kind": [c.kind for c in top], "layer": [c.layer for c in top],
                                "index": [c.index for c in top], "atp": result.score_of(top).numpy(),
                                "exact": exact.numpy()})
    settings = {"method": method, "refine_top": refine_top, "n_pairs": len(pairs)}
    return _oriented(eval_set.name, result, orientation, grid_scale(eval_set.metric), refined, settings)


def wanda_scores(model, batch, *, batch_size: int = 16) -> dict[str, Float[Tensor, "layer index"]]:
    """Structured Wanda scores from each layer's real inputs: ||x_unit|| * ||unit's output weights||.

    A neuron's input to the down projection is its ``hook_post`` activation; a head's is its
    ``hook_z`` slice. Norms are over every real token of ``batch``.
    """
    shape = ComponentShape.of(model)
    names = [hook_name("neuron", layer) for layer in range(shape.n_layers)]
    names += [hook_name("head", layer) for layer in range(shape.n_layers)]
    norms = activation_norms(model, batch, names, batch_size=batch_size)
    with torch.no_grad():
        w_out = torch.linalg.vector_norm(model.W_out.float(), dim=-1).cpu()  # layer d_mlp
        w_o = torch.linalg.vector_norm(model.W_O.float(), dim=-1).cpu()  # layer head d_head
    neuron = torch.stack([norms[hook_name("neuron", layer)].float().cpu() for layer in range(shape.n_layers)])
    head_x = torch.stack([norms[hook_name("head", layer)].float().cpu() for layer in range(shape.n_layers)])
    # a head's unit score: Wanda's |W| * ||x|| summed over its d_head input features
    return {"neuron": neuron * w_out, "head": (head_x * w_o).sum(-1)}


def baseline_sets(
    model, eval_set: EvalSet, *, top_fraction: float = 0.15, batch_size: int = 16
) -> dict[str, dict[str, Tensor] | ComponentSet]:
    """The papers' scores for one context's pairs.

    ``wanda_difference``: neurons and heads in group A's top ``top_fraction`` Wanda scores but not
    group B's (per layer); ``attention_to_name``: [layer, head] attention the answer position pays
    to the name's tokens (mean over A and B rows); ``magnitude``: weight-norm scores.
    """
    pairs = eval_set.pairs
    wanda_a = wanda_scores(model, pairs.clean, batch_size=batch_size)
    wanda_b = wanda_scores(model, pairs.corrupt, batch_size=batch_size)
    difference = ComponentSet()
    for kind in ("neuron", "head"):
        difference |= wanda_set_difference(wanda_a[kind], wanda_b[kind], top_fraction=top_fraction, kind=kind)
    attention = (
        attention_to_positions(model, pairs.clean, pairs.name_mask, batch_size=batch_size)
        + attention_to_positions(model, pairs.corrupt, pairs.name_mask, batch_size=batch_size)
    ) / 2
    return {
        "wanda_difference": difference,
        "attention_to_name": {"head": attention.cpu()},
        "magnitude": weight_magnitude_scores(model),
    }
