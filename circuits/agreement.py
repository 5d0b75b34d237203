"""How well the deterministic metric agrees with sampled answers, per context.

For the same prompts, the deterministic value (the expected answer over the context's grid,
``circuits.bias.measure``) is set beside ``n_samples`` sampled replies (``circuits.sampling``), read
after the answer prefix's last word (``read_reply``: chess's ``"0."`` + ``"35"`` is 0.35). Per
context: both White-minus-Black gaps with name x variation cluster-bootstrap intervals, the
sampled SMD and Mann-Whitney p-value (the papers' test), the invalid-answer share, and Spearman
and Pearson correlations between each prompt's deterministic value and the mean of its valid
samples. A grid check sets the share of replies that start with a grid candidate beside the mean
grid mass, and their mean grid value beside the mean expected value: at temperature 1 both pairs
estimate the same quantities. ``compare`` is the statistics alone, a pure function of the two tables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from circuits.audit import run_settings
from circuits.bias import CONTRASTS, group_gaps, measure
from circuits.config import StudyConfig
from circuits.contexts import AnswerGrid
from circuits.prompts import PromptSet
from circuits.sampling import AnswerType, parse_answer, sample_answers
from circuits.stats import correlation, mann_whitney

META = ("prompt_id", "context", "variation", "detail", "name", "group", "gender", "answer_type", "sign")
GAP_COLUMNS = ("gap", "ci_low", "ci_high", "smd", "p_mann_whitney")


@dataclass(frozen=True, eq=False)
class Agreement:
    """Per-context agreement (``table``), per-prompt values (``prompts``) and every sample (``samples``)."""

    table: pd.DataFrame
    prompts: pd.DataFrame
    samples: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per context: both gaps with intervals, correlations, invalid share, sign agreement."""
        return self.table.copy()

    def prompts_frame(self) -> pd.DataFrame:
        """One row per prompt: ``expected`` (deterministic), ``sampled_mean``, ``n_valid``, ``n_samples``."""
        return self.prompts.copy()

    def save(self, out_dir: str | Path) -> Path:
        """Write agreement.parquet, prompts.parquet, samples.parquet and settings.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.table.to_parquet(out / "agreement.parquet", index=False)
        self.prompts.to_parquet(out / "prompts.parquet", index=False)
        self.samples.to_parquet(out / "samples.parquet", index=False)
        (out / "settings.json").write_text(json.dumps(self.settings, indent=2, default=str))
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> Agreement:
        out = Path(out_dir)
        files = ("agreement.parquet", "prompts.parquet", "samples.parquet", "settings.json")
        missing = [n for n in files if not (out / n).exists()]
        if missing:
            raise FileNotFoundError(f"{out} is not a saved Agreement: {missing} missing")
        return cls(*(pd.read_parquet(out / n) for n in files[:3]), json.loads((out / "settings.json").read_text()))


def read_reply(prefix: str, text: str, answer_type: AnswerType) -> float:
    """The value of a reply read after the last word of the answer prefix (``"$"``, ``"0."``, ``"#"``);
    NaN unless the reply itself states an answer."""
    if np.isnan(parse_answer(text, answer_type)):
        return float("nan")
    return parse_answer(re.split(r"\s", prefix)[-1] + text, answer_type)


def grid_value(text: str, grid: AnswerGrid) -> float:
    """The value of the grid candidate a reply starts with (equals, for a terminated grid); else NaN."""
    for candidate, value in zip(grid.texts, grid.values):
        if text == candidate or (not grid.terminated and text.startswith(candidate)):
            return value
    return float("nan")


def per_prompt(prompts: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """``prompts`` (with ``expected``) joined with each prompt's mean of valid samples and counts."""
    counts = samples.groupby("prompt_id")["value"].agg(sampled_mean="mean", n_valid="count", n_samples="size")
    return prompts.join(counts, on="prompt_id")


def _race_gaps(frame: pd.DataFrame, prefix: str, **kw) -> pd.DataFrame:
    gaps = group_gaps(frame, contrasts=("race",), **kw).table
    columns = [prefix + c for c in GAP_COLUMNS]
    if gaps.empty:
        return pd.DataFrame(columns=columns, index=pd.Index([], name="context"), dtype=float)
    return gaps.set_index("context")[list(GAP_COLUMNS)].set_axis(columns, axis=1)


def compare(
    prompts: pd.DataFrame, samples: pd.DataFrame, *, n_resamples: int = 1000, confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Per context, the deterministic and sampled gaps (White minus Black) and their agreement.

    ``prompts``: one row per prompt with the ``META`` columns, ``expected`` (the deterministic
    value) and ``grid_mass``. ``samples``: one row per sample with ``prompt_id``, ``value`` (NaN =
    invalid reply) and ``grid_value`` (NaN = off the grid). The sampled gap, its interval, SMD,
    ``sampled_auc`` (Mann-Whitney U / (n_White n_Black): the chance a White-name sample exceeds a
    Black-name one) and ``median_sampled`` use every valid sample; correlations, means and
    ``scale_ratio`` (mean sampled / mean expected) pair each prompt's ``expected`` with the mean of
    its valid samples (prompts without one are left out).
    """
    table = per_prompt(prompts, samples)
    kw = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    every = samples[["prompt_id", "value", "grid_value"]].merge(prompts[list(META)], on="prompt_id")
    valid = every.dropna(subset=["value"]).drop(columns="grid_value")
    gaps = _race_gaps(table.rename(columns={"expected": "value"}), "det_", **kw).join(
        _race_gaps(valid, "sampled_", **kw), how="outer")
    column, a, b = CONTRASTS["race"]
    rows = []
    for context, cell in table.groupby("context", sort=False):
        pairs = cell.dropna(subset=["sampled_mean"])
        drawn = every[every["context"] == context]
        side_a, side_b = (drawn.loc[drawn[column] == g, "value"].dropna() for g in (a, b))
        u, _ = mann_whitney(side_a, side_b)
        rho, p_rho = correlation(pairs["expected"], pairs["sampled_mean"], "spearman")
        r, p_r = correlation(pairs["expected"], pairs["sampled_mean"], "pearson")
        rows.append({
            "context": context,
            "answer_type": cell["answer_type"].iloc[0],
            "n_prompts": len(cell),
            "samples_per_prompt": int(cell["n_samples"].max()),
            "invalid_share": float(1 - cell["n_valid"].sum() / cell["n_samples"].sum()),
            "spearman_rho": rho,
            "spearman_p": p_rho,
            "pearson_r": r,
            "pearson_p": p_r,
            "n_correlated": len(pairs),
            "mean_expected": float(pairs["expected"].mean()),
            "mean_sampled": float(pairs["sampled_mean"].mean()),
            "median_sampled": float(drawn["value"].median()),
            "mean_abs_difference": float((pairs["expected"] - pairs["sampled_mean"]).abs().mean()),
            "sampled_auc": u / max(len(side_a) * len(side_b), 1),
            "mean_grid_mass": float(cell["grid_mass"].mean()),
            "grid_share_sampled": float(drawn["grid_value"].notna().mean()),
            "grid_mean_sampled": float(drawn["grid_value"].mean()),
        })
    out = pd.DataFrame(rows).join(gaps, on="context")
    out["scale_ratio"] = out["mean_sampled"] / out["mean_expected"]
    det, sampled = np.sign(out["det_gap"]), np.sign(out["sampled_gap"])
    out["sign_agrees"] = (det == sampled).astype("boolean").mask(det.isna() | sampled.isna())
    return out


def cap_prompts(prompts: PromptSet, max_prompts: int, *, seed: int = 0) -> PromptSet:
    """At most ``max_prompts`` prompts per context: a seeded draw taking one prompt per name, cycling
    over the group x gender cells, before any name's second prompt."""
    if max_prompts < 1:
        raise ValueError(f"max_prompts must be at least 1, got {max_prompts}")
    frame = prompts.frame.assign(_draw=np.random.default_rng(seed).random(len(prompts)))
    frame["_round"] = frame.groupby(["context", "name"])["_draw"].rank(method="first")
    frame["_turn"] = frame.groupby(["context", "group", "gender", "_round"])["_draw"].rank(method="first")
    keep = frame.sort_values(["_round", "_turn", "_draw"]).groupby("context", sort=False).head(max_prompts)
    return prompts.filter(prompt_id=list(keep["prompt_id"]))


def run_agreement(
    model,
    contexts: Sequence[str] | None = None,
    *,
    prompts: PromptSet | None = None,
    details: Sequence[str] = ("low",),
    variations: int | None = 3,
    names_per_cell: int = 2,
    max_prompts: int | None = None,
    n_samples: int = 10,
    temperature: float = 1.0,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = True,
    out_dir: str | Path | None = None,
) -> Agreement:
    """Measure and sample the same prompts, then ``compare`` them per context.

    Prompts default to the study's selection (``circuits.study.study_prompts``) of ``contexts``
    (default: the study's three), capped at ``max_prompts`` per context (``cap_prompts``); or pass a
    ready ``prompts`` set. Each context is sampled on its own, seeded per (prompt index in the
    context, sample), so its rows do not depend on the other contexts chosen. ``batch_size``
    counts rows per forward pass.
    """
    from circuits.study import study_prompts

    if prompts is not None and contexts is not None:
        raise ValueError("give contexts or prompts, not both: prompts already fix their contexts")
    if isinstance(model, (str, Path)):
        from interp import load_model

        model = load_model(model)
    if prompts is None:
        prompts = study_prompts(model, contexts or StudyConfig.contexts, details=details, variations=variations,
                                names_per_cell=names_per_cell, seed=seed)
    if max_prompts is not None:
        prompts = cap_prompts(prompts, max_prompts, seed=seed)
    measured = measure(model, prompts, batch_size=batch_size, progress=progress).values
    parts = []
    for context in prompts.contexts:
        rows = prompts.filter(context=context)
        answer = prompts.answers[context]
        kind = "yes_no" if answer.type == "yes_no" else "number"
        drawn = sample_answers(model, rows.texts, n_samples=n_samples, temperature=temperature,
                               max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                               answer_type=kind, progress=progress).to_dataframe()
        parts.append(pd.DataFrame({
            "prompt_id": rows.frame["prompt_id"].to_numpy()[drawn["prompt_id"]],
            "sample": drawn["sample"],
            "text": drawn["text"],
            "value": [read_reply(answer.prefix, text, kind) for text in drawn["text"]],
            "grid_value": [grid_value(text, answer.grid) for text in drawn["text"]],
        }))
    samples = pd.concat(parts, ignore_index=True)
    per = measured[[*META, "value", "grid_mass"]].rename(columns={"value": "expected"})
    table = compare(per, samples, n_resamples=n_resamples, confidence=confidence, seed=seed)
    settings = run_settings(model, prompts, variations=variations, names_per_cell=names_per_cell,
                            max_prompts=max_prompts, n_samples=n_samples, temperature=temperature,
                            max_new_tokens=max_new_tokens, n_resamples=n_resamples, confidence=confidence,
                            seed=seed)
    result = Agreement(table, per_prompt(per, samples), samples, settings)
    if out_dir is not None:
        result.save(out_dir)
    return result


__all__ = ["Agreement", "cap_prompts", "compare", "grid_value", "per_prompt", "read_reply", "run_agreement"]
