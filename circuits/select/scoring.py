"""Component scores for a context: which neurons and heads carry its bias.

The main score is pair-free (``score_prompts``): on every prompt of the training split, the
first-order estimate of the ablation the study applies (zero or mean), grad(gap) . (ablated value -
activation), where the gap is mean over group A prompts minus mean over group B prompts of the
context's metric (``interp.attribution.ablation_attribution`` with weights +1/n_A and -1/n_B).
The top ``refine_top`` candidates of each kind, plus ``n_random`` drawn at random, are re-scored by
exact batched ablation of each alone (``interp.sweeps.metric_sweep``); the Spearman correlation
of estimate and exact is recorded, and the exact scores replace the estimates they cover, so the
selection of a top-k with k <= ``refine_top`` ranks exact effects. Counterfactual pair AtP
(``score_context``) remains as an option. Scores are *oriented* (multiplied by the sign of the
measured gap, so positive means "ablating it shrinks the gap as measured") and *scaled* by a
robust width of the context's answer values (``grid_scale``: their interquartile range as the
metric summarizes them), so contexts with different units compare. The papers' scores
are baselines (``Baselines``): Wanda-style per-group activation-weighted norms with set difference
and attention paid to the name. ``HeadScores`` keeps one score per head (FASP's z_bias and z_ppl).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from circuits.evaluate.evaluation import EvalSet, prompt_values
from circuits.inputs.prompts import span_aligned
from circuits.measure.stats import correlation
from circuits.select.pruning import wanda_set_difference
from interp.activations import activation_norms, attention_to_positions
from interp.attribution import AblationAttribution, AttributionResult, ablation_attribution, attribute
from interp.components import ComponentSet, ComponentShape, Head, hook_name
from interp.hooks import HookedModel
from interp.patching import patch_sweep
from interp.results import SavedResult
from interp.weights import weight_norms


@dataclass(frozen=True)
class ContextScores(SavedResult):
    """Oriented, grid-scaled scores of every neuron and head for one context."""

    RESULT = "ContextScores"

    context: str
    scores: dict[str, Float[Tensor, "layer _index"]]
    attribution: AttributionResult | AblationAttribution
    orientation: float
    scale: float
    refined: pd.DataFrame | None = None
    settings: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        if isinstance(self.attribution, AblationAttribution):
            return float(self.attribution.weights @ self.attribution.metric)
        return float((self.attribution.metric_clean - self.attribution.metric_corrupt).mean())

    def per_prompt(self) -> dict[str, Float[Tensor, "prompt layer _index"]]:
        """Oriented, scaled per-prompt contributions whose mean over prompts is the (unrefined) score."""
        if self.attribution.per_prompt is None:
            raise ValueError("no per-prompt scores; score with per_prompt=True")
        if isinstance(self.attribution, AblationAttribution):  # -(n w_i) e_i: the gap's change, per prompt
            w = -self.attribution.n_prompts * self.attribution.weights
            return {k: w[:, None, None] * v * self.orientation / self.scale
                    for k, v in self.attribution.per_prompt.items()}
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

    def _tables(self) -> dict[str, pd.DataFrame | SavedResult]:
        """``attribution`` (nested) and, when refined, ``refined``."""
        return {"attribution": self.attribution, **({} if self.refined is None else {"refined": self.refined})}

    def _settings(self) -> dict:
        return {"context": self.context, "orientation": self.orientation, "scale": self.scale, **self.settings}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame | SavedResult], settings: dict) -> "ContextScores":
        context, orientation, scale = settings.pop("context"), settings.pop("orientation"), settings.pop("scale")
        return _oriented(context, tables["attribution"], orientation, scale, tables.get("refined"), settings)


def _oriented(context, attribution, orientation, scale, refined, settings) -> ContextScores:
    sign = -1.0 if isinstance(attribution, AblationAttribution) else 1.0  # estimates of the change: flip
    scores = {k: sign * v * orientation / scale for k, v in attribution.scores.items()}
    if refined is not None:
        for row in refined.itertuples(index=False):
            scores[row.kind][row.layer, row.index] = sign * row.exact * orientation / scale
    return ContextScores(context, scores, attribution, orientation, scale, refined, settings)


def group_weights(frame: pd.DataFrame, group_a: str = "White") -> Float[Tensor, "prompt"]:
    """+1/n_A for group A prompts and -1/n_B for the others: ``weights @ values`` is the gap."""
    in_a = torch.tensor((frame["group"] == group_a).to_numpy())
    n_a, n_b = int(in_a.sum()), int((~in_a).sum())
    if not n_a or not n_b:
        raise ValueError(f"a gap needs prompts of group {group_a!r} and of another group; got {n_a} and {n_b}")
    return torch.where(in_a, 1.0 / n_a, -1.0 / n_b)


def exact_gap_changes(
    model: HookedModel, eval_set: EvalSet, variants, *, means=None, prompts_per_pass: int = 32,
    rows_per_forward: int = 64,
    batch_size: int = 16, progress: bool = False, desc: str = "exact ablation",
) -> Float[Tensor, "variant"]:
    """Gap with each variant (component or set) ablated alone minus the gap without: exact, batched.

    Zero ablation, or mean ablation with ``means``. Stacked (``interp.sweeps.metric_sweep``: the
    unablated pass once, each variant resumed from its layer, each template's shared prefix run once
    per variant, only the read logits unembedded); ``rows_per_forward`` caps the rows of one forward.
    """
    from interp.sweeps import metric_sweep

    batch, frame = eval_set.rows()
    weights = group_weights(frame, eval_set.group_a)
    sweep = metric_sweep(model, batch, eval_set.metric, list(variants), means=means, prompts_per_pass=prompts_per_pass,
                         max_batch_rows=rows_per_forward, groups=pd.factorize(frame["template"])[0],
                         progress=progress, desc=desc)
    return (sweep.values - sweep.baseline[None, :]) @ weights


def _refinement_sample(result: AblationAttribution, shape: ComponentShape, top: int, n_random: int, seed: int):
    """Per kind: the ``top`` largest |estimate| components, then ``n_random`` of the rest drawn uniformly."""
    chosen, from_top = [], []
    generator = torch.Generator().manual_seed(seed)
    for kind in result.scores:
        best = list(result.top(min(top, shape.count(kind)), kind=kind))
        rest = [c for c in ComponentSet.all(shape, kind) if c not in set(best)]
        drawn = torch.randperm(len(rest), generator=generator)[: min(n_random, len(rest))].sort().values
        chosen += best + [rest[i] for i in drawn.tolist()]
        from_top += [True] * len(best) + [False] * len(drawn)
    return chosen, from_top


def score_prompts(
    model: HookedModel,
    eval_set: EvalSet,
    *,
    how: str = "zero",
    means=None,
    refine_top: int = 200,
    n_random: int = 50,
    per_prompt: bool = True,
    kinds=("neuron", "head"),
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> ContextScores:
    """Pair-free scores of every neuron and head on every prompt of ``eval_set`` (see the module docstring).

    ``refine_top`` (0: none) components of each kind by |estimate|, plus ``n_random`` of the rest,
    are re-scored by exact ablation; ``settings["spearman"]`` holds, per kind, the rank correlation of
    estimate and exact over that sample (top and random together).
    """
    if how not in ("zero", "mean"):
        raise ValueError(f"pair-free scores estimate zero or mean ablation, got how={how!r}")
    batch, frame = eval_set.rows()
    weights = group_weights(frame, eval_set.group_a)
    result = ablation_attribution(model, batch, eval_set.metric, weights=weights, how=how, means=means,
                                  kinds=kinds, batch_size=batch_size, per_prompt=per_prompt, progress=progress)
    gap = float(weights @ result.metric)
    orientation = 1.0 if gap >= 0 else -1.0
    refined, spearman = None, {}
    if refine_top > 0:
        shape = ComponentShape.of(model)
        sample, from_top = _refinement_sample(result, shape, refine_top, n_random, seed)
        exact = exact_gap_changes(model, eval_set, sample, means=means if how == "mean" else None,
                                  batch_size=batch_size, progress=progress)
        refined = pd.DataFrame({"kind": [c.kind for c in sample], "layer": [c.layer for c in sample],
                                "index": [c.index for c in sample], "estimate": result.score_of(sample).numpy(),
                                "exact": exact.numpy(), "selection": ["top" if t else "random" for t in from_top]})
        for kind, rows in refined.groupby("kind"):
            spearman[kind] = correlation(rows["estimate"], rows["exact"])[0] if len(rows) >= 3 else float("nan")
    settings = {"method": "ablation", "how": how, "refine_top": refine_top, "n_random": n_random,
                "n_prompts": len(batch), "n_names": int(frame["name"].nunique()), "spearman": spearman}
    return _oriented(eval_set.name, result, orientation, grid_scale(eval_set.metric), refined, settings)


@dataclass(frozen=True)
class HeadScores(SavedResult):
    """One score per attention head: FASP's z_bias (``fasp_head_bias``) or z_ppl (``head_utility``)."""

    RESULT = "HeadScores"

    scores: Float[Tensor, "layer head"]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per head: ``layer, head, score``."""
        n_layers, n_heads = self.scores.shape
        return pd.DataFrame({"layer": torch.arange(n_layers).repeat_interleave(n_heads).numpy(),
                             "head": torch.arange(n_heads).repeat(n_layers).numpy(),
                             "score": rearrange(self.scores.detach().cpu(), "layer head -> (layer head)").numpy()})

    def _tables(self) -> dict[str, pd.DataFrame]:
        return {"scores": self.to_dataframe()}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> "HeadScores":
        frame = tables["scores"].sort_values(["layer", "head"])
        flat = torch.from_numpy(frame["score"].to_numpy().copy())
        return cls(rearrange(flat, "(layer head) -> layer head", layer=frame["layer"].nunique()))


def fasp_head_bias(model: HookedModel, eval_set: EvalSet, *, means=None, batch_size: int = 16,
                   progress: bool = False) -> Float[Tensor, "layer head"]:
    """FASP's z_bias as a reduction: |gap| - |gap with head h removed alone| (exact, batched), per head.

    Higher means removing the head leaves less bias, so ``pruning.fasp`` prunes it first.
    """
    shape = ComponentShape.of(model)
    heads = [Head(layer, head) for layer in range(shape.n_layers) for head in range(shape.n_heads)]
    batch, frame = eval_set.rows()
    gap = float(group_weights(frame, eval_set.group_a) @ prompt_values(model, eval_set, batch_size=batch_size))
    change = exact_gap_changes(model, eval_set, heads, means=means, batch_size=batch_size, progress=progress,
                               desc="FASP z_bias")
    return (abs(gap) - (gap + change).abs()).reshape(shape.n_layers, shape.n_heads)


def grid_scale(metric) -> float:
    """A robust width of the values the metric ranges over: the interquartile range of its answers'
    values as the metric summarizes them (``log10`` for dollars), pooled over every answer set it
    holds (one shared set, or each prompt's own); 1 for metrics without values or with an IQR of 0.

    Not max - min: a derived answer set holds a few outlying values (a "1,000,000" with little
    probability) that would set the scale by themselves.
    """
    candidates = getattr(metric, "candidates", None)
    sets = getattr(candidates, "sets", None)
    groups = list(sets.values()) if isinstance(sets, dict) else [candidates]
    values = [v for c in groups for v in (getattr(c, "values", None) or ())]
    if len(values) < 2:
        return 1.0
    from interp.metrics import SUMMARIES

    summary = SUMMARIES.get(getattr(metric, "summary", "mean"), SUMMARIES["mean"])
    summarized = summary(torch.tensor(values, dtype=torch.float64))
    low, high = torch.quantile(summarized, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    return float(high - low) if high > low else 1.0


def score_context(
    model: HookedModel,
    eval_set: EvalSet,
    *,
    method: str = "atp",
    refine_top: int = 0,
    per_prompt: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> ContextScores:
    """AtP (or IG) scores of every neuron and head for one context's pairs (A = clean rows).

    ``refine_top`` > 0 replaces the scores of that many top |AtP| components by their exact
    patching effect (one batched sweep).
    """
    pairs = eval_set.pairs
    metric = span_aligned(eval_set.metric)  # pairs of names of unequal length carry a layout
    result = attribute(model, pairs.clean, pairs.corrupt, metric, method=method,
                       batch_size=batch_size, per_prompt=per_prompt, progress=progress)
    gap = float((result.metric_clean - result.metric_corrupt).mean())
    orientation = 1.0 if gap >= 0 else -1.0
    refined = None
    if refine_top > 0:
        top = list(result.top(refine_top))
        sweep = patch_sweep(model, pairs.clean, pairs.corrupt, metric, [ComponentSet([c]) for c in top],
                            progress=progress)
        exact = (sweep.baseline[None, :] - sweep.values).mean(-1)
        refined = pd.DataFrame({"kind": [c.kind for c in top], "layer": [c.layer for c in top],
                                "index": [c.index for c in top], "atp": result.score_of(top).numpy(),
                                "exact": exact.numpy()})
    settings = {"method": method, "refine_top": refine_top, "n_pairs": len(pairs),
                "n_padded": int(((pairs.frame["n_fillers_a"] + pairs.frame["n_fillers_b"]) > 0).sum())
                if "n_fillers_a" in pairs.frame else 0}
    return _oriented(eval_set.name, result, orientation, grid_scale(eval_set.metric), refined, settings)


def wanda_scores(model: HookedModel, batch, *, batch_size: int = 16) -> dict[str, Float[Tensor, "layer _index"]]:
    """Structured Wanda scores from each layer's real inputs: ||x_unit|| * ||unit's output weights||.

    A neuron's input to the down projection is its ``hook_post`` activation; a head's is its
    ``hook_z`` slice. Norms are over every real token of ``batch``.
    """
    shape = ComponentShape.of(model)
    names = [hook_name("neuron", layer) for layer in range(shape.n_layers)]
    names += [hook_name("head", layer) for layer in range(shape.n_layers)]
    norms = activation_norms(model, batch, names, batch_size=batch_size)
    weights = weight_norms(model)
    w_out, w_o = weights["W_out"], weights["W_O"]  # layer d_mlp; layer head d_head
    neuron = torch.stack([norms[hook_name("neuron", layer)].float().cpu() for layer in range(shape.n_layers)])
    head_x = torch.stack([norms[hook_name("head", layer)].float().cpu() for layer in range(shape.n_layers)])
    # a head's unit score: Wanda's |W| * ||x|| summed over its d_head input features
    return {"neuron": neuron * w_out, "head": (head_x * w_o).sum(-1)}


@dataclass(frozen=True)
class Baselines(SavedResult):
    """The papers' baselines for one context: the Wanda set difference and each head's attention to the name."""

    RESULT = "Baselines"

    wanda_difference: ComponentSet
    attention_to_name: Float[Tensor, "layer head"]

    def to_dataframe(self) -> pd.DataFrame:
        """The Wanda set difference: ``kind, layer, index``."""
        return self.wanda_difference.to_dataframe()

    def _tables(self) -> dict[str, pd.DataFrame | SavedResult]:
        return {"wanda_difference": self.to_dataframe(), "attention_to_name": HeadScores(self.attention_to_name)}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame | SavedResult], settings: dict) -> "Baselines":
        return cls(ComponentSet.from_dataframe(tables["wanda_difference"]), tables["attention_to_name"].scores)


def baseline_sets(
    model: HookedModel, eval_set: EvalSet, *, top_fraction: float = 0.15, batch_size: int = 16
) -> Baselines:
    """The papers' baselines for one context's prompts (every prompt of ``eval_set.rows()``).

    ``wanda_difference``: neurons and heads in group A's top ``top_fraction`` Wanda scores but not
    group B's (per layer); ``attention_to_name``: [layer, head] attention the answer position pays
    to the name's tokens (mean of the group A and group B means).
    """
    batch, frame = eval_set.rows()
    in_a = torch.tensor((frame["group"] == eval_set.group_a).to_numpy(), device=batch.tokens.device)
    names = eval_set.names()
    wanda_a = wanda_scores(model, batch.select(in_a), batch_size=batch_size)
    wanda_b = wanda_scores(model, batch.select(~in_a), batch_size=batch_size)
    difference = ComponentSet()
    for kind in ("neuron", "head"):
        difference |= wanda_set_difference(wanda_a[kind], wanda_b[kind], top_fraction=top_fraction, kind=kind)

    def attention(rows):
        chosen = batch.select(rows)
        return attention_to_positions(model, chosen, names[rows][:, : chosen.tokens.shape[1]], batch_size=batch_size)

    attention = (attention(in_a) + attention(~in_a)) / 2
    return Baselines(difference, attention.cpu())
