"""Names that signal race (White / Black) and gender, with their sources, and seeded name splits.

Every name is a first name plus the group's surname from the audit study (Becker for White names,
Washington for Black names), so race is signalled by first name and surname together. The table
lives in ``circuits/data/names.csv``; ``sources`` there are keys of ``SOURCES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

GROUPS = ("White", "Black")
GENDERS = ("man", "woman")
NAMES_CSV = Path(__file__).parents[1] / "data" / "names.csv"

SOURCES = {
    "salinas2024": "Salinas, Haim & Nyarko (2024), \"What's in a Name? Auditing Large Language Models "
    "for Race and Gender Bias\": the audit's 40 names (10 per race x gender)",
    "bertrand2004": 'Bertrand & Mullainathan (2004), "Are Emily and Greg More Employable than Lakisha '
    'and Jamal?", American Economic Review 94(4): the résumé names (9 per race x gender)',
    "greenwald1998": "Greenwald, McGhee & Schwartz (1998), Journal of Personality and Social Psychology "
    "74(6): the European- and African-American name stimuli of the race IAT",
}


@dataclass(frozen=True)
class Name:
    """One person's name and the groups it signals."""

    first: str
    surname: str
    group: str
    gender: str
    sources: tuple[str, ...]

    @property
    def full(self) -> str:
        return f"{self.first} {self.surname}"

    @property
    def in_audit(self) -> bool:
        return "salinas2024" in self.sources


@lru_cache(maxsize=1)
def _table() -> pd.DataFrame:
    return pd.read_csv(NAMES_CSV, dtype=str)


def all_names() -> tuple[Name, ...]:
    """Every name in the table, in table order."""
    return tuple(
        Name(r.first_name, r.surname, r.group, r.gender, tuple(r.sources.split(";")))
        for r in _table().itertuples()
    )


def names_frame(names: Sequence[Name] | None = None) -> pd.DataFrame:
    """One row per name: full name, first name, surname, group, gender, sources."""
    names = all_names() if names is None else names
    return pd.DataFrame(
        {
            "name": [n.full for n in names],
            "first_name": [n.first for n in names],
            "surname": [n.surname for n in names],
            "group": [n.group for n in names],
            "gender": [n.gender for n in names],
            "sources": [";".join(n.sources) for n in names],
        }
    )


def split_names(
    names: Sequence[Name] | pd.DataFrame, *, heldout_fraction: float = 0.25, seed: int = 0
) -> dict[str, str]:
    """Map each full name to ``"train"`` or ``"heldout"``, stratified by group x gender.

    ``names`` are ``Name`` objects or a frame with columns ``name``, ``group``, ``gender``. Within
    every group x gender cell a seeded shuffle holds out ``round(fraction * size)`` names (at least
    one, and never all, in a cell of two or more), so both splits keep every cell.
    """
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in [0, 1), got {heldout_fraction}")
    frame = names if isinstance(names, pd.DataFrame) else names_frame(names)
    rng = np.random.default_rng(seed)
    split: dict[str, str] = {}
    for _, cell in frame.drop_duplicates("name").groupby(["group", "gender"], dropna=False, sort=True):
        members = sorted(cell["name"])
        n_out = round(heldout_fraction * len(members))
        if heldout_fraction > 0 and len(members) >= 2:
            n_out = min(max(n_out, 1), len(members) - 1)
        held = set(rng.permutation(members)[:n_out])
        split.update({m: "heldout" if m in held else "train" for m in members})
    return split


def sample_names(names: Sequence[Name] | pd.DataFrame, per_cell: int, *, seed: int = 0) -> list[str]:
    """Full names of a seeded sample of ``per_cell`` names from every group x gender cell, in input order.

    ``names`` are ``Name`` objects or a frame with columns ``name``, ``group``, ``gender``.
    """
    if per_cell < 1:
        raise ValueError(f"per_cell must be at least 1, got {per_cell}")
    frame = (names if isinstance(names, pd.DataFrame) else names_frame(names)).drop_duplicates("name")
    rng = np.random.default_rng(seed)
    keep: set[str] = set()
    for _, cell in frame.groupby(["group", "gender"], dropna=False, sort=True):
        keep.update(rng.permutation(sorted(cell["name"]))[:per_cell])
    return [n for n in frame["name"] if n in keep]


def lookup(first_name: str) -> Name | None:
    """The table's entry for a first name (case-insensitive), or None."""
    wanted = first_name.strip().lower()
    return next((n for n in all_names() if n.first.lower() == wanted), None)


__all__ = [
    "GENDERS",
    "GROUPS",
    "SOURCES",
    "Name",
    "all_names",
    "lookup",
    "names_frame",
    "sample_names",
    "split_names",
]
