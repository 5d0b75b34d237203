"""A model's exact distribution over written numbers, as a tree of tokens.

``NumberGrammar`` reads a number character by character: integer digits, ``,`` thousands
separators (only where groups of three digits can follow), a ``.`` decimal point and up to
``max_decimals`` decimals, then a multiplier word (``k``, `` million``...; the one-letter
``short`` ones only right after the digits, and after at most ``multiplier_decimals`` decimals),
after at most one leading space. For every state of that reading it splits the
vocabulary into *continuations* (tokens that extend the number or change its value) and the rest,
which end the number where it stands. So a node of the token tree (a partial number) has an exact
*stop* probability, ``1 - P(any continuation)``, and a complete answer's probability is the product
of its tokens' probabilities times its stop probability. A token that ends the number only after
changing its value (``"k."``) leads to a final node of its own.

``expand_each`` grows every prompt's own tree best-first, a batch of prompts at once: each round
feeds each prompt's most probable frontier nodes onto a key/value cache that holds the prompts and
every node evaluated so far (nothing is recomputed), and returns one ``NumberTree`` per prompt.
With ``significant``, a partial number whose digits fix its magnitude and that many significant
digits is not expanded further: it is a *bounded* answer (``"52,5"`` holds every number from 52,500
to 52,599 and is valued at its range's midpoint through ``NumberGrammar.fill``); with ``top``, so is
a partial number already past it (for a caller that reads larger numbers as ``top``).
A grammar without multiplier words reads a number that has all its decimals as final (no node
needs evaluating for it).

``expand`` grows one tree best-first on a batch of prompts (the mean mass over prompts decides),
evaluating each round's frontier in one forward of its trie onto the prompts' key/value cache,
and returns the answers it covers as ``CandidateAnswers`` with stop terms, scored exactly on any
prompt like any other candidate grid. Characters that are not part of a number, a sign or a range
(``"40-50"``) end the number: a range counts at its first number.
"""
from __future__ import annotations

import bisect
import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import no_type_check

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.batching import TokenBatch
from interp.bridge import attention_reads_cache, native_attention
from interp.hooks import HookedModel
from interp.metrics import CandidateAnswers
from interp.prefix import GrowingCache

DIGITS = "0123456789"
# (phase, leading digits (4 = more than 3), comma seen, digits in the current group / decimals, word)
State = tuple

ROOT: State = ("int", 0, False, 0, "")
DONE: State = ("done", 0, False, 0, "")
LEAD: State = ("lead", 0, False, 0, "")  # a space before the first digit


@no_type_check  # its methods run once per vocabulary token and state: checking them would dominate
@dataclass(frozen=True)
class NumberGrammar:
    """Which tokens continue a partial number, for one tokenizer (see the module docstring).

    ``words``: multipliers matched case-insensitively, optionally after one space; ``short``:
    one-letter multipliers matched as written, right after the digits. A multiplier followed by a
    letter is no multiplier (``"5 km"`` is 5).
    """

    token_texts: tuple[str, ...]
    words: tuple[str, ...] = ("k", "hundred", "thousand", "thousands", "million", "mn", "billion", "bn")
    short: tuple[str, ...] = ("M", "B")
    max_decimals: int = 2
    multiplier_decimals: int | None = None  # the most decimals a multiplier may follow (None: any)
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, tokenizer, **kw) -> "NumberGrammar":
        """The grammar over ``tokenizer``'s vocabulary (each token decoded on its own)."""
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        texts = []
        for i, piece in enumerate(pieces):
            text = tokenizer.decode([i])
            if isinstance(piece, str) and piece.startswith("▁") and not text.startswith(" "):
                text = " " + text  # SentencePiece drops a lone token's leading space when decoding
            texts.append(text)
        return cls(tuple(texts), **kw)

    # -- characters ----------------------------------------------------------------------------
    def _complete(self, word: str) -> bool:
        spaced = word.startswith(" ")
        bare = word.lstrip(" ")
        return bool(bare) and (bare.lower() in self.words or (not spaced and bare in self.short))

    def _word_prefix(self, word: str) -> bool:
        spaced = word.startswith(" ")
        bare = word.lstrip(" ").lower()
        return any(w.startswith(bare) for w in self.words) or (not spaced and word in self.short)

    def _scaled(self, state: State) -> bool:
        return bool(state[4]) and self._complete(state[4])

    def char(self, state: State, c: str) -> tuple[State | None, bool]:
        """The state after character ``c`` (None: the number ended before ``c``) and whether ``c``
        is a digit of the number."""
        phase, lead, comma, count, word = state
        valid = phase == "frac" or (phase == "int" and lead > 0 and (not comma or count == 3))
        if phase == "done":
            return None, False
        if state == ROOT and c == " ":  # one space may come first ("# 12", "$ 100")
            return LEAD, False
        if phase == "lead":
            return (("int", 1, False, 0, ""), True) if c in DIGITS else (None, False)
        if word:
            if c.isalpha() and self._word_prefix(word + c):
                return (phase, lead, comma, count, word + c), False
            # a letter after a complete multiplier undoes it ("5 km" is 5) and ends the number
            return (DONE, False) if c.isalpha() and self._complete(word) else (None, False)
        if c in DIGITS:
            if phase == "int":
                if comma:  # a fourth digit in a group: parse_number reads only the digits before the comma
                    return (DONE if count == 3 else ("int", lead, True, count + 1, "")), True
                return ("int", min(lead + 1, 4), False, 0, ""), True
            if phase in ("dot", "frac"):
                if phase == "frac" and count >= self.max_decimals:
                    return None, False  # further decimals are not read
                return ("frac", lead, comma, count + 1 if phase == "frac" else 1, ""), True
            return None, False
        if not valid and phase != "space":
            return None, False
        if c == "," and phase == "int" and (comma or lead <= 3):
            return ("int", lead, True, 0, ""), False
        if c == "." and phase == "int" and self.max_decimals > 0:
            return ("dot", lead, comma, 0, ""), False
        if phase == "frac" and self._bare(count):
            return None, False  # no multiplier after this many decimals
        if c == " " and phase in ("int", "frac") and self.words:
            return ("space", lead, comma, count, ""), False
        spaced = " " if phase == "space" else ""
        if c.isalpha() and self._word_prefix(spaced + c):
            return (phase, lead, comma, count, spaced + c), False
        return None, False

    def step(self, state: State, text: str) -> State | None:
        """The state after a token's text, or None when the token ends the number at ``state``
        without changing its value; a token that changes the value and then ends the number
        (``"k."``, or a digit after a complete group) leads to ``DONE``."""
        start, digits, ended = self._scaled(state), False, False
        for c in text:
            nxt, digit = self.char(state, c)
            if nxt is None:
                ended = True
                break
            state, digits = nxt, digits or digit
            if state == DONE:
                break
        if text and not ended and state != DONE and not self._final(state):
            return state
        return DONE if digits or self._scaled(state) != start else None

    def _final(self, state: State) -> bool:
        """Whether no character can continue ``state`` (all its decimals read, no multiplier)."""
        phase, _, _, count, word = state
        no_word = not (self.words or self.short) or self._bare(count)
        return phase == "frac" and count >= self.max_decimals and not word and no_word

    def _bare(self, decimals: int) -> bool:
        """Whether a number with this many decimals takes no multiplier."""
        return self.multiplier_decimals is not None and decimals > self.multiplier_decimals

    def fill(self, state: State) -> str | None:
        """The digits that complete ``state``'s digit run at its midpoint, where the digits fix the
        number's magnitude: inside a thousands group (``"12,5"`` + ``"50"``: 12,550, the middle of
        12,500-12,599) or in the decimals (``"5.2"`` + ``"5"``); None where more integer digits could
        still scale it (``"26"`` may be 26, 260 or 26,000) or a comma may have ended it (``"45,"``
        may be "45, then"). A further thousands group or a multiplier (``"12.5k"``) is taken not to
        follow: on SmolLM2's dollar answers a multiplier after decimals held under 1e-4 of the mass
        (benchmarks/RESULTS.md)."""
        phase, _, comma, count, word = state
        if word:
            return None
        if phase == "int" and comma:
            if count == 0:  # a comma may end the number ("45, then"): a digit must follow first
                return None
            if count < 3:
                return "5".ljust(3 - count, "0")
            return "." + "5".ljust(self.max_decimals, "0") if self.max_decimals else ""  # "12,500" + ".50"
        if phase in ("dot", "frac"):
            decimals = count if phase == "frac" else 0
            return "5".ljust(self.max_decimals - decimals, "0") if decimals < self.max_decimals else ""
        return None

    def state_of(self, text: str) -> State:
        """The state after the characters of ``text`` (e.g. an answer prefix's ``"0."``)."""
        state = ROOT
        for c in text:
            nxt, _ = self.char(state, c)
            if nxt is None:
                raise ValueError(f"{text!r} is not the start of a number")
            state = nxt
        return state

    def continuations(self, state: State) -> dict[int, State]:
        """Every token that continues a number at ``state``, with the state it leads to (in token
        order): ``step`` of every token, read as a walk down the sorted vocabulary (the tokens that
        share a prefix share its states, so a prefix that ends the number settles them all at once)."""
        if state not in self._tables:
            texts, ids = self._sorted()
            table: dict[int, State] = {}
            start = self._scaled(state)

            def settle(lo: int, hi: int, at: State, digits: bool) -> None:  # every token in [lo, hi) ends here
                if digits or self._scaled(at) != start:
                    table.update(dict.fromkeys(ids[lo:hi], DONE))

            def walk(lo: int, hi: int, depth: int, at: State, digits: bool) -> None:
                read = lo
                while read < hi and len(texts[read]) == depth:  # tokens read whole: first among those they prefix
                    read += 1
                if self._final(at):
                    settle(lo, read, at, digits)
                else:
                    table.update(dict.fromkeys(ids[lo:read], at))
                lo = read
                while lo < hi:
                    c = texts[lo][depth]
                    end = bisect.bisect_right(texts, c, lo, hi, key=lambda t: t[depth])  # the tokens with c here
                    nxt, digit = self.char(at, c)
                    if nxt is None:
                        settle(lo, end, at, digits)
                    elif nxt == DONE:
                        settle(lo, end, DONE, digits or digit)
                    else:
                        walk(lo, end, depth + 1, nxt, digits or digit)
                    lo = end

            if texts:
                walk(0, len(texts), 0, state, False)
            self._tables[state] = dict(sorted(table.items()))
        return self._tables[state]

    def _sorted(self) -> tuple[list[str], list[int]]:
        """The vocabulary's non-empty token texts in sorted order, and their token ids."""
        if "sorted" not in self._tables:
            order = sorted((i for i, t in enumerate(self.token_texts) if t), key=self.token_texts.__getitem__)
            self._tables["sorted"] = ([self.token_texts[i] for i in order], order)
        return self._tables["sorted"]

    def continuation_ids(self, state: State) -> tuple[int, ...]:
        return tuple(self.continuations(state))


@dataclass(frozen=True)
class NumberTree:
    """The expanded tree: every answer it covers and its mean probability over the prompts."""

    paths: tuple[tuple[int, ...], ...]
    ends: tuple[tuple[int, ...] | None, ...]  # continuation ids at a stopping answer; None: final
    mass: tuple[float, ...]  # mean probability over the prompts
    root_continuations: tuple[int, ...]
    covered: float  # mean covered probability over the prompts
    other: float  # mean probability that the reply is no number
    uncovered: float  # mean probability of the numbers not covered (unexpanded or dropped)
    n_evaluated: int
    fills: tuple[str | None, ...]  # per answer: None for a complete number, else its midpoint digits ("": past top)
    bounded: float  # mean probability of the bounded answers (partial numbers at their midpoint or past top)

    def candidates(
        self, tokenizer, value: Callable[[str], float | None], *, min_mass: float = 0.0, packed: bool = True
    ) -> CandidateAnswers:
        """The answers holding at least ``min_mass`` of the numeric mass (mean over the prompts) as
        stop-terminated candidates; ``value`` reads a candidate's text (None drops it)."""
        texts, values, ids, ends = [], [], [], []
        for path, end, mass in zip(self.paths, self.ends, self.mass):
            if mass < min_mass * (1 - self.other):
                continue
            text = tokenizer.decode(list(path))
            v = value(text)
            if v is None:
                continue
            texts.append(text), values.append(float(v)), ids.append(path), ends.append(end)
        return CandidateAnswers(tuple(texts), tuple(values), tuple(ids), packed, tuple(ends), self.root_continuations)


class _PromptCache:
    """The prompts' key/value cache (Hugging Face model), onto which each round's trie of nodes
    is run: a node attends to its prompt, its ancestors and itself, at the position id its prefix
    would have right after the prompt (as in ``PackedCandidateBatch``)."""

    def __init__(self, model: HookedModel, batch: TokenBatch):
        self.model, self.hf = model, model.original_model
        self.device = next(self.hf.parameters()).device
        self.batch = batch.to(self.device)
        with attention_reads_cache(model):
            out = self.hf(input_ids=self.batch.tokens, attention_mask=self.batch.attention_mask, use_cache=True)
        rows = torch.arange(len(batch), device=self.device)
        self.root = out.logits[rows, self.batch.answer_pos].float().log_softmax(-1).cpu()
        self.cache, self.width = out.past_key_values, self.batch.tokens.shape[1]

    def log_probs(self, paths: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """Next-token log-probabilities after each prompt + path: ``[prompt, path, vocab]``."""
        if all(not p for p in paths):
            return self.root[:, None].expand(-1, len(paths), -1)
        probe = CandidateAnswers(("",) * len(paths), (0.0,) * len(paths), tuple(tuple(p) + (0,) for p in paths))
        trie = probe._trie
        n, rows = len(trie.tokens), len(self.batch)
        prompt_keys = self.batch.attention_mask.bool()[:, None, :].expand(-1, n, -1)
        mask = torch.cat([prompt_keys, trie.sees.to(self.device)[None].expand(rows, -1, -1)], -1)
        positions = self.batch.lengths[:, None] - 1 + trie.depth.to(self.device)[None]
        read = trie.read[torch.arange(len(paths)), torch.tensor([len(p) for p in paths])]
        keep = (read - 1).clamp(min=0).to(self.device)
        with attention_reads_cache(self.model):
            out = self.hf(input_ids=trie.tokens.to(self.device)[None].expand(rows, -1), attention_mask=mask[:, None],
                          position_ids=positions, past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        self.cache.crop(-n)  # back to the prompts alone
        logp = out.logits.float().log_softmax(-1).cpu()
        return torch.where((read == 0)[None, :, None], self.root[:, None], logp)


@torch.no_grad()
def expand(
    model: HookedModel,
    batch: TokenBatch,
    grammar: NumberGrammar,
    *,
    start: State = ROOT,
    target: float = 0.97,
    max_nodes: int = 256,
    per_round: int = 32,
    min_mass: float = 1e-4,
    progress: bool = False,
) -> NumberTree:
    """Best-first expansion of the number tree after ``batch``'s prompts.

    Each round evaluates the ``per_round`` frontier nodes of highest mean probability (their
    next-token distributions, all prompts at once); it stops when the covered mass (mean over
    prompts) reaches ``target``, ``max_nodes`` nodes are evaluated or no frontier node holds
    ``min_mass``. ``target`` and ``min_mass`` are shares of the mean probability that the reply is
    a number at all (nearly 1 for a trained model; tiny for a random one). Deterministic: ties
    break by token ids.
    """
    n = len(batch)
    cache = _PromptCache(model, batch)
    frontier: dict[tuple[int, ...], tuple[State, torch.Tensor]] = {(): (start, torch.zeros(n))}
    paths, ends, masses = [], [], []
    covered, dropped, lead_other = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    evaluated, numeric = 0, 1.0
    bar = tqdm(total=max_nodes, desc="expanding answers", disable=not progress)
    while frontier and evaluated < max_nodes and float(covered.mean()) < target * numeric:
        ranked = sorted(frontier, key=lambda p: (-float(frontier[p][1].exp().mean()), p))
        chosen = [p for p in ranked[: min(per_round, max_nodes - evaluated)]
                  if float(frontier[p][1].exp().mean()) >= min_mass * numeric]
        if not chosen:
            break
        sets = [grammar.continuation_ids(frontier[p][0]) for p in chosen]
        node_logp = cache.log_probs(chosen)
        for i, path in enumerate(chosen):
            state, path_logp = frontier.pop(path)
            table = grammar.continuations(state)
            logp = node_logp[:, i, list(sets[i])]
            stop = torch.log1p(-logp.exp().sum(-1).clamp(max=1 - 1e-6))
            if state == LEAD:  # a space and then no number
                lead_other += (path_logp + stop).exp()
            elif path:  # the root's stop mass is no number at all
                paths.append(path), ends.append(sets[i]), masses.append(float((path_logp + stop).exp().mean()))
                covered += (path_logp + stop).exp()
            else:
                root_continuations, other = sets[i], float(stop.exp().mean())
                numeric = 1 - other
            for j, token in enumerate(sets[i]):
                child, child_logp = path + (token,), path_logp + logp[:, j]
                if table[token] == DONE:  # a final answer: kept when it holds min_mass
                    if float(child_logp.exp().mean()) >= min_mass * numeric:
                        paths.append(child), ends.append(None), masses.append(float(child_logp.exp().mean()))
                        covered += child_logp.exp()
                    else:
                        dropped += child_logp.exp()
                else:
                    frontier[child] = (table[token], child_logp)
        evaluated += len(chosen)
        bar.update(len(chosen))
    bar.close()
    uncovered = dropped + sum((logp.exp() for _, logp in frontier.values()), torch.zeros(n))
    return NumberTree(tuple(paths), tuple(ends), tuple(masses), root_continuations, float(covered.mean()),
                      other + float(lead_other.mean()), float(uncovered.mean()), evaluated, (None,) * len(paths), 0.0)


def _natively(grow):
    """Run ``grow(model, ...)`` with the Hugging Face attention kernels onto caches, entered once
    (``native_attention`` checks the attention hook points on entry)."""

    @functools.wraps(grow)
    def run(model, *args, **kwargs):
        with native_attention(model), attention_reads_cache(model):
            return grow(model, *args, **kwargs)

    return run


@torch.no_grad()
@_natively
def expand_each(
    model: HookedModel,
    batch: TokenBatch,
    grammar: NumberGrammar,
    *,
    start: str = "",
    target: float = 0.97,
    max_nodes: int = 160,
    per_round: int = 16,
    min_mass: float = 1e-4,
    min_answer: float | None = None,
    significant: int | None = None,
    top: float | None = None,
    progress: bool = False,
) -> list[NumberTree]:
    """Best-first expansion of each prompt's own number tree, all of ``batch``'s prompts at once.

    Per prompt, each round evaluates its ``per_round`` frontier nodes of highest probability (one
    forward for every prompt still expanding, on the key/value cache of the prompts and of the
    nodes evaluated so far); a prompt stops when its covered mass reaches ``target`` of its numeric
    mass, ``max_nodes`` nodes are evaluated or no frontier node holds ``min_mass`` of it (partial
    numbers under ``min_mass`` are dropped). An answer that needs no forward (a final or bounded one)
    is kept down to ``min_answer`` of the numeric mass (None, or above it: ``min_mass``): the tail of a diffuse
    answer distribution is mostly such answers, covered at no cost. ``start``: the part of the number the prompt
    already holds (``"0."``). With ``significant``, a partial number with that many significant
    digits whose magnitude is fixed (``NumberGrammar.fill``) is one *bounded* answer, its
    probability the prefix's (every number it starts), valued at its range's midpoint (a range at
    most ``10 ** (1 - significant)`` of its value wide); it is refined (evaluated, its digits
    replacing it) when its mass times its range's half-width in decades (``REFINE``) outranks the
    mass of every unexpanded node. With ``top``, a partial number already past it (every number it
    starts is larger: ``"126"`` for a top of 100) is one bounded answer with the fill ``""``, never
    refined (a caller that clips values to ``top`` knows its value exactly). Returns one
    ``NumberTree`` per prompt, whose ``mass`` is that prompt's probability of each answer.
    Deterministic: ties break by token ids.
    """
    import heapq

    n = len(batch)
    text, start_sig, start = start, _significant(0, start), grammar.state_of(start)
    cache = GrowingCache(model, batch)

    answer_floor = min_mass if min_answer is None else min(min_answer, min_mass)

    def file(t, path, state, logp, sig):  # a child: bounded at ``significant`` digits where its range is fixed
        fill = grammar.fill(state) if significant is not None and sig >= significant else None
        past = top is not None and state != DONE and _least(text + "".join(grammar.token_texts[i] for i in path)) > top
        _push(t, path, state, logp, min_mass * t["numeric"], answer_floor * t["numeric"], sig,
              "" if past else fill, refine=not past)

    root_ids = grammar.continuation_ids(start)
    root_table = grammar.continuations(start)
    ids_t = torch.tensor(root_ids, dtype=torch.long)
    trees: list[dict] = []
    for r in range(n):
        logp = cache.root[r, ids_t].double()
        other = float(torch.log1p(-logp.exp().sum().clamp(max=1 - 1e-12)).exp())
        t = {"paths": [], "ends": [], "mass": [], "fills": [], "covered": 0.0, "bounded": 0.0, "dropped": 0.0,
             "frontier": [], "col": {}, "other": other, "numeric": 1 - other, "evaluated": 0, "dead": set()}
        for j, token in enumerate(root_ids):
            file(t, (token,), root_table[token], float(logp[j]), _significant(start_sig, grammar.token_texts[token]))
        trees.append(t)

    def active(r):
        t = trees[r]
        return (t["frontier"] and t["evaluated"] < max_nodes and t["covered"] < target * t["numeric"]
                and -t["frontier"][0][0] >= min_mass * t["numeric"])

    bar = tqdm(total=n * max_nodes, desc="expanding answers", disable=not progress)
    live = [r for r in range(n) if active(r)]
    while live:
        if len(live) < len(cache.rows):
            cache.keep(live)
        chosen = []
        for r in live:
            t, picked = trees[r], []
            floor = min_mass * t["numeric"]
            while t["frontier"] and len(picked) < min(per_round, max_nodes - t["evaluated"]):
                neg, path, state, logp, sig, answer = t["frontier"][0]
                if -neg < floor:
                    break
                heapq.heappop(t["frontier"])
                if answer >= 0:  # a bounded answer refined: its digits' nodes replace it
                    t["dead"].add(answer)
                    t["covered"] -= math.exp(logp)
                    t["bounded"] -= math.exp(logp)
                picked.append((path, state, logp, sig))
            chosen.append(picked)
        slots = max(len(p) for p in chosen)
        width = cache.keys.shape[1]
        tokens = torch.zeros(len(live), slots, dtype=torch.long)
        depth = torch.zeros(len(live), slots, dtype=torch.long)
        ancestors = torch.zeros(len(live), slots, width, dtype=torch.bool)
        nodes, reads = [], []  # (row, slot, token, depth) per node; (row, slot, cached key) per ancestor read
        for i, (r, picked) in enumerate(zip(live, chosen)):
            col = trees[r]["col"]
            for s, (path, *_) in enumerate(picked):
                nodes.append((i, s, path[-1], len(path)))
                reads.extend((i, s, col[path[:d]]) for d in range(1, len(path)))
        row, slot, token, deep = torch.tensor(nodes, dtype=torch.long).T
        tokens[row, slot], depth[row, slot] = token, deep
        if reads:
            ancestors[tuple(torch.tensor(reads, dtype=torch.long).T)] = True
        states = {state for picked in chosen for _, state, *_ in picked}
        read = sorted({i for state in states for i in grammar.continuation_ids(state)})  # all that leave the device
        at = {token: j for j, token in enumerate(read)}
        index = {state: np.array([at[i] for i in grammar.continuation_ids(state)], dtype=np.int64) for state in states}
        logits, norms = cache.feed(tokens, depth, ancestors, read)
        logps = (logits - norms[..., None]).double()  # [row, slot, read]: each node's continuations
        masses = logps.exp().numpy()
        logps = logps.numpy()
        for i, (r, picked) in enumerate(zip(live, chosen)):
            t = trees[r]
            floor = answer_floor * t["numeric"]
            for s, (path, state, logp, sig) in enumerate(picked):
                t["col"][path] = width + s
                table = grammar.continuations(state)
                ids = grammar.continuation_ids(state)
                child, mass = logps[i, s, index[state]], masses[i, s, index[state]]
                total = float(mass.sum())
                stop = math.log1p(-min(total, 1 - 1e-12))
                if state == LEAD:  # a space and then no number
                    t["other"] += math.exp(logp + stop)
                else:
                    t["paths"].append(path), t["ends"].append(ids), t["mass"].append(math.exp(logp + stop))
                    t["fills"].append(None)
                    t["covered"] += math.exp(logp + stop)
                kept = np.flatnonzero(mass * math.exp(logp) >= floor)
                t["dropped"] += math.exp(logp) * (total - float(mass[kept].sum()))
                for j, lp in zip(kept.tolist(), (logp + child[kept]).tolist()):
                    token = ids[j]
                    file(t, path + (token,), table[token], lp, _significant(sig, grammar.token_texts[token]))
            t["evaluated"] += len(picked)
            bar.update(len(picked))
        live = [r for r in live if active(r)]
    bar.close()
    out = []
    for t in trees:
        uncovered = t["dropped"] + sum(math.exp(f[3]) for f in t["frontier"] if f[5] < 0)
        keep = [i for i in range(len(t["paths"])) if i not in t["dead"]]
        paths, ends, mass, fills = ([t[k][i] for i in keep] for k in ("paths", "ends", "mass", "fills"))
        out.append(NumberTree(tuple(paths), tuple(ends), tuple(mass), root_ids, t["covered"], t["other"], uncovered,
                              t["evaluated"], tuple(fills), t["bounded"]))
    return out


def _significant(sig: int, text: str) -> int:
    """The significant digits of a number after ``text`` follows ``sig`` of them (leading zeros
    are not significant)."""
    for c in text:
        if c in DIGITS and (sig or c != "0"):
            sig += 1
    return sig


def _least(text: str) -> int:
    """The least number a partial number can still become: its leading digits (``"12,5"``: 12, as
    the comma may end it)."""
    found = re.search(r"\d+", text)
    return int(found.group()) if found else 0


def _push(tree: dict, path: tuple[int, ...], state: State, logp: float, floor: float, answer_floor: float,
          sig: int, fill: str | None, refine: bool = True) -> None:
    """File a child: a final or bounded answer (``fill`` not None) is covered unless it is under
    ``answer_floor``; a partial number joins the frontier unless it is under ``floor`` (it could
    never be chosen). A bounded answer joins the frontier too (with ``refine``), to be refined at
    ``REFINE`` times its mass per decade of its range's width (``10 ** (1 - sig)`` of its value at
    most)."""
    import heapq

    mass = math.exp(logp)
    answer = state == DONE or fill is not None
    if mass < (answer_floor if answer else floor):
        tree["dropped"] += mass
    elif answer:
        tree["paths"].append(path), tree["ends"].append(None), tree["mass"].append(mass)
        tree["fills"].append(None if state == DONE else fill)
        tree["covered"] += mass
        if state != DONE:
            tree["bounded"] += mass
        weight = REFINE * 10.0 ** (1 - sig)
        if state != DONE and refine and mass * weight >= floor:  # else it could never be chosen
            heapq.heappush(tree["frontier"], (-mass * weight, path, state, logp, sig, len(tree["paths"]) - 1))
    else:
        heapq.heappush(tree["frontier"], (-mass, path, state, logp, sig, -1))


# A bounded answer's range of relative width w spans about w / (2 ln 10) decades either side of its
# midpoint: refining it is worth that share of its mass (an unexpanded node's whole mass is unknown).
REFINE = 1 / (2 * math.log(10))


__all__ = ["DONE", "LEAD", "ROOT", "NumberGrammar", "NumberTree", "expand", "expand_each"]
