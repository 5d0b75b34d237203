import pytest
import torch

from interp.batching import tokenize
from interp.hooks import HookedModel, attached_hook_count, capturing, hooked


def test_hooks_removed_after_exception(tiny_model):
    batch = tokenize(tiny_model, ["a short prompt"])
    before = attached_hook_count(tiny_model)
    fired = []

    def boom(act, hook):
        fired.append(hook.name)
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        with hooked(tiny_model, [("blocks.1.mlp.hook_post", boom)]):
            assert attached_hook_count(tiny_model) > before
            tiny_model(batch.tokens)
    assert fired == ["blocks.1.mlp.hook_post"]
    assert attached_hook_count(tiny_model) == before
    tiny_model(batch.tokens)  # runs clean: nothing left behind
    assert fired == ["blocks.1.mlp.hook_post"]


def test_the_tiny_model_is_a_hooked_model(tiny_model):
    assert isinstance(tiny_model, HookedModel)


def test_capturing_keeps_each_forward_and_leaves_the_run_alone(tiny_model):
    batch = tokenize(tiny_model, ["a short prompt", "another, longer prompt here"])
    names = ["blocks.0.hook_resid_pre", "blocks.2.mlp.hook_post"]
    with torch.no_grad():
        plain = tiny_model(batch.tokens)
        with capturing(tiny_model, names, lambda name, act: act[:, :2].clone()) as captured:
            logits = tiny_model(batch.tokens)
            tiny_model(batch.tokens[:1])
        _, cache = tiny_model.run_with_cache(batch.tokens)
    assert attached_hook_count(tiny_model) == 0
    torch.testing.assert_close(logits, plain)
    assert [len(captured[n]) for n in names] == [2, 2]
    joined = captured.joined()
    for name in names:
        assert joined[name].shape[0] == 3
        torch.testing.assert_close(joined[name][:2], cache[name][:, :2])


def test_capturing_can_stop_the_forward(tiny_model):
    batch = tokenize(tiny_model, ["a short prompt"])
    later = []
    with hooked(tiny_model, [("blocks.2.hook_resid_pre", lambda act, hook: later.append(1))]):
        with torch.no_grad(), capturing(tiny_model, ["blocks.1.hook_resid_post"], stop=True) as captured:
            tiny_model(batch.tokens)
            later.append("after the forward")  # skipped: the forward ended the block
    assert len(captured["blocks.1.hook_resid_post"]) == 1 and later == []
    assert attached_hook_count(tiny_model) == 0
