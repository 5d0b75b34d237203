"""A tiny random Llama-architecture model with the embedded model's real tokenizer.

Built offline in about a second, it exercises every code path of a real model (grouped-query
attention, gated MLP, rotary positions, chat template) for fast tests and smoke runs.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from interp.models import cache_root, embedded_model_dir

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


def tiny_model_dir(seed: int = 0) -> Path:
    """A cached Hugging Face directory holding a tiny random model, built on first use."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = cache_root() / "models" / f"tiny-llama-seed{seed}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
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
