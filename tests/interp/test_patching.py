import warnings

import pandas as pd
import pytest
import torch
from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

import interp.stacking
from interp.batching import tokenize
from interp.components import ComponentSet, ComponentShape, Head, Neuron
from interp.hooks import attached_hook_count, hooked
from interp.metrics import CandidateAnswers, ExpectedValue, LogitDiff
from interp.patching import PatchingResult, patch_sweep

TARGETS = ["When Mary and John went to the park, John gave a ball to", "The cat sat on the"]
SOURCES = ["When Mary and John went to the park, Mary gave a ball to", "The dog sat on the"]


@pytest.fixture(scope="module")
def pair(tiny_model):
    target, source = tokenize(tiny_model, TARGETS), tokenize(tiny_model, SOURCES)
    assert torch.equal(target.attention_mask, source.attention_mask)
    assert target.lengths[0] != target.lengths[1]  # padded
    return target, source


def token(model, text: str) -> int:
    (only,) = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return only


@pytest.fixture(scope="module")
def logit_diff(tiny_model):
    return LogitDiff([token(tiny_model, " Mary")], [token(tiny_model, " John")])


class OpaqueMetric:
    """A metric patch_sweep knows nothing about: it must be handed every logit position."""

    def __init__(self, inner):
        self.inner = inner

    def expand(self, batch):
        return self.inner.expand(batch)

    def __call__(self, logits, batch):
        assert logits.shape[1] == batch.tokens.shape[1]
        return self.inner(logits, batch)


def naive_values(model, target, source, metric, variant: ComponentSet) -> torch.Tensor:
    """One full forward with every component of ``variant`` patched in at once."""
    run_target, run_source = metric.expand(target), metric.expand(source)
    saved = {}

    def save(name):
        return name, lambda act, hook: saved.__setitem__(name, act.clone())

    def patch(name, indices):
        def hook(act, hook):
            act = act.clone()
            act[:, :, indices] = saved[name][:, :, indices]
            return act

        return name, hook

    groups = variant.by_hook()
    with torch.no_grad():
        with hooked(model, [save(name) for name in groups]):
            model(run_source.tokens, **run_source.forward_kwargs())
        with hooked(model, [patch(name, idx) for name, idx in groups.items()]):
            return metric(model(run_target.tokens, **run_target.forward_kwargs()), run_target)


def no_hooks_left(model, before: int) -> bool:
    overridden = [m for b in model.blocks for m in (b, b.attn) if "forward" in vars(m)]
    return attached_hook_count(model) == before and not overridden


def test_heads_match_transformer_lens(tiny_model, pair, logit_diff):
    target, source = pair
    ours = patch_sweep(tiny_model, target, source, logit_diff, "heads")
    with torch.no_grad():
        _, clean_cache = tiny_model.run_with_cache(
            source.tokens, names_filter=lambda n: n.endswith("attn.hook_z")
        )
        reference = get_act_patch_attn_head_out_all_pos(
            tiny_model,
            target.tokens,
            clean_cache,
            lambda logits: logit_diff(logits, target),
            reduce="none",
            baseline=True,
        )
    n_layers, n_heads = tiny_model.cfg.n_layers, tiny_model.cfg.n_heads
    assert ours.variants == [ComponentSet([Head(layer, h)]) for layer in range(n_layers) for h in range(n_heads)]
    torch.testing.assert_close(
        ours.values.reshape(n_layers, n_heads, -1), reference.values, atol=1e-4, rtol=0
    )
    torch.testing.assert_close(ours.baseline, reference.baseline, atol=1e-4, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.source_values, logit_diff(tiny_model(source.tokens), source), atol=1e-4, rtol=0
        )
    assert ours.effects.abs().max() > 1e-3  # the patches do something


def test_neuron_sweep_matches_one_at_a_time(tiny_model, pair, logit_diff):
    target, source = pair
    result = patch_sweep(tiny_model, target, source, logit_diff, "neurons")
    shape = ComponentShape.of(tiny_model)
    assert len(result.variants) == shape.count("neuron")
    picked = torch.randperm(len(result.variants), generator=torch.Generator().manual_seed(0))[:12].tolist()
    picked += [0, len(result.variants) - 1]
    for i in picked:
        expected = naive_values(tiny_model, target, source, logit_diff, result.variants[i])
        torch.testing.assert_close(result.values[i], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "row-per-candidate"])
def test_mixed_sets_on_expanded_multi_token_candidates(tiny_model, pair, packed):
    target, source = pair
    texts = [" 10", " 25", " 55", " 90"]  # equal lengths: the random model favours none by length
    candidates = CandidateAnswers.from_texts(tiny_model.tokenizer, texts, [10, 25, 55, 90], packed=packed)
    assert not candidates.single_token
    variants = [
        ComponentSet([Neuron(2, 5), Head(1, 3)]),
        ComponentSet([Head(0, 1), Head(2, 0), Neuron(1, 7), Neuron(1, 90)]),
        Head(2, 2),
    ]
    for metric in (ExpectedValue(candidates), OpaqueMetric(ExpectedValue(candidates))):
        result = patch_sweep(tiny_model, target, source, metric, variants, max_batch_rows=5)
        assert result.values.shape == (3, 2)
        for i, variant in enumerate(result.variants):
            expected = naive_values(tiny_model, target, source, metric, variant)
            torch.testing.assert_close(result.values[i], expected, atol=1e-3, rtol=1e-5)
        assert result.effects.abs().min() > 1e-2
    assert result.to_dataframe().query("variant == 0")["kind"].unique().tolist() == ["mixed"]


def test_positions_read_only_gives_the_same_values(tiny_model, pair, logit_diff):
    target, source = pair
    variants = [Head(1, 0), Neuron(0, 3), ComponentSet([Head(2, 1), Neuron(2, 2)])]
    fast = patch_sweep(tiny_model, target, source, logit_diff, variants)
    full = patch_sweep(tiny_model, target, source, OpaqueMetric(logit_diff), variants)
    torch.testing.assert_close(fast.values, full.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.baseline, full.baseline, atol=1e-5, rtol=0)


LATE_TARGETS = [
    "When Mary and John went to the park, John gave a ball to",
    "Anna met Paul in town and Paul waved to",
]
LATE_SOURCES = [
    "When Mary and John went to the park, Mary gave a ball to",
    "Anna met Paul in town and Anna waved to",
]
LATE_VARIANTS = [Head(0, 2), Head(2, 1), Neuron(1, 50), ComponentSet([Head(1, 0), Neuron(2, 9)])]


def test_shared_prefix_is_run_once_and_exact(tiny_model, logit_diff):
    target, source = tokenize(tiny_model, LATE_TARGETS), tokenize(tiny_model, LATE_SOURCES)
    reader = interp.stacking.LogitReader.for_metric(tiny_model, logit_diff, target)
    shared = interp.stacking.shared_prefix_length(target, source, reader)
    assert shared == int(((target.tokens != source.tokens).int().argmax(-1)).min()) > 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the prefix is used, not abandoned
        result = patch_sweep(tiny_model, target, source, logit_diff, LATE_VARIANTS, max_batch_rows=3)
    for i, variant in enumerate(result.variants):
        expected = naive_values(tiny_model, target, source, logit_diff, variant)
        torch.testing.assert_close(result.values[i], expected, atol=1e-4, rtol=0)
    full_width = patch_sweep(tiny_model, target, source, OpaqueMetric(logit_diff), LATE_VARIANTS)
    torch.testing.assert_close(result.values, full_width.values, atol=1e-4, rtol=0)


def test_unusable_prefix_falls_back_to_every_position(tiny_model, logit_diff, monkeypatch):
    target, source = tokenize(tiny_model, LATE_TARGETS), tokenize(tiny_model, LATE_SOURCES)
    expected = patch_sweep(tiny_model, target, source, logit_diff, LATE_VARIANTS)

    def no_cache(*args, **kwargs):
        raise NotImplementedError("no key/value cache")

    monkeypatch.setattr(interp.stacking.Prefix, "build", no_cache)
    with pytest.warns(RuntimeWarning, match="cannot reuse the shared prompt prefix"):
        result = patch_sweep(tiny_model, target, source, logit_diff, LATE_VARIANTS)
    torch.testing.assert_close(result.values, expected.values, atol=1e-4, rtol=0)


def test_prefix_that_changes_the_result_is_caught(tiny_model, logit_diff, monkeypatch):
    target, source = tokenize(tiny_model, LATE_TARGETS), tokenize(tiny_model, LATE_SOURCES)
    expected = patch_sweep(tiny_model, target, source, logit_diff, LATE_VARIANTS)
    right_rows = interp.stacking.Prefix.kwargs
    monkeypatch.setattr(interp.stacking.Prefix, "kwargs", lambda self, rows: right_rows(self, rows.flip(0)))
    with pytest.warns(RuntimeWarning, match="does not reproduce the unpatched run"):
        result = patch_sweep(tiny_model, target, source, logit_diff, LATE_VARIANTS)
    torch.testing.assert_close(result.values, expected.values, atol=1e-4, rtol=0)


def test_microbatching_gives_the_same_result(tiny_model, pair, logit_diff):
    target, source = pair
    whole = patch_sweep(
        tiny_model, target, source, logit_diff, "heads", max_batch_rows=10_000, memory_budget_bytes=1 << 40
    )
    assert whole.values.shape == (12, 2)
    for kwargs in ({"max_batch_rows": 3}, {"memory_budget_bytes": 1}, {"memory_budget_bytes": 300_000}):
        split = patch_sweep(tiny_model, target, source, logit_diff, "heads", **kwargs)
        torch.testing.assert_close(split.values, whole.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(split.baseline, whole.baseline, atol=1e-5, rtol=0)


@pytest.mark.usefixtures("unchecked")
def test_bad_inputs_are_named(tiny_model, pair, logit_diff):
    target, source = pair
    wider = tokenize(tiny_model, [SOURCES[0] + " and more words", SOURCES[1]])
    with pytest.raises(ValueError, match="same token shape"):
        patch_sweep(tiny_model, target, wider, logit_diff, "heads")
    misaligned = tokenize(tiny_model, [SOURCES[0], "The dog sat on the big"])
    assert misaligned.tokens.shape == target.tokens.shape
    with pytest.raises(ValueError, match="prompt 1 has 6 tokens in target and 7 in source"):
        patch_sweep(tiny_model, target, misaligned, logit_diff, "heads")
    with pytest.raises(IndexError, match=r"variant 1 .*layer 3 is out of range \[0, 3\)"):
        patch_sweep(tiny_model, target, source, logit_diff, [Head(0, 0), Head(3, 0)])
    with pytest.raises(IndexError, match=r"neuron index 96 is out of range \[0, 96\)"):
        patch_sweep(tiny_model, target, source, logit_diff, [Neuron(0, 96)])
    with pytest.raises(ValueError, match="'heads', 'neurons'"):
        patch_sweep(tiny_model, target, source, logit_diff, "head")
    with pytest.raises(ValueError, match="empty ComponentSet"):
        patch_sweep(tiny_model, target, source, logit_diff, [ComponentSet()])
    with pytest.raises(ValueError, match="no variants"):
        patch_sweep(tiny_model, target, source, logit_diff, [])
    with pytest.raises(TypeError, match="TokenBatch"):
        patch_sweep(tiny_model, target.tokens, source, logit_diff, "heads")
    with pytest.raises(ValueError, match="max_batch_rows must be at least 1"):
        patch_sweep(tiny_model, target, source, logit_diff, "heads", max_batch_rows=0)


def test_no_hooks_or_overrides_remain(tiny_model, logit_diff, monkeypatch):
    target, source = tokenize(tiny_model, LATE_TARGETS), tokenize(tiny_model, LATE_SOURCES)
    before = attached_hook_count(tiny_model)
    with torch.no_grad():
        reference = tiny_model(target.tokens)
    patch_sweep(tiny_model, target, source, logit_diff, [Head(2, 0), Neuron(1, 1)])
    assert no_hooks_left(tiny_model, before)

    def failing_writer(*args):
        def write(act, hook):
            assert "forward" in vars(tiny_model.blocks[0]) and "forward" in vars(tiny_model.blocks[2].attn)
            raise RuntimeError("patch failed")

        return write

    monkeypatch.setattr(interp.patching, "_writer", failing_writer)
    with pytest.raises(RuntimeError, match="patch failed"):  # inside a resumed forward after the prefix
        patch_sweep(tiny_model, target, source, logit_diff, [Head(2, 0)])
    assert no_hooks_left(tiny_model, before)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(target.tokens), reference, atol=0, rtol=0)


def test_result_tables_grid_and_round_trip(tiny_model, pair, logit_diff, tmp_path):
    target, source = pair
    result = patch_sweep(
        tiny_model,
        target,
        source,
        logit_diff,
        [Head(0, 1), Head(2, 3), Neuron(1, 4), ComponentSet([Head(1, 1), Head(1, 2)])],
    )
    torch.testing.assert_close(result.effects, result.values - result.baseline)
    frame = result.to_dataframe()
    assert list(frame.columns) == ["variant", "label", "kind", "layer", "index", "prompt", "value", "effect"]
    assert len(frame) == 4 * 2
    row = frame.query("variant == 1 and prompt == 1").iloc[0]
    assert (row["label"], row["kind"], row["layer"], row["index"]) == ("H2.3", "head", 2, 3)
    assert row["value"] == pytest.approx(result.values[1, 1].item())
    pair_row = frame.query("variant == 3").iloc[0]
    assert (pair_row["label"], pair_row["layer"]) == ("H1.1+H1.2", 1) and pd.isna(pair_row["index"])

    grid = result.as_layer_grid("head")
    assert grid.shape == (3, 4)
    assert grid[2, 3] == pytest.approx(result.effects[1].mean().item())
    assert grid.isnan().sum() == 12 - 2  # only the single heads are laid out
    assert result.as_layer_grid("neuron").shape == (3, 96)

    loaded = PatchingResult.load(result.save(tmp_path / "run"))
    assert loaded.variants == result.variants and loaded.shape == result.shape
    for name in ("values", "baseline", "source_values"):
        assert torch.equal(getattr(loaded, name), getattr(result, name))


@pytest.mark.slow
def test_smollm2_heads_match_transformer_lens(smollm2):
    """TL's own head sweep, restricted to three layers' heads (its one forward per head is the slow part)."""
    target = tokenize(smollm2, ["Mary and John met. John thanked", "Anna and Paul left, and Paul waved to"])
    source = tokenize(smollm2, ["Mary and John met. Mary thanked", "Anna and Paul left, and Anna waved to"])
    metric = LogitDiff([token(smollm2, " Mary"), token(smollm2, " Anna")], [token(smollm2, " John")])
    ours = patch_sweep(smollm2, target, source, metric, "heads")
    n_layers, n_heads = smollm2.cfg.n_layers, smollm2.cfg.n_heads
    layers = [0, n_layers // 2, n_layers - 1]
    cells = pd.DataFrame(
        [(layer, head) for layer in layers for head in range(n_heads)], columns=["layer", "head"]
    )
    tl_sweep = get_act_patch_attn_head_out_all_pos
    with torch.no_grad():
        _, clean_cache = smollm2.run_with_cache(
            source.tokens, names_filter=lambda n: n.endswith("attn.hook_z")
        )
        reference = tl_sweep.func(
            smollm2,
            target.tokens,
            clean_cache,
            lambda logits: metric(logits, target),
            **{**tl_sweep.keywords, "index_axis_names": None},
            index_df=cells,
            reduce="none",
            baseline=True,
        )
    ours_cells = ours.values.reshape(n_layers, n_heads, -1)[layers].reshape(len(cells), -1)
    torch.testing.assert_close(ours_cells, reference.values, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.baseline, reference.baseline, atol=1e-4, rtol=0)
    assert ours.effects.abs().max() > 1e-2
