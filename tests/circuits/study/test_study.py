"""The study runner on the tiny model: end to end, config errors, and resuming after a kill."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from circuits.measure.audit import AuditResult
from circuits.study.config import ConfigError, StudyConfig
from circuits.study.runner import (
    ALL_FIELDS,
    MODEL_FIELDS,
    UNKEYED,
    model_key,
    rebuild_report,
    run_study,
    stage_keys,
    study_prompts,
)
from circuits.study.runner import STAGES as STAGE_SPECS
from interp.testing import tiny_model_dir

STAGES = ["audit", "scores-lending_amount", "scores-commerce_buy", "head-utility", "selection",
          "generalization", "overlap", "report"]


def tiny_config(out_dir, **overrides) -> StudyConfig:
    settings = dict(
        model=str(tiny_model_dir()), contexts=("lending_amount", "commerce_buy"), variations=3, names_per_cell=2,
        max_pairs_per_cell=1, strategies=("top_k_neurons", "top_k_heads", "fasp", "common"),
        heldout_names=False, utility_texts=4,
        neuron_ks=(5,), head_ks=(2,), fasp_alphas=(0.1,), overlap_k=10, n_null=20, batch_size=4,
        refine_top=20, refine_random=5, null_draws=2, null_levels=("L0", "names", "L1", "L2"), n_bootstrap=100,
        answer_nodes=32,  # a random model never reaches the dollars' coverage target: bound its trees
        out_dir=str(out_dir), progress=False,
    )
    return StudyConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return run_study(tiny_config(out))


def test_study_runs_every_stage_and_writes_the_report(finished_study):
    assert set(STAGES) <= set(finished_study.stages)
    assert all(rec.computed for rec in finished_study.stages.values())
    html = finished_study.report.read_text()
    for section in ("Bias audit", "Component attribution", "Bias vs sparsity", "Generalization",
                    "Overlap across contexts", "Shared vs context-specific", "Utility cost"):
        assert section in html
    manifest = json.loads((finished_study.out_dir / "manifest.json").read_text())
    assert manifest["model"]["weights"] and manifest["packages"]["torch"] and manifest["seed"] == 0
    frame = pd.read_parquet(finished_study.out_dir / "stages/generalization/generalization.parquet")
    assert {"L0", "L1", "L2"} <= set(frame["level"])
    assert frame.loc[frame["strategy"] == "none", "reduction"].eq(0).all()
    budget = AuditResult.load(finished_study.out_dir / "stages/audit").measurement.settings["budget"]
    assert {ctx: b["max_nodes"] for ctx, b in budget.items()} == {"lending_amount": 32, "commerce_buy": 32}


def test_a_bfloat16_study_runs_every_stage_like_the_float32_one(finished_study, tmp_path):
    """bfloat16 by choice: every stage, the float32 study's columns, finite endpoints, and a warning that
    its rounding is the size of the gaps. Fewer strategies, nulls and resamples than the float32 study
    (a CPU without bfloat16 units runs it several times slower), but every kind of stage."""
    with pytest.warns(RuntimeWarning, match="use float32 for findings"):
        half = run_study(tiny_config(tmp_path, dtype="bfloat16", strategies=("top_k_neurons", "fasp"), null_draws=1,
                                     null_levels=("L1",), n_bootstrap=20))
    assert set(half.stages) == set(finished_study.stages) and all(rec.computed for rec in half.stages.values())
    assert json.loads((half.out_dir / "manifest.json").read_text())["model"]["dtype"] == "torch.bfloat16"
    table = "stages/generalization/generalization.parquet"
    full, bf16 = (pd.read_parquet(study.out_dir / table) for study in (finished_study, half))
    assert list(bf16.columns) == list(full.columns)
    assert set(bf16["strategy"]) == {"none", "top_k_neurons", "fasp"} and set(bf16["level"]) == set(full["level"])
    assert np.isfinite(bf16[["gap", "delta_gap"]].to_numpy(dtype=float)).all()


def test_rerun_reuses_every_stage(finished_study):
    again = run_study(finished_study.config)
    assert not any(rec.computed for rec in again.stages.values())


def test_rebuilt_report_replaces_the_report_stage(finished_study):
    meta = finished_study.out_dir / "stages/report/stage.json"
    before = json.loads(meta.read_text())
    assert rebuild_report(finished_study.out_dir) == finished_study.report
    assert json.loads(meta.read_text())["key"] == before["key"] and finished_study.report.exists()


def test_every_config_field_is_declared():
    """A field no stage declares (the report prints them all, so it does not count) fails here."""
    declared = {f for name, stage in STAGE_SPECS.items() if name != "report" for f in stage.fields}
    undeclared = set(ALL_FIELDS) - declared - set(MODEL_FIELDS) - set(UNKEYED)
    assert not undeclared, f"declare {sorted(undeclared)} in circuits.study.runner.STAGES (or UNKEYED)"
    assert declared | set(MODEL_FIELDS) | set(UNKEYED) <= set(ALL_FIELDS)
    assert set(STAGE_SPECS["report"].fields) == set(ALL_FIELDS)


SCORES = ["scores-lending_amount", "scores-commerce_buy"]
PER_CONTEXT = [*SCORES, "head-bias-lending_amount", "head-bias-commerce_buy"]
DOWNSTREAM = ["selection", "generalization", "overlap", "report"]
EVERYTHING = ["audit", *PER_CONTEXT, "head-utility", *DOWNSTREAM]
# field: (a new value, the stored stages whose key must change); every StudyConfig field is listed
CHANGES = {
    "model": (str(tiny_model_dir(seed=1)), EVERYTHING),
    "device": ("cuda", EVERYTHING),  # on a machine without CUDA the device check is faked below
    "dtype": ("bfloat16", EVERYTHING),
    "matmul_precision": ("high", EVERYTHING),
    "contexts": (("lending_amount", "commerce_buy", "chess"), ["audit", *DOWNSTREAM]),
    "details": (("low", "high"), ["audit", *PER_CONTEXT, *DOWNSTREAM]),
    "variations": (4, ["audit", *PER_CONTEXT, *DOWNSTREAM]),
    "heldout_variations": (1, ["audit", *PER_CONTEXT, *DOWNSTREAM]),
    "names_per_cell": (3, ["audit", *PER_CONTEXT, *DOWNSTREAM]),
    "heldout_name_fraction": (0.5, ["audit", *PER_CONTEXT, *DOWNSTREAM]),
    "seed": (1, ["audit", *PER_CONTEXT, *DOWNSTREAM]),
    "metric": ("other", ["audit", *PER_CONTEXT, *DOWNSTREAM]),
    "answer_nodes": (16, ["audit", *PER_CONTEXT, *DOWNSTREAM]),
    "max_pairs_per_cell": (2, [*PER_CONTEXT, *DOWNSTREAM]),
    "scoring": ("pairs", [*SCORES, *DOWNSTREAM]),
    "refine_top": (3, [*SCORES, *DOWNSTREAM]),
    "refine_random": (2, [*SCORES, *DOWNSTREAM]),
    "null_draws": (3, ["generalization", "overlap", "report"]),
    "null_levels": (("L1",), ["generalization", "overlap", "report"]),
    "n_bootstrap": (50, ["generalization", "overlap", "report"]),
    "utility_texts": (5, ["head-utility", *DOWNSTREAM]),
    "heldout_names": (True, ["generalization", "overlap", "report"]),
    "ablation": ("mean", [*PER_CONTEXT, *DOWNSTREAM]),
    "strategies": (("top_k_neurons", "top_k_heads", "fasp"), DOWNSTREAM),
    "neuron_ks": ((6,), DOWNSTREAM),
    "head_ks": ((3,), DOWNSTREAM),
    "fasp_gamma": (0.4, DOWNSTREAM),
    "fasp_alphas": ((0.2,), DOWNSTREAM),
    "wanda_fraction": (0.02, ["report"]),  # the tiny study runs no baseline strategy
    "overlap_k": (11, ["overlap", "report"]),
    "n_null": (21, ["overlap", "report"]),
    "batch_size": (2, ["report"]),
    "progress": (True, ["report"]),
    "out_dir": ("elsewhere", ["report"]),
}


_PROMPTS = {}


def _stored_keys(config, tiny_model):
    inputs = tuple(getattr(config, f) for f in STAGE_SPECS["prompts"].fields)
    if inputs not in _PROMPTS:
        _PROMPTS[inputs] = study_prompts(tiny_model, config)
    keys = stage_keys(config, model_key(config), _PROMPTS[inputs])
    return {k: v for k, v in keys.items() if not k.startswith(("prompts-", "pairs-"))}


@pytest.mark.usefixtures("unchecked")
def test_each_config_field_invalidates_exactly_its_stages(tiny_model, tmp_path, monkeypatch):
    import interp.models

    assert set(CHANGES) == set(ALL_FIELDS), "give every new config field an expectation in CHANGES"
    base = _stored_keys(tiny_config(tmp_path), tiny_model)
    assert set(base) == set(EVERYTHING)
    real_check = interp.models.check_device
    monkeypatch.setattr(interp.models, "check_device",
                        lambda d: torch.device("cuda") if d == "cuda" else real_check(d))
    for field, (value, expected) in CHANGES.items():
        config = tiny_config(value) if field == "out_dir" else tiny_config(tmp_path, **{field: value})
        changed = _stored_keys(config, tiny_model)
        recomputed = {name for name in base if changed.get(name) != base[name]}
        assert recomputed == set(expected), f"{field}: recomputes {sorted(recomputed)}"
    added = set(_stored_keys(tiny_config(tmp_path, contexts=CHANGES["contexts"][0]), tiny_model)) - set(base)
    assert added == {"scores-chess", "head-bias-chess"}


def test_replaced_weights_invalidate_every_stage(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model_dir)
    config = tiny_config(tmp_path / "out", model=str(model_dir))
    prompts = study_prompts(_Tokenizer(), config)
    before = stage_keys(config, model_key(config), prompts)
    shutil.copy(next(tiny_model_dir(seed=1).glob("*.safetensors")), next(model_dir.glob("*.safetensors")))
    after = stage_keys(config, model_key(config), prompts)
    assert not set(before.values()) & set(after.values())


class _Tokenizer:
    """The tiny model's tokenizer, as study_prompts reads it."""

    def __init__(self):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())


def test_changed_config_invalidates_only_downstream_stages(finished_study, tmp_path):
    """Toggling heldout_names (once reused by every stage) recomputes what reads it, and the report says so."""
    shutil.copytree(finished_study.out_dir, tmp_path / "copy")
    changed = run_study(tiny_config(tmp_path / "copy", heldout_names=True))
    computed = {name for name, rec in changed.stages.items() if rec.computed}
    assert computed == {"generalization", "overlap", "report"}
    frame = pd.read_parquet(tmp_path / "copy/stages/generalization/generalization.parquet")
    assert "names" in set(frame["level"])
    assert "heldout_names | True |" in (changed.report.parent / "report.md").read_text()


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"contexts": ("lending_amount", "no_such_context")}, "contexts"),
        ({"neuron_ks": (10_000,)}, "neuron_ks"),
        ({"strategies": ("top_k_neurons", "magic")}, "strategies"),
        ({"ablation": "erase"}, "ablation"),
    ],
)
@pytest.mark.usefixtures("unchecked")
def test_bad_config_fails_before_model_work(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field):
        tiny_config(tmp_path, **overrides).validate()


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="out_dir"):
        tiny_config(blocker / "sub").validate()


def test_config_from_toml_names_unknown_fields(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('[study]\ncontexts = ["chess", "sports"]\nneuron_ks = [5]\nbatch_size = 2\n')
    config = StudyConfig.from_file(path)
    assert config.contexts == ("chess", "sports") and config.neuron_ks == (5,)
    path.write_text('[study]\nbogus = 1\n')
    with pytest.raises(ConfigError, match="bogus"):
        StudyConfig.from_file(path)


def test_killed_study_resumes_with_identical_results(finished_study, tmp_path):
    out = tmp_path / "killed"
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parents[3])!r})\n"
        "from tests.circuits.study.test_study import tiny_config\n"
        "from circuits.study.runner import run_study\n"
        f"run_study(tiny_config({str(out)!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = out / ".lock"
    deadline = time.time() + 600
    while not (lock.exists() and str(proc.pid) in lock.read_text()) and proc.poll() is None:
        time.sleep(0.1)
    # a second writer on the same directory is refused, naming the first and the directory
    config = out.parent / "second.yaml"
    config.write_text(yaml.safe_dump({"study": {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in tiny_config(out).to_dict().items()}}))
    second = subprocess.run([sys.executable, "-m", "circuits.study.cli", "study", "--config", str(config)],
                            capture_output=True, text=True, cwd=Path(__file__).parents[3])
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"{out} is in use by pid {proc.pid}" in second.stderr and "running a study" in second.stderr
    marker = out / "stages" / "head-utility" / "stage.json"
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the study finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert str(proc.pid) in lock.read_text()  # a stale lock: its holder is gone, the next run takes it
    finished = {p.parent.name: p.read_text() for p in (out / "stages").glob("*/stage.json")}
    assert "head-utility" in finished and "report" not in finished
    resumed = run_study(tiny_config(out))
    for name, meta in finished.items():
        assert not resumed.stages[name].computed, f"{name} was recomputed"
        assert (out / "stages" / name / "stage.json").read_text() == meta
    assert resumed.stages["report"].computed
    for table in ("generalization/generalization.parquet", "overlap/pairwise.parquet", "audit/gaps.parquet"):
        ours = pd.read_parquet(out / "stages" / table)
        reference = pd.read_parquet(finished_study.out_dir / "stages" / table)
        pd.testing.assert_frame_equal(ours, reference)


def test_results_match_the_reference_tables(finished_study):
    """The tiny study's tables equal those the code wrote before the architecture change
    (tests/data/study_tables, see tests/circuits/study_tables.py), up to float rounding."""
    from tests.circuits.study.study_tables import REFERENCE, study_tables

    ours = study_tables(finished_study.out_dir)
    reference = {p.stem: pd.read_parquet(p) for p in sorted(REFERENCE.glob("*.parquet"))}
    assert reference and set(ours) == set(reference)
    for name, table in reference.items():
        mine = ours[name].reset_index(drop=True)
        # ratios over the random model's small gaps (up to 70x the gap) and their intervals: another CPU's
        # float rounding moves them by up to 7e-4 of themselves (an AMD EPYC host against the reference's
        # Intel one), the sweeps' Hugging Face attention kernel by up to 2e-4
        ratios = [c for c in table if c in RATIO_COLUMNS or "share" in c or "reduction" in c]
        pd.testing.assert_frame_equal(mine.drop(columns=ratios), table.drop(columns=ratios), check_exact=False,
                                      rtol=1e-4, atol=1e-6, obj=name)
        pd.testing.assert_frame_equal(mine[ratios], table[ratios], check_exact=False, rtol=2e-3, atol=1e-6, obj=name)


# besides every column named for a share or a reduction: the shared/specific table's reduction intervals
RATIO_COLUMNS = ("full_low", "full_high", "shared_low", "shared_high")


def test_a_batch_size_left_out_is_8_on_a_cpu_and_what_free_memory_holds_on_cuda(tiny_model, monkeypatch):
    from circuits.study.runner import study_batch_size
    from interp import memory

    assert study_batch_size(StudyConfig(), tiny_model) == 8
    assert study_batch_size(StudyConfig(batch_size=3), tiny_model) == 3
    per_row = memory.row_bytes(tiny_model.cfg, 256, 16)
    for free, rows in ((20 * per_row + 1, 12), (10**6 * per_row, 32)):  # 60% of free memory, at most 32
        monkeypatch.setattr(memory, "free_memory_bytes", lambda device, free=free: free)
        assert study_batch_size(StudyConfig(), tiny_model) == rows
        assert study_batch_size(StudyConfig(batch_size=3), tiny_model) == 3


def test_every_stage_runs_at_the_configs_matmul_precision(tmp_path, monkeypatch):
    """The audit stage (the first computed) sees the config's precision; the process's own comes back
    after the run, also when a stage fails."""
    import dataclasses

    seen = []

    def audit(study, c, out, **inputs):
        seen.append(torch.get_float32_matmul_precision())
        raise KeyboardInterrupt  # stop the run here: the precision must still be restored

    monkeypatch.setitem(STAGE_SPECS, "audit", dataclasses.replace(STAGE_SPECS["audit"], run=audit))
    before = torch.get_float32_matmul_precision()
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_config(tmp_path, matmul_precision="high"))
    assert seen == ["high"] and torch.get_float32_matmul_precision() == before
