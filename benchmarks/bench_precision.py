"""The default study's metric in float32 and in bfloat16 on the same prompts: is bfloat16 fit for findings?

Not a speed benchmark: it measures what rounding does to the quantities a study reports. For each of
the default study's contexts (yes/no decisions), the per-prompt metric of 96 prompts (48 with
``--quick``) of SmolLM2-135M-Instruct is computed in float32 and in bfloat16, each in batches of 16 and
one prompt at a time (bfloat16 rounds differently in differently padded batches; float32's two layouts
are the control), then the gender and race gaps (difference of group means) and each prompt's name
effect (its deviation from its template's mean).
``RESULT bfloat16_gap_shift ratio=<largest |gap in bfloat16 - gap in float32| / |gap in float32|> target=0.1``:
above the target, bfloat16 moves a gap by more than a tenth of itself, and findings should be computed
in float32 (``load_model``'s default on every device).

Run: ``python benchmarks/bench_precision.py [--quick] [--device cuda]`` (--quick: 48 prompts per context;
``--dtype`` is accepted and ignored: both dtypes are measured).
"""
from __future__ import annotations

import numpy as np
import torch
from common import parse_args, result_line

from circuits.inputs.prompts import build_prompts
from circuits.measure.bias import context_metric
from interp import load_model
from interp.batching import tokenize
from interp.metrics import run_metric

CONTEXTS = ("lending_approval", "hiring_interview")
TARGET = 0.1
# (dtype, batch size): the reference first, then float32 one prompt at a time (the control: padding alone)
LAYOUTS = (("float32", 16), ("float32", 1), ("bfloat16", 16), ("bfloat16", 1))


def metric_values(model, context: str, texts: list[str], batch_size: int) -> np.ndarray:
    metric = context_metric(model, context)
    with torch.no_grad():
        parts = [run_metric(model, metric, tokenize(model, texts[s:s + batch_size])).float().cpu()
                 for s in range(0, len(texts), batch_size)]
    return torch.cat(parts).numpy()


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    n_prompts = 48 if args.quick else 96
    frames, values = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = load_model("smollm2-135m-instruct", device=args.device, dtype=getattr(torch, dtype))
        for context in CONTEXTS:
            frame = build_prompts(model, [context], details=["low"], seed=0).frame.iloc[:n_prompts]
            frames[context] = frame
            for layout in (lay for lay in LAYOUTS if lay[0] == dtype):
                values[context, layout] = metric_values(model, context, list(frame["prompt_text"]), layout[1])
        del model
    print(f"SmolLM2-135M-Instruct on {args.device}, {n_prompts} prompts per context")
    shifts = []
    for context in CONTEXTS:
        frame = frames[context].copy()
        names = [f"{dtype} batch {size}" for dtype, size in LAYOUTS]
        for name, layout in zip(names, LAYOUTS):
            frame[name] = values[context, layout]
        ref, others = names[0], names[1:]
        rounded = [name for name in others if name.startswith("bfloat16")]
        print(f"{context}: metric mean {frame[ref].mean():.3f}, SD over prompts {frame[ref].std():.4f}")
        for name in others:
            diff = (frame[name] - frame[ref]).abs()
            print(f"  {name}: |difference from float32| mean {diff.mean():.1e}, max {diff.max():.1e}")
        for column in ("gender", "group"):
            means = frame.groupby(column)[names].mean()
            gaps = means.iloc[0] - means.iloc[-1]
            print(f"  {column} gap ({means.index[0]} - {means.index[-1]}): "
                  + ", ".join(f"{name} {gaps[name]:+.4f}" for name in names))
            shifts += [abs(gaps[name] - gaps[ref]) / abs(gaps[ref]) for name in rounded]
        effects = frame[names] - frame.groupby("variation")[names].transform("mean")
        print(f"  name effects (deviation from the template's mean): SD {effects[ref].std():.4f} in float32; "
              f"correlation with {rounded[0]} {np.corrcoef(effects[ref], effects[rounded[0]])[0, 1]:.3f}")
    print(result_line("bfloat16_gap_shift", max(shifts), TARGET))


if __name__ == "__main__":
    main()
