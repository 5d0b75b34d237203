"""Exploration: set intersections with their null and effects, layer profiles, component cards (tiny model)."""
import numpy as np
import pandas as pd
import pytest
import torch

from circuits.evaluate import explore
from circuits.evaluate.evaluation import EvalSet, prompt_values
from circuits.inputs.prompts import build_prompts, select_prompts
from circuits.select.scoring import group_weights, score_prompts
from interp.ablation import ablated
from interp.components import ComponentSet, ComponentShape, Head, Neuron
from interp.metrics import CandidateAnswers, ExpectedValue

CONTEXTS = ["lending_amount", "commerce_buy"]


@pytest.fixture(scope="module")
def eval_sets(tiny_model):
    grid = CandidateAnswers.from_texts(tiny_model.tokenizer, [" 5", " 50", " 1,000"], [0.0, 50.0, 1000.0])
    prompts = select_prompts(build_prompts(tiny_model, CONTEXTS, details=["low"]), variations=2, names_per_cell=1)
    return {c: EvalSet.from_prompts(tiny_model, c, prompts.filter(context=c), ExpectedValue(grid)) for c in CONTEXTS}


@pytest.fixture(scope="module")
def scores(tiny_model, eval_sets):
    return {c: score_prompts(tiny_model, es, refine_top=0, batch_size=8, progress=False) for c, es in eval_sets.items()}


def _set(*components):
    return ComponentSet(components)


def test_compare_sets_partitions_the_union_and_round_trips(tmp_path):
    shape = ComponentShape(n_layers=2, d_mlp=50, n_heads=4)
    sets = {"a": _set(Neuron(0, 1), Neuron(0, 2), Neuron(1, 3), Head(0, 1)),
            "b": _set(Neuron(0, 1), Neuron(1, 3), Neuron(1, 4)),
            "c": _set(Neuron(0, 1), Neuron(1, 9))}
    comparison = explore.compare_sets(sets, shape, n_null=200, seed=1)
    sizes = dict(zip(comparison.table["intersection"], comparison.table["size"]))
    assert sizes == {"a & b & c": 1, "a": 2, "a & b": 1, "b": 1, "c": 1}
    assert comparison.table["size"].sum() == len(sets["a"] | sets["b"] | sets["c"])
    assert comparison.components("a & b") == _set(Neuron(1, 3))
    assert comparison.components("a") == _set(Neuron(0, 2), Head(0, 1))
    assert comparison.sets() == sets
    table = comparison.table.set_index("intersection")
    assert table.loc["a & b & c", "degree"] == 3
    # three random neurons per 50 in layer 0: the triple intersection is rare, so observing one is significant
    assert table.loc["a & b & c", "null_mean"] < 0.2 and table.loc["a & b & c", "p_value"] < 0.2
    assert ((table["null_low"] <= table["null_mean"]) & (table["null_mean"] <= table["null_high"])).all()
    assert ((table["p_value"] > 0) & (table["p_value"] <= 1)).all()
    comparison.save(tmp_path)
    loaded = explore.SetComparison.load(tmp_path)
    pd.testing.assert_frame_equal(loaded.to_dataframe(), comparison.to_dataframe())
    assert loaded.sets() == sets and loaded.effects is None


def test_compare_sets_null_matches_the_hypergeometric_mean():
    shape = ComponentShape(n_layers=1, d_mlp=40, n_heads=1)
    a = ComponentSet(Neuron(0, i) for i in range(10))
    b = ComponentSet(Neuron(0, i) for i in range(5, 25))
    table = explore.compare_sets({"a": a, "b": b}, shape, n_null=2000, seed=0).table.set_index("intersection")
    assert table.loc["a & b", "size"] == 5
    assert table.loc["a & b", "null_mean"] == pytest.approx(10 * 20 / 40, abs=0.15)  # E|A & B| = k_a k_b / n
    assert table.loc["a", "null_mean"] == pytest.approx(10 - 5, abs=0.15)


def test_compare_sets_refuses_bad_input():
    shape = ComponentShape(n_layers=1, d_mlp=10, n_heads=1)
    with pytest.raises(ValueError, match="2 to"):
        explore.compare_sets({"a": _set(Neuron(0, 1))}, shape)
    with pytest.raises(ValueError, match="contain ' & '"):
        explore.compare_sets({"a & b": _set(Neuron(0, 1)), "c": _set(Neuron(0, 2))}, shape)
    with pytest.raises(IndexError, match="out of range"):
        explore.compare_sets({"a": _set(Neuron(0, 11)), "c": _set(Neuron(0, 2))}, shape)


def test_intersection_effects_are_the_gap_change_of_ablating_each_intersection(tiny_model, eval_sets, scores,
                                                                              tmp_path):
    shape = ComponentShape.of(tiny_model)
    comparison = explore.compare_sets(explore.top_sets(scores, 12, "neuron"), shape, n_null=20)
    measured = explore.intersection_effects(tiny_model, comparison, list(eval_sets.values()), n_resamples=50,
                                            progress=False)
    effects = measured.effects
    assert set(effects["intersection"]) == set(comparison.table.loc[comparison.table["size"] > 0, "intersection"])
    row = effects.iloc[0]
    es = eval_sets[row["eval"]]
    _, frame = es.rows()
    weights = group_weights(frame).double()
    before = prompt_values(tiny_model, es).double()
    with ablated(tiny_model, measured.components(row["intersection"]), "zero"):
        after = prompt_values(tiny_model, es).double()
    assert row["delta_gap"] == pytest.approx(float(weights @ (after - before)), rel=1e-4, abs=1e-7)
    assert row["delta_low"] <= row["delta_gap"] <= row["delta_high"]
    assert len(measured.to_dataframe()) == len(effects)
    loaded = explore.SetComparison.load(measured.save(tmp_path))
    pd.testing.assert_frame_equal(loaded.to_dataframe(), measured.to_dataframe())


def test_layer_profile_counts_and_sums_scores(scores):
    shape = ComponentShape(n_layers=3, d_mlp=96, n_heads=4)
    sets = {"lending_amount": _set(Neuron(0, 1), Neuron(0, 2), Neuron(2, 5), Head(1, 0))}
    profile = explore.layer_profile(sets, shape, scores).set_index(["kind", "layer"])
    assert profile.loc[("neuron", 0), "count"] == 2 and profile.loc[("neuron", 1), "count"] == 0
    assert profile.loc[("neuron", 0), "share"] == pytest.approx(2 / 3)
    neuron = scores["lending_amount"].scores["neuron"]
    assert profile.loc[("neuron", 0), "score_sum"] == pytest.approx(float(neuron[0, 1] + neuron[0, 2]), rel=1e-5)
    assert profile.loc[("head", 1), "count"] == 1 and len(profile) == 6
    assert explore.layer_profile(sets, shape)["score_sum"].isna().all()
    with pytest.raises(ValueError, match="no scores for"):
        explore.layer_profile({"other": sets["lending_amount"]}, shape, scores)


def test_direct_effect_is_the_output_through_the_norm_gain_and_unembedding(tiny_model):
    output = tiny_model.W_out[1, 7].detach()
    effect = explore.direct_effect(tiny_model, output)
    gain = tiny_model.ln_final.state_dict()["_original_component.weight"]
    five = effect[effect["token"] == "5"].iloc[0]
    expected = float((output * gain) @ tiny_model.W_U[:, int(five["token_id"])].detach())
    assert five["effect"] == pytest.approx(expected, rel=1e-5)
    assert set(effect["answer"]) == {"digit", "yes_no"} and (effect["answer"] == "digit").sum() == 10
    assert effect.groupby("answer")["centred"].sum().abs().max() < 1e-4
    with pytest.raises(ValueError, match="single token"):
        explore.direct_effect(tiny_model, output, {"long": ["antidisestablishmentarianism"]})


def test_card_scores_have_an_interval_around_the_per_prompt_mean(scores, eval_sets):
    top = next(iter(scores["lending_amount"].top(1, "neuron")))
    frames = {c: es.rows()[1] for c, es in eval_sets.items()}
    table = explore.card_scores(scores, top, frames=frames, n_resamples=200).set_index("context")
    row = table.loc["lending_amount"]
    assert row["rank"] == 1 and row["interval"] == "names x templates"
    per_prompt = scores["lending_amount"].per_prompt()["neuron"][:, top.layer, top.index]
    assert row["estimate"] == pytest.approx(float(per_prompt.mean()), rel=1e-4)
    assert row["score"] == pytest.approx(row["estimate"], rel=1e-4)  # unrefined: the score is the estimate
    assert row["ci_low"] <= row["estimate"] <= row["ci_high"]
    assert explore.card_scores(scores, top, n_resamples=50)["interval"].eq("prompts").all()
    with pytest.raises(ValueError, match="pass the table of the prompts scored"):
        explore.card_scores(scores, top, frames={"lending_amount": frames["lending_amount"].head(3)})


def test_component_card_activations_match_a_cached_run_and_round_trip(tiny_model, scores, eval_sets, tmp_path):
    neuron, head = Neuron(1, 7), Head(2, 1)
    card = explore.component_card(tiny_model, neuron, scores, eval_sets, n_top=3, n_resamples=50)
    es = eval_sets["commerce_buy"]
    batch, frame = es.rows()
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(batch.tokens)
    act = cache[neuron.hook_name][..., neuron.index]
    at_answer = act[torch.arange(len(batch)), batch.answer_pos].double().numpy()
    on_name = np.array([float(act[i][es.names()[i]].mean()) for i in range(len(batch))])
    white = (frame["group"] == "White").to_numpy()
    got = card.activations.set_index(["context", "group", "position"])
    assert got.loc[("commerce_buy", "White", "answer"), "mean"] == pytest.approx(at_answer[white].mean(), rel=1e-4)
    assert got.loc[("commerce_buy", "Black", "name"), "mean"] == pytest.approx(on_name[~white].mean(), rel=1e-4)
    effect = card.effects[(card.effects["context"] == "commerce_buy") & (card.effects["token"] == "5")]
    unit = explore.direct_effect(tiny_model, tiny_model.W_out[1, 7].detach())
    assert float(effect["effect"].iloc[0]) == pytest.approx(
        at_answer.mean() * float(unit.loc[unit["token"] == "5", "effect"].iloc[0]), rel=1e-4)
    assert len(card.top_prompts) == 3 and card.top_prompts["activation_name"].is_monotonic_decreasing
    assert set(card.scores["context"]) == set(CONTEXTS)
    card.save(tmp_path)
    loaded = explore.ComponentCard.load(tmp_path)
    assert loaded.component == neuron
    pd.testing.assert_frame_equal(loaded.to_dataframe(), card.to_dataframe())
    assert set(card.to_dataframe()["part"]) == set(explore.ComponentCard.PARTS)

    head_card = explore.component_card(tiny_model, head, scores, {"commerce_buy": es}, n_top=2, n_resamples=50)
    z = cache[head.hook_name][torch.arange(len(batch)), batch.answer_pos, head.index]  # prompt d_head
    norms = (z @ tiny_model.W_O[head.layer, head.index].detach()).norm(dim=-1).double().numpy()
    got = head_card.activations.set_index(["group", "position"])
    assert got.loc[("White", "answer"), "mean"] == pytest.approx(norms[white].mean(), rel=1e-4)
    assert (head_card.activations["ci_low"] <= head_card.activations["mean"]).all()


def test_study_report_exploration_sections_from_stored_scores(scores):
    from circuits.report.study_report import _exploration_from_scores

    sections = _exploration_from_scores(scores, k=10, n_null=20, seed=0, n_cards=3)
    assert [s.title for s in sections[:2]] == ["Set comparison", "Layer profile"]
    cards = sections[2:]
    assert len(cards) == 3 and all(s.key and s.title == f"Component {s.key}" for s in cards)
    members = sections[0].tables[1][1]
    assert {s.key for s in cards} <= set(members["component"])  # each card is linked from the table
    card_scores = cards[0].tables[0][1]
    assert list(card_scores["context"]) == CONTEXTS and card_scores["interval"].eq("prompts").all()
    assert _exploration_from_scores({"only": scores[CONTEXTS[0]]}, k=10, n_null=20, seed=0) == []
