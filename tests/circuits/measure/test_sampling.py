import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from circuits.measure.sampling import SampledAnswers, format_ids, parse_answer, parse_ids, sample_answers
from interp.batching import encode
from interp.generation import reply_text
from interp.hooks import attached_hook_count, hooked

PROMPTS = ["The bike costs $", "A much longer prompt about what a fair price for the used car would be: $"]


def _token(model, text):
    (token,) = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return token


def test_sampling_is_seeded_shaped_and_deterministic(tiny_model):
    kwargs = {"n_samples": 2, "max_new_tokens": 3, "temperature": 1.0, "progress": False}
    state = torch.random.get_rng_state()
    first = sample_answers(tiny_model, PROMPTS, seed=0, batch_size=4, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert first.values.shape == (2, 2) and [len(t) for t in first.texts] == [2, 2]
    assert first.prompts == tuple(PROMPTS)
    assert sample_answers(tiny_model, PROMPTS, seed=0, batch_size=4, **kwargs).texts == first.texts
    other = sample_answers(tiny_model, PROMPTS, seed=1, batch_size=4, **kwargs)
    assert other.texts != first.texts
    assert len(set(first.texts[0])) > 1  # samples of one prompt differ from each other
    assert first.settings["seed"] == 0 and first.settings["temperature"] == 1.0


def test_first_tokens_follow_the_next_token_distribution(tiny_model):
    """Batched, left-padded, KV-cached sampling draws from the model's exact next-token distribution.

    The tiny model's distribution is flat (no token above 1%), so the reply texts are binned into ten
    bins of about equal mass, in order of probability; a chi-square goodness-of-fit test per prompt."""
    n = 400
    answers = sample_answers(tiny_model, PROMPTS, n_samples=n, max_new_tokens=1, temperature=1.0,
                             batch_size=2 * n, seed=3, progress=False)
    tokenizer = tiny_model.tokenizer
    stop_ids = (set(tokenizer.all_special_ids) | {tokenizer.eos_token_id}) - {None}
    texts = [reply_text(tokenizer, [t], stop_ids) for t in range(len(tokenizer))]
    for prompt, drawn in zip(PROMPTS, answers.texts):
        with torch.no_grad():
            probs = tiny_model(torch.tensor([encode(tiny_model, prompt)]))[0, -1].double().softmax(-1)
        exact = pd.Series(probs.numpy()).groupby(texts).sum().sort_values(ascending=False)
        bins = np.minimum((exact.cumsum().to_numpy() - exact.to_numpy() / 2) * 10, 9).astype(int)
        expected = pd.Series(exact.to_numpy()).groupby(bins).sum().to_numpy() * n
        observed = pd.Series(bins, index=exact.index).loc[list(drawn)].value_counts().reindex(
            range(len(expected)), fill_value=0).to_numpy()
        assert observed.sum() == n and expected.min() > 20
        assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3
        # a sampler truncated to the top tokens would pile every draw into the first bins
        assert observed[-3:].sum() > 0.15 * n


def test_greedy_decoding_repeats_the_same_answer(tiny_model):
    greedy = sample_answers(tiny_model, PROMPTS[:1], n_samples=3, temperature=0, max_new_tokens=3,
                            progress=False)
    assert len(set(greedy.texts[0])) == 1
    with torch.no_grad():
        first = tiny_model(torch.tensor([encode(tiny_model, PROMPTS[0])]))[0, -1].argmax().item()
    assert greedy.texts[0][0].startswith(tiny_model.tokenizer.decode([first]))


def test_cached_batched_decoding_equals_full_forwards(tiny_model):
    """Greedy replies of a left-padded batch, decoded with the KV cache, equal those of one full
    bridge forward per token and prompt (a cache that lost the prompt would not)."""
    greedy = sample_answers(tiny_model, PROMPTS, n_samples=2, temperature=0, max_new_tokens=6, batch_size=4,
                            progress=False)
    stops = (set(tiny_model.tokenizer.all_special_ids) | {tiny_model.tokenizer.eos_token_id}) - {None}
    for prompt, replies in zip(PROMPTS, greedy.texts):
        tokens = torch.tensor([encode(tiny_model, prompt)])
        with torch.no_grad():
            for _ in range(6):
                tokens = torch.cat([tokens, tiny_model(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
        new = tokens[0, len(encode(tiny_model, prompt)):].tolist()
        assert replies == (reply_text(tiny_model.tokenizer, new, stops),) * 2


def test_generation_uses_the_kv_cache_and_bridge_hooks_act(tiny_model):
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
    assert widths == [longest - 1] + [1] * 5  # one prefill, then one cached token per step


def test_ids_round_trip():
    assert parse_ids(format_ids((5, 0, 12))) == (5, 0, 12) and format_ids(()) == ""


def test_rows_stop_at_a_newline_after_text(tiny_model):
    newline, one = _token(tiny_model, "\n"), _token(tiny_model, "1")
    steps = []

    def script(logits, hook):  # after the prefill: "1", "1", a newline, then "1" again
        steps.append(logits.shape[1])
        forced = torch.full_like(logits, -1e4)
        forced[..., newline if len(steps) == 4 else one] = 0
        return forced

    with hooked(tiny_model, [("unembed.hook_out", script)]):
        answers = sample_answers(tiny_model, PROMPTS[:1], n_samples=1, max_new_tokens=6, progress=False)
    assert answers.texts == (("11",),)
    assert answers.token_ids == (((one, one, newline),),)
    assert answers.to_dataframe()["token_ids"].tolist() == [format_ids((one, one, newline))]
    assert len(steps) == 4  # the prefill and three steps, not six


def test_save_load_round_trip(tiny_model, tmp_path):
    answers = sample_answers(tiny_model, PROMPTS, n_samples=2, max_new_tokens=2, temperature=1.0, progress=False)
    loaded = SampledAnswers.load(answers.save(tmp_path / "run"))
    assert loaded.prompts == answers.prompts and loaded.texts == answers.texts
    np.testing.assert_array_equal(loaded.values, answers.values)
    assert loaded.settings == answers.settings
    pd.testing.assert_frame_equal(loaded.to_dataframe(), answers.to_dataframe())
    assert loaded.token_ids == answers.token_ids and len(answers.token_ids[0][0]) >= 1
    with pytest.raises(FileNotFoundError, match="no saved SampledAnswers"):
        SampledAnswers.load(tmp_path / "nothing")


def test_results_are_frozen_and_validated():
    answers = SampledAnswers(("p",), (("1", "x"),), np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError):
        answers.values[0, 0] = 5.0
    with pytest.raises(ValueError, match="n_samples"):
        SampledAnswers(("p", "q"), (("1",),), np.array([[1.0]]))
    with pytest.raises(ValueError, match="token_ids"):
        SampledAnswers(("p",), (("1", "x"),), np.array([[1.0, np.nan]]), token_ids=(((3,),),))


@pytest.mark.parametrize("kwargs,match", [
    ({"prompts": "one prompt"}, "non-empty sequence"),
    ({"prompts": []}, "non-empty sequence"),
    ({"n_samples": 0}, ">= 1"),
    ({"temperature": -1.0}, "temperature"),
    ({"answer_type": "text"}, "answer_type"),
    ({"max_new_tokens": 600}, "context"),
])
@pytest.mark.usefixtures("unchecked")
def test_sample_answers_rejects_bad_input(tiny_model, kwargs, match):
    args = {"prompts": PROMPTS, "progress": False} | kwargs
    with pytest.raises(ValueError, match=match):
        sample_answers(tiny_model, args.pop("prompts"), **args)


@pytest.mark.usefixtures("unchecked")
def test_parse_answer():
    assert parse_answer("$40k", "number") == 40000.0
    assert parse_answer("Yes.", "yes_no") == 1.0
    assert np.isnan(parse_answer("maybe", "yes_no"))
    with pytest.raises(ValueError, match="answer_type"):
        parse_answer("1", "text")


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
