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


def test_reduction_intervals_are_a_paired_bootstrap_over_pairs(tiny_model):
    from scipy import stats

    eval_set, sets, probe = eval_inputs(tiny_model)
    result = evaluation.evaluate(tiny_model, sets, [eval_set], probe=probe, batch_size=8, seed=3, progress=False)
    frame = result.to_dataframe().set_index("set")
    assert (frame.loc["none", ["reduction_low", "reduction_high"]] == 0).all()
    base_a, base_b = evaluation.paired_values(tiny_model, eval_set)
    with evaluation.ablated(tiny_model, sets["heads"], "zero"):
        a, b = evaluation.paired_values(tiny_model, eval_set)
    diff, base = (a - b).numpy(), (base_a - base_b).numpy()
    expected = stats.bootstrap((diff, base), lambda d, c: 1 - abs(d.mean()) / abs(c.mean()), paired=True,
                               vectorized=False, n_resamples=1000, method="percentile",
                               rng=np.random.default_rng(3)).confidence_interval
    row = frame.loc["heads"]
    assert row["reduction_low"] < row["reduction_high"]
    assert row["reduction_low"] == pytest.approx(expected.low, rel=1e-4, abs=1e-6)
    assert row["reduction_high"] == pytest.approx(expected.high, rel=1e-4, abs=1e-6)
    again = evaluation.evaluate(tiny_model, sets, [eval_set], probe=probe, batch_size=8, seed=3, progress=False)
    assert again.to_dataframe()["reduction_low"].equals(result.to_dataframe()["reduction_low"])
