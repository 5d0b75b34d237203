"""What share of SmolLM2's answers the numeric metric covers, per built-in numeric context, and at what cost.

Per context: a seeded sample of its built-in prompts (every detail level; 48, or 8 with ``--quick``),
measured by ``circuits.measure.bias.measure`` with the default ``Expansion`` (each answer type's budget),
and timed against one bare forward of the same prompts through the model's Hugging Face module (batches
of 32). Prints a row per context (mean and lowest ``grid_mass``, its bounded part, ``other_mass``,
``tail_mass``, answer-tree nodes per prompt, measure / bare), then
``RESULT lowest_covered_mass ratio=<the lowest context mean> target=0.9`` (issue #11: a mean of at least
0.9 for every built-in numeric context).
Run: ``python benchmarks/bench_coverage.py [--quick] [--device cuda] [--threads N]``.
"""
from __future__ import annotations

import torch
from common import DTYPES, parse_args, result_line, timed

from circuits.inputs.contexts import CONTEXTS
from circuits.inputs.prompts import build_prompts
from circuits.measure.bias import measure
from interp import load_model
from interp.batching import encode, microbatches, pad_ids, pad_token_id


def bare_forward(model, texts: list[str]) -> None:
    ids = [encode(model, t) for t in texts]
    with torch.no_grad():
        for part in microbatches(len(ids), 32):
            batch = pad_ids(ids[part], pad_token_id(model.tokenizer)).to(model.cfg.device)
            model.original_model(input_ids=batch.tokens, attention_mask=batch.attention_mask)


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    model = load_model("smollm2-135m-instruct", device=args.device, dtype=DTYPES[args.dtype])
    numeric = [c for c, ctx in CONTEXTS.items() if ctx.answer.type != "yes_no" and ctx.answer.grid is None]
    contexts, n = (["lending_amount", "chess"], 8) if args.quick else (numeric, 48)
    lowest = 1.0
    for context in contexts:
        prompts = build_prompts(model, [context], seed=0)
        prompts = prompts.filter(prompt_id=list(prompts.frame.sample(n, random_state=1)["prompt_id"]))
        _, bare = timed(lambda texts=prompts.texts: bare_forward(model, texts), args.device)
        result, took = timed(lambda rows=prompts: measure(model, rows, batch_size=32, progress=False), args.device)
        v = result.values
        lowest = min(lowest, float(v.grid_mass.mean()))
        print(f"{context:15s} {v.answer_type.iloc[0]:11s} n={len(v)} covered {v.grid_mass.mean():.3f} "
              f"(lowest {v.grid_mass.min():.3f}, bounded {v.bounded_mass.mean():.3f}) other {v.other_mass.mean():.3f} "
              f"tail {v.tail_mass.mean():.3f} nodes {result.settings['trie_nodes'][context]:.0f} "
              f"measure {took:.1f}s bare {bare:.1f}s ratio {took / bare:.2f}", flush=True)
    print(result_line("lowest_covered_mass", lowest, 0.9))


if __name__ == "__main__":
    main()
