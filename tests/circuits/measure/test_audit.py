import numpy as np
import pandas as pd
import pytest

from circuits.inputs.prompts import build_prompts, select_prompts
from circuits.measure.audit import AuditResult, run_audit
from circuits.measure.bias import Expansion, Measurement
from circuits.study.cli import build_parser, main
from interp.results import ResultFormatError
from interp.testing import tiny_model_dir


def test_run_audit_writes_and_reloads(tiny_model, tmp_path):
    result = run_audit(
        tiny_model,
        ["chess", "lending_approval"],
        out_dir=tmp_path,
        details=["low"],
        variations=1,
        names_per_cell=1,
        n_resamples=50,
        progress=False,
    )
    assert {p.name for p in tmp_path.iterdir()} == {
        "values.parquet",
        "distribution.parquet",
        "gaps.parquet",
        "settings.json",
    }
    gaps = result.to_dataframe()
    assert set(gaps["context"]) == {"chess", "lending_approval"}
    assert set(gaps["contrast"]) == {"race", "gender"}
    assert result.settings["n_prompts"] == 16 and result.settings["names_per_cell"] == 1  # a name per cell and split
    loaded = AuditResult.load(tmp_path)
    pd.testing.assert_frame_equal(loaded.to_dataframe(), gaps)
    pd.testing.assert_frame_equal(loaded.measurement.values, result.measurement.values)
    assert loaded.settings["contexts"] == ["chess", "lending_approval"]
    assert loaded.measurement.settings == result.measurement.settings and loaded.gaps.settings == result.gaps.settings
    with pytest.raises(ResultFormatError, match="of kind AuditResult; Measurement.load reads only"):
        Measurement.load(tmp_path)
    with pytest.raises(ValueError, match="not both"):
        run_audit(tiny_model, ["chess"], build_prompts(tiny_model, ["chess"], details=["low"]))


def test_cli_audit_runs_on_a_local_model(tmp_path, capsys):
    out = tmp_path / "audit"
    code = main(
        [
            "audit",
            "--model",
            str(tiny_model_dir()),
            "--device",
            "cpu",
            "--contexts",
            "chess",
            "--details",
            "low",
            "--variations",
            "1",
            "--names-per-cell",
            "1",
            "--resamples",
            "50",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    assert "chess" in capsys.readouterr().out
    assert np.isfinite(pd.read_parquet(out / "values.parquet")["value"]).all()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--contexts", "poker"], "unknown context 'poker'"),
        (["--prompts", "missing.csv"], "no such file"),
        (["--answer-type", "dollars"], "--answer-type only applies"),
        (["--variations", "0"], "--variations must be at least 1"),
        (["--model", "/nowhere/model"], "no model directory"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = main(["audit", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_cli_bad_table_is_one_line(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text(
        "scenario,variation,name,context_level,prompt_text\nx,y,Emily Becker,low,Hi Emily Becker\n"
    )
    code = main(["audit", "--prompts", str(table), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "missing column(s) ['name_group']" in err


def test_cli_help_lists_subcommands_and_explains_audit(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["audit", "--help"])
    text = capsys.readouterr().out
    assert "--prompts" in text and "cluster-bootstrap" in text and "lending_amount" in text


@pytest.mark.slow
def test_deterministic_audit_on_smollm2(smollm2, tmp_path):
    result = run_audit(
        smollm2,
        ["chess", "lending_approval"],
        details=["low"],
        variations=1,
        names_per_cell=2,
        n_resamples=300,
        progress=False,
        out_dir=tmp_path,
    )
    values = result.measurement.values
    assert np.isfinite(values["value"]).all() and (values["grid_mass"] > 0.05).all()
    totals = result.measurement.distribution.groupby("prompt_id")["probability"].sum()
    assert np.allclose(totals, 1.0, atol=1e-5)
    gaps = result.to_dataframe()
    assert len(gaps) == 4
    assert np.isfinite(gaps[["gap", "ci_low", "ci_high", "smd", "p_permutation"]].to_numpy()).all()
    assert ((gaps["ci_low"] <= gaps["gap"]) & (gaps["gap"] <= gaps["ci_high"])).all()


def test_cli_audits_an_imported_table(tmp_path, capsys):
    table = tmp_path / "t.jsonl"
    rows = [
        ("Emily Becker", "white_women"),
        ("Greg Becker", "white_men"),
        ("Lakisha Washington", "black_women"),
        ("Jamal Washington", "black_men"),
    ]
    lines = [
        f'{{"scenario": "salary", "variation": "{job}", "name_group": "{group}", "name": "{name}", '
        f'"context_level": "low", "prompt_text": "Should we hire {name} as a {job}?"}}'
        for job in ("nurse", "teacher")
        for name, group in rows
    ]
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    code = main(
        [
            "audit",
            "--model",
            str(tiny_model_dir()),
            "--device",
            "cpu",
            "--prompts",
            str(table),
            "--answer-type",
            "yes_no",
            "--resamples",
            "50",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    gaps = pd.read_parquet(out / "gaps.parquet")
    assert set(gaps["context"]) == {"salary"} and set(gaps["contrast"]) == {"race", "gender"}
    assert gaps["n_prompts"].tolist() == [8, 8]


SLOW_AUDIT = """
import sys, time
sys.path.insert(0, {root!r})
import circuits.measure.audit as audit
from interp.testing import load_tiny_model
real = audit.measure
def slow(*args, **kwargs):
    time.sleep(0.4)
    return real(*args, **kwargs)
audit.measure = slow
audit.run_audit(load_tiny_model(), ["chess", "lending_approval"], out_dir={out!r}, details=["low"], variations=2,
                names_per_cell=1, chunk_size=4, n_resamples=50, progress=False)
"""


def _audit(model, out, **kwargs):
    return run_audit(model, ["chess", "lending_approval"], out_dir=out, details=["low"], variations=2,
                     names_per_cell=1, n_resamples=50, progress=False, **{"chunk_size": 4, **kwargs})


def test_killed_audit_resumes_after_the_last_chunk_with_identical_results(tiny_model, tmp_path, monkeypatch):
    import subprocess
    import sys
    import time
    from pathlib import Path

    import circuits.measure.audit as audit
    from circuits.measure.audit import saved_progress

    out = tmp_path / "killed"
    script = SLOW_AUDIT.format(root=str(Path(__file__).parents[3]), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while saved_progress(out)[0] < 12 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.kill()
    proc.wait()
    done, total = saved_progress(out)
    assert 12 <= done < total == 32 and not (out / "values.parquet").exists()
    with pytest.raises(ValueError, match="holds a partial audit of other settings.*chunks of 4"):
        _audit(tiny_model, out, chunk_size=5)
    with pytest.raises(ValueError, match="holds a partial audit of other settings"):  # another answer budget
        _audit(tiny_model, out, expansion=Expansion(max_nodes=7))
    calls = []
    real = audit.measure
    monkeypatch.setattr(audit, "measure", lambda m, p, **kw: calls.append(len(p)) or real(m, p, **kw))
    resumed = _audit(tiny_model, out)
    assert sum(calls) == total - done  # only the chunks the killed run had not finished
    assert not (out / "chunks").exists()
    reference = _audit(tiny_model, tmp_path / "whole")
    for name in ("values", "distribution"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{name}.parquet"),
                                      pd.read_parquet(tmp_path / "whole" / f"{name}.parquet"), check_exact=True)
    pd.testing.assert_frame_equal(resumed.to_dataframe(), reference.to_dataframe(), check_exact=True)


def test_chunked_audit_matches_one_chunk(tiny_model, tmp_path):
    whole = _audit(tiny_model, None, chunk_size=1000)
    chunked = _audit(tiny_model, tmp_path, chunk_size=3)
    pd.testing.assert_frame_equal(chunked.measurement.values, whole.measurement.values, atol=1e-6)


def test_an_audit_keeps_its_answers_only_when_asked(tiny_model, monkeypatch):
    """By default an audit's memory does not grow with its prompts (the answers are written, not
    cached); with keep_answers a later metric on the same prompts reuses them, expanding nothing."""
    import circuits.measure.bias as bias

    expansion = Expansion(max_nodes=9, per_round=3)  # a cache of its own, untouched by other tests
    chess = select_prompts(build_prompts(tiny_model, ["chess"], details=["low"]), variations=1, names_per_cell=1)

    def kept() -> dict:
        return bias._metric_candidates(tiny_model, *bias._context_answer(tiny_model, "chess", chess), expansion).own

    run_audit(tiny_model, prompts=chess, n_resamples=20, expansion=expansion)
    assert kept() == {}
    run_audit(tiny_model, prompts=chess, n_resamples=20, expansion=expansion, keep_answers=True)
    assert len(kept()) == len(chess)
    expanded = []
    real = bias._numeric_answers
    monkeypatch.setattr(bias, "_numeric_answers", lambda *a, **k: expanded.append(a) or real(*a, **k))
    metric = bias.context_metric(tiny_model, "chess", prompts=chess, expansion=expansion)
    assert expanded == [] and len(metric.candidates.sets) == len(chess)
