"""Sampled answers, for parity with the papers' metric (parsed answers of sampled generations).

Generation needs no hooks of its own: it runs ``generate`` on the bridge's underlying Hugging Face
model (``model.original_model``) with its KV cache, batched over left-padded prompts. Each batch
holds a few prompts, each repeated for its samples: the prompts are read once (all but their last
token, "prefill"), the cache is repeated per sample, and ``generate`` continues from it (inside
``interp.patching._attention_reads_cache``, without which the bridge's attention drops the cache). Hooks
attached to the bridge (an ablation context, say) still act, since the bridge's hook points wrap the
Hugging Face modules. Sampling is plain: temperature scaling only, no top-k/top-p truncation.
Each batch is seeded from ``(seed, first prompt, first sample)`` under a forked torch RNG, so the
result is deterministic for given arguments (``batch_size`` included) and leaves the global RNG alone.

A row stops at a special token (end of sequence / end of turn, not kept in the text), at the first
newline after some non-blank text (the text is cut there), or after ``max_new_tokens`` tokens.
Beside each reply's text, ``token_ids`` keeps its generated tokens up to and including the token that
stopped it (a special token, or the one holding the newline); a reply cut by ``max_new_tokens``
keeps all of them. So a reply can be read token by token, as the deterministic metric reads answers.
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
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from circuits.parsing import parse_number, parse_yes_no
from circuits.stats import mann_whitney, smd
from interp.batching import encode, pad_token_id
from interp.patching import _attention_reads_cache

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
    """Sampled replies to each prompt: ``texts[p][s]`` and parsed ``values[p, s]`` (NaN = invalid);
    ``token_ids[p][s]``, when given, the reply's generated tokens (see the module docstring)."""

    prompts: tuple[str, ...]
    texts: tuple[tuple[str, ...], ...]
    values: Float[np.ndarray, "prompt sample"]
    settings: dict = field(default_factory=dict)
    token_ids: tuple[tuple[tuple[int, ...], ...], ...] | None = None

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
        if self.token_ids is not None:
            if len(self.token_ids) != n_prompts or any(len(row) != values.shape[1] for row in self.token_ids):
                raise ValueError(f"token_ids must be {n_prompts} prompts x {values.shape[1]} samples")
            object.__setattr__(self, "token_ids", tuple(tuple(tuple(int(t) for t in ids) for ids in row)
                                                        for row in self.token_ids))

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
        """One row per sample: prompt_id, sample, text, value, valid and, when kept, ``token_ids``
        (the reply's tokens as space-separated ids)."""
        n_prompts, n_samples = self.values.shape
        frame = pd.DataFrame({
            "prompt_id": np.repeat(np.arange(n_prompts), n_samples),
            "sample": np.tile(np.arange(n_samples), n_prompts),
            "text": [text for row in self.texts for text in row],
            "value": self.values.ravel(),
            "valid": self.valid.ravel(),
        })
        if self.token_ids is not None:
            frame["token_ids"] = [format_ids(ids) for row in self.token_ids for ids in row]
        return frame

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
        ids = None
        if "token_ids" in answers:
            flat = [parse_ids(t) for t in answers["token_ids"]]
            ids = tuple(tuple(flat[p * n_samples:(p + 1) * n_samples]) for p in range(n_prompts))
        return cls(
            prompts=tuple(prompts["prompt"]),
            texts=tuple(tuple(row) for row in texts),
            values=answers["value"].to_numpy().reshape(n_prompts, n_samples),
            settings=json.loads((directory / "settings.json").read_text()),
            token_ids=ids,
        )


def format_ids(ids: Sequence[int]) -> str:
    """Token ids as one string (``"12 7 0"``), the form the saved tables keep."""
    return " ".join(str(int(i)) for i in ids)


def parse_ids(text: str) -> tuple[int, ...]:
    """The inverse of ``format_ids``."""
    return tuple(int(i) for i in text.split())


class _LineEnded(StoppingCriteria):
    """Stops a row once its reply holds a newline after some non-blank text."""

    def __init__(self, tokenizer, start: int):
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: Int[Tensor, "row pos"], scores, **kwargs) -> Bool[Tensor, "row"]:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], device=input_ids.device)


def reply_ids(tokenizer, new_ids: Sequence[int], stop_ids: set[int]) -> tuple[int, ...]:
    """A generated row's tokens up to and including the one that stopped it: the first stop token or
    the first token completing a newline after some non-blank text (all of them if neither)."""
    ids = [int(t) for t in new_ids]
    for i, t in enumerate(ids):
        if t in stop_ids:
            return tuple(ids[: i + 1])
        if "\n" in tokenizer.decode(ids[: i + 1]).lstrip():
            return tuple(ids[: i + 1])
    return tuple(ids)


def reply_text(tokenizer, new_ids: Sequence[int], stop_ids: set[int]) -> str:
    """The reply of one generated row: its tokens up to the first stop token, decoded, cut at the first
    newline after some non-blank text."""
    ids = list(new_ids)
    end = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    text = tokenizer.decode(ids[:end])
    body = text.lstrip()
    return text[: len(text) - len(body) + body.index("\n")] if "\n" in body else text


def _batch_seed(seed: int, prompt: int, sample: int) -> int:
    state = np.random.SeedSequence([seed, prompt, sample]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


@torch.no_grad()
def _generate_batch(
    hf, prompt_ids: Sequence[list[int]], n_samples: int, *, pad_id: int, config: GenerationConfig,
    stopping: StoppingCriteriaList | None = None,
) -> Int[Tensor, "row new"]:
    """``n_samples`` continuations of each prompt (rows prompt-major): prefill the left-padded prompts
    once, repeat their cache per sample, then ``generate`` on."""
    device = hf.device
    width = max(len(ids) for ids in prompt_ids)
    tokens = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    kwargs = {}
    if width > 1:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prefill = hf(input_ids=tokens[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                     use_cache=True)
        prefill.past_key_values.batch_repeat_interleave(n_samples)
        kwargs["cache"] = prefill.past_key_values
    out = hf.generate(input_ids=tokens.repeat_interleave(n_samples, 0),
                      attention_mask=mask.repeat_interleave(n_samples, 0), generation_config=config,
                      stopping_criteria=stopping, **kwargs)
    return out[:, width:].cpu()


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
    progress: bool = False,
) -> SampledAnswers:
    """Sample ``n_samples`` replies per prompt with the KV-cached ``generate`` of the underlying model.

    ``prompts`` are fed verbatim (a chat template and an answer prefix included, if present); a BOS
    is prepended per the model's default. ``temperature=0`` is greedy decoding. ``batch_size``
    counts rows (prompt x sample) per ``generate`` call: ``batch_size // n_samples`` prompts with
    all their samples, or one prompt's samples in chunks of ``batch_size``.
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
    hf = getattr(model, "original_model", None)
    if hf is None or not hasattr(hf, "generate"):
        raise ValueError(f"sampling needs the model's Hugging Face model as .original_model (a bridge from "
                         f"interp.load_model); {type(model).__name__} has none")
    encoded = [encode(model, p) for p in prompts]
    longest = max(len(ids) for ids in encoded)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and longest + max_new_tokens > n_ctx:
        raise ValueError(f"the longest prompt has {longest} tokens; with max_new_tokens={max_new_tokens} it "
                         f"exceeds the model's context of {n_ctx}; shorten the prompt or generate fewer tokens")
    tokenizer = model.tokenizer
    stop_ids = (set(tokenizer.all_special_ids) | {tokenizer.eos_token_id}) - {None}
    pad_id = pad_token_id(tokenizer)
    config = GenerationConfig(
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_k=0, top_p=1.0,
        max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids), pad_token_id=pad_id, use_cache=True)
    per_batch, chunk = max(1, batch_size // n_samples), min(n_samples, batch_size)
    batches = [(p, s) for p in range(0, len(prompts), per_batch) for s in range(0, n_samples, chunk)]
    texts: list[list[str]] = [[] for _ in prompts]
    kept: list[list[tuple[int, ...]]] = [[] for _ in prompts]
    device = torch.device(hf.device)
    for p, s in tqdm(batches, desc="sampling", disable=not progress):
        chosen = range(p, min(p + per_batch, len(prompts)))
        n = min(chunk, n_samples - s)
        stopping = StoppingCriteriaList([_LineEnded(tokenizer, max(len(encoded[i]) for i in chosen))])
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with rng, _attention_reads_cache(model):
            torch.manual_seed(_batch_seed(seed, p, s))
            new = _generate_batch(hf, [encoded[i] for i in chosen], n, pad_id=pad_id, config=config,
                                  stopping=stopping)
        for row, ids in enumerate(new.tolist()):
            texts[chosen[row // n]].append(reply_text(tokenizer, ids, stop_ids))
            kept[chosen[row // n]].append(reply_ids(tokenizer, ids, stop_ids))
    by_prompt = [tuple(row) for row in texts]
    values = np.array([[parse_answer(t, answer_type) for t in row] for row in by_prompt], dtype=float)
    settings = {
        "model": str(getattr(model.cfg, "model_name", "")), "n_samples": n_samples, "temperature": temperature,
        "max_new_tokens": max_new_tokens, "seed": seed, "answer_type": answer_type,
    }
    return SampledAnswers(tuple(prompts), tuple(by_prompt), values, settings, tuple(tuple(row) for row in kept))


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


__all__ = ["AnswerType", "SampledAnswers", "SampledGap", "format_ids", "parse_answer", "parse_ids", "reply_ids",
           "reply_text", "sample_answers", "sampled_gap"]
