"""The expected-value metric over a multi-token answer grid: packed trie vs one row per candidate.

The numeric metric reads the model's exact probability of every candidate answer (here one fixed
grid for every prompt: the first 12 (``N_CANDIDATES``) of the first prompt's own answers from
a small tree, ``Expansion(max_nodes=16)``: amounts of up to 3 tokens after a ~70-token chat prompt;
per-prompt answer sets are always packed). Laid out one row per candidate, every
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
from common import DTYPES, check_same, parse_args, result_line, timed

from circuits.inputs.prompts import build_pairs, build_prompts
from circuits.measure.bias import Expansion, context_metric
from interp import load_model
from interp.attribution import attribute
from interp.metrics import ExpectedValue, run_metric

TARGET = 3.0
N_CANDIDATES = 12


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    model = load_model("smollm2-135m-instruct", device=args.device, dtype=DTYPES[args.dtype])
    n_pairs, repeats = (4, 2) if args.quick else (16, 3)
    prompts = build_prompts(model, ["lending_amount"], details=["low"], seed=0)
    pairs = build_pairs(model, prompts, seed=0)
    clean, corrupt = pairs.clean.select(range(n_pairs)), pairs.corrupt.select(range(n_pairs))
    own = context_metric(model, "lending_amount", expansion=Expansion(max_nodes=16))
    full = own.candidates.of(clean.select(range(1)))[0]
    grid = dataclasses.replace(full, **{f: getattr(full, f)[:N_CANDIDATES] for f in ("texts", "values", "token_ids")},
                               ends=full.ends and full.ends[:N_CANDIDATES])
    packed = ExpectedValue(dataclasses.replace(grid, packed=True), own.summary)
    rows = ExpectedValue(dataclasses.replace(grid, packed=False), own.summary)
    print(f"{platform.node()} {args.device} threads={torch.get_num_threads()} pairs={n_pairs} "
          f"candidates={len(grid.texts)} longest={max(map(len, grid.token_ids))} tokens; positions: "
          f"packed {packed.expand(clean).tokens.numel()}, row per candidate {rows.expand(clean).tokens.numel()}")

    def metric_run(metric):
        with torch.no_grad():
            return run_metric(model, metric, clean)

    def atp_run(metric):
        # one pair at a time: a row per candidate holds every candidate's copy of the prompt for the backward
        return attribute(model, clean, corrupt, metric, batch_size=1).scores["neuron"]

    ratios, worst = {}, {}
    for what, run in (("metric", metric_run), ("atp", atp_run)):
        a, b = run(packed), run(rows)  # warm-up, and the equality check
        worst[what] = float((a - b).abs().max() / b.abs().max())
        t_packed, t_rows = [], []
        for _ in range(repeats):
            t_packed.append(timed(lambda run=run: run(packed), args.device)[1])
            t_rows.append(timed(lambda run=run: run(rows), args.device)[1])
        ratios[what] = statistics.median(t_rows) / statistics.median(t_packed)
        print(f"{what}: packed {statistics.median(t_packed):.2f}s, row per candidate "
              f"{statistics.median(t_rows):.2f}s, speed-up {ratios[what]:.2f}x")
    print(result_line("candidate_packing_atp", ratios["atp"], TARGET), flush=True)
    for what, difference in worst.items():  # relative to the largest value
        check_same(f"packed and row-per-candidate {what}", difference, 1e-4, model.cfg.dtype)


if __name__ == "__main__":
    main()
