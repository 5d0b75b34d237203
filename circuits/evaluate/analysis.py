"""Cross-context analyses of a study: overlap of component scores and the shared/specific split.

Saved as ``Overlap``: one Parquet table each (``TABLES``), whose columns the figures in
``circuits.report.plots`` read.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import pandas as pd

from circuits.evaluate import overlap
from circuits.evaluate.generalization import Generalization
from circuits.select.scoring import ContextScores
from interp.results import SavedResult

TABLES = ("pairwise", "jaccard_curves", "permutation", "shared_specific")


@dataclass(frozen=True, eq=False)
class Overlap(SavedResult):
    """The cross-context tables of a study, by name (``TABLES``)."""

    RESULT = "Overlap"

    tables: dict[str, pd.DataFrame]

    def to_dataframe(self) -> pd.DataFrame:
        """Every table stacked, with ``table`` naming it."""
        return pd.concat([t.assign(table=name) for name, t in self.tables.items()], ignore_index=True)

    def _tables(self) -> dict[str, pd.DataFrame]:
        return self.tables

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> "Overlap":
        return cls(tables)


def pairwise_overlap(scores: Mapping[str, ContextScores], *, k: int, n_null: int, seed: int) -> pd.DataFrame:
    """Jaccard, RBO, Spearman of every pair of contexts' top-k, per kind, with the random-set null."""
    frames = []
    for kind in ("neuron", "head"):
        width = next(iter(scores.values())).scores[kind].numel()
        matrix = overlap.overlap_matrix({c: s.scores for c, s in scores.items()}, min(k, width), kind,
                                        n_null=n_null, seed=seed)
        table = matrix.table.assign(kind=kind, k=matrix.k)
        long = table.melt(id_vars=["context_a", "context_b", "kind", "k", "null_mean", "null_low", "null_high",
                                   "p_value"], value_vars=["jaccard", "rbo", "spearman"],
                          var_name="stat", value_name="value")
        long.loc[long["stat"] != "jaccard", ["null_mean", "null_low", "null_high", "p_value"]] = float("nan")
        frames.append(long)
    return pd.concat(frames, ignore_index=True)


def jaccard_curves(scores: Mapping[str, ContextScores], *, ks) -> pd.DataFrame:
    frames = []
    for a, b in combinations(scores, 2):
        for kind in ("neuron", "head"):
            width = scores[a].scores[kind].numel()
            curve = overlap.jaccard_curve(scores[a].scores, scores[b].scores, [k for k in ks if k <= width], kind)
            wide = curve.to_dataframe().pivot_table(index=["kind", "k"], columns="series", values="jaccard")
            wide = wide.reset_index().rename(columns={"observed": "jaccard", "chance": "null_mean"})
            frames.append(wide.assign(pair=f"{a} / {b}"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def permutation_tests(scores: Mapping[str, ContextScores], *, k: int, n_null: int, seed: int) -> pd.DataFrame:
    """Label-permutation test of each pair's top-k neuron overlap and score correlation."""
    frames = []
    for a, b in combinations(scores, 2):
        for kind in ("neuron", "head"):
            pa, pb = scores[a].per_prompt()[kind], scores[b].per_prompt()[kind]
            test = overlap.context_overlap_test(pa, pb, k=min(k, pa[0].numel()), n_resamples=n_null,
                                                seed=seed)
            frames.append(test.summary().assign(context_a=a, context_b=b, kind=kind))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def shared_specific_table(generalization: Generalization) -> pd.DataFrame:
    """Per context and k: the held-out (L1) change of the gap by its own top-k set (``full_*``) vs by the
    common set alone (``shared_*``): ``delta`` with its interval and the signed ``share`` removed (primary),
    and the old ``reduction`` ratio (secondary)."""
    frame = generalization.frame
    rows = []

    def endpoints(row: pd.Series, prefix: str) -> dict:
        nan = float("nan")
        return {f"{prefix}_delta": row.get("delta_gap", nan), f"{prefix}_delta_low": row.get("delta_low", nan),
                f"{prefix}_delta_high": row.get("delta_high", nan), f"{prefix}_share": row.get("share_removed", nan),
                f"{prefix}_reduction": row["reduction"], f"{prefix}_low": row.get("reduction_low", nan),
                f"{prefix}_high": row.get("reduction_high", nan)}

    for kind in ("neuron", "head"):
        own = frame[(frame["strategy"] == f"top_k_{kind}s") & (frame["level"] == "L1")]
        shared = frame[(frame["strategy"] == f"common_{kind}s") & (frame["split"] == "heldout")]
        for (k, ctx), row in own.set_index(["k", "eval_context"]).iterrows():
            match = shared[(shared["k"] == k) & (shared["eval_context"] == ctx)]
            if len(match):
                rows.append({"kind": kind, "k": k, "context": ctx, **endpoints(row, "full"),
                             **endpoints(match.iloc[0], "shared"),
                             "n_shared": int(match["n_components"].iloc[0]), "n_full": int(row["n_components"])})
    table = pd.DataFrame(rows)
    if len(table):
        table["specific_delta"] = table["full_delta"] - table["shared_delta"]
        table["specific_share"] = table["full_share"] - table["shared_share"]
        table["specific_reduction"] = table["full_reduction"] - table["shared_reduction"]
    return table


def overlap_tables(scores: Mapping[str, ContextScores], generalization: Generalization, *, k: int, n_null: int,
                   seed: int, out_dir: Path) -> dict[str, pd.DataFrame]:
    """Compute and write every cross-context table of a study."""
    if len(scores) < 2:
        tables = {name: pd.DataFrame() for name in TABLES}
        tables["shared_specific"] = shared_specific_table(generalization)
    else:
        ks = sorted({1, 3, 10, 30, 100, 300, 1000, k})
        tables = {
            "pairwise": pairwise_overlap(scores, k=k, n_null=n_null, seed=seed),
            "jaccard_curves": jaccard_curves(scores, ks=ks),
            "permutation": permutation_tests(scores, k=k, n_null=n_null, seed=seed),
            "shared_specific": shared_specific_table(generalization),
        }
    Overlap(tables).save(out_dir)
    return tables


def load_overlap_tables(out_dir: Path) -> dict[str, pd.DataFrame]:
    return Overlap.load(out_dir).tables
