"""Attribution patching over every MLP neuron and attention head of the embedded SmolLM2.

Speed: ``interp.attribution.attribute`` (AtP, every neuron and head) on one batch of prompt pairs,
as a ratio to the bare cost of the same model on the same batch doing the same passes without
attribution: a no-grad forward on the corrupt prompts, a forward on the clean prompts, and one
backward of the summed metric down to the residual stream entering block 0 (activation gradients
through every layer, no weight gradients: what AtP itself needs). Both are warmed up, then run
alternately; the ratio is of the median times. Target: at most 1.3.

Memory: peak memory of AtP over N pairs vs the same N pairs repeated 10 times, microbatches of N
pairs (the scores stream, so the peak should not grow with the data set). On CUDA,
``torch.cuda.max_memory_allocated`` above what was allocated before the run. On CPU, each size runs
in a fresh single-threaded subprocess (the two side by side) with glibc's mmap threshold pinned at 64 KiB, so freed
tensors leave the resident set; once the model is loaded it resets the kernel's peak resident set
(``/proc/self/clear_refs``) and reports the growth of ``VmHWM`` over the resident set before the
run. Target: ratio at most 1.1.

Run: ``python benchmarks/bench_attribution.py [--quick] [--device cuda]``.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch
from common import DTYPES, parse_args, reset_peak_memory, result_line, synchronize

from interp import load_model
from interp.attribution import attribute
from interp.batching import encode, pad_ids, pad_token_id
from interp.hooks import hooked
from interp.metrics import LogitDiff

CITIES = ("Paris", "Tokyo", "London", "Cairo", "Berlin", "Lima", "Madrid", "Delhi", "Rome", "Oslo", "Vienna", "Athens")
TEMPLATE = ("I am planning a trip to {city} with my family. "
            "A fair price for one night in a good hotel there, in dollars, is")
PREAMBLE = "We have saved for this holiday for a long time."
SPEED_TARGET, MEMORY_TARGET = 1.3, 1.1


def prompt_pairs(model, n: int):
    """Token-aligned (clean, corrupt) batches: the city swapped, a preamble of varying length (padding)."""
    cleans, corrupts = [], []
    for i in range(n):
        a, b = CITIES[i % len(CITIES)], CITIES[(i + 5) % len(CITIES)]
        preamble = " ".join([PREAMBLE] * (i % 3))
        clean = encode(model, f"{preamble} {TEMPLATE.format(city=a)}".strip())
        corrupt = encode(model, f"{preamble} {TEMPLATE.format(city=b)}".strip())
        assert len(clean) == len(corrupt), f"{a} and {b} must tokenize to the same length"
        cleans.append(clean)
        corrupts.append(corrupt)
    pad, device = pad_token_id(model.tokenizer), model.cfg.device
    return pad_ids(cleans, pad).to(device), pad_ids(corrupts, pad).to(device)


def digit_metric(model) -> LogitDiff:
    ids = [model.tokenizer(d, add_special_tokens=False)["input_ids"][-1] for d in ("1", "9")]
    return LogitDiff([ids[0]], [ids[1]])


def bare_passes(model, clean, corrupt, metric) -> None:
    """Two forwards and one backward, no attribution: the cost AtP is measured against."""
    with torch.no_grad():
        metric(model(corrupt.tokens), corrupt)
    entry = {}

    def keep(act, hook):
        entry["resid"] = act.detach().requires_grad_(True)
        return entry["resid"]

    with hooked(model, [("blocks.0.hook_resid_pre", keep)]):
        logits = model(clean.tokens)
    torch.autograd.grad(metric(logits, clean).sum(), entry["resid"])


def wall_times(runs: dict, device, repeats: int) -> dict[str, list[float]]:
    """Wall-clock seconds of each run ``repeats`` times, after one warm-up each, the runs alternating."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def memory_growth(model, n_pairs: int, copies: int, device) -> int:
    """Bytes AtP adds at its peak over ``copies`` copies of ``n_pairs`` pairs, microbatches of ``n_pairs``."""
    clean, corrupt = prompt_pairs(model, n_pairs)
    rows = torch.arange(n_pairs).repeat(copies)
    clean, corrupt = clean.select(rows), corrupt.select(rows)
    metric = digit_metric(model)
    if torch.device(device).type == "cuda":
        synchronize(device)
        reset_peak_memory(device)
        before = torch.cuda.memory_allocated(device)
        attribute(model, clean, corrupt, metric, batch_size=n_pairs)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    attribute(model, clean, corrupt, metric, batch_size=n_pairs)
    return (_status_kib("VmHWM") - before) * 1024


def memory_in_subprocesses(n_pairs: int, copies: Sequence[int]) -> list[int]:
    """``memory_growth`` on CPU for each number of copies, each in its own fresh process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    children = [
        subprocess.Popen([sys.executable, __file__, "--memory-child", str(n_pairs), str(c)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for c in copies
    ]
    growths = []
    for child in children:
        out, err = child.communicate()
        if child.returncode:
            raise RuntimeError(f"memory subprocess failed:\n{err[-2000:]}")
        growths.append(int(re.search(r"^GROWTH (\d+)$", out, re.MULTILINE).group(1)))
    return growths


def main() -> None:
    child = argparse.ArgumentParser(add_help=False)
    child.add_argument("--memory-child", nargs=2, type=int)
    known, rest = child.parse_known_args()
    if known.memory_child:
        torch.set_num_threads(1)  # the two children run side by side; threads do not change the peak
        model = load_model(device="cpu")
        print(f"GROWTH {memory_growth(model, *known.memory_child, 'cpu')}")
        return

    args = parse_args(__doc__.splitlines()[0], rest)
    n_pairs, repeats, memory_n = (4, 3, 2) if args.quick else (16, 5, 8)
    model = load_model(device=args.device, dtype=DTYPES[args.dtype])
    cfg = model.cfg
    clean, corrupt = prompt_pairs(model, n_pairs)
    metric = digit_metric(model)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, dtype {cfg.dtype}")
    print(f"model: {cfg.n_layers} layers, {cfg.n_layers * cfg.d_mlp} neurons, {cfg.n_layers * cfg.n_heads} heads; "
          f"batch: {n_pairs} pairs of {clean.tokens.shape[1]} positions "
          f"(lengths {sorted(set(clean.lengths.tolist()))})")

    times = wall_times(
        {
            "bare": lambda: bare_passes(model, clean, corrupt, metric),
            "atp": lambda: attribute(model, clean, corrupt, metric, batch_size=n_pairs),
        },
        args.device,
        repeats,
    )
    bare, atp = statistics.median(times["bare"]), statistics.median(times["atp"])
    print(f"bare 2 forwards + 1 backward: median {bare:.3f} s; AtP (all neurons and heads): median {atp:.3f} s")
    for name, ts in times.items():
        print(f"  {name} repeats: {', '.join(f'{t:.3f}' for t in ts)} s")

    if torch.device(args.device).type == "cuda":
        small, large = (memory_growth(model, memory_n, c, args.device) for c in (1, 10))
    else:
        small, large = memory_in_subprocesses(memory_n, (1, 10))
    print(f"peak memory growth of AtP: {small / 2**20:.1f} MiB over {memory_n} pairs, "
          f"{large / 2**20:.1f} MiB over {10 * memory_n} pairs (microbatches of {memory_n})")
    print(result_line("attribution", atp / bare, SPEED_TARGET))
    print(result_line("attribution_memory", large / small, MEMORY_TARGET))


if __name__ == "__main__":
    main()
