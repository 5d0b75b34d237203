"""Sampled answers, for parity with the papers' metric (parsed answers of sampled generations).

The replies come from ``interp.generation.generate`` (batched, KV-cached, seeded; see there how a
reply stops and which tokens it keeps); here they are parsed into values.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from jaxtyping import Float

from circuits.measure.parsing import parse_number, parse_yes_no
from interp.generation import generate
from interp.hooks import HookedModel
from interp.results import SavedResult

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
class SampledAnswers(SavedResult):
    """Sampled replies to each prompt: ``texts[p][s]`` and parsed ``values[p, s]`` (NaN = invalid);
    ``token_ids[p][s]``, when given, the reply's generated tokens (see the module docstring)."""

    RESULT = "SampledAnswers"

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

    def _tables(self) -> dict[str, pd.DataFrame]:
        """``answers`` (``to_dataframe``) and ``prompts`` (``prompt_id, prompt``)."""
        return {"answers": self.to_dataframe(),
                "prompts": pd.DataFrame({"prompt_id": range(len(self.prompts)), "prompt": list(self.prompts)})}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> SampledAnswers:
        prompts = tables["prompts"].sort_values("prompt_id")
        answers = tables["answers"].sort_values(["prompt_id", "sample"])
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
            settings=settings,
            token_ids=ids,
        )


def format_ids(ids: Sequence[int]) -> str:
    """Token ids as one string (``"12 7 0"``), the form the saved tables keep."""
    return " ".join(str(int(i)) for i in ids)


def parse_ids(text: str) -> tuple[int, ...]:
    """The inverse of ``format_ids``."""
    return tuple(int(i) for i in text.split())


def sample_answers(
    model: HookedModel, prompts: Sequence[str], *, answer_type: AnswerType = "number", **sampling
) -> SampledAnswers:
    """Replies to each prompt from ``interp.generation.generate`` (``sampling``: its keywords, such as
    ``n_samples``, ``temperature``, ``seed``), each parsed as ``answer_type``."""
    if answer_type not in ("number", "yes_no"):
        raise ValueError(f"answer_type must be 'number' or 'yes_no', got {answer_type!r}")
    replies = generate(model, prompts, **sampling)
    values = np.array([[parse_answer(t, answer_type) for t in row] for row in replies.texts], dtype=float)
    settings = {"model": str(getattr(model.cfg, "model_name", "")), **replies.settings, "answer_type": answer_type}
    return SampledAnswers(tuple(prompts), replies.texts, values, settings, replies.token_ids)


__all__ = ["AnswerType", "SampledAnswers", "format_ids", "parse_answer", "parse_ids", "sample_answers"]
