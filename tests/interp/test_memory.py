import pytest
import torch

from interp.memory import backoff_batches, suggest_batch_size


def test_backoff_halves_and_covers_every_item_once():
    seen = []

    def run(sl):
        if sl.stop - sl.start > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        seen.extend(range(sl.start, sl.stop))
        return sl.stop - sl.start

    with pytest.warns(RuntimeWarning, match="out of memory at batch size 16"):
        sizes = list(backoff_batches(21, 16, run))
    assert seen == list(range(21))
    assert max(sizes) <= 3 and sum(sizes) == 21


def test_backoff_reraises_other_errors_and_unfittable_batches():
    def broken(sl):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(backoff_batches(4, 2, broken))

    def never_fits(sl):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.warns(RuntimeWarning), pytest.raises(torch.OutOfMemoryError):
        list(backoff_batches(4, 2, never_fits))


def test_suggest_batch_size_on_cpu_uses_default():
    assert suggest_batch_size(10**6, "cpu", default=7) == 7
