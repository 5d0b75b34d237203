"""The ``bias-circuits`` console script: one subcommand per stage of the workbench.

Each subcommand is a pair of small functions, ``_add_<name>(subparsers)`` declaring its arguments
and ``_run_<name>(args)`` doing the work, registered in ``SUBCOMMANDS``. Bad input (an unknown
context, a malformed prompt table, a model that cannot be loaded) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

EXIT_BAD_INPUT = 2


class BadInput(ValueError):
    """A user error the CLI reports in one line."""


def _add_audit(subparsers) -> None:
    from circuits.contexts import CONTEXTS, DETAILS

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
        help="audit an external prompt table (.csv or .jsonl) with "
        "columns scenario, variation, name_group, name, context_level, prompt_text[, answer_type]",
    )
    parser.add_argument(
        "--answer-type",
        default=None,
        help="answer type of a --prompts table without an "
        "answer_type column (dollars, percent, probability, score, rank, yes_no)",
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
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap and permutation resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run_audit(args) -> int:
    from circuits.audit import run_audit
    from circuits.contexts import get_context
    from circuits.prompts import load_prompt_table, read_prompt_table
    from interp import DEFAULT_MODEL, load_model

    if args.contexts:
        for name in args.contexts:
            get_context(name)  # an unknown name fails before the model loads
    if args.prompts is None and args.answer_type is not None:
        raise BadInput("--answer-type only applies to a --prompts table")
    for flag in ("variations", "names_per_cell", "batch_size", "resamples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise BadInput(f"--{flag.replace('_', '-')} must be at least 1")
    if args.prompts is not None:  # a bad table fails before the model loads
        read_prompt_table(args.prompts, answer_type=args.answer_type)
    model = load_model(args.model or DEFAULT_MODEL, device=args.device)
    prompts = None
    if args.prompts is not None:
        prompts = load_prompt_table(args.prompts, model, answer_type=args.answer_type, seed=args.seed)
    result = run_audit(
        model,
        args.contexts,
        prompts,
        out_dir=args.out,
        details=args.details,
        variations=args.variations,
        names_per_cell=args.names_per_cell,
        batch_size=args.batch_size,
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
    print(f"wrote {args.out}")
    return 0


SUBCOMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "audit": (_add_audit, _run_audit),
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script; returns the exit status."""
    from circuits.contexts import UnknownContextError
    from interp import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command][1](args)
    except (BadInput, UnknownContextError, ModelLoadError, ValueError, FileNotFoundError) as err:
        message = " ".join(str(err).split())
        print(f"bias-circuits {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
