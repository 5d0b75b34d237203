import warnings

import pytest
import torch

from circuits.evaluate import evaluation
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
    reference = evaluation.evaluate(tiny_model, sets, [eval_set], probe=probe, batch_size=8, progress=False,
                                    stacked=False)
    seen = _simulate_memory_limit(monkeypatch, max_rows=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shrunk = evaluation.evaluate(tiny_model, sets, [eval_set], probe=probe, batch_size=8, progress=False,
                                     stacked=False)
    assert sum("out of memory" in str(w.message) for w in caught) == 1  # said once over every set
    assert seen[:2] == [8, 4] and max(seen[2:]) <= 2  # the smaller size carries over to later sets
    assert_evaluations_close(shrunk.frame, reference.frame)


def test_delta_gap_endpoints_are_the_paired_cluster_bootstrap_of_the_prompt_values(tiny_model):
    import pandas as pd

    from circuits.measure.stats import gap_change

    eval_set, sets, probe = eval_inputs(tiny_model)
    result = evaluation.evaluate(tiny_model, sets, [eval_set], probe=probe, batch_size=8, seed=3,
                                 n_resamples=400, progress=False)
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
                                n_resamples=400, progress=False)
    assert again.to_dataframe()["delta_low"].equals(result.to_dataframe()["delta_low"])


def test_an_evaluation_round_trips(tiny_model, tmp_path):
    import pandas as pd

    eval_set, sets, probe = eval_inputs(tiny_model)
    result = evaluation.evaluate(tiny_model, sets, [eval_set], probe=probe, n_resamples=50, progress=False)
    loaded = evaluation.Evaluation.load(result.save(tmp_path / "e"))
    pd.testing.assert_frame_equal(loaded.to_dataframe(), result.to_dataframe())
    assert loaded.settings.keys() == result.settings.keys()


def test_utility_texts_for_selection_and_for_reporting_are_disjoint():
    select, report = evaluation.neutral_texts("select"), evaluation.neutral_texts("report")
    assert select and report and not set(select) & set(report)
    assert sorted(select + report) == sorted(evaluation.neutral_texts())


def _evaluation_inputs(model):
    """Two evaluation sets of variable-length prompts with a packed multi-token metric, and sets starting
    at every layer (one empty, one planned on a single evaluation set only)."""
    from circuits.evaluate.evaluation import EvalSet, UtilityProbe
    from circuits.inputs.prompts import build_prompts, select_prompts
    from interp.components import ComponentSet, Head, Neuron
    from interp.metrics import CandidateAnswers, ExpectedValue

    prompts = select_prompts(build_prompts(model, ["lending_amount"], details=["low"]), variations=3,
                             names_per_cell=1)
    metric = ExpectedValue(CandidateAnswers.from_texts(model.tokenizer, [" 5", " 50", " 1,000"], [0.0, 50.0, 1000.0]))
    eval_sets = [EvalSet.from_prompts(model, f"lending:{split}", prompts.filter(variation_split=split), metric)
                 for split in ("train", "heldout")]
    sets = {"heads": ComponentSet([Head(1, 2), Head(2, 0)]), "neurons": ComponentSet([Neuron(0, 7), Neuron(2, 5)]),
            "late": ComponentSet([Neuron(2, 11), Head(2, 3)]), "empty": ComponentSet(),
            "only_train": ComponentSet([Head(0, 1)])}
    plan = {"only_train": ["lending:train"]}
    probe = UtilityProbe.build(model, ["The weather was mild today.", "A short neutral sentence that is longer."])
    return sets, eval_sets, plan, probe


@pytest.mark.parametrize("how", ["zero", "mean"])
def test_stacked_evaluation_equals_one_forward_per_set(tiny_model, how):
    from interp.activations import mean_activations
    from interp.components import hook_name
    from interp.hooks import attached_hook_count

    sets, eval_sets, plan, probe = _evaluation_inputs(tiny_model)
    means = None
    if how == "mean":
        names = [hook_name(k, layer) for k in ("neuron", "head") for layer in range(tiny_model.cfg.n_layers)]
        means = mean_activations(tiny_model, eval_sets[0].rows()[0], names)
    kwargs = {"probe": probe, "how": how, "means": means, "plan": plan, "batch_size": 3, "n_resamples": 200,
              "seed": 2, "progress": False}
    before = attached_hook_count(tiny_model)
    stacked = evaluation.evaluate(tiny_model, sets, eval_sets, **kwargs)
    assert attached_hook_count(tiny_model) == before
    plain = evaluation.evaluate(tiny_model, sets, eval_sets, stacked=False, **kwargs)
    assert len(stacked.frame) == 1 + 2 * 4 + 1 + 1  # none and four sets on both, only_train on one
    assert_evaluations_close(stacked.frame, plain.frame)
    frame = stacked.frame.set_index(["set", "eval"])
    assert frame.loc[("empty", "lending:train"), "delta_gap"] == 0
    assert (frame.drop(index=["none", "empty"], level=0)["kl"] > 0).all()
    assert (frame["delta_gap"].abs() > 0).sum() >= 4


def test_stacked_evaluation_survives_simulated_out_of_memory(tiny_model, monkeypatch):
    from interp import stacking

    sets, eval_sets, plan, probe = _evaluation_inputs(tiny_model)
    reference = evaluation.evaluate(tiny_model, sets, eval_sets, probe=probe, plan=plan, batch_size=8,
                                    n_resamples=100, progress=False)
    real, seen = stacking.resume, []

    def small_memory(model, residual, *args, **kwargs):
        seen.append(residual.shape[0])
        if residual.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(model, residual, *args, **kwargs)

    monkeypatch.setattr(stacking, "resume", small_memory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shrunk = evaluation.evaluate(tiny_model, sets, eval_sets, probe=probe, plan=plan, batch_size=8,
                                     n_resamples=100, progress=False)
    assert 1 <= sum("out of memory" in str(w.message) for w in caught) <= 2  # once per shared size (sets, utility)
    assert any(n > 2 for n in seen) and seen[-1] <= 2
    assert_evaluations_close(shrunk.frame, reference.frame)
