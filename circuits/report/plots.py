"""The study's figures: one function per figure, each taking a long-form DataFrame and returning a Figure.

Inputs are plain pandas frames with documented columns (the ``.to_dataframe()`` of a result, or any
frame with those columns), so the figures work with any producer. Figures are built as
:class:`matplotlib.figure.Figure` objects without pyplot: nothing is displayed, no global backend or
style is changed, and nothing is saved here (:mod:`circuits.report.html` writes them; notebooks show a
returned Figure as usual). A missing column, a non-numeric value column or ambiguous duplicate rows
raise a ``ValueError`` that names what was expected and what was found.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, PercentFormatter

from interp.components import Component

POSITIVE, NEGATIVE = "#b2182b", "#2166ac"  # sign colours, matching the red/blue ends of "RdBu_r"


# ---------------------------------------------------------------- input checks and layout helpers


def _require(
    df: pd.DataFrame,
    figure: str,
    required: Sequence[str],
    optional: Sequence[str] = (),
    numeric: Sequence[str] = (),
) -> None:
    """Check that ``df`` is a non-empty frame with the ``required`` columns and numeric ``numeric`` ones."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{figure}() expects a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        expected = f"columns {list(required)}" + (f" (optional {list(optional)})" if optional else "")
        raise ValueError(f"{figure}() needs {expected}; missing {missing}; found {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{figure}() got an empty DataFrame; there is nothing to plot")
    for column in numeric:
        if column in df.columns and not pd.api.types.is_numeric_dtype(df[column]):
            raise ValueError(f"{figure}(): column {column!r} must be numeric, got dtype {df[column].dtype}")


def _paired(df: pd.DataFrame, figure: str, lo: str, hi: str) -> bool:
    """Whether the interval columns ``lo``/``hi`` are present (they must come together)."""
    present = [c for c in (lo, hi) if c in df.columns]
    if len(present) == 1:
        raise ValueError(f"{figure}(): columns {lo!r} and {hi!r} go together; found only {present[0]!r}")
    return bool(present)


def _unique(df: pd.DataFrame, figure: str, keys: Sequence[str], hint: str) -> None:
    """Refuse frames where several rows share ``keys`` (the figure would have to guess how to combine them)."""
    clash = df.duplicated(list(keys), keep=False)
    if clash.any():
        example = df.loc[clash, list(keys)].iloc[0].to_dict()
        raise ValueError(
            f"{figure}() expects one row per {tuple(keys)}, but {int(clash.sum())} rows share their keys "
            f"(e.g. {example}); {hint}"
        )


def _levels(values: pd.Series) -> list:
    """Category levels in a stable order: categorical order if categorical, else first appearance."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        return [c for c in values.cat.categories if (values == c).any()]
    return list(pd.unique(values))


def _palette(levels: Sequence) -> dict:
    colours = sns.color_palette("tab10" if len(levels) <= 10 else "husl", n_colors=len(levels))
    return dict(zip(levels, colours))


def _panels(
    n: int,
    panel: tuple[float, float],
    *,
    ncols: int = 3,
    style: str = "whitegrid",
    sharex: bool = False,
    sharey: bool = False,
) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure with ``n`` panels, at most ``ncols`` per row."""
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    with sns.axes_style(style):
        grid = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex, sharey=sharey)
    axes = list(grid.flat)
    for spare in axes[n:]:
        fig.delaxes(spare)
    for ax in axes[max(0, n - ncols) : n]:  # bottom panel of each column keeps its tick labels
        ax.xaxis.set_tick_params(labelbottom=True)
    return fig, axes[:n]


def _scale_wide(ax: Axes, values: pd.Series, axis: Literal["x", "y"] = "x", ratio: float = 20.0) -> None:
    """Use a log scale (symlog if zero occurs) when non-negative ``values`` span more than ``ratio``."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    positive = v[v > 0]
    if (v < 0).any() or positive.size == 0 or positive.max() / positive.min() < ratio:
        return
    set_scale = ax.set_xscale if axis == "x" else ax.set_yscale
    if (v == 0).any():
        set_scale("symlog", linthresh=float(positive.min()))
    else:
        set_scale("log")


def _label(kind, layer, index) -> str:
    return str(Component(str(kind), int(layer), int(index)))


# ---------------------------------------------------------------- 1. attribution scores


def attribution_heatmap(
    df: pd.DataFrame,
    kind: Literal["head", "neuron"] = "head",
    *,
    top_n: int = 10,
    annotate: bool | None = None,
) -> Figure:
    """Attribution scores of one component kind, laid out by layer.

    Columns: ``kind, layer, index, score`` (one row per component; filter to one context first).
    ``kind="head"``: a layer x head heatmap on a diverging colormap centred on 0, cells annotated when
    ``annotate`` (default: when there are at most 300 cells). ``kind="neuron"``: "neurons by layer",
    one box per layer (box: quartiles, whiskers: 1st-99th percentile, dots: neurons beyond them) with
    the ``top_n`` largest-|score| neurons marked and labelled ``N{layer}.{index}``; it stays readable
    at 30 layers x 1536 neurons.
    """
    _require(df, "attribution_heatmap", ["kind", "layer", "index", "score"], numeric=["layer", "index", "score"])
    if kind not in ("head", "neuron"):
        raise ValueError(f"attribution_heatmap(): kind must be 'head' or 'neuron', got {kind!r}")
    rows = df[df["kind"] == kind]
    if rows.empty:
        raise ValueError(
            f"attribution_heatmap(): no rows with kind == {kind!r}; kinds present: {_levels(df['kind'])}"
        )
    _unique(rows, "attribution_heatmap", ["layer", "index"], "filter to one context / metric before plotting")
    if kind == "head":
        return _head_grid(rows, annotate)
    return _neurons_by_layer(rows, top_n)


def _head_grid(rows: pd.DataFrame, annotate: bool | None) -> Figure:
    grid = rows.pivot(index="layer", columns="index", values="score")
    grid = grid.reindex(
        index=range(int(grid.index.min()), int(grid.index.max()) + 1),
        columns=range(int(grid.columns.min()), int(grid.columns.max()) + 1),
    )
    n_layers, n_heads = grid.shape
    if annotate is None:
        annotate = grid.size <= 300
    limit = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    fig, (ax,) = _panels(1, (min(2.5 + 0.6 * n_heads, 16), min(1.5 + 0.32 * n_layers, 14)), style="white")
    sns.heatmap(
        grid,
        ax=ax,
        cmap="RdBu_r",
        center=0,
        vmin=-limit,
        vmax=limit,
        annot=annotate,
        fmt=".2g",
        annot_kws={"fontsize": 7},
        linewidths=0.4,
        linecolor="white",
        cbar_kws={"label": "attribution score"},
    )
    ax.set(xlabel="head", ylabel="layer", title=f"Head attribution scores ({n_layers} layers x {n_heads} heads)")
    ax.tick_params(axis="y", labelrotation=0)
    return fig


def _neurons_by_layer(rows: pd.DataFrame, top_n: int) -> Figure:
    layers = sorted(rows["layer"].unique())
    fig, (ax,) = _panels(1, (max(6.5, 2.0 + 0.38 * len(layers)), 5.0))
    sns.boxplot(
        data=rows,
        x="layer",
        y="score",
        native_scale=True,
        whis=(1, 99),
        color="0.85",
        linewidth=0.8,
        fliersize=1.5,
        flierprops={"alpha": 0.35},
        ax=ax,
    )
    ax.axhline(0, color="0.4", linewidth=0.8, zorder=0)
    top = (
        rows.assign(_magnitude=rows["score"].abs())
        .sort_values(["_magnitude", "layer", "index"], ascending=[False, True, True])
        .head(top_n)
    )
    ax.scatter(top["layer"], top["score"], s=22, color="crimson", zorder=3, label=f"top {len(top)} |score|")
    # neighbours in one layer alternate sides, so labels of close scores do not overprint
    side = top.sort_values("score").groupby("layer").cumcount() % 2
    for row in top.itertuples():
        right = side[row.Index] == 0
        ax.annotate(
            _label("neuron", row.layer, row.index),
            (row.layer, row.score),
            xytext=(6 if right else -6, 0),
            textcoords="offset points",
            ha="left" if right else "right",
            va="center",
            fontsize=7,
            color="crimson",
        )
    if len(layers) <= 40:
        ax.set_xticks(layers)
    ax.legend(loc="best", fontsize=8)
    ax.set(
        xlabel="layer",
        ylabel="neuron attribution score",
        title=f"Neuron scores by layer ({len(rows)} neurons; whiskers: 1st-99th percentile)",
    )
    return fig


# ---------------------------------------------------------------- 2. top components


def top_components(df: pd.DataFrame, k: int = 20) -> Figure:
    """Horizontal bars of the ``k`` largest-|score| components, labelled like ``N12.345`` / ``H3.4``.

    Columns: ``kind, layer, index, score`` and optionally ``context`` (one panel per context, each with
    its own top ``k``, on a shared score axis). Bars are coloured by the sign of the score.
    """
    _require(
        df, "top_components", ["kind", "layer", "index", "score"], ["context"], numeric=["layer", "index", "score"]
    )
    if k < 1:
        raise ValueError(f"top_components(): k must be at least 1, got {k}")
    faceted = "context" in df.columns
    keys = (["context"] if faceted else []) + ["kind", "layer", "index"]
    _unique(df, "top_components", keys, "filter to one metric / run before plotting")
    contexts = _levels(df["context"]) if faceted else [None]
    shown = min(k, int(df.groupby("context").size().max()) if faceted else len(df))
    fig, axes = _panels(len(contexts), (4.4, 1.0 + 0.27 * shown), sharex=True)
    for ax, context in zip(axes, contexts):
        rows = df if context is None else df[df["context"] == context]
        top = rows.assign(_magnitude=rows["score"].abs()).sort_values(
            ["_magnitude", "kind", "layer", "index"], ascending=[False, True, True, True]
        ).head(k)
        positions = np.arange(len(top))
        ax.barh(positions, top["score"], color=np.where(top["score"] >= 0, POSITIVE, NEGATIVE), height=0.7)
        ax.set_yticks(positions, [_label(*r) for r in top[["kind", "layer", "index"]].itertuples(index=False)])
        ax.set_ylim(len(top) - 0.5, -0.5)  # largest at the top
        ax.axvline(0, color="0.3", linewidth=0.8)
        ax.set(xlabel="score", title=str(context) if context is not None else "")
        ax.tick_params(axis="y", labelsize=8)
    fig.legend(
        handles=[Patch(color=POSITIVE, label="positive"), Patch(color=NEGATIVE, label="negative")],
        loc="outside lower center",
        ncols=2,
        fontsize=8,
    )
    fig.suptitle(f"Top {k} components by |score|")
    return fig


# ---------------------------------------------------------------- 3. bias vs sparsity


def bias_vs_sparsity(df: pd.DataFrame) -> Figure:
    """Bias after pruning ``k`` components, one line per strategy, one panel per evaluation context.

    Columns: ``strategy, k, eval_context, bias`` and optionally ``bias_lo, bias_hi`` (the strategy's
    interval, drawn as a band) and ``null_lo, null_hi`` (the same for random sets of the same kind
    and size, drawn as a hatched band edged with dotted lines). Rows with ``strategy == "none"`` give
    the unpruned bias, drawn as a dashed line. The k axis is logarithmic when k spans more than a
    factor of 20.
    """
    figure = "bias_vs_sparsity"
    _require(df, figure, ["strategy", "k", "eval_context", "bias"], ["bias_lo", "bias_hi", "null_lo", "null_hi"],
             numeric=["k", "bias"])
    band = _paired(df, figure, "bias_lo", "bias_hi")
    null = _paired(df, figure, "null_lo", "null_hi")
    unpruned = df[df["strategy"] == "none"]
    pruned = df[df["strategy"] != "none"]
    if pruned.empty:
        raise ValueError(f"{figure}(): only 'none' (unpruned) rows; add rows for at least one pruning strategy")
    _unique(pruned, figure, ["strategy", "k", "eval_context"], "filter to one train context / metric first")
    contexts = _levels(df["eval_context"])
    strategies = _levels(pruned["strategy"])
    colours = _palette(strategies)
    fig, axes = _panels(len(contexts), (4.4, 3.4), sharex=True, sharey=True)
    for ax, context in zip(axes, contexts):
        for strategy in strategies:
            line = pruned[(pruned["eval_context"] == context) & (pruned["strategy"] == strategy)].sort_values("k")
            if line.empty:
                continue
            ax.plot(line["k"], line["bias"], marker="o", markersize=4, color=colours[strategy], label=strategy)
            if band:
                ax.fill_between(line["k"], line["bias_lo"], line["bias_hi"], color=colours[strategy], alpha=0.2, lw=0)
            if null and line["null_lo"].notna().any():
                ax.fill_between(line["k"], line["null_lo"], line["null_hi"], facecolor="none", hatch="///",
                                edgecolor=colours[strategy], alpha=0.35, lw=0, label=f"{strategy} null")
                for edge in ("null_lo", "null_hi"):
                    ax.plot(line["k"], line[edge], color=colours[strategy], linestyle=":", linewidth=0.8)
        baseline = unpruned.loc[unpruned["eval_context"] == context, "bias"]
        if len(baseline):
            ax.axhline(baseline.mean(), color="0.25", linestyle="--", linewidth=1.2, label="unpruned")
        ax.axhline(0, color="0.6", linewidth=0.6, zorder=0)
        _scale_wide(ax, pruned["k"])
        ax.set(title=f"evaluated on: {context}", xlabel="k (components pruned)", ylabel="bias")
    handles = [Line2D([], [], color=colours[s], marker="o", markersize=4, label=s) for s in strategies]
    if len(unpruned):
        handles.append(Line2D([], [], color="0.25", linestyle="--", label="unpruned"))
    if null:
        handles.append(Line2D([], [], color="0.4", linestyle=":", label="random sets (null)"))
    fig.legend(handles=handles, loc="outside right upper", title="strategy", fontsize=8)
    fig.suptitle("Bias vs number of pruned components")
    return fig


# ---------------------------------------------------------------- 4. generalization matrix


def generalization_matrix(df: pd.DataFrame) -> Figure:
    """Share of the gap removed when pruning with a set from one context and evaluating on another.

    Columns: ``train_context, eval_context, share_removed`` (signed fraction of the unpruned gap removed,
    ``-delta_gap / gap before``: above 100% the gap changed sign; shown as percentages) and optionally
    ``strategy`` (one panel each, on one shared colour scale). Evaluation contexts that are also training
    contexts come first, in the same order, so the diagonal is in-context.
    """
    figure = "generalization_matrix"
    _require(df, figure, ["train_context", "eval_context", "share_removed"], ["strategy"], numeric=["share_removed"])
    faceted = "strategy" in df.columns
    _unique(df, figure, (["strategy"] if faceted else []) + ["train_context", "eval_context"],
            "filter to one k / metric first")
    trains = _levels(df["train_context"])
    evals = _levels(df["eval_context"])
    evals = [c for c in trains if c in evals] + [c for c in evals if c not in trains]
    strategies = _levels(df["strategy"]) if faceted else [None]
    limit = float(np.nanmax(np.abs(df["share_removed"].to_numpy(dtype=float)))) or 1.0
    fig, axes = _panels(
        len(strategies), (1.8 + 0.75 * len(evals), 1.3 + 0.55 * len(trains)), style="white"
    )
    for ax, strategy in zip(axes, strategies):
        rows = df if strategy is None else df[df["strategy"] == strategy]
        grid = rows.pivot(index="train_context", columns="eval_context", values="share_removed")
        sns.heatmap(
            grid.reindex(index=trains, columns=evals).astype(float),
            ax=ax,
            cmap="RdBu",
            center=0,
            vmin=-limit,
            vmax=limit,
            annot=True,
            fmt=".0%",
            annot_kws={"fontsize": 8},
            linewidths=0.5,
            linecolor="white",
            cbar=False,
        )
        ax.set(xlabel="evaluated on", ylabel="pruning set from", title=str(strategy) if faceted else "")
        ax.tick_params(axis="x", labelrotation=30)
        ax.tick_params(axis="y", labelrotation=0)
    fig.colorbar(
        axes[0].collections[0], ax=axes, label="share of the gap removed", format=PercentFormatter(1.0), shrink=0.8
    )
    fig.suptitle("Generalization: share of the gap removed, pruning context x evaluation context")
    return fig


# ---------------------------------------------------------------- 5. overlap matrix


def overlap_matrix(df: pd.DataFrame, stat: str = "jaccard") -> Figure:
    """A pairwise statistic between contexts' component sets (Jaccard, RBO, Spearman, ...) as a heatmap.

    Columns: ``context_a, context_b, stat, value`` and optionally ``null_mean``; rows with
    ``stat == stat`` are used. Pairs given in one direction are mirrored. Cells read ``value (null
    mean)``. The colour scale is 0-1 for statistics inside [0, 1] and diverging around 0 otherwise.
    """
    figure = "overlap_matrix"
    _require(df, figure, ["context_a", "context_b", "stat", "value"], ["null_mean"], numeric=["value", "null_mean"])
    rows = df[df["stat"] == stat]
    if rows.empty:
        raise ValueError(f"{figure}(): no rows with stat == {stat!r}; stats present: {_levels(df['stat'])}")
    with_null = "null_mean" in rows.columns
    fields = ["value"] + (["null_mean"] if with_null else [])
    mirrored = rows.rename(columns={"context_a": "context_b", "context_b": "context_a"})
    both = pd.concat([rows, mirrored])[["context_a", "context_b", *fields]].drop_duplicates()
    _unique(both, figure, ["context_a", "context_b"], "the two directions of a pair disagree or a pair repeats")
    contexts = _levels(pd.concat([rows["context_a"], rows["context_b"]], ignore_index=True))
    values = both.pivot(index="context_a", columns="context_b", values="value").reindex(
        index=contexts, columns=contexts
    ).astype(float)
    nulls = (
        both.pivot(index="context_a", columns="context_b", values="null_mean").reindex(
            index=contexts, columns=contexts
        ).astype(float)
        if with_null
        else None
    )
    text = np.full(values.shape, "", dtype=object)
    for i, j in zip(*np.nonzero(values.notna().to_numpy())):
        text[i, j] = f"{values.iat[i, j]:.2f}"
        if nulls is not None and np.isfinite(nulls.iat[i, j]):
            text[i, j] += f" ({nulls.iat[i, j]:.2f})"
    low, high = np.nanmin(values.to_numpy()), np.nanmax(values.to_numpy())
    if low >= 0 and high <= 1:
        scale = {"cmap": "Blues", "vmin": 0.0, "vmax": 1.0}
    else:
        limit = max(abs(low), abs(high)) or 1.0
        scale = {"cmap": "RdBu_r", "center": 0.0, "vmin": -limit, "vmax": limit}
    n = len(contexts)
    fig, (ax,) = _panels(1, (2.8 + 1.0 * n, 2.0 + 0.75 * n), style="white")
    sns.heatmap(
        values, ax=ax, annot=text, fmt="", annot_kws={"fontsize": 8}, linewidths=0.5, linecolor="white",
        cbar_kws={"label": stat}, **scale,
    )
    ax.set(xlabel="context", ylabel="context")
    ax.tick_params(axis="x", labelrotation=30)
    ax.tick_params(axis="y", labelrotation=0)
    ax.set_title(f"{stat} between contexts" + (" (in parentheses: null mean)" if with_null else ""))
    return fig


# ---------------------------------------------------------------- 6. Jaccard vs k


def jaccard_curves(df: pd.DataFrame) -> Figure:
    """Jaccard overlap of two contexts' top-k sets as k grows, one line per context pair.

    Columns: ``pair, k, jaccard`` and optionally ``null_mean`` (dotted line) and ``null_lo, null_hi``
    (shaded null band, e.g. the overlap of random sets of the same sizes). The k axis is logarithmic
    when k spans more than a factor of 20.
    """
    figure = "jaccard_curves"
    _require(df, figure, ["pair", "k", "jaccard"], ["null_mean", "null_lo", "null_hi"], numeric=["k", "jaccard"])
    band = _paired(df, figure, "null_lo", "null_hi")
    with_mean = "null_mean" in df.columns
    _unique(df, figure, ["pair", "k"], "filter to one kind / strategy first")
    pairs = _levels(df["pair"])
    colours = _palette(pairs)
    fig, (ax,) = _panels(1, (6.5 if len(pairs) <= 6 else 8.0, 4.2))
    for pair in pairs:
        line = df[df["pair"] == pair].sort_values("k")
        ax.plot(line["k"], line["jaccard"], marker="o", markersize=4, color=colours[pair], label=str(pair))
        if band:
            ax.fill_between(line["k"], line["null_lo"], line["null_hi"], color=colours[pair], alpha=0.15, lw=0)
        if with_mean:
            ax.plot(line["k"], line["null_mean"], linestyle=":", color=colours[pair], label="_null")
    _scale_wide(ax, df["k"])
    ax.set_ylim(0, 1.02)
    ax.set(xlabel="k (top-k components per context)", ylabel="Jaccard overlap", title="Overlap of top-k sets vs k")
    handles = [Line2D([], [], color=colours[p], marker="o", markersize=4, label=str(p)) for p in pairs]
    if with_mean or band:
        handles.append(Line2D([], [], color="0.4", linestyle=":", label="null" + (" (band)" if band else "")))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="pair")
    return fig


# ---------------------------------------------------------------- 7. shared vs specific


def shared_specific(df: pd.DataFrame) -> Figure:
    """Stacked bars per context: the share of the gap removed by the shared components, and the rest.

    Columns: ``context, full_share, shared_share`` (signed fractions of the unpruned gap removed by the
    context's own set and by the shared components alone). The lower bar is ``shared_share``; the upper
    one is ``full_share - shared_share`` (the context-specific part, drawn downwards if negative); the
    full share is written above each bar.
    """
    figure = "shared_specific"
    _require(
        df, figure, ["context", "full_share", "shared_share"],
        numeric=["full_share", "shared_share"],
    )
    _unique(df, figure, ["context"], "filter to one strategy / k first")
    contexts = [str(c) for c in df["context"]]
    full = df["full_share"].to_numpy(dtype=float)
    shared = df["shared_share"].to_numpy(dtype=float)
    shared_colour, specific_colour = sns.color_palette("tab10", 2)
    fig, (ax,) = _panels(1, (max(6.5, 3.0 + 0.9 * len(contexts)), 4.2))
    x = np.arange(len(contexts))
    ax.bar(x, shared, width=0.6, color=shared_colour, label="shared components")
    ax.bar(x, full - shared, bottom=shared, width=0.6, color=specific_colour, label="context-specific")
    for xi, total, base in zip(x, full, shared):
        ax.annotate(
            f"{total:.0%}", (xi, max(total, base)), xytext=(0, 3), textcoords="offset points", ha="center",
            fontsize=8,
        )
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xticks(x, contexts, rotation=30 if len(contexts) > 4 else 0, ha="right" if len(contexts) > 4 else "center")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.margins(y=0.1)
    ax.set(xlabel="context", ylabel="share of the gap removed",
           title="Share of the gap removed: shared vs context-specific part")
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


# ---------------------------------------------------------------- 8. utility cost


def utility_cost(df: pd.DataFrame, *, label_k: bool = True) -> Figure:
    """Share of the gap removed against utility cost, one line per strategy through its points in order of k.

    Columns: ``strategy, k, kl, share_removed`` (``kl``: divergence from the unpruned model on neutral
    prompts; ``share_removed``: signed fraction of the unpruned gap removed). Points are labelled with k when
    ``label_k``. The KL axis is logarithmic when it spans more than a factor of 100.
    """
    figure = "utility_cost"
    _require(df, figure, ["strategy", "k", "kl", "share_removed"], numeric=["k", "kl", "share_removed"])
    _unique(df, figure, ["strategy", "k"], "filter to one context / metric first")
    strategies = _levels(df["strategy"])
    colours = _palette(strategies)
    fig, (ax,) = _panels(1, (6.5, 4.5))
    for strategy in strategies:
        line = df[df["strategy"] == strategy].sort_values("k")
        ax.plot(line["kl"], line["share_removed"], marker="o", markersize=4, color=colours[strategy], label=strategy)
        if label_k:
            for point in line.itertuples():
                ax.annotate(
                    f"{point.k:g}", (point.kl, point.share_removed), xytext=(3, 3), textcoords="offset points",
                    fontsize=7, color=colours[strategy],
                )
    ax.axhline(0, color="0.6", linewidth=0.6, zorder=0)
    _scale_wide(ax, df["kl"], ratio=100.0)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set(
        xlabel="utility cost: KL divergence from the unpruned model",
        ylabel="share of the gap removed",
        title="Share of the gap removed vs utility cost" + (" (points labelled with k)" if label_k else ""),
    )
    ax.legend(title="strategy", fontsize=8)
    return fig


# ---------------------------------------------------------------- 9. audit gaps


def audit_gaps(df: pd.DataFrame) -> Figure:
    """The audit: outcome gap per context with its confidence interval, against a zero line.

    Columns: ``context, gap, gap_lo, gap_hi`` and optionally ``comparison`` (e.g. ``"White - Black"``,
    ``"women - men"``; one colour each, dodged). ``gap`` must lie inside ``[gap_lo, gap_hi]``.
    """
    figure = "audit_gaps"
    _require(df, figure, ["context", "gap", "gap_lo", "gap_hi"], ["comparison"], numeric=["gap", "gap_lo", "gap_hi"])
    outside = (df["gap_lo"] > df["gap"]) | (df["gap"] > df["gap_hi"])
    if outside.any():
        example = df.loc[outside, ["context", "gap", "gap_lo", "gap_hi"]].iloc[0].to_dict()
        raise ValueError(f"{figure}(): {int(outside.sum())} rows have gap outside [gap_lo, gap_hi], e.g. {example}")
    faceted = "comparison" in df.columns
    _unique(df, figure, (["comparison"] if faceted else []) + ["context"], "filter to one metric first")
    contexts = _levels(df["context"])
    comparisons = _levels(df["comparison"]) if faceted else [None]
    colours = _palette(comparisons)
    position = {c: i for i, c in enumerate(contexts)}
    step = 0.7 / len(comparisons)
    fig, (ax,) = _panels(1, (6.5, 1.4 + 0.3 * len(contexts) * (1 + 0.5 * (len(comparisons) - 1))))
    for j, comparison in enumerate(comparisons):
        rows = df if comparison is None else df[df["comparison"] == comparison]
        y = rows["context"].map(position).to_numpy(dtype=float) + (j - (len(comparisons) - 1) / 2) * step
        ax.errorbar(
            rows["gap"], y,
            xerr=[rows["gap"] - rows["gap_lo"], rows["gap_hi"] - rows["gap"]],
            fmt="o", markersize=5, capsize=3, color=colours[comparison],
            label=str(comparison) if comparison is not None else None,
        )
    ax.axvline(0, color="0.3", linewidth=1.0)
    ax.set_yticks(range(len(contexts)), [str(c) for c in contexts])
    ax.set_ylim(len(contexts) - 0.5, -0.5)
    single = comparisons[0] if len(comparisons) == 1 and comparisons[0] is not None else None
    ax.set(
        xlabel="gap" + (f" ({single})" if single else ""),
        ylabel="context",
        title="Audit: outcome gap by context (point estimate and CI)",
    )
    if len(comparisons) > 1:
        ax.legend(title="comparison", fontsize=8)
    return fig


# ---------------------------------------------------------------- 10. set intersections (UpSet)


def upset(df: pd.DataFrame, *, max_intersections: int = 30, sep: str = " & ") -> Figure:
    """UpSet-style figure of the exclusive intersections of several contexts' component sets.

    Columns: ``intersection`` (its contexts joined by ``sep``; a component is counted in exactly one
    intersection, the contexts whose sets hold it), ``size`` and optionally ``null_mean`` (drawn as a tick)
    with ``null_low, null_high`` (its interval, a grey bar behind the size). Top: intersection sizes; below:
    a dot matrix of which contexts each intersection joins; left: each context's set size (the sum of its
    intersections). The ``max_intersections`` largest are shown, the largest first.
    """
    figure = "upset"
    _require(df, figure, ["intersection", "size"], ["null_mean", "null_low", "null_high"],
             numeric=["size", "null_mean", "null_low", "null_high"])
    band = _paired(df, figure, "null_low", "null_high")
    _unique(df, figure, ["intersection"], "filter to one kind / k first")
    members = df["intersection"].astype(str).str.split(sep)
    contexts = list(dict.fromkeys(c for m in members for c in m))
    set_sizes = {c: float(df.loc[members.map(lambda m, c=c: c in m), "size"].sum()) for c in contexts}
    shown = df.assign(_members=members, _degree=members.map(len)).sort_values(
        ["size", "_degree"], ascending=[False, False], kind="stable").head(max_intersections)
    n, m = len(shown), len(contexts)
    fig = Figure(figsize=(max(6.5, 2.6 + 0.42 * n), 3.2 + 0.32 * m), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=[1.0, max(2.0, 0.42 * n)], height_ratios=[2.6, max(0.8, 0.32 * m)])
    with sns.axes_style("whitegrid"):
        bars = fig.add_subplot(grid[0, 1])
        dots = fig.add_subplot(grid[1, 1], sharex=bars)
        sizes = fig.add_subplot(grid[1, 0], sharey=dots)
    x = np.arange(n)
    if band:
        bars.bar(x, shown["null_high"] - shown["null_low"], bottom=shown["null_low"], width=0.8, color="0.85",
                 label="null 95%", zorder=1)
    bars.bar(x, shown["size"], width=0.55, color="0.25", zorder=2, label="observed")
    if "null_mean" in shown.columns:
        bars.scatter(x, shown["null_mean"], marker="_", s=260, color=POSITIVE, zorder=3, label="null mean")
    for xi, size in zip(x, shown["size"]):
        bars.annotate(f"{size:g}", (xi, size), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
    bars.set(ylabel="intersection size", title="Exclusive intersections of the sets")
    bars.tick_params(axis="x", labelbottom=False)
    bars.legend(fontsize=8, loc="upper right")
    row = {c: i for i, c in enumerate(contexts)}
    dots.scatter(np.repeat(x, m), np.tile(np.arange(m), n), s=40, color="0.85", zorder=1)
    for xi, chosen in zip(x, shown["_members"]):
        ys = sorted(row[c] for c in chosen)
        dots.plot([xi, xi], [ys[0], ys[-1]], color="0.2", linewidth=1.5, zorder=2)
        dots.scatter([xi] * len(ys), ys, s=40, color="0.2", zorder=3)
    dots.set_yticks(range(m), contexts)
    dots.set_ylim(m - 0.5, -0.5)
    dots.set_xticks(x, [""] * n)
    dots.grid(False)
    sizes.barh(range(m), [set_sizes[c] for c in contexts], color="0.45", height=0.6)
    sizes.invert_xaxis()
    sizes.set(xlabel="set size")
    sizes.tick_params(axis="y", labelleft=False)
    return fig


# ---------------------------------------------------------------- 11. component card


def component_card(
    scores: pd.DataFrame, activations: pd.DataFrame, effects: pd.DataFrame, *, title: str = ""
) -> Figure:
    """One component at a glance: its score per context, its activation by group, its direct effect.

    ``scores``: ``context, score`` and optionally ``ci_low, ci_high`` (an interval, drawn as error bars).
    ``activations``: ``context, group, position, mean`` and optionally ``ci_low, ci_high`` (one panel row
    point per context x position, groups dodged). ``effects``: ``context, answer, token, centred`` (logit
    pushed onto each answer token, centred within the answer; bars per token, one colour per context).
    """
    figure = "component_card"
    _require(scores, figure, ["context", "score"], ["ci_low", "ci_high"], numeric=["score", "ci_low", "ci_high"])
    _require(activations, figure, ["context", "group", "position", "mean"], ["ci_low", "ci_high"],
             numeric=["mean", "ci_low", "ci_high"])
    _require(effects, figure, ["context", "answer", "token", "centred"], numeric=["centred"])
    _unique(scores, figure, ["context"], "one score per context")
    _unique(activations, figure, ["context", "group", "position"], "one mean per context, group and position")
    contexts = _levels(pd.concat([scores["context"], activations["context"], effects["context"]]))
    colours = _palette(contexts)
    answers = _levels(effects["answer"])
    fig = Figure(figsize=(max(9.0, 3.5 + 0.9 * len(contexts)), 6.8), layout="constrained")
    grid = fig.add_gridspec(2, max(2, len(answers)))
    with sns.axes_style("whitegrid"):
        score_ax = fig.add_subplot(grid[0, : grid.ncols // 2])
        act_ax = fig.add_subplot(grid[0, grid.ncols // 2 :])
        effect_axes = [fig.add_subplot(grid[1, i]) for i in range(len(answers))]
    y = np.arange(len(contexts))
    s = scores.set_index("context").reindex(contexts)
    interval = _paired(scores, figure, "ci_low", "ci_high")
    score_ax.errorbar(s["score"], y, xerr=[s["score"] - s["ci_low"], s["ci_high"] - s["score"]] if interval else None,
                      fmt="o", color="0.2", capsize=3, label="score")
    if interval and "estimate" in s.columns:
        score_ax.scatter(s["estimate"], y, marker="x", color=POSITIVE, zorder=3, label="first-order estimate")
        score_ax.legend(fontsize=7)
    score_ax.axvline(0, color="0.4", linewidth=0.8)
    score_ax.set_yticks(y, contexts)
    score_ax.set_ylim(len(contexts) - 0.5, -0.5)
    score_ax.set(xlabel="score (positive: carries the gap)", title="Score per context (95% interval)")
    groups = _levels(activations["group"])
    positions = _levels(activations["position"])
    rows = [(c, p) for c in contexts for p in positions]
    group_colours = dict(zip(groups, sns.color_palette("Set2", len(groups))))
    step = 0.6 / max(1, len(groups))
    act_interval = _paired(activations, figure, "ci_low", "ci_high")
    for j, group in enumerate(groups):
        part = activations[activations["group"] == group].set_index(["context", "position"]).reindex(rows)
        yy = np.arange(len(rows)) + (j - (len(groups) - 1) / 2) * step
        err = [part["mean"] - part["ci_low"], part["ci_high"] - part["mean"]] if act_interval else None
        act_ax.errorbar(part["mean"], yy, xerr=err, fmt="o", markersize=4, capsize=2, color=group_colours[group],
                        label=str(group))
    act_ax.set_yticks(range(len(rows)), [f"{c}: {p}" for c, p in rows], fontsize=8)
    act_ax.set_ylim(len(rows) - 0.5, -0.5)
    act_ax.set(xlabel="mean activation", title="Activation by group (95% interval)")
    act_ax.legend(title="group", fontsize=7)
    width = 0.8 / len(contexts)
    for ax, answer in zip(effect_axes, answers):
        part = effects[effects["answer"] == answer]
        tokens = _levels(part["token"])
        x = np.arange(len(tokens))
        for i, context in enumerate(contexts):
            values = part[part["context"] == context].set_index("token").reindex(tokens)["centred"]
            ax.bar(x + (i - (len(contexts) - 1) / 2) * width, values, width=width, color=colours[context],
                   label=str(context))
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_xticks(x, [repr(t) for t in tokens], fontsize=7, rotation=45 if len(tokens) > 12 else 0)
        ax.set(xlabel="answer token", ylabel="direct logit effect (centred)", title=f"Pushes the answer: {answer}")
    effect_axes[-1].legend(title="context", fontsize=7)
    fig.suptitle(title or "Component card")
    return fig


# ---------------------------------------------------------------- 12. layer profile


def layer_profile(df: pd.DataFrame) -> Figure:
    """Where a set sits: per layer, its component count and summed score, one line per context.

    Columns: ``context, layer, count`` and optionally ``score_sum`` (a second panel) and ``kind`` (one
    panel row per kind).
    """
    figure = "layer_profile"
    _require(df, figure, ["context", "layer", "count"], ["score_sum", "kind"],
             numeric=["layer", "count", "score_sum"])
    kinds = _levels(df["kind"]) if "kind" in df.columns else [None]
    _unique(df, figure, ["context", "layer"] + (["kind"] if kinds != [None] else []), "one row per context and layer")
    with_score = "score_sum" in df.columns and df["score_sum"].notna().any()
    contexts = _levels(df["context"])
    colours = _palette(contexts)
    ncols = 2 if with_score else 1
    fig, axes = _panels(ncols * len(kinds), (max(4.4, 1.5 + 0.22 * df["layer"].nunique()), 3.2), ncols=ncols,
                        sharex=True)
    for row, kind in enumerate(kinds):
        rows = df if kind is None else df[df["kind"] == kind]
        panels = [("count", "components")] + ([("score_sum", "summed score")] if with_score else [])
        for col, (column, label) in enumerate(panels):
            ax = axes[row * ncols + col]
            for context in contexts:
                line = rows[rows["context"] == context].sort_values("layer")
                ax.plot(line["layer"], line[column], marker="o", markersize=3, color=colours[context],
                        label=str(context))
            ax.axhline(0, color="0.6", linewidth=0.6, zorder=0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set(xlabel="layer", ylabel=label, title=f"{label} per layer" + (f" ({kind}s)" if kind else ""))
    axes[0].legend(title="context", fontsize=7)
    return fig
