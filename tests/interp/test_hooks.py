import pytest

from interp.batching import tokenize
from interp.hooks import attached_hook_count, hooked


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
