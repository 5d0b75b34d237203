"""Sampled answers, for parity with the papers' metric (parsed answers of sampled generations).

Generation runs through the bridge's own forward (``model(tokens)``), one full forward per new
token and no KV cache, so every hook attached around the call (an ablation context included) acts
at every step. Each prompt is repeated ``n_samples`` times; rows are right-padded and each row
samples at its own last position. Every (prompt, sample) row draws from its own generator, seeded
from ``(seed, prompt index, sample index)``, so the samples do not depend on ``batch_size``.

A row stops at a special token (end of sequence / end of turn, not kept in the text), at the first
newline after some non-blank text (the text is cut there), or after ``max_new_tokens`` tokens.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from circuits.parsing import parse_number, parse_yes_no
from circuits.stats import mann_whitney, smd
from interp.batching import encode, microbatches, pad_token_id

AnswerType = Literal["number", "yes_no"]


def parse_answer(text: str, answer_type: AnswerType) -> float:
    """The numeric value of a reply (yes = 1, no = 0 for ``yes_no``); NaN when it cannot be read."""
    if answer_type == "number":
        value = parse_number(text)
    elif answer_type == "yes_no":
        verdict = parse_yes_no(text)
        value = None if verdict is None else float(verdict)
    else:
        raise ValueError(f"answer_type must be 'number' or 'yes_no', got {answer_type!r}")
    return float("nan") if value is None else float(value)


@dataclass(frozen=True, eq=False)
class SampledAnswers:
    """Sampled replies to each prompt: ``texts[p][s]`` and parsed ``values[p, s]`` (NaN = invalid)."""

    prompts: tuple[str, ...]
    texts: tuple[tuple[str, ...], ...]
    values: Float[np.ndarray, "prompt sample"]
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        values = np.array(self.values, dtype=float)
        n_prompts = len(self.prompts)
        if values.ndim != 2 or values.shape[0] != n_prompts or len(self.texts) != n_prompts or any(
            len(row) != values.shape[1] for row in self.texts
        ):
            raise ValueError(f"values of shape {values.shape} and texts of lengths {[len(r) for r in self.texts]} "
                             f"must both be {n_prompts} prompts x n_samples")
        values.flags.writeable = False
        object.__setattr__(self, "values", values)

    @property
    def n_samples(self) -> int:
        return self.values.shape[1]

    @property
    def valid(self) -> np.ndarray:
        return ~np.isnan(self.values)

    @property
    def invalid_rate(self) -> float:
        """Share of all samples whose reply could not be parsed."""
        return float(1 - self.valid.mean()) if self.values.size else float("nan")

    def to_dataframe(self) -> pd.DataFrame:
        """One row per sample: prompt_id, sample, text, value, valid."""
        n_prompts, n_samples = self.values.shape
        return pd.DataFrame({
            "prompt_id": np.repeat(np.arange(n_prompts), n_samples),
            "sample": np.tile(np.arange(n_samples), n_prompts),
            "text": [text for row in self.texts for text in row],
            "value": self.values.ravel(),
            "valid": self.valid.ravel(),
        })

    def save(self, directory: str | Path) -> Path:
        """Write answers.parquet, prompts.parquet and settings.json into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_dataframe().to_parquet(directory / "answers.parquet", index=False)
        pd.DataFrame({"prompt_id": range(len(self.prompts)), "prompt": list(self.prompts)}).to_parquet(
            directory / "prompts.parquet", index=False)
        (directory / "settings.json").write_text(json.dumps(self.settings, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SampledAnswers:
        directory = Path(directory)
        missing = [n for n in ("answers.parquet", "prompts.parquet", "settings.json") if not (directory / n).exists()]
        if missing:
            raise FileNotFoundError(f"{directory} is not a saved SampledAnswers: {missing} missing")
        prompts = pd.read_parquet(directory / "prompts.parquet").sort_values("prompt_id")
        answers = pd.read_parquet(directory / "answers.parquet").sort_values(["prompt_id", "sample"])
        n_prompts, n_samples = len(prompts), int(answers["sample"].max()) + 1 if len(answers) else 0
        texts = answers["text"].to_numpy().reshape(n_prompts, n_samples)
        return cls(
            prompts=tuple(prompts["prompt"]),
            texts=tuple(tuple(row) for row in texts),
            values=answers["value"].to_numpy().reshape(n_prompts, n_samples),
            settings=json.loads((directory / "settings.json").read_text()),
        )


def _row_generator(seed: int, prompt: int, sample: int, device: torch.device) -> torch.Generator:
    state = np.random.SeedSequence([seed, prompt, sample]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


def _next_tokens(
    last_logits: Float[Tensor, "row vocab"], temperature: float, generators: Sequence[torch.Generator]
) -> Int[Tensor, "row"]:
    if temperature == 0:
        return last_logits.argmax(-1)
    probs = torch.softmax(last_logits.float() / temperature, dim=-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


@torch.no_grad()
def _generate_rows(
    model,
    prompt_ids: Sequence[list[int]],
    generators: Sequence[torch.Generator],
    *,
    temperature: float,
    max_new_tokens: int,
    stop_ids: set[int],
) -> list[str]:
    """Sampled continuations of a microbatch of token-id prompts, one text per row."""
    device = torch.device(model.cfg.device)
    n_rows = len(prompt_ids)
    lengths = torch.tensor([len(ids) for ids in prompt_ids], dtype=torch.long)
    tokens = torch.full((n_rows, int(lengths.max()) + max_new_tokens), pad_token_id(model.tokenizer),
                        dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    generated: list[list[int]] = [[] for _ in range(n_rows)]
    texts = [""] * n_rows
    active = list(range(n_rows))
    for _ in range(max_new_tokens):
        width = int(lengths[active].max())
        logits = model(tokens[active, :width].to(device))
        rows = torch.arange(len(active), device=logits.device)
        last = logits[rows, (lengths[active] - 1).to(logits.device)]
        chosen = _next_tokens(last, temperature, [generators[r] for r in active]).tolist()
        still_active = []
        for row, token in zip(active, chosen):
            if token in stop_ids:
                continue
            generated[row].append(token)
            tokens[row, lengths[row]] = token
            lengths[row] += 1
            text = model.tokenizer.decode(generated[row])
            body = text.lstrip()
            if "\n" in body:
                texts[row] = text[: len(text) - len(body) + body.index("\n")]
                continue
            texts[row] = text
            still_active.append(row)
        active = still_active
        if not active:
            break
    return texts


def sample_answers(
    model,
    prompts: Sequence[str],
    *,
    n_samples: int = 10,
    temperature: float = 0.6,
    max_new_tokens: int = 12,
    seed: int = 0,
    batch_size: int = 16,
    answer_type: AnswerType = "number",
    progress: bool = True,
) -> SampledAnswers:
    """Sample ``n_samples`` replies per prompt through the model's own forward and parse them.

    ``prompts`` are fed verbatim (a chat template and an answer prefix included, if present); a BOS
    is prepended per the model's default. ``temperature=0`` is greedy decoding. ``batch_size``
    counts rows (prompt x sample) per forward.
    """
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("prompts must be a non-empty sequence of strings (wrap a single prompt in a list)")
    if n_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"n_samples, max_new_tokens and batch_size must be >= 1; got {n_samples}, "
                         f"{max_new_tokens}, {batch_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if answer_type not in ("number", "yes_no"):
        raise ValueError(f"answer_type must be 'number' or 'yes_no', got {answer_type!r}")
    encoded = [encode(model, p) for p in prompts]
    longest = max(len(ids) for ids in encoded)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and longest + max_new_tokens > n_ctx:
        raise ValueError(f"the longest prompt has {longest} tokens; with max_new_tokens={max_new_tokens} it "
                         f"exceeds the model's context of {n_ctx}; shorten the prompt or generate fewer tokens")
    tokenizer = model.tokenizer
    stop_ids = (set(tokenizer.all_special_ids) | {tokenizer.eos_token_id}) - {None}
    device = torch.device(model.cfg.device)
    grid = [(p, s) for p in range(len(prompts)) for s in range(n_samples)]
    texts: list[str] = []
    for part in tqdm(list(microbatches(len(grid), batch_size)), desc="sampling", disable=not progress):
        rows = grid[part]
        texts += _generate_rows(
            model,
            [encoded[p] for p, _ in rows],
            [_row_generator(seed, p, s, device) for p, s in rows],
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
        )
    by_prompt = [tuple(texts[p * n_samples:(p + 1) * n_samples]) for p in range(len(prompts))]
    values = np.array([[parse_answer(t, answer_type) for t in row] for row in by_prompt], dtype=float)
    settings = {
        "model": str(getattr(model.cfg, "model_name", "")), "n_samples": n_samples, "temperature": temperature,
        "max_new_tokens": max_new_tokens, "seed": seed, "answer_type": answer_type,
    }
    return SampledAnswers(tuple(prompts), tuple(by_prompt), values, settings)


@dataclass(frozen=True)
class SampledGap:
    """The gap between two groups' sampled answers: SMD (a minus b), Mann-Whitney U, means, counts."""

    smd: float
    mann_whitney_u: float
    p_value: float
    mean_a: float
    mean_b: float
    n_a: int
    n_b: int
    invalid_share_a: float
    invalid_share_b: float

    def to_dataframe(self) -> pd.DataFrame:
        """One row holding every field, so gaps of many contexts concatenate into one table."""
        return pd.DataFrame([asdict(self)])


def _valid_part(values, what: str) -> tuple[np.ndarray, float]:
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size == 0:
        raise ValueError(f"{what} holds no samples")
    valid = arr[~np.isnan(arr)]
    return valid, 1 - valid.size / arr.size


def sampled_gap(values_a, values_b) -> SampledGap:
    """Compare two groups' sampled values (any shape, NaN = invalid reply, dropped and counted)."""
    a, invalid_a = _valid_part(values_a, "values_a")
    b, invalid_b = _valid_part(values_b, "values_b")
    u, p = mann_whitney(a, b)
    return SampledGap(
        smd=smd(a, b),
        mann_whitney_u=u,
        p_value=p,
        mean_a=float(a.mean()) if a.size else float("nan"),
        mean_b=float(b.mean()) if b.size else float("nan"),
        n_a=int(a.size),
        n_b=int(b.size),
        invalid_share_a=invalid_a,
        invalid_share_b=invalid_b,
    )


__all__ = ["AnswerType", "SampledAnswers", "SampledGap", "parse_answer", "sample_answers", "sampled_gap"]
