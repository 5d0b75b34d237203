"""The study's report: tables and figures from every stage, as one HTML file and Markdown."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from circuits.evaluate import explore
from circuits.evaluate.analysis import load_overlap_tables
from circuits.evaluate.generalization import LEVELS, Generalization
from circuits.measure.audit import AuditResult
from circuits.measure.coverage import coverage_lines, coverage_table
from circuits.report import plots
from circuits.report.html import Section, write_report
from circuits.select.pruning import shape_of_scores
from circuits.study.config import StudyConfig
from interp.components import Component


def _audit_section(audit: AuditResult) -> Section:
    gaps = audit.gaps.to_dataframe()
    shown = gaps.assign(comparison=gaps["group_a"] + " - " + gaps["group_b"])
    # the table is in each context's own units; the figure shows the SMD with the gap's interval
    # divided by the same pooled SD (gap / smd), so contexts share one scale
    pooled_sd = shown["gap"] / shown["smd"]
    fig_df = shown.assign(gap=shown["smd"], gap_lo=shown["ci_low"] / pooled_sd, gap_hi=shown["ci_high"] / pooled_sd)
    table = shown[["context", "comparison", "mean_a", "mean_b", "gap", "ci_low", "ci_high", "smd",
                   "p_permutation", "n_prompts", "mean_grid_mass"]]
    coverage = coverage_table(audit.measurement)
    return Section(
        "Bias audit",
        "Deterministic audit: a summary of the model's exact distribution over each context's answers, "
        "per prompt. `gap` is group A minus group B in the context's units, with a "
        "cluster-bootstrap interval over names and templates; the figure shows the standardized "
        "mean difference so contexts share a scale.\n\n"
        "What share of the model's answers the metric sees (`covered`: the mean probability of the "
        "answers it scores; `other`: replies that do not start an answer of the context's type; `beyond`: "
        "numbers outside the scored set):\n\n"
        + "\n".join(f"- {line}" for line in coverage_lines(audit.measurement)),
        tables=[("Group gaps per context", table.round(4)),
                ("Covered share of the model's answers per context", coverage.round(4))],
        figures=[("audit_gaps", "Standardized mean difference per context, with the gap's interval in pooled SDs",
                  plots.audit_gaps(fig_df[["context", "gap", "gap_lo", "gap_hi", "comparison"]]))],
    )


def _attribution_section(scores: dict) -> Section:
    figures, tables = [], []
    frames = []
    for ctx, s in scores.items():
        df = s.to_dataframe()
        frames.append(df)
        figures.append((f"heads_{ctx}", f"AtP head scores, {ctx} (layer x head)",
                        plots.attribution_heatmap(df, "head")))
        figures.append((f"neurons_{ctx}", f"AtP neuron scores by layer, {ctx}",
                        plots.attribution_heatmap(df, "neuron")))
    both = pd.concat(frames, ignore_index=True)
    figures.append(("top_components", "Top components per context", plots.top_components(both, k=15)))
    top = (both.assign(abs_score=both["score"].abs()).sort_values("abs_score", ascending=False)
           .groupby("context").head(10)[["context", "kind", "layer", "index", "score"]])
    tables.append(("Top 10 components per context (oriented, grid-scaled AtP)", top.round(5)))
    text = ("Attribution patching of each context's metric over its training pairs. Scores are oriented "
            "(positive: carries the measured gap) and divided by the width of the answer grid.")
    return Section("Component attribution", text, tables=tables, figures=figures)


def _pruning_sections(gen: Generalization) -> list[Section]:
    frame = gen.frame
    own = frame[(frame["level"] == "L1") | ((frame["strategy"] == "none") & (frame["split"] == "heldout"))]
    curves = own.assign(bias=own["gap"], bias_lo=own["after_low"], bias_hi=own["after_high"])
    if "null_low" in own:
        curves = curves.assign(null_lo=own["baseline_gap"] + own["null_low"],
                               null_hi=own["baseline_gap"] + own["null_high"])
    curves = curves[[c for c in ("strategy", "k", "eval_context", "bias", "bias_lo", "bias_hi", "null_lo", "null_hi")
                     if c in curves]]
    columns = ["strategy", "k", "eval_context", "baseline_gap", "gap", "delta_gap", "delta_low", "delta_high",
               "share_removed", "share_low", "share_high", "overshoot", "null_low", "null_high", "outside_null",
               "reduction", "mde", "n_prompts", "n_names", "kl", "perplexity", "n_components"]
    sections = [Section(
        "Bias vs sparsity",
        "Gap (group A minus group B) on each context's held-out templates and names (L1) after ablating the "
        "components found on its training split, per strategy, with its 95% two-way cluster bootstrap interval "
        "over names x templates; the hatched band is the same for random sets of the same kind and size (the "
        "null), the dashed line the unablated model. delta_gap = gap after - gap before (paired), share_removed "
        "= -delta_gap / gap before; overshoot marks a gap that changed sign beyond its interval; a strategy "
        "works only outside its null band. reduction (1 - |after| / |before|) is kept as a secondary column; "
        "mde is the smallest change of the gap detectable at 80% power.",
        tables=[("Held-out (L1) results", own[[c for c in columns if c in own]].round(4))],
        figures=[("bias_vs_sparsity", "Gap vs number of ablated components", plots.bias_vs_sparsity(curves))],
    )]
    matrix = gen.matrix(value="share_removed")
    largest = matrix.groupby("strategy")["k"].transform("max")
    matrix = matrix[matrix["k"] == largest]
    held_out = frame[frame["level"].isin(["L1", "L2"])]
    cross = held_out[[c for c in ("strategy", "k", "train_context", "eval_context", "level", "delta_gap", "delta_low",
                                  "delta_high", "share_removed", "null_low", "null_high", "outside_null", "overshoot")
                      if c in held_out]]
    sections.append(Section(
        "Generalization",
        "Change of the gap (delta_gap, 95% two-way cluster interval) on held-out variations: L1 on the context "
        "the set was found on, L2 on the other contexts, with the random-set null band where it was drawn "
        f"(null_levels: {', '.join(gen.settings.get('null_levels', LEVELS))}). The matrix "
        "shows the signed share of the gap removed (-delta_gap / gap before; above 100% the gap changed sign) "
        "at each strategy's largest k: the diagonal is L1, off-diagonal cells are L2.",
        tables=[("Held-out change of the gap, L1 and L2", cross.round(4))],
        figures=[("generalization_matrix", "Train context x eval context share of the gap removed",
                  plots.generalization_matrix(matrix[["strategy", "train_context", "eval_context",
                                                      "share_removed"]]))],
    ))
    pruned = frame[frame["strategy"] != "none"]
    levels = pruned.groupby(["strategy", "k", "level"], as_index=False)[["delta_gap", "share_removed"]].mean()
    sections.append(Section(
        "Generalization levels",
        "Mean change of the gap and share removed per level: L0 the scored prompts, names = held-out names, "
        "L1 held-out variations, L2 other contexts.",
        tables=[("Mean delta_gap per level", levels.pivot_table(index=["strategy", "k"], columns="level",
                                                                values="delta_gap").round(4).reset_index()),
                ("Mean share removed per level", levels.pivot_table(index=["strategy", "k"], columns="level",
                                                                    values="share_removed").round(3).reset_index())],
    ))
    if "mde" in frame:
        sections.append(Section(
            "Power",
            "Per evaluation set of the unablated model: the gap, its two-way cluster bootstrap SD over names x "
            "templates, and the minimum detectable delta (MDE) of a two-sided 5% test at 80% power, "
            "(z_0.975 + z_0.80) x SD (a normal approximation that takes the SD of a change to be the gap's). A "
            "delta_gap smaller than the MDE cannot be told from noise with these prompts.",
            tables=[("Minimum detectable delta", gen.power().round(4))],
        ))
    util = frame[frame["level"] == "L1"].groupby(["strategy", "k"], as_index=False).agg(
        kl=("kl", "first"), share_removed=("share_removed", "mean"))
    sections.append(Section(
        "Utility cost",
        "KL divergence from the unablated model on neutral text against the held-out (L1) share of the gap "
        "removed (mean over the contexts a strategy's sets were found on).",
        tables=[("Utility and share removed", util.round(4))],
        figures=[("utility_cost", "Share of the gap removed vs utility cost", plots.utility_cost(util))],
    ))
    return sections


def _overlap_sections(tables: dict[str, pd.DataFrame]) -> list[Section]:
    out = []
    pairwise = tables["pairwise"]
    if len(pairwise):
        figures = []
        for kind in ("neuron", "head"):
            rows = pairwise[(pairwise["kind"] == kind) & (pairwise["stat"] == "jaccard")]
            figures.append((f"overlap_{kind}", f"Top-k {kind} Jaccard between contexts (random-set null mean)",
                            plots.overlap_matrix(rows[["context_a", "context_b", "stat", "value", "null_mean"]])))
        curves = tables["jaccard_curves"]
        figures.append(("jaccard_curves", "Jaccard of top-k neuron sets over k (chance band)",
                        plots.jaccard_curves(
                            curves[curves["kind"] == "neuron"][["pair", "k", "jaccard", "null_mean"]])))
        perm = tables["permutation"]
        out.append(Section(
            "Overlap across contexts",
            "How much of each context's top-k set is shared with another's: Jaccard, rank-biased overlap and "
            "Spearman of the full score vectors, against random sets with the same per-layer counts; and a "
            "label-permutation test (small p: less overlap than exchangeable prompts would give).",
            tables=[("Pairwise overlap", pairwise.round(4)), ("Label-permutation tests", perm.round(4))],
            figures=figures,
        ))
    shared = tables["shared_specific"]
    if len(shared):
        figures = []
        for kind in shared["kind"].unique():
            rows = shared[shared["kind"] == kind]
            rows = rows[rows["k"] == rows["k"].max()]
            figures.append((f"shared_specific_{kind}", f"Shared vs context-specific share of the gap removed ({kind}s)",
                            plots.shared_specific(rows[["context", "full_share", "shared_share"]])))
        out.append(Section(
            "Shared vs context-specific",
            "Held-out (L1) change of the gap by each context's own top-k set (full) and by the components common "
            "to the training contexts alone (shared), with 95% intervals, and the signed shares of the gap they "
            "remove; the rest needs context-specific components. reduction columns: the old ratio (secondary).",
            tables=[("Decomposition", shared.round(4))],
            figures=figures,
        ))
    return out


def _label(row) -> str:
    return str(Component(row["kind"], int(row["layer"]), int(row["index"])))


def exploration_sections(comparison: explore.SetComparison, profile: pd.DataFrame,
                         cards: Mapping[str, explore.ComponentCard | pd.DataFrame]) -> list[Section]:
    """Set comparison (UpSet figure, intersections, their effects when measured, components linked to their
    cards), layer profile, and one section per card: a ``ComponentCard``, or only its scores table."""
    members = comparison.membership
    members = members.assign(component=members.apply(_label, axis=1))[["component", "intersection", "kind", "layer",
                                                                       "index"]]
    tables = [("Exclusive intersections and their random-set null", comparison.table.round(4)),
              ("Components by intersection (a linked component has a card below)", members)]
    if comparison.effects is not None:
        tables.insert(1, ("Each intersection ablated alone", comparison.effects.round(4)))
    sections = [Section(
        "Set comparison",
        "Each intersection holds the components in the sets of exactly these contexts and no other, against "
        "random sets of each context's kind and size (neurons per layer); p is one-sided (at least as large).",
        tables=tables,
        figures=[("upset", "Exclusive intersections of the contexts' sets", plots.upset(comparison.table))],
    ), Section(
        "Layer profile",
        "Per layer: how many of each context's components sit there and how much of its score they carry.",
        tables=[("Layer profile", profile.round(6))],
        figures=[("layer_profile", "Components and summed score per layer", plots.layer_profile(profile))],
    )]
    for label, card in cards.items():
        if isinstance(card, pd.DataFrame):
            sections.append(Section(f"Component {label}", "Its score in every context (95% interval of the "
                                    "first-order estimate).", tables=[("Score per context", card.round(6))], key=label))
            continue
        sections.append(Section(
            f"Component {label}",
            "Its score in every context, its activation by group on the name tokens and at the answer position, "
            "the direct effect of its mean output at the answer position on the answer tokens, its top prompts.",
            tables=[("Score per context", card.scores.round(6)), ("Activation by group", card.activations.round(4)),
                    ("Direct effect on the answer tokens", card.effects.round(4)),
                    ("Top prompts", card.top_prompts.drop(columns=["prompt_text"], errors="ignore").round(4))],
            figures=[(f"card_{label}", f"Component card of {label}", plots.component_card(
                card.scores, card.activations, card.effects, title=f"Component {label}"))],
            key=label,
        ))
    return sections


def _exploration_from_scores(scores: dict, *, k: int, n_null: int, seed: int, n_cards: int = 5) -> list[Section]:
    """The exploration sections from stored scores alone (no model): top-k neuron sets, their layer profile,
    and score cards for the ``n_cards`` components of the union with the highest mean score."""
    if len(scores) < 2:
        return []
    shape = shape_of_scores(next(iter(scores.values())).scores)
    sets = explore.top_sets(scores, min(k, shape.count("neuron")), "neuron")
    comparison = explore.compare_sets(sets, shape, n_null=n_null, seed=seed)
    union = sorted(set().union(*sets.values()))
    mean = {c: sum(float(s.scores[c.kind][c.layer, c.index]) for s in scores.values()) / len(scores) for c in union}
    cards = {str(c): explore.card_scores(scores, c, seed=seed) for c in sorted(union, key=lambda c: -mean[c])[:n_cards]}
    return exploration_sections(comparison, explore.layer_profile(sets, shape, scores), cards)


def write_study_report(out_dir: Path, *, config: StudyConfig, manifest: dict, audit: AuditResult, scores: dict,
                       generalization: Generalization, overlap_dir: Path) -> Path:
    settings = pd.DataFrame({"setting": list(config.to_dict()), "value": [str(v) for v in config.to_dict().values()]})
    sections = [Section("Settings", "The study's configuration.", tables=[("Config", settings)])]
    sections.append(_audit_section(audit))
    sections.append(_attribution_section(scores))
    sections += _pruning_sections(generalization)
    sections += _overlap_sections(load_overlap_tables(overlap_dir))
    sections += _exploration_from_scores(scores, k=config.overlap_k, n_null=config.n_null, seed=config.seed)
    meta = {"model": config.model, "weights": manifest["model"]["weights"], "device": manifest["device"],
            "git commit": manifest.get("git_commit"), "started": manifest["started"]}
    paths = write_report(out_dir, "Bias circuitry study", sections, meta=meta)
    return paths.html
