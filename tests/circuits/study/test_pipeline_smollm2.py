"""On the embedded model: pair-free scores of two contexts (exact refinement of the top few), top-k neurons and
heads, generalization with delta-gap endpoints and nulls, overlap.

Sized to run in a few minutes on 2 CPU cores: each prompt's answers are found with a small ``Expansion`` (at most
32 number-tree nodes, 95% of the numeric mass), which shortens every scored row; one training and one held-out
template, the top 3 + 2 random per kind refined exactly, one null draw; the flow and every column checked are those
of the default study."""
import numpy as np
import pytest

from circuits.evaluate.analysis import overlap_tables
from circuits.evaluate.evaluation import UtilityProbe, neutral_texts
from circuits.evaluate.generalization import generalize
from circuits.measure.bias import Expansion
from circuits.select.scoring import score_prompts
from circuits.study.config import StudyConfig
from circuits.study.runner import ContextPrompts, select_candidates, study_prompts


@pytest.mark.slow
def test_scores_pruning_generalization_and_overlap_on_smollm2(smollm2, tmp_path):
    config = StudyConfig(
        contexts=("lending_amount", "commerce_buy"),
        variations=2,
        heldout_variations=1,
        names_per_cell=1,
        max_pairs_per_cell=1,
        strategies=("top_k_neurons", "top_k_heads", "common"),
        neuron_ks=(20,),
        head_ks=(3,),
        overlap_k=50,
        n_null=20,
        out_dir=str(tmp_path / "study"),
        progress=False,
    )
    prompts = study_prompts(smollm2, config)
    expansion = Expansion(max_nodes=32, target=0.95)
    splits = {ctx: ContextPrompts(smollm2, ctx, prompts.filter(context=ctx), config.max_pairs_per_cell, config.seed,
                                  expansion).splits(heldout_names=False) for ctx in config.contexts}
    scores = {ctx: score_prompts(smollm2, s.train, refine_top=3, n_random=2, batch_size=4, progress=False)
              for ctx, s in splits.items()}
    for s in scores.values():
        assert all(np.isfinite(t.numpy()).all() for t in s.scores.values())
    candidates = select_candidates(config, scores)
    assert {c.strategy for c in candidates} == {"top_k_neurons", "top_k_heads", "common_neurons", "common_heads"}
    for s in scores.values():  # the exact refinement replaced the estimates it covers
        assert len(s.refined) == 2 * (3 + 2) and s.settings["spearman"].keys() == {"neuron", "head"}
    probe = UtilityProbe.build(smollm2, neutral_texts()[:2])
    result = generalize(smollm2, candidates, splits, probe=probe, batch_size=4, null_draws=1, n_resamples=100,
                        progress=False)

    matrix = result.matrix(value="delta_gap")
    pairs = {(row.train_context, row.eval_context) for row in matrix.itertuples()}
    assert {("lending_amount", "commerce_buy"), ("commerce_buy", "lending_amount")} <= pairs  # L2 cells
    assert {("lending_amount", "lending_amount"), ("commerce_buy", "commerce_buy")} <= pairs  # L1 cells
    assert np.isfinite(matrix["delta_gap"]).all()
    assert (result.frame["delta_low"] <= result.frame["delta_high"]).all()
    assert np.isfinite(result.frame[["gap", "kl"]].to_numpy(dtype=float)).all()
    strategies = result.frame[result.frame["strategy"] != "none"]
    assert result.nulls is not None and len(result.nulls)  # the random-set band, one draw per candidate
    assert strategies[["null_low", "null_high"]].notna().all().all()
    assert np.isfinite(result.power()["mde"]).all()  # the power line, per context and split

    tables = overlap_tables(scores, result, k=50, n_null=20, seed=0, out_dir=tmp_path)
    pairwise = tables["pairwise"]
    assert len(pairwise) and np.isfinite(pairwise["value"]).all()
    across = pairwise[(pairwise["context_a"] != pairwise["context_b"]) & (pairwise["stat"] == "jaccard")]
    assert len(across) and np.isfinite(across[["null_mean", "null_low", "null_high", "p_value"]].to_numpy()).all()
    assert len(tables["jaccard_curves"]) and len(tables["shared_specific"])
