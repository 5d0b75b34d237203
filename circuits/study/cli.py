"""The ``bias-circuits`` console script: one subcommand per stage of the workbench.

Each subcommand is a pair of small functions, ``_add_<name>(subparsers)`` declaring its arguments
and ``_run_<name>(args)`` doing the work, registered in ``SUBCOMMANDS``. Bad input (an unknown
context, a malformed prompt table, a model that cannot be loaded, a device this machine lacks, an
--out that is a file, an output directory another run holds) prints one line and exits 2, before
any model is loaded; Ctrl-C prints one line saying what was kept and how to resume, and exits 130.
See docs/troubleshooting.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class BadInput(ValueError):
    """A user error the CLI reports in one line."""


def _add_run_options(parser) -> None:
    """The options every measuring subcommand shares."""
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap and permutation resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_audit(subparsers) -> None:
    from circuits.inputs.contexts import CONTEXTS, DETAILS

    parser = subparsers.add_parser(
        "audit",
        help="measure name-based bias gaps with the deterministic metric",
        description=(
            "Measure how a model's answers change with the name in the prompt. For every prompt, the "
            "model's exact probabilities over the context's candidate answers give an expected answer "
            "(P(yes) for yes/no questions). Gaps White minus Black and women minus men are reported per "
            "context with two-way cluster-bootstrap intervals (names x variations), permutation and "
            "Mann-Whitney p-values and standardized mean differences. Writes values.parquet (per prompt), "
            "distribution.parquet (per prompt and candidate), gaps.parquet and settings.json to --out."
        ),
        epilog=f"Contexts: {', '.join(CONTEXTS)}.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="embedded model name, local Hugging Face directory or hub "
        "name (default: the embedded SmolLM2-135M-Instruct)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--contexts", nargs="+", metavar="NAME", help="contexts to audit (default: all)")
    source.add_argument(
        "--prompts",
        metavar="TABLE",
        help="audit an external prompt table (.csv or .jsonl) with columns scenario, variation, "
        "name_group, name, context_level, prompt_text[, answer_type, higher_favours]",
    )
    parser.add_argument(
        "--answer-type",
        default=None,
        help="answer type of a --prompts table without an "
        "answer_type column (dollars, percent, probability, score, rank, yes_no; any case)",
    )
    parser.add_argument(
        "--higher-favours",
        action="append",
        default=None,
        metavar="SCENARIO=yes|no",
        help="whether a higher answer favours the named person in a --prompts scenario (repeatable; "
        "overrides the table's higher_favours column; default: yes, except for ranks: lower is better)",
    )
    parser.add_argument(
        "--scale",
        action="append",
        default=None,
        metavar="SCENARIO=LOW:HIGH",
        help="the range a --prompts scenario's prompts ask for, e.g. chess=1:100 (repeatable): an answer "
        "beyond it counts at its end (default: none)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the results")
    parser.add_argument("--details", nargs="+", choices=DETAILS, default=list(DETAILS), help="detail levels")
    parser.add_argument(
        "--variations",
        type=int,
        default=None,
        metavar="N",
        help="audit N variations per context (seeded sample; default: all)",
    )
    parser.add_argument(
        "--names-per-cell",
        type=int,
        default=None,
        metavar="N",
        help="audit N names per race x gender cell (seeded sample; default: all)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="model rows per forward pass (default: 32)"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=100, metavar="N",
        help="prompts per saved chunk: an interrupted audit resumes after the last one (default: 100)",
    )
    _add_run_options(parser)


def _higher_favours(given: Sequence[str] | None) -> dict[str, bool] | None:
    """``["office=yes", "rank=no"]`` -> ``{"office": True, "rank": False}``."""
    if not given:
        return None
    words = {"yes": True, "true": True, "no": False, "false": False}
    parsed = {}
    for item in given:
        scenario, _, word = item.rpartition("=")
        if not scenario or word.strip().lower() not in words:
            raise BadInput(f"--higher-favours {item!r}: write SCENARIO=yes or SCENARIO=no")
        parsed[scenario.strip()] = words[word.strip().lower()]
    return parsed


def _scales(given: Sequence[str] | None) -> dict[str, tuple[float, float]] | None:
    """``["chess=1:100"]`` -> ``{"chess": (1.0, 100.0)}``."""
    if not given:
        return None
    parsed = {}
    for item in given:
        scenario, _, span = item.rpartition("=")
        low, _, high = span.partition(":")
        try:
            bounds = (float(low), float(high))
        except ValueError:
            bounds = None
        if not scenario.strip() or bounds is None:
            raise BadInput(f"--scale {item!r}: write SCENARIO=LOW:HIGH, e.g. chess=1:100")
        parsed[scenario.strip()] = bounds
    return parsed


def _run_audit(args) -> int:
    from circuits.inputs.contexts import get_context
    from circuits.inputs.tables import load_prompt_table, read_prompt_table, scenario_scales, scenario_signs
    from circuits.measure.audit import run_audit
    from circuits.measure.coverage import coverage_lines
    from interp import DEFAULT_MODEL, load_model

    if args.contexts:
        for name in args.contexts:
            get_context(name)  # an unknown name fails before the model loads
    if args.prompts is None and args.answer_type is not None:
        raise BadInput("--answer-type only applies to a --prompts table")
    for flag in ("higher_favours", "scale"):
        if args.prompts is None and getattr(args, flag):
            raise BadInput(f"--{flag.replace('_', '-')} only applies to a --prompts table")
    favours, scales = _higher_favours(args.higher_favours), _scales(args.scale)
    for flag in ("variations", "names_per_cell", "batch_size", "chunk_size", "resamples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise BadInput(f"--{flag.replace('_', '-')} must be at least 1")
    if args.prompts is not None:  # a bad table (or a scenario it lacks) fails before the model loads
        table = read_prompt_table(args.prompts, answer_type=args.answer_type)
        scenario_signs(table, favours)
        scenario_scales(table, scales)
    model = load_model(args.model or DEFAULT_MODEL, device=args.device)
    prompts = None
    if args.prompts is not None:
        prompts = load_prompt_table(args.prompts, model, answer_type=args.answer_type, higher_favours=favours,
                                    scales=scales, seed=args.seed)
    result = run_audit(
        model,
        args.contexts,
        prompts,
        out_dir=args.out,
        details=args.details,
        variations=args.variations,
        names_per_cell=args.names_per_cell,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        n_resamples=args.resamples,
        seed=args.seed,
        progress=not args.no_progress,
    )
    gaps = result.to_dataframe()
    if gaps.empty:
        print("no gap could be measured: each side of a contrast needs at least 2 names")
    else:
        columns = ["context", "contrast", "gap", "ci_low", "ci_high", "advantage", "smd", "p_permutation"]
        print(gaps[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("What the metric sees, per context:")
    for line in coverage_lines(result.measurement):
        print(f"  {line}")
    print(f"wrote {args.out}")
    return 0


def _add_agreement(subparsers) -> None:
    from circuits.inputs.contexts import CONTEXTS, DETAILS
    from circuits.study.config import StudyConfig

    parser = subparsers.add_parser(
        "agreement",
        help="compare the deterministic metric with sampled answers, per context",
        description=(
            "Check the deterministic metric against the papers' sampled one on the same prompts. Every "
            "prompt gets the metric's distribution over answer values and --samples sampled replies "
            "at --temperature, parsed as numbers (yes = 1, no = 0; unparsable replies count as invalid). "
            "Per context it reports the total-variation distance between the metric's value distribution "
            "and the sampled replies' (pooled over prompts; values under 1% of the mass share a bin, "
            "replies the metric does not cover share an 'other' bin with its uncovered mass) beside its "
            "sampling-noise "
            "reference (the 95th percentile of the same distance for simulated draws from the metric: "
            "within noise when below), both White-minus-Black gaps with name x variation cluster-bootstrap "
            "intervals, the sampled SMD and Mann-Whitney p-value, the invalid-answer share, Spearman and "
            "Pearson correlations between each prompt's expected answer and the mean of its valid samples, "
            "and whether the two gaps have the same sign. Replies are read twice: as the metric reads "
            "them (the covered answer the reply starts with: tv) and parsed whole as the papers do "
            "(tv_parsed; value_differs_share and parsed_only_share say where the readings differ). "
            "Prompts are the study's "
            "selection (--variations per context, --names-per-cell per name split). Writes agreement.parquet "
            "(per context), prompts.parquet (per prompt), samples.parquet (every reply, both readings), "
            "bins.parquet (the pooled bins), distribution.parquet (the metric's answers per prompt) and "
            "settings.json."
        ),
        epilog=f"Contexts: {', '.join(CONTEXTS)}. Sampling uses the model's KV cache (one prefill per "
        "prompt); on a CPU, bound the cost with --max-prompts, --samples and --max-new-tokens.",
    )
    parser.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--contexts", nargs="+", metavar="NAME", default=list(StudyConfig.contexts),
                        help=f"contexts to compare (default: {' '.join(StudyConfig.contexts)})")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for the results")
    parser.add_argument("--samples", type=int, default=10, metavar="N", help="sampled replies per prompt (default 10)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default 1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=12, metavar="N",
                        help="longest reply in tokens (default 12)")
    parser.add_argument("--details", nargs="+", choices=DETAILS, default=["low"], help="detail levels (default low)")
    parser.add_argument("--variations", type=int, default=3, metavar="N", help="variations per context (default 3)")
    parser.add_argument("--names-per-cell", type=int, default=2, metavar="N",
                        help="names per race x gender cell in each name split (default 2: 16 names)")
    parser.add_argument("--max-prompts", type=int, default=None, metavar="N",
                        help="at most N prompts per context, one per name first, balanced over race x gender "
                        "(seeded; default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="model rows per forward pass (default 16)")
    _add_run_options(parser)


def _run_agreement(args) -> int:
    from circuits.inputs.contexts import get_context
    from circuits.measure.agreement import run_agreement
    from interp import DEFAULT_MODEL, load_model

    for name in args.contexts:
        get_context(name)  # an unknown name fails before the model loads
    for flag in ("samples", "max_new_tokens", "variations", "names_per_cell", "max_prompts", "batch_size",
                 "resamples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise BadInput(f"--{flag.replace('_', '-')} must be at least 1")
    if args.temperature < 0:
        raise BadInput("--temperature must be at least 0 (0 = greedy)")
    model = load_model(args.model or DEFAULT_MODEL, device=args.device)
    result = run_agreement(
        model,
        list(dict.fromkeys(args.contexts)),
        details=args.details,
        variations=args.variations,
        names_per_cell=args.names_per_cell,
        max_prompts=args.max_prompts,
        n_samples=args.samples,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        n_resamples=args.resamples,
        seed=args.seed,
        progress=not args.no_progress,
        out_dir=args.out,
    )
    columns = ["context", "n_prompts", "mean_grid_mass", "tv", "tv_noise_p95", "tv_within_noise", "tv_parsed",
               "tv_parsed_noise_p95", "value_differs_share", "parsed_only_share", "det_gap",
               "det_ci_low", "det_ci_high", "sampled_gap", "sampled_smd", "sampled_p_mann_whitney", "invalid_share",
               "spearman_rho", "sign_agrees"]
    print(result.to_dataframe()[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {args.out}")
    return 0


def _add_study(subparsers) -> None:
    parser = subparsers.add_parser(
        "study",
        help="run (or resume) a whole study: audit, scores, pruning, generalization, overlap, report",
        description=(
            "Run a whole study from a TOML or YAML config (a [study] table whose fields are those of "
            "circuits.study.config.StudyConfig): audit -> attribution scores -> pruning strategies -> generalization "
            "matrix -> overlap -> report. With no config it runs the default study on the embedded "
            "SmolLM2-135M-Instruct. Every stage is written atomically to the output directory; re-running the "
            "same command after an interruption reuses finished stages, and a changed setting recomputes only "
            "the stages that depend on it."
        ),
    )
    parser.add_argument("--config", metavar="FILE", help="study config (.toml, .yaml)")
    parser.add_argument("--out", metavar="DIR", help="output directory (overrides the config's out_dir)")
    parser.add_argument("--model", help="model (overrides the config)")
    parser.add_argument("--device", help="torch device (overrides the config; default: auto)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype (overrides the config; auto, the default: float32)")
    parser.add_argument("--matmul-precision", choices=["highest", "high"],
                        help="float32 matmuls on CUDA (overrides the config): highest (the default), high "
                             "(TensorFloat32; gaps within about 1%%)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _study_config(args):
    from circuits.study.config import StudyConfig

    pairs = (("out_dir", args.out), ("model", args.model), ("device", args.device), ("dtype", args.dtype),
             ("matmul_precision", args.matmul_precision))
    overrides = {k: v for k, v in pairs if v}
    if getattr(args, "no_progress", False):
        overrides["progress"] = False
    if args.config:
        return StudyConfig.from_file(args.config, **overrides)
    return StudyConfig.from_dict(overrides)


def _run_study(args) -> int:
    from circuits.study.runner import run_study

    run = run_study(_study_config(args).validate())
    print(run.summary())
    return 0


def _add_attribute(subparsers) -> None:
    from circuits.inputs.contexts import CONTEXTS

    parser = subparsers.add_parser(
        "attribute",
        help="score every MLP neuron and attention head for one context's bias (attribution patching)",
        description=(
            "Attribution patching of a context's deterministic bias metric over token-aligned counterfactual "
            "pairs (White-name prompt A, Black-name prompt B): for every neuron and head, the estimated drop in "
            "metric(A) - metric(B) when its activation on A is replaced by its value on B. Writes the scores "
            "(Parquet + JSON) to --out and prints the top components."
        ),
        epilog=f"Contexts: {', '.join(CONTEXTS)}.",
    )
    parser.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--context", required=True, help="context to score")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--names-per-cell", type=int, default=4,
                        help="names per race x gender cell in each name split (default 4)")
    parser.add_argument("--pairs-per-cell", type=int, default=4, help="pairs kept per template (default 4)")
    parser.add_argument("--method", choices=("atp", "ig"), default="atp")
    parser.add_argument("--refine-top", type=int, default=0, help="refine the top N by exact patching")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--top", type=int, default=20, help="how many top components to print")


def _run_attribute(args) -> int:
    from circuits.evaluate.evaluation import eval_set
    from circuits.inputs.contexts import get_context
    from circuits.inputs.prompts import build_prompts, select_prompts
    from circuits.measure.bias import context_metric
    from circuits.select.scoring import score_context
    from interp import DEFAULT_MODEL, load_model

    get_context(args.context)
    model = load_model(args.model or DEFAULT_MODEL, device=args.device)
    prompts = select_prompts(build_prompts(model, [args.context], details=["low"], seed=args.seed),
                             names_per_cell=args.names_per_cell, seed=args.seed)
    metric = context_metric(model, args.context, prompts=prompts)
    train = eval_set(model, args.context, prompts, metric, pairs=True, max_pairs_per_cell=args.pairs_per_cell,
                     seed=args.seed)
    scores = score_context(model, train, method=args.method, refine_top=args.refine_top, batch_size=args.batch_size)
    scores.save(args.out)
    table = scores.to_dataframe()
    top = table.reindex(table["score"].abs().sort_values(ascending=False).index).head(args.top)
    print(f"{len(train.pairs)} pairs; gap A - B = {scores.gap:.4g}")
    print(top.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {args.out}")
    return 0


def _add_prune(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="export a pruned copy of a model: the top-k components of saved scores, removed by weight edits",
        description=(
            "Select the top-k neurons or heads from scores written by 'bias-circuits attribute' (or a study's "
            "stages/scores-CONTEXT directory), zero the weights that write them into the residual stream, and "
            "save a Hugging Face directory that interp.load_model (and any transformers user) can load."
        ),
    )
    parser.add_argument("--model", default=None, help="model the scores were computed on (default: embedded)")
    parser.add_argument("--scores", required=True, metavar="DIR", help="directory of saved context scores")
    parser.add_argument("--kind", choices=("neuron", "head", "mixed"), default="neuron")
    parser.add_argument("--k", type=int, required=True, help="number of components to remove")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the pruned model")
    parser.add_argument("--device", default=None)


def _run_prune(args) -> int:
    from circuits.select.scoring import ContextScores
    from interp import DEFAULT_MODEL, load_model
    from interp.ablation import export_pruned

    scores = ContextScores.load(args.scores)
    if args.k < 1:
        raise BadInput("--k must be at least 1")
    chosen = scores.top(args.k, None if args.kind == "mixed" else args.kind)
    model = load_model(args.model or DEFAULT_MODEL, device=args.device)
    export_pruned(model, chosen, args.out)
    chosen.to_dataframe().to_csv(f"{args.out}/pruned_components.csv", index=False)
    print(f"removed {len(chosen)} components ({scores.context}); wrote {args.out}")
    return 0


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="re-render the HTML/Markdown report of a finished study directory",
        description="Rebuild report.html, report.md and the figures of a study from its saved stages.",
    )
    parser.add_argument("study_dir", help="a study's output directory")


def _run_report(args) -> int:
    from circuits.study.runner import rebuild_report

    print(f"wrote {rebuild_report(args.study_dir)}")
    return 0


SUBCOMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "audit": (_add_audit, _run_audit),
    "agreement": (_add_agreement, _run_agreement),
    "study": (_add_study, _run_study),
    "attribute": (_add_attribute, _run_attribute),
    "prune": (_add_prune, _run_prune),
    "report": (_add_report, _run_report),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bias-circuits",
        description="A mechanistic-interpretability workbench for bias circuitry in language models.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def _check_common(args) -> None:
    """The checks every subcommand shares, before any model work: its --device and --out."""
    from interp.models import check_device

    if getattr(args, "device", None):
        check_device(args.device)
    out = getattr(args, "out", None)
    if out:
        path = Path(out).expanduser()
        if path.exists() and not path.is_dir():
            raise BadInput(f"--out {path} is an existing file; give a directory (it is created if missing)")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BadInput(f"--out {path}: cannot create the directory ({err.strerror or err})") from None


def _interrupted(args) -> str:
    """One line: what an interrupted subcommand kept and how to resume."""
    if args.command == "study":
        out = Path(_study_config(args).out_dir).expanduser()
        done = sorted(p.parent.name for p in (out / "stages").glob("*/stage.json"))
        kept = f"finished stages are kept in {out / 'stages'} ({', '.join(done) or 'none yet'})"
        return f"interrupted: {kept}; run the same command again to resume"
    if args.command == "audit":
        from circuits.measure.audit import saved_progress

        done, total = saved_progress(args.out)
        return (f"interrupted: {done} of {total} prompts are kept in {Path(args.out) / 'chunks'}; run the same "
                "command again to resume" if total else "interrupted before any prompt was measured; nothing kept")
    return "interrupted: this command writes its results only at the end, so nothing was kept; run it again"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script; returns the exit status."""
    from circuits.inputs.contexts import UnknownContextError
    from interp import ModelLoadError
    from interp.locking import LockedError

    args = build_parser().parse_args(argv)
    try:
        _check_common(args)
        return SUBCOMMANDS[args.command][1](args)
    except (BadInput, UnknownContextError, ModelLoadError, LockedError, ValueError, FileNotFoundError) as err:
        message = " ".join(str(err).split())
        print(f"bias-circuits {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"\nbias-circuits {args.command}: {_interrupted(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
