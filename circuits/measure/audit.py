"""The deterministic bias audit: measure every prompt of the chosen contexts, then the group gaps.

With an output directory the prompts are measured in chunks, each written atomically to
``<out>/chunks/<index>/`` as it finishes; a re-run with the same model, prompts and chunk size
resumes after the last complete chunk (and refuses chunks of other settings). The chunks are
removed once the final tables are written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from circuits.inputs.contexts import DETAILS
from circuits.inputs.prompts import PromptSet, build_prompts, select_prompts
from circuits.measure.bias import Expansion, GapTable, Measurement, group_gaps, measure
from circuits.measure.coverage import warn_low_coverage
from circuits.study.stages import frame_digest, settings_key
from interp.hooks import HookedModel
from interp.locking import directory_lock
from interp.results import SavedResult

CHUNKS = "chunks"


@dataclass(frozen=True, eq=False)
class AuditResult(SavedResult):
    """Per-prompt values (``measurement``) and the gap table with intervals (``gaps``).

    Saved as the measurement's tables (``values``, ``distribution``) beside ``gaps``, with the
    measurement's and the gap table's settings under ``measurement`` and ``gaps``."""

    RESULT = "AuditResult"

    measurement: Measurement
    gaps: GapTable
    settings: dict = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        """The gap table: one row per context x contrast."""
        return self.gaps.to_dataframe()

    def _tables(self) -> dict[str, pd.DataFrame]:
        return {**self.measurement._tables(), "gaps": self.gaps.table}

    def _settings(self) -> dict:
        return {**self.settings, "measurement": self.measurement.settings, "gaps": self.gaps.settings}

    @classmethod
    def _from_saved(cls, tables: dict[str, pd.DataFrame], settings: dict) -> AuditResult:
        measurement = Measurement._from_saved(tables, settings.pop("measurement"))
        return cls(measurement, GapTable(tables["gaps"], settings.pop("gaps")), settings)


def run_settings(model: HookedModel, prompts: PromptSet, **extra) -> dict:
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


def _metric_version(expansion: Expansion) -> dict:
    """What the numeric metric's answers depend on (chunks of another metric are not resumed)."""
    from dataclasses import asdict

    from circuits.inputs.contexts import DECIMALS
    from circuits.measure.bias import EXPANSION_BUDGET, EXPANSION_DEFAULT, MIN_ANSWER, MIN_MASS

    defaults = {"per_type": EXPANSION_BUDGET, "other_types": EXPANSION_DEFAULT, "floors": [MIN_MASS, MIN_ANSWER]}
    return {"answers": "per prompt", "expansion": asdict(expansion), "defaults": defaults, "decimals": DECIMALS}


def _chunk_plan(model, prompts: PromptSet, chunk_size: int, expansion: Expansion) -> dict:
    """What the chunks of an audit depend on: the model (weights, tokenizer, device, dtype), the prompts,
    the expansion and the chunk size. The batch size is left out, so a run that ran out of memory resumes
    with a smaller one."""
    from interp.models import model_fingerprint

    name = getattr(model, "model_id", None)
    weights = model_fingerprint(name) if name else {"class": type(model).__name__}
    cfg = getattr(model, "cfg", None)
    described = {"model": name, **weights, "device": str(getattr(cfg, "device", "")),
                 "dtype": str(getattr(cfg, "dtype", "")), "metric": _metric_version(expansion)}
    return {"key": settings_key(described, frame_digest(prompts.frame), chunk_size), "model": name,
            "n_prompts": len(prompts), "chunk_size": chunk_size}


def saved_progress(out_dir: str | Path) -> tuple[int, int]:
    """``(prompts in complete chunks, prompts in the audit)`` of a partial audit in ``out_dir``; (0, 0) if none."""
    folder = Path(out_dir) / CHUNKS
    try:
        plan = json.loads((folder / "plan.json").read_text())
    except (OSError, ValueError):
        return 0, 0
    n, size = plan["n_prompts"], plan["chunk_size"]
    done = sum(min(size, n - int(p.name) * size) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())
    return done, n


def _measure_chunks(model, prompts: PromptSet, *, chunk_size: int, batch_size: int, expansion: Expansion,
                    keep_answers: bool, folder: Path | None, plan: dict | None, progress: bool) -> Measurement:
    """``measure`` over consecutive chunks of ``prompts``, each kept in ``folder`` (when given) as it finishes."""
    ids = prompts.frame["prompt_id"].tolist()
    spans = [(i, min(i + chunk_size, len(ids))) for i in range(0, len(ids), chunk_size)]
    done = set()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        plan_file = folder / "plan.json"
        if plan_file.exists():
            old = json.loads(plan_file.read_text())
            if old.get("key") != plan["key"]:
                raise ValueError(
                    f"{folder} holds a partial audit of other settings ({old.get('n_prompts')} prompts of model "
                    f"{old.get('model')!r} in chunks of {old.get('chunk_size')}); rerun with those settings to "
                    f"resume it, delete {folder} to start over, or give another output directory")
        else:
            plan_file.write_text(json.dumps(plan, indent=2))
        done = {int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()}
    bar = tqdm(total=len(ids), initial=sum(b - a for i, (a, b) in enumerate(spans) if i in done),
               unit="prompt", desc="audit", disable=not progress)
    parts = []
    for index, (a, b) in enumerate(spans):
        if index in done:
            continue
        part = measure(model, prompts.filter(prompt_id=ids[a:b]), batch_size=batch_size, progress=False,
                       expansion=expansion, keep_answers=keep_answers)
        if folder is None:
            parts.append(part)
        else:
            tmp = folder / f".{index:05d}"
            shutil.rmtree(tmp, ignore_errors=True)
            part.save(tmp)
            os.replace(tmp, folder / f"{index:05d}")
        bar.update(b - a)
    bar.close()
    if folder is not None:  # every chunk read back alike, once measuring is over and its memory is free again
        parts = [Measurement.load(folder / f"{index:05d}") for index in range(len(spans))]
    values = pd.concat([p.values for p in parts], ignore_index=True)
    distribution = pd.concat([p.distribution for p in parts], ignore_index=True)
    return Measurement(values, distribution, {**parts[0].settings, "n_prompts": len(values),
                                              "chunk_size": chunk_size})


def run_audit(
    model: HookedModel,
    contexts: Sequence[str] | None = None,
    prompts: PromptSet | None = None,
    *,
    out_dir: str | Path | None = None,
    details: Sequence[str] = DETAILS,
    variations: int | None = None,
    names_per_cell: int | None = None,
    batch_size: int = 32,
    chunk_size: int = 100,
    expansion: Expansion = Expansion(),
    keep_answers: bool = False,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> AuditResult:
    """Measure the chosen contexts (all by default) or an imported ``prompts`` set; gaps per context.

    ``model`` is a loaded model or a name/path for ``interp.load_model``. ``variations`` and
    ``names_per_cell`` take a ``select_prompts`` subset (per context; per group x gender cell) to bound the
    cost. Prompts are measured ``chunk_size`` at a time with a progress bar (ETA, with ``progress``) over prompts. With
    ``out_dir`` each chunk is kept as it finishes, a re-run resumes after the last complete one, and
    the result is written there (see ``AuditResult.save``); one run at a time holds ``out_dir``.
    ``expansion`` bounds each prompt's number tree (default: each answer type's budget). With
    ``keep_answers`` the prompts' own answers stay in the model's answer cache for a later metric on
    the same prompts (``measure``; about 200 KB per numeric prompt); by default an audit's memory does
    not grow with its prompts beyond the result tables.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
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
        prompts = select_prompts(prompts, variations=variations, names_per_cell=names_per_cell, seed=seed)
    settings = dict(chunk_size=chunk_size, batch_size=batch_size, expansion=expansion, keep_answers=keep_answers,
                    n_resamples=n_resamples, confidence=confidence, seed=seed, variations=variations,
                    names_per_cell=names_per_cell, progress=progress)
    if out_dir is None:
        return _audit(model, prompts, None, **settings)
    with directory_lock(out_dir, "running an audit"):
        return _audit(model, prompts, Path(out_dir), **settings)


def _audit(model, prompts, out: Path | None, *, chunk_size, batch_size, expansion, keep_answers, n_resamples,
           confidence, seed, variations, names_per_cell, progress) -> AuditResult:
    folder = None if out is None else out / CHUNKS
    plan = None if out is None else _chunk_plan(model, prompts, chunk_size, expansion)
    measurement = _measure_chunks(model, prompts, chunk_size=chunk_size, batch_size=batch_size, expansion=expansion,
                                  keep_answers=keep_answers, folder=folder, plan=plan, progress=progress)
    warn_low_coverage(measurement)
    gaps = group_gaps(measurement, n_resamples=n_resamples, confidence=confidence, seed=seed)
    settings = run_settings(model, prompts, variations=variations, names_per_cell=names_per_cell,
                            n_names=int(prompts.frame["name"].nunique()), seed=seed, chunk_size=chunk_size)
    result = AuditResult(measurement, gaps, settings)
    if out is not None:
        result.save(out)
        shutil.rmtree(folder)
    return result


__all__ = ["AuditResult", "run_audit", "saved_progress"]
