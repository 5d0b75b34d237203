import pytest

from interp.weights import weight_norms


def test_weight_norms_match_the_hugging_face_weights(tiny_model):
    norms = weight_norms(tiny_model)
    assert norms["W_in"].shape == norms["W_gate"].shape == norms["W_out"].shape == (3, 96)
    assert norms["W_O"].shape == (3, 4, 16)
    layer = tiny_model.original_model.model.layers[1]
    mlp, o_proj = layer.mlp, layer.self_attn.o_proj.weight  # out_features x in_features
    assert norms["W_out"][1, 7].item() == pytest.approx(mlp.down_proj.weight[:, 7].norm().item(), rel=1e-5)
    assert norms["W_in"][1, 7].item() == pytest.approx(mlp.up_proj.weight[7].norm().item(), rel=1e-5)
    assert norms["W_gate"][1, 7].item() == pytest.approx(mlp.gate_proj.weight[7].norm().item(), rel=1e-5)
    assert norms["W_O"][1, 2, 5].item() == pytest.approx(o_proj[:, 32 + 5].norm().item(), rel=1e-5)

