"""Exploring components: which contexts share which components, what one component does, where a set sits.

- **Set comparison** (:func:`compare_sets`): for the sets of many contexts (e.g. each one's top-k), every
  *exclusive* intersection, the components in exactly these contexts' sets and in no other's (they
  partition the union, as in an UpSet plot), with its size against random sets of each context's kind and
  size (``circuits.select.pruning.null_sets``: neurons keep per-layer counts); :func:`intersection_effects` adds
  each intersection's own delta-gap when ablated, from ``circuits.evaluate.evaluation.evaluate``.
- **Component card** (:func:`component_card`): one neuron's or head's score in every context with an
  interval, its mean activation on the name tokens and at the answer position per group, the direct
  effect of its mean output at the answer position on the digit and yes/no tokens (through the final
  norm's gain and the unembedding), and the prompts it fires on most.
- **Layer profile** (:func:`layer_profile`): per set and layer, how many components and how much score.

Scores are ``{kind: [layer, index]}`` tensors or ``ContextScores`` (oriented: positive carries the gap).
"""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from circuits.evaluate.evaluation import EvalSet, UtilityProbe, evaluate
from circuits.measure.stats import bootstrap_ci, gap_change
from circuits.select.pruning import Scores, null_sets
from circuits.select.scoring import ContextScores
from interp.activations import masked_means
from interp.components import KINDS, Component, ComponentSet, ComponentShape, Kind
from interp.hooks import HookedModel
from interp.results import SavedResult

SEP = " & "  # joins the contexts of an intersection's label
MAX_CONTEXTS = 12  # 2**12 membership patterns per null draw
ANSWER_TOKENS = {"digit": [str(d) for d in range(10)], "yes_no": [" Yes", " No", "Yes", "No"]}
EFFECT_COLUMNS = ["intersection", "eval", "n_components", "baseline_gap", "gap", "delta_gap", "delta_low",
                  "delta_high", "share_removed", "share_low", "share_high", "overshoot", "mde", "kl"]
EFFECTS_ORDER = ["answer", "token", "token_id", "effect", "centred"]


def _plain_scores(scores: Scores | ContextScores) -> Scores:
    return scores.scores if isinstance(scores, ContextScores) else scores


def top_sets(scores: Mapping[str, Scores | ContextScores], k: int, kind: Kind) -> dict[str, ComponentSet]:
    """Each context's ``k`` highest-scoring components of ``kind``."""
    return {c: ComponentSet.top_k(_plain_scores(s)[kind], k, kind=kind) for c, s in scores.items()}


# ---------------------------------------------------------------- set comparison


def _patterns(sets: Sequence[ComponentSet]) -> dict[Component, int]:
    """Each component of the union and the bit pattern of the sets holding it (bit i: set i)."""
    bits: dict[Component, int] = {}
    for i, components in enumerate(sets):
        for c in components:
            bits[c] = bits.get(c, 0) | (1 << i)
    return bits


@dataclass(frozen=True, eq=False)
class SetComparison(SavedResult):
    """Exclusive intersections of several contexts' component sets, against random sets.

    ``table``: one row per intersection (every non-empty one, and the one of all contexts): ``intersection``
    (its contexts joined by ``" & "``), ``degree`` (how many contexts), ``size``, ``null_mean``,
    ``null_low``, ``null_high`` (95% of the random-set sizes), ``p_value`` (one-sided, a size at least the
    observed one). ``membership``: ``kind, layer, index, intersection`` for every component of the union.
    ``effects`` (after :func:`intersection_effects`): one row per intersection and evaluation set.
    """

    RESULT = "SetComparison"

    contexts: tuple[str, ...]
    table: pd.DataFrame
    membership: pd.DataFrame
    n_null: int
    seed: int
    effects: pd.DataFrame | None = None

    def members(self, intersection: str) -> tuple[str, ...]:
        if intersection not in set(self.table["intersection"]):
            raise ValueError(f"no intersection {intersection!r}; have {list(self.table['intersection'])}")
        return tuple(intersection.split(SEP))

    def components(self, intersection: str) -> ComponentSet:
        """The components of one exclusive intersection."""
        self.members(intersection)
        return ComponentSet.from_dataframe(self.membership[self.membership["intersection"] == intersection])

    def sets(self) -> dict[str, ComponentSet]:
        """Each context's whole set (the union of the intersections it belongs to)."""
        holds = self.membership["intersection"].str.split(SEP)
        return {c: ComponentSet.from_dataframe(self.membership[holds.map(lambda m, c=c: c in m)])
                for c in self.contexts}

    def to_dataframe(self) -> pd.DataFrame:
        """The intersections' table, joined with their effects (one row per evaluation set) when measured."""
        if self.effects is None:
            return self.table.copy()
        return self.table.merge(self.effects, on="intersection", how="left")

    def _tables(self) -> dict[str, pd.DataFrame]:
        effects = {} if self.effects is None else {"effects": self.effects}
        return {"intersections": self.table, "membership": self.membership, **effects}

    def _settings(self) -> dict:
        return {"contexts": list(self.contexts), "n_null": self.n_null, "seed": self.seed}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> "SetComparison":
        return cls(tuple(settings["contexts"]), tables["intersections"], tables["membership"], settings["n_null"],
                   settings["seed"], tables.get("effects"))


def compare_sets(
    sets: Mapping[str, ComponentSet],
    shape: ComponentShape,
    *,
    n_null: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> SetComparison:
    """Every exclusive intersection of the contexts' sets, its size and its size under random sets.

    Null: per draw, each context's set is replaced by a random set of its kind and size
    (``pruning.null_sets``, seeded per context, so the contexts' draws are independent) and the
    intersections are counted again.
    """
    contexts = tuple(sets)
    if not 2 <= len(contexts) <= MAX_CONTEXTS:
        raise ValueError(f"compare_sets needs 2 to {MAX_CONTEXTS} contexts' sets, got {len(contexts)}")
    bad = [c for c in contexts if SEP in c]
    if bad:
        raise ValueError(f"context names {bad} contain {SEP!r}, which joins an intersection's label; rename them")
    if n_null < 1:
        raise ValueError(f"n_null must be >= 1, got {n_null}")
    observed = _patterns([sets[c] for c in contexts])
    draws = [null_sets(sets[c].validate(shape), shape, n_draws=n_null, seed=seed + i)
             for i, c in enumerate(tqdm(contexts, desc="random sets", disable=not progress))]
    null = np.zeros((n_null, 2 ** len(contexts)), dtype=np.int64)
    for d in range(n_null):
        for pattern, count in Counter(_patterns([draws[i][d] for i in range(len(contexts))]).values()).items():
            null[d, pattern] = count
    sizes = Counter(observed.values())
    full = 2 ** len(contexts) - 1
    rows = []
    for pattern in sorted(set(sizes) | {full}):
        size = sizes.get(pattern, 0)
        members = [c for i, c in enumerate(contexts) if pattern >> i & 1]
        low, high = np.quantile(null[:, pattern], [0.025, 0.975])
        rows.append({"intersection": SEP.join(members), "degree": len(members), "size": size,
                     "null_mean": float(null[:, pattern].mean()), "null_low": float(low), "null_high": float(high),
                     "p_value": float((1 + np.sum(null[:, pattern] >= size)) / (1 + n_null))})
    table = pd.DataFrame(rows).sort_values(["size", "degree"], ascending=[False, False], ignore_index=True)
    label = {p: SEP.join(c for i, c in enumerate(contexts) if p >> i & 1) for p in set(observed.values())}
    membership = pd.DataFrame([(c.kind, c.layer, c.index, label[p]) for c, p in sorted(observed.items())],
                              columns=["kind", "layer", "index", "intersection"])
    return SetComparison(contexts, table, membership, n_null, seed)


def intersection_effects(
    model: HookedModel,
    comparison: SetComparison,
    eval_sets: Sequence[EvalSet],
    *,
    min_size: int = 1,
    probe: UtilityProbe | None = None,
    how: str = "zero",
    means: Mapping[str, Tensor] | None = None,
    batch_size: int = 16,
    n_resamples: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> SetComparison:
    """The comparison with ``effects``: each intersection of at least ``min_size`` ablated alone, on every
    evaluation set, through ``circuits.evaluate.evaluation.evaluate`` (``delta_gap`` with its two-way cluster bootstrap
    interval, share removed, overshoot, MDE, KL)."""
    chosen = comparison.table[comparison.table["size"] >= max(1, min_size)]["intersection"]
    if chosen.empty:
        raise ValueError(f"no intersection has at least {min_size} components")
    sets = {label: comparison.components(label) for label in chosen}
    result = evaluate(model, sets, eval_sets, probe=probe, how=how, means=means, batch_size=batch_size, seed=seed,
                      n_resamples=n_resamples, progress=progress)
    frame = result.frame[result.frame["set"] != "none"].rename(columns={"set": "intersection"})
    return replace(comparison, effects=frame[[c for c in EFFECT_COLUMNS if c in frame]].reset_index(drop=True))


# ---------------------------------------------------------------- layer profile


def layer_profile(
    sets: Mapping[str, ComponentSet],
    shape: ComponentShape,
    scores: Mapping[str, Scores | ContextScores] | None = None,
) -> pd.DataFrame:
    """Per set, kind and layer: ``count``, ``share`` (of the set's components of that kind) and ``score_sum``
    (the set's own context's scores summed over those components; NaN without ``scores``).

    Every layer appears for every kind a set holds, zero where it holds nothing.
    """
    if scores is not None and set(sets) - set(scores):
        raise ValueError(f"no scores for {sorted(set(sets) - set(scores))}; give scores for every set or none")
    rows = []
    for name, components in sets.items():
        for kind in KINDS:
            mask = components.mask(kind, shape)
            total = int(mask.sum())
            if not total:
                continue
            values = _plain_scores(scores[name])[kind].float().cpu() if scores is not None else None
            for layer in range(shape.n_layers):
                count = int(mask[layer].sum())
                score = float(values[layer][mask[layer]].sum()) if values is not None else float("nan")
                rows.append({"context": name, "kind": kind, "layer": layer, "count": count, "share": count / total,
                             "score_sum": score})
    if not rows:
        raise ValueError("every set is empty; there is no layer profile")
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- component card


@dataclass(frozen=True, eq=False)
class ComponentCard(SavedResult):
    """What one neuron or head does, in every context.

    ``scores``: ``context, score`` (the selection score, exact where refined), ``rank`` (among its kind),
    ``estimate`` (mean of the per-prompt first-order contributions) with ``ci_low``/``ci_high`` and how the
    interval was drawn (``interval``). ``activations``: ``context, group, position ('name' | 'answer'), mean,
    ci_low, ci_high, n_prompts`` (a head's activation is the norm of its output). ``effects``: ``context,
    answer ('digit' | 'yes_no'), token, token_id, effect`` (direct logit contribution of the component's
    mean output at the answer position), ``centred`` (minus the mean over the answer's tokens: only
    differences among them move the answer). ``top_prompts``: the prompts it is most active on.
    """

    RESULT = "ComponentCard"

    component: Component
    scores: pd.DataFrame
    activations: pd.DataFrame
    effects: pd.DataFrame
    top_prompts: pd.DataFrame

    PARTS = ("scores", "activations", "effects", "top_prompts")

    def to_dataframe(self) -> pd.DataFrame:
        """All four tables stacked, with ``part`` naming the table and the component's label."""
        frames = [getattr(self, part).assign(part=part) for part in self.PARTS]
        return pd.concat(frames, ignore_index=True).assign(component=str(self.component))

    def _tables(self) -> dict[str, pd.DataFrame]:
        return {part: getattr(self, part) for part in self.PARTS}

    def _settings(self) -> dict:
        return {"component": {"kind": self.component.kind, "layer": self.component.layer,
                              "index": self.component.index}}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> "ComponentCard":
        return cls(Component(**settings["component"]), *(tables[part] for part in cls.PARTS))


def _rank(values: Float[Tensor, "layer index"], component: Component) -> int:
    return int((values > values[component.layer, component.index]).sum()) + 1


def card_scores(
    scores: Mapping[str, ContextScores],
    component: Component,
    *,
    frames: Mapping[str, pd.DataFrame] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """The component's score in every context, with a 95% interval of its first-order estimate.

    Pair-free scores with the scored prompts' table in ``frames[context]`` (``name``, ``template``, in the
    order scored): the two-way cluster bootstrap of ``circuits.measure.stats.gap_change`` over names x templates;
    otherwise a bootstrap over prompts (or pairs) of the mean per-prompt contribution; without per-prompt
    contributions, no interval.
    """
    rows = []
    for context, cs in scores.items():
        values = cs.scores[component.kind]
        row = {"context": context, "score": float(values[component.layer, component.index]),
               "rank": _rank(values, component), "estimate": float("nan"), "ci_low": float("nan"),
               "ci_high": float("nan"), "interval": "none", "n_prompts": 0}
        if cs.attribution.per_prompt is not None:
            contributions = cs.per_prompt()[component.kind][:, component.layer, component.index].double().numpy()
            row.update(estimate=float(contributions.mean()), n_prompts=len(contributions))
            frame = None if frames is None else frames.get(context)
            weights = getattr(cs.attribution, "weights", None)
            if frame is not None and weights is not None:
                if len(frame) != len(contributions):
                    raise ValueError(f"context {context!r}: the prompt table has {len(frame)} rows but the scores "
                                     f"{len(contributions)} prompts; pass the table of the prompts scored")
                raw = -cs.attribution.per_prompt[component.kind][:, component.layer, component.index]
                table = frame.assign(_in_a=(weights > 0).numpy(), before=0.0,
                                     after=(raw.double() * cs.orientation / cs.scale).numpy())
                with warnings.catch_warnings():  # the zero "before" gap makes the share columns undefined
                    warnings.simplefilter("ignore", RuntimeWarning)
                    change = gap_change(table, "before", "after", group="_in_a", group_a=True,
                                        clusters=("name", "template"), n_resamples=n_resamples, seed=seed)
                row.update(ci_low=change["delta_low"], ci_high=change["delta_high"], interval="names x templates")
            else:
                low, high = bootstrap_ci((contributions,), np.mean, n_resamples=n_resamples, seed=seed)
                row.update(ci_low=low, ci_high=high, interval="prompts")
        rows.append(row)
    return pd.DataFrame(rows)


def _readout(model, component: Component):
    """Maps the component's hook activation ``[batch, pos, ...]`` to its activation (neuron) or output (head)."""
    if component.kind == "neuron":
        return lambda act: act[..., component.index]
    w_o = model.W_O[component.layer, component.index].detach()  # d_head d_model
    return lambda act: torch.einsum("bpd,dm->bpm", act[:, :, component.index].to(w_o.dtype), w_o)


def _unit_output(model, component: Component) -> Float[Tensor, "d_model"] | None:
    """A neuron's output weights (its write per unit of activation); None for a head."""
    if component.kind == "neuron":
        return model.W_out[component.layer, component.index].detach().float().cpu()
    return None


def direct_effect(
    model: HookedModel, output: Float[Tensor, "d_model"], tokens: Mapping[str, Sequence[str]] = ANSWER_TOKENS
) -> pd.DataFrame:
    """The logit each answer token gets from ``output`` written into the final residual stream.

    Through the final norm's gain and the unembedding (the norm's per-position scale left out, as in direct
    logit attribution). Token strings that are not one token of the model's tokenizer are skipped.
    Columns: ``answer, token, token_id, effect, centred``.
    """
    gain = next((p for n, p in model.ln_final.named_parameters() if n.endswith("weight")), None)
    vector = output.float().to(model.W_U.device) * (gain.detach().float() if gain is not None else 1.0)
    rows = []
    for answer, strings in tokens.items():
        for text in strings:
            ids = model.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1:
                rows.append({"answer": answer, "token": text, "token_id": ids[0]})
    if not rows:
        raise ValueError(f"none of the answer tokens {dict(tokens)} is a single token of this tokenizer")
    frame = pd.DataFrame(rows)
    with torch.no_grad():
        ids = torch.tensor(frame["token_id"].to_numpy(), device=model.W_U.device)
        logits = vector @ model.W_U[:, ids].float()
    frame["effect"] = logits.cpu().numpy()
    frame["centred"] = frame["effect"] - frame.groupby("answer")["effect"].transform("mean")
    return frame


def _mean_interval(values: np.ndarray) -> tuple[float, float, float]:
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return float(values.mean()) if len(values) else float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    return mean, float(low), float(high)


def card_activations(
    model: HookedModel,
    component: Component,
    eval_sets: Mapping[str, EvalSet],
    *,
    n_top: int = 10,
    tokens: Mapping[str, Sequence[str]] = ANSWER_TOKENS,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Activations by group and position, direct effects, and the ``n_top`` prompts of highest name-token
    activation, on every prompt of each evaluation set (see :class:`ComponentCard`)."""
    ComponentSet([component]).validate(ComponentShape.of(model))
    read = _readout(model, component)
    unit = _unit_output(model, component)
    activations, effects, prompts = [], [], []
    for context, es in eval_sets.items():
        batch, frame = es.rows()
        answer = torch.zeros_like(batch.tokens, dtype=torch.bool)
        answer[torch.arange(len(batch)), batch.answer_pos] = True
        means = masked_means(model, batch, [component.hook_name], {"name": es.names(), "answer": answer},
                             select={component.hook_name: read}, batch_size=batch_size, progress=progress)
        means = means[component.hook_name]
        at_answer = means["answer"].float()
        output = at_answer.mean(0) * unit if unit is not None else at_answer.mean(0)
        effects.append(direct_effect(model, output, tokens).assign(context=context))
        level = {p: (v if unit is not None else v.norm(dim=-1)).double().numpy() for p, v in means.items()}
        for position, values in level.items():
            for group in sorted(frame["group"].unique()):
                rows = np.flatnonzero((frame["group"] == group).to_numpy())
                mean, low, high = _mean_interval(values[rows])
                activations.append({"context": context, "group": group, "position": position, "mean": mean,
                                    "ci_low": low, "ci_high": high, "n_prompts": len(rows)})
        columns = [c for c in ("prompt_id", "name", "group", "template", "prompt_text") if c in frame]
        prompts.append(frame[columns].assign(context=context, activation_name=level["name"],
                                             activation_answer=level["answer"]))
    top = pd.concat(prompts, ignore_index=True).sort_values("activation_name", ascending=False, kind="stable")
    top = top.head(n_top)[["context", *[c for c in top.columns if c != "context"]]].reset_index(drop=True)
    effects = pd.concat(effects, ignore_index=True)
    return pd.DataFrame(activations), effects[["context", *EFFECTS_ORDER]], top


def component_card(
    model: HookedModel,
    component: Component,
    scores: Mapping[str, ContextScores],
    eval_sets: Mapping[str, EvalSet],
    *,
    n_top: int = 10,
    tokens: Mapping[str, Sequence[str]] = ANSWER_TOKENS,
    n_resamples: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> ComponentCard:
    """The card of one component: scores in every context of ``scores``, activations, direct effects and top
    prompts on ``eval_sets`` (give each context the prompts it was scored on, so the score intervals use
    their names and templates)."""
    frames = {c: es.rows()[1] for c, es in eval_sets.items()}
    matching = {c: f for c, f in frames.items() if c in scores and scores[c].attribution.per_prompt is not None
                and len(f) == scores[c].attribution.per_prompt[component.kind].shape[0]}
    table = card_scores(scores, component, frames=matching, n_resamples=n_resamples, seed=seed)
    activations, effects, top = card_activations(model, component, eval_sets, n_top=n_top, tokens=tokens,
                                                 batch_size=batch_size, progress=progress)
    return ComponentCard(component, table, activations, effects, top)
