import pytest
import torch

from interp.ablation import ablated
from interp.batching import tokenize
from interp.components import ComponentSet, Head, Neuron
from interp.hooks import attached_hook_count
from interp.metrics import CandidateAnswers, ExpectedValue, LogitDiff, run_metric
from interp.sweeps import ablation_sweep, metric_sweep

TEXTS = ["The weather was mild all week.", "She read the letter twice", "Trains run late"]


@pytest.fixture(scope="module")
def batch(tiny_model):
    return tokenize(tiny_model, TEXTS)


def _final_logprob(batch):
    """Score: each row's log-probability of token 42 at its own last position (padding matters)."""
    def score(logits, prompts):
        rows = torch.arange(len(prompts))
        return logits[rows, batch.answer_pos[prompts]].log_softmax(-1)[:, 42]

    return score


def test_sweep_equals_one_ablated_run_per_variant(tiny_model, batch):
    variants = [Head(0, 1), Head(2, 3), Neuron(1, 5), ComponentSet([Head(1, 0), Neuron(2, 7), Neuron(1, 90)])]
    score = _final_logprob(batch)
    before = attached_hook_count(tiny_model)
    got = ablation_sweep(tiny_model, batch, variants, score, rows_per_forward=4)  # several forwards per layer
    assert got.shape == (len(variants), len(TEXTS))
    prompts = torch.arange(len(TEXTS))
    for i, variant in enumerate(variants):
        with torch.no_grad(), ablated(tiny_model, variant if isinstance(variant, ComponentSet) else [variant], "zero"):
            expected = score(tiny_model(batch.tokens), prompts)
        torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-4)
    assert attached_hook_count(tiny_model) == before
    assert not any("forward" in vars(b) for b in tiny_model.blocks)  # lower blocks restored


def test_sweep_forwards_are_cut_to_their_longest_row(tiny_model, batch):
    widths, final = [], _final_logprob(batch)

    def score(logits, prompts):
        widths.append((logits.shape[1], int(batch.lengths[prompts].max())))
        return final(logits, prompts)

    ablation_sweep(tiny_model, batch, [Head(0, 1), Neuron(1, 5), Head(2, 0)], score, rows_per_forward=2)
    assert all(width == longest for width, longest in widths)
    assert min(width for width, _ in widths) < batch.tokens.shape[1]  # the shorter texts ran without the padding


def test_sweep_leaves_no_hooks_after_an_error(tiny_model, batch):
    before = attached_hook_count(tiny_model)

    def broken(logits, prompts):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ablation_sweep(tiny_model, batch, [Head(1, 1)], broken)
    assert attached_hook_count(tiny_model) == before
    assert not any("forward" in vars(b) for b in tiny_model.blocks)


def test_sweep_rejects_empty_variants(tiny_model, batch):
    with pytest.raises(ValueError, match="at least one"):
        ablation_sweep(tiny_model, batch, [ComponentSet()], _final_logprob(batch))


@pytest.mark.parametrize("measure", ["kl", "perplexity"])
def test_head_utility_is_the_per_head_kl_or_perplexity_increase(tiny_model, measure):
    from circuits.evaluate.evaluation import UtilityProbe, head_utility

    probe = UtilityProbe.build(tiny_model, TEXTS)
    got = head_utility(tiny_model, probe, n_texts=3, measure=measure, progress=False)
    assert got.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)
    unablated = probe.measure(tiny_model)
    for layer, head in [(0, 0), (2, 3)]:
        with ablated(tiny_model, [Head(layer, head)], "zero"):
            expected = probe.measure(tiny_model)[measure] - (unablated[measure] if measure == "perplexity" else 0)
        assert got[layer, head] == pytest.approx(expected, rel=1e-3, abs=1e-5)
    if measure == "kl":
        assert (got >= -1e-6).all() and got.max() > 0


@pytest.mark.parametrize("per_position", [False, True])
def test_mean_sweep_in_prompt_chunks_equals_one_mean_ablated_run_per_variant(tiny_model, batch, per_position):
    from interp.activations import mean_activations
    from interp.components import hook_name

    names = [hook_name(k, layer) for k in ("neuron", "head") for layer in range(tiny_model.cfg.n_layers)]
    means = mean_activations(tiny_model, batch, names, per_position=per_position)
    variants = [Head(0, 1), Neuron(2, 7), ComponentSet([Head(1, 0), Neuron(1, 90)])]
    score = _final_logprob(batch)
    got = ablation_sweep(tiny_model, batch, variants, score, means=means, rows_per_forward=4, prompts_per_pass=2)
    prompts = torch.arange(len(TEXTS))
    for i, variant in enumerate(variants):
        with torch.no_grad(), ablated(tiny_model, variant if isinstance(variant, ComponentSet) else [variant], "mean",
                                      means=means):
            expected = score(tiny_model(batch.tokens), prompts)
        torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="means lack"):
        ablation_sweep(tiny_model, batch, variants, score, means={names[0]: means[names[0]]})


# -- metric_sweep: stacked evaluation of many sets through the Metric protocol ----------------------

PROMPTS = ["The loan officer offered", "A bike costs", "She paid the seller for the old car exactly",
           "Rent is", "The salary offered to the new hire was"]  # different lengths: padding in every batch
SETS = [ComponentSet([Head(2, 3)]), ComponentSet([Neuron(0, 5), Neuron(2, 9)]),
        ComponentSet([Head(1, 0), Neuron(2, 7)]), ComponentSet([Neuron(2, 11)]),
        ComponentSet([Head(0, 1), Head(0, 2), Neuron(1, 90)])]  # start layers 0, 1, 2


def _metrics(model):
    tok = model.tokenizer
    texts, values = [" 5", " 50", " 1,000", " 12,500"], [5.0, 50.0, 1000.0, 12500.0]
    packed = CandidateAnswers.from_texts(tok, texts, values)
    unpacked = CandidateAnswers.from_texts(tok, texts, values, packed=False)
    assert not packed.single_token  # multi-token answers: the batch is expanded
    return {"packed": ExpectedValue(packed), "unpacked": ExpectedValue(unpacked), "logit_diff": LogitDiff([300], [302])}


def _one_forward_per_set(model, batch, metric, sets, how="zero", means=None):
    with torch.no_grad():
        base = run_metric(model, metric, batch)
        per_set = []
        for s in sets:
            with ablated(model, s, how, means=means):
                per_set.append(run_metric(model, metric, batch))
    return torch.stack(per_set), base


@pytest.mark.parametrize("name", ["packed", "unpacked", "logit_diff"])
def test_metric_sweep_equals_one_full_forward_per_set(tiny_model, name, monkeypatch):
    """Also: the sweep's forwards run on the Hugging Face attention modules (its hooks all fire there),
    the per-set forwards it is checked against through the bridge's own attention."""
    metric = _metrics(tiny_model)[name]
    batch = tokenize(tiny_model, PROMPTS)
    before = attached_hook_count(tiny_model)
    attention_class = type(tiny_model.blocks[0].attn.original_component)
    calls, hf_forward = [], attention_class.forward
    monkeypatch.setattr(attention_class, "forward", lambda *a, **k: calls.append(1) or hf_forward(*a, **k))
    got = metric_sweep(tiny_model, batch, metric, SETS, max_batch_rows=3, prompts_per_pass=3)  # several forwards
    assert calls, "the sweep ran the bridge's attention"
    calls.clear()
    want, base = _one_forward_per_set(tiny_model, batch, metric, SETS)
    assert not calls
    assert got.values.shape == (len(SETS), len(PROMPTS))
    torch.testing.assert_close(got.baseline, base.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.values, want.float(), rtol=1e-4, atol=1e-4)
    assert (got.values - got.baseline).abs().max() > 1e-3  # the ablations change something
    assert attached_hook_count(tiny_model) == before
    assert not any("forward" in vars(b) for b in tiny_model.blocks)
    frame = got.to_dataframe()
    assert len(frame) == len(SETS) * len(PROMPTS) and frame["effect"].to_numpy() == pytest.approx(
        got.effects.numpy().reshape(-1))


@pytest.mark.parametrize("per_position", [False, True])
def test_mean_metric_sweep_equals_one_mean_ablated_forward_per_set(tiny_model, per_position):
    from interp.activations import mean_activations
    from interp.components import hook_name

    metric = _metrics(tiny_model)["packed"]
    batch = tokenize(tiny_model, PROMPTS)
    names = [hook_name(k, layer) for k in ("neuron", "head") for layer in range(tiny_model.cfg.n_layers)]
    if per_position:  # per-position means must cover the expanded rows
        width = metric.expand(batch).tokens.shape[1]
        generator = torch.Generator().manual_seed(0)
        means = {n: torch.randn(width, *mean_activations(tiny_model, batch, [n])[n].shape, generator=generator)
                 for n in names}
    else:
        means = mean_activations(tiny_model, batch, names)
    got = metric_sweep(tiny_model, batch, metric, SETS, means=means, max_batch_rows=4)
    want, _ = _one_forward_per_set(tiny_model, batch, metric, SETS, "mean", means)
    torch.testing.assert_close(got.values, want.float(), rtol=1e-4, atol=1e-4)
    assert got.how == "mean"
    with pytest.raises(ValueError, match="means lack"):
        metric_sweep(tiny_model, batch, metric, SETS, means={names[0]: means[names[0]]})
    if per_position:
        short = {n: m[:3] for n, m in means.items()}
        with pytest.raises(ValueError, match="cover 3 positions"):
            metric_sweep(tiny_model, batch, metric, SETS, means=short)
        assert not any("forward" in vars(b) for b in tiny_model.blocks)


def test_metric_sweep_leaves_no_hooks_after_an_error(tiny_model):
    batch = tokenize(tiny_model, PROMPTS)
    good = LogitDiff([300], [302])
    before = attached_hook_count(tiny_model)
    calls = []

    class Broken:  # runs clean, fails on the first ablated stack
        def expand(self, b):
            return b

        def __call__(self, logits, b):
            calls.append(len(b))
            if len(calls) > 1:
                raise RuntimeError("boom")
            return good(logits, b)

    with pytest.raises(RuntimeError, match="boom"):
        metric_sweep(tiny_model, batch, Broken(), SETS)
    assert len(calls) == 2
    assert attached_hook_count(tiny_model) == before
    assert not any("forward" in vars(b) for b in tiny_model.blocks)
    assert not any("forward" in vars(b.attn) for b in tiny_model.blocks)


def test_metric_sweep_survives_simulated_out_of_memory(tiny_model, monkeypatch):
    import warnings

    from interp import stacking

    metric = _metrics(tiny_model)["packed"]
    batch = tokenize(tiny_model, PROMPTS)
    reference = metric_sweep(tiny_model, batch, metric, SETS, max_batch_rows=8)
    real = stacking.resume
    seen = []

    def small_memory(model, residual, *args, **kwargs):
        seen.append(residual.shape[0])
        if residual.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, residual, *args, **kwargs)

    monkeypatch.setattr(stacking, "resume", small_memory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shrunk = metric_sweep(tiny_model, batch, metric, SETS, max_batch_rows=8)
    assert sum("out of memory" in str(w.message) for w in caught) == 1
    assert max(seen[seen.index(2):]) <= 2
    torch.testing.assert_close(shrunk.values, reference.values, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(b) for b in tiny_model.blocks)


@pytest.mark.parametrize("how", ["zero", "mean"])
def test_metric_sweep_runs_the_shared_prefix_once_per_set_and_equals_full_forwards(tiny_model, how, monkeypatch):
    from interp import stacking
    from interp.activations import mean_activations
    from interp.components import hook_name

    system = "You are a careful assistant. Answer with a number only. "
    batch = tokenize(tiny_model, [system + p for p in PROMPTS])
    metric = _metrics(tiny_model)["packed"]
    means = None
    if how == "mean":  # per position: the prefix and the resumed rows read different slices
        names = [hook_name(k, layer) for k in ("neuron", "head") for layer in range(tiny_model.cfg.n_layers)]
        width = metric.expand(batch).tokens.shape[1]
        generator = torch.Generator().manual_seed(1)
        means = {n: torch.randn(width, *mean_activations(tiny_model, batch, [n])[n].shape, generator=generator)
                 for n in names}
    built = []
    real_build = stacking.Prefix.build

    def spy(model, rows, length, n):
        built.append((len(rows), length))
        return real_build(model, rows, length, n)

    monkeypatch.setattr(stacking.Prefix, "build", staticmethod(spy))
    got = metric_sweep(tiny_model, batch, metric, SETS, means=means, max_batch_rows=4, share_prefix=True)
    want, base = _one_forward_per_set(tiny_model, batch, metric, SETS, how, means)
    lengths = {length for _, length in built}
    assert len(lengths) == 1 and lengths.pop() >= 10  # the system prompt's tokens, shared by every row
    assert built[0][0] == len(metric.expand(batch.take(torch.arange(1))))  # the check: one prompt's rows
    assert sum(n for n, _ in built[1:]) == len(SETS)  # then one prefix row per set, for every forward of it
    torch.testing.assert_close(got.baseline, base.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.values, want.float(), rtol=1e-4, atol=1e-4)
    assert not any("forward" in vars(b) or "forward" in vars(b.attn) for b in tiny_model.blocks)
    unshared = metric_sweep(tiny_model, batch, metric, SETS, means=means, share_prefix=False)
    torch.testing.assert_close(got.values, unshared.values, rtol=1e-4, atol=1e-4)


def test_metric_sweep_by_groups_shares_each_groups_prefix(tiny_model, monkeypatch):
    from interp import stacking

    heads = ["You are a careful assistant. Answer with a number only. ", "Reply briefly, please: "]
    texts = [heads[i % 2] + p for i, p in enumerate(PROMPTS)]
    batch = tokenize(tiny_model, texts)
    metric = _metrics(tiny_model)["packed"]
    built = []
    real_build = stacking.Prefix.build
    monkeypatch.setattr(stacking.Prefix, "build", staticmethod(
        lambda model, rows, length, n: built.append(length) or real_build(model, rows, length, n)))
    got = metric_sweep(tiny_model, batch, metric, SETS, groups=[i % 2 for i in range(len(texts))], max_batch_rows=4,
                       share_prefix=True)
    want, base = _one_forward_per_set(tiny_model, batch, metric, SETS)
    assert min(built) >= 5  # each group's own head, not the one token the two groups share
    torch.testing.assert_close(got.baseline, base.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.values, want.float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one label per prompt"):
        metric_sweep(tiny_model, batch, metric, SETS, groups=[0, 1])


@pytest.mark.slow
def test_metric_sweep_equals_full_forwards_on_smollm2(smollm2):
    """Stacked sets with a shared chat prefix and a packed multi-token metric, against one ablated forward
    per set (kept short: three prompts, four sets at layers 0 to 25)."""
    chat = smollm2.tokenizer.apply_chat_template
    questions = ["How much should I offer Jamal for his bike?", "What salary should we offer Claire?",
                 "How much should the loan to Tyrone be?"]
    texts = [chat([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) + "$"
             for q in questions]
    batch = tokenize(smollm2, texts)
    metric = ExpectedValue(CandidateAnswers.from_texts(smollm2.tokenizer, ["50", "500", "1,000", "12,500"],
                                                       [50.0, 500.0, 1000.0, 12500.0]))
    sets = [ComponentSet([Head(25, 3)]), ComponentSet([Neuron(0, 100), Neuron(12, 5), Head(20, 1)]),
            ComponentSet([Head(6, 0), Head(6, 7)]), ComponentSet([Neuron(15, i) for i in range(0, 1500, 30)])]
    got = metric_sweep(smollm2, batch, metric, sets, share_prefix=True)
    want, base = _one_forward_per_set(smollm2, batch, metric, sets)
    torch.testing.assert_close(got.baseline, base.float(), rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(got.values, want.float(), rtol=1e-3, atol=1e-2)
    assert (got.values - got.baseline).abs().max() > 1.0  # some set moves the expected amount
    assert not any("forward" in vars(b) or "forward" in vars(b.attn) for b in smollm2.blocks)
