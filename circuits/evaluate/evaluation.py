"""Bias and utility of a model with a component set ablated, across evaluation sets.

Bias on an evaluation set is the gap of the context's metric over all its prompts: mean over
group A prompts minus mean over group B prompts, in the context's units. The endpoint of an
ablation is the paired change of that gap, ``delta_gap`` = gap after - gap before on the same
prompts, with a two-way cluster bootstrap interval over names x templates, the signed share of the
gap removed, and an overshoot flag (``circuits.measure.stats.gap_change``); the old ratio
``1 - |gap after| / |gap before|`` stays as a secondary column. Utility is the KL divergence from
the unablated model on neutral text shipped with the package, and that text's perplexity; the
texts are split in two halves, one to choose components with (FASP's per-head utility) and one to
report utility on, so no text is both.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from circuits.inputs.prompts import PairSet, PromptSet, build_pairs, span_aligned, tokenize_prompts
from circuits.measure.stats import gap_change
from interp.ablation import ablated
from interp.batching import TokenBatch, tokenize
from interp.components import ComponentSet
from interp.distributed import all_gather_rows, current_shard
from interp.hooks import HookedModel
from interp.memory import Backoff
from interp.metrics import Metric, kl_from_log_probs, log_normalizer, run_metric
from interp.results import SavedResult


def neutral_texts(part: str | None = None) -> list[str]:
    """The neutral sentences shipped with the package (our own text), one per line.

    ``part="select"`` is the first half (for choosing components, e.g. FASP's per-head utility),
    ``part="report"`` the second half (KL and perplexity reported for a pruned model); None, all.
    """
    text = (Path(__file__).parents[1] / "data" / "neutral.txt").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if part is None:
        return lines
    if part not in ("select", "report"):
        raise ValueError(f"part must be 'select', 'report' or None, got {part!r}")
    half = len(lines) // 2
    return lines[:half] if part == "select" else lines[half:]


@dataclass(frozen=True, eq=False)
class UtilityProbe:
    """Neutral text and the unablated model's next-token log-probabilities on it, the reference for KL."""

    batch: TokenBatch
    reference: Float[Tensor, "row pos vocab"]  # log-probabilities

    @classmethod
    def build(cls, model: HookedModel, texts: Sequence[str] | None = None) -> "UtilityProbe":
        """A probe on ``texts`` (default: the reporting half of the neutral text)."""
        batch = tokenize(model, list(texts or neutral_texts("report")))
        with torch.no_grad():
            reference = model(batch.tokens).float().log_softmax(-1)
        return cls(batch, reference)

    def subset(self, n: int) -> "UtilityProbe":
        """The first ``n`` texts only (a cheaper probe for per-component sweeps)."""
        batch = self.batch.select(slice(0, n))
        return UtilityProbe(batch, self.reference[:n, : batch.tokens.shape[1]])

    def measure(self, model: HookedModel) -> dict[str, float]:
        """KL from the reference and perplexity, for the model as it runs now (hooks included)."""
        with torch.no_grad():
            logp = model(self.batch.tokens).float().log_softmax(-1)
        mask = self.batch.attention_mask.to(logp.dtype)
        kl = kl_from_log_probs(logp, self.reference, mask).mean()
        nll = -logp[:, :-1].gather(-1, self.batch.tokens[:, 1:, None]).squeeze(-1)
        ppl = torch.exp((nll * mask[:, 1:]).sum() / mask[:, 1:].sum())
        return {"kl": float(kl), "perplexity": float(ppl)}


PROMPT_COLUMNS = ("prompt_id", "name", "group", "template")


@dataclass(frozen=True, eq=False)
class EvalSet:
    """The prompts of one evaluation split and the metric that measures them.

    ``prompts`` (a batch) with ``frame`` (one row per prompt: ``prompt_id``, ``name``, ``group``,
    ``template``) are what is evaluated; ``pairs`` are optional counterfactual pairs for pair-based
    scoring. A set of pairs alone evaluates their A rows and B rows as its prompts.
    """

    name: str
    pairs: PairSet | None
    metric: Metric
    prompts: TokenBatch | None = None
    frame: pd.DataFrame | None = None
    group_a: str = "White"
    name_mask: Tensor | None = None  # [prompt, pos]: the name's tokens

    @classmethod
    def from_prompts(cls, model: HookedModel, name: str, prompts: PromptSet, metric: Metric, *,
                     pairs: PairSet | None = None, group_a: str = "White") -> "EvalSet":
        """Every prompt of ``prompts``; a template is a (variation, detail) cell."""
        batch, name_mask = tokenize_prompts(model, prompts)
        frame = prompts.frame.assign(template=prompts.frame["variation"] + "|" + prompts.frame["detail"])
        return cls(name, pairs, metric, batch, frame.reset_index(drop=True), group_a, name_mask)

    def names(self) -> Tensor:
        """``[prompt, pos]`` mask of the name's tokens in each row of ``rows()``."""
        if self.prompts is not None:
            if self.name_mask is None:
                raise ValueError(f"evaluation set {self.name!r} was built without its name positions")
            return self.name_mask
        return torch.cat([self.pairs.name_mask, self.pairs.name_mask])

    def rows(self) -> tuple[TokenBatch, pd.DataFrame]:
        """The prompts evaluated and their table (``PROMPT_COLUMNS`` at least)."""
        if self.prompts is not None:
            return self.prompts, self.frame
        if self.pairs is None:
            raise ValueError(f"evaluation set {self.name!r} holds neither prompts nor pairs")
        pairs, n = self.pairs, len(self.pairs)
        clean, corrupt = pairs.clean, pairs.corrupt
        batch = TokenBatch(torch.cat([clean.tokens, corrupt.tokens]), torch.cat([clean.attention_mask,
                           corrupt.attention_mask]), torch.cat([clean.answer_pos, corrupt.answer_pos]),
                           *((torch.cat([clean.position_ids, corrupt.position_ids]), torch.cat([clean.key_mask,
                             corrupt.key_mask])) if clean.key_mask is not None else ()))  # span-aligned pairs
        table = pairs.frame
        frame = pd.DataFrame({"group": [pairs.clean_group] * n + [pairs.corrupt_group] * n})
        if {"name_a", "name_b", "variation", "detail"} <= set(table.columns):
            frame["name"] = list(table["name_a"]) + list(table["name_b"])
            frame["prompt_id"] = list(table["prompt_id_a"]) + list(table["prompt_id_b"])
            frame["template"] = list(table["variation"] + "|" + table["detail"]) * 2
        else:  # a bare pair table: every row its own name, one template
            frame["name"] = [f"a{i}" for i in range(n)] + [f"b{i}" for i in range(n)]
            frame["prompt_id"] = frame["name"]
            frame["template"] = "all"
        return batch, frame


def eval_set(model, name: str, prompts: PromptSet, metric: Metric, *, pairs: bool = False,
             max_pairs_per_cell: int | None = None, seed: int = 0, **criteria) -> EvalSet:
    """The one recipe for an evaluation split: the prompts matching ``criteria``, with their
    counterfactual pairs when ``pairs`` (``build_pairs``), measured by ``metric`` (span-aligned when
    the pairs carry fillers, names of unequal length). Errors name the split."""
    try:
        rows = prompts.filter(**criteria)
        built = build_pairs(model, rows, max_pairs_per_cell=max_pairs_per_cell, seed=seed) if pairs else None
    except ValueError as err:
        raise ValueError(f"{name}: {err}; select more names or variations") from err
    laid_out = built is not None and built.clean.key_mask is not None
    return EvalSet.from_prompts(model, name, rows, span_aligned(metric) if laid_out else metric, pairs=built)


def _sharded_values(model, metric: Metric, batch: TokenBatch, backoff: Backoff) -> Tensor:
    """``run_metric`` over ``batch`` in microbatches; under torch.distributed each rank runs a block."""
    n = len(batch)
    shard = current_shard()
    local = shard.indices(n)
    first = int(local[0]) if len(local) else 0
    device = torch.device(model.cfg.device) if shard.world_size > 1 else torch.device("cpu")
    out = torch.zeros(len(local), dtype=torch.float32, device=device)

    def run(part: slice) -> None:
        rows = slice(first + part.start, first + part.stop)
        out[part] = run_metric(model, metric, batch.select(rows)).float().to(device)

    with torch.no_grad():
        for _ in backoff.batches(len(local), run):
            pass
    if shard.world_size > 1:
        out = all_gather_rows(out, n)
    return out.cpu()


def prompt_values(
    model: HookedModel, eval_set: EvalSet, *, batch_size: int = 16, backoff: Backoff | None = None
) -> Tensor:
    """The metric on every prompt of ``eval_set.rows()``, for the model as it runs now."""
    batch, _ = eval_set.rows()
    return _sharded_values(model, eval_set.metric, batch, backoff or Backoff(batch_size, what="evaluation batch"))


def paired_values(
    model: HookedModel, eval_set: EvalSet, *, batch_size: int = 16, backoff: Backoff | None = None
) -> tuple[Tensor, Tensor]:
    """Metric on the A rows and on the B rows of every pair, for the model as it runs now.

    Rows run in microbatches of ``batch_size``, halved and retried on out-of-memory (said once);
    pass a ``Backoff`` to share the batch size (and the one report) across calls.
    Launched with ``torchrun`` (an initialized process group of world size > 1), each rank runs a
    contiguous block of the rows and every rank returns the values of all of them.
    """
    if eval_set.pairs is None:
        raise ValueError(f"evaluation set {eval_set.name!r} has no pairs; use prompt_values")
    pairs_only = EvalSet(eval_set.name, eval_set.pairs, eval_set.metric)
    values = prompt_values(model, pairs_only, batch_size=batch_size, backoff=backoff)
    n = len(eval_set.pairs)
    return values[:n], values[n:]


@dataclass(frozen=True)
class Evaluation(SavedResult):
    """One row per (component set, evaluation set): bias with the set ablated, and utility."""

    RESULT = "Evaluation"

    frame: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        return self.frame.copy()

    def _tables(self) -> dict[str, pd.DataFrame]:
        return {"evaluation": self.frame}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> "Evaluation":
        return cls(tables["evaluation"], settings)


def evaluate(
    model: HookedModel,
    sets: Mapping[str, ComponentSet],
    eval_sets: Sequence[EvalSet],
    *,
    probe: UtilityProbe | None = None,
    how: str = "zero",
    means: Mapping[str, Tensor] | None = None,
    plan: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    n_resamples: int = 1000,
    progress: bool = False,
    stacked: bool = True,
) -> Evaluation:
    """Ablate each component set in turn and measure every prompt of the evaluation sets, plus utility.

    Per (set, evaluation set): ``gap`` (after), ``baseline_gap``, and from ``circuits.measure.stats.gap_change``
    (a two-way cluster bootstrap over names x templates, names drawn within their group, the same
    ``n_resamples`` resamples, seeded by ``seed``, for before and after) ``delta_gap`` with
    ``delta_low``/``delta_high``, ``share_removed`` with ``share_low``/``share_high``, the after-gap's
    ``after_low``/``after_high``, ``overshoot``, and the evaluation set's ``gap_sd`` and ``mde`` (minimum
    detectable delta at 80% power). ``reduction`` = 1 - |gap| / |baseline gap| is kept as a secondary
    column, with its percentile interval over the same resamples.

    The empty set (the unablated model) is measured once on every evaluation set as the baseline,
    under the label ``"none"``. ``plan`` maps a set's label to the names of the evaluation sets it
    is measured on (default: all). Under ``torch.distributed`` the prompts of each evaluation set are
    sharded across ranks and every rank returns the same table; utility is measured on every rank.

    With ``stacked`` (the default; zero and mean ablation) the sets measured on one evaluation set
    run together (``interp.sweeps.metric_sweep``, and ``ablation_sweep`` for utility): the unablated
    forward once, each set's ablated rows resumed from its lowest layer, stacked into shared
    forwards. The numbers equal ``stacked=False`` (one ablated forward per set and prompt) to float
    tolerance.
    """
    if "none" in sets:
        raise ValueError("'none' is reserved for the unablated baseline; rename that component set")
    if not eval_sets:
        raise ValueError("give at least one evaluation set")
    known = {e.name for e in eval_sets}
    for label, wanted in (plan or {}).items():
        unknown = sorted(set(wanted) - known)
        if label not in sets or unknown:
            raise ValueError(f"plan for {label!r} names unknown sets: {unknown or [label]}; known {sorted(known)}")
    probe = probe or UtilityProbe.build(model)
    stacked = stacked and how in ("zero", "mean")
    rows = []
    labelled = {"none": ComponentSet(), **sets}
    baseline: dict[str, Tensor] = {}  # per-prompt values of the unablated model
    backoff = Backoff(batch_size, what="evaluation batch")  # a size that ran out of memory is not retried
    def measured_on(label: str, es: EvalSet) -> bool:
        return label == "none" or plan is None or label not in plan or es.name in plan[label]

    if stacked and how in ("zero", "mean"):
        if how == "mean" and means is None:
            raise ValueError("mean ablation needs means=mean_activations(model, batch, hook_names)")
        means = means if how == "mean" else None
        stacked_values = {es.name: _stacked_prompt_values(
            model, es, {label: c for label, c in sets.items() if measured_on(label, es)}, means, backoff,
            batch_size, progress) for es in eval_sets}
        utilities = _stacked_utility(model, probe, sets, means, batch_size)
    for label, components in tqdm(labelled.items(), desc="evaluate", disable=not progress or stacked):
        with ablated(model, components, how, means=means) if not stacked else nullcontext():
            utility = utilities[label] if stacked else probe.measure(model)
            for es in eval_sets:
                if not measured_on(label, es):
                    continue
                values = stacked_values[es.name][label] if stacked else prompt_values(model, es, backoff=backoff)
                base = baseline.setdefault(es.name, values)
                rows.append({"set": label, "n_components": len(components), "eval": es.name,
                             **_endpoints(es, base, values, seed=seed, n_resamples=n_resamples), **utility})
    settings = {"how": how, "sets": {k: len(v) for k, v in sets.items()}, "eval_sets": [e.name for e in eval_sets],
                "n_resamples": n_resamples, "seed": seed}
    return Evaluation(pd.DataFrame(rows), settings)


def _stacked_prompt_values(model, eval_set: EvalSet, sets: Mapping[str, ComponentSet], means, backoff: Backoff,
                           batch_size: int, progress: bool) -> dict[str, Tensor]:
    """Per-prompt metric values of ``eval_set`` unablated (``"none"``) and with each set ablated alone,
    in stacked forwards; under torch.distributed each rank runs a block of the prompts."""
    from interp.sweeps import metric_sweep

    batch, frame = eval_set.rows()
    ablated_sets = {label: c for label, c in sets.items() if len(c)}
    if not ablated_sets:
        none = _sharded_values(model, eval_set.metric, batch, backoff)
        return {"none": none} | {label: none for label in sets}
    n = len(batch)
    shard = current_shard()
    local = shard.indices(n)
    templates = pd.factorize(frame["template"])[0]  # a template's prompts share their text up to the name
    device = torch.device(model.cfg.device) if shard.world_size > 1 else torch.device("cpu")
    out = torch.zeros(len(local), 1 + len(ablated_sets), dtype=torch.float32, device=device)  # none, then the sets
    if len(local):
        sweep = metric_sweep(model, batch.take(local.to(batch.tokens.device)), eval_set.metric,
                             list(ablated_sets.values()), means=means, max_batch_rows=batch_size, backoff=backoff,
                             groups=templates[local.numpy()], progress=progress, desc=f"evaluate {eval_set.name}")
        out[:] = torch.cat([sweep.baseline[None], sweep.values]).T.to(device)
    if shard.world_size > 1:
        out = all_gather_rows(out, n)
    out = out.cpu()
    values = {"none": out[:, 0]} | {label: out[:, 1 + i] for i, label in enumerate(ablated_sets)}
    return values | {label: values["none"] for label, c in sets.items() if not len(c)}


def _stacked_utility(model, probe: UtilityProbe, sets: Mapping[str, ComponentSet], means,
                     batch_size: int) -> dict[str, dict[str, float]]:
    """``probe.measure`` of the unablated model and of each set ablated alone, in stacked forwards."""
    from interp.sweeps import ablation_sweep

    utilities = {"none": probe.measure(model)}
    ablated_sets = {label: c for label, c in sets.items() if len(c)}
    if ablated_sets:
        tokens = probe.batch.tokens
        mask = probe.batch.attention_mask.float()

        def score(logits, prompts):  # per text: mean KL over its tokens, summed next-token NLL
            logp, width = logits.float().log_softmax(-1), logits.shape[1]  # the sweep cuts padding
            m = mask[prompts, :width].to(logp.device)
            nll = -logp[:, :-1].gather(-1, tokens[prompts, 1:width, None].to(logp.device)).squeeze(-1)
            kl = kl_from_log_probs(logp, probe.reference[prompts, :width], m)
            return torch.stack([kl, (nll * m[:, 1:]).sum(-1)], -1)

        values = ablation_sweep(model, probe.batch, list(ablated_sets.values()), score, means=means,
                                rows_per_forward=batch_size)
        n_tokens = mask[:, 1:].sum().cpu()
        for i, label in enumerate(ablated_sets):
            utilities[label] = {"kl": float(values[i, :, 0].mean()),
                                "perplexity": float(torch.exp(values[i, :, 1].sum() / n_tokens))}
    return utilities | {label: utilities["none"] for label, c in sets.items() if not len(c)}


def _endpoints(eval_set: EvalSet, before: Tensor, after: Tensor, *, seed: int, n_resamples: int) -> dict:
    """The gap endpoints of one evaluation set before and after an ablation (see ``evaluate``)."""
    _, frame = eval_set.rows()
    table = frame[list(PROMPT_COLUMNS)].assign(before=before.numpy(), after=after.numpy())
    with warnings.catch_warnings():  # a degenerate resample (zero gap) is NaN, shown as such
        warnings.simplefilter("ignore", RuntimeWarning)
        change = gap_change(table, "before", "after", group_a=eval_set.group_a, clusters=("name", "template"),
                            n_resamples=n_resamples, seed=seed)
    in_a = table["group"] == eval_set.group_a
    base, gap = change.pop("gap_before"), change.pop("gap_after")
    ratio = change.pop("reduction_resamples")
    low, high = (float(v) for v in np.nanpercentile(ratio, [2.5, 97.5])) if np.isfinite(ratio).any() else (np.nan,) * 2
    return {
        "gap": gap,
        "baseline_gap": base,
        **change,
        "reduction": 1 - abs(gap) / abs(base) if base != 0 else float("nan"),
        "reduction_low": low,
        "reduction_high": high,
        "mean_a": float(table.loc[in_a, "after"].mean()),
        "mean_b": float(table.loc[~in_a, "after"].mean()),
        "n_prompts": len(table),
        "n_names": int(table["name"].nunique()),
        "n_templates": int(table["template"].nunique()),
    }


def head_utility(
    model: HookedModel, probe: UtilityProbe, *, n_texts: int | None = None, measure: str = "perplexity",
    progress: bool = False,
) -> Float[Tensor, "layer head"]:
    """FASP's z_ppl: the damage to ``probe``'s texts when each head alone is zero-ablated.

    ``measure="perplexity"`` (as published): perplexity of the texts without the head minus with it;
    ``"kl"``: mean per-token KL from the unablated model. Build ``probe`` on texts disjoint from those
    utility is reported on (``UtilityProbe.build(model, neutral_texts("select"))``).
    """
    from interp.components import ComponentShape, Head
    from interp.sweeps import ablation_sweep

    if measure not in ("perplexity", "kl"):
        raise ValueError(f"measure must be 'perplexity' or 'kl', got {measure!r}")
    probe = probe if n_texts is None else probe.subset(n_texts)
    shape = ComponentShape.of(model)
    mask = probe.batch.attention_mask.float()
    tokens = probe.batch.tokens

    def kl(logits, prompts):  # the sweep cuts padding: the logits are as wide as the longest of these texts
        width = logits.shape[1]
        return kl_from_log_probs(logits.float().log_softmax(-1), probe.reference[prompts, :width],
                                 mask[prompts, :width])

    def nll(logits, prompts):  # summed next-token negative log-likelihood of each text
        width = logits.shape[1]
        logits = logits[:, :-1].float()  # log-normalizer minus the next token's logit: no [row, pos, vocab] copy
        next_tokens = tokens[prompts, 1:width, None].to(logits.device)
        token_nll = log_normalizer(logits) - logits.gather(-1, next_tokens).squeeze(-1)
        return (token_nll * mask[prompts, 1:width].to(logits.device)).sum(-1)

    heads = [Head(layer, head) for layer in range(shape.n_layers) for head in range(shape.n_heads)]
    values = ablation_sweep(model, probe.batch, heads, kl if measure == "kl" else nll, progress=progress,
                            desc="head utility")
    if measure == "kl":
        return values.mean(-1).reshape(shape.n_layers, shape.n_heads)
    n_tokens = mask[:, 1:].sum().cpu()  # the sweep's values are on the CPU, the probe's mask on the model's device
    perplexity = torch.exp(values.sum(-1) / n_tokens)
    unablated = torch.tensor(probe.measure(model)["perplexity"])
    return (perplexity - unablated).reshape(shape.n_layers, shape.n_heads)
