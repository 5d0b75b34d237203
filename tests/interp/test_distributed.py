import torch

from interp.distributed import Shard, all_gather_rows, all_reduce_sum, current_shard


def test_shards_partition_the_items():
    for n in (0, 1, 7, 10):
        parts = [Shard(r, 3).indices(n) for r in range(3)]
        assert torch.cat(parts).tolist() == list(range(n))


def test_single_process_is_identity():
    assert current_shard() == Shard(0, 1)
    t = torch.ones(3)
    assert all_reduce_sum(t) is t
    assert all_gather_rows(t, 3) is t


DATA_PARALLEL_SCRIPT = """
import sys, torch
from interp.distributed import init_from_env, current_shard
from interp.testing import load_tiny_model
from tests.interp.test_distributed import pairs_and_metric
from interp.attribution import attribute
init_from_env("gloo")
model = load_tiny_model()
clean, corrupt, metric = pairs_and_metric(model)
result = attribute(model, clean, corrupt, metric, batch_size=2, per_prompt=True)
if current_shard().rank == 0:
    result.save(sys.argv[1])
"""


def pairs_and_metric(model):
    """Ten token-aligned pairs of different lengths that differ in one name token, and a logit difference."""
    from interp.batching import pad_ids, pad_token_id
    from interp.metrics import LogitDiff

    generator = torch.Generator().manual_seed(0)
    clean, corrupt = [], []
    for i in range(10):
        ids = torch.randint(100, 40000, (6 + i % 4,), generator=generator).tolist()
        clean.append(ids)
        corrupt.append(ids[:2] + [ids[2] + 1] + ids[3:])
    pad = pad_token_id(model.tokenizer)
    return pad_ids(clean, pad), pad_ids(corrupt, pad), LogitDiff([300, 301], [302])


def test_two_process_gloo_attribution_equals_single_process(tiny_model, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from interp.attribution import AttributionResult, attribute

    root = Path(__file__).parents[2]
    script = tmp_path / "dp.py"
    script.write_text(DATA_PARALLEL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script), str(tmp_path / "out")],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parallel = AttributionResult.load(tmp_path / "out")
    clean, corrupt, metric = pairs_and_metric(tiny_model)
    single = attribute(tiny_model, clean, corrupt, metric, batch_size=3, per_prompt=True)
    for kind in ("neuron", "head"):
        torch.testing.assert_close(parallel.scores[kind], single.scores[kind], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(parallel.per_prompt[kind], single.per_prompt[kind], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parallel.metric_clean, single.metric_clean)
    assert parallel.n_prompts == single.n_prompts == 10


def test_attribution_survives_simulated_out_of_memory(tiny_model, monkeypatch):
    import warnings

    from interp import attribution

    clean, corrupt, metric = pairs_and_metric(tiny_model)
    reference = attribution.attribute(tiny_model, clean, corrupt, metric, batch_size=8)
    real_batch = attribution._atp_batch

    def small_memory(model, a, b, metric, points, n_rows):
        if n_rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_batch(model, a, b, metric, points, n_rows)

    monkeypatch.setattr(attribution, "_atp_batch", small_memory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shrunk = attribution.attribute(tiny_model, clean, corrupt, metric, batch_size=8)
    assert sum("out of memory" in str(w.message) for w in caught) == 1
    for kind in ("neuron", "head"):
        torch.testing.assert_close(shrunk.scores[kind], reference.scores[kind], rtol=1e-4, atol=1e-5)
