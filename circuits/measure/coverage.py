"""What share of the model's answers the metric sees, per context, stated plainly.

``grid_mass`` (per prompt, from ``circuits.measure.bias.measure``) is the probability of the answers the
metric scores; ``other_mass`` the probability that the reply does not start an answer of the
context's type at all (a word, a refusal); ``tail_mass`` numeric answers beyond the scored set;
``bounded_mass`` the part of ``grid_mass`` held by bounded answers (numbers whose leading digits fix
their value to a stated precision, valued at their midpoint: ``circuits.measure.bias.Expansion``);
``beyond_scale_mass`` the part held by numbers beyond the format's scale, read at its end (a rank of
126 in a top 100 as 100: ``AnswerFormat.on_scale``).
The audit warns (``warn_low_coverage``) about every context whose mean covered mass is below one
half: its gap would describe a minority of the model's answers.
"""
from __future__ import annotations

import warnings

import pandas as pd

from circuits.measure.bias import Measurement

LOW_COVERAGE = 0.5


def _values(values: Measurement | pd.DataFrame) -> pd.DataFrame:
    return values.values if isinstance(values, Measurement) else values


def coverage_table(values: Measurement | pd.DataFrame) -> pd.DataFrame:
    """Per context: ``covered`` (mean grid_mass), ``covered_min`` (its lowest prompt), ``other``
    (mean other_mass), ``beyond`` (mean tail_mass), ``bounded`` (mean bounded_mass, part of
    ``covered``) and ``beyond_scale`` (mean beyond_scale_mass, part of ``covered``); NaN where the
    measurement lacks the column."""
    frame = _values(values)
    parts = frame.assign(**{c: frame[c] if c in frame else float("nan")
                            for c in ("other_mass", "tail_mass", "bounded_mass", "beyond_scale_mass")})
    grouped = parts.groupby("context", sort=False)
    return pd.DataFrame({
        "answer_type": grouped["answer_type"].first(),
        "n_prompts": grouped.size(),
        "covered": grouped["grid_mass"].mean(),
        "covered_min": grouped["grid_mass"].min(),
        "other": grouped["other_mass"].mean(),
        "beyond": grouped["tail_mass"].mean(),
        "bounded": grouped["bounded_mass"].mean(),
        "beyond_scale": grouped["beyond_scale_mass"].mean(),
    }).reset_index()


def _percent(x: float) -> str:
    return f"{100 * x:.0f}%"


def coverage_statement(row) -> str:
    """One sentence: what share of the model's answers the metric sees in this context, and the rest."""
    bounded = row.get("bounded", float("nan"))
    known = f"; {_percent(bounded)} as numbers known by their leading digits" if bounded > 0 else ""
    beyond = row.get("beyond_scale", float("nan"))
    known += f"; {_percent(beyond)} outside the scale, counted at its end" if beyond > 0 else ""
    text = (f"{row['context']}: the metric sees {_percent(row['covered'])} of the model's answers "
            f"(lowest prompt {_percent(row['covered_min'])}{known})")
    rest = []
    if pd.notna(row["other"]):
        kind = "neither yes nor no" if row["answer_type"] == "yes_no" else "not a number"
        rest.append(f"{_percent(row['other'])} {kind} (a word, a refusal)")
    if pd.notna(row["beyond"]) and row["answer_type"] != "yes_no":
        rest.append(f"{_percent(row['beyond'])} numbers beyond the scored ones")
    return text + ("; unseen: " + ", ".join(rest) if rest else "")


def coverage_lines(values: Measurement | pd.DataFrame) -> list[str]:
    """``coverage_statement`` for every context of a measurement (or its values table)."""
    return [coverage_statement(row) for _, row in coverage_table(values).iterrows()]


def warn_low_coverage(values: Measurement | pd.DataFrame, threshold: float = LOW_COVERAGE) -> list[str]:
    """Warn (``UserWarning``) once per context whose mean covered mass is below ``threshold``, naming
    it; returns those contexts."""
    table = coverage_table(values)
    low = table[table["covered"] < threshold]
    for _, row in low.iterrows():
        warnings.warn(
            f"scenario {row['context']!r}: the metric covers only {_percent(row['covered'])} of the model's "
            f"answers on average (below {_percent(threshold)}), so its gap describes a minority of the "
            "answers; check that the answer_type matches what the prompt asks for and that the prompt asks "
            "for a bare answer",
            stacklevel=2,
        )
    return list(low["context"])


__all__ = ["LOW_COVERAGE", "coverage_lines", "coverage_statement", "coverage_table", "warn_low_coverage"]
