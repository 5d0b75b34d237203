"""Random-weight models of a given shape (for throughput and memory runs) go through the same code paths."""
import torch

from interp.attribution import attribute
from interp.batching import pad_ids, pad_token_id
from interp.metrics import LogitDiff
from interp.testing import SHAPES, random_model


def test_scaled_down_llama3_8b_shape_runs_attribution():
    shape = SHAPES["llama3-8b-mini"]
    model = random_model("llama3-8b-mini")
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.d_vocab) == (
        shape["num_hidden_layers"], shape["hidden_size"], shape["num_attention_heads"], shape["intermediate_size"],
        shape["vocab_size"])
    full = SHAPES["llama3-8b"]  # the same ratios as the papers' shape
    for s in (full, shape):
        assert s["num_attention_heads"] // s["num_key_value_heads"] == 4
        assert s["intermediate_size"] / s["hidden_size"] == 3.5
    assert full["head_dim"] == shape["head_dim"] == cfg.d_head
    pad = pad_token_id(model.tokenizer)
    clean = pad_ids([[1, 5, 9, 12], [1, 7, 3]], pad)
    corrupt = pad_ids([[1, 6, 9, 12], [1, 8, 3]], pad)
    torch.testing.assert_close(model(clean.tokens), model.original_model(clean.tokens).logits, atol=1e-4, rtol=1e-4)
    result = attribute(model, clean, corrupt, LogitDiff([11], [13]), batch_size=1)
    assert result.scores["neuron"].shape == (cfg.n_layers, cfg.d_mlp)
    assert result.scores["head"].shape == (cfg.n_layers, cfg.n_heads)
    assert all(torch.isfinite(s).all() and s.abs().sum() > 0 for s in result.scores.values())


def test_random_models_are_seeded():
    small = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 1, "head_dim": 16}  # vocabulary: the tokenizer's
    a, b = random_model(small, seed=3), random_model(small, seed=3)
    tokens = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(a(tokens), b(tokens))


def test_a_saved_tokenizer_stands_in_for_the_embedded_model(tmp_path, monkeypatch):
    """``$BIAS_CIRCUITS_TOKENIZER`` (a GPU machine without the embedded model): its tokenizer is used, and the
    embedded model is never looked up."""
    import interp.testing as testing

    small = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 1, "head_dim": 16}
    reference = random_model(small)
    reference.tokenizer.add_tokens(["<only-in-the-saved-tokenizer>"])
    reference.tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv(testing.TOKENIZER_ENV, str(tmp_path))

    def missing():
        raise AssertionError("the embedded model was looked up")

    monkeypatch.setattr(testing, "embedded_model_dir", missing)
    model = random_model(small)
    assert model.tokenizer.convert_tokens_to_ids("<only-in-the-saved-tokenizer>") == len(model.tokenizer) - 1
    assert model.cfg.d_vocab == len(model.tokenizer)
