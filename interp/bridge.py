"""Workarounds for TransformerLens 4.x's ``TransformerBridge``, all in one place.

Each is a context manager that changes the bridge for the duration of a call only, with instance
attributes removed afterwards (also on error), or a check of what the bridge supports:

* :func:`attention_reads_cache`: transformers 5 decoder layers pass the key/value cache as
  ``cache``; TransformerLens 4.3's attention bridges look for ``past_key_values`` and, not finding
  it, silently attend to the new positions only. Each attention bridge gets a ``forward`` that
  renames the keyword. Needed by every forward that runs onto a cache (prefix reuse, prefill,
  answer tries, generation).
* :func:`blocks_skipped_below`: ``start_at_layer`` feeds the residual to the Hugging Face model as
  ``inputs_embeds`` and makes block ``L`` swap it in for its own input, but still executes blocks
  ``0..L-1`` and discards their output. Those blocks get a pass-through ``forward``. Exact: block
  ``L`` replaces whatever reaches it with the given residual, and the rotary position embeddings
  and causal masks are still built by the model from the sequence length, per layer type
  (sliding-window layers included), exactly as in a full forward.
* :func:`native_attention`: the attention bridges reimplement attention eagerly (so that their
  hook points see scores and patterns), which on answer trees hundreds of keys wide costs a tenth
  of a forward. Each attention bridge runs the Hugging Face module it wraps instead, with its own
  ``sdpa`` kernel. The hook points of the projections inside it (``hook_q``/``hook_k``/``hook_v``,
  ``hook_z`` at the output projection's input) still fire, and so do the MLP's and the residual
  stream's; the attention bridge's own (scores, pattern, rotary q/k, ``hook_attn_out``) do not, and a
  hook on one of them is refused (:func:`skipped_by_native_attention`; :func:`fastest_attention`
  picks the bridge's attention then). By default the kernel is :data:`GROUPED_SDPA`: Hugging Face's
  ``sdpa``, except that on a CPU a masked grouped-query attention reads each key/value head once for
  all its query heads (``enable_gqa``) instead of first copying it to every one of them, which on a
  wide cache costs twice the attention itself. The same values (the kernel shares the heads, it does
  not reorder sums).
* :func:`keeps_logits`: whether the underlying model's ``forward`` takes ``logits_to_keep`` (unembed
  only some positions); :func:`cache_keyword`: the keyword a Hugging Face module takes its cache by
  (``cache`` from transformers 5.2x on, ``past_key_values`` before: the GPU machine has 5.17).
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from interp.hooks import HookedModel

GROUPED_SDPA = "sdpa_grouped"  # the attention implementation ``native_attention`` runs by default


def keeps_logits(model: HookedModel) -> bool:
    """Whether the model's Hugging Face ``forward`` takes ``logits_to_keep``."""
    hf_forward = getattr(getattr(model, "original_model", None), "forward", None)
    return hf_forward is not None and "logits_to_keep" in inspect.signature(hf_forward).parameters


def cache_keyword(module) -> str:
    """The keyword ``module``'s ``forward`` takes the key/value cache by: ``cache`` or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


def _pass_through(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def blocks_skipped_below(model: HookedModel, layer: int) -> Iterator[None]:
    """Make blocks ``0..layer-1`` return their input untouched (for ``start_at_layer=layer``)."""
    skipped = list(model.blocks)[:layer]
    try:
        for block in skipped:
            # Straight into the instance dict: the bridge's __setattr__ would forward a plain
            # ``block.forward = ...`` to the wrapped Hugging Face layer.
            vars(block)["forward"] = _pass_through
        yield
    finally:
        for block in skipped:
            vars(block).pop("forward", None)


@contextmanager
def attention_reads_cache(model: HookedModel) -> Iterator[None]:
    """Hand each attention bridge the key/value cache under the keyword it reads (``past_key_values``)."""
    attentions = [block.attn for block in model.blocks if "forward" not in vars(block.attn)]  # native ones read it

    def renaming(attention):
        original = type(attention).forward

        def forward(*args, **kwargs):
            if "cache" in kwargs and "past_key_values" not in kwargs:
                kwargs["past_key_values"] = kwargs["cache"]
            return original(attention, *args, **kwargs)

        return forward

    try:
        for attention in attentions:
            vars(attention)["forward"] = renaming(attention)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            yield
    finally:
        for attention in attentions:
            vars(attention).pop("forward", None)


def _grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Hugging Face's ``sdpa`` attention function, with masked grouped-query attention on a CPU
    left to the kernel (``enable_gqa``) rather than run on key/value heads repeated per query head."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    stock = (attention_mask is None or query.device.type != "cpu" or getattr(module, "num_key_value_groups", 1) == 1
             or any(kwargs.get(k) is not None for k in ("softcap", "position_bias")) or kwargs.get("output_attentions"))
    if stock:  # the cases Hugging Face already runs best (no mask: its own enable_gqa), or that need its handling
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register_grouped() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if GROUPED_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa)
        AttentionMaskInterface.register(GROUPED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # masks as for sdpa


def _own_hook_points(attention) -> list:
    """The hook points an attention bridge runs itself (not those of its projections' bridges)."""
    from transformer_lens.hook_points import HookPoint

    return [module for module in attention.children() if isinstance(module, HookPoint)]


def skipped_by_native_attention(model: HookedModel) -> list[str]:
    """The hook points with hooks attached that :func:`native_attention` would not run."""
    from interp.hooks import hook_count

    return [point.name for block in model.blocks for point in _own_hook_points(block.attn) if hook_count(point)]


def _refuse_skipped(names: list[str]) -> None:
    if names:
        raise RuntimeError(f"native_attention runs the Hugging Face attention, where {', '.join(names)} does not "
                           "fire: remove the hooks there, or run without native_attention")


@contextmanager
def native_attention(model: HookedModel, implementation: str = GROUPED_SDPA) -> Iterator[None]:
    """Run every attention block as the Hugging Face module its bridge wraps, with the Hugging Face
    attention ``implementation`` (``"sdpa"``: Hugging Face's own; :data:`GROUPED_SDPA` by default);
    equal to the bridge's up to float rounding. Hooks on the attention bridges' own hook points
    (scores, pattern, rotary q/k, ``hook_attn_out``), which would not fire, are refused on entry and
    at every forward; every other hook point fires as through the bridge."""
    from interp.hooks import hook_count

    if implementation == GROUPED_SDPA:
        _register_grouped()
    _refuse_skipped(skipped_by_native_attention(model))
    attentions = [block.attn for block in model.blocks]
    modules = [attention.original_component for attention in attentions]
    configs = list({id(c): c for c in [model.original_model.config, *(m.config for m in modules)]}.values())
    previous = [c._attn_implementation for c in configs]

    def native(attention, module):
        key = cache_keyword(module)
        other = "past_key_values" if key == "cache" else "cache"
        skipped = _own_hook_points(attention)

        def forward(*args, **kwargs):
            _refuse_skipped([point.name for point in skipped if hook_count(point)])
            if other in kwargs:
                kwargs.setdefault(key, kwargs.pop(other))
            return type(module).forward(module, *args, **kwargs)

        return forward

    try:
        for attention, module in zip(attentions, modules):
            vars(attention)["forward"] = native(attention, module)
        for config in configs:
            config._attn_implementation = implementation
        yield
    finally:
        for config, old in zip(configs, previous):
            config._attn_implementation = old
        for attention in attentions:
            vars(attention).pop("forward", None)


def fastest_attention(model: HookedModel):
    """:func:`native_attention` where every attached hook fires on it (the forwards of a sweep, whose
    hooks sit at the MLP, ``hook_z`` and the residual stream); else, and on a model that wraps no
    Hugging Face model (a legacy ``HookedTransformer``), the model's own attention."""
    if getattr(model, "original_model", None) is None or skipped_by_native_attention(model):
        return nullcontext()
    return native_attention(model)


__all__ = ["GROUPED_SDPA", "attention_reads_cache", "blocks_skipped_below", "cache_keyword", "fastest_attention",
           "keeps_logits", "native_attention", "skipped_by_native_attention"]
