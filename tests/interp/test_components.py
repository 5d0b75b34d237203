import pandas as pd
import pytest
import torch

from interp.components import ComponentSet, ComponentShape, Head, Neuron


def test_set_algebra():
    a = ComponentSet([Neuron(0, 1), Neuron(1, 2), Head(0, 3)])
    b = ComponentSet([Neuron(1, 2), Head(2, 0)])
    assert a | b == ComponentSet([Neuron(0, 1), Neuron(1, 2), Head(0, 3), Head(2, 0)])
    assert a & b == ComponentSet([Neuron(1, 2)])
    assert a - b == ComponentSet([Neuron(0, 1), Head(0, 3)])
    assert a.of_kind("head") == ComponentSet([Head(0, 3)])
    assert a.by_hook() == {"blocks.0.attn.hook_z": [3], "blocks.0.mlp.hook_post": [1], "blocks.1.mlp.hook_post": [2]}


def test_top_k_single_and_mixed():
    neurons = torch.tensor([[0.1, 5.0, -7.0], [2.0, 0.0, 0.3]])
    heads = torch.tensor([[4.0], [-1.0]])
    assert ComponentSet.top_k(neurons, 2, kind="neuron") == ComponentSet([Neuron(0, 1), Neuron(1, 0)])
    assert ComponentSet.top_k(neurons, 1, kind="neuron", absolute=True) == ComponentSet([Neuron(0, 2)])
    mixed = ComponentSet.top_k({"neuron": neurons, "head": heads}, 2)
    assert mixed == ComponentSet([Neuron(0, 1), Head(0, 0)])
    with pytest.raises(ValueError, match="k=9 is out of range"):
        ComponentSet.top_k(neurons, 9, kind="neuron")
    with pytest.raises(ValueError, match="needs kind"):
        ComponentSet.top_k(neurons, 1)


@pytest.mark.usefixtures("unchecked")
def test_out_of_range_is_a_clear_error():
    shape = ComponentShape(n_layers=3, d_mlp=96, n_heads=4)
    with pytest.raises(IndexError, match="head index 4 is out of range"):
        ComponentSet([Head(0, 4)]).validate(shape)
    with pytest.raises(IndexError, match="layer 3 is out of range"):
        ComponentSet([Neuron(3, 0)]).validate(shape)
    with pytest.raises(ValueError, match="kind must be one of"):
        ComponentSet([Neuron(0, 0).__class__("mlp", 0, 0)])


def test_dataframe_round_trip_and_mask():
    s = ComponentSet([Neuron(2, 5), Head(1, 0), Neuron(0, 0)])
    frame = s.to_dataframe()
    assert list(frame.columns) == ["kind", "layer", "index"]
    assert ComponentSet.from_dataframe(frame) == s
    shape = ComponentShape(3, 8, 2)
    mask = s.mask("neuron", shape)
    assert mask.sum() == 2 and mask[2, 5] and mask[0, 0]
    assert ComponentSet.from_mask("neuron", mask) == s.of_kind("neuron")
    with pytest.raises(ValueError, match="lacks columns"):
        ComponentSet.from_dataframe(pd.DataFrame({"layer": [0]}))


def test_shape_of_model(tiny_model):
    shape = ComponentShape.of(tiny_model)
    assert (shape.n_layers, shape.d_mlp, shape.n_heads) == (3, 96, 4)
    assert len(ComponentSet.all(shape, "head")) == 12
