"""The audit at scale: 10,000 prompt rows on SmolLM2, with its time, rate and peak memory.

The rows are a seeded sample of every built-in context's prompts at every detail level (12 contexts,
16,632 prompts). ``circuits.measure.audit.run_audit`` measures them in chunks kept on disk (as a
long audit runs: resumable), then computes the gaps. Printed: the wall time, the rate in prompts per
second, the process's peak resident set (and on CUDA the peak allocated accelerator memory), and:

- ``audit_rows_vs_forward``: the audit's time per prompt over one bare Hugging Face forward's
  (``bench_audit.bare_forward``, timed on a seeded ``--forward-rows`` subset of the same rows: it
  costs the same per prompt). Target: at most 2.5 (issue 15).
- ``audit_rows_memory``: the peak resident set over the whole audit against the peak while its first
  tenth of the rows was measured (the chunks stream to disk, so only the result tables grow).
  Target: at most 1.5. The rows keep the prompts' order (by context), so the first tenth is the first
  contexts: the peak while measuring, printed too, also moves with the contexts' tree sizes.

Run: ``python benchmarks/bench_audit_rows.py [--quick] [--device cuda] [--rows N]`` (``--quick``: 300 rows).
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import warnings

import numpy as np
import torch
from bench_audit import BATCH, bare_forward
from common import DTYPES, parse_args, peak_memory_bytes, reset_peak_memory, result_line, timed

from circuits.inputs.prompts import build_prompts
from circuits.measure.audit import run_audit, saved_progress
from interp import load_model

ROWS, CHUNK = 10_000, 500
RATE_TARGET, MEMORY_TARGET = 2.5, 1.5


def _rss() -> int:
    """The resident set of this process now, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class _Watch(threading.Thread):
    """Samples the resident set every ``every`` seconds: its peak overall, while the audit in ``out``
    had not yet finished ``early`` prompts, and while it was still measuring (``rows`` prompts)."""

    def __init__(self, out: str, early: int, rows: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.out, self.early, self.rows, self.every = out, early, rows, every
        self.peak = self.peak_early = self.peak_measuring = self.saved = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            rss = _rss()
            # the chunks are removed once the tables are written: progress only counts up
            self.saved = max(self.saved, saved_progress(self.out)[0])
            self.peak = max(self.peak, rss)
            if self.saved < self.early:
                self.peak_early = max(self.peak_early, rss)
            if self.saved < self.rows:
                self.peak_measuring = max(self.peak_measuring, rss)


def main() -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--rows", type=int, default=None, help=f"prompt rows (default {ROWS}; --quick 300)")
    extra.add_argument("--forward-rows", type=int, default=1000, help="rows the bare forward is timed on")
    known, rest = extra.parse_known_args()
    args = parse_args(__doc__.splitlines()[0], rest)
    n_rows = known.rows or (300 if args.quick else ROWS)
    chunk = min(CHUNK, max(1, n_rows // 10))
    model = load_model("smollm2-135m-instruct", device=args.device, dtype=DTYPES[args.dtype])
    warnings.simplefilter("ignore")  # coverage warnings of single contexts
    every = build_prompts(model, seed=0)
    if n_rows > len(every):
        raise SystemExit(f"--rows {n_rows}: the built-in contexts hold {len(every)} prompts")
    rng = np.random.default_rng(0)
    ids = every.frame["prompt_id"].to_numpy()[np.sort(rng.choice(len(every), n_rows, replace=False))]
    prompts = every.filter(prompt_id=list(ids))
    texts = prompts.texts
    subset = [texts[i] for i in rng.choice(n_rows, min(known.forward_rows, n_rows), replace=False)]
    print(f"device {args.device}, threads {torch.get_num_threads()}: {n_rows} rows of "
          f"{prompts.frame['context'].nunique()} contexts, chunks of {chunk}; bare forward on {len(subset)}")

    bare_forward(model, subset[:BATCH])  # warm-up
    _, t_forward = timed(lambda: bare_forward(model, subset), args.device)
    per_forward = t_forward / len(subset)
    with tempfile.TemporaryDirectory(prefix="audit-rows-") as out:
        watch = _Watch(out, early=n_rows // 10, rows=n_rows)
        reset_peak_memory(args.device)
        watch.start()
        result, t_audit = timed(lambda: run_audit(model, prompts=prompts, out_dir=out, batch_size=BATCH,
                                                  chunk_size=chunk, progress=True), args.device)
        watch.done.set()
        watch.join()
    peak = peak_memory_bytes(args.device)
    values = result.measurement.values
    covered = values.groupby("context")["grid_mass"].mean()
    print("mean covered mass: " + ", ".join(f"{c} {m:.3f}" for c, m in covered.items()))
    print(f"audit {t_audit:.1f} s for {n_rows} rows ({n_rows / t_audit:.2f} prompts/s; "
          f"{len(result.measurement.distribution):,} answer rows); bare forward {1 / per_forward:.2f} prompts/s")
    print(f"peak resident set {watch.peak / 2**30:.2f} GiB (first tenth of the rows "
          f"{watch.peak_early / 2**30:.2f} GiB, measuring {watch.peak_measuring / 2**30:.2f} GiB)"
          + (f"; peak CUDA memory {peak / 2**30:.2f} GiB" if torch.device(args.device).type == "cuda" else ""))
    print(result_line("audit_rows_vs_forward", t_audit / n_rows / per_forward, RATE_TARGET))
    print(result_line("audit_rows_memory", watch.peak / max(watch.peak_early, 1), MEMORY_TARGET))


if __name__ == "__main__":
    main()
