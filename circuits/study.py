"""The study runner: audit -> scores -> selection -> generalization -> overlap -> report.

Every stage is written atomically under ``<out_dir>/stages/`` with a key of everything it reads
(see ``STAGES`` and ``stage_keys``); re-running the same command after an interruption loads the
finished stages and computes only the rest. One run at a time holds the output directory (a lock
in it). ``manifest.json`` records the config, package versions, model id and weight hash, seeds
and git commit.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import dataclass, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
import torch

from circuits import pruning
from circuits.audit import AuditResult, run_audit
from circuits.bias import Expansion, context_metric
from circuits.config import StudyConfig
from circuits.evaluation import EvalSet, UtilityProbe, head_utility, neutral_texts
from circuits.generalization import CandidateSet, ContextSplits, Generalization, generalize
from circuits.names import sample_names
from circuits.prompts import PromptSet, build_pairs, build_prompts, span_aligned
from circuits.scoring import ContextScores, baseline_sets, fasp_head_bias, score_context, score_prompts
from circuits.stages import ConfigView, StageStore, frame_digest, settings_key
from interp.components import ComponentSet, ComponentShape
from interp.locking import directory_lock

PACKAGES = ("bias-circuits", "torch", "transformer-lens", "transformers", "numpy", "pandas", "scipy")



@dataclass(frozen=True)
class Stage:
    """What a stage reads: config ``fields`` and the results of the stages in ``reads``. A
    ``per_context`` stage is stored as ``<name>-<context>`` and reads the same context's per-context
    stages; a whole-study stage reads those of every context. ``prompts`` and ``pairs`` are inputs
    (keyed, not stored): the prompts by their content, which the fields determine."""

    fields: tuple[str, ...]
    reads: tuple[str, ...] = ()
    per_context: bool = False


ALL_FIELDS = tuple(f.name for f in fields(StudyConfig))
# Every StudyConfig field is read by a stage below, by the model (MODEL_FIELDS, in every key) or
# is in UNKEYED; tests/circuits/test_study.py fails on a field in none, and a stage that reads an
# undeclared field through its ConfigView raises.
STAGES: dict[str, Stage] = {  # in dependency order
    "prompts": Stage(("contexts", "details", "variations", "heldout_variations", "names_per_cell",
                      "heldout_name_fraction", "seed"),
                     per_context=True),
    "audit": Stage(("seed", "metric"), ("prompts",)),
    "pairs": Stage(("max_pairs_per_cell", "seed", "metric"), ("prompts",), per_context=True),
    "scores": Stage(("scoring", "refine_top", "refine_random", "ablation", "seed"), ("pairs",), per_context=True),
    "head-bias": Stage(("ablation",), ("pairs",), per_context=True),  # FASP's exact z_bias per head
    "baselines": Stage(("wanda_fraction",), ("pairs",), per_context=True),
    "head-utility": Stage(("utility_texts",)),
    "selection": Stage(("strategies", "neuron_ks", "head_ks", "fasp_gamma", "fasp_alphas", "seed"),
                       ("scores", "baselines", "head-utility", "head-bias")),
    "generalization": Stage(("ablation", "heldout_names", "null_draws", "n_bootstrap", "seed"), ("selection", "pairs")),
    "overlap": Stage(("overlap_k", "n_null", "seed"), ("scores", "generalization")),
    "report": Stage(ALL_FIELDS, ("audit", "scores", "generalization", "overlap")),  # it prints the config
}
INPUTS = ("prompts", "pairs")
MODEL_FIELDS = ("model", "device")
UNKEYED = {
    "out_dir": "where the results go",
    "progress": "display only",
    "batch_size": "speed and memory only (results equal up to float rounding), so a run that ran out "
    "of memory resumes with a smaller batch",
}
BASELINE_STRATEGIES = {"wanda_difference", "attention_to_name"}


def active_stages(config: StudyConfig) -> list[str]:
    """The stages ``config`` runs (baselines only for their strategies, head utility only for FASP)."""
    skip = set()
    if not BASELINE_STRATEGIES & set(config.strategies):
        skip.add("baselines")
    if "fasp" not in config.strategies:
        skip |= {"head-utility", "head-bias"}
    return [name for name in STAGES if name not in skip]


def code_version() -> dict:
    """The package version and a hash of its data files: part of every stage key."""
    data = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "data").glob("*")):
        data.update(path.name.encode() + path.read_bytes())
    return {"bias-circuits": _versions()["bias-circuits"], "data": data.hexdigest()[:16]}


def model_key(config: StudyConfig) -> dict:
    """The model a config names, as it enters every stage key: name, content hashes of its weight,
    tokenizer and config files, and the device type and dtype it runs in."""
    from interp.models import check_device, default_dtype, model_fingerprint

    device = check_device(config.device)
    return {"model": config.model, **model_fingerprint(config.model), "device": device.type,
            "dtype": str(default_dtype(device))}


def stage_keys(config: StudyConfig, model: dict, prompts: PromptSet) -> dict[str, str]:
    """The key of every stage ``config`` runs (and of its inputs ``prompts-<ctx>``, ``pairs-<ctx>``):
    a hash of the model key, the code version, the stage's declared fields and the keys it reads."""
    base = settings_key(model, code_version())
    active = active_stages(config)
    contexts = prompts.contexts
    keys: dict[str, str] = {}

    def labels(name: str, ctx: str | None) -> list[str]:
        if not STAGES[name].per_context:
            return [name]
        return [f"{name}-{x}" for x in ([ctx] if ctx else contexts)]

    for name in active:
        stage = STAGES[name]
        for ctx in contexts if stage.per_context else [None]:
            label = labels(name, ctx)[0]
            if name == "prompts":
                keys[label] = settings_key(base, label, frame_digest(prompts.filter(context=ctx).frame))
                continue
            upstream = [keys[x] for r in stage.reads if r in active for x in labels(r, ctx)]
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


def study_prompts(
    model, contexts, *, details=("low",), variations: int | None = 3, heldout_variations: int = 2,
    names_per_cell: int = 2, heldout_name_fraction: float = 0.25, seed: int = 0
) -> PromptSet:
    """The study's prompts: ``names_per_cell`` names per group x gender cell from each name split
    (``heldout_name_fraction`` of every cell's names held out), and per context ``variations``
    variations (None = all) of which ``heldout_variations`` are held out (at most the context's
    held-out variations)."""
    prompts = build_prompts(model, list(contexts), details=list(details), heldout_names=heldout_name_fraction,
                            seed=seed)
    frame = prompts.frame
    names = [n for split in ("train", "heldout")
             for n in sample_names(frame[frame["name_split"] == split], names_per_cell, seed=seed)]
    prompts = prompts.filter(name=names)
    if variations is None:
        return prompts
    keep = set()
    n_held = heldout_variations
    frame = prompts.frame
    for ctx, rows in frame.groupby("context", sort=False):
        for split, n in (("heldout", n_held), ("train", variations - n_held)):
            keep |= {(ctx, v) for v in list(dict.fromkeys(rows.loc[rows["variation_split"] == split, "variation"]))[:n]}
    chosen = [(ctx, v) in keep for ctx, v in zip(frame["context"], frame["variation"])]
    return prompts.filter(prompt_id=list(frame.loc[chosen, "prompt_id"]))


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
    """One study: its config, output directory, model and stage store."""

    def __init__(self, config: StudyConfig):
        self.config = config.validate()
        self.out = Path(config.out_dir).expanduser()
        self.store: StageStore | None = None  # opened by run(), under the output directory's lock
        self.model = None
        self.model_key = None
        self.keys: dict[str, str] = {}

    def _view(self, stage: str) -> ConfigView:
        """The config as ``stage`` may read it: its declared fields and the unkeyed ones."""
        return ConfigView(self.config, stage, (*STAGES[stage].fields, *UNKEYED))

    # -- set-up --------------------------------------------------------------------------
    def _load_model(self) -> None:
        from interp.models import load_model

        self.model_key = model_key(self.config)
        self.model = load_model(self.config.model, device=self.config.device)
        torch.manual_seed(self.config.seed)

    def _write_manifest(self) -> None:
        manifest = {
            "config": self.config.to_dict(),
            "model": self.model_key,
            "device": str(self.model.cfg.device),
            "seed": self.config.seed,
            "packages": _versions(),
            "git_commit": _git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (self.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (self.out / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))

    # -- prompts ---------------------------------------------------------------------------
    def prompts(self) -> PromptSet:
        c = self._view("prompts")
        return study_prompts(self.model, c.contexts, details=c.details, variations=c.variations,
                             heldout_variations=c.heldout_variations, names_per_cell=c.names_per_cell,
                             heldout_name_fraction=c.heldout_name_fraction, seed=c.seed)

    def splits(self, prompts: PromptSet, *, heldout_names: bool, scoring: str,
               expansion: Expansion | None = None) -> dict[str, ContextSplits]:
        """Per context, every prompt of: the training split (training templates and names; with pairs
        when ``scoring == "pairs"``), the held-out templates (with held-out names when
        ``heldout_names``) and, with ``heldout_names``, the training templates with held-out names.

        ``expansion`` (default ``circuits.bias.Expansion()``) sets how each context's answers are
        found; a smaller one (fewer pilots and nodes) makes every scored row shorter, for quick checks.
        """
        c = self._view("pairs")
        out = {}
        for ctx in prompts.contexts:
            rows = prompts.filter(context=ctx)
            metric = context_metric(self.model, ctx, prompts=rows, **({"expansion": expansion} if expansion else {}))

            def eval_set(name, with_pairs=False, **criteria):
                try:
                    subset = rows.filter(**criteria)
                    pairs = build_pairs(self.model, subset, max_pairs_per_cell=c.max_pairs_per_cell,
                                        seed=c.seed) if with_pairs else None
                except ValueError as err:
                    raise ValueError(f"{ctx} {name} split: {err}; raise names_per_cell or variations") from err
                laid_out = pairs is not None and pairs.clean.key_mask is not None  # names of unequal length
                return EvalSet.from_prompts(self.model, f"{ctx}:{name}", subset,
                                            span_aligned(metric) if laid_out else metric, pairs=pairs)

            held = {"name_split": "heldout"} if heldout_names else {}
            out[ctx] = ContextSplits(
                ctx,
                train=eval_set("train", scoring == "pairs", variation_split="train", name_split="train"),
                heldout=eval_set("heldout", variation_split="heldout", **held),
                names=eval_set("names", variation_split="train", name_split="heldout") if heldout_names else None,
            )
        return out

    # -- stages ----------------------------------------------------------------------------
    def run(self) -> StudyRun:
        """Run (or resume) the study, holding its output directory against a second writer."""
        with directory_lock(self.out, "running a study"):
            self.store = StageStore(self.out)
            return self._run()

    def _run(self) -> StudyRun:
        self._load_model()
        self._write_manifest()
        prompts = self.prompts()
        keys = self.keys = stage_keys(self.config, self.model_key, prompts)
        c = self._view("audit")
        self.store.run("audit", keys["audit"], lambda d: run_audit(
            self.model, prompts=prompts, out_dir=d, batch_size=c.batch_size * 8, seed=c.seed, progress=c.progress),
            resumable=True)
        splits = self.splits(prompts, heldout_names=self._view("generalization").heldout_names,
                             scoring=self._view("scores").scoring)
        scores: dict[str, ContextScores] = {}
        baselines: dict[str, dict] = {}
        head_bias: dict[str, torch.Tensor] = {}
        c, b, h = self._view("scores"), self._view("baselines"), self._view("head-bias")
        means = self._means(splits, c.ablation)
        for ctx, split in splits.items():
            rec = self.store.run(f"scores-{ctx}", keys[f"scores-{ctx}"], lambda d, s=split: (score_context(
                self.model, s.train, refine_top=c.refine_top, per_prompt=True, batch_size=c.batch_size,
                progress=c.progress) if c.scoring == "pairs" else score_prompts(
                self.model, s.train, how=c.ablation, means=means, refine_top=c.refine_top, n_random=c.refine_random,
                seed=c.seed, batch_size=c.batch_size, progress=c.progress)).save(d))
            scores[ctx] = ContextScores.load(rec.path)
            if f"head-bias-{ctx}" in keys:
                rec = self.store.run(f"head-bias-{ctx}", keys[f"head-bias-{ctx}"], lambda d, s=split: torch.save(
                    fasp_head_bias(self.model, s.train, means=means, batch_size=h.batch_size, progress=h.progress),
                    d / "head_bias.pt"))
                head_bias[ctx] = torch.load(rec.path / "head_bias.pt")
            if f"baselines-{ctx}" in keys:
                rec = self.store.run(f"baselines-{ctx}", keys[f"baselines-{ctx}"], lambda d, s=split: _save_baselines(
                    baseline_sets(self.model, s.train, top_fraction=b.wanda_fraction, batch_size=b.batch_size), d))
                baselines[ctx] = _load_baselines(rec.path)
        probe = UtilityProbe.build(self.model)  # the reporting half of the neutral text
        utility = None
        if "head-utility" in keys:  # FASP's z_ppl, on the other half
            c = self._view("head-utility")
            rec = self.store.run("head-utility", keys["head-utility"], lambda d: torch.save(
                head_utility(self.model, UtilityProbe.build(self.model, neutral_texts("select")),
                             n_texts=c.utility_texts, progress=c.progress),
                d / "head_utility.pt"))
            utility = torch.load(rec.path / "head_utility.pt")
        candidates = self.candidates(scores, baselines, utility, head_bias)
        self.store.run("selection", keys["selection"], lambda d: _candidates_frame(candidates).to_parquet(
            d / "candidates.parquet", index=False))
        c = self._view("generalization")
        rec = self.store.run("generalization", keys["generalization"], lambda d: generalize(
            self.model, candidates, splits, probe=probe, how=c.ablation, means=means,
            batch_size=c.batch_size, null_draws=c.null_draws, n_resamples=c.n_bootstrap, seed=c.seed,
            progress=c.progress).save(d))
        generalization = Generalization.load(rec.path)
        from circuits.analysis import overlap_tables

        o = self._view("overlap")
        self.store.run("overlap", keys["overlap"], lambda d: overlap_tables(
            scores, generalization, k=o.overlap_k, n_null=o.n_null, seed=o.seed, out_dir=d))
        from circuits.study_report import write_study_report

        audit = AuditResult.load(self.store.root / "audit")
        rec = self.store.run("report", keys["report"], lambda d: write_study_report(
            d, config=self.config, manifest=json.loads((self.out / "manifest.json").read_text()), audit=audit,
            scores=scores, generalization=generalization, overlap_dir=self.store.root / "overlap"))
        return StudyRun(self.config, self.out, dict(self.store.records), rec.path / "report.html",
                        power_lines(generalization))

    def _means(self, splits: dict[str, ContextSplits], ablation: str):
        """Mean activations over every training prompt of every context (mean ablation only)."""
        if ablation != "mean":
            return None
        from interp.activations import mean_activations
        from interp.batching import pad_ids, pad_token_id
        from interp.components import hook_name

        shape = ComponentShape.of(self.model)
        names = [hook_name(k, layer) for k in ("neuron", "head") for layer in range(shape.n_layers)]
        batches = [s.train.rows()[0] for s in splits.values()]
        rows = [b.tokens[i, : int(b.lengths[i])].tolist() for b in batches for i in range(len(b))]
        reference = pad_ids(rows, pad_token_id(self.model.tokenizer)).to(self.model.cfg.device)
        return mean_activations(self.model, reference, names, batch_size=self.config.batch_size)

    # -- selection -------------------------------------------------------------------------
    def candidates(self, scores, baselines, utility, head_bias) -> list[CandidateSet]:
        c = self._view("selection")
        shape = ComponentShape.of(self.model)
        out: list[CandidateSet] = []

        def add(strategy, k, ctx, components):
            out.append(CandidateSet(f"{strategy}@{k}|{ctx}", strategy, int(k), ctx, components))

        for ctx, s in scores.items():
            for k in c.neuron_ks:
                top = pruning.top_k_neurons(s.scores, k)
                if "top_k_neurons" in c.strategies:
                    add("top_k_neurons", k, ctx, top)
                if "random" in c.strategies:
                    add("random", k, ctx, pruning.random_set(shape, "neuron", k, seed=c.seed, per_layer_like=top))
            for k in c.head_ks:
                if "top_k_heads" in c.strategies:
                    add("top_k_heads", k, ctx, pruning.top_k_heads(s.scores, k))
                if "attention_to_name" in c.strategies:
                    add("attention_to_name", k, ctx, pruning.top_k_heads(baselines[ctx]["attention_to_name"], k))
            if "fasp" in c.strategies:
                for alpha in c.fasp_alphas:
                    chosen = pruning.fasp(head_bias[ctx], utility, gamma=c.fasp_gamma, alpha=alpha)
                    add("fasp", len(chosen), ctx, chosen)
            if "wanda_difference" in c.strategies:
                chosen = baselines[ctx]["wanda_difference"]
                add("wanda_difference", len(chosen), ctx, chosen)
        if "common" in c.strategies:
            for kind, ks in (("neuron", c.neuron_ks), ("head", c.head_ks)):
                for k in ks:
                    sets = [ComponentSet.top_k(s.scores[kind], k, kind=kind) for s in scores.values()]
                    add(f"common_{kind}s", k, "common", pruning.common(sets, min_count=max(2, len(sets) - 1)))
        return out


def power_lines(generalization: Generalization) -> str:
    """One line per context and held-out split: the unablated gap and the minimum detectable delta."""
    lines = ["power (two-sided 5%, 80% power, normal approximation from the two-way cluster bootstrap SD):"]
    for row in generalization.power().itertuples():
        lines.append(f"  {row.eval_context:<18} {row.split:<8} gap {row.baseline_gap:10.4g}  "
                     f"sd {row.gap_sd:9.3g}  MDE {row.mde:9.3g}  ({row.n_prompts} prompts, {row.n_names} names, "
                     f"{row.n_templates} templates)")
    return "\n".join(lines)


def _candidates_frame(candidates: list[CandidateSet]) -> pd.DataFrame:
    frames = []
    for cand in candidates:
        frame = cand.components.to_dataframe()
        frame.insert(0, "label", cand.label)
        frame.insert(1, "strategy", cand.strategy)
        frame.insert(2, "k", cand.k)
        frame.insert(3, "train_context", cand.train_context)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _save_baselines(baselines: dict, out: Path) -> None:
    baselines["wanda_difference"].to_dataframe().to_parquet(out / "wanda_difference.parquet", index=False)
    torch.save({"attention_to_name": baselines["attention_to_name"], "magnitude": baselines["magnitude"]},
               out / "scores.pt")


def _load_baselines(path: Path) -> dict:
    loaded = torch.load(path / "scores.pt")
    loaded["wanda_difference"] = ComponentSet.from_dataframe(pd.read_parquet(path / "wanda_difference.parquet"))
    return loaded


def rebuild_report(out_dir: str | Path) -> Path:
    """Re-render the report of a finished study from its saved stages."""
    from circuits.study_report import write_study_report

    out = Path(out_dir)
    stages = out / "stages"
    needed = ["audit", "generalization", "overlap"]
    missing = [n for n in needed if not (stages / n / "stage.json").exists()]
    if missing:
        raise FileNotFoundError(f"{out} has no finished stages {missing}; run 'bias-circuits study' first")
    config = StudyConfig.from_dict(json.loads((out / "config.json").read_text()))
    scores = {c: ContextScores.load(stages / f"scores-{c}") for c in config.contexts}
    target = stages / "report"
    with directory_lock(out, "rebuilding the report"):
        target.mkdir(exist_ok=True)
        return write_study_report(target, config=config, manifest=json.loads((out / "manifest.json").read_text()),
                                  audit=AuditResult.load(stages / "audit"), scores=scores,
                                  generalization=Generalization.load(stages / "generalization"),
                                  overlap_dir=stages / "overlap")


def run_study(config: StudyConfig | None = None) -> StudyRun:
    """Run (or resume) a study; with no config, the default study on the embedded model."""
    return Study(config or StudyConfig()).run()
