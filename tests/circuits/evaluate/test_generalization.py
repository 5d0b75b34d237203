"""The generalization table on the tiny model: endpoint columns, the random-set null band, power."""
import numpy as np
import pytest

from circuits.evaluate.evaluation import EvalSet, UtilityProbe
from circuits.evaluate.generalization import CandidateSet, ContextSplits, Generalization, generalize
from circuits.inputs.prompts import build_prompts, select_prompts
from interp.components import ComponentSet, Head, Neuron
from interp.metrics import CandidateAnswers, ExpectedValue

COLUMNS = ["delta_gap", "delta_low", "delta_high", "share_removed", "share_low", "share_high", "overshoot",
           "n_prompts", "n_names", "null_low", "null_high", "outside_null", "mde"]


@pytest.fixture(scope="module")
def setup(tiny_model):
    prompts = select_prompts(build_prompts(tiny_model, ["lending_amount"], details=["low"]), variations=3,
                             names_per_cell=1)
    grid = CandidateAnswers.from_texts(tiny_model.tokenizer, [" 5", " 50", " 1,000"], [0.0, 50.0, 1000.0])
    metric = ExpectedValue(grid)
    train = EvalSet.from_prompts(tiny_model, "lending_amount:train",
                                 prompts.filter(variation_split="train"), metric)
    heldout = EvalSet.from_prompts(tiny_model, "lending_amount:heldout",
                                   prompts.filter(variation_split="heldout"), metric)
    splits = {"lending_amount": ContextSplits("lending_amount", train, heldout)}
    candidates = [CandidateSet("heads", "top_k_heads", 2, "lending_amount", ComponentSet([Head(1, 2), Head(2, 0)])),
                  CandidateSet("neurons", "top_k_neurons", 3, "lending_amount",
                               ComponentSet([Neuron(0, 7), Neuron(2, 5), Neuron(2, 9)]))]
    probe = UtilityProbe.build(tiny_model, ["The weather was mild today.", "A short neutral sentence."])
    return candidates, splits, probe


@pytest.fixture(scope="module")
def result(tiny_model, setup):
    candidates, splits, probe = setup
    return generalize(tiny_model, candidates, splits, probe=probe, null_draws=4, n_resamples=200, seed=1)


def test_generalization_rows_carry_the_endpoints_and_the_null_band(result, tmp_path):
    frame = result.frame
    assert set(COLUMNS) <= set(frame.columns)
    pruned = frame[frame["strategy"] != "none"]
    assert len(result.nulls) == 4 * len(pruned)
    for row in pruned.itertuples():
        drawn = result.nulls[(result.nulls["null_of"] == row.set) & (result.nulls["eval"] == row.eval)]
        assert len(drawn) == 4 and (drawn["n_components"] == row.n_components).all()
        assert row.null_low == pytest.approx(np.percentile(drawn["delta_gap"], 2.5))
        assert row.null_high == pytest.approx(np.percentile(drawn["delta_gap"], 97.5))
        assert row.outside_null == (not row.null_low <= row.delta_gap <= row.null_high)
        assert row.delta_low <= row.delta_gap <= row.delta_high
    assert result.nulls["set"].nunique() == 8  # 4 draws x 2 candidates, each a distinct set
    out = result.save(tmp_path / "gen")
    assert {"generalization.parquet", "nulls.parquet", "power.parquet"} <= {p.name for p in out.iterdir()}
    loaded = Generalization.load(out)
    assert loaded.nulls.equals(result.nulls) and loaded.to_dataframe().equals(result.to_dataframe())


def test_null_levels_restrict_the_random_sets_to_the_levels_judged(tiny_model, setup, result):
    candidates, splits, probe = setup
    only_l1 = generalize(tiny_model, candidates, splits, probe=probe, null_draws=4, null_levels=("L1",),
                         n_resamples=200, seed=1)
    assert set(only_l1.nulls["eval"]) == {"lending_amount:heldout"}
    assert len(only_l1.nulls) == 4 * len(candidates)
    frame, full = only_l1.frame.set_index(["set", "eval"]), result.frame.set_index(["set", "eval"])
    l1 = frame[frame["level"] == "L1"].index
    for column in ("null_low", "null_high", "null_mean", "outside_null", "delta_gap"):  # the same draws and prompts
        assert frame.loc[l1, column].tolist() == pytest.approx(full.loc[l1, column].tolist())
    l0 = frame[frame["level"] == "L0"]
    assert l0["null_low"].isna().all() and not l0["outside_null"].any()
    with pytest.raises(ValueError, match="null_levels \\['L3'\\] are not levels"):
        generalize(tiny_model, candidates, splits, null_draws=1, null_levels=("L3",))


def test_power_lists_the_minimum_detectable_delta_per_evaluation_set(result):
    power = result.power()
    assert list(power["split"]) == ["train", "heldout"]
    assert (power["mde"] > 0).all()
    assert power["mde"].to_numpy() == pytest.approx(2.8016 * power["gap_sd"].to_numpy(), rel=1e-3)
