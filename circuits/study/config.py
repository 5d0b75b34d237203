"""The study configuration: one dataclass, read from TOML or YAML, validated before any model work.

Validation checks every value against its field's annotation (types, ``Literal`` choices, lists),
then ranges, the device and the output directory; errors name the field, and for a config file
the file and line.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from circuits.evaluate.generalization import LEVELS
from circuits.inputs.contexts import CONTEXTS, DETAILS
from circuits.select.pruning import STRATEGIES
from interp.models import ModelLoadError, check_device, peek_shape, resolve_model_path

Strategy = Literal[tuple(STRATEGIES)]  # a name in the registry circuits.select.pruning.STRATEGIES
Level = Literal[LEVELS]  # a generalization level, circuits.evaluate.generalization.LEVELS


class ConfigError(ValueError):
    """A configuration field with a bad value; the message names the field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none (leave the field out)" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('a ')}s" if typing.get_origin(args[0]) is None \
            else f"a list, each {_describe(args[0])}"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(hint, str(hint))


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_fits(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def _type_problem(name: str, value, hint) -> str | None:
    """What is wrong with ``value`` for a field annotated ``hint``, or None."""
    if _fits(value, hint):
        return None
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):
            return f"{name}: expected {_describe(hint)}, got the string {value!r}; write {name} = [{value!r}]"
        if not isinstance(value, tuple):
            return f"{name}: expected {_describe(hint)}, got {value!r}; write {name} = [{value!r}]"
        item = typing.get_args(hint)[0]
        i, bad = next((i, v) for i, v in enumerate(value) if not _fits(v, item))
        return f"{name}: item {i + 1} is {bad!r} ({type(bad).__name__}); each must be {_describe(item)}"
    return f"{name}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})"


@dataclass(frozen=True)
class StudyConfig:
    model: str = "smollm2-135m-instruct"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # the weights' and activations' dtype; auto: float32 on every device (bfloat16's rounding is the size of
    # the gaps measured; it is for throughput, with float32 accumulation where it matters)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # how CUDA runs float32 matmuls (interp.models.matmul_precision): highest, in float32; high, in TensorFloat32
    # (emulated on a CPU, it moves SmolLM2's gaps by about 1% of themselves). A CPU computes both in float32.
    matmul_precision: Literal["highest", "high"] = "highest"
    # Two yes/no decisions: their answers are one token, so the default study fits about 8 minutes on
    # 2 CPU cores; the dollar contexts' answer trees make every scored row several times longer
    # (examples/study-numeric.toml).
    contexts: tuple[str, ...] = ("lending_approval", "hiring_interview")
    details: tuple[str, ...] = ("low",)
    variations: int | None = 3  # per context, heldout_variations of them held out; None = all
    heldout_variations: int = 2  # held-out templates per context (L1, L2)
    names_per_cell: int = 13  # names per group x gender cell, in each name split (at most those there are)
    heldout_name_fraction: float = 0.75  # of each group x gender cell's names, held out for evaluation
    max_pairs_per_cell: int = 2  # counterfactual pairs kept per template cell (scoring = "pairs")
    heldout_names: bool = True  # held-out levels use held-out names (and a "names" level is added)
    utility_texts: int = 10  # neutral sentences (of the selection half) for FASP's per-head utility sweep
    metric: Literal["expected_value"] = "expected_value"
    # nodes of each prompt's number tree at most (circuits.measure.bias.Expansion.max_nodes); none = the
    # answer type's budget (640 for dollars, 192 for the rest). Smaller for quick checks, never for findings.
    answer_nodes: int | None = None
    strategies: tuple[Strategy, ...] = ("top_k_neurons", "top_k_heads")  # the rest: examples/study-larger.toml
    neuron_ks: tuple[int, ...] = (25,)
    head_ks: tuple[int, ...] = (3,)
    fasp_gamma: float = 0.5
    fasp_alphas: tuple[float, ...] = (0.02,)
    wanda_fraction: float = 0.01
    ablation: Literal["zero", "mean"] = "zero"
    overlap_k: int = 100
    n_null: int = 200
    scoring: Literal["ablation", "pairs"] = "ablation"  # pair-free estimate of the ablation, or pair AtP
    refine_top: int = 30  # top candidates per kind re-scored by exact ablation (0: none)
    refine_random: int = 10  # random components per kind also re-scored (the Spearman check)
    null_draws: int = 3  # random sets of each strategy's kind and size, evaluated alongside it
    null_levels: tuple[Level, ...] = ("L1",)  # where the random sets are evaluated (the levels judged against them)
    n_bootstrap: int = 1000  # two-way cluster bootstrap resamples of every endpoint
    seed: int = 0
    # prompts per forward (the audit: 8x); none: 8 on a CPU, on CUDA what free memory holds (at most 32)
    batch_size: int | None = None
    out_dir: str = "runs/default"
    progress: bool = True

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> StudyConfig:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if path.suffix not in (".toml", ".yaml", ".yml"):
            raise ConfigError(f"config file {path} must end in .toml, .yaml or .yml")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}); re-save it as UTF-8") from None
        if path.suffix == ".toml":
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        else:
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" line {mark.line + 1}" if mark else ""
                raise ConfigError(f"config file {path}{where} is not valid YAML: "
                                  f"{getattr(err, 'problem', None) or err}") from None
        if isinstance(data, dict) and isinstance(data.get("study"), dict):
            data = data["study"]
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a [study] table (or a mapping) of fields, "
                              f"not a {type(data).__name__}")
        config = cls.from_dict({**data, **overrides}, source=(path, text))
        config.check_types()
        return config

    @classmethod
    def from_dict(cls, data: dict, *, source: tuple[Path, str] | None = None) -> StudyConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            where = f"config file {source[0]}: " if source else ""
            raise ConfigError(f"{where}unknown config field(s) {unknown}; known fields: {sorted(fields)}")
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        config = cls(**clean)
        object.__setattr__(config, "_source", source)  # for errors that name the file and line
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _located(self, err: ConfigError) -> ConfigError:
        source = getattr(self, "_source", None)
        if source is None:
            return err
        path, text = source
        field = err.field or re.match(r"\w+", str(err)).group()
        line = next((i for i, row in enumerate(text.splitlines(), 1) if re.match(rf"\s*{field}\s*[=:]", row)), None)
        return ConfigError(f"config file {path}{f' line {line}' if line else ''}: {err}", field)

    def check_types(self) -> StudyConfig:
        """Raise ConfigError naming the first field whose value does not fit its annotation."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            problem = _type_problem(f.name, getattr(self, f.name), hints[f.name])
            if problem:
                raise self._located(ConfigError(problem, f.name))
        return self

    def validate(self) -> StudyConfig:
        """Raise ConfigError naming the first bad field (and the file and line it came from); touches
        no model weights."""
        self.check_types()
        try:
            self._validate()
        except ConfigError as err:
            raise self._located(err) from None
        return self

    def _validate(self) -> None:
        bad = [c for c in self.contexts if c not in CONTEXTS]
        if bad or not self.contexts:
            raise ConfigError(f"contexts: unknown context(s) {bad or '(none given)'}; known: {sorted(CONTEXTS)}")
        if len(set(self.contexts)) != len(self.contexts):
            raise ConfigError("contexts: a context is listed twice")
        bad = [d for d in self.details if d not in DETAILS]
        if bad or not self.details:
            raise ConfigError(f"details: unknown detail level(s) {bad or '(none given)'}; known: {list(DETAILS)}")
        if "common" in self.strategies and len(self.contexts) < 2:
            raise ConfigError("strategies: 'common' needs at least two contexts")
        if self.metric != "expected_value":
            raise ConfigError(f"metric: {self.metric!r} is not supported; use 'expected_value'")
        if self.ablation not in ("zero", "mean"):
            raise ConfigError(f"ablation: {self.ablation!r} must be 'zero' or 'mean'")
        for name in ("names_per_cell", "max_pairs_per_cell", "overlap_k", "n_null", "utility_texts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1 (or left out), got {self.batch_size}")
        if self.answer_nodes is not None and self.answer_nodes < 1:
            raise ConfigError(f"answer_nodes: must be at least 1 (or left out), got {self.answer_nodes}")
        if self.variations is not None and self.variations < 2:
            raise ConfigError("variations: need at least 2 per context (train and held-out)")
        if not 0 <= self.fasp_gamma <= 1 or any(not 0 < a <= 1 - self.fasp_gamma for a in self.fasp_alphas):
            raise ConfigError("fasp_gamma/fasp_alphas: need 0 <= gamma <= 1 and 0 < alpha <= 1 - gamma")
        if not 0 < self.heldout_name_fraction < 1:
            raise ConfigError(f"heldout_name_fraction: must lie in (0, 1), got {self.heldout_name_fraction}")
        if not 0 < self.wanda_fraction < 1:
            raise ConfigError(f"wanda_fraction: must lie in (0, 1), got {self.wanda_fraction}")
        if self.variations is not None and not 1 <= self.heldout_variations < self.variations:
            raise ConfigError(f"heldout_variations: need 1 <= heldout_variations < variations ({self.variations}), "
                              f"got {self.heldout_variations}")
        if self.n_bootstrap < 10:
            raise ConfigError(f"n_bootstrap: need at least 10 resamples, got {self.n_bootstrap}")
        for name in ("refine_top", "refine_random", "null_draws", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be at least 0, got {getattr(self, name)}")
        try:
            check_device(self.device)
            if Path(self.model).expanduser().is_dir():
                resolve_model_path(Path(self.model).expanduser())
        except ModelLoadError as err:
            field = "device" if str(err).startswith("device") else "model"
            raise ConfigError(f"{field}: {err}", field) from None
        self._validate_ks()
        self._validate_out_dir()

    def _validate_ks(self) -> None:
        for name in ("neuron_ks", "head_ks"):
            ks = getattr(self, name)
            if not ks or any(k < 1 for k in ks):
                raise ConfigError(f"{name}: give one or more k >= 1, got {list(ks)}")
        shape = peek_shape(self.model)
        if shape is None:
            if not Path(self.model).expanduser().is_dir() and "/" not in self.model:
                raise ConfigError(f"model: {self.model!r} is neither an embedded model nor a model directory")
            return
        n_layers, d_mlp, n_heads = shape
        limits = {"neuron_ks": n_layers * d_mlp, "head_ks": n_layers * n_heads, "overlap_k": n_layers * d_mlp}
        for name, limit in limits.items():
            values = getattr(self, name)
            values = values if isinstance(values, tuple) else (values,)
            too_big = [k for k in values if k > limit]
            if too_big:
                raise ConfigError(f"{name}: k={too_big[0]} is larger than the model's {limit} components")

    def _validate_out_dir(self) -> None:
        out = Path(self.out_dir).expanduser()
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"out_dir: cannot write to {out}: {err.strerror or err}") from err
