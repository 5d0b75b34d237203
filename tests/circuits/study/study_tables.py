"""The tiny-model study's results as long tables, for the test that refactoring leaves them unchanged.

``python -m tests.circuits.study.study_tables OUT`` runs ``tests.circuits.study.test_study.tiny_config``
into a temporary directory and writes every table to ``OUT`` (the reference in ``tests/data/study_tables``,
written by the code before the architecture change and regenerated only when results are meant to
change, saying so in the commit).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pandas as pd

REFERENCE = Path(__file__).parents[2] / "data" / "study_tables"


def study_tables(out_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Every result table of a finished study, by name, read through the public loaders."""
    from circuits.evaluate.analysis import load_overlap_tables
    from circuits.evaluate.generalization import Generalization
    from circuits.measure.audit import AuditResult
    from circuits.select.scoring import ContextScores

    stages = Path(out_dir) / "stages"
    audit = AuditResult.load(stages / "audit")
    tables = {"audit_gaps": audit.to_dataframe(), "audit_values": audit.measurement.to_dataframe()}
    for path in sorted(stages.glob("scores-*")):
        scores = ContextScores.load(path)
        tables[path.name] = scores.to_dataframe()
        if scores.refined is not None:
            tables[f"{path.name}-refined"] = scores.refined.reset_index(drop=True)
    generalization = Generalization.load(stages / "generalization")
    tables["generalization"] = generalization.to_dataframe()
    if generalization.nulls is not None:
        tables["nulls"] = generalization.nulls.reset_index(drop=True)
    for name, table in load_overlap_tables(stages / "overlap").items():
        tables[f"overlap-{name}"] = table
    return tables


def main(out: str) -> None:
    from circuits.study.runner import run_study
    from tests.circuits.study.test_study import tiny_config

    with tempfile.TemporaryDirectory() as tmp:
        run_study(tiny_config(tmp))
        target = Path(out)
        target.mkdir(parents=True, exist_ok=True)
        for name, table in study_tables(tmp).items():
            table.to_parquet(target / f"{name}.parquet", index=False)


if __name__ == "__main__":
    main(sys.argv[1])
