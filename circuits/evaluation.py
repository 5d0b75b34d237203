"""Bias and utility of a model with a component set ablated, across evaluation sets.

Bias on an evaluation set is the mean paired difference of the context's deterministic metric
(expected answer over its grid) between the two rows of each counterfactual pair, A minus B,
in the context's units; its reduction is ``1 - |gap with ablation| / |gap without|``. Utility is
the KL divergence from the unablated model on the neutral text shipped with the package, and
that text's perplexity.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from circuits.prompts import PairSet
from interp.ablation import ablated
from interp.batching import TokenBatch, tokenize
from interp.components import ComponentSet
from interp.distributed import all_gather_rows, current_shard
from interp.memory import Backoff
from interp.metrics import Metric, run_metric


def neutral_texts() -> list[str]:
    """The neutral sentences shipped with the package (our own text), one per line."""
    text = (Path(__file__).parent / "data" / "neutral.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True, eq=False)
class UtilityProbe:
    """Neutral text and the unablated model's next-token log-probabilities on it, the reference for KL."""

    batch: TokenBatch
    reference: Float[Tensor, "batch pos vocab"]  # log-probabilities

    @classmethod
    def build(cls, model, texts: Sequence[str] | None = None) -> "UtilityProbe":
        batch = tokenize(model, list(texts or neutral_texts()))
        with torch.no_grad():
            reference = model(batch.tokens).float().log_softmax(-1)
        return cls(batch, reference)

    def subset(self, n: int) -> "UtilityProbe":
        """The first ``n`` texts only (a cheaper probe for per-component sweeps)."""
        batch = self.batch.select(slice(0, n))
        return UtilityProbe(batch, self.reference[:n, : batch.tokens.shape[1]])

    def measure(self, model) -> dict[str, float]:
        """KL from the reference and perplexity, for the model as it runs now (hooks included)."""
        with torch.no_grad():
            logp = model(self.batch.tokens).float().log_softmax(-1)
        mask = self.batch.attention_mask.to(logp.dtype)
        per_pos = F.kl_div(logp, self.reference, log_target=True, reduction="none").sum(-1)
        kl = ((per_pos * mask).sum(-1) / mask.sum(-1)).mean()
        nll = -logp[:, :-1].gather(-1, self.batch.tokens[:, 1:, None]).squeeze(-1)
        ppl = torch.exp((nll * mask[:, 1:]).sum() / mask[:, 1:].sum())
        return {"kl": float(kl), "perplexity": float(ppl)}


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Counterfactual pairs of one context and the metric that measures them."""

    name: str
    pairs: PairSet
    metric: Metric


def paired_values(
    model, eval_set: EvalSet, *, batch_size: int = 16, backoff: Backoff | None = None
) -> tuple[Tensor, Tensor]:
    """Metric on the A rows and on the B rows of every pair, for the model as it runs now.

    Pairs run in microbatches of ``batch_size``, halved and retried on out-of-memory (said once);
    pass a ``Backoff`` to share the batch size (and the one report) across calls.
    Launched with ``torchrun`` (an initialized process group of world size > 1), each rank runs a
    contiguous block of the pairs and every rank returns the values of all of them.
    """
    metric, pairs = eval_set.metric, eval_set.pairs
    n = len(pairs)
    shard = current_shard()
    local = shard.indices(n)
    first = int(local[0]) if len(local) else 0
    device = torch.device(model.cfg.device) if shard.world_size > 1 else torch.device("cpu")
    out_a = torch.zeros(len(local), dtype=torch.float32, device=device)
    out_b = torch.zeros(len(local), dtype=torch.float32, device=device)

    def run(part: slice) -> None:
        rows = slice(first + part.start, first + part.stop)
        a = run_metric(model, metric, pairs.clean.select(rows))  # both computed before either is kept
        b = run_metric(model, metric, pairs.corrupt.select(rows))
        out_a[part], out_b[part] = a.float().to(device), b.float().to(device)

    backoff = backoff or Backoff(batch_size, what="evaluation batch")
    with torch.no_grad():
        for _ in backoff.batches(len(local), run):
            pass
    if shard.world_size > 1:  # a rank's block into the full rows (the collective wants the model's device)
        out_a, out_b = all_gather_rows(out_a, n), all_gather_rows(out_b, n)
    return out_a.cpu(), out_b.cpu()


@dataclass(frozen=True)
class Evaluation:
    """One row per (component set, evaluation set): bias with the set ablated, and utility."""

    frame: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        return self.frame.copy()

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.frame.to_parquet(out / "evaluation.parquet", index=False)
        (out / "evaluation.json").write_text(json.dumps(self.settings, indent=2, default=str))
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> "Evaluation":
        out = Path(out_dir)
        return cls(pd.read_parquet(out / "evaluation.parquet"), json.loads((out / "evaluation.json").read_text()))


def evaluate(
    model,
    sets: Mapping[str, ComponentSet],
    eval_sets: Sequence[EvalSet],
    *,
    probe: UtilityProbe | None = None,
    how: str = "zero",
    means: Mapping[str, Tensor] | None = None,
    plan: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> Evaluation:
    """Ablate each component set in turn and measure evaluation sets plus utility.

    ``reduction`` (1 - |gap| / |unablated gap|) comes with a 95% percentile interval from a paired
    bootstrap over the evaluation set's pairs (``reduction_low``/``reduction_high``; seeded by ``seed``).

    The empty set (the unablated model) is measured once on every evaluation set as the
    baseline, under the label ``"none"``; reductions are relative to it. ``plan`` maps a set's
    label to the names of the evaluation sets it is measured on (default: all). Under
    ``torch.distributed`` the pairs of each evaluation set are sharded across ranks (see
    ``paired_values``) and every rank returns the same table; utility is measured on every rank.
    """
    if "none" in sets:
        raise ValueError("'none' is reserved for the unablated baseline; rename that component set")
    if not eval_sets:
        raise ValueError("give at least one evaluation set")
    known = {e.name for e in eval_sets}
    for label, wanted in (plan or {}).items():
        unknown = sorted(set(wanted) - known)
        if label not in sets or unknown:
            raise ValueError(f"plan for {label!r} names unknown sets: {unknown or [label]}; known {sorted(known)}")
    probe = probe or UtilityProbe.build(model)
    rows = []
    labelled = {"none": ComponentSet(), **sets}
    baseline: dict[str, Tensor] = {}  # per-pair differences of the unablated model
    backoff = Backoff(batch_size, what="evaluation batch")  # a size that ran out of memory is not retried
    for label, components in tqdm(labelled.items(), desc="evaluate", disable=not progress):
        with ablated(model, components, how, means=means):
            utility = probe.measure(model)
            for es in eval_sets:
                if label != "none" and plan is not None and label in plan and es.name not in plan[label]:
                    continue
                a, b = paired_values(model, es, backoff=backoff)
                diff = a - b
                gap = float(diff.mean())
                base_diff = baseline.setdefault(es.name, diff)
                base = float(base_diff.mean())
                low, high = _reduction_interval(diff, base_diff, seed=seed) if label != "none" else (0.0, 0.0)
                rows.append(
                    {
                        "set": label,
                        "n_components": len(components),
                        "eval": es.name,
                        "gap": gap,
                        "gap_se": float(diff.std() / max(1, len(diff)) ** 0.5) if len(diff) > 1 else float("nan"),
                        "baseline_gap": base,
                        "reduction": 1 - abs(gap) / abs(base) if base != 0 else float("nan"),
                        "reduction_low": low,
                        "reduction_high": high,
                        "mean_a": float(a.mean()),
                        "mean_b": float(b.mean()),
                        "n_pairs": len(diff),
                        **utility,
                    }
                )
    settings = {"how": how, "sets": {k: len(v) for k, v in sets.items()}, "eval_sets": [e.name for e in eval_sets]}
    return Evaluation(pd.DataFrame(rows), settings)


def _reduction_interval(diff: Tensor, base_diff: Tensor, *, seed: int) -> tuple[float, float]:
    """Paired-bootstrap 95% interval of 1 - |mean(diff)| / |mean(base_diff)| over the pairs."""
    from circuits.stats import bootstrap_ci

    def reduction(d, b):
        return 1 - abs(d.mean()) / abs(b.mean())

    with warnings.catch_warnings():  # too few pairs (or a zero unablated gap) gives NaN, shown as such
        warnings.simplefilter("ignore", RuntimeWarning)
        return bootstrap_ci((diff.cpu().numpy(), base_diff.cpu().numpy()), reduction, paired=True,
                            n_resamples=1000, seed=seed)


def head_utility(model, probe: UtilityProbe, *, n_texts: int = 10, progress: bool = True) -> Float[Tensor, "layer head"]:
    """KL from the unablated model on neutral text when each head alone is zero-ablated (FASP's utility)."""
    from interp.components import ComponentShape, Head
    from interp.sweeps import ablation_sweep

    probe = probe.subset(n_texts)
    shape = ComponentShape.of(model)
    mask = probe.batch.attention_mask.float()

    def kl(logits, prompts):
        per_pos = F.kl_div(logits.float().log_softmax(-1), probe.reference[prompts], log_target=True,
                           reduction="none").sum(-1)
        return (per_pos * mask[prompts]).sum(-1) / mask[prompts].sum(-1)

    heads = [Head(layer, head) for layer in range(shape.n_layers) for head in range(shape.n_heads)]
    values = ablation_sweep(model, probe.batch, heads, kl, progress=progress, desc="head utility")
    return values.mean(-1).reshape(shape.n_layers, shape.n_heads)
