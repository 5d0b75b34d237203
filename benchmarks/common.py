"""Shared benchmark helpers: command-line flags, wall-clock timing, peak memory, the RESULT line."""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from interp.models import MATMUL_PRECISIONS

T = TypeVar("T")


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dtype``, read back as ``DTYPES[args.dtype]`` (None: the benchmark's default, ``load_model``'s
    float32 unless it says otherwise), and ``--matmul-precision`` (``apply_matmul_precision``)."""
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto",
                        help="model dtype (default auto: float32, or the benchmark's own choice)")
    parser.add_argument("--matmul-precision", choices=list(MATMUL_PRECISIONS), default="highest",
                        help="float32 matmuls on CUDA: highest (float32, the default), high (TensorFloat32)")


def apply_matmul_precision(args: argparse.Namespace) -> None:
    """Run this process's float32 matmuls at ``args.matmul_precision`` (a CPU computes every one in float32)."""
    torch.set_float32_matmul_precision(args.matmul_precision)


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``--quick`` (a small run: under a minute on 2 CPU cores), ``--device`` (default: cpu),
    ``--dtype`` and ``--matmul-precision`` (``add_precision_arguments``) and ``--threads`` (torch CPU
    threads; default: torch's own choice). The threads and the matmul precision are applied here."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small inputs, for a run under a minute")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    add_precision_arguments(parser)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA device is available")
    apply_matmul_precision(args)
    return args


def check_same(what: str, difference: float, tolerance: float, dtype: torch.dtype) -> None:
    """Exit with an error when two exact paths differ by more than ``tolerance``, in float32 with float32
    matmuls. In bfloat16 or float16, or with reduced-precision matmuls, only say by how much: their rounding
    differs between batch layouts (``bench_precision.py``), so exactness is checked in float32 only. Call it
    after the RESULT line."""
    matmuls = torch.get_float32_matmul_precision()
    if dtype != torch.float32 or matmuls != "highest":
        print(f"{what}: difference {difference:.1e} in {dtype}, {matmuls} matmuls; exactness is checked in "
              "float32 only")
    elif difference > tolerance:
        raise SystemExit(f"{what} differ by {difference:.1e} (tolerance {tolerance:g})")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | str = "cpu", *, repeats: int = 1) -> tuple[T, float]:
    """``fn()``'s result and its best wall-clock time in seconds over ``repeats`` calls."""
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return result, best


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a fresh peak-memory count (CUDA only; the CPU figure is the process's lifetime peak)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak allocated CUDA memory since the last reset, or the process's peak resident set on CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def result_line(name: str, ratio: float, target: float) -> str:
    """The final line every benchmark prints: ``RESULT <name> ratio=<ratio> target=<target>``."""
    return f"RESULT {name} ratio={ratio:.2f} target={target:g}"
