from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from interp.batching import TokenBatch, encode, tokenize
from interp.metrics import (
    CandidateAnswers,
    ExpectedValue,
    LogitDiff,
    TokenSetProb,
    answer_logits,
    kl_divergence,
    log_normalizer,
    run_metric,
)

PROMPTS = ["The seller asked for", "Hi", "My offer for the used bicycle is"]
TEXTS, VALUES = [" 5", " 50", " 500", " 1,000"], [5.0, 50.0, 500.0, 1000.0]


@pytest.fixture(scope="module")
def batch(tiny_model):
    return tokenize(tiny_model, PROMPTS)


@pytest.fixture(scope="module")
def logits(tiny_model, batch):
    with torch.no_grad():
        return tiny_model(batch.tokens)


@pytest.fixture(scope="module", params=[True, False], ids=["packed", "row-per-candidate"])
def candidates(tiny_model, request):
    return CandidateAnswers.from_texts(tiny_model.tokenizer, TEXTS, VALUES, packed=request.param)


def _run(model, batch):
    return model(batch.tokens, **batch.forward_kwargs())


def _final(logits, batch):
    return torch.stack([logits[row, int(batch.answer_pos[row])] for row in range(len(batch))])


def test_answer_logits_read_each_prompts_own_position(logits, batch):
    assert torch.equal(answer_logits(logits, batch), _final(logits, batch))
    assert not torch.equal(answer_logits(logits, batch), logits[:, -1])  # padding present


def test_logit_diff(logits, batch):
    got = LogitDiff(positive=[10, 11], negative=[12])(logits, batch)
    final = _final(logits, batch)
    torch.testing.assert_close(got, (final[:, 10] + final[:, 11]) / 2 - final[:, 12])


def test_token_set_prob(logits, batch):
    probs = _final(logits, batch).softmax(-1)
    expected = probs[:, [10, 11, 300]].sum(-1)
    torch.testing.assert_close(TokenSetProb([10, 11, 300])(logits, batch), expected)
    torch.testing.assert_close(TokenSetProb([10, 11, 300], log=True)(logits, batch), expected.log())
    torch.testing.assert_close(TokenSetProb([10, 11, 11, 300])(logits, batch), expected)  # a set
    with pytest.raises(ValueError, match="at least one token"):
        TokenSetProb([])(logits, batch)


def test_kl_zero_for_identical_logits(logits, batch):
    assert kl_divergence(logits, logits, batch).abs().max() < 1e-6
    assert kl_divergence(logits, logits, batch, all_positions=False).abs().max() < 1e-6


def test_kl_matches_torch(logits, batch):
    other = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    new, ref = other.log_softmax(-1), logits.log_softmax(-1)
    per_pos = F.kl_div(new, ref, log_target=True, reduction="none").sum(-1)  # KL(ref || new)
    mask = batch.attention_mask.float()
    expected = (per_pos * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(kl_divergence(other, logits, batch), expected, rtol=1e-5, atol=1e-6)
    at_answer = F.kl_div(_final(new, batch), _final(ref, batch), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_divergence(other, logits, batch, all_positions=False), at_answer)


def test_candidate_log_probs_equal_token_by_token(tiny_model, batch, candidates):
    assert not candidates.single_token
    prompts = PROMPTS[1:]  # the shortest and the longest
    expanded = candidates.expand(batch.select([1, 2]))
    with torch.no_grad():
        got = candidates.log_probs(_run(tiny_model, expanded), expanded)
    assert got.shape == (len(prompts), len(TEXTS))
    for row, prompt in enumerate(prompts):
        prompt_ids = encode(tiny_model, prompt)
        for col, answer in enumerate(candidates.token_ids):
            ids = torch.tensor([prompt_ids + list(answer)])
            with torch.no_grad():
                logp = tiny_model(ids)[0].log_softmax(-1)
            manual = sum(logp[len(prompt_ids) - 1 + k, token] for k, token in enumerate(answer))
            torch.testing.assert_close(got[row, col], manual, rtol=1e-5, atol=1e-4)


def test_distribution_and_expected_value(tiny_model, batch, candidates):
    metric = ExpectedValue(candidates)
    expanded = metric.expand(batch)
    with torch.no_grad():
        logits = _run(tiny_model, expanded)
    dist = candidates.distribution(logits, expanded)
    torch.testing.assert_close(dist.sum(-1), torch.ones(len(PROMPTS)))
    values = torch.tensor(VALUES)
    torch.testing.assert_close(metric(logits, expanded), dist @ values)
    mass = candidates.grid_mass(logits, expanded)
    assert ((mass > 0) & (mass < 1)).all()
    with torch.no_grad():
        torch.testing.assert_close(run_metric(tiny_model, metric, batch), dist @ values)


def test_extra_padding_changes_nothing(tiny_model, batch, candidates):
    pad = torch.full((len(batch), 3), int(batch.tokens[0, -1]))
    wide = TokenBatch(
        torch.cat([batch.tokens, pad], 1),
        torch.cat([batch.attention_mask, torch.zeros_like(pad)], 1),
        batch.answer_pos,
    )
    metric = ExpectedValue(candidates)
    with torch.no_grad():
        expected = run_metric(tiny_model, metric, batch)
        torch.testing.assert_close(run_metric(tiny_model, metric, wide), expected)


@dataclass(frozen=True)
class _AlwaysExpand(CandidateAnswers):
    @property
    def single_token(self) -> bool:
        return False


def test_single_token_fast_path_equals_expanded_path(tiny_model, batch):
    fast = CandidateAnswers.from_texts(tiny_model.tokenizer, [" yes", " no", " maybe"], [1, 0, 0.5])
    assert fast.single_token and fast.expand(batch) is batch
    slow = _AlwaysExpand(fast.texts, fast.values, fast.token_ids, packed=False)
    expanded = slow.expand(batch)
    assert len(expanded) == 3 * len(batch)
    with torch.no_grad():
        quick = fast.log_probs(tiny_model(batch.tokens), batch)
        full = slow.log_probs(tiny_model(expanded.tokens), expanded)
    torch.testing.assert_close(quick, full, rtol=1e-5, atol=1e-5)


def test_expected_value_gradient(tiny_model, logits, batch):
    grid = CandidateAnswers.from_texts(tiny_model.tokenizer, [" yes", " no", " maybe"], [1.0, 0.0, 0.5])
    leaf = logits.clone().requires_grad_(True)
    value = ExpectedValue(grid)(leaf, batch)
    value.sum().backward()
    ids = [t[0] for t in grid.token_ids]
    probs = _final(logits, batch)[:, ids].softmax(-1)  # renormalized over the grid
    values = torch.tensor(grid.values)
    expected = probs * (values - (probs @ values)[:, None])  # dE/dlogit_c = p_c (v_c - E)
    grad = leaf.grad
    torch.testing.assert_close(_final(grad, batch)[:, ids], expected, rtol=1e-5, atol=1e-6)
    grad_at_answer = _final(grad, batch)
    grad_at_answer[:, ids] = 0
    assert grad_at_answer.abs().max() < 1e-6 and grad.abs().sum() > 0


def test_multi_token_expected_value_gradient_reaches_the_model(tiny_model, batch, candidates):
    metric = ExpectedValue(candidates)
    run_metric(tiny_model, metric, batch).sum().backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    tiny_model.zero_grad(set_to_none=True)
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_candidate_grid_errors(tiny_model):
    tokenizer = tiny_model.tokenizer
    with pytest.raises(ValueError, match="at least 2 candidates"):
        CandidateAnswers.from_texts(tokenizer, [" 5"], [5])
    with pytest.raises(ValueError, match="one value each"):
        CandidateAnswers.from_texts(tokenizer, [" 5", " 6"], [5])
    with pytest.raises(ValueError, match="tokenize identically"):
        CandidateAnswers.from_texts(tokenizer, [" 5", " 5"], [5, 6])
    with pytest.raises(ValueError, match="tokenize to nothing"):
        CandidateAnswers.from_texts(tokenizer, ["", " 5"], [0, 5])


def test_logits_at_reads_only_the_needed_positions_exactly(tiny_model):
    from interp.batching import tokenize
    from interp.metrics import CandidateAnswers, ExpectedValue, logits_at

    batch = tokenize(tiny_model, ["Offer for the bike: $", "A much longer prompt about an offer: $"])
    positions = torch.tensor([[0, 3], [2, 5]])
    full = tiny_model(batch.tokens)
    picked = logits_at(tiny_model, batch, positions)
    torch.testing.assert_close(picked, full[torch.arange(2)[:, None], positions], rtol=1e-5, atol=1e-5)
    for packed in (True, False):
        grid = CandidateAnswers.from_texts(tiny_model.tokenizer, ["10", "250", "3,000"], [10, 250, 3000], packed=packed)
        metric = ExpectedValue(grid)
        expanded = metric.expand(batch)
        torch.testing.assert_close(metric.evaluate(tiny_model, batch), metric(_run(tiny_model, expanded), expanded))


def test_packed_layout_is_the_candidate_trie(tiny_model, candidates):
    """Shared leading tokens are fed once; each node sees the prompt and its own ancestors only."""
    if not candidates.packed:
        pytest.skip("layout of the packed batch only")
    batch = tokenize(tiny_model, ["Hi", "My offer for the used bicycle is"])
    packed = candidates.expand(batch)
    fed = {ids[:d] for ids in candidates.token_ids for d in range(1, len(ids))}
    n_nodes = len(fed)
    lengths = batch.lengths
    assert packed.tokens.shape == (2, int(lengths.max()) + n_nodes)
    assert torch.equal(packed.lengths, lengths + n_nodes)
    row, start = 0, int(lengths[0])
    nodes = packed.tokens[row, start : start + n_nodes].tolist()
    depth = packed.position_ids[row, start : start + n_nodes] - (start - 1)
    # each node's prefix, read back from the key mask, is a fed prefix of some candidate
    prefixes = set()
    for i in range(n_nodes):
        seen = packed.key_mask[row, start + i, start : start + n_nodes].nonzero().flatten().tolist()
        assert len(seen) == int(depth[i]) and seen[-1] == i
        assert packed.key_mask[row, start + i, :start].all()
        prefixes.add(tuple(nodes[j] for j in seen))
    assert prefixes == fed



def test_the_log_normalizer_is_logsumexp_on_any_batch_shape_and_in_its_gradient():
    torch.manual_seed(0)
    logits = torch.randn(40, 7, 50, dtype=torch.float64, requires_grad=True)
    for view in (logits, logits[:, :-1], logits[:, 0], logits[:3, :2], logits[:0]):
        assert torch.equal(log_normalizer(view, rows=16), view.logsumexp(-1))
    (grad,) = torch.autograd.grad(log_normalizer(logits[:, 1:], rows=4).sum(), logits)
    (expected,) = torch.autograd.grad(logits[:, 1:].logsumexp(-1).sum(), logits)
    torch.testing.assert_close(grad, expected)


def test_scoring_onto_prefilled_prompts_equals_scoring_the_packed_batch(tiny_model):
    """The prompts prefilled (two of them sharing a long prefix, run once) and the trie run onto
    their cache give ``score``'s log-probabilities, stop terms and other-mass."""
    prompts = ["The seller of the old red bicycle asked the buyer for", "Hi",
               "The seller of the old red bicycle asked his friend for"]
    batch = tokenize(tiny_model, prompts)
    grid = CandidateAnswers.from_texts(tiny_model.tokenizer, TEXTS, VALUES)
    ids = grid.token_ids
    ends = tuple(tuple(range(3 + i)) for i in range(len(ids)))  # a stop term after every candidate
    firsts = tuple(sorted({t[0] for t in ids}))
    stopping = CandidateAnswers(grid.texts, grid.values, ids, True, ends, firsts)
    for cands in (grid, stopping):
        want = cands.score(tiny_model, batch, other=cands.answer_tokens is not None)
        got = cands.score_prefilled(tiny_model, batch, other=cands.answer_tokens is not None)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    unpacked = CandidateAnswers.from_texts(tiny_model.tokenizer, TEXTS, VALUES, packed=False)
    with pytest.raises(ValueError, match="packed=True"):
        unpacked.score_prefilled(tiny_model, batch)
