"""Pair-free scores on the tiny model: estimates, exact refinement, FASP's z_bias, round trip."""
import pandas as pd
import pytest
import torch

from circuits.evaluate.evaluation import EvalSet
from circuits.inputs.prompts import build_prompts, select_prompts
from circuits.select.scoring import (
    Baselines,
    ContextScores,
    HeadScores,
    exact_gap_changes,
    fasp_head_bias,
    group_weights,
    score_prompts,
)
from interp.ablation import ablated
from interp.attribution import ablation_attribution
from interp.components import ComponentSet, Head, Neuron
from interp.metrics import CandidateAnswers, ExpectedValue, run_metric
from interp.results import ResultFormatError


@pytest.fixture(scope="module")
def eval_set(tiny_model):
    prompts = select_prompts(build_prompts(tiny_model, ["lending_amount"], details=["low"]), variations=2,
                             names_per_cell=1)
    grid = CandidateAnswers.from_texts(tiny_model.tokenizer, [" 5", " 50", " 1,000"], [0.0, 50.0, 1000.0])
    return EvalSet.from_prompts(tiny_model, "lending_amount:train", prompts, ExpectedValue(grid))


def _gap(model, eval_set, components=()):
    batch, frame = eval_set.rows()
    with torch.no_grad(), ablated(model, list(components), "zero"):
        values = run_metric(model, eval_set.metric, batch)
    return float(group_weights(frame) @ values.float())


def test_group_weights_give_the_gap_and_need_both_groups(eval_set):
    _, frame = eval_set.rows()
    weights = group_weights(frame)
    in_a = torch.tensor((frame["group"] == "White").to_numpy())
    assert weights[in_a].sum() == pytest.approx(1.0) and weights[~in_a].sum() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="another group"):
        group_weights(frame[frame["group"] == "White"])


def test_exact_gap_changes_equal_ablated_runs(tiny_model, eval_set):
    variants = [Neuron(1, 4), Head(2, 1)]
    got = exact_gap_changes(tiny_model, eval_set, variants, prompts_per_pass=3)
    base = _gap(tiny_model, eval_set)
    for value, variant in zip(got, variants):
        assert float(value) == pytest.approx(_gap(tiny_model, eval_set, [variant]) - base, rel=1e-3, abs=1e-6)


def test_score_prompts_refines_the_top_candidates_exactly_and_round_trips(tiny_model, eval_set, tmp_path):
    scores = score_prompts(tiny_model, eval_set, refine_top=5, n_random=3, batch_size=4, progress=False)
    batch, frame = eval_set.rows()
    estimate = ablation_attribution(tiny_model, batch, eval_set.metric, weights=group_weights(frame))
    sign = -scores.orientation / scores.scale
    refined = scores.refined
    assert refined.groupby("kind").size().to_dict() == {"head": 8, "neuron": 8}
    assert refined.groupby(["kind", "selection"]).size().to_dict()[("neuron", "top")] == 5
    top_neurons = set(estimate.top(5, kind="neuron"))
    assert {Neuron(r.layer, r.index) for r in refined.itertuples() if r.kind == "neuron" and r.selection == "top"} \
        == top_neurons
    for row in refined.itertuples():
        assert row.estimate == pytest.approx(float(estimate.scores[row.kind][row.layer, row.index]), rel=1e-4, abs=1e-7)
        assert float(scores.scores[row.kind][row.layer, row.index]) == pytest.approx(sign * row.exact, rel=1e-5)
    row = refined.iloc[0]
    component = (Neuron if row.kind == "neuron" else Head)(int(row.layer), int(row["index"]))
    assert row.exact == pytest.approx(_gap(tiny_model, eval_set, [component]) - _gap(tiny_model, eval_set),
                                      rel=1e-3, abs=1e-6)
    unrefined = torch.ones_like(scores.scores["neuron"], dtype=torch.bool)
    for r in refined[refined["kind"] == "neuron"].itertuples():
        unrefined[r.layer, r.index] = False
    torch.testing.assert_close(scores.scores["neuron"][unrefined], sign * estimate.scores["neuron"][unrefined])
    assert scores.gap == pytest.approx(_gap(tiny_model, eval_set), rel=1e-4, abs=1e-6)
    assert set(scores.settings["spearman"]) == {"neuron", "head"}
    assert -1 <= scores.settings["spearman"]["neuron"] <= 1
    per_prompt = scores.per_prompt()["neuron"]
    assert per_prompt.shape[0] == len(batch)
    torch.testing.assert_close(per_prompt.mean(0)[unrefined], scores.scores["neuron"][unrefined], rtol=1e-4, atol=1e-7)
    loaded = ContextScores.load(scores.save(tmp_path / "scores"))
    pd.testing.assert_frame_equal(loaded.to_dataframe(), scores.to_dataframe())
    pd.testing.assert_frame_equal(loaded.refined, scores.refined)
    assert isinstance(loaded.attribution, type(scores.attribution))
    assert loaded.settings["spearman"] == scores.settings["spearman"] and loaded.gap == pytest.approx(scores.gap)


def test_fasp_head_bias_is_the_gap_magnitude_removed_by_each_head(tiny_model, eval_set):
    got = fasp_head_bias(tiny_model, eval_set)
    assert got.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)
    base = _gap(tiny_model, eval_set)
    for layer, head in [(0, 2), (2, 3)]:
        without = _gap(tiny_model, eval_set, [Head(layer, head)])
        assert float(got[layer, head]) == pytest.approx(abs(base) - abs(without), rel=1e-3, abs=1e-6)


def test_baselines_read_every_prompt_by_group(tiny_model, eval_set):
    from circuits.select.scoring import baseline_sets, wanda_scores

    got = baseline_sets(tiny_model, eval_set, top_fraction=0.2, batch_size=4)
    batch, frame = eval_set.rows()
    in_a = torch.tensor((frame["group"] == "White").to_numpy())
    assert got.attention_to_name.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)
    assert (got.attention_to_name > 0).all()  # every head pays some attention to the name
    wanda_a = wanda_scores(tiny_model, batch.select(in_a))["neuron"]
    wanda_b = wanda_scores(tiny_model, batch.select(~in_a))["neuron"]
    top = int(0.2 * tiny_model.cfg.d_mlp)
    for c in got.wanda_difference:
        if c.kind == "neuron":
            assert c.index in wanda_a[c.layer].topk(top).indices and c.index not in wanda_b[c.layer].topk(top).indices


def test_grid_scale_is_the_interquartile_range_of_the_summarized_values(tiny_model):
    from circuits.select.scoring import grid_scale
    from interp.metrics import PromptCandidates

    tok = tiny_model.tokenizer
    outlier = CandidateAnswers.from_texts(tok, [" 1", " 2", " 3", " 4", " 9"], [1.0, 2.0, 3.0, 4.0, 1e9])
    assert grid_scale(ExpectedValue(outlier)) == pytest.approx(2.0)  # quantiles 2 and 4; max - min would be 1e9
    small = CandidateAnswers.from_texts(tok, [" 9", " 99"], [9.0, 99.0])
    log = ExpectedValue(small, summary="log10")
    assert grid_scale(log) == pytest.approx(0.5)  # log10(10) .. log10(100), quartiles 1.25 and 1.75
    pooled = ExpectedValue(PromptCandidates({(1,): small, (2,): outlier}))  # each prompt's own set, pooled
    values = torch.tensor([9.0, 99.0, 1.0, 2.0, 3.0, 4.0, 1e9], dtype=torch.float64)
    q = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert grid_scale(pooled) == pytest.approx(float(q[1] - q[0]))
    assert grid_scale(object()) == 1.0


def test_baselines_and_head_scores_round_trip(tmp_path):
    heads = HeadScores(torch.randn(3, 4, dtype=torch.float64))
    loaded = HeadScores.load(heads.save(tmp_path / "h"))
    assert torch.equal(loaded.scores, heads.scores)
    pd.testing.assert_frame_equal(loaded.to_dataframe(), heads.to_dataframe())
    baselines = Baselines(ComponentSet([Neuron(0, 2), Head(1, 3)]), torch.rand(3, 4))
    back = Baselines.load(baselines.save(tmp_path / "b"))
    assert back.wanda_difference == baselines.wanda_difference
    assert torch.equal(back.attention_to_name, baselines.attention_to_name)
    pd.testing.assert_frame_equal(back.to_dataframe(), baselines.to_dataframe())
    with pytest.raises(ResultFormatError, match="of kind Baselines; HeadScores.load reads only"):
        HeadScores.load(tmp_path / "b")
