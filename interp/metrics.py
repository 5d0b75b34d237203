"""Metrics usable as patching and attribution targets.

A metric maps ``(logits, batch)`` to one value per prompt and is differentiable. Metrics over
multi-token candidate answers need each prompt run once per candidate: they ``expand`` a prompt
batch into a model batch (the identity for single-position metrics), and reduce the model's
logits on that batch back to one value per prompt.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, runtime_checkable

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor

from interp.batching import TokenBatch, pad_token_id
from interp.hooks import HookedModel, capturing


@runtime_checkable
class Metric(Protocol):
    """A metric. One that reads logits at some positions only may say which with
    ``logit_positions(batch) -> Int[Tensor, "entry"]`` (sorted, unique positions of the expanded batch),
    so that sweeps unembed only those (``interp.stacking.LogitReader``)."""

    def expand(self, batch: TokenBatch) -> TokenBatch:
        """The batch the model must run for ``batch``'s prompts."""

    def __call__(self, logits: Float[Tensor, "row pos vocab"], batch: TokenBatch) -> Float[Tensor, "prompt"]:
        """One value per prompt, from the logits of the expanded batch."""


def answer_logits(logits: Float[Tensor, "row pos vocab"], batch: TokenBatch) -> Float[Tensor, "row vocab"]:
    """Next-token logits at each prompt's own answer position."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, batch.answer_pos.to(logits.device)]


def log_normalizer(logits: Float[Tensor, "row ... vocab"], rows: int = 16) -> Float[Tensor, "row ..."]:
    """``logits.logsumexp(-1)``, on a CPU about ``rows`` vectors at a time (split along the first
    axis): the same values, without a temporary the size of ``logits`` (3-4x faster on a
    ``[512, 49152]`` batch; differentiable)."""
    step = max(1, rows // max(math.prod(logits.shape[1:-1]), 1))
    if logits.device.type != "cpu" or logits.shape[0] <= step:
        return logits.logsumexp(-1)
    return torch.cat([part.logsumexp(-1) for part in logits.split(step)])


def _token_tensor(tokens: Sequence[int] | Tensor, device) -> Int[Tensor, "token"]:
    out = torch.as_tensor(tokens, dtype=torch.long, device=device).flatten()
    if out.numel() == 0:
        raise ValueError("a token set must hold at least one token")
    return out


class _SinglePosition:
    def expand(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def logit_positions(self, batch: TokenBatch) -> Int[Tensor, "entry"]:
        """The positions whose logits are read: each prompt's answer position."""
        return batch.answer_pos.unique()


@dataclass(frozen=True)
class LogitDiff(_SinglePosition):
    """Mean logit of ``positive`` tokens minus mean logit of ``negative`` tokens."""

    positive: Sequence[int]
    negative: Sequence[int]

    def __call__(self, logits, batch):
        final = answer_logits(logits, batch).float()
        pos = final[:, _token_tensor(self.positive, final.device)].mean(-1)
        neg = final[:, _token_tensor(self.negative, final.device)].mean(-1)
        return pos - neg


@dataclass(frozen=True)
class TokenSetProb(_SinglePosition):
    """Total next-token probability of a set of tokens (``log=True``: its log)."""

    tokens: Sequence[int]
    log: bool = False

    def __call__(self, logits, batch):
        logp = answer_logits(logits, batch).float().log_softmax(-1)
        # A token listed twice (e.g. the shared first token of two answers) counts once.
        total = logp[:, _token_tensor(self.tokens, logp.device).unique()].logsumexp(-1)
        return total if self.log else total.exp()


def kl_from_log_probs(
    log_probs: Float[Tensor, "*lead vocab"],
    reference: Float[Tensor, "*lead vocab"],
    mask: Shaped[Tensor, "row pos"] | None = None,
) -> Float[Tensor, "..."]:
    """KL(reference || model) from log-probabilities: per row, or with ``mask`` (``[row, pos]``, any dtype,
    real positions) averaged over each prompt's real positions."""
    per_row = F.kl_div(log_probs, reference, log_target=True, reduction="none").sum(-1)
    if mask is None:
        return per_row
    mask = mask.to(per_row.device, per_row.dtype)
    return (per_row * mask).sum(-1) / mask.sum(-1)


def kl_divergence(
    logits: Float[Tensor, "row pos vocab"],
    reference: Float[Tensor, "row pos vocab"],
    batch: TokenBatch,
    *,
    all_positions: bool = True,
) -> Float[Tensor, "row"]:
    """KL(reference || model) per prompt, averaged over real positions (or at the answer only)."""
    if all_positions:
        ref = reference.float().log_softmax(-1)
        new = logits.float().log_softmax(-1)
        return kl_from_log_probs(new, ref, batch.attention_mask)
    ref = answer_logits(reference, batch).float().log_softmax(-1)
    new = answer_logits(logits, batch).float().log_softmax(-1)
    return kl_from_log_probs(new, ref)


@dataclass(frozen=True)
class CandidateBatch(TokenBatch):
    """Each prompt followed by each candidate answer: rows are ``(prompt candidate)``."""

    n_candidates: int = 1
    cand_start: Int[Tensor, "row"] = field(default=None)  # position of the first candidate token
    cand_tokens: Int[Tensor, "row cand_pos"] = field(default=None)  # candidate ids, -1 padded


@dataclass(frozen=True)
class PackedCandidateBatch(TokenBatch):
    """Each prompt followed, in the same row, by the trie of its candidates' leading tokens.

    Row layout: the prompt, then one position per trie node (a proper prefix of some candidate),
    then padding. A node attends to the prompt, its ancestors and itself, and sits at the position
    id its prefix would have right after the prompt, so it computes exactly what it would with the
    prefix appended alone. ``read_pos[:, 0]`` is the answer position, ``read_pos[:, 1 + n]`` node ``n``.
    """

    read_pos: Int[Tensor, "row read"] = field(default=None)


@dataclass(frozen=True)
class _Trie:
    """The trie of the candidates' fed tokens, shared by every row: all but each candidate's last
    token, and the last one too where a stop term is read after it."""

    tokens: Int[Tensor, "node"]
    depth: Int[Tensor, "node"]  # 1 for a candidate's first token
    sees: Bool[Tensor, "node node"]  # ancestor-or-self
    read: Int[Tensor, "cand k"]  # where candidate token j's logits are read: 0 answer position, 1 + node
    cand_tokens: Int[Tensor, "cand k"]  # -1 padded
    end_read: Int[Tensor, "cand"]  # where a candidate's stop term is read (its own last node)
    # the stop terms as flat (candidate, token that would continue it) pairs: one candidate may have
    # thousands of such tokens and the next a dozen, so a padded [cand, m] table would be mostly padding
    end_cand: Int[Tensor, "stop"]
    end_tokens: Int[Tensor, "stop"]

    @staticmethod
    def prefixes(token_ids: Sequence[Sequence[int]], ends: Sequence[Sequence[int] | None]) -> dict:
        """The fed prefixes, each a node, in order (a parent before its children): ``{prefix: node}``."""
        node_of: dict[tuple[int, ...], int] = {}
        for ids, end in zip(token_ids, ends):
            for d in range(1, len(ids) + bool(end)):
                node_of.setdefault(tuple(ids[:d]), len(node_of))
        return node_of

    @classmethod
    def of(cls, token_ids: Sequence[Sequence[int]], ends: Sequence[Sequence[int] | None]) -> "_Trie":
        node_of = cls.prefixes(token_ids, ends)
        parents = [node_of.get(prefix[:-1], -1) for prefix in node_of]
        tokens, depth = [prefix[-1] for prefix in node_of], [len(prefix) for prefix in node_of]
        n = len(tokens)
        sees = torch.eye(n, dtype=torch.bool)
        for node, parent in enumerate(parents):  # parents come before children
            if parent >= 0:
                sees[node] |= sees[parent]
        k = max(len(ids) for ids in token_ids)
        read = torch.zeros(len(token_ids), k, dtype=torch.long)
        cand_tokens = torch.full((len(token_ids), k), -1, dtype=torch.long)
        end_read = torch.zeros(len(token_ids), dtype=torch.long)
        end_cand, end_tokens = [], []
        for c, (ids, end) in enumerate(zip(token_ids, ends)):
            cand_tokens[c, : len(ids)] = torch.tensor(ids)
            for j in range(1, len(ids)):
                read[c, j] = 1 + node_of[tuple(ids[:j])]
            if end:
                end_read[c] = 1 + node_of[tuple(ids)]
                end_cand.append(torch.full((len(end),), c, dtype=torch.long))
                end_tokens.append(torch.tensor(end, dtype=torch.long))
        empty = torch.zeros(0, dtype=torch.long)
        return cls(torch.tensor(tokens, dtype=torch.long), torch.tensor(depth, dtype=torch.long), sees, read,
                   cand_tokens, end_read, torch.cat(end_cand) if end_cand else empty,
                   torch.cat(end_tokens) if end_tokens else empty)


@dataclass(frozen=True)
class CandidateAnswers:
    """An ordered set of candidate answers (strings) with their numeric values.

    ``expand`` lays out every candidate after every prompt; ``distribution`` gives the model's
    exact probability of each candidate (product over its tokens), renormalized over the set.
    With ``packed`` (the default) each prompt is one row holding the trie of its candidates (see
    ``PackedCandidateBatch``; the model must accept ``attention_mask``/``position_ids`` keywords,
    as the TransformerLens bridge does); otherwise each candidate gets a row of its own, prompt
    repeated, which any model runs.

    ``ends`` (optional, per candidate): the tokens that would continue the candidate's answer; its
    probability then includes the stop term ``1 - P(any of them)`` read right after its last token
    (the answer ends there). None for a candidate that needs no stop term. ``answer_tokens``
    (optional): the tokens that start an answer at all, for ``other_mass``.
    """

    texts: tuple[str, ...]
    values: tuple[float, ...]
    token_ids: tuple[tuple[int, ...], ...]
    packed: bool = True
    ends: tuple[tuple[int, ...] | None, ...] | None = None
    answer_tokens: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.ends is not None and len(self.ends) != len(self.token_ids):
            raise ValueError(f"{len(self.ends)} ends for {len(self.token_ids)} candidates")

    @classmethod
    def from_texts(
        cls, tokenizer, texts: Sequence[str], values: Sequence[float], *, packed: bool = True
    ) -> "CandidateAnswers":
        if len(texts) != len(values) or len(texts) < 2:
            raise ValueError(
                f"need at least 2 candidates with one value each; got {len(texts)} texts and "
                f"{len(values)} values"
            )
        ids = tuple(tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        empty = [t for t, i in zip(texts, ids) if not i]
        if empty:
            raise ValueError(f"candidates {empty} tokenize to nothing")
        if len(set(ids)) != len(ids):
            raise ValueError("two candidates tokenize identically; the grid must be distinct")
        return cls(tuple(texts), tuple(float(v) for v in values), ids, packed)

    @property
    def _ends(self) -> tuple[tuple[int, ...] | None, ...]:
        return self.ends if self.ends is not None else (None,) * len(self.token_ids)

    @property
    def single_token(self) -> bool:
        return all(len(t) == 1 for t in self.token_ids) and not any(self._ends)

    @property
    def n_nodes(self) -> int:
        """Positions the packed trie adds to every row."""
        return 0 if self.single_token else len(_Trie.prefixes(self.token_ids, self._ends))

    @cached_property
    def _trie(self) -> _Trie:
        return _Trie.of(self.token_ids, self._ends)

    def expand(self, batch: TokenBatch) -> TokenBatch:
        if self.single_token:
            return batch
        if self.packed:
            return self._pack(batch)
        device = batch.tokens.device
        n_prompt, n_cand = len(batch), len(self.token_ids)
        cand_len = max(len(t) for t in self.token_ids)
        cand = torch.full((n_cand, cand_len), -1, dtype=torch.long)
        for i, ids in enumerate(self.token_ids):
            cand[i, : len(ids)] = torch.tensor(ids)
        cand = cand.to(device)
        # Full candidate tokens are fed; the last one's own prediction is read for a stop term only.
        width = int(batch.lengths.max()) + cand_len
        pad = pad_token_id_of(batch)
        tokens = torch.full((n_prompt * n_cand, width), pad, dtype=torch.long, device=device)
        starts = einops.repeat(batch.lengths, "prompt -> (prompt cand)", cand=n_cand)
        cand_rows = einops.repeat(cand, "cand k -> (prompt cand) k", prompt=n_prompt)
        # A batch padded wider than its longest prompt is trimmed: only real tokens are copied.
        prompt_rows = einops.repeat(batch.tokens[:, :width], "prompt pos -> (prompt cand) pos", cand=n_cand)
        tokens[:, : prompt_rows.shape[1]] = prompt_rows
        positions = torch.arange(width, device=device)
        offset = positions[None, :] - starts[:, None]
        in_cand = (offset >= 0) & (offset < cand_len)
        gathered = cand_rows.gather(1, offset.clamp(0, cand_len - 1))
        in_cand &= gathered >= 0
        tokens = torch.where(in_cand, gathered, tokens)
        lengths = starts + (cand_rows >= 0).sum(-1)
        mask = (positions[None, :] < lengths[:, None]).long()
        tokens = torch.where(mask.bool(), tokens, torch.full_like(tokens, pad))
        return CandidateBatch(
            tokens=tokens,
            attention_mask=mask,
            answer_pos=starts - 1,
            n_candidates=n_cand,
            cand_start=starts,
            cand_tokens=cand_rows,
        )

    def _pack(self, batch: TokenBatch) -> PackedCandidateBatch:
        device = batch.tokens.device
        trie = self._trie
        n_nodes = len(trie.tokens)
        lengths = batch.lengths
        width = int(lengths.max()) + n_nodes
        positions = torch.arange(width, device=device)
        node = positions[None, :] - lengths[:, None]  # node index at each position, if in [0, n_nodes)
        in_trie = (node >= 0) & (node < n_nodes)
        node_c = node.clamp(0, n_nodes - 1)
        tokens = torch.full((len(batch), width), pad_token_id_of(batch), dtype=torch.long, device=device)
        tokens[:, : min(width, batch.tokens.shape[1])] = batch.tokens[:, :width]
        tokens = torch.where(in_trie, trie.tokens.to(device)[node_c], tokens)
        position_ids = torch.where(in_trie, lengths[:, None] - 1 + trie.depth.to(device)[node_c], positions[None, :])
        causal = positions[None, :, None] >= positions[None, None, :]
        both = in_trie[:, :, None] & in_trie[:, None, :]
        sees = trie.sees.to(device)[node_c[:, :, None], node_c[:, None, :]]
        key_mask = causal & (~both | sees)
        return PackedCandidateBatch(
            tokens=tokens,
            attention_mask=(positions[None, :] < lengths[:, None] + n_nodes).long(),
            answer_pos=lengths - 1,
            position_ids=position_ids,
            key_mask=key_mask,
            read_pos=lengths[:, None] - 1 + torch.arange(n_nodes + 1, device=device),
        )

    def log_probs(self, logits: Float[Tensor, "row pos vocab"], batch: TokenBatch) -> Float[Tensor, "prompt cand"]:
        """Exact log-probability of each candidate after each prompt: its tokens, and its stop term
        where it has ``ends``."""
        if not self.single_token and not isinstance(batch, (CandidateBatch, PackedCandidateBatch)):
            raise TypeError("run the model on metric.expand(batch)")
        rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
        return self.log_probs_at(logits[rows, self.read_positions(batch).to(logits.device)], batch)

    def read_positions(self, batch: TokenBatch) -> Int[Tensor, "row n"]:
        """The positions whose next-token logits ``log_probs`` reads."""
        if isinstance(batch, PackedCandidateBatch):
            return batch.read_pos
        if self.single_token or not isinstance(batch, CandidateBatch):
            return batch.answer_pos[:, None]
        k = batch.cand_tokens.shape[1] + any(self._ends)  # and the position after the last token
        width = batch.tokens.shape[1]
        return (batch.cand_start[:, None] - 1 + torch.arange(k, device=batch.tokens.device)).clamp(max=width - 1)

    def log_probs_at(self, logits: Float[Tensor, "row n vocab"], batch: TokenBatch) -> Float[Tensor, "prompt cand"]:
        """``log_probs`` from the logits at ``read_positions(batch)`` only (see ``logits_at``)."""
        logits = logits.float()
        lse = log_normalizer(logits)  # row n
        if self.single_token or not isinstance(batch, (CandidateBatch, PackedCandidateBatch)):
            ids = torch.tensor([t[0] for t in self.token_ids], device=logits.device)
            return logits[:, 0, ids] - lse[:, :1]
        trie = self._trie
        if isinstance(batch, PackedCandidateBatch):
            read, ids = trie.read.to(logits.device), trie.cand_tokens.to(logits.device)
            token_logp = logits[:, read, ids.clamp(min=0)] - lse[:, read]  # row cand k
            total = (token_logp * (ids >= 0)).sum(-1)
            if not any(self._ends):
                return total
            owner, end_ids = trie.end_cand.to(logits.device), trie.end_tokens.to(logits.device)
            at = trie.end_read.to(logits.device)[owner]  # stop
            return total + _stop_pairs(logits[:, at, end_ids] - lse[:, at], owner, total.shape[-1])
        k = batch.cand_tokens.shape[1]
        ids = batch.cand_tokens.to(logits.device)
        token_logp = logits[:, :k].gather(-1, ids.clamp(min=0)[..., None]).squeeze(-1) - lse[:, :k]
        total = (token_logp * (ids >= 0)).sum(-1)
        if any(self._ends):
            n_prompt = len(ids) // batch.n_candidates
            owner = trie.end_cand.to(logits.device)  # each stop term's row: its candidate's, in every prompt
            row = einops.rearrange(torch.arange(n_prompt, device=logits.device)[:, None] * batch.n_candidates
                                   + owner, "prompt stop -> (prompt stop)")
            end_ids = einops.repeat(trie.end_tokens.to(logits.device), "stop -> (prompt stop)", prompt=n_prompt)
            after = (ids >= 0).sum(-1)[row]  # read right after the candidate's last token
            total = total + _stop_pairs(logits[row, after, end_ids] - lse[row, after], row, len(ids))
        return einops.rearrange(total, "(prompt cand) -> prompt cand", cand=batch.n_candidates)

    def other_log_prob_at(self, logits: Float[Tensor, "row n vocab"], batch: TokenBatch) -> Float[Tensor, "prompt"]:
        """log P(the reply starts with none of ``answer_tokens``), from the logits at
        ``read_positions(batch)`` (whose first is the answer position)."""
        if self.answer_tokens is None:
            raise ValueError("these candidates have no answer_tokens")
        first = logits[:: batch.n_candidates, 0] if isinstance(batch, CandidateBatch) else logits[:, 0]
        first = first.float()
        ids = torch.tensor(self.answer_tokens, dtype=torch.long, device=first.device)
        return _stop(first[:, ids] - first.logsumexp(-1, keepdim=True), torch.ones_like(ids, dtype=torch.bool))

    def score(self, model: HookedModel, batch: TokenBatch, *, other: bool = False):
        """Exact candidate log-probabilities for ``batch``'s prompts, unembedding only where read;
        with ``other``, also ``other_log_prob_at``'s per-prompt log-probability."""
        expanded = self.expand(batch)
        logits = logits_at(model, expanded, self.read_positions(expanded))
        logp = self.log_probs_at(logits, expanded)
        return (logp, self.other_log_prob_at(logits, expanded)) if other else logp

    @torch.no_grad()
    def score_prefilled(self, model: HookedModel, batch: TokenBatch, *, other: bool = False):
        """``score`` on a model with no hooks attached, cheaper: the prompts prefilled once (each
        shared prefix computed once) and the packed trie fed onto their key/value cache in one
        forward (``interp.prefix.GrowingCache``), on the Hugging Face attention kernels
        (``native_attention``). The same values up to float rounding, on the CPU.
        ``batch``: plain right-padded prompts."""
        from interp.bridge import attention_reads_cache, native_attention
        from interp.prefix import GrowingCache

        if not (self.packed or self.single_token):
            raise ValueError("score_prefilled runs a packed trie: build the candidates with packed=True")
        with native_attention(model), attention_reads_cache(model):
            cache = GrowingCache(model, batch)
            logp = cache.root[:, None]  # log-probabilities at the answer position
            if not self.single_token:
                trie, rows = self._trie, len(batch)
                nodes = len(trie.tokens)
                logits, norms = cache.feed(trie.tokens[None].expand(rows, -1), trie.depth[None].expand(rows, -1),
                                           torch.zeros(rows, nodes, 0, dtype=torch.bool), range(logp.shape[-1]),
                                           sees=trie.sees)
                logp = torch.cat([logp, logits - norms[..., None]], 1)
        expanded = self.expand(batch.to("cpu"))
        scores = self.log_probs_at(logp, expanded)
        return (scores, self.other_log_prob_at(logp, expanded)) if other else scores

    def values_of(self, batch: TokenBatch) -> Float[Tensor, "1 cand"]:
        """The candidates' values, one row shared by every prompt."""
        return torch.tensor(self.values, dtype=torch.float64)[None]

    def distribution(self, logits, batch) -> Float[Tensor, "prompt cand"]:
        return self.log_probs(logits, batch).softmax(-1)

    def grid_mass(self, logits, batch) -> Float[Tensor, "prompt"]:
        """Total (unrenormalized) probability the model puts on the candidates."""
        return self.log_probs(logits, batch).logsumexp(-1).exp()


@dataclass(frozen=True)
class RowCandidateBatch(PackedCandidateBatch):
    """A packed batch whose every row holds the trie of its own prompt's candidates (see
    ``PromptCandidates``): per row, candidate ``c``'s token ``j`` is read at column
    ``cand_read[row, c, j]`` of ``read_pos``, its stop term at ``end_read[row, c]`` from the pairs
    (``end_cand``, ``end_ids``) of its trie's candidates and the tokens that would continue them; -1
    pads ids."""

    cand_read: Int[Tensor, "row cand k"] = field(default=None)
    cand_ids: Int[Tensor, "row cand k"] = field(default=None)
    end_read: Int[Tensor, "row cand"] = field(default=None)
    end_cand: Int[Tensor, "row stop"] = field(default=None)
    end_ids: Int[Tensor, "row stop"] = field(default=None)
    cand_valid: Bool[Tensor, "row cand"] = field(default=None)
    values: Float[Tensor, "row cand"] = field(default=None)
    answer_ids: Int[Tensor, "row a"] = field(default=None)


def _padded(rows: Sequence[Tensor], fill, dims: int) -> Tensor:
    """Stack tensors of ``dims`` dimensions, padding each dimension to its largest size with ``fill``."""
    shape = [len(rows)] + [max(max(r.shape[d] for r in rows), 1) for d in range(dims)]
    out = torch.full(shape, fill, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[(i, *[slice(0, n) for n in r.shape])] = r
    return out


@dataclass(frozen=True, eq=False)
class PromptCandidates:
    """Each prompt's own candidate answers, looked up by the prompt's token ids.

    ``sets`` maps a prompt's tokens (a tuple of ids, padding excluded) to the ``CandidateAnswers``
    it is scored with; ``own`` to the prompt's own answers as derived (``sets`` may hold a union
    over several prompts instead). A prompt in neither is passed to ``derive`` (a list of token
    tuples -> their candidate sets); a prompt not in ``sets`` is scored with its own. ``expand`` packs
    every row with the trie of its own candidates (the model must take the packed layout, as the
    TransformerLens bridge does); ``log_probs`` is then ``[prompt, cand]`` padded with ``-inf`` to
    the largest set, ``values_of`` the values (0 padded).
    """

    sets: dict = field(default_factory=dict)
    derive: Callable[[list], dict] | None = None
    packed: bool = True
    single_token: bool = False
    own: dict = field(default_factory=dict)

    @staticmethod
    def keys(batch: TokenBatch) -> list[tuple[int, ...]]:
        lengths = batch.attention_mask.sum(-1).tolist()
        tokens = batch.tokens.tolist()
        return [tuple(t[:n]) for t, n in zip(tokens, lengths)]

    def of(self, batch: TokenBatch) -> list[CandidateAnswers]:
        """The candidate set of every prompt of ``batch`` (deriving the missing ones)."""
        keys = self.keys(batch)
        self.derive_own(k for k in keys if k not in self.sets)
        return [self.sets.get(k) or self.own[k] for k in keys]

    def derive_own(self, keys) -> None:
        """Derive the own answers of those ``keys`` that have none yet."""
        missing = list(dict.fromkeys(k for k in keys if k not in self.own))
        if missing:
            if self.derive is None:
                raise KeyError(f"{len(missing)} prompts have no candidate answers and there is no derive function")
            self.own.update(self.derive(missing))

    def expand(self, batch: TokenBatch) -> RowCandidateBatch:
        cands = self.of(batch)
        tries = [c._trie for c in cands]
        device = batch.tokens.device
        n_nodes = torch.tensor([len(t.tokens) for t in tries], device=device)
        tokens = _padded([t.tokens for t in tries], 0, 1).to(device)
        depth = _padded([t.depth for t in tries], 1, 1).to(device)
        sees = _padded([t.sees for t in tries], False, 2).to(device)
        lengths = batch.lengths
        width = int((lengths + n_nodes).max())
        n_max = tokens.shape[1]
        positions = torch.arange(width, device=device)
        node = positions[None, :] - lengths[:, None]
        in_trie = (node >= 0) & (node < n_nodes[:, None])
        node_c = node.clamp(0, n_max - 1)
        rows = torch.arange(len(batch), device=device)
        out = torch.full((len(batch), width), pad_token_id_of(batch), dtype=torch.long, device=device)
        out[:, : min(width, batch.tokens.shape[1])] = batch.tokens[:, :width]
        out = torch.where(in_trie, tokens[rows[:, None], node_c], out)
        position_ids = torch.where(in_trie, lengths[:, None] - 1 + depth[rows[:, None], node_c], positions[None, :])
        causal = positions[None, :, None] >= positions[None, None, :]
        both = in_trie[:, :, None] & in_trie[:, None, :]
        seen = sees[rows[:, None, None], node_c[:, :, None], node_c[:, None, :]]
        read_pos = (lengths[:, None] - 1 + torch.arange(n_max + 1, device=device)).clamp(max=width - 1)
        answers = [torch.tensor(c.answer_tokens if c.answer_tokens else (), dtype=torch.long) for c in cands]
        return RowCandidateBatch(
            tokens=out,
            attention_mask=(positions[None, :] < (lengths + n_nodes)[:, None]).long(),
            answer_pos=lengths - 1,
            position_ids=position_ids,
            key_mask=causal & (~both | seen),
            read_pos=read_pos,
            cand_read=_padded([t.read for t in tries], 0, 2).to(device),
            cand_ids=_padded([t.cand_tokens for t in tries], -1, 2).to(device),
            end_read=_padded([t.end_read for t in tries], 0, 1).to(device),
            end_cand=_padded([t.end_cand for t in tries], 0, 1).to(device),
            end_ids=_padded([t.end_tokens for t in tries], -1, 1).to(device),
            cand_valid=_padded([torch.ones(len(c.token_ids), dtype=torch.bool) for c in cands], False, 1).to(device),
            values=_padded([torch.tensor(c.values, dtype=torch.float64) for c in cands], 0.0, 1).to(device),
            answer_ids=_padded(answers, -1, 1).to(device),
        )

    def read_positions(self, batch: TokenBatch) -> Int[Tensor, "row n"]:
        if not isinstance(batch, RowCandidateBatch):
            raise TypeError("run the model on metric.expand(batch)")
        return batch.read_pos

    def log_probs_at(self, logits: Float[Tensor, "row n vocab"], batch: TokenBatch) -> Float[Tensor, "prompt cand"]:
        if not isinstance(batch, RowCandidateBatch):
            raise TypeError("run the model on metric.expand(batch)")
        logits = logits.float()
        lse = log_normalizer(logits)  # row n
        rows = torch.arange(logits.shape[0], device=logits.device)[:, None, None]
        read, ids = batch.cand_read.to(logits.device), batch.cand_ids.to(logits.device)
        token_logp = logits[rows, read, ids.clamp(min=0)] - lse[rows, read]  # row cand k
        total = (token_logp * (ids >= 0)).sum(-1)
        owner, end_ids = batch.end_cand.to(logits.device), batch.end_ids.to(logits.device)
        at = batch.end_read.to(logits.device).gather(1, owner)  # row stop
        end_logp = logits[rows[..., 0], at, end_ids.clamp(min=0)] - lse.gather(1, at)
        total = total + _stop_pairs(end_logp, owner, total.shape[-1], end_ids >= 0)
        return torch.where(batch.cand_valid.to(logits.device), total, torch.full_like(total, float("-inf")))

    def log_probs(self, logits: Float[Tensor, "row pos vocab"], batch: TokenBatch) -> Float[Tensor, "prompt cand"]:
        rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
        return self.log_probs_at(logits[rows, self.read_positions(batch).to(logits.device)], batch)

    def other_log_prob_at(self, logits: Float[Tensor, "row n vocab"], batch: TokenBatch) -> Float[Tensor, "prompt"]:
        """log P(the reply starts with none of each prompt's answer tokens)."""
        first = logits[:, 0].float()
        ids = batch.answer_ids.to(first.device)
        logp = first.gather(-1, ids.clamp(min=0)) - first.logsumexp(-1, keepdim=True)
        return _stop(logp, ids >= 0)

    def score(self, model: HookedModel, batch: TokenBatch, *, other: bool = False):
        """Per prompt, the exact log-probability of each of its candidates (``-inf`` padded), with
        the packed batch they were read on: ``(log_probs, expanded)``, or with ``other``
        ``(log_probs, other_log_prob, expanded)``."""
        expanded = self.expand(batch)
        logits = logits_at(model, expanded, self.read_positions(expanded))
        logp = self.log_probs_at(logits, expanded)
        return (logp, self.other_log_prob_at(logits, expanded), expanded) if other else (logp, expanded)

    def values_of(self, batch: TokenBatch) -> Float[Tensor, "prompt cand"]:
        if not isinstance(batch, RowCandidateBatch):
            raise TypeError("run the model on metric.expand(batch)")
        return batch.values

    def distribution(self, logits, batch) -> Float[Tensor, "prompt cand"]:
        return self.log_probs(logits, batch).softmax(-1)

    def grid_mass(self, logits, batch) -> Float[Tensor, "prompt"]:
        return self.log_probs(logits, batch).logsumexp(-1).exp()


def _log_none(total: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """log(1 - total): the log-probability that none of the tokens whose probabilities sum to ``total``
    comes next. Differentiable everywhere (no infinities in the graph); clamped where the sum is 1."""
    return torch.log1p(-total.clamp(max=1 - 1e-6))


def _stop(logp: Float[Tensor, "... m"], valid: Bool[Tensor, "... m"]) -> Float[Tensor, "..."]:
    """``_log_none`` of the sum of the valid probabilities."""
    return _log_none((logp.exp() * valid).sum(-1))


def _stop_pairs(
    logp: Float[Tensor, "*row stop"], owner: Int[Tensor, "*row stop"] | Int[Tensor, "stop"], n_owners: int,
    valid: Bool[Tensor, "*row stop"] | None = None,
) -> Float[Tensor, "*row cand"]:
    """``_log_none`` per owner of the summed probabilities of its (valid) pairs: the stop terms of
    candidates from flat (candidate, continuing token) pairs."""
    mass = logp.exp() if valid is None else logp.exp() * valid
    total = mass.new_zeros(*mass.shape[:-1], n_owners).scatter_add(-1, owner.expand_as(mass), mass)
    return _log_none(total)


def logits_at(
    model: HookedModel, batch: TokenBatch, positions: Int[Tensor, "row n"]
) -> Float[Tensor, "row n vocab"]:
    """Next-token logits at the given positions only.

    The transformer body runs once; the final norm and the unembedding (for a 49k vocabulary the
    largest single cost of a small model's forward) run only where logits are read. Hooks that
    are active around the call apply to the body as usual.
    """
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with capturing(model, [last], stop=True) as captured:
        model(batch.tokens, **batch.forward_kwargs())
    resid = captured[last][0]
    rows = torch.arange(resid.shape[0], device=resid.device)[:, None]
    picked = resid[rows, positions.to(resid.device)]
    return model.unembed(model.ln_final(picked))


def takes_layout(model: HookedModel) -> bool:
    """Whether ``model`` runs a batch's own layout (4-D ``attention_mask`` and ``position_ids``
    keywords): the TransformerLens bridge does, a legacy ``HookedTransformer`` does not."""
    return getattr(model, "original_model", None) is not None


def pad_token_id_of(batch: TokenBatch) -> int:
    """A pad id for rebuilding ``batch``: whatever it already pads with, else 0."""
    padded = batch.attention_mask == 0
    return int(batch.tokens[padded][0]) if padded.any() else 0


SUMMARIES = {"mean": lambda v: v, "log10": lambda v: torch.log10(1 + v.clamp(min=0))}


@dataclass(frozen=True)
class ExpectedValue:
    """A differentiable summary of the model's distribution over candidate answers, renormalized
    over the candidates: ``summary="mean"`` the expected value, ``"log10"`` the expected
    ``log10(1 + value)`` (negative values count as 0), which suits heavy-tailed amounts."""

    candidates: CandidateAnswers | PromptCandidates
    summary: str = "mean"

    def __post_init__(self):
        if self.summary not in SUMMARIES:
            raise ValueError(f"unknown summary {self.summary!r}; choose from {list(SUMMARIES)}")

    def expand(self, batch: TokenBatch) -> TokenBatch:
        return self.candidates.expand(batch)

    def logit_positions(self, batch: TokenBatch) -> Int[Tensor, "entry"]:
        """The positions of the expanded batch whose logits are read (along the candidates)."""
        return self.candidates.read_positions(batch).unique()

    def __call__(self, logits, batch):
        return self._expect(self.candidates.distribution(logits, batch), batch)

    def evaluate(self, model: HookedModel, batch: TokenBatch) -> Float[Tensor, "prompt"]:
        """Per-prompt value straight from the model, unembedding only the positions read."""
        expanded = self.candidates.expand(batch)
        logits = logits_at(model, expanded, self.candidates.read_positions(expanded))
        return self._expect(self.candidates.log_probs_at(logits, expanded).softmax(-1), expanded)

    def _expect(self, probs: Float[Tensor, "prompt cand"], batch: TokenBatch) -> Float[Tensor, "prompt"]:
        values = self.candidates.values_of(batch).to(device=probs.device, dtype=probs.dtype)
        return (probs * SUMMARIES[self.summary](values)).sum(-1)


def run_metric(model: HookedModel, metric: Metric, batch: TokenBatch, **kwargs) -> Float[Tensor, "prompt"]:
    """Run ``model`` on the metric's expansion of ``batch`` and return per-prompt values."""
    if isinstance(metric, ExpectedValue) and not kwargs:
        return metric.evaluate(model, batch)
    expanded = metric.expand(batch)
    logits = model(expanded.tokens, **expanded.forward_kwargs(), **kwargs)
    return metric(logits, expanded)


__all__ = [
    "Metric",
    "LogitDiff",
    "TokenSetProb",
    "CandidateAnswers",
    "CandidateBatch",
    "PackedCandidateBatch",
    "PromptCandidates",
    "RowCandidateBatch",
    "ExpectedValue",
    "SUMMARIES",
    "answer_logits",
    "kl_divergence",
    "kl_from_log_probs",
    "run_metric",
    "takes_layout",
    "logits_at",
    "pad_token_id",
]
