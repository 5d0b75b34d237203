import torch

from interp.batching import tokenize
from interp.bridge import attention_reads_cache, blocks_skipped_below, keeps_logits


def test_workarounds_leave_nothing_behind(tiny_model):
    with blocks_skipped_below(tiny_model, 2), attention_reads_cache(tiny_model):
        assert all("forward" in vars(b) for b in list(tiny_model.blocks)[:2])
        assert "forward" not in vars(tiny_model.blocks[2])
        assert all("forward" in vars(b.attn) for b in tiny_model.blocks)
    assert not any("forward" in vars(b) or "forward" in vars(b.attn) for b in tiny_model.blocks)


def test_skipped_blocks_resume_exactly(tiny_model):
    batch = tokenize(tiny_model, ["a short prompt", "another, longer prompt here"])
    with torch.no_grad():
        plain, cache = tiny_model.run_with_cache(batch.tokens)
        with blocks_skipped_below(tiny_model, 2):
            resumed = tiny_model(cache["blocks.2.hook_resid_pre"], start_at_layer=2, **batch.forward_kwargs())
    rows = torch.arange(len(batch))
    torch.testing.assert_close(resumed[rows, batch.answer_pos], plain[rows, batch.answer_pos], atol=1e-4, rtol=1e-4)
    assert keeps_logits(tiny_model)
