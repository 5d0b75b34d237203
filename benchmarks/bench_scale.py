"""AtP at the papers' scale: a random-weight model with Llama-3-8B's shape, 1,680 prompts.

Throughput and memory only, never findings: the weights are random (``interp.testing.random_model``,
built in memory in bfloat16 on CUDA, float32 on CPU). The prompts are the attribution benchmark's
token-aligned pairs (a city swapped, preambles of varying length, so padding is exercised);
1,680 prompts are 840 clean/corrupt pairs, attributed over every MLP neuron and attention head by
``interp.attribution.attribute`` in microbatches sized from free accelerator memory.

Speed: minutes for all 1,680 prompts (``--quick`` or CPU: a few microbatches, timed and
extrapolated, on the scaled-down ``llama3-8b-mini`` shape unless ``--shape`` says otherwise).
Target: at most 10 minutes on one H100-class GPU. Memory: peak growth of one microbatch size over
N pairs vs 4N pairs (the scores stream, so it should not grow). Target: ratio at most 1.1.

Run: ``python benchmarks/bench_scale.py [--quick] [--device cuda] [--shape llama3-8b]``.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from bench_attribution import digit_metric, memory_growth, prompt_pairs
from common import DTYPES, parse_args, result_line, synchronize

from interp.attribution import attribute
from interp.memory import suggest_batch_size
from interp.testing import random_model

N_PROMPTS, MINUTES_TARGET, MEMORY_TARGET = 1680, 10.0, 1.1


def main() -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--shape", default=None, help="a interp.testing.SHAPES name (default: llama3-8b on CUDA)")
    known, rest = extra.parse_known_args()
    args = parse_args(__doc__.splitlines()[0], rest)
    cuda = torch.device(args.device).type == "cuda"
    shape = known.shape or ("llama3-8b" if cuda and not args.quick else "llama3-8b-mini")
    dtype = DTYPES[args.dtype] or (torch.bfloat16 if cuda else torch.float32)
    start = time.perf_counter()
    model = random_model(shape, device=args.device, dtype=dtype)
    cfg = model.cfg
    print(f"model: random {shape}, {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
          f"d_mlp {cfg.d_mlp}, vocab {cfg.d_vocab}, {dtype}, built in {time.perf_counter() - start:.1f} s")
    n_pairs = N_PROMPTS // 2
    clean, corrupt = prompt_pairs(model, n_pairs)
    metric = digit_metric(model)
    # bytes per pair: activations of one forward and backward, about 40 floats per model dim per position
    width = clean.tokens.shape[1]
    per_pair = 2 * width * (40 * cfg.d_model + 4 * cfg.d_mlp) * cfg.n_layers * dtype.itemsize
    batch = suggest_batch_size(per_pair, args.device, default=4, ceiling=128)
    timed_pairs = n_pairs if cuda and not args.quick else 3 * batch
    print(f"prompts: {N_PROMPTS} ({n_pairs} pairs of {width} positions); microbatch {batch} pairs; "
          f"timing {timed_pairs} pairs{' (extrapolated)' if timed_pairs < n_pairs else ''}")

    attribute(model, clean.select(torch.arange(batch)), corrupt.select(torch.arange(batch)), metric,
              batch_size=batch)  # warm-up
    rows = torch.arange(timed_pairs)
    synchronize(args.device)
    t0 = time.perf_counter()
    attribute(model, clean.select(rows), corrupt.select(rows), metric, batch_size=batch)
    synchronize(args.device)
    seconds = (time.perf_counter() - t0) * n_pairs / timed_pairs
    print(f"AtP over every neuron and head: {seconds / 60:.2f} min for {N_PROMPTS} prompts "
          f"({2 * n_pairs / seconds:.1f} prompts/s)")

    small, large = (memory_growth(model, batch, copies, args.device) for copies in (1, 4))
    ratio = large / small if small > 0 else math.nan
    print(f"peak memory growth: {small / 2**20:.1f} MiB over {batch} pairs, {large / 2**20:.1f} MiB over "
          f"{4 * batch} pairs (microbatches of {batch})")
    print(result_line("scale_atp_minutes", seconds / 60, MINUTES_TARGET))
    print(result_line("scale_atp_memory", ratio, MEMORY_TARGET))


if __name__ == "__main__":
    main()
