"""The deterministic bias audit: measure every prompt of the chosen contexts, then the group gaps."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from circuits.bias import GapTable, Measurement, group_gaps, measure
from circuits.contexts import DETAILS
from circuits.prompts import PromptSet, build_prompts


@dataclass(frozen=True, eq=False)
class AuditResult:
    """Per-prompt values (``measurement``) and the gap table with intervals (``gaps``)."""

    measurement: Measurement
    gaps: GapTable
    settings: dict = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        """The gap table: one row per context x contrast."""
        return self.gaps.to_dataframe()

    def save(self, out_dir: str | Path) -> Path:
        """Write the measurement (``values.parquet``, ``distribution.parquet``, ``measurement.json``),
        ``gaps.parquet`` and ``settings.json`` (the audit's and the gap table's settings)."""
        out = self.measurement.save(out_dir)
        self.gaps.table.to_parquet(out / "gaps.parquet", index=False)
        settings = {**self.settings, "gaps": self.gaps.settings}
        (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> AuditResult:
        out = Path(out_dir)
        settings = json.loads((out / "settings.json").read_text())
        gaps = GapTable(pd.read_parquet(out / "gaps.parquet"), settings.pop("gaps", {}))
        return cls(Measurement.load(out), gaps, settings)


def run_settings(model, prompts: PromptSet, **extra) -> dict:
    """The JSON settings of a run over ``prompts``: model, contexts, detail levels, prompt count,
    time, and ``extra``."""
    return {
        "model": str(getattr(model, "model_id", type(model).__name__)),
        "contexts": prompts.contexts,
        "details": sorted(set(prompts.frame["detail"])),
        "n_prompts": len(prompts),
        **extra,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def run_audit(
    model,
    contexts: Sequence[str] | None = None,
    prompts: PromptSet | None = None,
    *,
    out_dir: str | Path | None = None,
    details: Sequence[str] = DETAILS,
    variations: int | None = None,
    names_per_cell: int | None = None,
    batch_size: int = 32,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = True,
) -> AuditResult:
    """Measure the chosen contexts (all by default) or an imported ``prompts`` set; gaps per context.

    ``model`` is a loaded model or a name/path for ``interp.load_model``. ``variations`` and
    ``names_per_cell`` take a seeded subset (per context; per group x gender cell) to bound the
    cost. With ``out_dir`` the result is also written there (see ``AuditResult.save``).
    """
    if prompts is not None and contexts is not None:
        raise ValueError("give contexts or prompts, not both: prompts already fix their contexts")
    if isinstance(model, (str, Path)):
        from interp import load_model

        model = load_model(model)
    if prompts is None:
        prompts = build_prompts(model, contexts, details=details, seed=seed)
    elif tuple(details) != DETAILS:
        prompts = prompts.filter(detail=list(details))
    if variations is not None or names_per_cell is not None:
        prompts = prompts.sample(variations=variations, names_per_cell=names_per_cell, seed=seed)
    measurement = measure(model, prompts, batch_size=batch_size, progress=progress)
    gaps = group_gaps(measurement, n_resamples=n_resamples, confidence=confidence, seed=seed)
    settings = run_settings(model, prompts, variations=variations, names_per_cell=names_per_cell,
                            n_names=int(prompts.frame["name"].nunique()), seed=seed)
    result = AuditResult(measurement, gaps, settings)
    if out_dir is not None:
        result.save(out_dir)
    return result


__all__ = ["AuditResult", "run_audit"]
