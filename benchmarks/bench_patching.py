"""Exact head patching of the embedded SmolLM2: interp.patching.patch_sweep vs TransformerLens.

Both sweep every attention head (all positions) from the source ("clean") prompts into the target
("corrupted") prompts and read a logit difference per prompt: TransformerLens with
``get_act_patch_attn_head_out_all_pos`` (one full forward per head), ours with ``patch_sweep``
(heads stacked along the batch, blocks below the patched layer skipped). The script checks that
both give the same values, then prints the speed-up (TL time / our time) and our time over the
arithmetic floor.

The floor is the forward work no exact method can skip: for each layer L, blocks L..n-1 once per
head of that layer, on the prompt batch. (The unembedding is not in it: only the positions the
metric reads need unembedding, a few per prompt, which is negligible.) From a timed full forward
``T_full`` of the target batch and a timed final norm + unembedding of every position ``T_head``,
one block costs ``(T_full - T_head) / n`` (the embedding lookup is counted in the blocks), so::

    floor = sum over L of n_heads * (n - L) / n * (T_full - T_head)

A ratio near 1 means the sweep costs about what those forwards cost run one variant at a time.
Below 1 comes from work the floor still counts: patch_sweep runs the leading positions where target
and source prompts agree (here everything before the swapped name) once, not once per variant,
and stacks variants into larger batches.

Run: ``python benchmarks/bench_patching.py [--quick] [--device cuda] [--threads N]`` (on a CPU shared with other
jobs, ``--threads 1`` keeps both sides from thrashing).
"""

from __future__ import annotations

import platform

import torch
from common import DTYPES, check_same, parse_args, peak_memory_bytes, reset_peak_memory, result_line, timed
from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

from interp import load_model
from interp.batching import encode, pad_ids, pad_token_id
from interp.metrics import LogitDiff
from interp.patching import patch_sweep

PLACES = ("park", "store", "school", "museum", "train station", "beach", "library", "old harbour")
OBJECTS = ("ball", "drink", "book", "letter", "small gift", "map", "ticket", "warm blanket")
TEMPLATE = "When Mary and John went to the {place}, {giver} gave a {thing} to"
TARGETS = {"cpu": 3, "cuda": 10}


def prompt_pairs(model, n: int, repeat_context: int):
    """Token-aligned (target, source) batches: the giver's name swapped, lengths varying by pair."""
    targets, sources = [], []
    for i in range(n):
        place, thing = PLACES[i % len(PLACES)], OBJECTS[i % len(OBJECTS)]
        preamble = " ".join(["It was a bright and quiet morning in the town."] * repeat_context)
        target, source = (
            encode(model, f"{preamble} {TEMPLATE.format(place=place, giver=giver, thing=thing)}".strip())
            for giver in ("Mary", "John")
        )
        assert len(target) == len(source), "names must be single tokens"
        targets.append(target)
        sources.append(source)
    pad = pad_token_id(model.tokenizer)
    device = model.cfg.device
    return pad_ids(targets, pad).to(device), pad_ids(sources, pad).to(device)


class EveryPosition:
    """The same metric behind a type patch_sweep does not know: it then runs and unembeds every position."""

    def __init__(self, metric):
        self.metric = metric

    def expand(self, batch):
        return self.metric.expand(batch)

    def __call__(self, logits, batch):
        return self.metric(logits, batch)


def floor_seconds(model, batch, device) -> tuple[float, float, float]:
    """The arithmetic floor of a head sweep (see the module docstring), with its two timings."""
    n, heads = model.cfg.n_layers, model.cfg.n_heads
    with torch.no_grad():
        _, t_full = timed(lambda: model(batch.tokens), device, repeats=3)
        _, cache = model.run_with_cache(batch.tokens, names_filter=f"blocks.{n - 1}.hook_resid_post")
        final = cache[f"blocks.{n - 1}.hook_resid_post"]
        _, t_head = timed(lambda: model.unembed(model.ln_final(final)), device, repeats=3)
    t_head = min(t_head, t_full)
    floor = sum(heads * (n - layer) / n * (t_full - t_head) for layer in range(n))
    return floor, t_full, t_head


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = load_model("smollm2-135m-instruct", device=device, dtype=DTYPES[args.dtype])
    n_pairs, repeat_context = (2, 0) if args.quick else (4, 1)
    target, source = prompt_pairs(model, n_pairs, repeat_context)
    tok = model.tokenizer
    metric = LogitDiff(
        tok(" Mary", add_special_tokens=False)["input_ids"],
        tok(" John", add_special_tokens=False)["input_ids"],
    )
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    first_diff = int((target.tokens != source.tokens).int().argmax(-1).min())
    print(
        f"SmolLM2-135M on {device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads): {n_layers} layers x {n_heads} heads = {n_layers * n_heads} "
        f"variants, {n_pairs} prompts of {target.lengths.min().item()}-{target.lengths.max().item()} tokens, "
        f"target and source first differ at position {first_diff}"
    )

    with torch.no_grad():
        model(target.tokens)  # warm-up

    def transformer_lens():
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(
                source.tokens, names_filter=lambda name: name.endswith("attn.hook_z")
            )
            return get_act_patch_attn_head_out_all_pos(
                model,
                target.tokens,
                clean_cache,
                lambda logits: metric(logits, target),
                reduce="none",
                baseline=True,
            )

    reset_peak_memory(device)
    ours, t_ours = timed(lambda: patch_sweep(model, target, source, metric, "heads"), device)
    peak_ours = peak_memory_bytes(device)
    reference, t_tl = timed(transformer_lens, device)
    plain, t_plain = timed(lambda: patch_sweep(model, target, source, EveryPosition(metric), "heads"), device)

    tl_values = reference.values.reshape(n_layers * n_heads, n_pairs).cpu()
    diff = max((tl_values - result.values).abs().max().item() for result in (ours, plain))
    scale = tl_values.abs().max().item()
    print(f"max |ours - TL| = {diff:.2e} (values up to {scale:.2f})")

    floor, t_full, t_head = floor_seconds(model, target, device)
    speedup = t_tl / t_ours
    print(f"TransformerLens: {t_tl:.2f} s   ours: {t_ours:.2f} s   speed-up: {speedup:.2f}x")
    print(
        f"ours over every position (no shared-prefix reuse, every logit unembedded): {t_plain:.2f} s   "
        f"speed-up: {t_tl / t_plain:.2f}x"
    )
    print(
        f"floor: {floor:.2f} s (full forward {t_full * 1e3:.1f} ms, norm+unembed {t_head * 1e3:.1f} ms)   "
        f"ours / floor: {t_ours / floor:.2f}"
    )
    measured = "CUDA allocated" if device.type == "cuda" else "process RSS"
    print(f"peak memory ({measured}): {peak_ours / 2**20:.0f} MiB")
    print(result_line("patching", speedup, TARGETS.get(device.type, 3)), flush=True)
    check_same("ours and TransformerLens's values", diff, 1e-3, model.cfg.dtype)


if __name__ == "__main__":
    main()
