import dataclasses
import random

import numpy as np
import pytest
import torch

from circuits.measure.parsing import parse_number
from interp.batching import encode, tokenize
from interp.numeric import DONE, ROOT, NumberGrammar, expand, expand_each

PROMPTS = ["The seller asked for $", "Hi, the loan is $", "My offer for the used bicycle is $"]
BUDGET = {"max_nodes": 20, "per_round": 6, "target": 1.0, "min_mass": 1e-6}


@pytest.fixture(scope="module")
def grammar(tiny_model):
    return NumberGrammar.of(tiny_model.tokenizer, max_decimals=2)


@pytest.fixture(scope="module")
def tree(tiny_model, grammar):
    return expand(tiny_model, tokenize(tiny_model, PROMPTS), grammar, **BUDGET)


def _walk(grammar, tokenizer, text, start=""):
    """The longest token path of ``text`` the grammar continues; the value it stands for."""
    state, path = grammar.state_of(start), []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        nxt = grammar.continuations(state).get(token)
        if nxt is None:
            break
        state, path = nxt, path + [token]
        if nxt == DONE:
            break
    return tokenizer.decode(path)


@pytest.mark.parametrize(
    "text,start",
    [("1,000", ""), ("1.5k", ""), ("100.", ""), ("5,000.00", ""), ("50%", ""), ("25 million", ""), ("3K", ""),
     ("1,5", ""), ("1,2345", ""), ("7 km", ""), ("10M", ""), ("2.5 billion dollars", ""), ("40,000-50,000", ""),
     ("75", "0."), ("1,000\n", ""), ("12.345", ""), ("5k.", ""), ("600 thousand", ""), ("1.5 million", ""),
     ("150.50", ""), ("$150.50", "$"), ("1.50", ""), ("20,000.", ""), ("3.5M", ""), (" 12", ""), (" 1,500", "")],
)
@pytest.mark.parametrize("which", ["grammar", "dollars"])
def test_parsing_and_enumeration_agree_on_tricky_strings(tiny_model, grammar, text, start, which):
    """The answer the enumeration files a reply under has the value parse_number reads from the reply
    (a range counts at its first number; decimals beyond max_decimals are dropped); also with the
    grammar the dollar contexts use (``circuits.measure.bias``)."""
    from circuits.measure.bias import _grammar

    if which == "dollars":
        grammar = _grammar(tiny_model.tokenizer, "dollars")
    number = start.lstrip("$")
    text = text.lstrip("$")
    path = _walk(grammar, tiny_model.tokenizer, text, number)
    expected = parse_number("$" + number + text.split("-")[0])
    if text == "12.345":
        expected = 12.34
    assert parse_number(number + path) == pytest.approx(expected)


@pytest.mark.parametrize("text,start", [("75", "0."), ("0.5", ""), ("50%", ""), ("12.345", ""), ("7 km", ""),
                                        ("1,000", ""), ("40-50", "")])
@pytest.mark.parametrize("answer_type", ["probability", "percent", "score", "rank"])
def test_other_types_read_numbers_without_multipliers(tiny_model, text, start, answer_type):
    """Chances, percentages, scores and ranks are read without multiplier words (``"0.5 million"`` is
    no probability), so a number with all its decimals is final; the value still agrees with parse_number
    up to the decimals read."""
    from circuits.inputs.contexts import DECIMALS
    from circuits.measure.bias import _grammar

    if start == "0." and not DECIMALS[answer_type]:
        pytest.skip("a rank has no decimals to start")
    grammar = _grammar(tiny_model.tokenizer, answer_type)
    assert not grammar.words and not grammar.short
    path = _walk(grammar, tiny_model.tokenizer, text, start)
    expected = parse_number(start + text.split("-")[0])
    decimals = DECIMALS[answer_type]
    assert parse_number(start + path) == pytest.approx(int(expected * 10**decimals + 1e-9) / 10**decimals)
    if decimals:
        full = "1." + "5" * decimals  # all decimals read: nothing continues it
        assert grammar.step(grammar.state_of(full[:-1]), "5") == DONE


def _states(grammar, start=ROOT, limit=80):
    """States reached from ``start``, breadth first."""
    seen, todo = {}, [start]
    while todo and len(seen) < limit:
        state = todo.pop(0)
        if state not in seen:
            seen[state] = None
            todo += [s for s in grammar.continuations(state).values() if s != DONE]
    return list(seen)


@pytest.mark.parametrize("vocabulary", ["tiny", "made up"])
def test_continuations_are_every_token_that_step_continues_in_token_order(tiny_model, vocabulary):
    if vocabulary == "tiny":
        grammar = NumberGrammar.of(tiny_model.tokenizer, max_decimals=2, multiplier_decimals=1)
    else:  # duplicates, an empty text, words, separators, tokens read whole and tokens that end a number
        texts = ("", "1", "1", "12", ",", ",000", ".", ".5", "k", "k.", "K", " ", " m", " million", " millions",
                 " milk", "M", "Ma", "5 km", "5k", " 5", "x", "0", "00", ".", "1,2")
        grammar = NumberGrammar(texts, max_decimals=2, multiplier_decimals=1)
    states = _states(grammar)
    assert len(states) > 10
    for state in states:
        brute = {i: grammar.step(state, t) for i, t in enumerate(grammar.token_texts) if t}
        assert list(grammar.continuations(state).items()) == [(i, s) for i, s in brute.items() if s is not None]


def test_tokens_that_end_a_number_leave_its_value_unchanged(tiny_model, grammar):
    tok = tiny_model.tokenizer
    rng = random.Random(0)
    for text in ("1,000", "25", "3.5", "7k", "1,00", "12 million", "4."):
        state = grammar.state_of(text)
        stops = [i for i in range(len(tok)) if i not in grammar.continuations(state)]
        for i in rng.sample(stops, 400):
            after = grammar.token_texts[i]
            if "/" in after[:1]:  # a fraction "3/4" is read as its value; replies never start one here
                continue
            assert parse_number(text + after) == parse_number(text), (text, after)


def test_grammar_reads_separators_decimals_and_multipliers(tiny_model, grammar):
    ids = {grammar.token_texts[i]: i for i in grammar.continuation_ids(("int", 1, False, 0, ""))}
    assert {",", ".", "0", "k", "K", "M", " million", " thousand"} <= set(ids)
    assert "%" not in ids and " " in ids  # "50%" is 50; a space may start " million"
    assert grammar.continuations(grammar.state_of("1234")).get(ids[","]) is None  # no group of three follows
    assert "." not in {grammar.token_texts[i] for i in NumberGrammar.of(tiny_model.tokenizer, max_decimals=0)
                       .continuation_ids(("int", 1, False, 0, ""))}
    assert grammar.step(grammar.state_of("5k"), "m") == DONE  # "5km" is 5: the value changed back
    assert grammar.step(grammar.state_of("5"), "km") is None  # ... and so "5" + "km" ends at 5
    assert grammar.state_of("") == ROOT
    assert grammar.step(ROOT, " ") is not None and grammar.step(grammar.state_of(" "), " ") is None  # one space
    assert grammar.step(grammar.state_of(" "), "A") is None  # "# A" is no number


def _brute_log_prob(model, prompt, path, ends):
    """log P(path, then none of ends) after prompt, one plain forward per prefix."""
    hf = model.original_model
    ids = encode(model, prompt)
    total = 0.0
    with torch.no_grad():
        for j in range(len(path) + (ends is not None)):
            logp = hf(input_ids=torch.tensor([ids + list(path[:j])])).logits[0, -1].double().log_softmax(-1)
            if j < len(path):
                total += float(logp[path[j]])
            else:
                total += float(torch.log1p(-logp[list(ends)].exp().sum()))
    return total


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "row-per-candidate"])
def test_enumerated_distribution_equals_brute_force(tiny_model, tree, packed):
    cands = tree.candidates(tiny_model.tokenizer, lambda t: parse_number(t), packed=packed)
    assert len(cands.texts) > 10 and any(cands.ends) and cands.n_nodes > 0
    with torch.no_grad():
        logp, other = cands.score(tiny_model, tokenize(tiny_model, PROMPTS), other=True)
    rng = random.Random(0)
    for c in rng.sample(range(len(cands.texts)), 12):
        for row, prompt in enumerate(PROMPTS):
            brute = _brute_log_prob(tiny_model, prompt, cands.token_ids[c], cands.ends[c])
            assert float(logp[row, c]) == pytest.approx(brute, abs=2e-4)
        assert cands.values[c] == parse_number(cands.texts[c])
    mean_mass = logp.exp().mean(0)
    assert torch.allclose(mean_mass, torch.tensor(tree.mass, dtype=mean_mass.dtype), rtol=1e-3, atol=1e-9)
    for row, prompt in enumerate(PROMPTS):
        root = _brute_log_prob(tiny_model, prompt, (), tree.root_continuations)
        assert float(other[row]) == pytest.approx(root, abs=1e-4)


def test_covered_other_and_uncovered_mass_sum_to_one(tree):
    assert tree.covered > 0 and tree.uncovered > 0
    assert tree.covered + tree.other + tree.uncovered == pytest.approx(1.0, abs=1e-5)
    assert sum(tree.mass) == pytest.approx(tree.covered, rel=1e-5)
    assert len(set(tree.paths)) == len(tree.paths)


def test_expansion_is_deterministic_and_respects_the_budget(tiny_model, grammar, tree):
    again = expand(tiny_model, tokenize(tiny_model, PROMPTS), grammar, **BUDGET)
    assert again.paths == tree.paths and tree.n_evaluated == 20
    small = expand(tiny_model, tokenize(tiny_model, PROMPTS), grammar, max_nodes=20, per_round=6, min_mass=1.0)
    assert small.n_evaluated == 1 and small.paths == ()  # only the root holds that much


def test_stop_terms_are_differentiable(tiny_model, tree):
    cands = dataclasses.replace(tree.candidates(tiny_model.tokenizer, parse_number), packed=True)
    batch = cands.expand(tokenize(tiny_model, PROMPTS))
    tiny_model.zero_grad()
    with torch.enable_grad():
        logits = tiny_model(batch.tokens, **batch.forward_kwargs())
        cands.log_probs(logits, batch).logsumexp(-1).sum().backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    tiny_model.zero_grad()


@pytest.fixture(scope="module")
def trees(tiny_model, grammar):
    return expand_each(tiny_model, tokenize(tiny_model, PROMPTS), grammar, max_nodes=16, per_round=5, target=1.0,
                       min_mass=1e-6)


def test_each_prompt_expands_its_own_tree_exactly(tiny_model, grammar, trees):
    """Per prompt: every answer's probability equals the brute-force token-by-token one, covered + other
    + uncovered sums to 1, and the batched expansion equals expanding the prompt alone."""
    tok = tiny_model.tokenizer
    rng = random.Random(1)
    for prompt, tree in zip(PROMPTS, trees):
        assert tree.n_evaluated == 16 and len(set(tree.paths)) == len(tree.paths)
        assert tree.covered + tree.other + tree.uncovered == pytest.approx(1.0, abs=1e-6)
        assert sum(tree.mass) == pytest.approx(tree.covered, rel=1e-6)
        for i in rng.sample(range(len(tree.paths)), 6):
            brute = _brute_log_prob(tiny_model, prompt, tree.paths[i], tree.ends[i])
            assert np.log(tree.mass[i]) == pytest.approx(brute, abs=2e-4)
        assert tree.other == pytest.approx(np.exp(_brute_log_prob(tiny_model, prompt, (), tree.root_continuations)),
                                           rel=1e-4)
        alone = expand_each(tiny_model, tokenize(tiny_model, [prompt]), grammar, max_nodes=16, per_round=5,
                            target=1.0, min_mass=1e-6)[0]
        assert alone.paths == tree.paths
        assert np.allclose(alone.mass, tree.mass, rtol=1e-4)
    assert trees[0].paths != trees[1].paths  # the prompts' trees differ
    assert all(tok.decode(list(p)) for p in trees[0].paths)


def test_prompts_sharing_a_prefix_expand_as_each_alone(tiny_model, grammar):
    """A batch whose prompts share a long prefix (run once, ``interp.prefix``) gives each prompt the
    tree it gets alone, its answers at their brute-force probabilities."""
    from interp.prefix import prefix_groups

    prompts = ["You are a careful clerk who replies with one number and nothing else. " + p for p in PROMPTS]
    batch = tokenize(tiny_model, prompts)
    rows = [batch.tokens[i, :n].tolist() for i, n in enumerate(batch.lengths.tolist())]
    assert [len(members) for members, shared in prefix_groups(rows, 8) if shared >= 8] == [len(prompts)]
    budget = dict(max_nodes=10, per_round=4, target=1.0, min_mass=1e-6)
    trees = expand_each(tiny_model, batch, grammar, **budget)
    for prompt, tree in zip(prompts, trees):
        alone = expand_each(tiny_model, tokenize(tiny_model, [prompt]), grammar, **budget)[0]
        assert alone.paths == tree.paths and np.allclose(alone.mass, tree.mass, rtol=1e-4)
        i = int(np.argmax(tree.mass))
        brute = _brute_log_prob(tiny_model, prompt, tree.paths[i], tree.ends[i])
        assert np.log(tree.mass[i]) == pytest.approx(brute, abs=2e-4)


def test_prompt_candidates_score_each_row_on_its_own_trie(tiny_model, trees):
    """Packed rows of different tries (padded to the longest) give each prompt's tree masses, with
    -inf where a row has fewer candidates; the values and the expected value follow each row's set."""
    from interp.metrics import ExpectedValue, PromptCandidates, run_metric

    batch = tokenize(tiny_model, PROMPTS)
    sets = {}
    for key, tree in zip(PromptCandidates.keys(batch), trees):
        cands = tree.candidates(tiny_model.tokenizer, lambda t: parse_number(t) or 0.0)
        sets[key] = cands
    pc = PromptCandidates(sets)
    with torch.no_grad():
        logp, other, expanded = pc.score(tiny_model, batch, other=True)
    for row, tree in enumerate(trees):
        n = len(tree.paths)
        assert torch.isinf(logp[row, n:]).all() and torch.isfinite(logp[row, :n]).all()
        assert np.allclose(logp[row, :n].exp().numpy(), tree.mass, rtol=1e-3, atol=1e-12)
        assert float(other[row].exp()) == pytest.approx(tree.other, rel=1e-4)
    metric = ExpectedValue(pc)
    with torch.no_grad():
        value = run_metric(tiny_model, metric, batch)
        logits = tiny_model(expanded.tokens, **expanded.forward_kwargs())
        direct = metric(logits, expanded)
    for row, tree in enumerate(trees):
        values = np.array([parse_number(tiny_model.tokenizer.decode(list(p))) or 0.0 for p in tree.paths])
        assert float(value[row]) == pytest.approx(float(np.dot(tree.mass, values) / sum(tree.mass)), rel=1e-3)
    assert torch.allclose(value, direct, rtol=1e-4)
    with pytest.raises(KeyError):
        PromptCandidates({}).expand(batch)


@pytest.mark.parametrize("text,fill,low,mid,high", [
    ("12,5", "50", 12500, 12550, 12600), ("32,", None, 0, 0, 0), ("32,1", "50", 32100, 32150, 32200),
    ("12,500", ".50", 12500, 12500.5, 12501),
    ("1,234,5", "50", 1234500, 1234550, 1234600), ("5.2", "5", 5.2, 5.25, 5.3), ("5.", "50", 5, 5.5, 6),
    ("100,000.", "50", 100000, 100000.5, 100001), ("26", None, 0, 0, 0), ("1234", None, 0, 0, 0), (" ", None, 0, 0, 0),
    ("", None, 0, 0, 0), ("5 mi", None, 0, 0, 0), ("5k", None, 0, 0, 0)])
def test_fill_places_a_partial_number_at_the_middle_of_its_range(grammar, text, fill, low, mid, high):
    """Where the digits fix the magnitude (in a thousands group, in the decimals), ``fill`` completes
    the number to the middle of the range of every number it starts (its digits zeroed: the range's
    low end); elsewhere more digits could still scale it and there is no range."""
    assert grammar.fill(grammar.state_of(text)) == fill
    if fill is not None:
        assert parse_number(text + fill) == pytest.approx(mid)
        assert parse_number(text + "".join("0" if c.isdigit() else c for c in fill)) == pytest.approx(low)
        assert 2 * mid - low == pytest.approx(high)


def test_bounded_answers_hold_the_probability_of_every_number_they_start(tiny_model, grammar):
    """A bounded answer is the partial number's prefix probability (no stop term), is never extended
    by another covered answer, and has the fill and significant digits it was filed under; covered +
    other + uncovered still sums to 1. Without ``significant`` nothing is bounded."""
    tok = tiny_model.tokenizer
    trees = expand_each(tiny_model, tokenize(tiny_model, PROMPTS), grammar, max_nodes=16, per_round=5, target=1.0,
                        min_mass=1e-6, significant=1)
    for prompt, tree in zip(PROMPTS, trees):
        bounded = [i for i, f in enumerate(tree.fills) if f is not None]
        assert bounded and len(bounded) < len(tree.paths)
        assert tree.bounded == pytest.approx(sum(tree.mass[i] for i in bounded), rel=1e-9)
        assert tree.covered + tree.other + tree.uncovered == pytest.approx(1.0, abs=1e-6)
        for i in bounded:
            path = tree.paths[i]
            assert tree.ends[i] is None
            assert not any(p != path and p[: len(path)] == path for p in tree.paths)
            text = tok.decode(list(path))
            assert grammar.fill(grammar.state_of(text)) == tree.fills[i]
            assert any(c in "123456789" for c in text)
        for i in bounded[:3]:
            brute = _brute_log_prob(tiny_model, prompt, tree.paths[i], None)
            assert np.log(tree.mass[i]) == pytest.approx(brute, abs=2e-4)
    exact = expand_each(tiny_model, tokenize(tiny_model, PROMPTS[:1]), grammar, max_nodes=16, per_round=5,
                        target=1.0, min_mass=1e-6)[0]
    assert set(exact.fills) == {None} and exact.bounded == 0.0


def test_bounded_answers_worth_more_than_the_frontier_are_refined(tiny_model, grammar, monkeypatch):
    """With refinement outranking everything (``REFINE`` huge), a bounded answer is evaluated before
    any unexpanded node: it leaves the covered answers, its stop answer and its digits' answers
    replace it, with exact masses and a total that still sums to 1."""
    import interp.numeric as numeric

    monkeypatch.setattr(numeric, "REFINE", 1e9)
    tree = expand_each(tiny_model, tokenize(tiny_model, PROMPTS[:1]), grammar, max_nodes=24, per_round=4,
                       target=1.0, min_mass=1e-12, significant=1)[0]
    tok = tiny_model.tokenizer
    refined = [p for p in tree.paths if any(grammar.fill(grammar.state_of(tok.decode(list(p[:d])))) is not None
                                            for d in range(1, len(p)))]
    assert refined  # answers under a bounded prefix: that prefix was refined
    for path in refined:  # a refined prefix is left only as its own stop answer (the number ends there)
        assert all(f is None for q, f in zip(tree.paths, tree.fills) if q == path[: len(q)] and q != path)
    assert tree.covered + tree.other + tree.uncovered == pytest.approx(1.0, abs=1e-6)
    assert sum(tree.mass) == pytest.approx(tree.covered, rel=1e-6)
    for path in refined[:3]:
        i = tree.paths.index(path)
        assert np.log(tree.mass[i]) == pytest.approx(_brute_log_prob(tiny_model, PROMPTS[0], path, tree.ends[i]),
                                                     abs=2e-4)


def test_numbers_already_past_the_top_are_one_answer_each(tiny_model, grammar, monkeypatch):
    """With ``top``, a partial number whose leading digits exceed it is one bounded answer with the
    fill "" (its prefix probability; never extended, never refined even when refinement outranks
    everything); every number evaluated further starts at or below the top."""
    import re

    import interp.numeric as numeric

    monkeypatch.setattr(numeric, "REFINE", 1e9)
    tok = tiny_model.tokenizer
    trees = expand_each(tiny_model, tokenize(tiny_model, PROMPTS), grammar, max_nodes=16, per_round=5, target=1.0,
                        min_mass=1e-6, significant=1, top=5)
    for prompt, tree in zip(PROMPTS, trees):
        past = [i for i, f in enumerate(tree.fills) if f == ""]
        assert past and tree.covered + tree.other + tree.uncovered == pytest.approx(1.0, abs=1e-6)
        for i in past:
            path, text = tree.paths[i], tok.decode(list(tree.paths[i]))
            assert tree.ends[i] is None and int(re.search(r"\d+", text).group()) > 5
            assert not any(p != path and p[: len(path)] == path for p in tree.paths)
        for i in past[:3]:
            assert np.log(tree.mass[i]) == pytest.approx(_brute_log_prob(tiny_model, prompt, tree.paths[i], None),
                                                         abs=2e-4)
        stops = [re.search(r"\d+", tok.decode(list(p))) for p, e in zip(tree.paths, tree.ends) if e is not None]
        assert stops and all(int(m.group()) <= 5 for m in stops if m)


def test_answers_that_need_no_forward_are_kept_down_to_min_answer(tiny_model, grammar):
    """Under ``min_mass``, final and bounded answers are kept down to ``min_answer`` while partial
    numbers are still dropped: the same nodes are evaluated, every answer of the default run is kept
    with the same mass, and the extra answers (no stop term, each under ``min_mass``) are exact and
    move mass from uncovered to covered."""
    batch = tokenize(tiny_model, PROMPTS)
    budget = {"max_nodes": 12, "per_round": 4, "target": 1.0, "min_mass": 2e-3, "significant": 1}
    plain = expand_each(tiny_model, batch, grammar, **budget)
    kept = expand_each(tiny_model, batch, grammar, min_answer=1e-12, **budget)
    for prompt, a, b in zip(PROMPTS, plain, kept):
        assert b.n_evaluated == a.n_evaluated
        at = {p: m for p, m in zip(b.paths, b.mass)}
        assert all(at[p] == pytest.approx(m, rel=1e-6) for p, m in zip(a.paths, a.mass))
        extra = [i for i, p in enumerate(b.paths) if p not in set(a.paths)]
        assert extra and all(b.ends[i] is None and b.mass[i] < 2e-3 * (1 - b.other) for i in extra)
        assert b.covered > a.covered and b.uncovered < a.uncovered
        assert b.covered + b.other + b.uncovered == pytest.approx(1.0, abs=1e-6)
        for i in extra[:3]:
            assert np.log(b.mass[i]) == pytest.approx(_brute_log_prob(tiny_model, prompt, b.paths[i], None), abs=2e-4)


@pytest.mark.slow
def test_smollm2_prompts_sharing_their_chat_header_expand_as_each_alone(smollm2):
    """On SmolLM2's chat prompts (system prompt and header shared, run once): each prompt's tree in a
    batch equals its tree alone, answers and probabilities."""
    from circuits.inputs.prompts import build_prompts
    from circuits.measure.bias import _grammar, number_start
    from interp.batching import pad_ids, pad_token_id
    from interp.prefix import prefix_groups

    prompts = build_prompts(smollm2, ["lending_amount"], details=["low"], seed=0)
    texts = list(prompts.texts[:4])
    start = number_start(prompts.answers["lending_amount"].prefix)
    grammar = _grammar(smollm2.tokenizer, "dollars")
    rows = [encode(smollm2, t) for t in texts]
    assert [shared >= 20 for _, shared in prefix_groups(rows, 8)] == [True]
    budget = dict(start=start, max_nodes=24, per_round=8, target=1.0, min_mass=1e-4, significant=2)
    batch = pad_ids(rows, pad_token_id(smollm2.tokenizer))
    for row, tree in zip(rows, expand_each(smollm2, batch, grammar, **budget)):
        alone = expand_each(smollm2, pad_ids([row], pad_token_id(smollm2.tokenizer)), grammar, **budget)[0]
        assert alone.paths == tree.paths and alone.fills == tree.fills
        np.testing.assert_allclose(tree.mass, alone.mass, rtol=1e-3, atol=1e-7)
