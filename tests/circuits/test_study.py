"""The study runner on the tiny model: end to end, config errors, and resuming after a kill."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from circuits.config import ConfigError, StudyConfig
from circuits.study import run_study
from interp.testing import tiny_model_dir

STAGES = ["audit", "scores-lending_amount", "scores-commerce_buy", "head-utility", "selection",
          "generalization", "overlap", "report"]


def tiny_config(out_dir, **overrides) -> StudyConfig:
    settings = dict(
        model=str(tiny_model_dir()), contexts=("lending_amount", "commerce_buy"), variations=3, names_per_cell=2,
        max_pairs_per_cell=1, strategies=("top_k_neurons", "top_k_heads", "fasp", "common"),
        heldout_names=False, utility_texts=4,
        neuron_ks=(5,), head_ks=(2,), fasp_alphas=(0.1,), overlap_k=10, n_null=20, batch_size=4,
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


def test_rerun_reuses_every_stage(finished_study):
    again = run_study(finished_study.config)
    assert not any(rec.computed for rec in again.stages.values())


def test_changed_config_invalidates_only_downstream_stages(finished_study, tmp_path):
    shutil.copytree(finished_study.out_dir, tmp_path / "copy")
    changed = run_study(tiny_config(tmp_path / "copy", head_ks=(3,)))
    computed = {name for name, rec in changed.stages.items() if rec.computed}
    assert "audit" not in computed and "scores-lending_amount" not in computed
    assert {"selection", "generalization", "report"} <= computed


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"contexts": ("lending_amount", "no_such_context")}, "contexts"),
        ({"neuron_ks": (10_000,)}, "neuron_ks"),
        ({"strategies": ("top_k_neurons", "magic")}, "strategies"),
        ({"ablation": "erase"}, "ablation"),
    ],
)
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
        "import sys; sys.path.insert(0, %r)\n"
        "from tests.circuits.test_study import tiny_config\n"
        "from circuits.study import run_study\n"
        "run_study(tiny_config(%r))\n" % (str(Path(__file__).parents[2]), str(out))
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "stages" / "head-utility" / "stage.json"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the study finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
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
