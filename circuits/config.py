"""The study configuration: one dataclass, read from TOML or YAML, validated before any model work."""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from circuits.contexts import CONTEXTS
from circuits.contexts import DETAILS
from interp.models import peek_shape

STRATEGIES = (
    "top_k_neurons",  # top-k AtP neurons per context
    "top_k_heads",  # top-k AtP heads per context
    "fasp",  # FASP: protect utility-critical heads, prune the most bias-carrying of the rest
    "common",  # neurons (and heads) in the top-k of every training context
    "random",  # random neurons, same count as the top-k set
    "wanda_difference",  # the paper's neuron method: group A's top Wanda units not in group B's
    "attention_to_name",  # the paper's head ranking: heads attending most to the name
)


class ConfigError(ValueError):
    """A configuration field with a bad value; the message names the field."""


@dataclass(frozen=True)
class StudyConfig:
    model: str = "smollm2-135m-instruct"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    contexts: tuple[str, ...] = ("lending_amount", "commerce_buy", "hiring_salary")
    details: tuple[str, ...] = ("low",)
    variations: int | None = 3  # per context, about a third held out; None = all
    names_per_cell: int = 2  # names per group x gender cell, in each name split
    max_pairs_per_cell: int = 2  # counterfactual pairs kept per template cell
    heldout_names: bool = False  # also evaluate on held-out names
    utility_texts: int = 10  # neutral sentences for FASP's per-head utility sweep
    metric: str = "expected_value"
    strategies: tuple[str, ...] = STRATEGIES
    neuron_ks: tuple[int, ...] = (25, 100)
    head_ks: tuple[int, ...] = (3, 9)
    fasp_gamma: float = 0.5
    fasp_alphas: tuple[float, ...] = (0.02,)
    wanda_fraction: float = 0.01
    ablation: str = "zero"
    overlap_k: int = 100
    n_null: int = 200
    refine_top: int = 0
    seed: int = 0
    batch_size: int = 8
    out_dir: str = "runs/default"
    progress: bool = True

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "StudyConfig":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path} must end in .toml, .yaml or .yml")
        data = data.get("study", data)
        return cls.from_dict({**data, **overrides})

    @classmethod
    def from_dict(cls, data: dict) -> "StudyConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(fields)}")
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**clean)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "StudyConfig":
        """Raise ConfigError naming the first bad field; touches no model weights."""
        bad = [c for c in self.contexts if c not in CONTEXTS]
        if bad or not self.contexts:
            raise ConfigError(f"contexts: unknown context(s) {bad or '(none given)'}; known: {sorted(CONTEXTS)}")
        if len(set(self.contexts)) != len(self.contexts):
            raise ConfigError("contexts: a context is listed twice")
        bad = [d for d in self.details if d not in DETAILS]
        if bad or not self.details:
            raise ConfigError(f"details: unknown detail level(s) {bad or '(none given)'}; known: {list(DETAILS)}")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad:
            raise ConfigError(f"strategies: unknown strategy {bad}; known: {list(STRATEGIES)}")
        if "common" in self.strategies and len(self.contexts) < 2:
            raise ConfigError("strategies: 'common' needs at least two contexts")
        if self.metric != "expected_value":
            raise ConfigError(f"metric: {self.metric!r} is not supported; use 'expected_value'")
        if self.ablation not in ("zero", "mean"):
            raise ConfigError(f"ablation: {self.ablation!r} must be 'zero' or 'mean'")
        for name in ("names_per_cell", "max_pairs_per_cell", "batch_size", "overlap_k", "n_null", "utility_texts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.variations is not None and self.variations < 2:
            raise ConfigError("variations: need at least 2 per context (train and held-out)")
        if not 0 <= self.fasp_gamma <= 1 or any(not 0 < a <= 1 - self.fasp_gamma for a in self.fasp_alphas):
            raise ConfigError("fasp_gamma/fasp_alphas: need 0 <= gamma <= 1 and 0 < alpha <= 1 - gamma")
        if not 0 < self.wanda_fraction < 1:
            raise ConfigError(f"wanda_fraction: must lie in (0, 1), got {self.wanda_fraction}")
        self._validate_ks()
        self._validate_out_dir()
        return self

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
