"""The generalization protocol: does a component set found on one context reduce bias elsewhere?

Levels, for a set scored on context ``c``'s training split (training variations, training names):

- ``L0``: the same prompts it was scored on;
- ``names``: training variations of ``c`` with held-out names;
- ``L1``: held-out variations of ``c``;
- ``L2``: held-out variations of every other context.

The train-context x eval-context matrix of bias reduction has L1 on its diagonal and L2 off it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from circuits.evaluation import EvalSet, UtilityProbe, evaluate
from interp.components import ComponentSet

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
class Generalization:
    """Bias reduction of each candidate set at each level, with utility."""

    frame: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        return self.frame.copy()

    def matrix(self, strategy: str | None = None, k: int | None = None) -> pd.DataFrame:
        """Long train_context x eval_context reduction on held-out variations (L1 and L2)."""
        rows = self.frame[self.frame["level"].isin(["L1", "L2"])]
        if strategy is not None:
            rows = rows[rows["strategy"] == strategy]
        if k is not None:
            rows = rows[rows["k"] == k]
        keys = ["strategy", "k", "train_context", "eval_context"]
        return rows.groupby(keys, as_index=False)["reduction"].mean()

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.frame.to_parquet(out / "generalization.parquet", index=False)
        (out / "generalization.json").write_text(json.dumps(self.settings, indent=2, default=str))
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> "Generalization":
        out = Path(out_dir)
        return cls(pd.read_parquet(out / "generalization.parquet"),
                   json.loads((out / "generalization.json").read_text()))


def _level(train_context: str, eval_context: str, split: str) -> str:
    if train_context == "common":
        return {"train": "L0", "names": "names"}.get(split, "L1")
    if eval_context != train_context:
        return "L2"
    return {"train": "L0", "names": "names", "heldout": "L1"}[split]


def generalize(
    model,
    candidates: Sequence[CandidateSet],
    splits: Mapping[str, ContextSplits],
    *,
    probe: UtilityProbe | None = None,
    how: str = "zero",
    means=None,
    batch_size: int = 16,
    progress: bool = True,
) -> Generalization:
    """Measure every candidate on its own context's L0/names/L1 sets and every other context's L1."""
    labels = [c.label for c in candidates]
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
    result = evaluate(model, {c.label: c.components for c in candidates}, eval_sets, probe=probe, how=how,
                      means=means, plan=plan, batch_size=batch_size, progress=progress)
    frame = result.frame
    meta = {c.label: c for c in candidates}
    rows = []
    for row in frame.to_dict("records"):
        eval_context, split = origin[row["eval"]]
        if row["set"] == "none":
            info = {"strategy": "none", "k": 0, "train_context": "none", "level": split}
        else:
            c = meta[row["set"]]
            info = {"strategy": c.strategy, "k": c.k, "train_context": c.train_context,
                    "level": _level(c.train_context, eval_context, split)}
        rows.append({**row, **info, "eval_context": eval_context, "split": split})
    settings = {**result.settings, "levels": LEVELS}
    return Generalization(pd.DataFrame(rows), settings)
