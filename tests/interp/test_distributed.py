import pytest
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
import os, sys, torch
from pathlib import Path
from interp.distributed import init_from_env, current_shard
from interp.models import load_model
from interp.testing import tiny_model_dir
from tests.interp.test_distributed import eval_inputs, pairs_and_metric, patch_variants
from interp.attribution import attribute
from interp.patching import patch_sweep
from circuits.evaluate.evaluation import evaluate, paired_values
backend = sys.argv[2]
init_from_env(backend)
out = Path(sys.argv[1]) / f"rank{current_shard().rank}"  # every rank saves: all must hold the full result
device = f"cuda:{os.environ['LOCAL_RANK']}" if backend == "nccl" else "cpu"
model = load_model(tiny_model_dir(), device=device, dtype=torch.float32)
clean, corrupt, metric = pairs_and_metric(model)
attribute(model, clean, corrupt, metric, batch_size=2, per_prompt=True).save(out / "attribution")
patch_sweep(model, clean, corrupt, metric, patch_variants(), max_batch_rows=3).save(out / "patching")
eval_set, sets, probe = eval_inputs(model)
a, b = paired_values(model, eval_set, batch_size=2)
torch.save({"a": a, "b": b}, out / "paired.pt")
evaluate(model, sets, [eval_set], probe=probe, batch_size=2, progress=False).save(out / "evaluation")
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


def patch_variants():
    """A few head variants over every start layer (one of them a set), so rank blocks split a layer."""
    from interp.components import ComponentSet, Head, Neuron

    return [Head(0, 1), Head(1, 2), Head(1, 3), ComponentSet([Head(2, 0), Neuron(2, 5)]), Head(2, 3)]


def eval_inputs(model):
    """An evaluation set over the ten pairs, two component sets to ablate, and a two-text utility probe."""
    import pandas as pd

    from circuits.evaluate.evaluation import EvalSet, UtilityProbe
    from circuits.inputs.prompts import PairSet
    from interp.components import ComponentSet, Head, Neuron

    clean, corrupt, metric = pairs_and_metric(model)
    pairs = PairSet(pd.DataFrame({"pair": range(len(clean))}), clean, corrupt,
                    torch.zeros(clean.tokens.shape, dtype=torch.bool), pd.DataFrame())
    sets = {"heads": ComponentSet([Head(1, 2), Head(2, 0)]), "neuron": ComponentSet([Neuron(0, 7)])}
    probe = UtilityProbe.build(model, ["The weather was mild today.", "A short neutral sentence."])
    return EvalSet("toy", pairs, metric), sets, probe


def assert_evaluations_close(got, want) -> None:
    """Evaluation frames equal to float tolerance; a ratio over a small gap (and its bootstrap interval)
    amplifies float noise from other batch layouts and attention kernels, so its columns get a looser
    relative tolerance."""
    import pandas as pd

    intervals = [c for c in ("reduction", "reduction_low", "reduction_high", "share_removed", "share_low",
                             "share_high") if c in want.columns]
    pd.testing.assert_frame_equal(got.drop(columns=intervals), want.drop(columns=intervals), rtol=1e-4, atol=1e-5)
    pd.testing.assert_frame_equal(got[intervals], want[intervals], rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="module", params=["gloo", "nccl"])
def two_process_run(request, tmp_path_factory):
    """One 2-process torchrun of attribution, patching and evaluation per backend (launched once: ~15 s):
    gloo on CPU; NCCL on two GPUs (one process per GPU), skipped with fewer. Both are checked against the
    single process on CPU."""
    backend = request.param
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL data parallelism needs two CUDA devices")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[2]
    tmp = tmp_path_factory.mktemp("dp")
    script = tmp / "dp.py"
    script.write_text(DATA_PARALLEL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script), str(tmp / "out"),
                           backend],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tmp / "out" / f"rank{r}" for r in range(2)]


def test_two_process_gloo_attribution_equals_single_process(tiny_model, two_process_run):
    from interp.attribution import AttributionResult, attribute

    clean, corrupt, metric = pairs_and_metric(tiny_model)
    single = attribute(tiny_model, clean, corrupt, metric, batch_size=3, per_prompt=True)
    for out in two_process_run:
        parallel = AttributionResult.load(out / "attribution")
        for kind in ("neuron", "head"):
            torch.testing.assert_close(parallel.scores[kind], single.scores[kind], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(parallel.per_prompt[kind], single.per_prompt[kind], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(parallel.metric_clean, single.metric_clean)
        assert parallel.n_prompts == single.n_prompts == 10


def test_two_process_gloo_patch_sweep_equals_single_process(tiny_model, two_process_run):
    from interp.patching import PatchingResult, patch_sweep

    clean, corrupt, metric = pairs_and_metric(tiny_model)
    single = patch_sweep(tiny_model, clean, corrupt, metric, patch_variants(), max_batch_rows=4)
    for out in two_process_run:
        parallel = PatchingResult.load(out / "patching")
        assert parallel.values.shape == (5, 10) and parallel.variants == single.variants
        torch.testing.assert_close(parallel.values.float(), single.values, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(parallel.baseline.float(), single.baseline, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(parallel.source_values.float(), single.source_values, rtol=1e-4, atol=1e-5)
    assert (single.effects.abs() > 1e-3).any()  # the variants do move the metric


def test_two_process_gloo_evaluation_equals_single_process(tiny_model, two_process_run):

    from circuits.evaluate.evaluation import Evaluation, evaluate, paired_values

    eval_set, sets, probe = eval_inputs(tiny_model)
    a, b = paired_values(tiny_model, eval_set, batch_size=3)
    frame = evaluate(tiny_model, sets, [eval_set], probe=probe, batch_size=3, progress=False).frame
    for out in two_process_run:
        paired = torch.load(out / "paired.pt", map_location="cpu")
        assert paired["a"].shape == paired["b"].shape == (10,)
        torch.testing.assert_close(paired["a"], a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(paired["b"], b, rtol=1e-4, atol=1e-5)
        parallel = Evaluation.load(out / "evaluation").frame
        assert parallel["set"].tolist() == ["none", "heads", "neuron"] and (parallel["n_prompts"] == 20).all()
        assert_evaluations_close(parallel, frame)


def test_local_items_partition_the_sweep_in_order():
    from interp.distributed import Shard
    from interp.patching import _local_items

    by_layer = {0: [(0, p) for p in range(3)], 2: [(v, p) for v in (1, 2) for p in range(3)]}
    flat = [(layer, item) for layer, items in by_layer.items() for item in items]
    for world in (1, 2, 4, 12):
        parts = [_local_items(by_layer, Shard(r, world)) for r in range(world)]
        joined = [(layer, item) for part in parts for layer, items in part.items() for item in items]
        assert joined == flat
        assert max(sum(map(len, p.values())) for p in parts) - min(sum(map(len, p.values())) for p in parts) <= 1


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


def test_a_microbatch_that_runs_out_of_memory_part_way_is_counted_once(tiny_model, monkeypatch):
    """Out of memory at the head points, after the neuron points' sums: the retried microbatch adds nothing twice."""
    import warnings

    from interp import attribution

    batch, _, metric = pairs_and_metric(tiny_model)
    reference = attribution.ablation_attribution(tiny_model, batch, metric, batch_size=8, per_prompt=True)
    real_contribution = attribution._contribution

    def small_memory(delta, grad, kind):
        if kind == "head" and delta.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_contribution(delta, grad, kind)

    monkeypatch.setattr(attribution, "_contribution", small_memory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shrunk = attribution.ablation_attribution(tiny_model, batch, metric, batch_size=8, per_prompt=True)
    assert sum("out of memory" in str(w.message) for w in caught) == 1
    for kind in ("neuron", "head"):
        torch.testing.assert_close(shrunk.scores[kind], reference.scores[kind], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(shrunk.per_prompt[kind], reference.per_prompt[kind], rtol=1e-4, atol=1e-6)
