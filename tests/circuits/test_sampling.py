from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from circuits.sampling import SampledAnswers, SampledGap, parse_answer, sample_answers, sampled_gap
from circuits.stats import mann_whitney, smd
from interp.batching import encode
from interp.hooks import attached_hook_count, hooked

PROMPTS = ["The bike costs $", "A much longer prompt about what a fair price for the used car would be: $"]


def _token(model, text):
    (token,) = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return token


def test_sampling_is_seeded_shaped_and_batch_size_free(tiny_model):
    kwargs = {"n_samples": 2, "max_new_tokens": 3, "temperature": 1.0, "progress": False}
    first = sample_answers(tiny_model, PROMPTS, seed=0, batch_size=4, **kwargs)
    assert first.values.shape == (2, 2) and [len(t) for t in first.texts] == [2, 2]
    assert first.prompts == tuple(PROMPTS)
    assert sample_answers(tiny_model, PROMPTS, seed=0, batch_size=3, **kwargs).texts == first.texts
    other = sample_answers(tiny_model, PROMPTS, seed=1, batch_size=4, **kwargs)
    assert other.texts != first.texts
    assert len(set(first.texts[0])) > 1  # samples of one prompt differ from each other
    assert first.settings["seed"] == 0 and first.settings["temperature"] == 1.0


def test_greedy_decoding_repeats_the_same_answer(tiny_model):
    greedy = sample_answers(tiny_model, PROMPTS[:1], n_samples=3, temperature=0, max_new_tokens=3,
                            progress=False)
    assert len(set(greedy.texts[0])) == 1


def test_hooks_fire_at_every_generation_step(tiny_model):
    seven = _token(tiny_model, "7")
    widths = []

    def force_seven(logits, hook):
        widths.append(logits.shape[1])
        forced = torch.full_like(logits, -1e4)
        forced[..., seven] = 0
        return forced

    with hooked(tiny_model, [("unembed.hook_out", force_seven)]):
        answers = sample_answers(tiny_model, PROMPTS, n_samples=2, max_new_tokens=5, batch_size=4,
                                 progress=False)
    assert attached_hook_count(tiny_model) == 0
    assert answers.texts == (("77777",) * 2,) * 2
    np.testing.assert_array_equal(answers.values, 77777.0)
    longest = max(len(encode(tiny_model, p)) for p in PROMPTS)
    assert widths == list(range(longest, longest + 5))  # one forward per new token, each hooked


class Scripted:
    """A stand-in model whose reply to each prompt is a fixed token script (per row, any padding)."""

    def __init__(self, model, scripts: dict[str, list[int]]):
        self.cfg, self.tokenizer = model.cfg, model.tokenizer
        self.lengths = {}
        self.scripts = {}
        for prompt, script in scripts.items():
            ids = tuple(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            self.scripts[ids] = script
        self.calls = 0

    def __call__(self, tokens):
        self.calls += 1
        logits = torch.zeros(*tokens.shape, len(self.tokenizer))
        for row, seq in enumerate(tokens.tolist()):
            ids, script = next((k, v) for k, v in self.scripts.items() if tuple(seq[1:1 + len(k)]) == k)
            start = len(ids)  # the BOS-prefixed prompt's last position
            for step, token in enumerate(script):
                if start + step < tokens.shape[1]:
                    logits[row, start + step, token] = 100.0
        return logits


def test_rows_stop_on_their_own_and_invalid_answers_are_counted(tiny_model):
    tok = partial(_token, tiny_model)
    eos, newline = tiny_model.tokenizer.eos_token_id, tok("\n")
    model = Scripted(tiny_model, {
        "Alpha": [tok("4"), tok("2"), eos, tok("9")],  # stops at EOS
        "Beta": [tok("x"), tok("y"), tok("z"), tok("w")],  # runs to max_new_tokens, not a number
        "Gamma": [newline, tok("7"), newline, tok("8")],  # a leading newline does not stop it
        "Delta": [tok("no"), eos],
    })
    answers = sample_answers(model, ["Alpha", "Beta", "Gamma", "Delta"], n_samples=2, max_new_tokens=3,
                             batch_size=3, progress=False)
    assert answers.texts == (("42",) * 2, ("xyz",) * 2, ("\n7",) * 2, ("no",) * 2)
    np.testing.assert_array_equal(answers.values, [[42, 42], [np.nan, np.nan], [7, 7], [np.nan, np.nan]])
    assert answers.invalid_rate == pytest.approx(0.5)
    frame = answers.to_dataframe()
    assert list(frame.columns) == ["prompt_id", "sample", "text", "value", "valid"]
    assert frame.valid.tolist() == [True, True, False, False, True, True, False, False]
    yes_no = sample_answers(model, ["Delta", "Alpha"], n_samples=1, max_new_tokens=3, answer_type="yes_no",
                            progress=False)
    assert yes_no.values.ravel().tolist()[0] == 0.0 and np.isnan(yes_no.values[1, 0])


def test_finished_rows_leave_the_batch(tiny_model):
    tok = partial(_token, tiny_model)
    model = Scripted(tiny_model, {"Alpha": [tiny_model.tokenizer.eos_token_id], "Beta": [tok("1")] * 4})
    answers = sample_answers(model, ["Alpha", "Beta"], n_samples=1, max_new_tokens=4, progress=False)
    assert answers.texts == (("",), ("1111",))
    assert model.calls == 4


def test_save_load_round_trip(tiny_model, tmp_path):
    answers = sample_answers(tiny_model, PROMPTS, n_samples=2, max_new_tokens=2, temperature=1.0, progress=False)
    loaded = SampledAnswers.load(answers.save(tmp_path / "run"))
    assert loaded.prompts == answers.prompts and loaded.texts == answers.texts
    np.testing.assert_array_equal(loaded.values, answers.values)
    assert loaded.settings == answers.settings
    pd.testing.assert_frame_equal(loaded.to_dataframe(), answers.to_dataframe())
    with pytest.raises(FileNotFoundError, match="missing"):
        SampledAnswers.load(tmp_path / "nothing")


def test_results_are_frozen_and_validated():
    answers = SampledAnswers(("p",), (("1", "x"),), np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError):
        answers.values[0, 0] = 5.0
    with pytest.raises(ValueError, match="n_samples"):
        SampledAnswers(("p", "q"), (("1",),), np.array([[1.0]]))


@pytest.mark.parametrize("kwargs,match", [
    ({"prompts": "one prompt"}, "non-empty sequence"),
    ({"prompts": []}, "non-empty sequence"),
    ({"n_samples": 0}, ">= 1"),
    ({"temperature": -1.0}, "temperature"),
    ({"answer_type": "text"}, "answer_type"),
    ({"max_new_tokens": 600}, "context"),
])
def test_sample_answers_rejects_bad_input(tiny_model, kwargs, match):
    args = {"prompts": PROMPTS, "progress": False} | kwargs
    with pytest.raises(ValueError, match=match):
        sample_answers(tiny_model, args.pop("prompts"), **args)


def test_parse_answer():
    assert parse_answer("$40k", "number") == 40000.0
    assert parse_answer("Yes.", "yes_no") == 1.0
    assert np.isnan(parse_answer("maybe", "yes_no"))
    with pytest.raises(ValueError, match="answer_type"):
        parse_answer("1", "text")


def test_sampled_gap_matches_stats_and_counts_invalid():
    a = np.array([[10.0, 12.0, np.nan], [11.0, 13.0, 9.0]])
    b = np.array([8.0, 9.0, 7.0, np.nan, np.nan, 10.0])
    gap = sampled_gap(a, b)
    va, vb = a[~np.isnan(a)], b[~np.isnan(b)]
    assert gap.smd == pytest.approx(smd(va, vb))
    assert (gap.mann_whitney_u, gap.p_value) == pytest.approx(mann_whitney(va, vb))
    assert (gap.mean_a, gap.mean_b, gap.n_a, gap.n_b) == pytest.approx((11.0, 8.5, 5, 4))
    assert (gap.invalid_share_a, gap.invalid_share_b) == pytest.approx((1 / 6, 1 / 3))
    frame = gap.to_dataframe()
    assert len(frame) == 1 and frame.loc[0, "smd"] == pytest.approx(gap.smd)
    assert isinstance(gap, SampledGap)
    with pytest.raises(ValueError, match="no samples"):
        sampled_gap([], b)


@pytest.mark.slow
def test_smollm2_sampled_numeric_answers(smollm2):
    question = ("I want to buy a used bicycle from Jamal Washington. What should my initial offer be in US "
                "dollars? Reply with a single number only.")
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True) + "$"
    answers = sample_answers(smollm2, [prompt], n_samples=3, max_new_tokens=5, progress=False)
    print("\nsmollm2 sampled answers:", answers.to_dataframe()[["text", "value"]].to_dict("records"))
    assert answers.invalid_rate < 1.0
    assert np.nanmin(answers.values) > 0
