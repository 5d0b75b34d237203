"""Random-weight Llama-architecture models with the embedded model's real tokenizer.

``load_tiny_model``: built offline in about a second, it exercises every code path of a real
model (grouped-query attention, gated MLP, rotary positions, chat template) for fast tests and
smoke runs. ``random_model``: any shape in ``SHAPES`` (the papers' Llama-3-8B among them) built
in memory from its config, for throughput and memory measurements only, never for findings.
``$BIAS_CIRCUITS_TOKENIZER``, a saved Hugging Face tokenizer directory, stands in for the embedded
model's tokenizer where that model is not installed (``benchmarks/device_kit.py`` on a GPU machine).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from interp.models import cache_root, embedded_model_dir

TOKENIZER_ENV = "BIAS_CIRCUITS_TOKENIZER"

TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    initializer_range=0.2,
    tie_word_embeddings=True,
)


# Shapes for throughput and memory (random weights). ``llama3-8b-mini`` keeps Llama-3-8B's ratios
# (4 query heads per KV head, d_mlp = 3.5 d_model, 128-dim heads) at a size a CPU test can run.
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0),
    "llama3-8b-mini": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=128, vocab_size=128256, rope_theta=500000.0),
}


def _tokenizer():
    """The embedded model's tokenizer, or the one saved in ``$BIAS_CIRCUITS_TOKENIZER``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.environ.get(TOKENIZER_ENV) or embedded_model_dir())


def tiny_model_dir(seed: int = 0) -> Path:
    """A cached Hugging Face directory holding a tiny random model, built on first use."""
    from transformers import LlamaConfig, LlamaForCausalLM

    target = cache_root() / "models" / f"tiny-llama-seed{seed}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_SHAPE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tiny_model(seed: int = 0, device: str = "cpu"):
    from interp.models import load_model

    return load_model(tiny_model_dir(seed), device=device)


def random_model(shape: str | dict = "llama3-8b-mini", *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0):
    """A bridge over a random-weight Llama model of ``shape`` (a ``SHAPES`` name or config keywords),
    allocated directly on ``device`` in ``dtype`` (no weights written to disk), with the embedded
    model's tokenizer (its ids are a subset of any larger vocabulary)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = SHAPES[shape] if isinstance(shape, str) else dict(shape)
    tokenizer = _tokenizer()
    dims.setdefault("vocab_size", len(tokenizer))
    config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=4096, **dims)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with tempfile.TemporaryDirectory(prefix="random-shape-") as tmp:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        bridge = TransformerBridge.boot_transformers(tmp, hf_model=hf, device=device, dtype=dtype,
                                                     tokenizer=tokenizer)
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    bridge.model_id = f"random:{shape if isinstance(shape, str) else 'custom'}"
    return bridge
