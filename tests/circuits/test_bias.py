import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from circuits.bias import (
    answer_candidates,
    check_answer_alignment,
    context_metric,
    group_gaps,
    measure,
    pair_differences,
    paired_gaps,
)
from circuits.contexts import CONTEXTS
from circuits.prompts import build_pairs, build_prompts
from interp.batching import tokenize
from interp.metrics import CandidateAnswers


def synthetic_values(sign=1, seed=0):
    """16 names (4 per race x gender) x 3 variations; White +1.0 and women +0.5 on average."""
    rng = np.random.default_rng(seed)
    rows = []
    for group, shift in (("White", 1.0), ("Black", 0.0)):
        for gender, g_shift in (("woman", 0.5), ("man", 0.0)):
            for i in range(4):
                name = f"{group}-{gender}-{i}"
                person = rng.normal(0, 0.2)
                for v, v_shift in enumerate((0.0, 0.3, -0.3)):
                    rows.append(
                        {
                            "prompt_id": f"{name}|{v}",
                            "context": "ctx",
                            "variation": f"v{v}",
                            "detail": "low",
                            "name": name,
                            "group": group,
                            "gender": gender,
                            "answer_type": "dollars",
                            "sign": sign,
                            "grid_mass": 0.5,
                            "value": shift + g_shift + person + v_shift + rng.normal(0, 0.1),
                        }
                    )
    return pd.DataFrame(rows)


def test_gaps_match_scipy_and_hand_computation():
    values = synthetic_values()
    table = group_gaps(values, n_resamples=300, seed=1).to_dataframe().set_index("contrast")
    white, black = values[values.group == "White"], values[values.group == "Black"]
    race = table.loc["race"]
    assert race["gap"] == pytest.approx(white.value.mean() - black.value.mean())
    pooled = np.sqrt(
        (white.value.var(ddof=1) * (len(white) - 1) + black.value.var(ddof=1) * (len(black) - 1))
        / (len(values) - 2)
    )
    assert race["smd"] == pytest.approx((white.value.mean() - black.value.mean()) / pooled)
    assert race["p_mann_whitney"] == pytest.approx(sps.mannwhitneyu(white.value, black.value).pvalue)
    means = values.groupby("name").agg(value=("value", "mean"), group=("group", "first"))
    expected_p = sps.permutation_test(
        (means.value[means.group == "White"].to_numpy(), means.value[means.group == "Black"].to_numpy()),
        lambda x, y, axis: x.mean(axis) - y.mean(axis),
        n_resamples=300,
        vectorized=True,
        rng=np.random.default_rng(1),
    ).pvalue
    assert race["p_permutation"] == pytest.approx(expected_p)
    assert race["ci_low"] <= race["gap"] <= race["ci_high"] and race["ci_low"] > 0.5
    assert (race["n_names_a"], race["n_names_b"], race["n_variations"]) == (8, 8, 3)
    gender = table.loc["gender"]
    women, men = values[values.gender == "woman"], values[values.gender == "man"]
    assert (gender["group_a"], gender["group_b"]) == ("woman", "man")
    assert gender["gap"] == pytest.approx(women.value.mean() - men.value.mean())
    assert gender["ci_low"] <= gender["gap"] <= gender["ci_high"]


def test_sign_convention_flips_advantage_not_gap():
    up = group_gaps(synthetic_values(sign=1), n_resamples=200).table.set_index("contrast")
    down = group_gaps(synthetic_values(sign=-1), n_resamples=200).table.set_index("contrast")
    assert down.loc["race", "gap"] == pytest.approx(up.loc["race", "gap"])
    assert up.loc["race", "advantage"] == pytest.approx(up.loc["race", "gap"])
    assert down.loc["race", "advantage"] == pytest.approx(-up.loc["race", "gap"])
    assert down.loc["race", "advantage_ci_low"] == pytest.approx(-down.loc["race", "ci_high"])
    assert down.loc["race", "advantage_ci_high"] == pytest.approx(-down.loc["race", "ci_low"])


@pytest.fixture(scope="module")
def small(tiny_model):
    return build_prompts(tiny_model, ["chess", "lending_rate"], details=["low"]).sample(
        variations=1, names_per_cell=1
    )


def test_measure_distributions_and_expected_values(tiny_model, small):
    result = measure(tiny_model, small, batch_size=64, progress=False)
    values, dist = result.values, result.distribution
    assert len(values) == len(small) and values["value"].notna().all()
    totals = dist.groupby("prompt_id")["probability"].sum()
    assert np.allclose(totals, 1.0, atol=1e-5)
    expected = dist.assign(w=dist.probability * dist.candidate_value).groupby("prompt_id")["w"].sum()
    assert np.allclose(values.set_index("prompt_id")["value"].loc[expected.index], expected, rtol=1e-5)
    assert ((values.grid_mass > 0) & (values.grid_mass <= 1)).all()
    again = measure(tiny_model, small, batch_size=9, progress=False)  # other microbatches, same numbers
    assert np.allclose(again.values["value"], values["value"], rtol=1e-4, atol=1e-6)


def test_context_metric_is_differentiable_and_matches_measure(tiny_model, small):
    subset = small.filter(context="lending_rate", gender="woman")
    metric = context_metric(tiny_model, "lending_rate")
    batch = tokenize(tiny_model, subset.texts)
    expanded = metric.expand(batch)
    tiny_model.zero_grad()
    with torch.enable_grad():
        out = metric(tiny_model(expanded.tokens, **expanded.forward_kwargs()), expanded)
        out.sum().backward()
    assert out.shape == (len(subset),) and out.requires_grad
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())
    tiny_model.zero_grad()
    measured = measure(tiny_model, subset, progress=False).values["value"].to_numpy()
    assert np.allclose(out.detach().numpy(), measured, rtol=1e-4)


def test_grids_tokenize_as_continuations_of_their_prompts(tiny_model):
    prompts = build_prompts(tiny_model, details=["numeric"]).sample(variations=1, names_per_cell=1)
    for ctx in prompts.contexts:
        cands = answer_candidates(tiny_model, CONTEXTS[ctx].answer)
        check_answer_alignment(tiny_model, prompts.filter(context=ctx).texts[0], cands)
        if CONTEXTS[ctx].answer.grid.terminated:
            assert all(ids[-1] == tiny_model.tokenizer.eos_token_id for ids in cands.token_ids)
    broken = CandidateAnswers.from_texts(tiny_model.tokenizer, ["s", "t"], [1.0, 0.0])
    with pytest.raises(ValueError, match="tokenizes differently"):
        check_answer_alignment(tiny_model, "The answer is Ye", broken)


def test_paired_differences_over_aligned_pairs(tiny_model, small):
    pairs = build_pairs(tiny_model, small, match_gender=False)
    frame = small.frame.assign(value=np.where(small.frame["group"] == "White", 2.0, 0.5), grid_mass=1.0)
    frame["value"] += np.arange(len(frame)) * 1e-3
    diffs = pair_differences(frame, pairs)
    assert len(diffs) == len(pairs)
    assert np.allclose(diffs["difference"], diffs["value_a"] - diffs["value_b"])
    table = paired_gaps(frame, pairs, n_resamples=200).table.set_index("context")
    for ctx, row in table.iterrows():
        assert row["ci_low"] <= row["gap"] <= row["ci_high"]
        assert row["gap"] == pytest.approx(diffs.loc[diffs.context == ctx, "difference"].mean())
        assert row["advantage"] == pytest.approx(CONTEXTS[ctx].sign * row["gap"])
    with pytest.raises(ValueError, match="not measured"):
        pair_differences(frame[frame.prompt_id != diffs.prompt_id_a.iloc[0]], pairs)
