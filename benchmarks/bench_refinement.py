"""Pair-free first-order scores against exact ablation on the embedded SmolLM2 (issue 13, item 2).

On one context's training prompts (default: lending_approval, the default study's training split
of it; ``--names-per-cell``/``--variations`` choose others), every prompt and no pairs, the linear
estimate of zero-ablating each MLP neuron and attention head alone, grad(gap) . (0 - activation) summed over positions
(``circuits.select.scoring.score_prompts``), is compared with the exact change of the gap when that
component alone is zero-ablated (``interp.sweeps.ablation_sweep``), on the top-N components of each
kind by |estimate| plus ``--random`` drawn uniformly from the rest. Spearman of estimate vs exact
over that sample, per kind. Target: at least 0.85 for neurons (heads: reported, no target).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_refinement.py [--quick] [--top 200] [--random 50]``
(CPU-heavy: the full run is N+50 exact sweeps of every prompt per kind; ``--quick`` uses N=40, 20 random;
``--kinds neuron`` skips heads; ``--max-nodes 48`` finds each prompt's answers with a smaller
number tree, which shortens every row about 2.5x).
"""
from __future__ import annotations

import argparse
import time

import torch

from circuits.evaluate.evaluation import EvalSet
from circuits.inputs.prompts import build_prompts, select_prompts
from circuits.measure.bias import Expansion, context_metric
from circuits.select.scoring import score_prompts
from circuits.study.config import StudyConfig
from circuits.study.runner import study_prompts
from interp import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--context", default="lending_approval")
    parser.add_argument("--top", type=int, default=200)
    parser.add_argument("--random", type=int, default=50)
    parser.add_argument("--names-per-cell", type=int, default=None,
                        help="names per cell (default: the default study's training prompts of the context)")
    parser.add_argument("--variations", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", nargs="+", default=["neuron", "head"])
    parser.add_argument("--max-nodes", type=int, default=None,
                        help="number-tree nodes per prompt's answers (default: circuits.measure.bias.Expansion's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    top, n_random = (40, 20) if args.quick else (args.top, args.random)
    model = load_model("smollm2-135m-instruct", device="cpu")
    if args.names_per_cell is None:  # the default study's prompts of this context
        prompts = study_prompts(model, StudyConfig(contexts=(args.context,)))
    else:
        prompts = select_prompts(build_prompts(model, [args.context], details=["low"]), variations=args.variations,
                                 heldout_variations=1, names_per_cell=args.names_per_cell)
    train = prompts.filter(variation_split="train", name_split="train")
    expansion = Expansion() if args.max_nodes is None else Expansion(max_nodes=args.max_nodes)
    metric = context_metric(model, args.context, prompts=prompts, expansion=expansion)
    eval_set = EvalSet.from_prompts(model, f"{args.context}:train", train, metric)
    started = time.perf_counter()
    scores = score_prompts(model, eval_set, refine_top=top, n_random=n_random, per_prompt=False, batch_size=8,
                           kinds=args.kinds, progress=True)
    seconds = time.perf_counter() - started
    refined = scores.refined
    print(f"{len(train)} prompts ({train.frame['name'].nunique()} names, {train.frame['variation'].nunique()} "
          f"templates), gap {scores.gap:.4g}; top {top} + {n_random} random per kind; {expansion}; {seconds:.0f} s")
    for kind, rows in refined.groupby("kind"):
        top_rows = rows[rows["selection"] == "top"]
        rho_top = top_rows[["estimate", "exact"]].corr("spearman").iloc[0, 1]
        sign = (top_rows["estimate"].gt(0) == top_rows["exact"].gt(0)).mean()
        print(f"{kind}: Spearman {scores.settings['spearman'][kind]:.3f} over {len(rows)} (top only {rho_top:.3f}); "
              f"sign agreement on top {sign:.0%}")
    if "neuron" in scores.settings["spearman"]:
        print(f"RESULT refinement_spearman_neurons ratio={scores.settings['spearman']['neuron']:.3f} target=0.85")
    if "head" in scores.settings["spearman"]:
        print(f"RESULT refinement_spearman_heads ratio={scores.settings['spearman']['head']:.3f} target=none")


if __name__ == "__main__":
    main()
