"""The study runner: a declared list of stages (``STAGES``) that one runner walks.

A stage is a function from named inputs (the results of the stages it ``reads``) and the config
fields it declares to a result. Every stored stage is written atomically under
``<out_dir>/stages/`` with a key of its model, code, fields and the keys of what it reads
(``stage_keys``); re-running the same command after an interruption loads the finished stages and
computes only the rest (inputs, the stages without a ``load``, are computed in memory, and only when
a stage that needs them runs). One run at a time holds the output directory (a lock in it).
``manifest.json`` records the config, the stage keys, package versions, model id and weight hash,
seeds and git commit.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from circuits.evaluate.evaluation import EvalSet, UtilityProbe, eval_set, head_utility, neutral_texts
from circuits.evaluate.generalization import CandidateSet, CandidateSets, ContextSplits, Generalization, generalize
from circuits.inputs.prompts import PromptSet, build_prompts, select_prompts
from circuits.measure.audit import AuditResult, run_audit
from circuits.measure.bias import Expansion, context_metric
from circuits.select import pruning
from circuits.select.scoring import (
    Baselines,
    ContextScores,
    HeadScores,
    baseline_sets,
    fasp_head_bias,
    score_context,
    score_prompts,
)
from circuits.study.config import StudyConfig
from circuits.study.stages import ConfigView, StageStore, frame_digest, settings_key
from interp.components import ComponentShape
from interp.locking import directory_lock
from interp.models import matmul_precision

PACKAGES = ("bias-circuits", "torch", "transformer-lens", "transformers", "numpy", "pandas", "scipy")


# -- the stage functions: (study, config view, output directory or None, **inputs) -> result --------
def study_prompts(model_or_tokenizer, c) -> PromptSet:
    """The study's prompts (the root input): ``names_per_cell`` names per group x gender cell in each
    name split (``heldout_name_fraction`` of every cell's names held out) and per context
    ``variations`` variations (None = all), ``heldout_variations`` of them held out."""
    prompts = build_prompts(model_or_tokenizer, list(c.contexts), details=list(c.details),
                            heldout_names=c.heldout_name_fraction, seed=c.seed)
    return select_prompts(prompts, variations=c.variations, heldout_variations=c.heldout_variations,
                          names_per_cell=c.names_per_cell, seed=c.seed)


@dataclass
class ContextPrompts:
    """One context's prompts and metric, and its evaluation splits (each built once, by ``eval_set``)."""

    model: Any
    context: str
    prompts: PromptSet
    max_pairs_per_cell: int | None = None  # pairs kept per template cell (None: all)
    seed: int = 0
    expansion: Expansion = Expansion()  # how answers are found; smaller for quick checks
    built: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.metric = context_metric(self.model, self.context, prompts=self.prompts, expansion=self.expansion)

    def split(self, name: str, *, pairs: bool = False, **criteria) -> EvalSet:
        key = (name, pairs, tuple(criteria.items()))
        if key not in self.built:
            self.built[key] = eval_set(self.model, f"{self.context}:{name}", self.prompts, self.metric, pairs=pairs,
                                       max_pairs_per_cell=self.max_pairs_per_cell, seed=self.seed, **criteria)
        return self.built[key]

    def train(self, *, pairs: bool = False) -> EvalSet:
        """The training templates with the training names (with pairs for pair scoring)."""
        return self.split("train", pairs=pairs, variation_split="train", name_split="train")

    def splits(self, *, heldout_names: bool, pairs: bool = False) -> ContextSplits:
        """Training split (with pairs when ``pairs``), held-out templates (with held-out names when
        ``heldout_names``) and, with ``heldout_names``, the training templates with held-out names."""
        held = {"name_split": "heldout"} if heldout_names else {}
        names = self.split("names", variation_split="train", name_split="heldout") if heldout_names else None
        return ContextSplits(self.context, self.train(pairs=pairs), self.split("heldout", variation_split="heldout",
                                                                             **held), names)


def _expansion(c) -> Expansion:
    return Expansion(max_nodes=c.answer_nodes)


def _pairs(s: Study, c, out, prompts: PromptSet) -> ContextPrompts:
    return ContextPrompts(s.model, prompts.contexts[0], prompts, c.max_pairs_per_cell, c.seed, _expansion(c))


def _means(s: Study, c, out, pairs: dict[str, ContextPrompts]):
    """Mean activations over every training prompt of every context (for mean ablation)."""
    from interp.activations import mean_activations
    from interp.batching import pad_ids, pad_token_id
    from interp.components import hook_name

    shape = ComponentShape.of(s.model)
    names = [hook_name(k, layer) for k in ("neuron", "head") for layer in range(shape.n_layers)]
    batches = [p.train().rows()[0] for p in pairs.values()]
    rows = [b.tokens[i, : int(b.lengths[i])].tolist() for b in batches for i in range(len(b))]
    reference = pad_ids(rows, pad_token_id(s.model.tokenizer)).to(s.model.cfg.device)
    return mean_activations(s.model, reference, names, batch_size=s.batch_size)


def _audit(s: Study, c, out, prompts: PromptSet) -> None:
    # the pairs stage scores the same prompts next: their answers are kept, not expanded twice
    run_audit(s.model, prompts=prompts, out_dir=out, batch_size=s.batch_size * 8, seed=c.seed, progress=c.progress,
              expansion=_expansion(c), keep_answers=True)


def _scores(s: Study, c, out, pairs: ContextPrompts, means=None) -> None:
    if c.scoring == "pairs":
        scores = score_context(s.model, pairs.train(pairs=True), refine_top=c.refine_top, per_prompt=True,
                               batch_size=s.batch_size, progress=c.progress)
    else:
        scores = score_prompts(s.model, pairs.train(), how=c.ablation, means=means, refine_top=c.refine_top,
                               n_random=c.refine_random, seed=c.seed, batch_size=s.batch_size, progress=c.progress)
    scores.save(out)


def _head_bias(s: Study, c, out, pairs: ContextPrompts, means=None) -> None:
    HeadScores(fasp_head_bias(s.model, pairs.train(), means=means, batch_size=s.batch_size,
                              progress=c.progress)).save(out)


def _baselines(s: Study, c, out, pairs: ContextPrompts) -> None:
    baseline_sets(s.model, pairs.train(), top_fraction=c.wanda_fraction, batch_size=s.batch_size).save(out)


def _head_utility(s: Study, c, out) -> None:
    probe = UtilityProbe.build(s.model, neutral_texts("select"))  # the other half reports utility
    HeadScores(head_utility(s.model, probe, n_texts=c.utility_texts, progress=c.progress)).save(out)


def select_candidates(c, scores: dict[str, ContextScores], inputs: dict | None = None) -> list[CandidateSet]:
    """The component sets of the strategies ``c.strategies`` (``circuits.select.pruning.STRATEGIES``)."""
    picked = pruning.select(c.strategies, c, {ctx: s.scores for ctx, s in scores.items()}, inputs)
    return [CandidateSet(f"{name}@{k}|{ctx}", name, k, ctx, components) for name, k, ctx, components in picked]


def _selection(s: Study, c, out, scores, **inputs) -> None:
    CandidateSets(tuple(select_candidates(c, scores, inputs))).save(out)


def _generalization(s: Study, c, out, selection, pairs, means=None) -> None:
    splits = {ctx: p.splits(heldout_names=c.heldout_names) for ctx, p in pairs.items()}
    generalize(s.model, selection, splits, probe=UtilityProbe.build(s.model), how=c.ablation, means=means,
               batch_size=s.batch_size, null_draws=c.null_draws, null_levels=c.null_levels,
               n_resamples=c.n_bootstrap, seed=c.seed,
               progress=c.progress).save(out)


def _overlap(s: Study, c, out, scores, generalization) -> None:
    from circuits.evaluate.analysis import overlap_tables

    overlap_tables(scores, generalization, k=c.overlap_k, n_null=c.n_null, seed=c.seed, out_dir=out)


def _report(s: Study, c, out, audit, scores, generalization, overlap) -> None:
    from circuits.report.study_report import write_study_report

    write_study_report(out, config=s.config, manifest=json.loads((s.out / "manifest.json").read_text()),
                       audit=audit, scores=scores, generalization=generalization, overlap_dir=overlap)


def _head_scores(path: Path) -> torch.Tensor:
    return HeadScores.load(path).scores


# -- the declared stages ------------------------------------------------------------------------------
def _uses(stage: str) -> Callable[[StudyConfig], bool]:
    """Whether a config's strategies read the results of ``stage``."""
    return lambda config: stage.replace("-", "_") in pruning.strategy_reads(config.strategies)


@dataclass(frozen=True)
class Stage:
    """One step: ``run(study, c, out, **inputs)`` with ``c`` the config as far as ``fields`` declares
    it (plus ``UNKEYED``) and ``inputs`` the results of the active stages in ``reads``. A
    ``per_context`` stage runs per context (stored as ``<name>-<context>``) and reads the same
    context's per-context results; a whole-study stage reads them as ``{context: result}``. A stage
    with ``load`` writes its result into ``out`` and is stored; one without is an input, computed in
    memory when first needed and keyed, not stored. The root input (no ``run``) is the prompts,
    keyed by their content, which the fields determine."""

    name: str
    fields: tuple[str, ...]
    reads: tuple[str, ...] = ()
    per_context: bool = False
    run: Callable | None = None
    load: Callable[[Path], Any] | None = None
    active: Callable[[StudyConfig], bool] = lambda config: True
    resumable: bool = False  # the stage picks up its own partial work after an interruption


ALL_FIELDS = tuple(f.name for f in fields(StudyConfig))
# Every StudyConfig field is read by a stage below, by the model (MODEL_FIELDS, in every key) or
# is in UNKEYED; tests/circuits/test_study.py fails on a field in none, and a stage that reads an
# undeclared field through its ConfigView raises.
STAGES: dict[str, Stage] = {stage.name: stage for stage in (  # in dependency order
    Stage("prompts", ("contexts", "details", "variations", "heldout_variations", "names_per_cell",
                      "heldout_name_fraction", "seed"), per_context=True),
    Stage("audit", ("seed", "metric", "answer_nodes"), ("prompts",), run=_audit, load=AuditResult.load, resumable=True),
    Stage("pairs", ("max_pairs_per_cell", "seed", "metric", "answer_nodes"), ("prompts",), per_context=True,
          run=_pairs),
    Stage("means", ("ablation",), ("pairs",), run=_means, active=lambda config: config.ablation == "mean"),
    Stage("scores", ("scoring", "refine_top", "refine_random", "ablation", "seed"), ("pairs", "means"),
          per_context=True, run=_scores, load=ContextScores.load),
    Stage("head-bias", ("ablation",), ("pairs", "means"), per_context=True, run=_head_bias,  # FASP's exact z_bias
          load=_head_scores, active=_uses("head-bias")),
    Stage("baselines", ("wanda_fraction",), ("pairs",), per_context=True, run=_baselines, load=Baselines.load,
          active=_uses("baselines")),
    Stage("head-utility", ("utility_texts",), run=_head_utility, load=_head_scores,
          active=_uses("head-utility")),
    Stage("selection", ("strategies", "neuron_ks", "head_ks", "fasp_gamma", "fasp_alphas", "seed"),
          ("scores", "baselines", "head-utility", "head-bias"), run=_selection,
          load=lambda path: list(CandidateSets.load(path).sets)),
    Stage("generalization", ("ablation", "heldout_names", "null_draws", "null_levels", "n_bootstrap", "seed"),
          ("selection", "pairs", "means"), run=_generalization, load=Generalization.load),
    Stage("overlap", ("overlap_k", "n_null", "seed"), ("scores", "generalization"), run=_overlap,
          load=lambda path: path),
    Stage("report", ALL_FIELDS, ("audit", "scores", "generalization", "overlap"), run=_report,  # it prints the config
          load=lambda path: path / "report.html"),
)}
MODEL_FIELDS = ("model", "device", "dtype", "matmul_precision")
UNKEYED = {
    "out_dir": "where the results go",
    "progress": "display only",
    "batch_size": "speed and memory only (results equal up to float rounding), so a run that ran out "
    "of memory resumes with a smaller batch",
}


def active_stages(config: StudyConfig) -> list[str]:
    """The stages ``config`` runs (baselines and FASP's head scores only for the strategies reading them)."""
    return [name for name, stage in STAGES.items() if stage.active(config)]


def _labels(name: str, ctx: str | None, contexts: list[str]) -> list[str]:
    """The stored names of stage ``name`` as a stage of context ``ctx`` (None: the whole study) reads it."""
    if not STAGES[name].per_context:
        return [name]
    return [f"{name}-{x}" for x in ([ctx] if ctx else contexts)]


def code_version() -> dict:
    """The package version and a hash of its data files: part of every stage key."""
    data = hashlib.sha256()
    for path in sorted((Path(__file__).parents[1] / "data").glob("*")):
        data.update(path.name.encode() + path.read_bytes())
    return {"bias-circuits": _versions()["bias-circuits"], "data": data.hexdigest()[:16]}


def model_key(config: StudyConfig) -> dict:
    """The model a config names, as it enters every stage key: name, content hashes of its weight,
    tokenizer and config files, and the device type, dtype and float32 matmul precision it runs in."""
    from interp.models import check_device, model_fingerprint

    device = check_device(config.device)
    return {"model": config.model, **model_fingerprint(config.model), "device": device.type,
            "dtype": str(model_dtype(config)), "matmul_precision": config.matmul_precision}


def study_batch_size(config: StudyConfig, model) -> int:
    """``config.batch_size``; left out, 8 on a CPU and, on CUDA, the rows of 256 positions reading 16
    logits that free memory holds (``interp.memory.suggest_batch_size``), at most 32. Out-of-memory
    still halves an audit's, a sweep's or an attribution's batch (``interp.memory.Backoff``)."""
    from interp.memory import row_bytes, suggest_batch_size

    if config.batch_size is not None:
        return config.batch_size
    return suggest_batch_size(row_bytes(model.cfg, 256, 16), model.cfg.device, default=8, ceiling=32)


def model_dtype(config: StudyConfig) -> torch.dtype:
    """The dtype a config's model runs in (``auto``: ``interp.models.DEFAULT_DTYPE``, float32)."""
    from interp.models import DEFAULT_DTYPE

    return DEFAULT_DTYPE if config.dtype == "auto" else getattr(torch, config.dtype)


def stage_keys(config: StudyConfig, model: dict, prompts: PromptSet) -> dict[str, str]:
    """The key of every stage ``config`` runs, inputs included: a hash of the model key, the code
    version, the stage's declared fields and the keys of the stages it reads (the prompts: their content)."""
    base = settings_key(model, code_version())
    active = active_stages(config)
    keys: dict[str, str] = {}
    for name in active:
        stage = STAGES[name]
        for ctx in prompts.contexts if stage.per_context else [None]:
            label = _labels(name, ctx, prompts.contexts)[0]
            if stage.run is None:
                keys[label] = settings_key(base, label, frame_digest(prompts.filter(context=ctx).frame))
                continue
            upstream = [keys[x] for r in stage.reads if r in active for x in _labels(r, ctx, prompts.contexts)]
            keys[label] = settings_key(base, label, {f: getattr(config, f) for f in stage.fields}, upstream)
    return keys


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


@dataclass
class StudyRun:
    """What a study produced: the output directory, its stages and the report path."""

    config: StudyConfig
    out_dir: Path
    stages: dict
    report: Path | None
    power: str | None = None  # the minimum detectable delta per context (see power_lines)

    def summary(self) -> str:
        lines = [f"study written to {self.out_dir}"]
        for name, rec in self.stages.items():
            state = f"computed in {rec.seconds:.0f}s" if rec.computed else "reused"
            lines.append(f"  {name:<28} {state}")
        if self.power:
            lines.append(self.power)
        if self.report:
            lines.append(f"report: {self.report}")
        return "\n".join(lines)


class Study:
    """One study: its config, output directory, model, stage store and the results it has so far."""

    def __init__(self, config: StudyConfig, *, out_dir: str | Path | None = None, check: bool = True):
        self.config = config.validate() if check else config
        self.out = Path(out_dir or config.out_dir).expanduser()
        self.store: StageStore | None = None  # opened under the output directory's lock
        self.model = None  # None: load finished stages only
        self.batch_size: int | None = None  # the config's, or the one free memory gives (study_batch_size)
        self.model_key = None
        self.prompts: PromptSet | None = None
        self.keys: dict[str, str] = {}
        self.results: dict[str, Any] = {}

    def view(self, stage: str) -> ConfigView:
        """The config as ``stage`` may read it: its declared fields and the unkeyed ones."""
        return ConfigView(self.config, stage, (*STAGES[stage].fields, *UNKEYED))

    def _load_model(self) -> None:
        from interp.models import load_model

        self.model_key = model_key(self.config)
        dtype = model_dtype(self.config)
        if dtype != torch.float32:
            warnings.warn(f"dtype {self.config.dtype}: its rounding is the size of the gaps a study measures (on "
                          "SmolLM2 bfloat16 moves them by 57-79% of themselves: benchmarks/bench_precision.py); "
                          "use float32 for findings", RuntimeWarning, stacklevel=2)
        self.model = load_model(self.config.model, device=self.config.device, dtype=dtype)
        self.batch_size = study_batch_size(self.config, self.model)
        torch.manual_seed(self.config.seed)

    def _write_manifest(self) -> None:
        manifest = {
            "config": self.config.to_dict(),
            "model": self.model_key,
            "device": str(self.model.cfg.device),
            "batch_size": self.batch_size,
            "seed": self.config.seed,
            "packages": _versions(),
            "git_commit": _git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "stage_keys": self.keys,
        }
        (self.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (self.out / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))

    def run(self) -> StudyRun:
        """Run (or resume) the study, holding its output directory against a second writer: every
        stored stage in ``STAGES`` order, each loaded when finished and computed otherwise."""
        with directory_lock(self.out, "running a study"):
            self.store = StageStore(self.out)
            self._load_model()
            self.prompts = study_prompts(self.model, self.view("prompts"))
            self.keys = stage_keys(self.config, self.model_key, self.prompts)
            self._write_manifest()
            for name in active_stages(self.config):
                if STAGES[name].load is not None:
                    self.result(name)
            return StudyRun(self.config, self.out, dict(self.store.records), self.result("report"),
                            power_lines(self.result("generalization")))

    def result(self, name: str, ctx: str | None = None, *, rerun: bool = False):
        """The result of stage ``name`` (of context ``ctx``; without one, a per-context stage's results
        as ``{context: result}``): loaded when finished, else computed from its inputs (``rerun``:
        computed again even if finished)."""
        stage = STAGES[name]
        if stage.run is None:  # the root input
            return self.prompts if ctx is None else self.prompts.filter(context=ctx)
        if stage.per_context and ctx is None:
            return {x: self.result(name, x, rerun=rerun) for x in self.config.contexts}
        label = _labels(name, ctx, list(self.config.contexts))[0]
        if label not in self.results:
            self.results[label] = self._compute(stage, label, ctx, rerun)
        return self.results[label]

    def _compute(self, stage: Stage, label: str, ctx: str | None, rerun: bool):
        active = active_stages(self.config)

        def run(out: Path | None):
            if self.model is None and not rerun:
                raise FileNotFoundError(f"{self.out} has no finished stage {label!r}; run 'bias-circuits study' first")
            inputs = {r.replace("-", "_"): self.result(r, ctx) for r in stage.reads if r in active}
            with matmul_precision(self.config.matmul_precision):
                return stage.run(self, self.view(stage.name), out, **inputs)

        if stage.load is None:
            return run(None)
        record = self.store.run(label, self.keys[label], run, resumable=stage.resumable, rerun=rerun)
        return stage.load(record.path)


def power_lines(generalization: Generalization) -> str:
    """One line per context and held-out split: the unablated gap and the minimum detectable delta."""
    lines = ["power (two-sided 5%, 80% power, normal approximation from the two-way cluster bootstrap SD):"]
    for row in generalization.power().itertuples():
        lines.append(f"  {row.eval_context:<18} {row.split:<8} gap {row.baseline_gap:10.4g}  "
                     f"sd {row.gap_sd:9.3g}  MDE {row.mde:9.3g}  ({row.n_prompts} prompts, {row.n_names} names, "
                     f"{row.n_templates} templates)")
    return "\n".join(lines)


def rebuild_report(out_dir: str | Path) -> Path:
    """Re-render the report of a finished study from its saved stages (no model needed)."""
    out = Path(out_dir)
    manifest = out / "manifest.json"
    keys = json.loads(manifest.read_text()).get("stage_keys") if manifest.exists() else None
    if not keys:
        raise FileNotFoundError(f"{out} holds no study of this version; run 'bias-circuits study' first")
    study = Study(StudyConfig.from_dict(json.loads(manifest.read_text())["config"]), out_dir=out, check=False)
    with directory_lock(out, "rebuilding the report"):
        study.store, study.keys = StageStore(out), keys
        return study.result("report", rerun=True)


def run_study(config: StudyConfig | None = None) -> StudyRun:
    """Run (or resume) a study; with no config, the default study on the embedded model."""
    return Study(config or StudyConfig()).run()
