"""The generalization protocol: does a component set found on one context reduce bias elsewhere?

Levels, for a set scored on context ``c``'s training split (training variations, training names):

- ``L0``: the same prompts it was scored on;
- ``names``: training variations of ``c`` with held-out names;
- ``L1``: held-out variations of ``c`` (in the study: with held-out names);
- ``L2``: held-out variations of every other context.

Every row carries the endpoints of ``circuits.evaluate.evaluation.evaluate`` (``delta_gap`` with its paired
two-way cluster interval, ``share_removed``, ``overshoot``, ``mde``, ...). With ``null_draws`` each
candidate is also evaluated against random sets of its kind and size (``pruning.null_sets``) on its
evaluation sets at ``null_levels`` (default every level): ``null_low``/``null_high`` are the 2.5th and
97.5th percentiles of their ``delta_gap`` (with few draws, close to their range), ``null_mean`` their mean, and
``outside_null`` says whether the strategy's ``delta_gap`` lies outside that band. The null rows
themselves are kept in ``nulls``; rows at other levels have no band (NaN, ``outside_null`` False).

The train-context x eval-context matrix has L1 on its diagonal and L2 off it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from circuits.evaluate.evaluation import EvalSet, UtilityProbe, evaluate
from circuits.select.pruning import null_sets
from interp.components import ComponentSet, ComponentShape
from interp.hooks import HookedModel
from interp.results import SavedResult

LEVELS = ("L0", "names", "L1", "L2")


@dataclass(frozen=True, eq=False)
class ContextSplits:
    """The evaluation sets of one context."""

    context: str
    train: EvalSet
    heldout: EvalSet
    names: EvalSet | None = None

    def eval_sets(self) -> list[EvalSet]:
        return [s for s in (self.train, self.names, self.heldout) if s is not None]


@dataclass(frozen=True)
class CandidateSet:
    """A component set with where it came from."""

    label: str
    strategy: str
    k: int
    train_context: str  # a context name, or "common"
    components: ComponentSet


@dataclass(frozen=True)
class CandidateSets(SavedResult):
    """The component sets a study prunes (its selection stage): ``sets`` (one row per set) and
    ``components`` (one row per set and component)."""

    RESULT = "CandidateSets"

    sets: tuple[CandidateSet, ...]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per set and component: ``label, strategy, k, train_context, kind, layer, index``."""
        frames = [c.components.to_dataframe().assign(label=c.label, strategy=c.strategy, k=c.k,
                                                     train_context=c.train_context) for c in self.sets]
        columns = ["label", "strategy", "k", "train_context", "kind", "layer", "index"]
        return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)

    def _tables(self) -> dict[str, pd.DataFrame]:
        sets = pd.DataFrame([(c.label, c.strategy, c.k, c.train_context) for c in self.sets],
                            columns=["label", "strategy", "k", "train_context"])
        return {"sets": sets, "components": self.to_dataframe()}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> "CandidateSets":
        parts = tables["components"]
        return cls(tuple(CandidateSet(row.label, row.strategy, int(row.k), row.train_context,
                                      ComponentSet.from_dataframe(parts[parts["label"] == row.label]))
                         for row in tables["sets"].itertuples()))


@dataclass(frozen=True)
class Generalization(SavedResult):
    """Bias endpoints of each candidate set at each level, with utility and the random-set null."""

    RESULT = "Generalization"

    frame: pd.DataFrame
    settings: dict = field(default_factory=dict)
    nulls: pd.DataFrame | None = None

    def to_dataframe(self) -> pd.DataFrame:
        return self.frame.copy()

    def matrix(self, strategy: str | None = None, k: int | None = None, value: str = "reduction") -> pd.DataFrame:
        """Long train_context x eval_context ``value`` on held-out variations (L1 and L2)."""
        rows = self.frame[self.frame["level"].isin(["L1", "L2"])]
        if strategy is not None:
            rows = rows[rows["strategy"] == strategy]
        if k is not None:
            rows = rows[rows["k"] == k]
        keys = ["strategy", "k", "train_context", "eval_context"]
        return rows.groupby(keys, as_index=False)[value].mean()

    def _tables(self) -> dict[str, pd.DataFrame]:
        """``generalization``, with ``nulls`` (when drawn) and ``power`` (derived, for readers of the directory)."""
        nulls = {} if self.nulls is None else {"nulls": self.nulls}
        return {"generalization": self.frame, **nulls, **({"power": self.power()} if "mde" in self.frame else {})}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> "Generalization":
        return cls(tables["generalization"], settings, tables.get("nulls"))

    def power(self) -> pd.DataFrame:
        """Per evaluation set of the unablated model: gap, its bootstrap SD and the minimum detectable delta."""
        rows = self.frame[self.frame["strategy"] == "none"]
        return rows[["eval_context", "split", "eval", "baseline_gap", "gap_sd", "mde", "n_prompts", "n_names",
                     "n_templates"]].reset_index(drop=True)


def _level(train_context: str, eval_context: str, split: str) -> str:
    if train_context == "common":
        return {"train": "L0", "names": "names"}.get(split, "L1")
    if eval_context != train_context:
        return "L2"
    return {"train": "L0", "names": "names", "heldout": "L1"}[split]


def generalize(
    model: HookedModel,
    candidates: Sequence[CandidateSet],
    splits: Mapping[str, ContextSplits],
    *,
    probe: UtilityProbe | None = None,
    how: str = "zero",
    means=None,
    batch_size: int = 16,
    null_draws: int = 0,
    null_levels: Sequence[str] = LEVELS,
    n_resamples: int = 1000,
    seed: int = 0,
    shape: ComponentShape | None = None,
    progress: bool = False,
    stacked: bool = True,
) -> Generalization:
    """Measure every candidate on its own context's L0/names/L1 sets and every other context's L1.

    ``null_draws`` random sets of each candidate's kind and size (seeded by ``seed`` and the
    candidate's position) are measured on its evaluation sets at ``null_levels`` (see the module
    docstring); ``shape`` defaults to the model's. ``stacked`` (default) evaluates every set of one
    evaluation set in stacked forwards (``circuits.evaluate.evaluation.evaluate``); the numbers are those
    of one forward per set.
    """
    labels = [c.label for c in candidates]
    unknown_levels = sorted(set(null_levels) - set(LEVELS))
    if unknown_levels:
        raise ValueError(f"null_levels {unknown_levels} are not levels; choose from {list(LEVELS)}")
    if len(set(labels)) != len(labels):
        raise ValueError("candidate labels must be unique")
    unknown = sorted({c.train_context for c in candidates} - set(splits) - {"common"})
    if unknown:
        raise ValueError(f"candidates trained on contexts {unknown} have no evaluation splits")
    eval_sets, origin = [], {}
    for ctx, s in splits.items():
        for split, es in (("train", s.train), ("names", s.names), ("heldout", s.heldout)):
            if es is not None:
                eval_sets.append(es)
                origin[es.name] = (ctx, split)
    plan = {}
    for c in candidates:
        own = splits.get(c.train_context)
        wanted = [s.heldout.name for s in splits.values()]
        if own is not None:
            wanted += [es.name for es in own.eval_sets() if es is not own.heldout]
        else:  # a common set: every context is its own
            wanted = [es.name for s in splits.values() for es in s.eval_sets()]
        plan[c.label] = wanted
    sets = {c.label: c.components for c in candidates}
    null_of = {}
    if null_draws:
        shape = shape or ComponentShape.of(model)
        for i, c in enumerate(candidates):
            judged = [name for name in plan[c.label] if _level(c.train_context, *origin[name]) in null_levels]
            if not judged:
                continue
            for d, drawn in enumerate(null_sets(c.components, shape, n_draws=null_draws, seed=seed * 100_003 + i)):
                label = f"{c.label}#null{d}"
                sets[label], plan[label], null_of[label] = drawn, judged, c.label
    result = evaluate(model, sets, eval_sets, probe=probe, how=how, means=means, plan=plan, batch_size=batch_size,
                      seed=seed, n_resamples=n_resamples, progress=progress, stacked=stacked)
    meta = {c.label: c for c in candidates}
    rows, nulls = [], []
    for row in result.frame.to_dict("records"):
        eval_context, split = origin[row["eval"]]
        parent = null_of.get(row["set"])
        if row["set"] == "none":
            info = {"strategy": "none", "k": 0, "train_context": "none", "level": split}
        else:
            c = meta[parent or row["set"]]
            info = {"strategy": c.strategy, "k": c.k, "train_context": c.train_context,
                    "level": _level(c.train_context, eval_context, split)}
        full = {**row, **info, "eval_context": eval_context, "split": split}
        (nulls if parent else rows).append({**full, "null_of": parent} if parent else full)
    frame = pd.DataFrame(rows)
    null_frame = pd.DataFrame(nulls) if nulls else None
    if null_frame is not None:
        frame = _with_null_band(frame, null_frame)
    settings = {**result.settings, "levels": LEVELS, "null_draws": null_draws, "null_levels": list(null_levels)}
    return Generalization(frame, settings, null_frame)


def _with_null_band(frame: pd.DataFrame, nulls: pd.DataFrame) -> pd.DataFrame:
    """``null_low``/``null_high``/``null_mean`` of the nulls' delta_gap per (candidate, eval set), and
    ``outside_null``."""
    band = nulls.groupby(["null_of", "eval"])["delta_gap"].agg(
        null_low=lambda v: float(np.percentile(v, 2.5)), null_high=lambda v: float(np.percentile(v, 97.5)),
        null_mean="mean", n_null="size").reset_index().rename(columns={"null_of": "set"})
    frame = frame.merge(band, on=["set", "eval"], how="left")
    outside = (frame["delta_gap"] < frame["null_low"]) | (frame["delta_gap"] > frame["null_high"])
    frame["outside_null"] = outside.where(frame["null_low"].notna(), other=False).astype(bool)
    return frame
