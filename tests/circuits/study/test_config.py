"""StudyConfig validation: types from the annotations, Literal choices, ranges, files with lines, devices."""
import pytest
import torch

from circuits.study.config import ConfigError, StudyConfig


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"neuron_ks": (5.5,)}, r"neuron_ks: item 1 is 5.5 \(float\); each must be a whole number"),
        ({"neuron_ks": ("5",)}, r"neuron_ks: item 1 is '5' \(str\)"),
        ({"neuron_ks": 25}, r"neuron_ks: expected a list of whole numbers, got 25; write neuron_ks = \[25\]"),
        ({"contexts": "chess"}, r"contexts: expected a list of strings, got the string 'chess'; write contexts"),
        ({"overlap_k": 10.0}, r"overlap_k: expected a whole number, got 10.0 \(float\)"),
        ({"batch_size": True}, r"batch_size: expected a whole number or none \(leave .*, got True \(bool\)"),
        ({"heldout_names": "yes"}, r"heldout_names: expected true or false, got 'yes'"),
        ({"variations": "all"}, r"variations: expected a whole number or none"),
        ({"ablation": "erase"}, r"ablation: expected one of \['zero', 'mean'\], got 'erase'"),
        ({"strategies": ("fasp", "magic")}, r"strategies: item 2 is 'magic'.*one of \['top_k_neurons'"),
        ({"fasp_gamma": "0.5"}, r"fasp_gamma: expected a number"),
        ({"refine_top": -1}, r"refine_top: must be at least 0"),
        ({"answer_nodes": 0}, r"answer_nodes: must be at least 1 \(or left out\), got 0"),
        ({"batch_size": 0}, r"batch_size: must be at least 1 \(or left out\), got 0"),
        ({"answer_nodes": 2.5}, r"answer_nodes: expected a whole number or none"),
    ],
)
@pytest.mark.usefixtures("unchecked")
def test_wrong_types_and_ranges_name_the_field(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        StudyConfig(out_dir=str(tmp_path), **overrides).validate()


def test_ints_are_numbers_and_defaults_validate(tmp_path):
    StudyConfig(out_dir=str(tmp_path), fasp_gamma=0, fasp_alphas=(1 / 2,)).check_types()
    StudyConfig(out_dir=str(tmp_path)).check_types()


@pytest.mark.usefixtures("unchecked")
def test_toml_errors_name_file_and_line(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('[study]\ncontexts = ["chess", "sports"]\nneuron_ks = [5.5]\n')
    with pytest.raises(ConfigError, match=r"study.toml line 3: neuron_ks: item 1 is 5.5"):
        StudyConfig.from_file(path)
    path.write_text('[study]\ncontexts = ["chess", "sports"]\nn_null = 0\n')
    with pytest.raises(ConfigError, match=r"study.toml line 3: n_null: must be at least 1"):
        StudyConfig.from_file(path, out_dir=str(tmp_path)).validate()
    path.write_text('[study]\ncontexts = ["chess",\nk = 3\n')
    with pytest.raises(ConfigError, match=r"study.toml is not valid TOML: .*line 3"):
        StudyConfig.from_file(path)


@pytest.mark.usefixtures("unchecked")
def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("study:\n  contexts: [chess, sports\n  neuron_ks: [5]\n")
    with pytest.raises(ConfigError, match=r"study.yaml line \d+ is not valid YAML"):
        StudyConfig.from_file(path)
    path.write_text("- chess\n- sports\n")
    with pytest.raises(ConfigError, match=r"must hold a \[study\] table.*not a list"):
        StudyConfig.from_file(path)
    path.write_text("study:\n  contexts: chess\n")
    with pytest.raises(ConfigError, match=r"study.yaml line 2: contexts: expected a list of strings"):
        StudyConfig.from_file(path)


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "study.toml"
    path.write_bytes('[study]\nmodel = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        StudyConfig.from_file(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_fails_in_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"device: device 'cuda': this machine has no usable CUDA device"):
        StudyConfig(out_dir=str(tmp_path), device="cuda").validate()


def test_bad_device_string(tmp_path):
    with pytest.raises(ConfigError, match=r"device 'gpu0' is not a torch device"):
        StudyConfig(out_dir=str(tmp_path), device="gpu0").validate()


def test_model_folder_without_tokenizer_fails_in_validation(tmp_path):
    import shutil

    from interp.testing import tiny_model_dir

    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_model_dir().iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors":
            shutil.copy(f, folder / f.name)
    with pytest.raises(ConfigError, match=r"model: .* has no tokenizer files.*tokenizer.save_pretrained"):
        StudyConfig(out_dir=str(tmp_path / "out"), model=str(folder)).validate()


def test_the_matmul_precisions_are_torchs_in_the_config_and_the_cli():
    import argparse
    import typing

    from circuits.study.cli import build_parser
    from interp.models import MATMUL_PRECISIONS

    assert typing.get_args(typing.get_type_hints(StudyConfig)["matmul_precision"]) == MATMUL_PRECISIONS
    study = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["study"]
    assert tuple(next(a for a in study._actions if a.dest == "matmul_precision").choices) == MATMUL_PRECISIONS
