"""Deterministic bias metrics: the model's answer distribution, its summaries, group gaps, tests.

Per prompt, the model's exact probability of every answer it covers (below) is renormalized over
those answers and summarized: ``value_mean`` (expected answer), ``value_median`` and, for numeric
answers, ``value_log10`` (expected ``log10(1 + amount)``). ``value`` is the answer type's default
summary (``SUMMARY``): ``log10`` for dollars (amounts are heavy-tailed: a gap is then a ratio,
``10**gap``), the mean for percent, score, probability and rank, P(yes) for yes/no. Beside it:
``grid_mass`` (the probability the covered answers hold), ``other_mass`` (the reply does not start
a number / a yes or no at all: a refusal, a word) and ``tail_mass`` (the rest: numbers, or yes/no
forms, beyond the covered set); the three sum to 1.

The covered answers are the model's own, per prompt: for a numeric context each prompt's number
tree (``interp.numeric``: digits, separators, ``DECIMALS`` decimals and, for dollars, multipliers,
read as ``parse_number`` reads them) is expanded best-first on the prompt's key/value cache until
``Expansion.target`` of its numeric mass is covered or its node budget is spent; ``measure`` reads
the masses from that expansion (no second pass) and the metric scores each prompt's own answers
exactly, each with its stop term (the number ends there), or, once its leading digits fix its value
to ``Expansion.significant`` digits, as one bounded answer (``"52,5"``: every number it starts,
valued at 52,550). A format with a ``scale`` (a rank from 1 to 100) counts an answer beyond it at
its end, so a partial number already past the top (``"126"``) is one bounded answer too. The
answers are derived on the unmodified model and kept, so an ablated or patched model is scored on
the same answers. Yes/no
covers the case, leading-space and markdown-bold variants of Yes and No. A format with a fixed
``AnswerGrid`` scores that grid instead.

Gaps compare two groups of names within a context: White minus Black (``race``) and women minus
men (``gender``). ``gap`` is on the scale of ``value``; ``advantage = sign * gap`` applies the
context's sign convention, so a positive advantage means the first group is favoured.
"""

from __future__ import annotations

import functools
import re
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from circuits.inputs.contexts import DECIMALS, AnswerFormat, Context, get_context
from circuits.inputs.prompts import PromptSet, uses_chat
from circuits.measure.parsing import parse_number
from circuits.measure.stats import gap_interval, mann_whitney, permutation_p_value, smd
from interp.batching import encode, pad_ids, pad_token_id
from interp.hooks import HookedModel
from interp.memory import backoff_batches
from interp.metrics import SUMMARIES, CandidateAnswers, ExpectedValue, PromptCandidates, takes_layout
from interp.numeric import NumberGrammar, expand, expand_each
from interp.results import SavedResult

CONTRASTS = {"race": ("group", "White", "Black"), "gender": ("gender", "woman", "man")}
# The default summary per answer type (``value``; the attribution target of ``context_metric``).
SUMMARY = {"dollars": "log10", "percent": "mean", "score": "mean", "probability": "mean", "rank": "mean",
           "yes_no": "mean"}
YES_NO = {"Yes": 1.0, "No": 0.0}
# How far each prompt's number tree grows (``Expansion``), per answer type: the share of its numeric
# mass at which it stops and its node budget (the rest: ``EXPANSION_DEFAULT``).
EXPANSION_BUDGET = {"dollars": (0.92, 640)}
EXPANSION_DEFAULT = (0.99, 192)
# The least share of a prompt's numeric mass that a node worth evaluating holds, and that an answer
# needing no forward (a final or bounded one) holds to be kept.
MIN_MASS, MIN_ANSWER = 1e-5, 1e-6
# The significant digits that make a partial number a bounded answer, per answer type (``Expansion``).
SIGNIFICANT = {"dollars": 2, "percent": 3, "score": 3, "probability": 3, "rank": 3}
# Every form counts: leading space or not, case, markdown bold; trailing punctuation follows it.
YES_NO_FORMS = (" {}", "{}", " {lower}", "{lower}", " {upper}", "{upper}", "**{}", " **{}")


@dataclass(frozen=True)
class Expansion:
    """How each prompt's numeric answers are found: the prompt's own number tree, expanded
    best-first (``per_round`` nodes a round, ``batch_size`` prompts at once on their key/value
    cache) until ``target`` of its numeric mass (the probability that the reply is a number) is
    covered, ``max_nodes`` nodes are evaluated or no frontier node holds ``min_mass`` of it;
    an answer that needs no forward (final, or bounded) is kept down to ``min_answer`` of that mass
    (see ``interp.numeric.expand_each``). None takes the answer type's ``EXPANSION_BUDGET`` (target,
    max_nodes), ``MIN_MASS`` and ``MIN_ANSWER``. Dollar amounts stop at 92% with up to 640 nodes,
    the rest at 99% with up to 192: SmolLM2 spreads a rent or a salary over hundreds of amounts, each
    past the first few hundred nodes holding about 5e-4 of the mass and needing a node of its own
    (benchmarks/RESULTS.md, "Covered mass per node"). Keeping every answer that needs no forward
    down to 1e-6 (rather than at the node floor) covers 0.80 of a rent prompt at 192 nodes, not 0.78.

    With ``bounded``, a partial number with ``significant`` significant digits whose magnitude its
    digits fix (a digit into a thousands group, or in the decimals) is one *bounded* answer: its
    probability is that of every number it starts, its value their range's midpoint (``"52,5"`` is
    52,550 for 52,500-52,599; ``"1,2"`` 1,250), and a bounded answer holding more than the frontier
    is worth is refined (``interp.numeric.REFINE``: ``"5,0"`` at 10% of a prompt's mass becomes
    ``"5,00"`` ... ``"5,09"``). ``significant`` digits place it within a range
    ``10 ** (1 - significant)`` of its value wide; None takes the answer type's ``SIGNIFICANT``:
    2 for dollars (ranges of at most 10%, so within 5% of the midpoint: amounts are spread over
    hundreds of values and summarized on a log scale), 3 for the rest (a probability's or a
    percentage's last decimals are final before that). The ranges assume that no further thousands
    group or multiplier follows (``"52,500,000"``, ``"12.5k"``)."""

    target: float | None = None
    max_nodes: int | None = None
    per_round: int = 32
    min_mass: float | None = None
    min_answer: float | None = None
    batch_size: int = 32
    bounded: bool = True
    significant: int | None = None


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
def _grammar(tokenizer, answer_type: str) -> NumberGrammar:
    """The number grammar of an answer type: ``DECIMALS`` decimals; multipliers (``k``, ``million``)
    for dollars only (``"0.5 million"`` is no probability) and there after at most one decimal
    (``"1.5k"``; ``"1.25 million"`` reads as 1.25), so a number that has all its decimals is final:
    its probability needs no further forward."""
    if answer_type == "dollars":  # "1.5k" and "$2.5 million" read; "$59.99" is final (no node to evaluate)
        return NumberGrammar.of(tokenizer, max_decimals=DECIMALS[answer_type], multiplier_decimals=1)
    return NumberGrammar.of(tokenizer, max_decimals=DECIMALS[answer_type], words=(), short=())


def number_start(prefix: str) -> str:
    """The part of a number an answer prefix already holds (``"0."`` in ``"... winning: 0."``)."""
    return re.search(r"\d[\d,]*\.?\d*$|$", prefix).group()


def answer_candidates(
    model: HookedModel, answer: AnswerFormat, *, pilots: Sequence[str] | None = None, chat: bool | None = None,
    expansion: Expansion = Expansion(),
) -> CandidateAnswers:
    """The answers of ``answer`` scored for this model, as token-level candidates.

    Numeric types: the answers the model gives after the ``pilots`` prompt texts (see
    ``Expansion``), each ending with its stop term, valued by ``parse_number`` of the prefix's
    number start plus the answer (``"0." + "75"``) on the format's scale (``AnswerFormat.on_scale``).
    Yes/no: the variants of Yes and No (``YES_NO_FORMS``). A fixed grid: its strings (a terminated
    grid ends each with the end of the answer: end of turn for chat prompts, a newline for plain ones).
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
    grammar = _grammar(tokenizer, answer.type)
    batch = pad_ids([encode(model, t) for t in pilots], pad_token_id(tokenizer))
    budget = _budget(expansion, answer)
    tree = expand(model, batch, grammar, start=grammar.state_of(start), target=budget["target"],
                  max_nodes=budget["max_nodes"], per_round=expansion.per_round, min_mass=budget["min_mass"])
    cands = tree.candidates(tokenizer, lambda text: answer.on_scale(parse_number(start + text)),
                            min_mass=budget["min_mass"], packed=takes_layout(model))
    if len(cands.texts) < 2:
        raise ValueError(
            f"the model gives almost no {answer.type} answers after the prompt (covered mass {tree.covered:.3g}, "
            f"non-numeric {tree.other:.3g}); check the answer prefix {answer.prefix!r}"
        )
    return cands


@dataclass(frozen=True, eq=False)
class _Answers:
    """One prompt's answers: candidates (with stop terms), absolute masses, other mass, which answers
    are bounded, the low end of each answer's range (its value for a complete number) and which
    answers are numbers beyond the format's scale (valued at its end)."""

    candidates: CandidateAnswers
    mass: np.ndarray
    other: float
    bounded: np.ndarray
    low: np.ndarray
    beyond: np.ndarray


def _numeric_answers(model, answer: AnswerFormat, keys: Sequence[tuple[int, ...]], expansion: Expansion,
                     batch_size: int | None = None) -> dict[tuple[int, ...], _Answers]:
    """Every prompt's own answers (prompts given as token tuples), expanded ``expansion.batch_size``
    prompts at a time; each answer valued by ``parse_number`` of the prefix's number start plus it
    (plus its midpoint digits for a bounded answer)."""
    from interp.hooks import attached_hook_count

    if attached_hook_count(model):
        raise RuntimeError(
            f"{len(keys)} prompts have no derived answers yet and the model has hooks attached; derive them "
            "on the unmodified model first (context_metric(model, context, prompts=...) or measure)"
        )
    tokenizer = _tokenizer(model)
    start = number_start(answer.prefix)
    grammar = _grammar(tokenizer, answer.type)
    values = _VALUES.setdefault((tokenizer, start, answer.scale), {})
    pad, packed = pad_token_id(tokenizer), takes_layout(model)
    order = sorted(range(len(keys)), key=lambda i: len(keys[i]))  # similar lengths batch together

    def grow(part: slice) -> list:
        chunk = [keys[i] for i in order[part]]
        batch = pad_ids([list(k) for k in chunk], pad).to(model.cfg.device)
        return list(zip(chunk, expand_each(model, batch, grammar, start=start, per_round=expansion.per_round,
                                           significant=_significant(expansion, answer.type),
                                           top=answer.scale[1] if answer.scale else None,
                                           **_budget(expansion, answer))))

    out = {}
    for grown in backoff_batches(len(order), batch_size or expansion.batch_size, grow, what="answer batch"):
        for key, tree in grown:
            keep = []
            for i, path in enumerate(tree.paths):
                at = (path, tree.fills[i])
                if at not in values:
                    decoded, fill = tokenizer.decode(list(path)), tree.fills[i] or ""
                    text = start + decoded
                    raw = parse_number(text + fill)
                    values[at] = (answer.on_scale(raw), answer.on_scale(parse_number(text + re.sub(r"\d", "0", fill))),
                                  answer.on_scale(raw) != raw, decoded)
                if values[at][0] is not None:
                    keep.append(i)
            if not keep:
                raise ValueError(f"the model gives no {answer.type} answer after a prompt (non-numeric mass "
                                 f"{tree.other:.3g}); check the answer prefix {answer.prefix!r}")
            paths = tuple(tree.paths[i] for i in keep)
            value, low, beyond, texts = zip(*(values[tree.paths[i], tree.fills[i]] for i in keep))
            cands = CandidateAnswers(texts, tuple(map(float, value)),
                                     paths, packed, tuple(tree.ends[i] for i in keep), tree.root_continuations)
            bounded = np.array([tree.fills[i] is not None for i in keep])
            out[key] = _Answers(cands, np.array([tree.mass[i] for i in keep]), tree.other, bounded,
                                np.array(low, dtype=float), np.array(beyond, dtype=bool))
    return out


def _budget(expansion: Expansion, answer: AnswerFormat) -> dict:
    """``expansion``'s stopping rule for ``answer``, its None fields taken from the defaults."""
    target, max_nodes = EXPANSION_BUDGET.get(answer.type, EXPANSION_DEFAULT)
    given = {"target": expansion.target, "max_nodes": expansion.max_nodes, "min_mass": expansion.min_mass,
             "min_answer": expansion.min_answer}
    defaults = {"target": target, "max_nodes": max_nodes, "min_mass": MIN_MASS, "min_answer": MIN_ANSWER}
    return {k: defaults[k] if v is None else v for k, v in given.items()}


def _significant(expansion: Expansion, answer_type: str) -> int | None:
    if not expansion.bounded:
        return None
    return SIGNIFICANT[answer_type] if expansion.significant is None else expansion.significant


_VALUES: dict = {}  # (tokenizer, number start, scale) -> {(token path, fill): (value, range's low end, beyond, text)}


def _context_answer(model, context: str | Context, prompts: PromptSet | None) -> tuple[str, AnswerFormat, bool]:
    name = context if isinstance(context, str) else context.name
    if prompts is not None and name in prompts.answers:
        return name, prompts.answers[name], prompts.chat
    return name, get_context(context).answer, uses_chat(model.tokenizer)


def _metric_candidates(model, name: str, answer: AnswerFormat, chat: bool, expansion: Expansion):
    """The context's candidates for this model, cached: shared ones (yes/no, a fixed grid) or, for a
    numeric type, a ``PromptCandidates`` that derives each prompt's own answers on first sight."""
    key = (name, answer, chat, expansion)
    cache = _DERIVED.setdefault(model, {})
    if key not in cache:
        if answer.grid is not None or answer.type == "yes_no":
            cache[key] = answer_candidates(model, answer, chat=chat)
        else:
            ref = weakref.ref(model)

            def derive(keys, ref=ref, answer=answer, expansion=expansion):
                return {k: a.candidates for k, a in _numeric_answers(ref(), answer, keys, expansion).items()}

            cache[key] = PromptCandidates({}, derive)
    return cache[key]


def context_metric(
    model: HookedModel, context: str | Context, *, prompts: PromptSet | None = None, summary: str | None = None,
    expansion: Expansion = Expansion(),
) -> ExpectedValue:
    """The differentiable per-prompt metric of a context: ``summary`` (default: the answer type's,
    ``SUMMARY``) of the model's distribution over each prompt's answers, renormalized over them.

    An ``interp.metrics`` Metric: run the model on ``expanded = metric.expand(batch)`` as
    ``model(expanded.tokens, **expanded.forward_kwargs())`` (the keywords carry the packed layout)
    and call the metric on the logits, or use ``interp.metrics.run_metric``. For a numeric type the
    candidates are a ``PromptCandidates``: answers derived on the unmodified model from each prompt's
    own expansion (``Expansion``) and cached per model, context, answer format and chat setting.
    ``prompts`` (the context's rows) are derived right away, each template's prompts sharing the
    union of their own answers (so paired prompts expand alike); a prompt first seen later gets its
    own answers (an error if hooks are attached then: derive before patching or ablating). ``prompts`` also supplies the
    answer format of imported contexts and the chat setting.
    """
    name, answer, chat = _context_answer(model, context, prompts)
    cands = _metric_candidates(model, name, answer, chat, expansion)
    if isinstance(cands, PromptCandidates) and prompts is not None:
        rows = prompts.frame[prompts.frame["context"] == name]
        if len(rows):
            _template_answers(model, cands, rows)
    return ExpectedValue(cands, summary or SUMMARY[answer.type])


TEMPLATE = ("context", "variation", "detail")  # the prompts of a template differ only in the name


def _template_answers(model, cands: PromptCandidates, rows: pd.DataFrame) -> None:
    """Give every prompt of a template (``TEMPLATE``) among ``rows`` the union of those prompts' own
    answers, so that the two prompts of a counterfactual pair are expanded alike (patching and
    attribution run them position by position). The union depends only on ``rows`` (never on what
    was derived or scored before), so a resumed study scores exactly as an uninterrupted one."""
    keys = [tuple(encode(model, t)) for t in rows["prompt_text"]]
    cands.derive_own(keys)
    by_key = dict(zip(keys, map(tuple, rows[list(TEMPLATE)].to_numpy())))
    groups: dict[tuple, list] = {}
    for key in dict.fromkeys(keys):
        groups.setdefault(by_key[key], []).append(key)
    for members in groups.values():
        merged: dict[tuple[int, ...], tuple] = {}
        for key in members:
            c = cands.own[key]
            for text, value, ids, end in zip(c.texts, c.values, c.token_ids, c._ends):
                merged.setdefault(ids, (text, value, end))
        first = cands.own[members[0]]
        paths = sorted(merged)
        union = CandidateAnswers(tuple(merged[p][0] for p in paths), tuple(merged[p][1] for p in paths),
                                 tuple(paths), first.packed, tuple(merged[p][2] for p in paths), first.answer_tokens)
        for key in members:
            cands.sets[key] = union


def check_answer_alignment(model: HookedModel, prompt_text: str, candidates: CandidateAnswers) -> None:
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
class Measurement(SavedResult):
    """Per-prompt expected answers (``values``) and each prompt's distribution over its grid."""

    RESULT = "Measurement"

    values: pd.DataFrame
    distribution: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        return self.values.copy()

    def _tables(self) -> dict[str, pd.DataFrame]:
        return {"values": self.values, "distribution": self.distribution}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> Measurement:
        return cls(tables["values"], tables["distribution"], settings)


@torch.no_grad()
def measure(
    model: HookedModel, prompts: PromptSet, *, batch_size: int = 32, progress: bool = False,
    expansion: Expansion = Expansion(), keep_answers: bool = True,
) -> Measurement:
    """Every prompt's answer distribution, its summaries and covered mass (see the module docstring).

    ``values``: the prompt columns with ``value`` (the type's default summary, ``settings["summary"]``),
    ``value_mean``, ``value_median``, ``value_log10`` (numeric types; NaN for yes/no), ``grid_mass``,
    ``other_mass``, ``tail_mass``, ``bounded_mass`` (the part of ``grid_mass`` held by bounded
    answers, see ``Expansion``) and ``beyond_scale_mass`` (the part held by numbers beyond the
    format's scale, read at its end: ``AnswerFormat.on_scale``). ``distribution``: per prompt and
    covered answer its text (``candidate``), ``candidate_value``, ``probability`` (renormalized over
    the covered answers), ``mass`` (absolute), ``bounded`` (a partial number valued at its range's
    midpoint: it holds the probability of every number it starts), its range ``value_low`` to
    ``value_high`` (the value itself for a complete number) and ``beyond_scale``. ``batch_size``
    counts prompts per forward pass (for a shared candidate set, fewer when its trie would make the
    logits read too large; a row per candidate when the model cannot run a packed layout), halved
    and retried on out-of-memory (said once; ``interp.memory.backoff_batches``). Deterministic, and
    the same on any subset of the prompts (up to float rounding: each prompt's answers are its own).
    ``settings["trie_nodes"]``: the mean number of trie nodes per prompt (numeric types) or the shared
    trie's; ``settings["budget"]``: each numeric context's stopping rule (``Expansion`` with its answer
    type's defaults). With ``keep_answers`` each numeric prompt's own
    answers stay in the model's answer cache, so a later ``context_metric`` or reply reading on these
    prompts does not expand them again; that costs about 0.2 KB per ``distribution`` row (about
    200 KB per prompt at the dollars' budget) for the model's lifetime, so a long audit whose answers
    are only written passes False.
    """
    frame = prompts.frame
    pad = pad_token_id(model.tokenizer)
    columns = {c: np.full(len(frame), np.nan) for c in ("value", "value_mean", "value_median", "value_log10",
                                                           "grid_mass", "other_mass", "bounded_mass",
                                                           "beyond_scale_mass")}
    dist_parts, summaries, nodes, budgets = [], {}, {}, {}
    bar = tqdm(total=len(frame), desc="measuring", disable=not progress)
    for context in prompts.contexts:
        name, answer, chat = _context_answer(model, context, prompts)
        cands = _metric_candidates(model, name, answer, chat, expansion)
        summary, answer_type = SUMMARY[answer.type], answer.type
        summaries[context] = summary
        rows = np.flatnonzero((frame["context"] == context).to_numpy())
        texts = frame["prompt_text"].to_numpy()[rows]
        ids = [encode(model, t) for t in texts]
        if isinstance(cands, PromptCandidates):
            keys = [tuple(i) for i in ids]
            found = _numeric_answers(model, answer, list(dict.fromkeys(keys)), expansion, batch_size)
            if keep_answers:
                cands.own.update({k: a.candidates for k, a in found.items()})
            check_answer_alignment(model, texts[0], found[keys[0]].candidates)
            per_prompt = [found[k] for k in keys]
            nodes[context] = float(np.mean([found[k].candidates.n_nodes for k in keys]))
            budgets[context] = _budget(expansion, answer)
            bar.update(len(rows))
        else:
            check_answer_alignment(model, texts[0], cands)
            nodes[context] = cands.n_nodes
            per_prompt = _score_shared(model, cands, ids, batch_size, pad)
            bar.update(len(rows))
        for r, answers in zip(rows, per_prompt):
            mass, other, bounded = answers.mass, answers.other, answers.bounded
            values = np.asarray(answers.candidates.values, dtype=np.float64)
            grid = float(mass.sum())
            p = mass / grid
            columns["grid_mass"][r], columns["other_mass"][r] = grid, other
            columns["bounded_mass"][r] = float(mass[bounded].sum())
            columns["beyond_scale_mass"][r] = float(mass[answers.beyond].sum())
            columns["value_mean"][r] = float(p @ values)
            columns["value_median"][r] = _median(p, values)
            if answer_type != "yes_no":
                columns["value_log10"][r] = float(p @ np.log10(1 + np.clip(values, 0, None)))
            columns["value"][r] = float(p @ SUMMARIES[summary](torch.from_numpy(values)).numpy())
            dist_parts.append(pd.DataFrame({
                "prompt_id": frame["prompt_id"].iat[r], "context": context,
                "candidate": list(answers.candidates.texts),
                "candidate_value": values, "probability": p, "mass": mass, "bounded": bounded,
                "value_low": answers.low, "value_high": np.where(bounded, 2 * values - answers.low, values),
                "beyond_scale": answers.beyond,
            }))
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
        "budget": budgets,  # per numeric context: the expansion's stopping rule, defaults filled in
    }
    return Measurement(table, pd.concat(dist_parts, ignore_index=True), settings)


def _score_shared(model, cands: CandidateAnswers, ids: list, batch_size: int, pad: int) -> list:
    """Per prompt its ``_Answers`` under a candidate set shared by every prompt (none bounded)."""
    from interp.hooks import attached_hook_count

    unbounded = np.zeros(len(cands.texts), dtype=bool)
    if not cands.packed and not cands.single_token:
        per_forward = max(1, batch_size // len(cands.texts))
    else:
        per_forward = max(1, min(batch_size, _READ_BUDGET // (cands.n_nodes + 1)))
    values = np.array(cands.values, dtype=np.float64)
    # on the unmodified model: prompts prefilled (shared prefixes once), the trie run onto their cache
    prefilled = takes_layout(model) and (cands.packed or cands.single_token) and not attached_hook_count(model)
    run = cands.score_prefilled if prefilled else cands.score

    def score(part: slice) -> tuple:
        batch = pad_ids(ids[part], pad).to(model.cfg.device)
        if cands.answer_tokens is None:
            return run(model, batch).double().cpu(), None
        return tuple(x.double().cpu() for x in run(model, batch, other=True))

    out = []
    for logp, other in backoff_batches(len(ids), per_forward, score, what="answer batch"):
        for i in range(len(logp)):
            out.append(_Answers(cands, logp[i].exp().numpy(), float("nan") if other is None else float(other[i].exp()),
                                unbounded, values, unbounded))
    return out


def _median(p: np.ndarray, values: np.ndarray) -> float:
    """The smallest value whose cumulative probability reaches half (``p`` sums to 1)."""
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(p[order])
    return float(values[order][min(int(np.searchsorted(cum, 0.5 - 1e-9)), len(cum) - 1)])


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
    standardized mean difference over prompts (``circuits.measure.stats.smd``), a ``confidence`` interval
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
            low, high = gap_interval(part, "value", column, a, ["name", "variation"], strata={"name": column},
                                     n_resamples=n_resamples, seed=seed, confidence=confidence)
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
                    "p_permutation": permutation_p_value(
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


__all__ = [
    "CONTRASTS",
    "Expansion",
    "EXPANSION_BUDGET",
    "EXPANSION_DEFAULT",
    "MIN_ANSWER",
    "MIN_MASS",
    "GapTable",
    "SIGNIFICANT",
    "SUMMARY",
    "Measurement",
    "answer_candidates",
    "check_answer_alignment",
    "context_metric",
    "group_gaps",
    "measure",
    "number_start",
]
