import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from circuits.inputs.contexts import CONTEXTS, AnswerFormat, AnswerGrid
from circuits.inputs.prompts import build_pairs, build_prompts, select_prompts, span_aligned
from circuits.measure.bias import (
    EXPANSION_BUDGET,
    EXPANSION_DEFAULT,
    MIN_ANSWER,
    MIN_MASS,
    Expansion,
    Measurement,
    answer_candidates,
    check_answer_alignment,
    context_metric,
    group_gaps,
    measure,
)
from circuits.measure.parsing import parse_number
from interp.batching import tokenize
from interp.hooks import hooked
from interp.metrics import CandidateAnswers, PromptCandidates


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


TINY = Expansion(max_nodes=24, per_round=8, target=1.0, min_mass=1e-6)  # small trees, grown to their budget


@pytest.fixture(scope="module")
def small(tiny_model):
    return select_prompts(build_prompts(tiny_model, ["chess", "lending_rate"], details=["low"]), variations=1,
                          names_per_cell=1)


def test_measure_distributions_and_expected_values(tiny_model, small):
    result = measure(tiny_model, small, batch_size=64, progress=False, expansion=TINY)
    values, dist = result.values, result.distribution
    assert len(values) == len(small) and values["value"].notna().all()
    totals = dist.groupby("prompt_id")["probability"].sum()
    assert np.allclose(totals, 1.0, atol=1e-5)
    by_prompt = values.set_index("prompt_id")
    expected = dist.assign(w=dist.probability * dist.candidate_value).groupby("prompt_id")["w"].sum()
    assert np.allclose(by_prompt["value_mean"].loc[expected.index], expected, rtol=1e-5)
    log10 = dist.assign(w=dist.probability * np.log10(1 + dist.candidate_value)).groupby("prompt_id")["w"].sum()
    assert np.allclose(by_prompt["value_log10"].loc[log10.index], log10, rtol=1e-5)
    assert np.allclose(dist.groupby("prompt_id")["mass"].sum().loc[by_prompt.index], by_prompt["grid_mass"], rtol=1e-5)
    assert result.settings["summary"] == {"chess": "mean", "lending_rate": "mean"}
    assert np.allclose(values["value"], values["value_mean"])
    assert ((values.grid_mass > 0) & (values.grid_mass <= 1)).all()
    parts = values[["grid_mass", "other_mass", "tail_mass"]]
    assert (parts >= -1e-6).all().all() and np.allclose(parts.sum(1), 1.0)
    lo = dist.groupby("prompt_id")["candidate_value"].min().loc[by_prompt.index]
    hi = dist.groupby("prompt_id")["candidate_value"].max().loc[by_prompt.index]
    assert ((by_prompt["value_median"] >= lo) & (by_prompt["value_median"] <= hi)).all()
    chess = dist[dist.context == "chess"]
    digits = chess[chess.candidate.str.match(r"^\d+$")]  # "0." is in the prefix
    assert len(digits) and np.allclose(digits.candidate_value, ("0." + digits.candidate).astype(float))
    again = measure(tiny_model, small, batch_size=9, progress=False, expansion=TINY)  # other microbatches
    assert np.allclose(again.values["value"], values["value"], rtol=1e-4, atol=1e-6)
    part = measure(tiny_model, small.filter(gender="woman"), progress=False, expansion=TINY).values
    assert np.allclose(part["value"], by_prompt.loc[part["prompt_id"], "value"], rtol=1e-4, atol=1e-6)


def test_answer_batches_that_run_out_of_memory_are_halved_with_the_same_values(tiny_model, monkeypatch):
    """Out of memory (simulated) in the number trees' and the shared candidates' forwards: each halves its
    batch, warns, and every prompt's values come out as with enough memory."""
    import warnings

    import circuits.measure.bias as bias

    prompts = select_prompts(build_prompts(tiny_model, ["chess", "lending_approval"], details=["low"]), variations=1,
                             names_per_cell=1)
    expansion = Expansion(max_nodes=12, per_round=4, target=1.0, min_mass=1e-6, batch_size=8)  # a cache of its own
    reference = measure(tiny_model, prompts, batch_size=8, expansion=expansion, keep_answers=False).values
    real_expand, real_score = bias.expand_each, CandidateAnswers.score_prefilled  # the unmodified model's
    sizes = []

    def small_memory(real):
        def run(model, batch, *args, **kwargs):
            sizes.append(len(batch))
            if len(batch) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return real(model, batch, *args, **kwargs)
        return run

    monkeypatch.setattr(bias, "expand_each", small_memory(real_expand))
    monkeypatch.setattr(CandidateAnswers, "score_prefilled", lambda self, model, batch, **kw:
                        small_memory(lambda m, b, **k: real_score(self, m, b, **k))(model, batch, **kw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shrunk = measure(tiny_model, prompts, batch_size=8, expansion=expansion, keep_answers=False).values
    assert sum("out of memory at answer batch size" in str(w.message) for w in caught) == 2  # one per context
    assert max(sizes) > 2 and sizes[-1] <= 2
    pd.testing.assert_frame_equal(shrunk, reference, check_exact=False, rtol=1e-4, atol=1e-6)


def test_expansion_takes_its_answer_types_budget_unless_given_one():
    """None fields take the answer type's defaults (dollars grow further and stop sooner); given
    fields are kept."""
    from circuits.inputs.contexts import get_context
    from circuits.measure.bias import _budget

    dollars, rank = get_context("housing_rent").answer, get_context("sports").answer
    floors = {"min_mass": MIN_MASS, "min_answer": MIN_ANSWER}
    target, nodes = EXPANSION_BUDGET["dollars"]
    assert _budget(Expansion(), dollars) == {"target": target, "max_nodes": nodes, **floors}
    assert _budget(Expansion(), rank) == {"target": EXPANSION_DEFAULT[0], "max_nodes": EXPANSION_DEFAULT[1], **floors}
    assert nodes > EXPANSION_DEFAULT[1] and target < EXPANSION_DEFAULT[0]
    assert _budget(Expansion(max_nodes=8, min_answer=1e-3), dollars) == {
        "target": target, "max_nodes": 8, "min_mass": MIN_MASS, "min_answer": 1e-3}


def test_a_measurement_round_trips_and_an_older_one_is_refused(tiny_model, small, tmp_path):
    result = measure(tiny_model, small, progress=False, expansion=TINY)
    loaded = Measurement.load(result.save(tmp_path / "m"))
    pd.testing.assert_frame_equal(loaded.to_dataframe(), result.to_dataframe())
    pd.testing.assert_frame_equal(loaded.distribution, result.distribution)
    assert loaded.settings == json.loads(json.dumps(result.settings))
    old = tmp_path / "old"  # as saved before the result base: the tables and measurement.json
    old.mkdir()
    result.values.to_parquet(old / "values.parquet")
    (old / "measurement.json").write_text(json.dumps(result.settings))
    with pytest.raises(FileNotFoundError, match="holds no saved Measurement .*older version"):
        Measurement.load(old)


def test_dollars_default_to_expected_log10_and_yes_no_to_p_yes(tiny_model):
    prompts = select_prompts(build_prompts(tiny_model, ["lending_amount", "lending_approval"], details=["low"]),
                             variations=1, names_per_cell=1)
    result = measure(tiny_model, prompts, progress=False, expansion=TINY)
    values = result.values.set_index("context")
    assert result.settings["summary"] == {"lending_amount": "log10", "lending_approval": "mean"}
    assert result.settings["budget"] == {"lending_amount": {"target": 1.0, "max_nodes": 24, "min_mass": 1e-6,
                                                            "min_answer": MIN_ANSWER}}
    assert np.allclose(values.loc["lending_amount", "value"], values.loc["lending_amount", "value_log10"])
    yes_no = values.loc["lending_approval"]
    assert yes_no["value_log10"].isna().all() and ((yes_no["value"] >= 0) & (yes_no["value"] <= 1)).all()
    dist = result.distribution[result.distribution.context == "lending_approval"]
    assert {" Yes", "Yes", " yes", " YES", "**Yes", " No", "No", " no", " NO", "**No"} <= set(dist.candidate)
    p_yes = dist.assign(w=dist.probability * dist.candidate_value).groupby("prompt_id")["w"].sum()
    assert np.allclose(result.values.set_index("prompt_id").loc[p_yes.index, "value"], p_yes, rtol=1e-5)
    assert np.allclose(yes_no[["grid_mass", "other_mass", "tail_mass"]].sum(1), 1.0)


def test_bounded_dollar_answers_are_valued_at_their_ranges_middle(tiny_model):
    """The distribution flags bounded answers, values each at parse_number of it plus its grammar fill
    (its range from its digits zeroed to twice the midpoint less that), and ``bounded_mass`` is their
    share of ``grid_mass``; ``Expansion(bounded=False)`` expands every answer to its end. (The tiny
    model's numbers rarely reach the dollars' 2 significant digits, ``SIGNIFICANT``, within a small
    budget, so this bounds at 1.)"""
    from circuits.measure.bias import SIGNIFICANT, _grammar

    prompts = select_prompts(build_prompts(tiny_model, ["lending_amount"], details=["low"]), variations=1,
                             names_per_cell=1)
    result = measure(tiny_model, prompts, progress=False, expansion=dataclasses.replace(TINY, significant=1))
    dist, values = result.distribution, result.values.set_index("prompt_id")
    bounded = dist[dist["bounded"]]
    assert SIGNIFICANT["dollars"] == 2 and len(bounded) and (~dist["bounded"]).any()
    grammar = _grammar(tiny_model.tokenizer, "dollars")
    for row in bounded.itertuples():
        fill = grammar.fill(grammar.state_of(row.candidate))
        assert fill is not None and row.candidate_value == pytest.approx(parse_number(row.candidate + fill))
        low = parse_number(row.candidate + "".join("0" if c.isdigit() else c for c in fill))
        assert row.value_low == pytest.approx(low) and row.value_high == pytest.approx(2 * row.candidate_value - low)
    exact = dist[~dist["bounded"]]
    assert (exact["value_low"] == exact["candidate_value"]).all() and (exact["value_high"] == exact["value_low"]).all()
    share = bounded.groupby("prompt_id")["mass"].sum().reindex(values.index, fill_value=0.0)
    assert np.allclose(values["bounded_mass"], share) and (values["bounded_mass"] <= values["grid_mass"]).all()
    off = measure(tiny_model, prompts, progress=False, expansion=dataclasses.replace(TINY, bounded=False))
    assert not off.distribution["bounded"].any() and (off.values["bounded_mass"] == 0).all()


def test_answers_beyond_a_scale_count_at_its_end(tiny_model):
    """A rank on a scale (1 to 5 here: the tiny model's numbers are short): every answer is valued on
    the scale, and a partial number already past 5 is one bounded answer valued 5, exactly (no range
    to place replies in); they and complete numbers below 1 are flagged beyond the scale."""
    prompts = select_prompts(build_prompts(tiny_model, ["sports"], details=["low"]), variations=1, names_per_cell=1)
    rank = prompts.answers["sports"]
    assert rank.scale == (1.0, 100.0)
    prompts = dataclasses.replace(prompts, answers={"sports": dataclasses.replace(rank, scale=(1.0, 5.0))})
    result = measure(tiny_model, prompts, progress=False, expansion=TINY)
    dist, values = result.distribution, result.values.set_index("prompt_id")
    assert dist["candidate_value"].between(1, 5).all()
    digits = dist["candidate"].str.extract(r"(\d+)")[0].astype(float)
    past, within = dist[digits > 5], dist[digits <= 5]
    assert len(past) and past["bounded"].all() and (past["candidate_value"] == 5).all()
    assert (past["value_low"] == 5).all() and (past["value_high"] == 5).all()
    assert (within["candidate_value"] == within["candidate"].map(parse_number).clip(1, 5)).all()
    raw = dist["candidate"].map(parse_number)
    beyond = (raw > 5) | (raw < 1)
    assert (dist["beyond_scale"] == beyond).all()
    share = dist[beyond].groupby("prompt_id")["mass"].sum().reindex(values.index, fill_value=0.0)
    assert np.allclose(values["beyond_scale_mass"], share) and (values["beyond_scale_mass"] > 0).all()


def test_yes_no_forms_exclude_each_other(tiny_model):
    cands = answer_candidates(tiny_model, CONTEXTS["lending_approval"].answer)
    ids = cands.token_ids
    assert not any(a != b and b[: len(a)] == a for a in ids for b in ids)
    assert set(cands.values) == {0.0, 1.0} and cands.answer_tokens == tuple(sorted({t[0] for t in ids}))


def test_yes_no_prompts_score_alike_prefilled_and_through_the_bridge(tiny_model, monkeypatch):
    """On the unmodified model a yes/no context is scored onto prefilled prompts; with a hook attached
    (here one that changes nothing) through the bridge's forward: the same values either way."""
    prompts = select_prompts(build_prompts(tiny_model, ["lending_approval"], details=["low"]), variations=2,
                             names_per_cell=2)
    calls = []
    real = CandidateAnswers.score_prefilled
    monkeypatch.setattr(CandidateAnswers, "score_prefilled", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = measure(tiny_model, prompts, batch_size=4, progress=False).values
    assert calls
    calls.clear()
    with hooked(tiny_model, [("blocks.0.hook_resid_pre", lambda x, hook: x)]):
        bridge = measure(tiny_model, prompts, batch_size=4, progress=False).values
    assert not calls
    for column in ("value", "grid_mass", "other_mass"):
        np.testing.assert_allclose(plain[column], bridge[column], rtol=1e-4, atol=1e-6)


def test_context_metric_is_differentiable_and_matches_measure(tiny_model, small):
    subset = small.filter(context="lending_rate", gender="woman")
    metric = context_metric(tiny_model, "lending_rate", expansion=TINY)
    assert isinstance(metric.candidates, PromptCandidates)
    batch = tokenize(tiny_model, subset.texts)
    own = metric.candidates.of(batch)  # each prompt its own answers
    assert all(c.n_nodes > 0 and any(c.ends) for c in own) and own[0].token_ids != own[1].token_ids
    expanded = metric.expand(batch)
    tiny_model.zero_grad()
    with torch.enable_grad():
        out = metric(tiny_model(expanded.tokens, **expanded.forward_kwargs()), expanded)
        out.sum().backward()
    assert out.shape == (len(subset),) and out.requires_grad
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())
    tiny_model.zero_grad()
    measured = measure(tiny_model, subset, progress=False, expansion=TINY).values["value"].to_numpy()
    assert np.allclose(out.detach().numpy(), measured, rtol=1e-4)
    assert context_metric(tiny_model, "lending_rate", expansion=TINY).candidates is metric.candidates  # cached
    log10 = context_metric(tiny_model, "lending_rate", summary="log10", expansion=TINY)
    assert log10.summary == "log10" and log10.candidates is metric.candidates


def test_answers_tokenize_as_continuations_of_their_prompts(tiny_model):
    prompts = select_prompts(build_prompts(tiny_model, details=["numeric"]), variations=1, names_per_cell=1)
    for ctx in prompts.contexts:
        cands = context_metric(tiny_model, ctx, expansion=TINY).candidates
        text = prompts.filter(context=ctx).texts[0]
        if isinstance(cands, PromptCandidates):
            cands = cands.of(tokenize(tiny_model, [text]))[0]
        check_answer_alignment(tiny_model, text, cands)
    broken = CandidateAnswers.from_texts(tiny_model.tokenizer, ["s", "t"], [1.0, 0.0])
    with pytest.raises(ValueError, match="tokenizes differently"):
        check_answer_alignment(tiny_model, "The answer is Ye", broken)


def test_a_fixed_grid_is_still_scored_as_given(tiny_model):
    answer = AnswerFormat("rank", "Reply with a rank.", "Rank: #", AnswerGrid.numbers((1, 10, 100), terminated=True))
    cands = answer_candidates(tiny_model, answer)
    assert cands.texts == tuple(t + tiny_model.tokenizer.eos_token for t in ("1", "10", "100"))
    assert all(ids[-1] == tiny_model.tokenizer.eos_token_id for ids in cands.token_ids)


def test_answers_are_derived_on_the_unmodified_model_only(tiny_model, small):
    """A prompt first seen while hooks are attached (an ablation, a patch) cannot get its answers:
    they would be the modified model's; prompts passed to context_metric are derived right away."""
    expansion = Expansion(max_nodes=8, per_round=4, target=1.0, min_mass=1e-6)
    rows = small.filter(context="chess")
    metric = context_metric(tiny_model, "chess", expansion=expansion, prompts=rows)
    assert len(metric.candidates.sets) == len(rows)
    batch = tokenize(tiny_model, rows.texts)
    other = tokenize(tiny_model, [rows.texts[0].replace(rows.frame["first_name"].iloc[0], "Zed")])
    with hooked(tiny_model, [("blocks.0.hook_resid_post", lambda x, hook: x)]):
        metric.expand(batch)  # already derived
        with pytest.raises(RuntimeError, match="hooks attached"):
            metric.expand(other)


def test_a_templates_prompts_share_their_answers_so_pairs_expand_alike(tiny_model, small):
    from interp.attribution import attribute

    expansion = Expansion(max_nodes=10, per_round=5, target=1.0, min_mass=1e-6)
    rows = small.filter(context="lending_rate")
    metric = context_metric(tiny_model, "lending_rate", expansion=expansion, prompts=rows)
    sets = metric.candidates.of(tokenize(tiny_model, rows.texts))
    assert all(s is sets[0] for s in sets)  # one template here
    pairs = build_pairs(tiny_model, rows, match_gender=False)
    metric = span_aligned(metric)  # pairs of names of unequal length carry fillers
    a, b = metric.expand(pairs.clean), metric.expand(pairs.corrupt)
    assert a.tokens.shape == b.tokens.shape and torch.equal(a.cand_ids, b.cand_ids)
    result = attribute(tiny_model, pairs.clean, pairs.corrupt, metric, kinds=("neuron",), batch_size=4)
    assert torch.isfinite(result.metric_clean).all()


def test_smollm2_yes_no_answers_score_alike_prefilled_and_through_the_bridge(smollm2):
    """SmolLM2's chat prompts (system prompt and header shared, prefilled once): the yes/no forms'
    log-probabilities and the other-mass equal the bridge's packed forward."""
    from interp.batching import encode, pad_ids, pad_token_id

    prompts = build_prompts(smollm2, ["lending_approval"], details=["low"], seed=0)
    cands = answer_candidates(smollm2, CONTEXTS["lending_approval"].answer)
    batch = pad_ids([encode(smollm2, t) for t in prompts.texts[:4]], pad_token_id(smollm2.tokenizer))
    assert cands.packed and not cands.single_token
    with torch.no_grad():
        want = cands.score(smollm2, batch, other=True)
    got = cands.score_prefilled(smollm2, batch, other=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
