"""Counterfactual prompt sets and token-aligned name pairs (imported tables: ``circuits.inputs.tables``).

A ``PromptSet`` holds one row per (context, variation, detail level, name). Each row's
``prompt_text`` is what the model reads: for a chat model (its tokenizer has a chat template) the
question as a user turn, the assistant turn opened, then the answer prefix; for a base model the
question, a newline and the answer prefix. Either way the next tokens are the answer.

A ``PairSet`` pairs a prompt with a White name (group A, the *clean* run) with the same prompt
with a Black name (group B, the *corrupt*/counterfactual run). Every name pairs: the two rows are
aligned on the name span, the shorter name padded with invisible fillers so that every position
after the name lines up (see ``build_pairs``); the rows differ only inside the span.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor

from circuits.inputs.contexts import CONTEXTS, DETAILS, AnswerFormat, Context, get_context
from circuits.inputs.names import GROUPS, Name, all_names, sample_names, split_names
from interp.batching import TokenBatch, encode, pad_ids, pad_token_id
from interp.hooks import HookedModel
from interp.metrics import pad_token_id_of

COLUMNS = (
    "prompt_id",
    "context",
    "scenario",
    "variation",
    "detail",
    "name",
    "first_name",
    "group",
    "gender",
    "variation_split",
    "name_split",
    "answer_type",
    "sign",
    "user_text",
    "prompt_text",
)


def _tokenizer(model_or_tokenizer):
    return getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)


def uses_chat(model_or_tokenizer) -> bool:
    """Whether prompts for this model are chat-formatted (its tokenizer has a chat template)."""
    return bool(getattr(_tokenizer(model_or_tokenizer), "chat_template", None))


def format_prompt(model_or_tokenizer, user_text: str, answer_prefix: str, *, chat: bool | None = None) -> str:
    """The text the model reads: the question, then the answer prefix as the start of the answer."""
    tokenizer = _tokenizer(model_or_tokenizer)
    chat = uses_chat(tokenizer) if chat is None else chat
    if not chat:
        return f"{user_text}\n{answer_prefix}"
    opened = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
    return opened + answer_prefix


def split_variations(
    keys: Iterable[str], *, heldout_fraction: float = 1 / 3, seed: int = 0
) -> dict[str, str]:
    """Map each variation key to ``"train"`` or ``"heldout"``: a seeded draw of about ``heldout_fraction``
    of them, at least one and never all (a single variation stays in train)."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in [0, 1), got {heldout_fraction}")
    keys = sorted(set(keys))
    n_out = min(max(round(heldout_fraction * len(keys)), 1), len(keys) - 1) if heldout_fraction > 0 else 0
    held = set(np.random.default_rng(seed).permutation(keys)[:n_out])
    return {k: "heldout" if k in held else "train" for k in keys}


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple, set, frozenset, pd.Series, np.ndarray)) else [value]


@dataclass(frozen=True, eq=False)
class PromptSet:
    """Prompts, one row each, with the answer format of every context they belong to."""

    frame: pd.DataFrame
    answers: Mapping[str, AnswerFormat] = field(repr=False)
    chat: bool = True

    def __post_init__(self):
        object.__setattr__(self, "frame", self.frame.reset_index(drop=True))
        missing = [c for c in COLUMNS if c not in self.frame.columns]
        if missing:
            raise ValueError(f"a PromptSet frame needs columns {missing}")
        unknown = sorted(set(self.frame["context"]) - set(self.answers))
        if unknown:
            raise ValueError(f"contexts {unknown} have no answer format")
        if self.frame["prompt_id"].duplicated().any():
            dup = self.frame.loc[self.frame["prompt_id"].duplicated(), "prompt_id"].iloc[0]
            raise ValueError(f"prompt {dup!r} appears twice")

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def contexts(self) -> list[str]:
        return list(dict.fromkeys(self.frame["context"]))

    @property
    def texts(self) -> list[str]:
        return list(self.frame["prompt_text"])

    def to_dataframe(self) -> pd.DataFrame:
        return self.frame.copy()

    def _with(self, frame: pd.DataFrame) -> PromptSet:
        return replace(
            self, frame=frame, answers={c: self.answers[c] for c in dict.fromkeys(frame["context"])}
        )

    def filter(self, **criteria) -> PromptSet:
        """Rows whose columns match: ``filter(context="chess", detail=["low", "high"])``."""
        keep = pd.Series(True, index=self.frame.index)
        for column, wanted in criteria.items():
            if column not in self.frame.columns:
                raise ValueError(f"cannot filter on {column!r}; columns are {list(self.frame.columns)}")
            keep &= self.frame[column].isin(_as_list(wanted))
        if not keep.any():
            raise ValueError(f"no prompt matches {criteria}")
        return self._with(self.frame[keep])

    def split(self, by: str = "variation") -> tuple[PromptSet, PromptSet]:
        """``(train, heldout)`` by ``"variation"`` (held-out templates) or ``"name"`` (held-out names)."""
        if by not in ("variation", "name"):
            raise ValueError(f"split by 'variation' or 'name', got {by!r}")
        column = f"{by}_split"
        return self.filter(**{column: "train"}), self.filter(**{column: "heldout"})


def build_prompts(
    model_or_tokenizer,
    contexts: Sequence[str | Context] | None = None,
    *,
    details: Sequence[str] = DETAILS,
    names: Sequence[Name] | None = None,
    heldout_variations: float = 1 / 3,
    heldout_names: float = 0.25,
    seed: int = 0,
    chat: bool | None = None,
) -> PromptSet:
    """Every template x detail level x name of the chosen contexts (default: all registered).

    Splits are seeded and fixed before any subsetting: ``variation_split`` holds out about
    ``heldout_variations`` of each context's variations, ``name_split`` about ``heldout_names`` of
    the names in every group x gender cell.
    """
    chosen = [get_context(c) for c in (contexts if contexts is not None else list(CONTEXTS))]
    if not chosen:
        raise ValueError("choose at least one context")
    bad = [d for d in details if d not in DETAILS]
    if bad or not details:
        raise ValueError(f"unknown detail levels {bad or '(none given)'}; choose from {list(DETAILS)}")
    people = tuple(names) if names is not None else all_names()
    if not people:
        raise ValueError("choose at least one name")
    chat = uses_chat(model_or_tokenizer) if chat is None else chat
    name_split = split_names(people, heldout_fraction=heldout_names, seed=seed)
    rows = []
    for ctx in chosen:
        var_split = split_variations(ctx.variation_keys, heldout_fraction=heldout_variations, seed=seed)
        for var in ctx.variations:
            for detail in details:
                for person in people:
                    user = ctx.render(var, detail, person.full)
                    rows.append(
                        {
                            "prompt_id": f"{ctx.name}|{var.key}|{detail}|{person.full}",
                            "context": ctx.name,
                            "scenario": ctx.scenario,
                            "variation": var.key,
                            "detail": detail,
                            "name": person.full,
                            "first_name": person.first,
                            "group": person.group,
                            "gender": person.gender,
                            "variation_split": var_split[var.key],
                            "name_split": name_split[person.full],
                            "answer_type": ctx.answer.type,
                            "sign": ctx.sign,
                            "user_text": user,
                            "prompt_text": format_prompt(
                                model_or_tokenizer, user, ctx.answer.prefix, chat=chat
                            ),
                        }
                    )
    return PromptSet(pd.DataFrame(rows, columns=list(COLUMNS)), {c.name: c.answer for c in chosen}, chat)


def select_prompts(
    prompts: PromptSet,
    *,
    variations: int | None = None,
    heldout_variations: int | None = None,
    names_per_cell: int | None = None,
    per_context: int | None = None,
    seed: int = 0,
) -> PromptSet:
    """The one way to take a subset of prompts (None keeps everything of that kind).

    ``names_per_cell``: a seeded draw of that many names from every group x gender cell of each name
    split. ``variations``: per context, the first ``heldout_variations`` held-out variations (default a
    third of ``variations``, rounded down) and the first training ones, ``variations`` in all.
    ``per_context``: at most that many prompts per context, a seeded draw taking one prompt per name,
    cycling over the group x gender cells, before any name's second prompt.
    """
    if names_per_cell is not None:
        frame = prompts.frame
        prompts = prompts.filter(name=[n for split in ("train", "heldout")
                                       for n in sample_names(frame[frame["name_split"] == split], names_per_cell,
                                                             seed=seed)])
    if variations is not None:
        held = variations // 3 if heldout_variations is None else heldout_variations
        frame, keep = prompts.frame, set()
        for ctx, rows in frame.groupby("context", sort=False):
            for split, n in (("heldout", held), ("train", variations - held)):
                ordered = dict.fromkeys(rows.loc[rows["variation_split"] == split, "variation"])
                keep |= {(ctx, v) for v in list(ordered)[:n]}
        chosen = [(ctx, v) in keep for ctx, v in zip(frame["context"], frame["variation"])]
        prompts = prompts.filter(prompt_id=list(frame.loc[chosen, "prompt_id"]))
    if per_context is not None:
        if per_context < 1:
            raise ValueError(f"per_context must be at least 1, got {per_context}")
        frame = prompts.frame.assign(_draw=np.random.default_rng(seed).random(len(prompts)))
        frame["_round"] = frame.groupby(["context", "name"])["_draw"].rank(method="first")
        frame["_turn"] = frame.groupby(["context", "group", "gender", "_round"])["_draw"].rank(method="first")
        keep = frame.sort_values(["_round", "_turn", "_draw"]).groupby("context", sort=False).head(per_context)
        prompts = prompts.filter(prompt_id=list(keep["prompt_id"]))
    return prompts


# --------------------------------------------------------------------------- tokens and names


def _name_positions(model, text: str, name: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (as ``interp.batching.encode`` makes them) and the positions of ``name``."""
    tokenizer = model.tokenizer
    plain = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encode(model, text)
    shift = len(ids) - len(plain["input_ids"])
    if shift < 0 or ids[shift:] != list(plain["input_ids"]):
        raise ValueError("cannot align the tokenizer's offsets with the model's encoding of a prompt")
    spans, start = [], text.find(name)
    while start >= 0:
        spans.append((start, start + len(name)))
        start = text.find(name, start + 1)
    if not spans:
        raise ValueError(f"name {name!r} does not occur in its prompt")
    positions = [
        shift + i
        for i, (s, e) in enumerate(plain["offset_mapping"])
        if any(s < end and e > begin for begin, end in spans)
    ]
    return ids, positions


def tokenize_prompts(model: HookedModel, prompts: PromptSet) -> tuple[TokenBatch, Bool[Tensor, "row pos"]]:
    """The prompts as a right-padded batch on the model's device, and each row's name-token mask."""
    encoded = [
        _name_positions(model, t, n) for t, n in zip(prompts.frame["prompt_text"], prompts.frame["name"])
    ]
    batch = pad_ids([ids for ids, _ in encoded], pad_token_id(model.tokenizer))
    mask = torch.zeros_like(batch.tokens, dtype=torch.bool)
    for row, (_, positions) in enumerate(encoded):
        mask[row, positions] = True
    return batch.to(model.cfg.device), mask.to(model.cfg.device)


@dataclass(frozen=True, eq=False)
class PairSet:
    """Span-aligned counterfactual pairs: ``clean`` rows hold group A names, ``corrupt`` rows group B.

    ``name_mask[i]`` marks the name span of pair ``i`` (identical in both rows, as long as the
    longer name); everywhere else the two rows hold the same tokens. When any name is padded,
    ``clean`` and ``corrupt`` carry a layout (``span_layout``) that hides the fillers; run a metric
    on them through ``span_aligned(metric)``. ``cells`` counts, per context, variation, detail
    level (and gender when matched), how many A x B name combinations there were, how many align
    outside the name (``aligned``), how many of those have names of equal token length
    (``same_length``) and how many were kept.
    """

    frame: pd.DataFrame
    clean: TokenBatch
    corrupt: TokenBatch
    name_mask: Bool[Tensor, "pair pos"]
    cells: pd.DataFrame
    clean_group: str = "White"
    corrupt_group: str = "Black"

    def __len__(self) -> int:
        return len(self.frame)

    def to_dataframe(self) -> pd.DataFrame:
        return self.frame.copy()

    def coverage(self) -> pd.DataFrame:
        """Per context: A x B combinations, how many align outside the name, how many of those have
        names of equal length, how many were kept."""
        columns = [c for c in ("combinations", "aligned", "same_length", "kept") if c in self.cells]
        totals = self.cells.groupby("context", sort=False)[columns].sum()
        totals.loc["all"] = totals.sum()
        totals["aligned_fraction"] = totals["aligned"] / totals["combinations"]
        totals["kept_fraction"] = totals["kept"] / totals["combinations"]
        return totals.reset_index()


def _name_runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs of name positions as ``(start, stop)``."""
    runs: list[list[int]] = []
    for p in sorted(positions):
        if runs and p == runs[-1][1]:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return [(a, b) for a, b in runs]


def _split_at_names(ids: Sequence[int], positions: Sequence[int]) -> tuple[tuple, list[list[int]]]:
    """The prompt as its skeleton (the token runs between name occurrences) and its name runs."""
    runs = _name_runs(positions)
    skeleton, names, last = [], [], 0
    for start, stop in runs:
        skeleton.append(tuple(ids[last:start]))
        names.append(list(ids[start:stop]))
        last = stop
    skeleton.append(tuple(ids[last:]))
    return tuple(skeleton), names


def _span_aligned(skeleton: tuple, names_a: list[list[int]], names_b: list[list[int]], pad: int):
    """Both rows of a pair laid out on a common grid: each name run padded at its end with fillers
    to the longer of the two names. Returns per row (tokens, filler flags) and the name mask."""
    rows = {"a": ([], []), "b": ([], [])}
    mask: list[bool] = []
    for i, part in enumerate(skeleton):
        for tokens, fillers in rows.values():
            tokens += part
            fillers += [False] * len(part)
        mask += [False] * len(part)
        if i < len(names_a):
            width = max(len(names_a[i]), len(names_b[i]))
            for side, name in (("a", names_a[i]), ("b", names_b[i])):
                tokens, fillers = rows[side]
                tokens += name + [pad] * (width - len(name))
                fillers += [False] * len(name) + [True] * (width - len(name))
            mask += [True] * width
    return rows["a"], rows["b"], mask


def span_layout(tokens: Sequence[Sequence[int]], fillers: Sequence[Sequence[bool]], pad: int, *,
                layout: bool | None = None) -> TokenBatch:
    """A right-padded batch whose filler positions are invisible: no other position attends to a
    filler, and position ids skip them, so every real token computes what it computes in the prompt
    without fillers (``key_mask``/``position_ids``; with ``layout=None`` a plain causal batch when no
    row has a filler)."""
    batch = pad_ids([list(t) for t in tokens], pad)
    if not (any(any(f) for f in fillers) if layout is None else layout):
        return batch
    width = batch.tokens.shape[1]
    filler = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, flags in enumerate(fillers):
        filler[row, : len(flags)] = torch.tensor(list(flags), dtype=torch.bool)
    positions = torch.cumsum((~filler).long(), -1) - 1  # a filler repeats the id before it
    positions = positions.clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    own = torch.eye(width, dtype=torch.bool)
    key_mask = causal[None] & (~filler[:, None, :] | own[None])
    return replace(batch, position_ids=positions, key_mask=key_mask)


@dataclass(frozen=True)
class SpanAligned:
    """``metric`` for batches that carry their own layout (span-aligned pairs, ``span_layout``): it
    expands a batch with ``metric`` (which lays its candidates out after the last prompt position),
    then carries the batch's invisible fillers and position ids into the expanded rows. A batch
    without a layout is expanded by ``metric`` unchanged."""

    metric: object

    def expand(self, batch: TokenBatch) -> TokenBatch:
        if batch.key_mask is not None:
            self._share_answer_sets(batch)
        out = self.metric.expand(batch)
        if batch.key_mask is None:
            return out
        if len(out) % len(batch):
            raise ValueError("SpanAligned needs a metric that expands each prompt into a block of rows")
        per = len(out) // len(batch)
        device = out.tokens.device
        width, prompt_width = out.tokens.shape[1], batch.tokens.shape[1]
        rows = torch.arange(len(batch), device=device).repeat_interleave(per)
        lengths = batch.lengths.to(device)[rows]
        answer = batch.answer_pos.to(device)
        seen = batch.key_mask.to(device)[torch.arange(len(batch), device=device), answer]  # [prompt, key]
        keys = torch.arange(prompt_width, device=device)
        filler = torch.zeros((len(out), width), dtype=torch.bool, device=device)
        filler[:, :prompt_width] = (~seen & (keys[None] < answer[:, None]))[rows]
        n_fillers = filler.sum(-1)
        grid = torch.arange(width, device=device)
        base = out.position_ids.to(device) if out.position_ids is not None else grid[None].expand(len(out), -1)
        prompt_pos = torch.zeros((len(out), width), dtype=torch.long, device=device)
        prompt_pos[:, :prompt_width] = batch.position_ids.to(device)[rows]
        positions = torch.where(grid[None] < lengths[:, None], prompt_pos, base - n_fillers[:, None])
        causal = grid[None, :, None] >= grid[None, None, :]
        mask = out.key_mask.to(device) if out.key_mask is not None else causal
        mask = mask & (~filler[:, None, :] | torch.eye(width, dtype=torch.bool, device=device)[None])
        return replace(out, position_ids=positions, key_mask=mask)

    def _share_answer_sets(self, batch: TokenBatch) -> None:
        """A metric with per-prompt answers looked up by the prompt's tokens (``PromptCandidates``):
        a padded row takes the answers of its prompt without fillers."""
        candidates = getattr(self.metric, "candidates", None)
        if not (hasattr(candidates, "sets") and hasattr(candidates, "of") and hasattr(candidates, "keys")):
            return
        padded = candidates.keys(batch)
        if all(k in candidates.sets for k in padded):
            return
        answer = batch.answer_pos
        visible = batch.key_mask[torch.arange(len(batch), device=answer.device), answer].cpu()
        own = [tuple(t[: int(a) + 1][v[: int(a) + 1]].tolist())
               for t, a, v in zip(batch.tokens.cpu(), answer.cpu(), visible)]
        sets = candidates.of(pad_ids([list(k) for k in own], pad_token_id_of(batch)))
        for key, answers in zip(padded, sets):
            candidates.sets.setdefault(key, answers)

    def __call__(self, logits, batch):
        return self.metric(logits, batch)

    def __getattr__(self, name):  # candidates, summary, ...: the wrapped metric's
        if name == "metric":
            raise AttributeError(name)
        return getattr(self.metric, name)


def span_aligned(metric):
    """``SpanAligned(metric)``, not wrapped twice."""
    return metric if isinstance(metric, SpanAligned) else SpanAligned(metric)


def build_pairs(
    model: HookedModel,
    prompts: PromptSet,
    *,
    clean_group: str = "White",
    match_gender: bool = True,
    max_pairs_per_cell: int | None = None,
    seed: int = 0,
) -> PairSet:
    """Pair every group-A prompt with every group-B prompt of the same template, aligned on the name span.

    Two prompts of the same context, variation and detail level (and gender, if ``match_gender``)
    pair when their tokens outside the name are equal (the same runs of tokens between the name's
    occurrences). Names of different token lengths still pair: each occurrence of the name is
    padded at its end with *fillers* to the longer of the two names, so both rows have the same
    length and every position after the name lines up. Fillers are invisible (``span_layout``: no
    other position attends to one and position ids skip them), so each row computes exactly what
    its prompt computes without them; run a metric on such rows through ``span_aligned(metric)``.
    Patching a component at a position of the span replaces the clean row's activation there by
    the corrupt row's (a filler's, where the corrupt name is shorter); positions outside the span
    patch like for like. Of the pairs of a cell, ``max_pairs_per_cell`` are kept (a seeded sample;
    all by default).
    """
    if clean_group not in GROUPS:
        raise ValueError(f"clean_group must be one of {list(GROUPS)}, got {clean_group!r}")
    corrupt_group = next(g for g in GROUPS if g != clean_group)
    frame = prompts.frame
    encoded = [_name_positions(model, t, n) for t, n in zip(frame["prompt_text"], frame["name"])]
    parts = [_split_at_names(ids, positions) for ids, positions in encoded]
    keys = ["context", "variation", "detail"] + (["gender"] if match_gender else [])
    rng = np.random.default_rng(seed)
    pairs, cells = [], []
    for cell, rows in frame.groupby(keys, sort=False):
        a_rows = rows.index[rows["group"] == clean_group]
        b_rows = rows.index[rows["group"] == corrupt_group]
        aligned = [(a, b) for a in a_rows for b in b_rows if parts[a][0] == parts[b][0]]
        same_length = sum(len(encoded[a][0]) == len(encoded[b][0]) for a, b in aligned)
        kept = aligned
        if max_pairs_per_cell is not None and len(aligned) > max_pairs_per_cell:
            chosen = np.sort(rng.choice(len(aligned), size=max_pairs_per_cell, replace=False))
            kept = [aligned[i] for i in chosen]
        cells.append(
            dict(
                zip(keys, cell), combinations=len(a_rows) * len(b_rows), aligned=len(aligned),
                same_length=same_length, kept=len(kept),
            )
        )
        pairs.extend(kept)
    if not pairs:
        raise ValueError(
            "no counterfactual pair aligns on the name span; use more names or match_gender=False "
            "(prompts must be equal outside the name)"
        )
    pad = pad_token_id(model.tokenizer)
    rows_a, rows_b, masks = [], [], []
    for a, b in pairs:
        row_a, row_b, mask = _span_aligned(parts[a][0], parts[a][1], parts[b][1], pad)
        rows_a.append(row_a), rows_b.append(row_b), masks.append(mask)
    width = max(len(m) for m in masks)
    # both sides padded to one width, so clean and corrupt stack row by row
    layout = any(any(f) for _, f in rows_a + rows_b)  # both sides get one, or neither
    clean = span_layout([t + [pad] * (width - len(t)) for t, _ in rows_a],
                        [f + [False] * (width - len(f)) for _, f in rows_a], pad, layout=layout)
    corrupt = span_layout([t + [pad] * (width - len(t)) for t, _ in rows_b],
                          [f + [False] * (width - len(f)) for _, f in rows_b], pad, layout=layout)
    real = [len(m) for m in masks]  # the pair's length on the common grid
    clean, corrupt = (_trimmed(x, real) for x in (clean, corrupt))
    name_mask = torch.zeros_like(clean.tokens, dtype=torch.bool)
    for row, mask in enumerate(masks):
        name_mask[row, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    a_idx, b_idx = [a for a, _ in pairs], [b for _, b in pairs]
    meta = ["context", "scenario", "variation", "detail", "answer_type", "sign"]
    table = frame.loc[a_idx, meta].reset_index(drop=True)
    for side, idx in (("a", a_idx), ("b", b_idx)):
        for column in ("prompt_id", "name", "gender"):
            table[f"{column}_{side}"] = frame.loc[idx, column].to_numpy()
    table["n_name_tokens"] = name_mask.sum(-1).numpy()
    for side, rows in (("a", rows_a), ("b", rows_b)):
        table[f"n_fillers_{side}"] = [sum(f) for _, f in rows]
    device = model.cfg.device
    return PairSet(
        table,
        clean.to(device),
        corrupt.to(device),
        name_mask.to(device),
        pd.DataFrame(cells),
        clean_group,
        corrupt_group,
    )


def _trimmed(batch: TokenBatch, lengths: Sequence[int]) -> TokenBatch:
    """``batch`` with each row's real length ``lengths`` (the pad beyond it out of the mask)."""
    n = torch.tensor(list(lengths), dtype=torch.long)
    grid = torch.arange(batch.tokens.shape[1])
    return replace(batch, attention_mask=(grid[None] < n[:, None]).long(), answer_pos=n - 1)


__all__ = [
    "COLUMNS",
    "PairSet",
    "PromptSet",
    "build_pairs",
    "build_prompts",
    "format_prompt",
    "select_prompts",
    "split_variations",
    "tokenize_prompts",
    "uses_chat",
]
