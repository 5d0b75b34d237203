"""The one place hooks are attached: a context manager that always removes what it added."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

HookSpec = tuple[str | Callable[[str], bool], Callable]


@contextmanager
def hooked(model, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[HookSpec] = ()) -> Iterator:
    """Attach forward/backward hooks for the duration of a ``with`` block.

    The hooks are removed when the block exits, also when it raises; hooks that were attached
    before the block are left alone.
    """
    with model.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks), reset_hooks_end=True):
        yield model


def attached_hook_count(model) -> int:
    """How many user hook functions are attached to the model's hook points right now."""
    from transformer_lens.hook_points import HookPoint

    total = 0
    for module in model.modules():
        if isinstance(module, HookPoint):
            total += len(module._forward_hooks) + len(module._backward_hooks) + len(module.fwd_hooks)
            total += len(module.bwd_hooks)
    return total
