"""Per-unit weight norms read from the model's stacked weights (``model.W_in`` is
``[layer, d_model, d_mlp]``, ``model.W_out`` ``[layer, d_mlp, d_model]``, ``model.W_O``
``[layer, head, d_head, d_model]``)."""
from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from interp.hooks import HookedModel


def weight_norms(model: HookedModel) -> dict[str, Float[Tensor, "layer ..."] | None]:
    """L2 norms of each unit's weight vectors, in float32 on the CPU.

    ``W_in`` / ``W_gate``: each neuron's input column ``[layer, d_mlp]`` (``W_gate`` None for an ungated
    MLP); ``W_out``: each neuron's output row ``[layer, d_mlp]``; ``W_O``: each head's output row per
    ``d_head`` feature ``[layer, head, d_head]``.
    """
    try:
        w_in, w_gate, w_out, w_o = model.W_in, model.W_gate, model.W_out, model.W_O
    except AttributeError as err:
        raise ValueError(
            "weight norms need a TransformerBridge (or HookedTransformer) exposing stacked "
            f"W_in/W_gate/W_out/W_O: {err}"
        ) from err
    with torch.no_grad():
        norms = {
            "W_in": torch.linalg.vector_norm(w_in.float(), dim=-2),
            "W_gate": None if w_gate is None else torch.linalg.vector_norm(w_gate.float(), dim=-2),
            "W_out": torch.linalg.vector_norm(w_out.float(), dim=-1),
            "W_O": torch.linalg.vector_norm(w_o.float(), dim=-1),
        }
    return {name: None if norm is None else norm.cpu() for name, norm in norms.items()}


__all__ = ["weight_norms"]
