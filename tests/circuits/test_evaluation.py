import warnings

import numpy as np
import pytest
import torch

from circuits import evaluation
from tests.interp.test_distributed import assert_evaluations_close, eval_inputs


def _simulate_memory_limit(monkeypatch, max_rows: int) -> list[int]:
    """Make evaluation's forwards of more than ``max_rows`` prompts raise out-of-memory; returns the sizes tried."""
    real_run_metric = evaluation.run_metric
    seen = []

    def small_memory(model, metric, batch, **kwargs):
        seen.append(len(batch))
        if len(batch) > max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_run_metric(model, metric, batch, **kwargs)

    monkeypatch.setattr(evaluation, "run_metric", small_memory)
    return seen


def test_paired_values_survive_simulated_out_of_memory(tiny_model, monkeypatch):
    eval_set, _, _ = eval_inputs(tiny_model)
    reference = evaluation.paired_values(tiny_model, eval_set, batch_size=8)
    seen = _simulate_memory_limit(monkeypatch, max_rows=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shrunk = evaluation.paired_values(tiny_model, eval_set, batch_size=8)
    assert sum("out of memory" in str(w.message) for w in caught) == 1
    assert seen[:3] == [8, 4, 2] and max(seen[3:]) <= 2  # halved until it fit, then kept small
    for got, want in zip(shrunk, reference):
        assert got.shape == (10,)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_evaluate_survives_simulated_out_of_memory(tiny_model, monkeypatch):

    eval_set, sets, probe = eval_inputs(tiny_model)
    reference = evaluation.evaluate(tiny_model, sets, [eval_set], probe=probe, batch_size=8, progress=False)
    seen = _simulate_memory_limit(monkeypatch, max_rows=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shrunk = evaluation.evaluate(tiny_model, sets, [eval_set], probe=probe, batch_size=8, progress=False)
    assert sum("out of memory" in str(w.message) for w in caught) == 1  # said once over every set
    assert seen[:2] == [8, 4] and max(seen[2:]) <= 2  # the smaller size carries over to later sets
    assert_evaluations_close(shrunk.frame, reference.frame)


def test_delta_gap_endpoints_are_the_paired_cluster_bootstrap_of_the_prompt_values(tiny_model):
    import pandas as pd

    from circuits.stats import gap_change

    eval_set, sets, probe = eval_inputs(tiny_model)
    result = evaluation.evaluate(tiny_model, sets, [eval_set], probe=probe, batch_size=8, seed=3,
                                 n_bootstrap=400, progress=False)
    frame = result.to_dataframe().set_index("set")
    assert (frame.loc["none", ["delta_gap", "delta_low", "delta_high", "reduction"]] == 0).all(axis=None)
    batch, table = eval_set.rows()
    assert len(batch) == 2 * len(eval_set.pairs) == frame.loc["heads", "n_prompts"]
    with torch.no_grad():
        before = evaluation.run_metric(tiny_model, eval_set.metric, batch)
        with evaluation.ablated(tiny_model, sets["heads"], "zero"):
            after = evaluation.run_metric(tiny_model, eval_set.metric, batch)
    hand = pd.DataFrame({"name": table["name"], "group": table["group"], "template": table["template"],
                         "before": before.numpy(), "after": after.numpy()})
    expected = gap_change(hand, "before", "after", clusters=("name", "template"), n_resamples=400, seed=3)
    row = frame.loc["heads"]
    n = len(eval_set.pairs)
    gap_after = float(after[:n].mean() - after[n:].mean())
    assert row["gap"] == pytest.approx(gap_after, rel=1e-4, abs=1e-5)
    assert row["delta_gap"] == pytest.approx(gap_after - float(before[:n].mean() - before[n:].mean()), abs=1e-4)
    for column in ("delta_low", "delta_high", "share_removed", "share_low", "share_high", "mde"):
        assert row[column] == pytest.approx(expected[column], rel=1e-3, abs=1e-5)
    assert row["delta_low"] < row["delta_gap"] < row["delta_high"]
    assert row["overshoot"] == expected["overshoot"] and row["n_names"] == 2 * n
    again = evaluation.evaluate(tiny_model, sets, [eval_set], probe=probe, batch_size=8, seed=3,
                                n_bootstrap=400, progress=False)
    assert again.to_dataframe()["delta_low"].equals(result.to_dataframe()["delta_low"])


def test_utility_texts_for_selection_and_for_reporting_are_disjoint():
    select, report = evaluation.neutral_texts("select"), evaluation.neutral_texts("report")
    assert select and report and not set(select) & set(report)
    assert sorted(select + report) == sorted(evaluation.neutral_texts())
