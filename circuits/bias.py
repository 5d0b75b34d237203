"""Deterministic bias metrics: expected answers over candidate grids, group gaps, intervals, tests.

Per prompt, the model's exact probability of every candidate answer on the context's grid is
renormalized over the grid; the prompt's value is the expected numeric answer under that
distribution (P(yes) for yes/no grids, whose values are 1 and 0). The grid mass (the probability
the model puts on the grid at all) is reported beside it.

Gaps compare two groups of names within a context: White minus Black (``race``) and women minus
men (``gender``). ``gap`` is on the answer's own scale; ``advantage = sign * gap`` applies the
context's sign convention, so a positive advantage means the first group is favoured.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from circuits.contexts import AnswerFormat, Context, get_context
from circuits.prompts import PairSet, PromptSet, uses_chat
from circuits.stats import cluster_bootstrap, mann_whitney, permutation_pvalue, smd
from interp.batching import encode, microbatches, pad_ids, pad_token_id
from interp.metrics import CandidateAnswers, ExpectedValue, takes_layout

CONTRASTS = {"race": ("group", "White", "Black"), "gender": ("gender", "woman", "man")}


def answer_candidates(
    model_or_tokenizer, answer: AnswerFormat, *, chat: bool | None = None
) -> CandidateAnswers:
    """The grid of ``answer`` as token-level candidates for this tokenizer.

    A terminated grid ends every candidate with the end of the answer: the end-of-turn token for
    chat prompts, a newline for plain ones.
    """
    is_model = hasattr(model_or_tokenizer, "cfg")
    tokenizer = model_or_tokenizer.tokenizer if is_model else model_or_tokenizer
    chat = uses_chat(tokenizer) if chat is None else chat
    texts = list(answer.grid.texts)
    if answer.grid.terminated:
        end = tokenizer.eos_token if chat and tokenizer.eos_token else "\n"
        texts = [t + end for t in texts]
    packed = takes_layout(model_or_tokenizer) if is_model else True
    return CandidateAnswers.from_texts(tokenizer, texts, answer.grid.values, packed=packed)


def context_metric(model, context: str | Context, *, prompts: PromptSet | None = None) -> ExpectedValue:
    """The differentiable per-prompt metric of a context: the expected answer over its grid.

    An ``interp.metrics`` Metric: run the model on ``expanded = metric.expand(batch)`` as
    ``model(expanded.tokens, **expanded.forward_kwargs())`` (the keywords carry the packed layout)
    and call the metric on the logits, or use ``interp.metrics.run_metric``. ``prompts`` supplies the answer format of imported contexts and the chat setting.
    """
    if prompts is not None and (context if isinstance(context, str) else context.name) in prompts.answers:
        name = context if isinstance(context, str) else context.name
        return ExpectedValue(answer_candidates(model, prompts.answers[name], chat=prompts.chat))
    return ExpectedValue(answer_candidates(model, get_context(context).answer))


def check_answer_alignment(model, prompt_text: str, candidates: CandidateAnswers) -> None:
    """Raise unless every candidate tokenizes the same after the prompt as on its own.

    Candidate probabilities are read as continuations of the prompt's tokens, so the answer
    prefix must end exactly where the answer starts (e.g. ``"$"`` before the digits).
    """
    prompt = encode(model, prompt_text)
    for text, ids in zip(candidates.texts, candidates.token_ids):
        joint = encode(model, prompt_text + text)
        if joint != prompt + list(ids):
            raise ValueError(
                f"the candidate {text!r} tokenizes differently after the prompt than alone; end the answer "
                f"prefix right before the answer (prompt ends {prompt_text[-30:]!r})"
            )


@dataclass(frozen=True, eq=False)
class Measurement:
    """Per-prompt expected answers (``values``) and each prompt's distribution over its grid."""

    values: pd.DataFrame
    distribution: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        return self.values.copy()

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.values.to_parquet(out / "values.parquet", index=False)
        self.distribution.to_parquet(out / "distribution.parquet", index=False)
        (out / "measurement.json").write_text(json.dumps(self.settings, indent=2))
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> Measurement:
        out = Path(out_dir)
        return cls(
            pd.read_parquet(out / "values.parquet"),
            pd.read_parquet(out / "distribution.parquet"),
            json.loads((out / "measurement.json").read_text()),
        )


@torch.no_grad()
def measure(model, prompts: PromptSet, *, batch_size: int = 32, progress: bool = True) -> Measurement:
    """Expected answer, grid mass and grid distribution of every prompt.

    ``batch_size`` counts model rows per forward pass: a prompt takes one row per candidate when
    its grid has multi-token candidates, one row otherwise.
    """
    frame = prompts.frame
    pad = pad_token_id(model.tokenizer)
    values = np.full(len(frame), np.nan)
    mass = np.full(len(frame), np.nan)
    dist_parts = []
    bar = tqdm(total=len(frame), desc="measuring", disable=not progress)
    for context in prompts.contexts:
        metric = context_metric(model, context, prompts=prompts)
        cands = metric.candidates
        rows = np.flatnonzero((frame["context"] == context).to_numpy())
        texts = frame["prompt_text"].to_numpy()[rows]
        check_answer_alignment(model, texts[0], cands)
        ids = [encode(model, t) for t in texts]
        per_prompt = 1 if cands.single_token else len(cands.texts)
        grid_values = torch.tensor(cands.values, dtype=torch.float32)
        probs = np.zeros((len(rows), len(cands.texts)))
        for part in microbatches(len(rows), max(1, batch_size // per_prompt)):
            batch = pad_ids(ids[part], pad).to(model.cfg.device)
            logp = cands.score(model, batch).float().cpu()
            p = logp.softmax(-1)
            probs[part] = p.numpy()
            values[rows[part]] = (p @ grid_values).numpy()
            mass[rows[part]] = logp.logsumexp(-1).exp().numpy()
            bar.update(part.stop - part.start)
        dist_parts.append(
            pd.DataFrame(
                {
                    "prompt_id": np.repeat(frame["prompt_id"].to_numpy()[rows], len(cands.texts)),
                    "context": context,
                    "candidate": np.tile(list(prompts.answers[context].grid.texts), len(rows)),
                    "candidate_value": np.tile(cands.values, len(rows)),
                    "probability": probs.reshape(-1),
                }
            )
        )
    bar.close()
    keep = [c for c in frame.columns if c not in ("user_text", "prompt_text")]
    table = frame[keep].assign(value=values, grid_mass=mass)
    settings = {
        "model": str(getattr(model, "model_id", type(model).__name__)),
        "chat": prompts.chat,
        "batch_size": batch_size,
        "n_prompts": len(frame),
    }
    return Measurement(table, pd.concat(dist_parts, ignore_index=True), settings)


@dataclass(frozen=True, eq=False)
class GapTable:
    """Group gaps per context (and any other ``by`` columns) and contrast, with intervals and tests."""

    table: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        return self.table.copy()


def _gap(frame: pd.DataFrame, column: str, a: str) -> float:
    labels = frame[column].to_numpy()
    vals = frame["value"].to_numpy()
    in_a = labels == a
    if in_a.all() or not in_a.any():
        return float("nan")
    return float(vals[in_a].mean() - vals[~in_a].mean())


def _signed_interval(sign: int, low: float, high: float) -> tuple[float, float]:
    return (low, high) if sign > 0 else (-high, -low)


def group_gaps(
    values: Measurement | pd.DataFrame,
    *,
    by: Sequence[str] = ("context",),
    contrasts: Sequence[str] = ("race", "gender"),
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> GapTable:
    """Gaps between groups of names, per ``by`` cell and contrast.

    Per cell: the mean value of each side over its prompts, ``gap`` = mean A - mean B, the
    standardized mean difference over prompts (``circuits.stats.smd``), a ``confidence`` interval
    from a two-way cluster bootstrap (names resampled within each side, variations resampled), a
    permutation p-value that shuffles side labels across names (each name's mean over its prompts),
    a Mann-Whitney p-value over prompts, and the sign convention applied (``advantage``).
    """
    frame = values.values if isinstance(values, Measurement) else values
    unknown = [c for c in contrasts if c not in CONTRASTS]
    if unknown:
        raise ValueError(f"unknown contrasts {unknown}; choose from {list(CONTRASTS)}")
    rows = []
    for key, cell in frame.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        sign = int(cell["sign"].iloc[0])
        for contrast in contrasts:
            column, a, b = CONTRASTS[contrast]
            part = cell[cell[column].isin([a, b])]
            names = part.groupby("name")[["value"]].mean().join(part.groupby("name")[column].first())
            side_a, side_b = part[part[column] == a], part[part[column] == b]
            if names[column].eq(a).sum() < 2 or names[column].eq(b).sum() < 2:
                warnings.warn(
                    f"no {contrast} gap for {dict(zip(by, key))}: each side needs at least 2 names, "
                    f"got {names[column].eq(a).sum()} {a} and {names[column].eq(b).sum()} {b}",
                    stacklevel=2,
                )
                continue
            gap = _gap(part, column, a)
            low, high = cluster_bootstrap(
                part,
                lambda f, column=column, a=a: _gap(f, column, a),
                ["name", "variation"],
                strata={"name": column},
                n_resamples=n_resamples,
                seed=seed,
                confidence=confidence,
            )
            adv_low, adv_high = _signed_interval(sign, low, high)
            rows.append(
                {
                    **dict(zip(by, key)),
                    "contrast": contrast,
                    "group_a": a,
                    "group_b": b,
                    "answer_type": cell["answer_type"].iloc[0],
                    "sign": sign,
                    "n_names_a": int(names[column].eq(a).sum()),
                    "n_names_b": int(names[column].eq(b).sum()),
                    "n_variations": int(part["variation"].nunique()),
                    "n_prompts": len(part),
                    "mean_a": float(side_a["value"].mean()),
                    "mean_b": float(side_b["value"].mean()),
                    "gap": gap,
                    "ci_low": low,
                    "ci_high": high,
                    "advantage": sign * gap,
                    "advantage_ci_low": adv_low,
                    "advantage_ci_high": adv_high,
                    "smd": smd(side_a["value"], side_b["value"]),
                    "p_permutation": permutation_pvalue(
                        names.loc[names[column] == a, "value"],
                        names.loc[names[column] == b, "value"],
                        n_resamples=n_resamples,
                        seed=seed,
                    ),
                    "p_mann_whitney": mann_whitney(side_a["value"], side_b["value"])[1],
                    "mean_grid_mass": float(part["grid_mass"].mean())
                    if "grid_mass" in part
                    else float("nan"),
                }
            )
    settings = {
        "by": list(by),
        "contrasts": list(contrasts),
        "n_resamples": n_resamples,
        "confidence": confidence,
        "seed": seed,
        "clusters": ["name (within side)", "variation"],
    }
    return GapTable(pd.DataFrame(rows), settings)


def pair_differences(values: Measurement | pd.DataFrame, pairs: PairSet) -> pd.DataFrame:
    """Per counterfactual pair: the clean (group A) value, the corrupt (group B) value, their difference."""
    frame = values.values if isinstance(values, Measurement) else values
    lookup = frame.set_index("prompt_id")["value"]
    missing = sorted(set(pairs.frame["prompt_id_a"]).union(pairs.frame["prompt_id_b"]) - set(lookup.index))
    if missing:
        raise ValueError(f"{len(missing)} paired prompts were not measured, e.g. {missing[0]!r}")
    table = pairs.to_dataframe()
    table["value_a"] = lookup.loc[table["prompt_id_a"]].to_numpy()
    table["value_b"] = lookup.loc[table["prompt_id_b"]].to_numpy()
    table["difference"] = table["value_a"] - table["value_b"]
    return table


def paired_gaps(
    values: Measurement | pd.DataFrame,
    pairs: PairSet,
    *,
    by: Sequence[str] = ("context",),
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> GapTable:
    """Mean clean-minus-corrupt difference over token-aligned pairs, per ``by`` cell.

    The interval resamples both names of a pair and the variations (a three-way cluster
    bootstrap); the p-value swaps each pair's two values at random.
    """
    table = pair_differences(values, pairs)
    rows = []
    for key, cell in table.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        sign = int(cell["sign"].iloc[0])
        low, high = cluster_bootstrap(
            cell,
            lambda f: float(f["difference"].mean()),
            ["name_a", "name_b", "variation"],
            n_resamples=n_resamples,
            seed=seed,
            confidence=confidence,
        )
        gap = float(cell["difference"].mean())
        adv_low, adv_high = _signed_interval(sign, low, high)
        rows.append(
            {
                **dict(zip(by, key)),
                "contrast": "race_pairs",
                "group_a": pairs.clean_group,
                "group_b": pairs.corrupt_group,
                "answer_type": cell["answer_type"].iloc[0],
                "sign": sign,
                "n_pairs": len(cell),
                "gap": gap,
                "ci_low": low,
                "ci_high": high,
                "advantage": sign * gap,
                "advantage_ci_low": adv_low,
                "advantage_ci_high": adv_high,
                "p_permutation": permutation_pvalue(
                    cell["value_a"], cell["value_b"], paired=True, n_resamples=n_resamples, seed=seed
                ),
            }
        )
    settings = {
        "by": list(by),
        "n_resamples": n_resamples,
        "confidence": confidence,
        "seed": seed,
        "clusters": ["name_a", "name_b", "variation"],
    }
    return GapTable(pd.DataFrame(rows), settings)


__all__ = [
    "CONTRASTS",
    "GapTable",
    "Measurement",
    "answer_candidates",
    "check_answer_alignment",
    "context_metric",
    "group_gaps",
    "measure",
    "pair_differences",
    "paired_gaps",
]
