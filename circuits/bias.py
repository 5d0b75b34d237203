"""Deterministic bias metrics: the model's answer distribution, its summaries, group gaps, tests.

Per prompt, the model's exact probability of every answer it covers (below) is renormalized over
those answers and summarized: ``value_mean`` (expected answer), ``value_median`` and, for numeric
answers, ``value_log10`` (expected ``log10(1 + amount)``). ``value`` is the answer type's default
summary (``SUMMARY``): ``log10`` for dollars (amounts are heavy-tailed: a gap is then a ratio,
``10**gap``), the mean for percent, score, probability and rank, P(yes) for yes/no. Beside it:
``grid_mass`` (the probability the covered answers hold), ``other_mass`` (the reply does not start
a number / a yes or no at all: a refusal, a word) and ``tail_mass`` (the rest: numbers, or yes/no
forms, beyond the covered set); the three sum to 1.

The covered answers are the model's own: for a numeric context the number tree of
``interp.numeric`` (digits, separators, decimals, multipliers, read as ``parse_number`` reads
them) is expanded best-first on seeded pilot prompts of the context until ``Expansion.target`` of
their mass is covered (or the node budget is spent); the resulting fixed set is scored exactly on
every prompt, each answer with its stop term (the number ends there). Yes/no covers the case,
leading-space and markdown-bold variants of Yes and No. A format with a fixed ``AnswerGrid``
scores that grid instead.

Gaps compare two groups of names within a context: White minus Black (``race``) and women minus
men (``gender``). ``gap`` is on the scale of ``value``; ``advantage = sign * gap`` applies the
context's sign convention, so a positive advantage means the first group is favoured.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from circuits.contexts import CONTEXTS, DECIMALS, AnswerFormat, Context, get_context
from circuits.parsing import parse_number
from circuits.prompts import PairSet, PromptSet, build_prompts, uses_chat
from circuits.stats import cluster_bootstrap, mann_whitney, permutation_pvalue, smd
from interp.batching import encode, microbatches, pad_ids, pad_token_id
from interp.metrics import SUMMARIES, CandidateAnswers, ExpectedValue, takes_layout
from interp.numeric import NumberGrammar, expand, weighted_median

CONTRASTS = {"race": ("group", "White", "Black"), "gender": ("gender", "woman", "man")}
# The default summary per answer type (``value``; the attribution target of ``context_metric``).
SUMMARY = {"dollars": "log10", "percent": "mean", "score": "mean", "probability": "mean", "rank": "mean",
           "yes_no": "mean"}
YES_NO = {"Yes": 1.0, "No": 0.0}
# Every form counts: leading space or not, case, markdown bold; trailing punctuation follows it.
YES_NO_FORMS = (" {}", "{}", " {lower}", "{lower}", " {upper}", "{upper}", "**{}", " **{}")


@dataclass(frozen=True)
class Expansion:
    """How a numeric context's answers are found: ``pilots`` seeded prompts of the context, the
    number tree expanded best-first (``per_round`` nodes a round) until ``target`` of their mean
    numeric mass (the probability that the reply is a number) is covered or ``max_nodes`` nodes
    are evaluated; answers under ``min_mass`` of it (mean over the pilots) are dropped, which
    keeps the trie, and so every scored row, short (see ``interp.numeric.expand``)."""

    pilots: int = 16
    target: float = 0.97
    max_nodes: int = 320
    per_round: int = 16
    min_mass: float = 1e-4
    seed: int = 0


_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer(model_or_tokenizer):
    return model_or_tokenizer.tokenizer if hasattr(model_or_tokenizer, "cfg") else model_or_tokenizer


def _yes_no_candidates(model_or_tokenizer) -> CandidateAnswers:
    tokenizer = _tokenizer(model_or_tokenizer)
    texts, values, ids = [], [], []
    for word, value in YES_NO.items():
        for form in YES_NO_FORMS:
            text = form.format(word, lower=word.lower(), upper=word.upper())
            tokens = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            if tokens not in ids:
                texts.append(text), values.append(value), ids.append(tokens)
    # no candidate may be a token prefix of another (their probabilities would overlap)
    keep = [i for i, t in enumerate(ids) if not any(o != t and t[: len(o)] == o for o in ids)]
    first = tuple(sorted({ids[i][0] for i in keep}))
    packed = takes_layout(model_or_tokenizer) if hasattr(model_or_tokenizer, "cfg") else True
    return CandidateAnswers(tuple(texts[i] for i in keep), tuple(values[i] for i in keep),
                            tuple(ids[i] for i in keep), packed, None, first)


def _fixed_grid(model_or_tokenizer, answer: AnswerFormat, chat: bool) -> CandidateAnswers:
    tokenizer = _tokenizer(model_or_tokenizer)
    texts = list(answer.grid.texts)
    if answer.grid.terminated:
        end = tokenizer.eos_token if chat and tokenizer.eos_token else "\n"
        texts = [t + end for t in texts]
    packed = takes_layout(model_or_tokenizer) if hasattr(model_or_tokenizer, "cfg") else True
    return CandidateAnswers.from_texts(tokenizer, texts, answer.grid.values, packed=packed)


@functools.lru_cache(maxsize=16)
def _grammar(tokenizer, max_decimals: int) -> NumberGrammar:
    return NumberGrammar.of(tokenizer, max_decimals=max_decimals)


def number_start(prefix: str) -> str:
    """The part of a number an answer prefix already holds (``"0."`` in ``"... winning: 0."``)."""
    return re.search(r"\d[\d,]*\.?\d*$|$", prefix).group()


def answer_candidates(
    model, answer: AnswerFormat, *, pilots: Sequence[str] | None = None, chat: bool | None = None,
    expansion: Expansion = Expansion(),
) -> CandidateAnswers:
    """The answers of ``answer`` scored for this model, as token-level candidates.

    Numeric types: the answers the model gives after the ``pilots`` prompt texts (see
    ``Expansion``), each ending with its stop term, valued by ``parse_number`` of the prefix's
    number start plus the answer (``"0." + "75"``). Yes/no: the variants of Yes and No
    (``YES_NO_FORMS``). A fixed grid: its strings (a terminated grid ends each with the end of
    the answer: end of turn for chat prompts, a newline for plain ones).
    """
    tokenizer = _tokenizer(model)
    chat = uses_chat(tokenizer) if chat is None else chat
    if answer.grid is not None:
        return _fixed_grid(model, answer, chat)
    if answer.type == "yes_no":
        return _yes_no_candidates(model)
    if not pilots:
        raise ValueError(f"a {answer.type} answer needs pilot prompts to find the model's answers")
    start = number_start(answer.prefix)
    grammar = _grammar(tokenizer, DECIMALS[answer.type])
    batch = pad_ids([encode(model, t) for t in pilots], pad_token_id(tokenizer))
    tree = expand(model, batch, grammar, start=grammar.state_of(start), target=expansion.target,
                  max_nodes=expansion.max_nodes, per_round=expansion.per_round, min_mass=expansion.min_mass)
    cands = tree.candidates(tokenizer, lambda text: parse_number(start + text), min_mass=expansion.min_mass,
                            packed=takes_layout(model))
    if len(cands.texts) < 2:
        raise ValueError(
            f"the model gives almost no {answer.type} answers after the prompt (covered mass {tree.covered:.3g}, "
            f"non-numeric {tree.other:.3g}); check the answer prefix {answer.prefix!r}"
        )
    return cands


def _pilot_texts(model, name: str, answer: AnswerFormat, prompts: PromptSet | None, chat: bool, n: int,
                 seed: int) -> list[str]:
    """Seeded pilot prompts: from the whole registered context when ``answer`` is its own (so any
    subset of prompts gets the same answers), else from ``prompts``' rows of the context."""
    if name in CONTEXTS and CONTEXTS[name].answer == answer:
        frame = build_prompts(model, [name], chat=chat).frame
    elif prompts is not None:
        frame = prompts.frame[prompts.frame["context"] == name]
    else:
        raise ValueError(f"context {name!r} is not registered; pass its prompts")
    return frame.sample(min(n, len(frame)), random_state=seed)["prompt_text"].tolist()


def context_metric(
    model, context: str | Context, *, prompts: PromptSet | None = None, summary: str | None = None,
    expansion: Expansion = Expansion(),
) -> ExpectedValue:
    """The differentiable per-prompt metric of a context: ``summary`` (default: the answer type's,
    ``SUMMARY``) of the model's distribution over the context's answers, renormalized over them.

    An ``interp.metrics`` Metric: run the model on ``expanded = metric.expand(batch)`` as
    ``model(expanded.tokens, **expanded.forward_kwargs())`` (the keywords carry the packed layout)
    and call the metric on the logits, or use ``interp.metrics.run_metric``. ``prompts`` supplies
    the answer format of imported contexts and the chat setting. The answer set is derived once per
    model, context, answer format and chat setting (cached): an imported context takes its pilots
    from the first ``prompts`` it is called with.
    """
    name = context if isinstance(context, str) else context.name
    if prompts is not None and name in prompts.answers:
        answer, chat = prompts.answers[name], prompts.chat
    else:
        answer, chat = get_context(context).answer, uses_chat(model.tokenizer)
    key = (name, answer, chat, expansion)
    cache = _DERIVED.setdefault(model, {})
    if key not in cache:
        pilots = None
        if answer.grid is None and answer.type != "yes_no":
            pilots = _pilot_texts(model, name, answer, prompts, chat, expansion.pilots, expansion.seed)
        cache[key] = answer_candidates(model, answer, pilots=pilots, chat=chat, expansion=expansion)
    return ExpectedValue(cache[key], summary or SUMMARY[answer.type])


def check_answer_alignment(model, prompt_text: str, candidates: CandidateAnswers) -> None:
    """Raise unless some candidate tokenizes the same after the prompt as on its own.

    Candidate probabilities are read as continuations of the prompt's tokens, so the answer
    prefix must end exactly where the answer starts (e.g. ``"$"`` before the digits). Candidates
    are token paths: a rarer form may merge with the prefix when written out (``"Decision:**Yes"``),
    so one aligned candidate suffices; token paths that are not their own text's tokenization are
    not checked.
    """
    prompt = encode(model, prompt_text)
    misaligned = []
    for text, ids in zip(candidates.texts, candidates.token_ids):
        if list(ids) != model.tokenizer(text, add_special_tokens=False)["input_ids"]:
            continue
        if encode(model, prompt_text + text) != prompt + list(ids):
            misaligned.append(text)
        else:
            return
    if misaligned:
        raise ValueError(
            f"the candidate {misaligned[0]!r} tokenizes differently after the prompt than alone; end the answer "
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
def measure(
    model, prompts: PromptSet, *, batch_size: int = 32, progress: bool = True, expansion: Expansion = Expansion()
) -> Measurement:
    """Every prompt's answer distribution, its summaries and covered mass (see the module docstring).

    ``values``: the prompt columns with ``value`` (the type's default summary, ``settings["summary"]``),
    ``value_mean``, ``value_median``, ``value_log10`` (numeric types; NaN for yes/no), ``grid_mass``,
    ``other_mass`` and ``tail_mass``. ``distribution``: per prompt and covered answer its text
    (``candidate``), ``candidate_value``, ``probability`` (renormalized over the covered answers)
    and ``mass`` (absolute). ``batch_size`` counts prompts per forward pass (fewer when a trie of many
    answers would make the logits read too large; a row per candidate when the model cannot run a
    packed layout). Deterministic, and the same on any subset of the prompts.
    """
    frame = prompts.frame
    pad = pad_token_id(model.tokenizer)
    columns = {c: np.full(len(frame), np.nan) for c in ("value", "value_mean", "value_median", "value_log10",
                                                           "grid_mass", "other_mass")}
    dist_parts, summaries, nodes = [], {}, {}
    bar = tqdm(total=len(frame), desc="measuring", disable=not progress)
    for context in prompts.contexts:
        metric = context_metric(model, context, prompts=prompts, expansion=expansion)
        cands, answer_type = metric.candidates, prompts.answers[context].type
        summaries[context], nodes[context] = metric.summary, cands.n_nodes
        rows = np.flatnonzero((frame["context"] == context).to_numpy())
        texts = frame["prompt_text"].to_numpy()[rows]
        check_answer_alignment(model, texts[0], cands)
        ids = [encode(model, t) for t in texts]
        if not cands.packed and not cands.single_token:
            per_forward = max(1, batch_size // len(cands.texts))
        else:
            per_forward = max(1, min(batch_size, _READ_BUDGET // (cands.n_nodes + 1)))
        values = torch.tensor(cands.values, dtype=torch.float64)
        mass = np.zeros((len(rows), len(cands.texts)))
        for part in microbatches(len(rows), per_forward):
            batch = pad_ids(ids[part], pad).to(model.cfg.device)
            if cands.answer_tokens is None:
                logp, other = cands.score(model, batch).double().cpu(), None
            else:
                logp, other = (x.double().cpu() for x in cands.score(model, batch, other=True))
                columns["other_mass"][rows[part]] = other.exp().numpy()
            p = logp.softmax(-1)
            mass[part] = logp.exp().numpy()
            columns["value_mean"][rows[part]] = (p @ values).numpy()
            columns["value_median"][rows[part]] = weighted_median(p, values).numpy()
            if answer_type != "yes_no":
                columns["value_log10"][rows[part]] = (p @ SUMMARIES["log10"](values)).numpy()
            columns["value"][rows[part]] = (p @ SUMMARIES[metric.summary](values)).numpy()
            columns["grid_mass"][rows[part]] = logp.logsumexp(-1).exp().numpy()
            bar.update(part.stop - part.start)
        dist_parts.append(
            pd.DataFrame(
                {
                    "prompt_id": np.repeat(frame["prompt_id"].to_numpy()[rows], len(cands.texts)),
                    "context": context,
                    "candidate": np.tile(list(cands.texts), len(rows)),
                    "candidate_value": np.tile(cands.values, len(rows)),
                    "probability": (mass / mass.sum(-1, keepdims=True)).reshape(-1),
                    "mass": mass.reshape(-1),
                }
            )
        )
    bar.close()
    keep = [c for c in frame.columns if c not in ("user_text", "prompt_text")]
    table = frame[keep].assign(**columns)
    table["tail_mass"] = 1 - table["grid_mass"] - table["other_mass"]
    settings = {
        "model": str(getattr(model, "model_id", type(model).__name__)),
        "chat": prompts.chat,
        "batch_size": batch_size,
        "n_prompts": len(frame),
        "summary": summaries,
        "summaries": {"log10": "expected log10(1 + answer)", "mean": "expected answer (P(yes) for yes/no)"},
        "renormalized": "summaries are over the covered answers (grid_mass), renormalized",
        "trie_nodes": nodes,
        "expansion": asdict(expansion),
    }
    return Measurement(table, pd.concat(dist_parts, ignore_index=True), settings)


_READ_BUDGET = 4096  # logit rows (prompts x read positions) per forward pass


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
    "Expansion",
    "GapTable",
    "SUMMARY",
    "Measurement",
    "answer_candidates",
    "check_answer_alignment",
    "context_metric",
    "group_gaps",
    "measure",
    "number_start",
    "pair_differences",
    "paired_gaps",
]
