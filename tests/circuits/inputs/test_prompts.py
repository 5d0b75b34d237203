
import pytest
import torch

from circuits.inputs.contexts import CONTEXTS, DETAILS
from circuits.inputs.names import all_names
from circuits.inputs.prompts import build_pairs, build_prompts, format_prompt, select_prompts, tokenize_prompts


@pytest.fixture(scope="module")
def prompts(tiny_model):
    return build_prompts(tiny_model, ["chess", "lending_amount"])


def test_every_template_detail_and_name_once(prompts):
    n_names = len(all_names())
    assert len(prompts) == 2 * 7 * len(DETAILS) * n_names
    assert not prompts.frame.duplicated(["context", "variation", "detail", "name"]).any()
    assert set(prompts.contexts) == {"chess", "lending_amount"}


def test_chat_template_applied_and_answer_prefix_last(tiny_model, prompts):
    row = prompts.frame.iloc[0]
    prefix = CONTEXTS[row["context"]].answer.prefix
    opened = tiny_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": row["user_text"]}], tokenize=False, add_generation_prompt=True
    )
    assert row["prompt_text"] == opened + prefix
    assert all(
        t.endswith("<|im_start|>assistant\n" + CONTEXTS[c].answer.prefix)
        for t, c in zip(prompts.frame["prompt_text"], prompts.frame["context"])
    )
    plain = format_prompt(tiny_model, "Question?", "Answer: $", chat=False)
    assert plain == "Question?\nAnswer: $"
    base = build_prompts(tiny_model, ["chess"], details=["low"], chat=False)
    assert not base.chat and "<|im_start|>" not in base.frame["prompt_text"].iloc[0]


def test_splits_filters_and_samples(prompts):
    train, held = prompts.split("variation")
    for ctx in prompts.contexts:
        t = set(train.filter(context=ctx).frame["variation"])
        h = set(held.filter(context=ctx).frame["variation"])
        assert t and h and not t & h and len(h) == 2
    n_train, n_held = prompts.split("name")
    assert not set(n_train.frame["name"]) & set(n_held.frame["name"])
    assert set(n_held.frame.groupby(["group", "gender"]).size().index) == {
        (g, s) for g in ("White", "Black") for s in ("man", "woman")
    }
    assert set(prompts.filter(detail=["low", "numeric"]).frame["detail"]) == {"low", "numeric"}
    small = select_prompts(prompts, variations=3, names_per_cell=1, seed=0)
    assert len(small) == 2 * 3 * len(DETAILS) * 4 * 2  # contexts x variations x details x cells x name splits
    assert small.frame.groupby(["context", "variation_split"])["variation"].nunique().to_dict() == {
        (c, split): n for c in small.contexts for split, n in (("heldout", 1), ("train", 2))}
    assert small.frame.equals(select_prompts(prompts, variations=3, names_per_cell=1, seed=0).frame)
    with pytest.raises(ValueError, match="no prompt matches"):
        prompts.filter(context="sports")
    with pytest.raises(ValueError, match="cannot filter"):
        prompts.filter(colour="red")


def test_name_mask_marks_exactly_the_name(tiny_model, prompts):
    subset = prompts.filter(context="lending_amount", variation="bakery", detail="low")
    batch, mask = tokenize_prompts(tiny_model, subset)
    assert mask.shape == batch.tokens.shape
    for row, name in enumerate(subset.frame["name"]):
        decoded = tiny_model.tokenizer.decode(batch.tokens[row][mask[row]])
        assert decoded.strip() == name


def test_every_name_pairs_aligned_on_the_name_span(tiny_model, prompts):
    subset = prompts.filter(detail="low", variation=["bakery", "club"])
    pairs = build_pairs(tiny_model, subset)
    assert pairs.clean.tokens.shape == pairs.corrupt.tokens.shape == pairs.name_mask.shape
    assert torch.equal(pairs.clean.answer_pos, pairs.corrupt.answer_pos)
    assert torch.equal(pairs.clean.attention_mask, pairs.corrupt.attention_mask)
    same = pairs.clean.tokens == pairs.corrupt.tokens
    assert (same | pairs.name_mask).all()  # differ only inside the name span
    assert (~same & pairs.clean.attention_mask.bool()).any(-1).all()  # every pair changes the name
    frame = pairs.to_dataframe()
    assert (frame["gender_a"] == frame["gender_b"]).all()
    assert set(subset.frame.set_index("prompt_id").loc[frame["prompt_id_a"], "group"]) == {"White"}
    assert set(subset.frame.set_index("prompt_id").loc[frame["prompt_id_b"], "group"]) == {"Black"}
    # Coverage: combinations = White x Black names of each gender; every combination pairs (the
    # templates hold the name as a word of its own), and some pair names of unequal token length.
    batch, mask = tokenize_prompts(tiny_model, subset)
    by_id = {pid: i for i, pid in enumerate(subset.frame["prompt_id"])}
    length = {pid: int(batch.lengths[i]) for pid, i in by_id.items()}
    unequal = int((frame["prompt_id_a"].map(length) != frame["prompt_id_b"].map(length)).sum())
    coverage = pairs.coverage().set_index("context")
    rows = subset.frame
    per_gender = rows.drop_duplicates("name").groupby(["gender", "group"]).size().unstack()
    expected = int((per_gender["White"] * per_gender["Black"]).sum()) * 2  # two templates
    assert coverage.loc["all", "combinations"] == coverage.loc["all", "aligned"] == expected == len(pairs)
    assert coverage.loc["all", "same_length"] == expected - unequal and unequal > 0
    # fillers (hidden from the answer position) pad the shorter name: on each side the visible
    # tokens of the span are its own name's, and the visible tokens of the row its own prompt
    for row in range(len(pairs)):
        for side, rows in (("a", pairs.clean), ("b", pairs.corrupt)):
            pid = frame.at[row, f"prompt_id_{side}"]
            own = batch.tokens[by_id[pid]]
            visible = rows.key_mask[row, rows.answer_pos[row]].clone()
            visible[rows.answer_pos[row] + 1:] = False
            assert torch.equal(rows.tokens[row][pairs.name_mask[row] & visible], own[mask[by_id[pid]]])
            assert torch.equal(rows.tokens[row][visible], own[: length[pid]])
            fillers = int((pairs.name_mask[row] & ~visible[: rows.tokens.shape[1]]).sum())
            assert fillers == frame.at[row, f"n_fillers_{side}"]
    capped = build_pairs(tiny_model, subset, max_pairs_per_cell=3)
    assert (capped.cells["kept"] <= 3).all()
    assert capped.coverage().set_index("context").loc["all", "aligned"] == expected


def test_span_aligned_rows_compute_what_their_prompts_compute(tiny_model, prompts):
    """Fillers are invisible: each padded row's metric (multi-token candidates, packed) equals its
    unpadded prompt's, and AtP on the pairs runs with finite scores."""
    from circuits.evaluate.evaluation import EvalSet
    from circuits.inputs.prompts import span_aligned
    from circuits.select.scoring import score_context
    from interp.metrics import CandidateAnswers, ExpectedValue, PromptCandidates, run_metric

    subset = prompts.filter(detail="low", variation="bakery", context="lending_amount")
    pairs = build_pairs(tiny_model, subset, max_pairs_per_cell=4, seed=1)
    frame = pairs.to_dataframe()
    padded = ((frame["n_fillers_a"] + frame["n_fillers_b"]) > 0).to_numpy()
    assert padded.any() and pairs.clean.key_mask is not None
    grid = CandidateAnswers.from_texts(tiny_model.tokenizer, [" 5", " 50", " 1,000"], [0.0, 50.0, 1000.0])
    metric = ExpectedValue(grid)
    assert grid.n_nodes > 0  # a trie after the prompt: the layouts compose
    batch, _ = tokenize_prompts(tiny_model, subset)
    by_id = {pid: i for i, pid in enumerate(subset.frame["prompt_id"])}
    with torch.no_grad():
        for side, rows in (("a", pairs.clean), ("b", pairs.corrupt)):
            got = run_metric(tiny_model, span_aligned(metric), rows)
            own = batch.select(torch.tensor([by_id[p] for p in frame[f"prompt_id_{side}"]]))
            want = run_metric(tiny_model, metric, own)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            # without the layout the fillers would be read as tokens: a different value
            plain = run_metric(tiny_model, metric, type(rows)(rows.tokens, rows.attention_mask, rows.answer_pos))
            fill = torch.tensor((frame[f"n_fillers_{side}"] > 0).to_numpy())
            if fill.any():
                assert not torch.allclose(plain[fill], want[fill], rtol=1e-4, atol=1e-4)
        # per-prompt answers looked up by the prompt's tokens: a padded row finds its prompt's
        per_prompt = ExpectedValue(PromptCandidates({key: grid for key in PromptCandidates.keys(batch)}))
        torch.testing.assert_close(run_metric(tiny_model, span_aligned(per_prompt), pairs.clean),
                                   run_metric(tiny_model, span_aligned(metric), pairs.clean), rtol=1e-4, atol=1e-4)
    scores = score_context(tiny_model, EvalSet("lending_amount", pairs, metric), refine_top=4, progress=False)
    assert all(torch.isfinite(v).all() for v in scores.scores.values())
    assert scores.settings["n_padded"] == int(padded.sum())
    refined = scores.refined
    assert refined is not None and len(refined) == 4 and refined["exact"].notna().all()
