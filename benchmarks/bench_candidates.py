"""The expected-value metric over a multi-token answer grid: packed trie vs one row per candidate.

The study's default metric reads the model's exact probability of every candidate answer (8-12
amounts of up to 7 tokens after a ~70-token chat prompt). Laid out one row per candidate, every
prompt runs once per candidate; packed (``CandidateAnswers(packed=True)``, the default on the
bridge) each prompt runs once, followed by the trie of its candidates' leading tokens under a
4-D attention mask. Both give the same values (checked here, to 1e-4 relative); the ratio is the
row-per-candidate time over the packed time, for the metric alone (``run_metric``, no grad) and for
AtP over every neuron and head (``attribute``). Warmed up, then alternated; medians. Target: 3x.

Run: ``python benchmarks/bench_candidates.py [--quick] [--device cuda] [--threads N]``.
"""
from __future__ import annotations

import dataclasses
import platform
import statistics

import torch
from common import parse_args, result_line, timed

from circuits.inputs.prompts import build_pairs, build_prompts
from circuits.measure.bias import context_metric
from interp import load_model
from interp.attribution import attribute
from interp.metrics import ExpectedValue, run_metric

TARGET = 3.0


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    model = load_model("smollm2-135m-instruct", device=args.device)
    n_pairs, repeats = (4, 2) if args.quick else (16, 3)
    prompts = build_prompts(model, ["lending_amount"], details=["low"], seed=0)
    pairs = build_pairs(model, prompts, seed=0)
    clean, corrupt = pairs.clean.select(range(n_pairs)), pairs.corrupt.select(range(n_pairs))
    packed = context_metric(model, "lending_amount")
    rows = ExpectedValue(dataclasses.replace(packed.candidates, packed=False))
    grid = packed.candidates
    expanded = packed.expand(clean)
    print(f"{platform.node()} {args.device} threads={torch.get_num_threads()} pairs={n_pairs} "
          f"candidates={len(grid.texts)} longest={max(map(len, grid.token_ids))} tokens; "
          f"tokens per prompt: packed {expanded.tokens.shape[1]}, "
          f"row per candidate {rows.expand(clean).tokens.shape[1] * len(grid.texts)}")

    def metric_run(metric):
        with torch.no_grad():
            return run_metric(model, metric, clean)

    def atp_run(metric):
        return attribute(model, clean, corrupt, metric, batch_size=n_pairs).scores["neuron"]

    ratios = {}
    for what, run in (("metric", metric_run), ("atp", atp_run)):
        a, b = run(packed), run(rows)  # warm-up, and the equality check
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        t_packed, t_rows = [], []
        for _ in range(repeats):
            t_packed.append(timed(lambda run=run: run(packed), args.device)[1])
            t_rows.append(timed(lambda run=run: run(rows), args.device)[1])
        ratios[what] = statistics.median(t_rows) / statistics.median(t_packed)
        print(f"{what}: packed {statistics.median(t_packed):.2f}s, row per candidate "
              f"{statistics.median(t_rows):.2f}s, speed-up {ratios[what]:.2f}x")
    print(result_line("candidate_packing_atp", ratios["atp"], TARGET))


if __name__ == "__main__":
    main()
