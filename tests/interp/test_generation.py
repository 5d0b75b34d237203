from functools import partial

import torch

from interp.generation import generate, reply_ids, reply_text

PROMPTS = ["The bike costs $", "A much longer prompt about what a fair price for the used car would be: $"]


def _token(model, text):
    (token,) = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return token


def test_replies_stop_at_special_tokens_and_lines(tiny_model):
    tok = partial(_token, tiny_model)
    tokenizer = tiny_model.tokenizer
    eos, newline = tokenizer.eos_token_id, tok("\n")
    stops = {eos}
    assert reply_text(tokenizer, [tok("4"), tok("2"), eos, tok("9")], stops) == "42"
    assert reply_text(tokenizer, [tok("x"), tok("y"), tok("z")], stops) == "xyz"
    assert reply_text(tokenizer, [newline, tok("7"), newline, tok("8")], stops) == "\n7"  # leading newline kept
    assert reply_text(tokenizer, [eos], stops) == ""
    # the kept tokens end with the one that stopped the reply (a stop token, or the newline)
    assert reply_ids(tokenizer, [tok("4"), tok("2"), eos, tok("9")], stops) == (tok("4"), tok("2"), eos)
    assert reply_ids(tokenizer, [tok("x"), tok("y"), tok("z")], stops) == (tok("x"), tok("y"), tok("z"))
    assert reply_ids(tokenizer, [newline, tok("7"), newline, tok("8")], stops) == (newline, tok("7"), newline)


def test_generation_is_seeded_and_keeps_each_replys_tokens(tiny_model):
    kwargs = {"n_samples": 2, "max_new_tokens": 3, "temperature": 1.0, "progress": False, "seed": 0}
    state = torch.random.get_rng_state()
    first = generate(tiny_model, PROMPTS, batch_size=4, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert [len(t) for t in first.texts] == [2, 2] and [len(t) for t in first.token_ids] == [2, 2]
    assert generate(tiny_model, PROMPTS, batch_size=4, **kwargs) == first
    stops = (set(tiny_model.tokenizer.all_special_ids) | {tiny_model.tokenizer.eos_token_id}) - {None}
    for texts, ids in zip(first.texts, first.token_ids):
        assert all(reply_text(tiny_model.tokenizer, i, stops) == t for t, i in zip(texts, ids))
