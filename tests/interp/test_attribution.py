import dataclasses
import math

import pytest
import torch

from interp.attribution import AttributionCheck, AttributionResult, atp_check, attribute
from interp.batching import tokenize
from interp.components import ComponentSet, hook_name
from interp.hooks import attached_hook_count, hooked
from interp.metrics import CandidateAnswers, ExpectedValue, LogitDiff, TokenSetProb, run_metric

# Token-aligned pairs of different lengths, so every batch of more than one pair holds padding.
PAIRS = [
    ("Alice went to the market and bought", "John went to the market and bought"),
    ("Bob likes", "Dan likes"),
    ("The cat sat on", "The dog sat on"),
    ("My offer for the used bicycle is", "My offer for the used car is"),
]
KIND_HOOKS = ("neuron", "head")


@pytest.fixture(scope="module")
def pairs(tiny_model):
    clean = tokenize(tiny_model, [a for a, _ in PAIRS])
    corrupt = tokenize(tiny_model, [b for _, b in PAIRS])
    assert torch.equal(clean.lengths, corrupt.lengths) and len(set(clean.lengths.tolist())) > 1
    return clean, corrupt


@pytest.fixture(scope="module")
def logit_diff(tiny_model):
    ids = tiny_model.tokenizer(" yes no", add_special_tokens=False)["input_ids"]
    return LogitDiff([ids[0]], [ids[1]])


@pytest.fixture(scope="module")
def expected_value(tiny_model):
    grid = CandidateAnswers.from_texts(tiny_model.tokenizer, [" 5", " 50", " 1,000"], [5.0, 50.0, 1000.0])
    assert not grid.single_token
    return ExpectedValue(grid)


def _hand_atp(model, clean, corrupt, metric):
    """Per prompt on its own (no padding between prompts): sum over positions of (A - B) * dM/dA."""
    n_layers = model.cfg.n_layers
    names = [hook_name(k, layer) for k in KIND_HOOKS for layer in range(n_layers)]
    per_prompt = {k: [] for k in KIND_HOOKS}
    if isinstance(metric, ExpectedValue):  # a row per candidate: AtP is linear, so packing must not matter
        metric = ExpectedValue(dataclasses.replace(metric.candidates, packed=False))
    for i in range(len(clean)):
        a, b = metric.expand(clean.select([i])), metric.expand(corrupt.select([i]))
        with torch.no_grad():
            _, cache_b = model.run_with_cache(b.tokens, names_filter=names)
        acts = {}

        def keep(act, hook, name, store=acts):
            store[name] = act
            return act

        with hooked(model, [(n, lambda act, hook, n=n: keep(act, hook, n)) for n in names]):
            value = metric(model(a.tokens), a).sum()
        grads = dict(zip(names, torch.autograd.grad(value, [acts[n] for n in names])))
        mask = a.attention_mask.float()
        for kind in KIND_HOOKS:
            layers = []
            for layer in range(n_layers):
                n = hook_name(kind, layer)
                product = (acts[n].detach() - cache_b[n]) * grads[n]
                if kind == "neuron":
                    layers.append(torch.einsum("rpi,rp->i", product, mask))
                else:
                    layers.append(torch.einsum("rphd,rp->h", product, mask))
            per_prompt[kind].append(torch.stack(layers))
    return {k: torch.stack(v) for k, v in per_prompt.items()}


@pytest.mark.parametrize("metric_name", ["logit_diff", "expected_value"])
def test_atp_matches_hand_computation(tiny_model, pairs, metric_name, request):
    metric = request.getfixturevalue(metric_name)
    clean, corrupt = pairs
    result = attribute(tiny_model, clean, corrupt, metric, batch_size=3, per_prompt=True)
    hand = _hand_atp(tiny_model, clean, corrupt, metric)
    for kind in KIND_HOOKS:
        torch.testing.assert_close(result.per_prompt[kind], hand[kind], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(result.scores[kind], hand[kind].mean(0), atol=2e-5, rtol=1e-4)
    for got, batch in ((result.metric_clean, clean), (result.metric_corrupt, corrupt)):
        torch.testing.assert_close(got, run_metric(tiny_model, metric, batch).detach(), atol=1e-4, rtol=1e-5)


def _exact_patch(model, clean, corrupt, metric, name, index=None):
    """Mean over prompts of metric(A) - metric(A with hook ``name`` (unit ``index`` or all) from B)."""
    with torch.no_grad():
        _, cache_b = model.run_with_cache(corrupt.tokens, names_filter=[name])
        base = metric(model(clean.tokens), clean)

        def patch(act, hook):
            if index is None:
                return cache_b[name]
            act = act.clone()
            act[..., index] = cache_b[name][..., index]
            return act

        with hooked(model, [(name, patch)]):
            return (base - metric(model(clean.tokens), clean)).mean().item()


def _exact_neuron_patches(model, clean, corrupt, metric, layer):
    """Mean effect of patching each neuron of ``layer`` alone: every neuron's run is a block of rows of one forward."""
    name, n_units, n_prompts = hook_name("neuron", layer), model.cfg.d_mlp, len(clean)
    stacked = clean.select(torch.arange(n_prompts).repeat(n_units))  # rows "(unit prompt)"
    units = torch.arange(n_units).repeat_interleave(n_prompts)
    rows = torch.arange(n_units * n_prompts)
    with torch.no_grad():
        _, cache_b = model.run_with_cache(corrupt.tokens, names_filter=[name])
        source = cache_b[name].repeat(n_units, 1, 1)
        base = metric(model(clean.tokens), clean)

        def patch(act, hook):
            act = act.clone()
            act[rows, :, units] = source[rows, :, units]
            return act

        with hooked(model, [(name, patch)]):
            values = metric(model(stacked.tokens), stacked)
    return (base.repeat(n_units) - values).reshape(n_units, n_prompts).mean(-1)


def test_atp_matches_exact_patching_for_last_layer_neurons(tiny_model, pairs, logit_diff):
    clean, corrupt = pairs
    last = tiny_model.cfg.n_layers - 1
    result = attribute(tiny_model, clean, corrupt, logit_diff, kinds=["neuron"])
    exact = _exact_neuron_patches(tiny_model, clean, corrupt, logit_diff, last)
    assert exact.abs().max() > 0.05
    atp = result.scores["neuron"][last]
    assert torch.corrcoef(torch.stack([atp, exact]))[0, 1] > 0.98
    assert (atp - exact).abs().max() < 0.15 * exact.abs().max()


def test_ig_layer_sums_approach_exact_layer_patching(tiny_model, pairs):
    clean, corrupt = pairs
    metric = TokenSetProb([100, 300], log=True)
    atp = attribute(tiny_model, clean, corrupt, metric)
    ig = attribute(tiny_model, clean, corrupt, metric, method="ig", ig_steps=16, batch_size=64)  # 16 steps a pass
    assert ig.method == "ig" and ig.ig_steps == 16
    ig_error = atp_error = 0.0
    for kind in KIND_HOOKS:
        for layer in range(tiny_model.cfg.n_layers):
            exact = _exact_patch(tiny_model, clean, corrupt, metric, hook_name(kind, layer))
            ig_sum, atp_sum = ig.scores[kind][layer].sum().item(), atp.scores[kind][layer].sum().item()
            assert abs(ig_sum - exact) <= 0.01 + 0.02 * abs(exact), (kind, layer, ig_sum, exact)
            ig_error += abs(ig_sum - exact)
            atp_error += abs(atp_sum - exact)
    assert ig_error < 0.2 * atp_error
    torch.testing.assert_close(ig.metric_clean, atp.metric_clean)


# ig with batch_size 8 on 4 pairs stacks 2 interpolation steps per forward; batch_size 2 stacks none.
@pytest.mark.parametrize("method, small, large, kinds", [("atp", 1, 4, KIND_HOOKS), ("ig", 2, 8, ("head",))])
def test_batching_invariance_and_per_prompt_mean(tiny_model, pairs, expected_value, method, small, large, kinds):
    clean, corrupt = pairs
    kwargs = {"method": method, "ig_steps": 2, "per_prompt": True, "kinds": kinds}
    few = attribute(tiny_model, clean, corrupt, expected_value, batch_size=small, **kwargs)
    many = attribute(tiny_model, clean, corrupt, expected_value, batch_size=large, **kwargs)
    for kind in kinds:
        torch.testing.assert_close(few.scores[kind], many.scores[kind], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(many.per_prompt[kind].mean(0), many.scores[kind], atol=1e-6, rtol=1e-5)
        assert many.scores[kind].dtype == torch.float32
    torch.testing.assert_close(few.metric_clean, many.metric_clean, atol=1e-4, rtol=1e-5)


def test_deterministic(tiny_model, pairs, logit_diff):
    clean, corrupt = pairs
    first = attribute(tiny_model, clean, corrupt, logit_diff, batch_size=2)
    second = attribute(tiny_model, clean, corrupt, logit_diff, batch_size=2)
    for kind in KIND_HOOKS:
        assert torch.equal(first.scores[kind], second.scores[kind])
    assert first.per_prompt is None


def test_frozen_weights_still_give_gradients(tiny_model, pairs, logit_diff):
    clean, corrupt = pairs
    reference = attribute(tiny_model, clean, corrupt, logit_diff, kinds="head")
    params = list(tiny_model.parameters())
    try:
        for p in params:
            p.requires_grad_(False)
        frozen = attribute(tiny_model, clean, corrupt, logit_diff, kinds="head")
    finally:
        for p in params:
            p.requires_grad_(True)
    torch.testing.assert_close(frozen.scores["head"], reference.scores["head"])
    assert list(frozen.scores) == ["head"]


class _FailingMetric:
    def expand(self, batch):
        return batch

    def __call__(self, logits, batch):
        raise RuntimeError("metric failed")


def _boom(*args, **kwargs):
    raise RuntimeError("block failed")


@pytest.mark.parametrize("method", ["atp", "ig"])
def test_no_hooks_remain_after_an_exception(tiny_model, pairs, logit_diff, method, monkeypatch):
    clean, corrupt = pairs
    before = attached_hook_count(tiny_model)
    with pytest.raises(RuntimeError, match="metric failed"):
        attribute(tiny_model, clean, corrupt, _FailingMetric(), method=method, ig_steps=1)
    assert attached_hook_count(tiny_model) == before
    with monkeypatch.context() as patch:
        patch.setitem(vars(tiny_model.blocks[1]), "forward", _boom)  # fails inside the hooked forward
        with pytest.raises(RuntimeError, match="block failed"):
            attribute(tiny_model, clean, corrupt, logit_diff, method=method, ig_steps=1)
    assert attached_hook_count(tiny_model) == before
    assert math.isfinite(attribute(tiny_model, clean, corrupt, logit_diff).scores["head"].sum().item())


@pytest.mark.usefixtures("unchecked")
def test_clear_errors(tiny_model, pairs, logit_diff):
    clean, corrupt = pairs
    misaligned = tokenize(tiny_model, [PAIRS[0][1], "Dan likes it", PAIRS[2][1], PAIRS[3][1]])
    with pytest.raises(ValueError, match=r"token-aligned.*pairs \[1\]"):
        attribute(tiny_model, clean, misaligned, logit_diff)
    with pytest.raises(ValueError, match="3 corrupt"):
        attribute(tiny_model, clean, corrupt.select([0, 1, 2]), logit_diff)
    with pytest.raises(ValueError, match="kinds must be"):
        attribute(tiny_model, clean, corrupt, logit_diff, kinds=["neuron", "mlp"])
    with pytest.raises(ValueError, match="method must be"):
        attribute(tiny_model, clean, corrupt, logit_diff, method="saliency")
    with pytest.raises(ValueError, match="ig_steps"):
        attribute(tiny_model, clean, corrupt, logit_diff, method="ig", ig_steps=0)
    with pytest.raises(TypeError, match="interp.metrics.Metric"):
        attribute(tiny_model, clean, corrupt, lambda logits, batch: logits)
    with pytest.raises(TypeError, match="TokenBatch"):
        attribute(tiny_model, clean.tokens, corrupt, logit_diff)
    with pytest.raises(ValueError, match="batch size"):
        attribute(tiny_model, clean, corrupt, logit_diff, batch_size=0)


def test_result_table_top_and_round_trip(tiny_model, pairs, logit_diff, tmp_path):
    clean, corrupt = pairs
    result = attribute(tiny_model, clean, corrupt, logit_diff, per_prompt=True)
    frame = result.to_dataframe()
    cfg = tiny_model.cfg
    assert list(frame.columns) == ["kind", "layer", "index", "score"]
    assert len(frame) == cfg.n_layers * (cfg.d_mlp + cfg.n_heads)
    head_rows = frame[frame["kind"] == "head"]
    assert head_rows.set_index(["layer", "index"])["score"][(2, 1)] == pytest.approx(result.scores["head"][2, 1].item())
    assert len(result.to_dataframe(per_prompt=True)) == len(clean) * len(frame)

    top = result.top(5)
    threshold = min(abs(result.scores[c.kind][c.layer, c.index].item()) for c in top)
    every = torch.cat([s.abs().flatten() for s in result.scores.values()])
    assert len(top) == 5 and threshold == every.topk(5).values[-1]
    assert top == ComponentSet.top_k(result.scores, 5, absolute=True)
    assert all(c.kind == "head" for c in result.top(3, kind="head"))

    loaded = AttributionResult.load(result.save(tmp_path / "atp"))
    for kind in KIND_HOOKS:
        assert torch.equal(loaded.scores[kind], result.scores[kind])
        assert torch.equal(loaded.per_prompt[kind], result.per_prompt[kind])
    assert torch.equal(loaded.metric_clean, result.metric_clean)
    assert (loaded.method, loaded.n_prompts, loaded.ig_steps) == ("atp", len(clean), None)
    no_prompts = attribute(tiny_model, clean, corrupt, logit_diff, kinds="neuron")
    with pytest.raises(ValueError, match="per_prompt=True"):
        no_prompts.to_dataframe(per_prompt=True)
    with pytest.raises(ValueError, match="no 'head' scores"):
        no_prompts.top(2, kind="head")


def test_atp_check_on_tiny_model(tiny_model, pairs, logit_diff, tmp_path):
    clean, corrupt = pairs
    check = atp_check(tiny_model, clean, corrupt, logit_diff, n_components=24, seed=1)
    assert len(check.components) == 24 == len(set(check.components)) and sum(check.from_top) == 12
    assert math.isfinite(check.spearman) and check.spearman > 0.5
    attribution = attribute(tiny_model, clean, corrupt, logit_diff)
    assert ComponentSet(c for c, t in zip(check.components, check.from_top) if t) == attribution.top(12)
    i = check.components.index(next(c for c in check.components if c.kind == "neuron"))
    c = check.components[i]
    exact = _exact_patch(tiny_model, clean, corrupt, logit_diff, c.hook_name, c.index)
    assert check.exact[i].item() == pytest.approx(exact, abs=1e-4)
    again = atp_check(tiny_model, clean, corrupt, logit_diff, n_components=24, seed=1, attribution=attribution)
    other = atp_check(tiny_model, clean, corrupt, logit_diff, n_components=24, seed=2, attribution=attribution)
    assert again.components == check.components and other.components != check.components
    loaded = AttributionCheck.load(check.save(tmp_path / "check"))
    assert loaded.components == check.components and loaded.spearman == check.spearman
    assert set(check.to_dataframe()["selection"]) == {"top", "random"}
    with pytest.raises(ValueError, match="n_components"):
        atp_check(tiny_model, clean, corrupt, logit_diff, n_components=2, attribution=attribution)


@pytest.mark.slow
def test_smollm2_scores_and_check(smollm2):
    template = "I am planning a trip to {}. A fair price for one night in a hotel there, in dollars, is"
    cities = [("Paris", "Tokyo"), ("London", "Cairo"), ("Berlin", "Lima")]
    clean = tokenize(smollm2, [template.format(a) for a, _ in cities])
    corrupt = tokenize(smollm2, [template.format(b) for _, b in cities])
    digits = smollm2.tokenizer(" 1 2 3 4 5", add_special_tokens=False)["input_ids"]
    metric = LogitDiff([digits[1]], [digits[3]])
    result = attribute(smollm2, clean, corrupt, metric, batch_size=2)
    assert result.scores["neuron"].shape == (30, 1536) and result.scores["head"].shape == (30, 9)
    assert all(torch.isfinite(s).all() for s in result.scores.values())
    check = atp_check(smollm2, clean, corrupt, metric, n_components=16, attribution=result)
    print(f"smollm2 atp_check spearman={check.spearman:.3f} (p={check.p_value:.2g}, n=16)")
    assert math.isfinite(check.spearman) and check.spearman > 0


# -- pair-free attribution of an ablation ----------------------------------------------------------

PROMPTS = [a for a, _ in PAIRS] + [b for _, b in PAIRS]
PROBED = [("neuron", 0, 3), ("neuron", 2, 40), ("head", 1, 2), ("head", 2, 0)]


@pytest.fixture(scope="module")
def tiny_double():
    """The tiny model in float64, so a finite difference resolves effects of 1e-6."""
    from interp.testing import load_tiny_model

    return load_tiny_model().to(torch.float64)


@pytest.fixture(scope="module")
def value_near_zero(tiny_model):
    """An expected value whose likeliest answer is worth 0, so float32 resolves small changes."""
    grid = CandidateAnswers.from_texts(tiny_model.tokenizer, [" 5", " 50", " 1,000"], [0.0, 50.0, 1000.0])
    return ExpectedValue(grid)


def _nudged_metric(model, metric, batch, kind, layer, index, value_of, eps):
    """Per-prompt metric with unit (layer, index) moved ``eps`` of the way to its ablated value."""
    expanded = metric.expand(batch)

    def nudge(act, hook):
        out = act.clone()
        out[:, :, index] = act[:, :, index] + eps * (value_of(act)[:, :, index] - act[:, :, index])
        return out

    with torch.no_grad(), hooked(model, [(hook_name(kind, layer), nudge)]):
        return metric(model(expanded.tokens, **expanded.forward_kwargs()), expanded).double()


@pytest.mark.parametrize("how", ["zero", "mean"])
@pytest.mark.parametrize("metric_name", ["logit_diff", "value_near_zero"])
def test_ablation_attribution_equals_a_finite_difference(tiny_double, how, metric_name, request):
    from interp.activations import mean_activations
    from interp.attribution import ablation_attribution

    tiny_model = tiny_double
    metric = request.getfixturevalue(metric_name)
    batch = tokenize(tiny_model, PROMPTS)
    names = [hook_name(k, layer) for k in KIND_HOOKS for layer in range(tiny_model.cfg.n_layers)]
    means = mean_activations(tiny_model, batch, names) if how == "mean" else None
    weights = torch.linspace(-1.0, 2.0, len(PROMPTS))
    result = ablation_attribution(tiny_model, batch, metric, weights=weights, how=how, means=means,
                                  batch_size=3, per_prompt=True)
    eps = 1e-2  # central difference: O(eps^2) truncation
    for kind, layer, index in PROBED:
        def value_of(act, name=hook_name(kind, layer)):  # noqa: B008 (binds this iteration's hook)
            return torch.zeros_like(act) if how == "zero" else means[name].to(act.dtype).expand_as(act)

        up = _nudged_metric(tiny_model, metric, batch, kind, layer, index, value_of, eps)
        down = _nudged_metric(tiny_model, metric, batch, kind, layer, index, value_of, -eps)
        finite = (up - down) / (2 * eps)  # d metric_i / d t at t = 0 along act + t (value - act)
        estimate = result.per_prompt[kind][:, layer, index].double()
        assert finite.abs().max() > 1e-6
        torch.testing.assert_close(estimate, finite, atol=1e-2 * finite.abs().max().item(), rtol=1e-2)
        torch.testing.assert_close(result.scores[kind][layer, index].double(), weights.double() @ finite,
                                   atol=1e-2 * finite.abs().sum().item(), rtol=1e-2)
    torch.testing.assert_close(result.metric, run_metric(tiny_model, metric, batch).float(), atol=1e-4, rtol=1e-5)


def test_ablation_attribution_tracks_exact_zero_ablation_of_last_layer_neurons(tiny_model, logit_diff, tmp_path):
    from interp.attribution import AblationAttribution, ablation_attribution
    from interp.components import Neuron
    from interp.sweeps import ablation_sweep

    batch = tokenize(tiny_model, PROMPTS)
    last = tiny_model.cfg.n_layers - 1
    result = ablation_attribution(tiny_model, batch, logit_diff, kinds=["neuron"], batch_size=5)
    neurons = [Neuron(last, i) for i in range(tiny_model.cfg.d_mlp)]
    with torch.no_grad():
        base = logit_diff(tiny_model(batch.tokens), batch)

    def score(logits, rows):
        return logit_diff(logits, batch.take(rows)) - base[rows.cpu()].to(logits.device)

    exact = ablation_sweep(tiny_model, batch, neurons, score, rows_per_forward=40, prompts_per_pass=3).mean(-1)
    estimate = result.scores["neuron"][last]
    assert exact.abs().max() > 0.05
    assert torch.corrcoef(torch.stack([estimate, exact]))[0, 1] > 0.98
    loaded = AblationAttribution.load(result.save(tmp_path / "ablation"))
    torch.testing.assert_close(loaded.scores["neuron"], result.scores["neuron"])
    assert loaded.how == "zero" and loaded.per_prompt is None and loaded.n_prompts == len(PROMPTS)
