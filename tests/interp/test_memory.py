import warnings

import pytest
import torch

from interp.memory import Backoff, backoff_batches, suggest_batch_size


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


def test_backoff_keeps_the_smaller_size_across_loops_and_says_so_once():
    tried = []

    def run(sl):
        tried.append(sl.stop - sl.start)
        if sl.stop - sl.start > 2:
            raise RuntimeError("CUDA error: out of memory (simulated)")
        return sl

    backoff = Backoff(8, what="sweep batch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = list(backoff.batches(5, run))
        second = list(backoff.batches(3, run))
    assert [str(w.message)[:36] for w in caught] == ["out of memory at sweep batch size 5;"]
    assert backoff.size == 2
    assert tried == [5, 2, 2, 1, 2, 1]  # 5 items fail at 5 (the size is 8), then halve; the next loop starts at 2
    assert [(s.start, s.stop) for s in first] == [(0, 2), (2, 4), (4, 5)]
    assert [(s.start, s.stop) for s in second] == [(0, 2), (2, 3)]
    with pytest.raises(ValueError, match="at least 1"):
        Backoff(0)


def test_suggest_batch_size_on_cpu_uses_default():
    assert suggest_batch_size(10**6, "cpu", default=7) == 7


def test_patch_sweep_survives_simulated_out_of_memory(tiny_model, monkeypatch):
    from interp import patching, stacking
    from tests.interp.test_distributed import pairs_and_metric, patch_variants

    clean, corrupt, metric = pairs_and_metric(tiny_model)
    reference = patching.patch_sweep(tiny_model, clean, corrupt, metric, patch_variants(), max_batch_rows=8)
    real_resume, real_checked_prefix = stacking.resume, stacking.checked_prefix
    checking, sizes = [], []

    def checked_prefix(*args, **kwargs):  # the prefix check's own resume is not a patching batch
        checking.append(True)
        try:
            return real_checked_prefix(*args, **kwargs)
        finally:
            checking.pop()

    def small_memory(model, residual, *args):
        if not checking:
            sizes.append(len(residual))
            if len(residual) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_resume(model, residual, *args)

    monkeypatch.setattr(patching, "checked_prefix", checked_prefix)
    monkeypatch.setattr(stacking, "resume", small_memory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shrunk = patching.patch_sweep(tiny_model, clean, corrupt, metric, patch_variants(), max_batch_rows=8)
    oom = [w for w in caught if "out of memory" in str(w.message)]
    assert len(oom) == 1  # said once, and the smaller size carries over to the later start layers
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) <= 2
    torch.testing.assert_close(shrunk.values, reference.values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shrunk.baseline, reference.baseline)


def test_bfloat16_model_gives_float32_scores_close_to_float32(tiny_model):
    """bfloat16 (for throughput), exercised on CPU: attribution and patching still return float32."""
    from interp.attribution import attribute
    from interp.models import load_model
    from interp.patching import patch_sweep
    from interp.testing import tiny_model_dir
    from tests.interp.test_distributed import pairs_and_metric, patch_variants

    half = load_model(tiny_model_dir(), device="cpu", dtype=torch.bfloat16)
    assert half.cfg.dtype == torch.bfloat16 and next(half.parameters()).dtype == torch.bfloat16
    clean, corrupt, metric = pairs_and_metric(tiny_model)
    runs = {}
    for name, model in (("float32", tiny_model), ("bfloat16", half)):
        runs[name] = (attribute(model, clean, corrupt, metric, batch_size=4, per_prompt=True),
                      patch_sweep(model, clean, corrupt, metric, patch_variants(), max_batch_rows=8))
    (full_atp, full_patch), (half_atp, half_patch) = runs["float32"], runs["bfloat16"]
    for kind in ("neuron", "head"):
        got, want = half_atp.scores[kind], full_atp.scores[kind]
        assert got.dtype == half_atp.per_prompt[kind].dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.1, atol=0.5 * float(want.abs().max()))
        assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.95
    assert half_atp.metric_clean.dtype == torch.float32
    torch.testing.assert_close(half_atp.metric_clean, full_atp.metric_clean, rtol=0.05, atol=0.1)
    for field in ("values", "baseline", "source_values"):
        got, want = getattr(half_patch, field), getattr(full_patch, field)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.2)
