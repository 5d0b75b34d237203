"""KV-cached decoding through the bridge's attention components, across a library mismatch.

Since transformers 5 the decoder layers hand the KV cache to attention as ``cache=``; the bridge's
attention components (TransformerLens 4.3, ``AttentionBridge._update_kv_cache``) look for it only
as ``past_key_values``/``layer_past``, so the cache stays empty and every cached step attends to
itself alone (cached generation ignores the prompt, silently). ``kv_cache`` fixes that for the
duration of a ``with`` block, so a plain forward elsewhere is left exactly as it was.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

_ORIGINAL = AttentionBridge._update_kv_cache


def _update_kv_cache(self, k, v, **kwargs):
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs["past_key_values"] = kwargs["cache"]
    return _ORIGINAL(self, k, v, **kwargs)


@contextmanager
def kv_cache() -> Iterator[None]:
    """Within the block, the bridge's attention reads and extends the cache transformers passes it."""
    AttentionBridge._update_kv_cache = _update_kv_cache
    try:
        yield
    finally:
        AttentionBridge._update_kv_cache = _ORIGINAL


__all__ = ["kv_cache"]
