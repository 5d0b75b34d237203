"""The default study's metric in float32 and in reduced precisions on the same prompts: which are fit for findings?

Not a speed benchmark: it measures what rounding does to the quantities a study reports. For each of
the default study's contexts (yes/no decisions), the per-prompt metric of 96 prompts (48 with
``--quick``) of SmolLM2-135M-Instruct is computed in

- float32 in batches of 16 (the reference) and one prompt at a time (the control: padding alone);
- bfloat16 weights and activations, in both layouts (bfloat16 rounds differently in differently
  padded batches);
- float32 with TensorFloat32 matmuls (``interp.models.matmul_precision("high")``: inputs rounded to 10
  mantissa bits, float32 accumulation) and with bfloat16 matmuls (inputs rounded to 7 bits, float32
  accumulation: the issue's "bfloat16 with float32 accumulation").

On CUDA, TensorFloat32 is torch's own. The rest is emulated (at ``"highest"``, so nothing rounds twice):
every ``torch.nn.functional.linear`` (every projection, MLP and the unembedding; not the attention scores)
rounds its input and weight to that many mantissa bits first, truncating for TensorFloat32 (the tensor
cores' conversion, the larger error) and to nearest for bfloat16. A CPU computes float32 matmuls at
``"high"`` in float32; torch's ``"medium"`` is TensorFloat32 on CUDA and bfloat16 through oneDNN on a
CPU with bfloat16 units, so no setting of torch's gives bfloat16 matmuls on both.
Then the gender and race gaps (difference of group means) and each prompt's name effect (its deviation
from its template's mean).
``RESULT <precision>_gap_shift ratio=<largest |gap - gap in float32| / |gap in float32|> target=0.1``:
above the target, a precision moves a gap by more than a tenth of itself, and findings should not be
computed in it (float32 at ``"highest"`` is ``load_model``'s and the study's default on every device).

Run: ``python benchmarks/bench_precision.py [--quick] [--device cuda]`` (--quick: 48 prompts per context;
``--dtype`` is accepted and ignored: every precision is measured).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from common import parse_args, result_line

from circuits.inputs.prompts import build_prompts
from circuits.measure.bias import context_metric
from interp import load_model
from interp.batching import tokenize
from interp.metrics import run_metric
from interp.models import matmul_precision

CONTEXTS = ("lending_approval", "hiring_interview")
TARGET = 0.1


@dataclass(frozen=True)
class Layout:
    name: str
    dtype: str
    batch_size: int
    matmul: str = "highest"
    family: str = ""  # the RESULT line it enters; "" for the reference and the control


# the reference first, then float32 one prompt at a time (the control: padding alone)
LAYOUTS = (Layout("float32 batch 16", "float32", 16), Layout("float32 batch 1", "float32", 1),
           Layout("bfloat16 batch 16", "bfloat16", 16, family="bfloat16"),
           Layout("bfloat16 batch 1", "bfloat16", 1, family="bfloat16"),
           Layout("tf32 matmuls", "float32", 16, "tf32", family="tf32"),
           Layout("bf16 matmuls", "float32", 16, "bf16", family="bf16_matmul"))
# mantissa bits kept and whether the conversion truncates, per emulated matmul precision
EMULATED = {"tf32": (10, True), "bf16": (7, False)}


def _rounded(x: torch.Tensor, bits: int, truncate: bool) -> torch.Tensor:
    """float32 ``x`` with only ``bits`` of its 23 stored mantissa bits: truncated, or rounded to nearest."""
    drop = 23 - bits
    raw = x.contiguous().view(torch.int32)
    if not truncate:
        raw = raw + (1 << (drop - 1))
    return (raw & ~((1 << drop) - 1)).view(torch.float32)


@contextlib.contextmanager
def _emulated(precision: str):
    """Every ``F.linear`` with its float32 input and weight rounded as ``precision`` rounds them, then
    multiplied at ``"highest"``."""
    bits, truncate = EMULATED[precision]
    linear = F.linear

    def rounded_linear(x, weight, bias=None):
        return linear(_rounded(x, bits, truncate), _rounded(weight, bits, truncate), bias)

    F.linear = rounded_linear
    try:
        with matmul_precision("highest"):
            yield
    finally:
        F.linear = linear


def precision(device: str, name: str):
    """Float32 matmuls at ``name`` (a ``Layout.matmul``): TensorFloat32 is torch's own on CUDA; the
    rest is emulated (see the module docstring)."""
    if name == "highest":
        return matmul_precision("highest")
    if name == "tf32" and device.startswith("cuda"):
        return matmul_precision("high")
    return _emulated(name)


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
            for layout in (lay for lay in LAYOUTS if lay.dtype == dtype):
                with precision(args.device, layout.matmul):
                    values[context, layout] = metric_values(model, context, list(frame["prompt_text"]),
                                                            layout.batch_size)
        del model
    emulated = " (bf16 matmuls emulated)" if args.device.startswith("cuda") else " (matmul precisions emulated)"
    print(f"SmolLM2-135M-Instruct on {args.device}{emulated}, {n_prompts} prompts per context")
    shifts: dict[str, list[float]] = {}
    ref, others = LAYOUTS[0], LAYOUTS[1:]
    names = [layout.name for layout in LAYOUTS]
    for context in CONTEXTS:
        frame = frames[context].copy()
        for layout in LAYOUTS:
            frame[layout.name] = values[context, layout]
        print(f"{context}: metric mean {frame[ref.name].mean():.3f}, SD over prompts {frame[ref.name].std():.4f}")
        for layout in others:
            diff = (frame[layout.name] - frame[ref.name]).abs()
            print(f"  {layout.name}: |difference from float32| mean {diff.mean():.1e}, max {diff.max():.1e}")
        for column in ("gender", "group"):
            means = frame.groupby(column)[names].mean()
            gaps = means.iloc[0] - means.iloc[-1]
            print(f"  {column} gap ({means.index[0]} - {means.index[-1]}): "
                  + ", ".join(f"{name} {gaps[name]:+.4f}" for name in names))
            for layout in others:
                if layout.family:
                    shifts.setdefault(layout.family, []).append(
                        abs(gaps[layout.name] - gaps[ref.name]) / abs(gaps[ref.name]))
        effects = frame[names] - frame.groupby("variation")[names].transform("mean")
        print(f"  name effects (deviation from the template's mean): SD {effects[ref.name].std():.4f} in float32; "
              "correlation with it: " + ", ".join(
                  f"{layout.name} {np.corrcoef(effects[ref.name], effects[layout.name])[0, 1]:.3f}"
                  for layout in others if layout.family))
    for family, family_shifts in shifts.items():
        print(result_line(f"{family}_gap_shift", max(family_shifts), TARGET))


if __name__ == "__main__":
    main()
