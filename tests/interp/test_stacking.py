import torch

from interp.batching import tokenize
from interp.metrics import LogitDiff
from interp.stacking import LogitReader, expanded_rows, start_residuals


class _AnyPosition:
    """A metric that says nothing about where it reads logits."""

    def expand(self, batch):
        return batch

    def __call__(self, logits, batch):
        return logits[:, -1, 0]


def test_the_reader_keeps_only_the_positions_a_metric_says_it_reads(tiny_model):
    batch = tokenize(tiny_model, ["a short prompt", "another, longer prompt here"])
    reader = LogitReader.for_metric(tiny_model, LogitDiff([1], [2]), batch)
    assert torch.equal(reader.keep, batch.answer_pos.unique())
    assert torch.equal(reader.renumber(batch).answer_pos, torch.searchsorted(reader.keep, batch.answer_pos))
    assert LogitReader.for_metric(tiny_model, _AnyPosition(), batch).keep is None


def test_start_residuals_are_the_unchanged_run(tiny_model):
    batch = tokenize(tiny_model, ["a short prompt", "another, longer prompt here", "a third"])
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(batch.tokens, **batch.forward_kwargs())
        residuals, values = start_residuals(tiny_model, batch, [0, 2], rows_per_prompt=1, rows=2)
    assert values is None and sorted(residuals) == [0, 2]
    for layer in (0, 2):
        torch.testing.assert_close(residuals[layer], cache[f"blocks.{layer}.hook_resid_pre"])
    assert expanded_rows(slice(1, 3), 2, "cpu").tolist() == [2, 3, 4, 5]
