"""Each figure function: a Figure with the expected panels and marks for small synthetic frames; clear errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection, QuadMesh
from matplotlib.figure import Figure

from circuits.report import plots

RNG_SEED = 0
CONTEXTS = ["hiring", "purchase", "chess"]
STRATEGIES = ["atp", "random"]


def heads_frame(n_layers=4, n_heads=3) -> pd.DataFrame:
    rng = np.random.default_rng(RNG_SEED)
    rows = [("head", layer, head, rng.normal()) for layer in range(n_layers) for head in range(n_heads)]
    return pd.DataFrame(rows, columns=["kind", "layer", "index", "score"])


def neurons_frame(n_layers=30, d_mlp=1536) -> pd.DataFrame:
    rng = np.random.default_rng(RNG_SEED)
    return pd.DataFrame({
        "kind": "neuron",
        "layer": np.repeat(np.arange(n_layers), d_mlp),
        "index": np.tile(np.arange(d_mlp), n_layers),
        "score": rng.standard_t(3, n_layers * d_mlp),
    })


def sparsity_frame(ks=(1, 10, 100, 1000), band=True) -> pd.DataFrame:
    rows = []
    for context in CONTEXTS[:2]:
        rows.append({"strategy": "none", "k": 0, "eval_context": context, "bias": 0.5})
        for s, strategy in enumerate(STRATEGIES):
            for k in ks:
                bias = 0.5 / (1 + (s + 1) * k / 100)
                rows.append({"strategy": strategy, "k": k, "eval_context": context, "bias": bias,
                             "bias_lo": bias - 0.05, "bias_hi": bias + 0.05})
    frame = pd.DataFrame(rows)
    return frame if band else frame.drop(columns=["bias_lo", "bias_hi"])


def generalization_frame() -> pd.DataFrame:
    return pd.DataFrame([
        {"strategy": s, "train_context": a, "eval_context": b, "share_removed": 0.5 if a == b else 0.1 * (i - 1)}
        for i, s in enumerate(STRATEGIES) for a in CONTEXTS for b in reversed(CONTEXTS)
    ])


def overlap_frame() -> pd.DataFrame:
    pairs = [("hiring", "purchase", 0.4), ("hiring", "chess", 0.2), ("purchase", "chess", 0.3)]
    rows = [{"context_a": a, "context_b": b, "stat": "jaccard", "value": v, "null_mean": 0.1} for a, b, v in pairs]
    rows.append({"context_a": "hiring", "context_b": "chess", "stat": "spearman", "value": -0.2, "null_mean": 0.0})
    return pd.DataFrame(rows)


def jaccard_frame() -> pd.DataFrame:
    return pd.DataFrame([
        {"pair": pair, "k": k, "jaccard": 0.1 + 0.1 * p + k / 2000, "null_mean": k / 5000,
         "null_lo": k / 8000, "null_hi": k / 3000}
        for p, pair in enumerate(["hiring / purchase", "hiring / chess"]) for k in (10, 30, 100, 300)
    ])


def shared_frame() -> pd.DataFrame:
    return pd.DataFrame({"context": CONTEXTS, "full_share": [0.6, 0.5, 0.4],
                         "shared_share": [0.3, 0.1, 0.35]})


def utility_frame() -> pd.DataFrame:
    rows = [{"strategy": s, "k": k, "kl": k * 1e-4 * (i + 1), "share_removed": k / 1000}
            for i, s in enumerate(STRATEGIES) for k in (1, 10, 100, 1000)]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=RNG_SEED)  # shuffled: lines must follow k


def audit_frame() -> pd.DataFrame:
    return pd.DataFrame([
        {"context": c, "comparison": comp, "gap": g, "gap_lo": g - 0.1, "gap_hi": g + 0.1}
        for i, c in enumerate(CONTEXTS)
        for comp, g in (("White - Black", 0.1 * i), ("men - women", -0.1 * i))
    ])


def upset_frame() -> pd.DataFrame:
    return pd.DataFrame({"intersection": ["hiring", "purchase", "hiring & purchase", "hiring & purchase & chess",
                                          "chess"],
                         "size": [40, 30, 12, 3, 0], "null_mean": [45.0, 35.0, 4.0, 0.2, 1.0],
                         "null_low": [40.0, 30.0, 1.0, 0.0, 0.0], "null_high": [50.0, 40.0, 8.0, 1.0, 3.0]})


def profile_frame() -> pd.DataFrame:
    return pd.DataFrame([{"context": c, "kind": kind, "layer": layer, "count": (layer + i) % 4,
                          "score_sum": 0.1 * ((layer + i) % 4)}
                         for i, c in enumerate(CONTEXTS[:2]) for kind in ("neuron", "head") for layer in range(6)])


def card_frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    scores = pd.DataFrame({"context": CONTEXTS, "score": [0.3, -0.1, 0.0], "ci_low": [0.2, -0.3, -0.1],
                           "ci_high": [0.4, 0.1, 0.1]})
    activations = pd.DataFrame([{"context": c, "group": g, "position": p, "mean": 1.0 + j, "ci_low": 0.5 + j,
                                 "ci_high": 1.5 + j} for c in CONTEXTS for j, g in enumerate(("Black", "White"))
                                for p in ("name", "answer")])
    tokens = [("digit", str(d)) for d in range(10)] + [("yes_no", " Yes"), ("yes_no", " No")]
    effects = pd.DataFrame([{"context": c, "answer": a, "token": t, "centred": 0.1 * i - 0.2 * k}
                            for k, c in enumerate(CONTEXTS) for i, (a, t) in enumerate(tokens)])
    return scores, activations, effects


CASES = {  # function, frame builder, required columns
    "attribution_heatmap": (plots.attribution_heatmap, heads_frame, ["kind", "layer", "index", "score"]),
    "top_components": (plots.top_components, heads_frame, ["kind", "layer", "index", "score"]),
    "bias_vs_sparsity": (plots.bias_vs_sparsity, sparsity_frame, ["strategy", "k", "eval_context", "bias"]),
    "generalization_matrix": (
        plots.generalization_matrix, generalization_frame, ["train_context", "eval_context", "share_removed"]
    ),
    "overlap_matrix": (plots.overlap_matrix, overlap_frame, ["context_a", "context_b", "stat", "value"]),
    "jaccard_curves": (plots.jaccard_curves, jaccard_frame, ["pair", "k", "jaccard"]),
    "shared_specific": (plots.shared_specific, shared_frame, ["context", "full_share", "shared_share"]),
    "utility_cost": (plots.utility_cost, utility_frame, ["strategy", "k", "kl", "share_removed"]),
    "audit_gaps": (plots.audit_gaps, audit_frame, ["context", "gap", "gap_lo", "gap_hi"]),
    "upset": (plots.upset, upset_frame, ["intersection", "size"]),
    "layer_profile": (plots.layer_profile, profile_frame, ["context", "layer", "count"]),
}
REQUIRED = [(name, column) for name, (_, _, columns) in CASES.items() for column in columns]


@pytest.mark.parametrize("name, column", REQUIRED)
def test_missing_column_names_expected_and_found(name, column):
    function, build, required = CASES[name]
    frame = build().drop(columns=[column])
    with pytest.raises(ValueError) as error:
        function(frame)
    message = str(error.value)
    assert f"missing [{column!r}]" in message
    assert str(required) in message and str(list(frame.columns)) in message


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.usefixtures("unchecked")
def test_rejects_non_frames_and_empty_frames(name):
    function, build, _ = CASES[name]
    with pytest.raises(TypeError, match="expects a pandas DataFrame"):
        function(build().to_dict("records"))
    with pytest.raises(ValueError, match="empty DataFrame"):
        function(build().iloc[:0])


def test_head_heatmap_is_layer_by_head_centred_on_zero():
    frame = heads_frame(n_layers=4, n_heads=3).query("not (layer == 2 and index == 1)")
    fig = plots.attribution_heatmap(frame, "head")
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # heatmap + colorbar
    mesh = next(c for c in fig.axes[0].collections if isinstance(c, QuadMesh))
    values = np.ma.filled(mesh.get_array(), np.nan).reshape(4, 3)
    expected = frame.pivot(index="layer", columns="index", values="score").to_numpy()
    np.testing.assert_allclose(values, expected)  # the dropped head is a blank (NaN) cell
    assert mesh.norm.vmin == -mesh.norm.vmax
    assert len(fig.axes[0].texts) == 11  # one annotation per present cell
    assert fig.axes[0].get_xlabel() == "head" and fig.axes[0].get_ylabel() == "layer"


def test_neurons_by_layer_marks_the_top_neurons_at_full_model_size():
    frame = neurons_frame(n_layers=30, d_mlp=1536)
    fig = plots.attribution_heatmap(frame, "neuron", top_n=8)
    (ax,) = fig.axes
    assert len(ax.patches) == 30  # one box per layer
    top = frame.loc[frame["score"].abs().nlargest(8).index]
    assert {t.get_text() for t in ax.texts} == {f"N{r.layer}.{r.index}" for r in top.itertuples()}
    assert fig.get_size_inches()[0] <= 16


def test_attribution_heatmap_refuses_ambiguous_or_absent_kinds():
    doubled = pd.concat([heads_frame(), heads_frame()])
    with pytest.raises(ValueError, match="one row per"):
        plots.attribution_heatmap(doubled)
    with pytest.raises(ValueError, match="kinds present: \\['head'\\]"):
        plots.attribution_heatmap(heads_frame(), "neuron")


def test_top_components_bars_are_top_k_by_magnitude_per_context():
    frame = pd.DataFrame({
        "kind": ["neuron", "head", "neuron", "head"] * 2,
        "layer": [12, 3, 1, 0] * 2,
        "index": [345, 4, 7, 1] * 2,
        "score": [0.5, -0.9, 0.1, 0.3, 0.2, 0.1, -0.8, 0.05],
        "context": ["a"] * 4 + ["b"] * 4,
    })
    fig = plots.top_components(frame, k=3)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    labels = [[t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes]
    assert labels == [["H3.4", "N12.345", "H0.1"], ["N1.7", "N12.345", "H3.4"]]
    assert [len(ax.patches) for ax in fig.axes] == [3, 3]
    assert len(plots.top_components(frame.query("context == 'a'").drop(columns="context"), k=5).axes) == 1


def test_bias_vs_sparsity_lines_bands_baseline_and_log_axis():
    fig = plots.bias_vs_sparsity(sparsity_frame())
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # one panel per eval context
    for ax in fig.axes:
        labels = [line.get_label() for line in ax.get_lines()]
        assert set(STRATEGIES) | {"unpruned"} <= set(labels)
        assert sum(isinstance(c, PolyCollection) for c in ax.collections) == len(STRATEGIES)
        assert ax.get_xscale() == "log"
    narrow = plots.bias_vs_sparsity(sparsity_frame(ks=(2, 4, 8), band=False))
    assert narrow.axes[0].get_xscale() == "linear" and not narrow.axes[0].collections
    with pytest.raises(ValueError, match="go together"):
        plots.bias_vs_sparsity(sparsity_frame().drop(columns="bias_hi"))


def test_bias_vs_sparsity_draws_the_null_band_per_strategy():
    frame = sparsity_frame()
    pruned = frame["strategy"] != "none"
    frame.loc[pruned, "null_lo"], frame.loc[pruned, "null_hi"] = 0.45, 0.55
    fig = plots.bias_vs_sparsity(frame)
    for ax in fig.axes:
        hatched = [c for c in ax.collections if isinstance(c, PolyCollection) and c.get_hatch()]
        assert len(hatched) == len(STRATEGIES)
        assert sum(line.get_linestyle() == ":" for line in ax.get_lines()) == 2 * len(STRATEGIES)
    assert "random sets (null)" in [t.get_text() for t in fig.legends[0].get_texts()]
    with pytest.raises(ValueError, match="go together"):
        plots.bias_vs_sparsity(frame.drop(columns="null_lo"))


def test_generalization_matrix_annotated_fractions_with_aligned_diagonal():
    fig = plots.generalization_matrix(generalization_frame())
    assert len(fig.axes) == len(STRATEGIES) + 1  # one heatmap per strategy + shared colorbar
    ax = fig.axes[0]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    cols = [t.get_text() for t in ax.get_xticklabels()]
    assert rows == CONTEXTS and cols == CONTEXTS  # eval order follows train order
    assert [t.get_text() for t in ax.texts].count("50%") == 3
    one_strategy = generalization_frame().query("strategy == 'atp'").drop(columns="strategy")
    assert len(plots.generalization_matrix(one_strategy).axes) == 2


def test_overlap_matrix_mirrors_pairs_and_annotates_null():
    fig = plots.overlap_matrix(overlap_frame(), stat="jaccard")
    assert len(fig.axes) == 2
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("0.40 (0.10)") == 2 and len(texts) == 6  # 3 pairs, both directions, empty diagonal
    spearman = plots.overlap_matrix(overlap_frame(), stat="spearman")
    mesh = next(c for c in spearman.axes[0].collections if isinstance(c, QuadMesh))
    assert mesh.norm.vmin == -mesh.norm.vmax  # negative statistic: diverging scale around 0
    with pytest.raises(ValueError, match="stats present: \\['jaccard', 'spearman'\\]"):
        plots.overlap_matrix(overlap_frame(), stat="rbo")
    clash = pd.concat([overlap_frame(), pd.DataFrame([{"context_a": "purchase", "context_b": "hiring",
                                                       "stat": "jaccard", "value": 0.9, "null_mean": 0.1}])])
    with pytest.raises(ValueError, match="disagree"):
        plots.overlap_matrix(clash)


def test_jaccard_curves_one_line_and_null_band_per_pair():
    fig = plots.jaccard_curves(jaccard_frame())
    (ax,) = fig.axes
    solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert len(solid) == 2 and len(dotted) == 2
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2
    assert ax.get_ylim() == (0, 1.02)


def test_shared_specific_stacks_shared_and_remaining_parts():
    fig = plots.shared_specific(shared_frame())
    (ax,) = fig.axes
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [0.3, 0.1, 0.35, 0.3, 0.4, 0.05])
    np.testing.assert_allclose([p.get_y() for p in ax.patches[3:]], [0.3, 0.1, 0.35])
    assert [t.get_text() for t in ax.texts] == ["60%", "50%", "40%"]


def test_utility_cost_connects_points_in_order_of_k():
    frame = utility_frame()
    fig = plots.utility_cost(frame)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label() in STRATEGIES}
    assert set(lines) == set(STRATEGIES)
    for i, strategy in enumerate(STRATEGIES):
        np.testing.assert_allclose(lines[strategy].get_xdata(), np.array([1, 10, 100, 1000]) * 1e-4 * (i + 1))
    assert ax.get_xscale() == "log" and len(ax.texts) == len(frame)


def test_audit_gaps_points_with_intervals_per_comparison():
    fig = plots.audit_gaps(audit_frame())
    (ax,) = fig.axes
    assert len(ax.containers) == 2  # one errorbar series per comparison
    for container in ax.containers:
        assert len(container.lines[0].get_xdata()) == len(CONTEXTS)
    assert any(line.get_xdata()[0] == 0 for line in ax.get_lines())  # zero line
    single = plots.audit_gaps(audit_frame().query("comparison == 'White - Black'"))
    assert single.axes[0].get_xlabel() == "gap (White - Black)"
    broken = audit_frame().assign(gap_hi=lambda f: f["gap"] - 1)
    with pytest.raises(ValueError, match="outside \\[gap_lo, gap_hi\\]"):
        plots.audit_gaps(broken)


def test_non_numeric_score_is_reported():
    with pytest.raises(ValueError, match="'score' must be numeric"):
        plots.attribution_heatmap(heads_frame().astype({"score": str}))


def test_upset_bars_dots_and_set_sizes():
    fig = plots.upset(upset_frame(), max_intersections=4)
    bars, dots, sizes = fig.axes
    observed = [p.get_height() for p in bars.patches if p.get_width() == pytest.approx(0.55)]
    assert observed == [40, 30, 12, 3]  # largest first, the empty one cut by max_intersections
    assert [t.get_text() for t in dots.get_yticklabels()] == ["hiring", "purchase", "chess"]
    # set sizes are the sums of each context's exclusive intersections
    assert [p.get_width() for p in sizes.patches] == [55, 45, 3]
    assert len(dots.get_lines()) == 4  # one connector per shown intersection
    with pytest.raises(ValueError, match="go together"):
        plots.upset(upset_frame().drop(columns=["null_high"]))


def test_component_card_panels_and_checks():
    scores, activations, effects = card_frames()
    fig = plots.component_card(scores, activations, effects, title="N1.7")
    assert len(fig.axes) == 4 and fig._suptitle.get_text() == "N1.7"
    score_ax, act_ax, digit_ax, yes_ax = fig.axes
    assert [t.get_text() for t in score_ax.get_yticklabels()] == CONTEXTS
    assert len(act_ax.get_yticklabels()) == 6  # context x position
    assert len(digit_ax.patches) == 30 and len(yes_ax.patches) == 6  # tokens x contexts
    with pytest.raises(ValueError, match="missing \\['centred'\\]"):
        plots.component_card(scores, activations, effects.drop(columns=["centred"]))
    with pytest.raises(ValueError, match="one row per"):
        plots.component_card(pd.concat([scores, scores]), activations, effects)


def test_layer_profile_counts_and_scores_per_kind():
    fig = plots.layer_profile(profile_frame())
    assert len(fig.axes) == 4  # (count, score) x (neuron, head)
    assert all(len(ax.get_lines()) == 3 for ax in fig.axes)  # two contexts and the zero line
    counts = profile_frame().query("kind == 'neuron' and context == 'hiring'")["count"].tolist()
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), counts)
    neurons = profile_frame().query("kind == 'neuron'").drop(columns=["score_sum", "kind"])
    assert len(plots.layer_profile(neurons).axes) == 1  # counts only, one kind
    with pytest.raises(ValueError, match="one row per"):
        plots.layer_profile(profile_frame().drop(columns=["kind"]))
