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
