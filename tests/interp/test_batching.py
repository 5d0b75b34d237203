import pytest
import torch

from interp.batching import TokenBatch, encode, microbatches, pad_ids, pad_token_id, tokenize
from interp.metrics import CandidateAnswers, ExpectedValue

PROMPTS = ["Hi", "The seller asked for", "A longer prompt about buying a used bicycle from"]


def test_right_padding_with_per_prompt_lengths(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    pad = pad_token_id(tiny_model.tokenizer)
    for row, prompt in enumerate(PROMPTS):
        ids = encode(tiny_model, prompt)
        n = len(ids)
        assert batch.tokens[row, :n].tolist() == ids
        assert (batch.tokens[row, n:] == pad).all()
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.tokens.shape[1] - n)
        assert int(batch.lengths[row]) == n and int(batch.answer_pos[row]) == n - 1
    assert batch.tokens.shape[1] == max(len(encode(tiny_model, p)) for p in PROMPTS)
    assert len(batch) == 3 and len(tokenize(tiny_model, "one prompt")) == 1


def test_bos_prepended_once(tiny_model):
    tokenizer = tiny_model.tokenizer
    bos = tokenizer.bos_token_id
    plain = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    assert encode(tiny_model, "Hello") == [bos, *plain]
    assert encode(tiny_model, tokenizer.bos_token + "Hello") == [bos, *plain]
    assert encode(tiny_model, "Hello", prepend_bos=False) == plain
    batch = tokenize(tiny_model, ["Hello", "Hi"], prepend_bos=False)
    assert (batch.tokens[:, 0] != bos).all()


def test_select_rows_trimmed_to_their_longest():
    batch = pad_ids([[5, 6, 7, 8], [5, 6], [9]], pad_id=0)
    picked = batch.select([2, 1])
    assert picked.tokens.tolist() == [[9, 0], [5, 6]]
    assert picked.attention_mask.tolist() == [[1, 0], [1, 1]]
    assert picked.answer_pos.tolist() == [0, 1]
    assert batch.select(slice(1, 3)).tokens.tolist() == [[5, 6], [9, 0]]
    assert batch.select(torch.tensor([True, False, True])).tokens.tolist() == [[5, 6, 7, 8], [9, 0, 0, 0]]
    assert batch.select(torch.tensor([1])).tokens.tolist() == [[5, 6]]


def test_microbatches_cover_every_item_once():
    slices = list(microbatches(10, 4))
    assert slices == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert list(microbatches(3, 8)) == [slice(0, 3)]
    with pytest.raises(ValueError, match="at least 1"):
        list(microbatches(3, 0))


def test_bad_batches_raise():
    with pytest.raises(ValueError, match="zero prompts"):
        pad_ids([], pad_id=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pad_ids([[1, 2], []], pad_id=0)


def test_to_device_keeps_everything():
    batch = pad_ids([[1, 2], [3]], pad_id=0)
    moved = batch.to("cpu")
    assert isinstance(moved, TokenBatch)
    assert torch.equal(moved.tokens, batch.tokens) and torch.equal(moved.answer_pos, batch.answer_pos)


def _padded_vs_alone(model, prompts, texts, values, packed=True):
    """Each prompt's candidate log-probs and expected value, batched with padding vs run alone."""
    metric = ExpectedValue(CandidateAnswers.from_texts(model.tokenizer, texts, values, packed=packed))
    assert not metric.candidates.single_token
    batch = tokenize(model, prompts)
    assert len(set(batch.lengths.tolist())) == len(prompts)  # every prompt padded differently

    def scores(prompt_batch):
        expanded = metric.expand(prompt_batch)
        with torch.no_grad():
            logits = model(expanded.tokens, **expanded.forward_kwargs())
        return metric.candidates.log_probs(logits, expanded), metric(logits, expanded)

    together = scores(batch)
    alone = [torch.cat(parts) for parts in zip(*(scores(tokenize(model, p)) for p in prompts))]
    torch.testing.assert_close(together[0], alone[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(together[1], alone[1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "row-per-candidate"])
def test_padded_and_unpadded_scores_agree(tiny_model, packed):
    _padded_vs_alone(tiny_model, PROMPTS, [" 5", " 50", " 500", " 1,000"], [5, 50, 500, 1000], packed)


@pytest.mark.slow
def test_padded_and_unpadded_scores_agree_smollm2(smollm2):
    prompts = ["I offer the seller", "For this used bicycle, my first offer in dollars is"]
    _padded_vs_alone(smollm2, prompts, [" 50", " 150", " 1,200"], [50, 150, 1200])


def test_take_keeps_the_subclass_the_width_and_every_per_row_field(tiny_model):
    grid = CandidateAnswers.from_texts(tiny_model.tokenizer, [" 5", " 50", " 1,000"], [5, 50, 1000])
    packed = grid.expand(tokenize(tiny_model, PROMPTS))
    rows = torch.tensor([2, 0])
    taken = packed.take(rows)
    assert type(taken) is type(packed) and taken.tokens.shape == (2, packed.tokens.shape[1])
    for name in ("tokens", "attention_mask", "answer_pos", "position_ids", "key_mask", "read_pos"):
        assert torch.equal(getattr(taken, name), getattr(packed, name)[rows])
