"""Stacked evaluation of many component sets against one full forward per set (issue 15, item 2).

On the embedded SmolLM2, one context's training prompts are measured by the study's evaluation
stage (``circuits.evaluate.evaluation.evaluate``: the gap endpoints on every prompt, plus utility on the
reporting half of the neutral text) for a realistic list of sets: top-k neurons and top-k heads by
the pair-free scores of those prompts (``circuits.select.scoring.score_prompts``, no refinement) at two
sizes each, and ``--null-draws`` random sets of each kind and size (``circuits.select.pruning.null_sets``,
as ``generalize`` draws them). Both sides run in this one process on the same inputs:

- ``stacked=False``: one ablated forward per set and prompt (the old evaluation stage);
- ``stacked=True``: ``interp.sweeps.metric_sweep`` / ``ablation_sweep`` (clean pass once, every set
  resumed from its lowest layer, stacked into shared forwards).

The tables must agree (max relative differences printed, a gap's relative to the larger of the two
groups' means it is the difference of; in float32 the run fails, after its RESULT line, above 1e-3;
``common.check_same``). The stacked side runs on the Hugging Face attention kernels (``interp.bridge.
fastest_attention``), the one-forward side through the bridge's own attention, so they differ by float
rounding, not by order of summation alone. Also
printed: the bound layer skipping alone can give for these sets, (sets + 1) x layers / (layers + sum
of the layers each set runs). On CPU, times are this process's CPU time (``time.process_time``; torch
on ``--threads`` 1), which other processes on shared cores disturb far less than wall time (also
printed); on CUDA (``--device cuda``), wall time.
``RESULT stacked_evaluation ratio=<plain seconds / stacked seconds> target=3``.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_evaluation.py [--quick]`` (the default: 48
prompts, k in (25, 100) neurons and (3, 9) heads, 5 nulls each: 24 sets; ``--quick``: 8 prompts, one
size per kind, 2 nulls: 6 sets). ``--order stacked-first`` runs the stacked side first.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import torch
from common import DTYPES, add_precision_arguments, apply_matmul_precision, check_same, synchronize

from circuits.evaluate.evaluation import EvalSet, UtilityProbe, evaluate
from circuits.inputs.prompts import build_prompts, select_prompts
from circuits.measure.bias import context_metric
from circuits.select import pruning
from circuits.select.scoring import score_prompts
from interp import load_model
from interp.components import ComponentShape


def _even_sample(frame, n: int, seed: int = 0):
    """``n`` rows, half from each group, spread over templates (the table's order kept)."""
    picked = []
    for _, rows in frame.groupby("group", sort=True):
        picked += list(rows.sample(min(len(rows), n // 2), random_state=seed).index)
    return sorted(picked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--context", default="lending_amount")
    parser.add_argument("--prompts", type=int, default=None, help="prompts evaluated (default 48; quick 8)")
    parser.add_argument("--null-draws", type=int, default=None, help="random sets per candidate (default 5; quick 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA the ratio is over wall time)")
    add_precision_arguments(parser)
    parser.add_argument("--order", choices=["plain-first", "stacked-first"], default="plain-first")
    parser.add_argument("--single-heads", action="store_true",
                        help="instead: head 0 of every layer alone (a FASP-style single-head sweep), no scoring")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    apply_matmul_precision(args)
    n_prompts = args.prompts or (8 if args.quick else 48)
    null_draws = args.null_draws if args.null_draws is not None else (2 if args.quick else 5)
    neuron_ks, head_ks = ((25,), (3,)) if args.quick else ((25, 100), (3, 9))

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA device is available")
    model = load_model("smollm2-135m-instruct", device=args.device, dtype=DTYPES[args.dtype])
    shape = ComponentShape.of(model)
    prompts = select_prompts(build_prompts(model, [args.context], details=["low"]), variations=4, heldout_variations=1,
                             names_per_cell=8)
    train = prompts.filter(variation_split="train", name_split="train")
    train = replace(train, frame=train.frame.loc[_even_sample(train.frame, n_prompts)].reset_index(drop=True))
    metric = context_metric(model, args.context, prompts=train)
    eval_set = EvalSet.from_prompts(model, f"{args.context}:train", train, metric)
    batch, frame = eval_set.rows()
    expanded = metric.expand(batch)
    print(f"{len(batch)} prompts ({frame['name'].nunique()} names, {frame['template'].nunique()} templates), "
          f"{int(batch.lengths.float().mean())} prompt tokens and "
          f"{int(expanded.attention_mask.sum(-1).float().mean())} "
          f"expanded positions per row on average; load average {os.getloadavg()[0]:.1f}", flush=True)

    if args.single_heads:
        from interp.components import ComponentSet, Head

        sets = {f"H{layer}.0": ComponentSet([Head(layer, 0)]) for layer in range(shape.n_layers)}
    else:
        sets = _strategy_sets(model, eval_set, shape, neuron_ks, head_ks, null_draws, args.batch_size)
    _compare(model, sets, eval_set, shape, args, "stacked_single_heads" if args.single_heads else "stacked_evaluation",
             "none" if args.single_heads else "3")


def _strategy_sets(model, eval_set, shape, neuron_ks, head_ks, null_draws, batch_size):
    started = time.perf_counter()
    scores = score_prompts(model, eval_set, refine_top=0, per_prompt=False, batch_size=batch_size, progress=False)
    print(f"scores (pair-free, unrefined): {time.perf_counter() - started:.0f} s", flush=True)
    sets = {}
    for k in neuron_ks:
        sets[f"top_k_neurons@{k}"] = pruning.top_k_neurons(scores.scores, k)
    for k in head_ks:
        sets[f"top_k_heads@{k}"] = pruning.top_k_heads(scores.scores, k)
    for i, (label, components) in enumerate(list(sets.items())):
        for d, drawn in enumerate(pruning.null_sets(components, shape, n_draws=null_draws, seed=i)):
            sets[f"{label}#null{d}"] = drawn
    return sets


def _compare(model, sets, eval_set, shape, args, name, target):
    starts = [min(c.layer for c in s) for s in sets.values()]
    n_layers = shape.n_layers
    bound = (len(sets) + 1) * n_layers / (n_layers + sum(n_layers - s for s in starts))
    print(f"{len(sets)} sets; lowest layers {sorted(starts)}; layer-skipping bound {bound:.2f}x", flush=True)
    probe = UtilityProbe.build(model)

    def run(stacked: bool, chosen=sets):
        return evaluate(model, chosen, [eval_set], probe=probe, batch_size=args.batch_size, n_resamples=200, seed=0,
                        progress=False, stacked=stacked)

    if torch.device(args.device).type == "cuda":  # load both sides' kernels before either is timed
        for stacked in (False, True):
            run(stacked, dict(list(sets.items())[:2]))
    seconds, wall, results = {}, {}, {}
    order = [False, True] if args.order == "plain-first" else [True, False]
    for stacked in order:
        load = os.getloadavg()[0]
        synchronize(args.device)
        started, cpu = time.perf_counter(), time.process_time()
        results[stacked] = run(stacked)
        synchronize(args.device)
        seconds[stacked] = time.process_time() - cpu
        wall[stacked] = time.perf_counter() - started
        print(f"{'stacked' if stacked else 'one forward per set'}: {seconds[stacked]:.1f} s process CPU time, "
              f"{wall[stacked]:.1f} s wall (load average at start {load:.1f})", flush=True)
    plain, fast = results[False].frame.set_index("set"), results[True].frame.set_index("set")
    worst = {}
    # a gap is a difference of the two groups' means: its rounding is relative to their size, not its own
    means = np.maximum(plain["mean_a"].abs().to_numpy(), plain["mean_b"].abs().to_numpy())
    for column in ("gap", "delta_gap", "mean_a", "mean_b", "kl", "perplexity"):
        diff = np.abs(plain[column].to_numpy() - fast.loc[plain.index, column].to_numpy())
        own = means if column in ("gap", "delta_gap") else np.abs(plain[column].to_numpy())
        worst[column] = float((diff / np.maximum(own, 1e-3)).max())
    shown = plain[["n_components", "delta_gap", "kl"]].join(fast[["delta_gap", "kl"]].add_suffix("_stacked"))
    print(shown.to_string(float_format=lambda v: f"{v:.6g}"))
    print("same numbers: max relative difference " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    if torch.device(args.device).type == "cuda":
        ratio = wall[False] / wall[True]
    else:
        print(f"wall-clock ratio {wall[False] / wall[True]:.2f} (noisy where other processes share the cores)")
        ratio = seconds[False] / seconds[True]
    print(f"RESULT {name} ratio={ratio:.2f} target={target}", flush=True)
    check_same("stacked and one-forward-per-set evaluations", max(worst.values()), 1e-3, model.cfg.dtype)


if __name__ == "__main__":
    main()
