"""The console script's checks before any model work, and Ctrl-C."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import interp
from circuits.study.cli import main
from interp.testing import tiny_model_dir

ROOT = Path(__file__).parents[3]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(interp, "load_model", refuse)


def _one_line_error(code, capsys) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["audit", "--contexts", "chess"], ["agreement"],
                                     ["attribute", "--context", "chess"], ["study"]])
def test_cuda_without_cuda_fails_before_loading(tmp_path, capsys, no_model_load, command):
    code = main([*command, "--device", "cuda", "--out", str(tmp_path)])
    assert "device 'cuda': this machine has no usable CUDA device" in _one_line_error(code, capsys)


def test_out_that_is_a_file_fails_before_the_run(tmp_path, capsys, no_model_load):
    target = tmp_path / "results.parquet"
    target.write_text("x")
    code = main(["audit", "--contexts", "chess", "--out", str(target)])
    assert f"--out {target} is an existing file; give a directory" in _one_line_error(code, capsys)


@pytest.mark.usefixtures("unchecked")
def test_bad_study_config_is_one_line(tmp_path, capsys, no_model_load):
    config = tmp_path / "study.yaml"
    config.write_text("study:\n  neuron_ks: 25\n")
    code = main(["study", "--config", str(config), "--out", str(tmp_path / "o")])
    assert "study.yaml line 2: neuron_ks: expected a list of whole numbers" in _one_line_error(code, capsys)
    config.write_text("study:\n  neuron_ks: [25\n")
    code = main(["study", "--config", str(config)])
    assert "is not valid YAML" in _one_line_error(code, capsys)


def test_model_without_tokenizer_is_one_line(tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_model_dir().iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors":
            shutil.copy(f, folder / f.name)
    code = main(["audit", "--model", str(folder), "--contexts", "chess", "--out", str(tmp_path / "o")])
    assert "has no tokenizer files" in _one_line_error(code, capsys)


SLOW = ("import signal, sys, time; sys.path.insert(0, {root!r})\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the test run ignores Ctrl-C (nohup, &)\n"
        "import circuits.measure.audit as audit\n"
        "real, calls = audit.measure, []\n"
        "def slow(*a, **k):  # after two chunks, wait for the interrupt: the run cannot finish first\n"
        "    time.sleep(0.5 if len(calls) < 2 else 120)\n"
        "    calls.append(1)\n"
        "    return real(*a, **k)\n"
        "audit.measure = slow\n"
        "from circuits.study.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path):
    from circuits.measure.audit import saved_progress

    out = tmp_path / "audit"
    args = ["audit", "--model", str(tiny_model_dir()), "--device", "cpu", "--contexts", "chess", "--details", "low",
            "--variations", "2", "--names-per-cell", "2", "--chunk-size", "2", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW.format(root=str(ROOT)), *args], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while saved_progress(out)[0] < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and "Traceback" not in err, err  # one line after the model loader's own bar
    done, total = saved_progress(out)
    assert lines[0] == (f"bias-circuits audit: interrupted: {done} of {total} prompts are kept in {out / 'chunks'}; "
                        "run the same command again to resume")
