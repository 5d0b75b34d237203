"""How well the deterministic metric agrees with sampled answers, per context.

The metric (``circuits.measure.bias.measure``) gives each prompt a distribution over answer values (its
``distribution`` table: ``candidate_value`` and absolute ``mass`` per covered answer; the rest,
``1 - grid_mass``, is the uncovered remainder). At temperature 1, ``n_samples`` sampled replies per
prompt (``circuits.measure.sampling``) are draws from the model, so the two must agree up to sampling
error. Each reply is read two ways:

- ``metric_value``, the metric's own reading (``metric_reading``): the covered answer the reply's
  tokens start with, where the answer's stop term holds (the next token does not continue the
  number; for yes/no, the reply starts with one of the covered forms); NaN when the reply starts
  with no covered answer. This is exactly the event whose probability the metric computes, so
  comparing it with the metric tests the metric's arithmetic (and the sampler) and nothing else.
- ``value``, the papers' reading (``read_reply``): the whole reply parsed by
  ``circuits.measure.parsing`` after the answer prefix's last word (chess's ``"0."`` + ``"35"`` is 0.35;
  the first number anywhere in the reply, decimals included; the first yes/no word anywhere).
  ``reading`` says how the two compare (``READINGS``): where they differ, the metric's value is
  not what the reply says (e.g. ``"150.50"`` read as 150 when dollar cents are not read, or
  ``"Pick No."``, which the metric does not cover but the parser reads as No).

``value_tv`` compares a reading with the metric per context, pooled over its prompts (a mixture):

- Bins: every value whose pooled metric mass is at least ``min_share`` (1%) is a bin of its own;
  the other covered values form one ``rare`` bin; ``other`` holds the uncovered rest. A sampled
  reply falls in its value's bin when that value is one of its own prompt's covered answers (or lies
  in the range of one of its bounded answers: ``placed_values``), and in ``other`` otherwise
  (unread replies, refusals, numbers the metric does not cover): the same event the metric's
  ``1 - grid_mass`` measures, so no reply is dropped. Pooling compares the
  context's overall answer distribution; the per-prompt correlation below checks prompt by prompt.
- ``tv``: the total-variation distance between the pooled sampled and metric bin distributions,
  replies read by ``metric_value``; ``tv_parsed``: the same with replies read by ``value``.
- Noise reference: the same TV between the metric and ``n_noise`` simulated multinomial draws from
  it, with each prompt's own sample count (seeded). ``tv_noise_p95`` is its 95th percentile and
  ``tv_within_noise`` is ``tv <= tv_noise_p95``: a parametric-bootstrap goodness-of-fit test of
  "the replies are draws from the metric's distribution" at the 5% level (``tv_p_value``: the
  share of simulated TVs at least as large as the observed one). Likewise ``tv_parsed_*``.

Beside it, per context: both White-minus-Black gaps with name x variation cluster-bootstrap
intervals, the sampled SMD and Mann-Whitney p-value (the papers' test), the invalid-answer share,
the share of replies per ``reading``, and Spearman and Pearson correlations between each prompt's
deterministic value and the same summary of its valid samples (the mean; the mean of
log10(1 + amount) where the context's summary is a log one; the median for a median summary).
Sampled gaps and correlations use the papers' reading (``value``) on that same scale.
``compare`` is the statistics alone, a pure function of the tables.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from circuits.inputs.prompts import PromptSet, build_prompts, select_prompts
from circuits.measure.audit import run_settings
from circuits.measure.bias import CONTRASTS, context_metric, group_gaps, measure
from circuits.measure.sampling import AnswerType, format_ids, parse_answer, parse_ids, sample_answers
from circuits.measure.stats import correlation, mann_whitney
from circuits.study.config import StudyConfig
from interp.hooks import HookedModel
from interp.results import SavedResult

META = ("prompt_id", "context", "variation", "detail", "name", "group", "gender", "answer_type", "sign")
GAP_COLUMNS = ("gap", "ci_low", "ci_high", "smd", "p_mann_whitney")
OWN_BIN_SHARE = 0.01
# How the papers' reading of a reply (``value``) compares with the metric's (``metric_value``).
READINGS = {
    "same": "the metric covers the reply and the parser reads the same value",
    "value_differs": "the metric covers the reply, the parser reads another value (decimals, a range, ...)",
    "parsed_only": "the metric does not cover the reply, the parser reads a value in it",
    "metric_only": "the metric covers the reply, the parser reads no value",
    "neither": "neither reads a value (a refusal, a question, text)",
}


@dataclass(frozen=True, eq=False)
class Agreement(SavedResult):
    """Per-context agreement (``table``, saved as ``agreement``), per-prompt values (``prompts``), every
    sample (``samples``), the pooled bin distributions behind the TV distances (``bins``, with ``reading``
    saying which) and the metric's per-prompt distribution over its covered answers (``distribution``)."""

    RESULT = "Agreement"

    table: pd.DataFrame
    prompts: pd.DataFrame
    samples: pd.DataFrame
    bins: pd.DataFrame
    settings: dict = field(default_factory=dict)
    distribution: pd.DataFrame = field(default_factory=pd.DataFrame)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per context: TV distance and its noise reference, both gaps with intervals,
        correlations, invalid share, sign agreement."""
        return self.table.copy()

    def readings(self, n_examples: int = 5) -> pd.DataFrame:
        """Per context and ``reading`` (see ``READINGS``): the count and share of replies and the
        ``n_examples`` most frequent reply texts with their count (``"text" x count``)."""
        return readings(self.samples, n_examples=n_examples)

    def _tables(self) -> dict[str, pd.DataFrame]:
        return {"agreement": self.table, "prompts": self.prompts, "samples": self.samples, "bins": self.bins,
                "distribution": self.distribution}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> Agreement:
        return cls(tables["agreement"], tables["prompts"], tables["samples"], tables["bins"], settings,
                   tables["distribution"])


def read_reply(prefix: str, text: str, answer_type: AnswerType) -> float:
    """The value of a reply read after the last word of the answer prefix (``"$"``, ``"0."``, ``"#"``);
    NaN unless the reply itself states an answer."""
    if np.isnan(parse_answer(text, answer_type)):
        return float("nan")
    return parse_answer(re.split(r"\s", prefix)[-1] + text, answer_type)


def metric_reading(candidates, replies: Sequence[Sequence[int]], stop_ids: set[int] = frozenset()) -> np.ndarray:
    """Which covered answer each reply is, as the metric reads it: the index of the candidate whose
    tokens start the reply and whose stop term holds (the next token is none of the candidate's
    ``ends``, the tokens that would continue its number; a candidate without ``ends`` needs no stop
    term), or -1 when the reply starts with none. ``replies``: each reply's generated tokens,
    including the token that stopped it (``circuits.measure.sampling``); a reply that ends right after a
    candidate that needs a stop term, without a token in ``stop_ids``, was cut short and is not read
    (-1). ``candidates``: a ``CandidateAnswers`` (``token_ids``, optional ``ends``)."""
    paths = {tuple(ids): i for i, ids in enumerate(candidates.token_ids)}
    ends = candidates.ends if candidates.ends is not None else (None,) * len(paths)
    ends = [None if e is None else set(e) for e in ends]
    longest = max((len(p) for p in paths), default=0)
    out = np.full(len(replies), -1, dtype=int)
    for r, reply in enumerate(replies):
        reply = tuple(reply)
        for k in range(1, min(longest, len(reply)) + 1):
            i = paths.get(reply[:k])
            if i is None:
                continue
            if ends[i] is None:
                out[r] = i
                break
            if k == len(reply):
                break  # cut short: whether the number ends here is unknown
            if reply[k] not in ends[i]:
                out[r] = i
                break
    return out


def reading_of(metric_value, value) -> np.ndarray:
    """Each reply's ``READINGS`` category from its two readings (NaN = not read)."""
    metric_value, value = np.asarray(metric_value, dtype=float), np.asarray(value, dtype=float)
    covered, parsed = ~np.isnan(metric_value), ~np.isnan(value)
    same = covered & parsed & np.isclose(metric_value, value, rtol=1e-9, atol=1e-9)
    return np.select(
        [same, covered & parsed, ~covered & parsed, covered & ~parsed],
        ["same", "value_differs", "parsed_only", "metric_only"], "neither").astype(object)


def readings(samples: pd.DataFrame, *, n_examples: int = 5) -> pd.DataFrame:
    """Per context and ``reading``: ``n`` replies, their ``share`` of the context's replies and the
    ``n_examples`` most frequent texts (``examples``: ``'text' x count``, joined by ``; ``).
    ``samples`` needs ``prompt_id`` (``context|...``) or ``context``, ``text`` and ``reading``."""
    frame = samples.assign(context=samples["context"] if "context" in samples
                           else samples["prompt_id"].str.split("|").str[0])
    rows = []
    for (context, reading), cell in frame.groupby(["context", "reading"], sort=False):
        counts = cell["text"].value_counts().head(n_examples)
        rows.append({"context": context, "reading": reading, "n": len(cell),
                     "share": len(cell) / int((frame["context"] == context).sum()),
                     "examples": "; ".join(f"{t!r} x{c}" for t, c in counts.items())})
    return pd.DataFrame(rows, columns=["context", "reading", "n", "share", "examples"])


def _key(values) -> np.ndarray:
    """Values as comparable keys (a parsed reply and the metric's value of the same answer agree)."""
    return np.round(np.asarray(values, dtype=float), 6)


def placed_values(distribution: pd.DataFrame, samples: pd.DataFrame) -> np.ndarray:
    """Each sample's ``value`` as the metric files it: the value of its prompt's bounded answer whose
    range (``value_low`` to ``value_high``, see ``circuits.measure.bias.measure``) holds it (``52,537``
    under ``"52,5"`` is 52,550; where ranges overlap, the answer of most mass), else unchanged. The
    metric's own values are placed alike (``value_tv``), so a complete ``"100000"`` and a bounded
    ``"100,0"`` share a bin, as a parsed reply cannot tell them apart."""
    values = np.asarray(samples["value"], dtype=float).copy()
    if "value_low" not in distribution:
        return values
    ranged = distribution[distribution["value_high"] > distribution["value_low"]].sort_values("mass", ascending=False,
                                                                                            kind="stable")
    ranges = {p: (g["value_low"].to_numpy(), g["value_high"].to_numpy(), g["candidate_value"].to_numpy())
              for p, g in ranged.groupby("prompt_id", sort=False)}
    for i, (prompt, value) in enumerate(zip(samples["prompt_id"], values)):
        if prompt in ranges and not np.isnan(value):
            low, high, mid = ranges[prompt]
            hit = np.flatnonzero((low <= value) & (value < high))
            if len(hit):
                values[i] = mid[hit[0]]
    return values


def placed_readings(distribution: pd.DataFrame, samples: pd.DataFrame) -> np.ndarray:
    """``reading_of`` the two readings of each sample (``metric_value``, ``value``), both placed in the
    metric's bounded answers (``placed_values``)."""
    return reading_of(placed_values(distribution, samples.assign(value=samples["metric_value"])),
                      placed_values(distribution, samples))


def value_tv(
    distribution: pd.DataFrame, samples: pd.DataFrame, *, min_share: float = OWN_BIN_SHARE,
    n_noise: int = 2000, seed: int = 0,
) -> tuple[dict, pd.DataFrame]:
    """The TV distance between one context's pooled metric distribution and its sampled replies, with
    the sampling-noise reference (see the module docstring).

    ``distribution``: ``prompt_id, candidate_value, mass`` (absolute probability) per covered answer,
    optionally ``value_low, value_high`` (the ranges of bounded answers: ``placed_values``);
    ``samples``: ``prompt_id, value`` (the parsed reply; NaN = unparsed) per reply. Returns the
    statistics and the pooled bin table (``bin, metric, sampled``).
    """
    ids = list(dict.fromkeys(samples["prompt_id"]))
    dist = distribution[distribution["prompt_id"].isin(ids)]
    dist = dist.assign(key=_key(placed_values(dist, dist.rename(columns={"candidate_value": "value"}))))
    if set(ids) - set(dist["prompt_id"]):
        raise ValueError(f"{len(set(ids) - set(dist['prompt_id']))} sampled prompts have no metric distribution")
    pooled = dist.groupby("key")["mass"].sum() / len(ids)
    own = pooled.index[pooled >= min_share].sort_values()
    labels = [f"{v:g}" for v in own] + ["rare", "other"]
    column = dict(zip(own, range(len(own))))
    row_of = {p: i for i, p in enumerate(ids)}
    metric = np.zeros((len(ids), len(labels)))
    np.add.at(metric, (dist["prompt_id"].map(row_of).to_numpy(), dist["key"].map(column).fillna(len(own)).astype(int)),
              dist["mass"].to_numpy())
    metric[:, -1] = np.clip(1 - metric[:, :-1].sum(1), 0, None)
    metric /= metric.sum(1, keepdims=True)
    covered = set(zip(dist["prompt_id"], dist["key"]))
    keys = _key(placed_values(dist, samples))
    bin_of = [column.get(k, len(own)) if (p, k) in covered else len(labels) - 1
              for p, k in zip(samples["prompt_id"], keys)]
    counts = np.zeros_like(metric)
    np.add.at(counts, (samples["prompt_id"].map(row_of).to_numpy(), np.array(bin_of, dtype=int)), 1)
    n = counts.sum(1)
    expected = (metric * n[:, None]).sum(0) / n.sum()
    observed = counts.sum(0) / n.sum()
    tv = 0.5 * float(np.abs(observed - expected).sum())
    draws = np.random.default_rng(seed).multinomial(n.astype(int), metric, size=(n_noise, len(ids)))
    noise = 0.5 * np.abs(draws.sum(1) / n.sum() - expected).sum(-1)
    p95 = float(np.quantile(noise, 0.95))
    stats = {
        "tv": tv, "tv_noise_p95": p95, "tv_within_noise": bool(tv <= p95),
        "tv_p_value": float((1 + (noise >= tv).sum()) / (1 + n_noise)), "n_bins": len(labels),
        "metric_uncovered": float(expected[-1]), "sampled_uncovered": float(observed[-1]),
    }
    return stats, pd.DataFrame({"bin": labels, "metric": expected, "sampled": observed})


def sample_scale(summary: str):
    """The per-sample transform and per-prompt aggregate that match a metric summary's name: the mean
    of log10(1 + amount) for a log summary, the median for a median one, else the mean."""
    transform = (lambda v: np.log10(1 + np.clip(v, 0, None))) if "log" in summary else (lambda v: v)
    return transform, ("median" if "median" in summary else "mean")


def _summaries(prompts: pd.DataFrame) -> pd.Series:
    """Each prompt's summary name (``prompts["summary"]``; ``"mean"`` where absent), by prompt_id."""
    names = prompts["summary"] if "summary" in prompts else pd.Series("mean", index=prompts.index)
    return pd.Series(names.fillna("mean").to_numpy(), index=prompts["prompt_id"].to_numpy())


def scaled_samples(prompts: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """``samples`` with ``scaled``: each value on its prompt's summary scale (``sample_scale``)."""
    names = samples["prompt_id"].map(_summaries(prompts)).fillna("mean")
    scaled = np.full(len(samples), np.nan)
    for name in names.unique():
        rows = (names == name).to_numpy()
        scaled[rows] = sample_scale(name)[0](samples.loc[rows, "value"].to_numpy(dtype=float))
    return samples.assign(scaled=scaled)


def per_prompt(prompts: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """``prompts`` (with ``expected``) joined with ``sampled_mean``, the prompt's summary of its valid
    ``scaled`` samples (see ``scaled_samples``), and its counts ``n_valid``, ``n_samples``."""
    counts = samples.groupby("prompt_id")["scaled"].agg(["mean", "median", "count", "size"])
    median = counts.index.map(_summaries(prompts)).map(lambda s: sample_scale(s)[1] == "median")
    sampled = counts["median"].where(np.asarray(median, dtype=bool), counts["mean"])
    counts = pd.DataFrame({"sampled_mean": sampled, "n_valid": counts["count"], "n_samples": counts["size"]})
    return prompts.join(counts, on="prompt_id")


def _race_gaps(frame: pd.DataFrame, prefix: str, **kw) -> pd.DataFrame:
    gaps = group_gaps(frame, contrasts=("race",), **kw).table
    columns = [prefix + c for c in GAP_COLUMNS]
    if gaps.empty:
        return pd.DataFrame(columns=columns, index=pd.Index([], name="context"), dtype=float)
    return gaps.set_index("context")[list(GAP_COLUMNS)].set_axis(columns, axis=1)


def compare(
    prompts: pd.DataFrame, samples: pd.DataFrame, distribution: pd.DataFrame, *, n_resamples: int = 1000,
    confidence: float = 0.95, n_noise: int = 2000, min_share: float = OWN_BIN_SHARE, seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per context, the TV agreement of the value distributions and both gaps (White minus Black).

    ``prompts``: one row per prompt with the ``META`` columns, ``expected`` (the deterministic
    value), ``grid_mass`` and optionally ``summary`` (the name of the metric's summary; default
    mean). ``samples``: one row per sample with ``prompt_id``, ``value`` (the papers' reading; NaN =
    invalid reply) and optionally ``metric_value`` (the metric's reading, see ``metric_reading``;
    NaN = not covered): ``tv`` reads replies by ``metric_value`` where given (else by ``value``),
    ``tv_parsed`` by ``value``, and the ``READINGS`` shares compare the two.
    ``distribution``: the metric's ``prompt_id, candidate_value, mass`` (see ``value_tv``). The
    sampled gap, its interval, SMD, ``sampled_auc`` (Mann-Whitney U / (n_White n_Black): the chance
    a White-name sample exceeds a Black-name one) and ``median_sampled`` use every valid sample on
    the summary's scale; correlations and means pair each prompt's ``expected`` with the same
    summary of its valid samples (prompts without one are left out). Returns the per-context table
    and the pooled bins of every context.
    """
    samples = scaled_samples(prompts, samples)
    table = per_prompt(prompts, samples)
    kw = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    read = [c for c in ("prompt_id", "value", "metric_value", "scaled") if c in samples]
    every = samples[read].merge(prompts[list(META)], on="prompt_id")
    valid = every.dropna(subset=["scaled"]).drop(columns=[c for c in ("value", "metric_value") if c in every])
    valid = valid.rename(columns={"scaled": "value"})
    gaps = _race_gaps(table.rename(columns={"expected": "value"}), "det_", **kw).join(
        _race_gaps(valid, "sampled_", **kw), how="outer")
    column, a, b = CONTRASTS["race"]
    rows, bins = [], []
    for context, cell in table.groupby("context", sort=False):
        pairs = cell.dropna(subset=["sampled_mean"])
        drawn = every[every["context"] == context]
        side_a, side_b = (drawn.loc[drawn[column] == g, "scaled"].dropna() for g in (a, b))
        u, _ = mann_whitney(side_a, side_b)
        rho, p_rho = correlation(pairs["expected"], pairs["sampled_mean"], "spearman")
        r, p_r = correlation(pairs["expected"], pairs["sampled_mean"], "pearson")
        read = "metric_value" if "metric_value" in drawn else "value"
        tv, binned = value_tv(distribution, drawn[["prompt_id", read]].rename(columns={read: "value"}),
                              min_share=min_share, n_noise=n_noise, seed=seed)
        tv_parsed, binned_parsed = value_tv(distribution, drawn[["prompt_id", "value"]], min_share=min_share,
                                            n_noise=n_noise, seed=seed)
        bins.append(binned.assign(context=context, reading="metric" if read == "metric_value" else "parsed"))
        bins.append(binned_parsed.assign(context=context, reading="parsed"))
        shares = {}
        if read == "metric_value":
            kinds = pd.Series(placed_readings(distribution, drawn))
            shares = {f"{k}_share": float((kinds == k).mean()) for k in READINGS}
        rows.append({
            "context": context,
            "answer_type": cell["answer_type"].iloc[0],
            "summary": cell["summary"].iloc[0] if "summary" in cell else "mean",
            "n_prompts": len(cell),
            "samples_per_prompt": int(cell["n_samples"].max()),
            **tv,
            **{k.replace("tv", "tv_parsed", 1): v for k, v in tv_parsed.items() if k.startswith("tv")},
            "sampled_uncovered_parsed": tv_parsed["sampled_uncovered"],
            **shares,
            "mean_grid_mass": float(cell["grid_mass"].mean()),
            "invalid_share": float(1 - cell["n_valid"].sum() / cell["n_samples"].sum()),
            "spearman_rho": rho,
            "spearman_p": p_rho,
            "pearson_r": r,
            "pearson_p": p_r,
            "n_correlated": len(pairs),
            "mean_expected": float(pairs["expected"].mean()),
            "mean_sampled": float(pairs["sampled_mean"].mean()),
            "median_sampled": float(drawn["scaled"].median()),
            "mean_abs_difference": float((pairs["expected"] - pairs["sampled_mean"]).abs().mean()),
            "sampled_auc": u / max(len(side_a) * len(side_b), 1),
        })
    out = pd.DataFrame(rows).join(gaps, on="context")
    det, sampled = np.sign(out["det_gap"]), np.sign(out["sampled_gap"])
    out["sign_agrees"] = (det == sampled).astype("boolean").mask(det.isna() | sampled.isna())
    bins = pd.concat(bins, ignore_index=True).drop_duplicates(["context", "reading", "bin"])
    return out, bins[["context", "reading", "bin", "metric", "sampled"]].reset_index(drop=True)


def _prompt_candidates(model, candidates, texts: Sequence[str]) -> list:
    """Each prompt's ``CandidateAnswers``: the shared set, or a ``PromptCandidates``' own answers of
    the prompt (what ``measure`` scores)."""
    if not hasattr(candidates, "own"):
        return [candidates] * len(texts)
    from interp.batching import encode

    keys = [tuple(encode(model, t)) for t in texts]
    candidates.derive_own(keys)
    return [candidates.own[k] for k in keys]


def _check_candidates(candidates, scored: list[str], prompt_id: str) -> None:
    """The candidates used to read replies must be the ones the measurement scored."""
    if scored != list(candidates.texts):
        raise RuntimeError(f"the metric's answers for {prompt_id!r} differ from those measured "
                           f"({len(scored)} vs {len(candidates.texts)}); cannot read replies as the metric does")


def run_agreement(
    model: HookedModel,
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
    n_noise: int = 2000,
    seed: int = 0,
    progress: bool = False,
    out_dir: str | Path | None = None,
) -> Agreement:
    """Measure and sample the same prompts, then ``compare`` them per context.

    Prompts default to a ``select_prompts`` choice of ``contexts`` (default: the study's three); or
    pass a ready ``prompts`` set; either capped at ``max_prompts`` per context. Each context is sampled on its
    own, seeded per (prompt index in the
    context, sample batch), so its rows do not depend on the other contexts chosen. ``batch_size``
    counts rows per forward pass; ``n_noise`` simulated draws make the TV noise reference.
    """
    if prompts is not None and contexts is not None:
        raise ValueError("give contexts or prompts, not both: prompts already fix their contexts")
    if isinstance(model, (str, Path)):
        from interp import load_model

        model = load_model(model)
    if prompts is None:
        built = build_prompts(model, list(contexts or StudyConfig.contexts), details=list(details), seed=seed)
        prompts = select_prompts(built, variations=variations, names_per_cell=names_per_cell, seed=seed)
    prompts = select_prompts(prompts, per_context=max_prompts, seed=seed)
    measurement = measure(model, prompts, batch_size=batch_size, progress=progress)
    measured, distribution = measurement.values, measurement.distribution
    tokenizer = model.tokenizer
    stop_ids = (set(tokenizer.all_special_ids) | {tokenizer.eos_token_id}) - {None}
    scored = {p: list(c) for p, c in distribution.groupby("prompt_id", sort=False)["candidate"]}
    if "mass" not in distribution:  # a grid metric's distribution is renormalized over its grid
        grid_mass = measured.set_index("prompt_id")["grid_mass"]
        distribution = distribution.assign(mass=distribution["probability"] * distribution["prompt_id"].map(grid_mass))
    parts = []
    for context in prompts.contexts:
        rows = prompts.filter(context=context)
        answer = prompts.answers[context]
        kind = "yes_no" if answer.type == "yes_no" else "number"
        drawn = sample_answers(model, rows.texts, n_samples=n_samples, temperature=temperature,
                               max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                               answer_type=kind, progress=progress).to_dataframe()
        sets = _prompt_candidates(model, context_metric(model, context, prompts=prompts).candidates, rows.texts)
        ids = [parse_ids(t) for t in drawn["token_ids"]]
        metric_value = np.full(len(ids), np.nan)
        for p, (prompt_id, cands) in enumerate(zip(rows.frame["prompt_id"], sets)):
            _check_candidates(cands, scored.get(prompt_id, []), prompt_id)
            at = np.flatnonzero(drawn["prompt_id"].to_numpy() == p)
            index = metric_reading(cands, [ids[i] for i in at], stop_ids)
            metric_value[at] = np.where(index >= 0, np.asarray(cands.values, dtype=float)[index], np.nan)
        parts.append(pd.DataFrame({
            "prompt_id": rows.frame["prompt_id"].to_numpy()[drawn["prompt_id"]],
            "sample": drawn["sample"],
            "text": drawn["text"],
            "token_ids": [format_ids(i) for i in ids],
            "value": [answer.on_scale(read_reply(answer.prefix, text, kind)) for text in drawn["text"]],
            "metric_value": metric_value,
        }))
    samples = pd.concat(parts, ignore_index=True)
    samples["reading"] = placed_readings(distribution, samples)
    summary = measurement.settings.get("summary", {})
    per = measured[[*META, "value", "grid_mass"]].rename(columns={"value": "expected"})
    per["summary"] = per["context"].map(summary if isinstance(summary, dict) else {}).fillna("mean")
    ranges = [c for c in ("value_low", "value_high") if c in distribution]
    table, bins = compare(per, samples, distribution[["prompt_id", "candidate_value", "mass", *ranges]],
                          n_resamples=n_resamples, confidence=confidence, n_noise=n_noise, seed=seed)
    settings = run_settings(model, prompts, variations=variations, names_per_cell=names_per_cell,
                            max_prompts=max_prompts, n_samples=n_samples, temperature=temperature,
                            max_new_tokens=max_new_tokens, n_resamples=n_resamples, confidence=confidence,
                            n_noise=n_noise, seed=seed)
    kept = distribution[distribution["prompt_id"].isin(set(per["prompt_id"]))]
    result = Agreement(table, per_prompt(per, scaled_samples(per, samples)), samples, bins, settings,
                       kept.reset_index(drop=True))
    if out_dir is not None:
        result.save(out_dir)
    return result


__all__ = [
    "READINGS", "Agreement", "compare", "metric_reading", "per_prompt", "placed_readings", "placed_values",
    "read_reply", "reading_of", "readings", "run_agreement", "sample_scale", "scaled_samples", "value_tv",
]
