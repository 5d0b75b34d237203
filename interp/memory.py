"""Memory-aware microbatching: batch sizes from free memory, halving and retrying on out-of-memory."""
from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Free accelerator memory in bytes, or None where it cannot be known (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def row_bytes(cfg, width: int, logit_positions: int) -> int:
    """A forward's peak bytes per row of ``width`` positions reading ``logit_positions`` logits (``cfg``:
    the model's): the logits and a float32 copy, a few residual- and MLP-wide activations, the attention
    scores, in float32."""
    floats = 2 * logit_positions * cfg.d_vocab + width * (8 * cfg.d_model + 4 * cfg.d_mlp + 2 * cfg.n_heads * width)
    return 4 * floats


def suggest_batch_size(bytes_per_row: int, device: torch.device | str, *, default: int = 16,
                       fraction: float = 0.6, ceiling: int = 1024) -> int:
    """Rows that fit in ``fraction`` of free accelerator memory; ``default`` on CPU."""
    free = free_memory_bytes(device)
    if free is None:
        return default
    return max(1, min(ceiling, int(free * fraction) // max(1, bytes_per_row)))


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class Backoff:
    """A microbatch size that halves on out-of-memory and stays halved across calls, said once.

    One object serves several loops over the same kind of batch (a sweep's groups of items), so a
    size found too large in one loop is not tried again in the next, and the shrinking is reported
    once in all.
    """

    def __init__(self, batch_size: int, *, what: str = "batch"):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.size, self.what, self.warned = batch_size, what, False

    def batches(self, n: int, run: Callable[[slice], T]) -> Iterator[T]:
        """Run ``run`` over consecutive slices of ``range(n)``; on out-of-memory halve the size and retry.

        The slice that failed is retried whole at the smaller size, so every item runs exactly once
        and results come back in order. A batch of one that still does not fit re-raises the error.
        """
        start = 0
        while start < n:
            stop = min(start + self.size, n)
            try:
                result = run(slice(start, stop))
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not _is_oom(err) or stop - start == 1:
                    raise
            else:
                yield result
                start = stop
                continue
            # out of the handler: its traceback no longer holds the failed batch's tensors
            self.size = max(1, (stop - start) // 2)
            if torch.cuda.is_available():
                gc.collect()
                torch.cuda.empty_cache()
            if not self.warned:
                warnings.warn(f"out of memory at {self.what} size {stop - start}; retrying with smaller "
                              f"{self.what}es (now {self.size})", RuntimeWarning, stacklevel=2)
                self.warned = True


def backoff_batches(n: int, batch_size: int, run: Callable[[slice], T], *, what: str = "batch") -> Iterator[T]:
    """Run ``run`` over consecutive slices of ``range(n)``; on out-of-memory halve the size and retry.

    The slice that failed is retried whole at the smaller size, so every item runs exactly once
    and results come back in order. Shrinking is reported once per call; a batch of one that
    still does not fit re-raises the error. ``Backoff`` keeps the smaller size across several loops.
    """
    return Backoff(batch_size, what=what).batches(n, run)
