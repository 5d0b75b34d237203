import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from circuits.inputs.prompts import build_prompts, select_prompts
from circuits.measure.agreement import (
    READINGS,
    Agreement,
    _prompt_candidates,
    compare,
    metric_reading,
    placed_values,
    read_reply,
    reading_of,
    readings,
    run_agreement,
    value_tv,
)
from circuits.measure.bias import context_metric
from circuits.measure.stats import UndefinedStatisticWarning, correlation
from circuits.study.cli import build_parser, main
from interp.metrics import CandidateAnswers
from interp.results import ResultFormatError
from interp.testing import tiny_model_dir

SETTINGS = {"max_prompts": 4, "n_samples": 2, "max_new_tokens": 2, "n_resamples": 50, "progress": False}


@pytest.fixture(scope="module")
def agreement(tiny_model):
    return run_agreement(tiny_model, ["chess", "lending_approval"], **SETTINGS)


def _constructed(expected, sampled, groups, summary="mean"):
    """Per-prompt, per-sample and distribution tables of one context from known values (rows of
    ``sampled``); every prompt's metric covers 0.25 of its mass, spread over the values 10 ... 60."""
    prompts = pd.DataFrame({
        "prompt_id": [f"p{i}" for i in range(len(expected))], "context": "c", "variation": "v", "detail": "low",
        "name": [f"{g}{i}" for i, g in enumerate(groups)], "group": groups, "gender": "man",
        "answer_type": "dollars", "sign": 1, "expected": expected, "grid_mass": 0.25, "summary": summary,
    })
    samples = pd.DataFrame([{"prompt_id": f"p{i}", "sample": s, "value": v}
                            for i, row in enumerate(sampled) for s, v in enumerate(row)])
    values = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    distribution = pd.DataFrame([{"prompt_id": p, "candidate_value": v, "mass": 0.25 / len(values)}
                                 for p in prompts["prompt_id"] for v in values])
    return prompts, samples, distribution


def test_compare_on_known_values():
    expected = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    sampled = [[12, np.nan], [18, 22], [np.nan, np.nan], [45, 35], [70, 50], [58, np.nan]]
    groups = ["White", "Black", "White", "Black", "White", "Black"]
    prompts, samples, distribution = _constructed(expected, sampled, groups)
    table, bins = compare(prompts, samples, distribution, n_resamples=50, n_noise=200)
    row = table.iloc[0]
    means = np.array([12, 20, 40, 60, 58])  # prompt p2 has no valid sample and drops out
    paired = np.array([10, 20, 40, 50, 60])
    assert row["invalid_share"] == pytest.approx(4 / 12)
    assert row["n_prompts"] == 6 and row["n_correlated"] == 5 and row["samples_per_prompt"] == 2
    assert row["spearman_rho"] == pytest.approx(stats.spearmanr(paired, means).statistic)
    assert row["pearson_r"] == pytest.approx(stats.pearsonr(paired, means).statistic)
    assert row["mean_abs_difference"] == pytest.approx(np.abs(paired - means).mean())
    assert row["median_sampled"] == 40  # of every valid sample
    assert row["det_gap"] == pytest.approx(30 - 40)
    assert row["sampled_gap"] == pytest.approx(np.mean([12, 70, 50]) - np.mean([18, 22, 45, 35, 58]))
    white, black = [12, 70, 50], [18, 22, 45, 35, 58]
    assert row["sampled_p_mann_whitney"] == pytest.approx(stats.mannwhitneyu(white, black).pvalue)
    assert row["sampled_auc"] == pytest.approx(stats.mannwhitneyu(white, black).statistic / 15)
    # 50 is the only reply on a covered value: 1 of 12 replies; the metric covers 0.25 (1/24 per value)
    assert row["sampled_uncovered"] == pytest.approx(11 / 12) and row["metric_uncovered"] == pytest.approx(0.75)
    assert row["tv"] == pytest.approx(0.5 * (5 / 24 + abs(1 / 12 - 1 / 24) + (11 / 12 - 0.75)))
    assert row["n_bins"] == 8 and bins["bin"].tolist() == ["10", "20", "30", "40", "50", "60", "rare", "other"]
    assert bins["metric"].sum() == pytest.approx(1) and bins["sampled"].sum() == pytest.approx(1)
    assert row["mean_grid_mass"] == 0.25
    assert row["det_ci_low"] <= row["det_gap"] <= row["det_ci_high"]
    assert not row["sign_agrees"]


def test_log_summaries_compare_samples_on_the_log_scale():
    prompts, samples, distribution = _constructed([1.0, 2.0, 3.0, 1.5], [[9, 99], [99, 999], [999, 9999], [9, 9]],
                                                  ["White", "Black", "White", "Black"], summary="log10")
    table, _ = compare(prompts, samples, distribution, n_resamples=20, n_noise=50)
    assert table["mean_sampled"].iloc[0] == pytest.approx(np.mean([1.5, 2.5, 3.5, 1.0]))
    assert table["sampled_gap"].iloc[0] == pytest.approx(np.mean([1, 2, 3, 4]) - np.mean([2, 3, 1, 1]))


def test_tv_is_within_noise_for_draws_from_the_metric_and_not_for_others():
    """Replies drawn from the metric's own distribution pass the noise test (at about its 5% level);
    replies drawn from a shifted one fail it; rare values share a bin; unparsed replies are 'other'."""
    rng = np.random.default_rng(0)
    values = np.array([100.0, 200.0, 500.0, 1000.0, 1e6])
    masses = np.array([[0.3, 0.3, 0.2, 0.1, 0.005], [0.1, 0.2, 0.3, 0.3, 0.005]])  # 0.095 uncovered each
    distribution = pd.DataFrame([{"prompt_id": f"p{i}", "candidate_value": v, "mass": m}
                                 for i in range(2) for v, m in zip(values, masses[i])])

    def replies(probs, n=300):
        outcomes = np.append(values, np.nan)
        return pd.DataFrame([{"prompt_id": f"p{i}", "value": v} for i in range(2)
                             for v in rng.choice(outcomes, size=n, p=np.append(probs[i], 1 - probs[i].sum()))])

    passed = [value_tv(distribution, replies(masses), n_noise=500, seed=s)[0]["tv_within_noise"] for s in range(20)]
    assert sum(passed) >= 16
    shifted = masses + np.array([-0.1, 0, 0, 0.1, 0])  # a tenth of the mass moved from 100 to 1000
    stats_, bins = value_tv(distribution, replies(shifted), n_noise=500)
    assert not stats_["tv_within_noise"] and stats_["tv_p_value"] < 0.01
    assert bins["bin"].tolist() == ["100", "200", "500", "1000", "rare", "other"]
    assert bins.set_index("bin").loc["rare", "metric"] == pytest.approx(0.005)
    assert bins.set_index("bin").loc["other", "metric"] == pytest.approx(0.095)


def test_sign_agreement_and_missing_sampled_gap():
    groups = ["White", "White", "Black", "Black"]
    prompts, samples, dist = _constructed([5.0, 6.0, 1.0, 2.0], [[9, 8], [7, 9], [1, 2], [3, 1]], groups)
    assert bool(compare(prompts, samples, dist, n_resamples=20, n_noise=50)[0]["sign_agrees"].iloc[0])
    prompts, samples, dist = _constructed([5.0, 6.0, 1.0, 2.0], [[9, 8], [7, 9], [np.nan] * 2, [np.nan] * 2], groups)
    with pytest.warns(UserWarning, match="no race gap"):
        row = compare(prompts, samples, dist, n_resamples=20, n_noise=50)[0].iloc[0]
    assert np.isnan(row["sampled_gap"]) and pd.isna(row["sign_agrees"]) and row["invalid_share"] == 0.5


@pytest.mark.usefixtures("unchecked")
def test_correlation_drops_nan_pairs_and_is_nan_when_undefined():
    rho, _ = correlation([1, 2, np.nan, 4], [1, 3, 5, np.nan])
    assert np.isnan(rho)  # only 2 complete pairs left
    with pytest.warns(UndefinedStatisticWarning, match="constant"):
        assert np.isnan(correlation([1, 2, 3], [4, 4, 4], "pearson")[0])
    r, p = correlation([1, 2, 3, 4], [2, 4, 5, 9], "pearson")
    assert (r, p) == pytest.approx(tuple(stats.pearsonr([1, 2, 3, 4], [2, 4, 5, 9])))
    with pytest.raises(ValueError, match="spearman"):
        correlation([1, 2, 3], [1, 2, 3], "kendall")


@pytest.mark.parametrize("prefix,text,answer_type,value", [
    ("Probability of winning: 0.", "35", "number", 0.35),
    ("Probability of winning: 0.", " Orbit", "number", np.nan),  # the prefix's digits alone are no answer
    ("Recommended loan amount: $", "12,500 for the kitchen", "number", 12500),
    ("Chance of winning: ", "40%", "number", 40),
    ("Decision:", " No.", "yes_no", 0),
])
def test_read_reply_reads_after_the_prefix(prefix, text, answer_type, value):
    np.testing.assert_equal(read_reply(prefix, text, answer_type), value)


def test_per_context_cap_balances_cells_and_names(tiny_model):
    prompts = build_prompts(tiny_model, ["chess", "sports"], details=["low"])
    capped = select_prompts(prompts, per_context=8, seed=3)
    frame = capped.frame
    assert frame.groupby("context").size().tolist() == [8, 8]
    assert (frame.groupby(["context", "group", "gender"]).size() == 2).all()
    assert not frame.duplicated(["context", "name"]).any()
    assert capped.frame.equals(select_prompts(prompts, per_context=8, seed=3).frame)


def test_frames_are_well_formed(agreement):
    table, per_prompt = agreement.to_dataframe(), agreement.prompts
    assert table["context"].tolist() == ["chess", "lending_approval"]
    assert (table["n_prompts"] == 4).all() and (table["samples_per_prompt"] == 2).all()
    assert len(per_prompt) == 8 and (per_prompt["n_samples"] == 2).all()
    assert per_prompt["expected"].between(0, 1).all() and per_prompt["expected"].notna().all()
    assert len(agreement.samples) == 16 and set(agreement.samples["prompt_id"]) == set(per_prompt["prompt_id"])
    for context, row in table.set_index("context").iterrows():
        values = agreement.samples.loc[agreement.samples["prompt_id"].str.startswith(context + "|"), "value"]
        assert row["invalid_share"] == pytest.approx(values.isna().mean())
    assert np.isfinite(table["det_gap"]).all()
    assert table["tv"].between(0, 1).all() and table["tv_noise_p95"].between(0, 1).all()
    assert (table["tv_within_noise"] == (table["tv"] <= table["tv_noise_p95"])).all()
    assert set(agreement.bins["context"]) == set(table["context"])
    assert set(agreement.bins["reading"]) == {"metric", "parsed"}
    assert np.allclose(agreement.bins.groupby(["context", "reading"])[["metric", "sampled"]].sum(), 1)
    assert table["tv_parsed"].between(0, 1).all()
    shares = table[[f"{k}_share" for k in READINGS]]
    assert np.allclose(shares.sum(1), 1)
    samples = agreement.samples
    assert set(samples["reading"]) <= set(READINGS)
    assert (samples["reading"] == reading_of(samples["metric_value"], samples["value"])).all()
    # every reply the metric covers holds one of its prompt's scored values
    dist = agreement.distribution
    covered = samples.dropna(subset=["metric_value"])
    scored = set(zip(dist["prompt_id"], dist["candidate_value"].round(6)))
    assert all((p, round(v, 6)) in scored for p, v in zip(covered["prompt_id"], covered["metric_value"]))
    assert set(dist["prompt_id"]) == set(per_prompt["prompt_id"])
    assert table["det_ci_low"].le(table["det_gap"]).all() and table["det_gap"].le(table["det_ci_high"]).all()


def test_save_and_load_round_trip(agreement, tmp_path):
    loaded = Agreement.load(agreement.save(tmp_path / "a"))
    pd.testing.assert_frame_equal(loaded.to_dataframe(), agreement.to_dataframe())
    pd.testing.assert_frame_equal(loaded.samples, agreement.samples)
    pd.testing.assert_frame_equal(loaded.bins, agreement.bins)
    pd.testing.assert_frame_equal(loaded.distribution, agreement.distribution)
    assert loaded.settings == agreement.settings
    with pytest.raises(FileNotFoundError, match="no saved Agreement"):
        Agreement.load(tmp_path / "missing")


def test_an_agreement_of_the_older_format_is_refused(agreement, tmp_path):
    """Saved before the result base: the same tables, settings.json without a kind or format."""
    out = agreement.save(tmp_path / "old")
    (out / "settings.json").write_text(json.dumps(agreement.settings, default=str))
    with pytest.raises(ResultFormatError, match=r"of kind unknown \(an older version"):
        Agreement.load(out)


def test_cli_is_deterministic_and_each_context_stands_alone(agreement, tmp_path, capsys):
    """The CLI on chess alone repeats, sample for sample, the chess rows of the two-context run."""
    out = tmp_path / "cli"
    code = main(["agreement", "--model", str(tiny_model_dir()), "--device", "cpu", "--contexts", "chess",
                 "--max-prompts", "4", "--samples", "2", "--max-new-tokens", "2", "--resamples", "50",
                 "--out", str(out), "--no-progress"])
    assert code == 0 and "chess" in capsys.readouterr().out
    loaded = Agreement.load(out)
    chess = agreement.samples[agreement.samples["prompt_id"].str.startswith("chess|")].reset_index(drop=True)
    pd.testing.assert_frame_equal(loaded.samples, chess)
    pd.testing.assert_frame_equal(loaded.to_dataframe(), agreement.to_dataframe().iloc[:1])


@pytest.mark.parametrize("args,message", [
    (["--contexts", "poker"], "unknown context 'poker'"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--max-prompts", "0"], "--max-prompts must be at least 1"),
    (["--temperature", "-1"], "--temperature must be at least 0"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = main(["agreement", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err


def test_cli_help_explains_agreement(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["agreement", "--help"])
    text = capsys.readouterr().out
    assert "Spearman" in text and "--max-prompts" in text and "lending_amount" in text
    flat = " ".join(text.replace("-\n", "-").split())
    assert "total-variation distance" in flat and "within noise" in flat


def test_metric_reading_is_the_metric_event():
    """A reply is a candidate when its tokens start with the candidate's and the stop term holds (the
    next token continues no number there); a final candidate needs no stop term; a reply cut right
    after a candidate that needs one is not read."""
    cands = CandidateAnswers(("1", "10", "5", "12"), (1.0, 10.0, 5.0, 12.0), ((1,), (1, 0), (5,), (1, 2, 4)),
                             ends=((0, 2), None, (7,), (9,)))
    replies = [(1, 9), (1, 0, 3), (1, 2, 4, 8), (1, 2, 4, 9), (1, 2, 3), (1,), (1, 50), (5, 7), (8,), (5,), ()]
    got = metric_reading(cands, replies, {50})
    assert got.tolist() == [0, 1, 3, -1, -1, -1, 0, -1, -1, -1, -1]


def test_metric_reading_matches_the_scored_answers(tiny_model):
    """On the tiny model's own answer set: each candidate followed by a stop token reads as itself,
    followed by one of its continuations as another candidate or none; yes/no forms read as themselves."""
    eos = tiny_model.tokenizer.eos_token_id
    for context in ("chess", "lending_approval"):
        prompts = build_prompts(tiny_model, [context], details=["low"]).frame["prompt_text"][:2].tolist()
        cands = _prompt_candidates(tiny_model, context_metric(tiny_model, context).candidates, prompts)[1]
        paths = [tuple(p) for p in cands.token_ids]
        stopped = metric_reading(cands, [p + (eos,) for p in paths], {eos})
        assert stopped.tolist() == list(range(len(paths)))
        ends = cands.ends or (None,) * len(paths)
        continued = [(i, p + (e[0],)) for i, (p, e) in enumerate(zip(paths, ends)) if e]
        if continued:
            other = metric_reading(cands, [r for _, r in continued], {eos})
            assert all(j != i for (i, _), j in zip(continued, other))


def test_reading_categories_and_examples():
    metric = [1.0, 1.0, np.nan, 0.0, np.nan, np.nan]
    parsed = [1.0, 1.5, 7.0, np.nan, np.nan, 3.0]
    kinds = reading_of(metric, parsed).tolist()
    assert kinds == ["same", "value_differs", "parsed_only", "metric_only", "neither", "parsed_only"]
    samples = pd.DataFrame({"prompt_id": ["c|a"] * 6, "text": ["1", "1.50", "x 7", "0", "hm", "x 7"],
                            "reading": kinds})
    table = readings(samples).set_index("reading")
    assert table.loc["parsed_only", "n"] == 2 and table.loc["parsed_only", "share"] == pytest.approx(2 / 6)
    assert table.loc["parsed_only", "examples"] == "'x 7' x2" and table["share"].sum() == pytest.approx(1)


def test_compare_reads_tv_by_the_metric_reading_when_given():
    """With ``metric_value``, ``tv`` bins replies as the metric reads them and ``tv_parsed`` as parsed."""
    prompts, samples, distribution = _constructed([10.0, 20.0], [[10, 15, np.nan], [20, 20.5, 30]],
                                                  ["White", "Black"])
    samples["metric_value"] = [10, 10, np.nan, 20, 20, 30]  # "15" is a range read as 10, "20.5" as 20
    with pytest.warns(UserWarning):
        row = compare(prompts, samples, distribution, n_resamples=20, n_noise=50)[0].iloc[0]
    assert row["sampled_uncovered"] == pytest.approx(1 / 6)
    assert row["sampled_uncovered_parsed"] == pytest.approx(3 / 6)
    assert row["value_differs_share"] == pytest.approx(2 / 6) and row["same_share"] == pytest.approx(3 / 6)
    # metric bins: 1/24 on each of 10 ... 60, 0.75 other; read by the metric 10, 10, 20, 20, 30 and one other
    assert row["tv"] == pytest.approx(0.5 * (2 * (2 / 6 - 1 / 24) + (1 / 6 - 1 / 24) + 3 / 24 + (0.75 - 1 / 6)))
    assert row["tv_parsed"] == pytest.approx(0.5 * (3 * (1 / 6 - 1 / 24) + 3 / 24 + (0.75 - 3 / 6)))


def test_parsed_values_in_a_bounded_answers_range_are_filed_under_it():
    """A parsed reply inside a bounded answer's range counts as that answer, and so does a covered
    complete value inside it (a parsed "52,500" cannot tell "52500" from "52,5..."): ``value_tv``
    bins them together; outside every range, or on a prompt without ranges, a value stays as parsed."""
    distribution = pd.DataFrame({
        "prompt_id": ["a", "a", "b"], "candidate_value": [52500.0, 52550.0, 52500.0], "mass": [0.3, 0.6, 0.9],
        "value_low": [52500.0, 52500.0, 52500.0], "value_high": [52500.0, 52600.0, 52500.0]})
    samples = pd.DataFrame({"prompt_id": ["a", "a", "a", "a", "b"],
                            "value": [52537.0, 52500.0, 52600.0, np.nan, 52537.0]})
    placed = placed_values(distribution, samples)
    assert np.array_equal(placed, [52550.0, 52550.0, 52600.0, np.nan, 52537.0], equal_nan=True)
    stats, bins = value_tv(distribution, samples, n_noise=50)
    table = bins.set_index("bin")
    assert table.loc["52550", "sampled"] == pytest.approx(2 / 5)
    assert table.loc["other", "sampled"] == pytest.approx(3 / 5)
    assert table.loc["52550", "metric"] == pytest.approx(0.9 * 4 / 5)  # prompt a's 0.3 + 0.6, a's 4 of 5 replies
    assert np.array_equal(placed_values(distribution.drop(columns=["value_low", "value_high"]), samples),
                          samples["value"], equal_nan=True)
