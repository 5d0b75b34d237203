"""The one place hooks are attached: the model's interface, a context manager that always removes what it
added, and the one helper that captures activations at hook points."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

HookSpec = tuple[str | Callable[[str], bool], Callable]


@runtime_checkable
class HookedModel(Protocol):
    """What the engine needs of a model: a TransformerLens ``TransformerBridge`` (from
    ``interp.load_model``) or ``HookedTransformer``, with its config and tokenizer."""

    cfg: Any
    tokenizer: Any

    def __call__(self, input: Any, *args: Any, **kwargs: Any) -> Any: ...

    def hooks(self, fwd_hooks: list = ..., bwd_hooks: list = ..., reset_hooks_end: bool = ...) -> Any: ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any: ...

    def to_tokens(self, input: Any, *args: Any, **kwargs: Any) -> Any: ...


@contextmanager
def hooked(
    model: HookedModel, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[HookSpec] = ()
) -> Iterator:
    """Attach forward/backward hooks for the duration of a ``with`` block.

    The hooks are removed when the block exits, also when it raises; hooks that were attached
    before the block are left alone.
    """
    with model.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks), reset_hooks_end=True):
        yield model


class Captured(dict):
    """``{hook name: [what was kept at each forward, in order]}``."""

    def joined(self) -> dict[str, Tensor]:
        """Each hook point's pieces concatenated along the batch (a single piece as is)."""
        return {name: parts[0] if len(parts) == 1 else torch.cat(parts) for name, parts in self.items()}


class _Stop(Exception):
    """Ends a forward once every hook point was captured."""


def _identity(name: str, act: Tensor) -> Tensor:
    return act


@contextmanager
def capturing(
    model: HookedModel, names: Sequence[str], keep: Callable[[str, Tensor], Any] = _identity, *,
    stop: bool = False,
) -> Iterator[Captured]:
    """Capture activations at the hook points ``names`` while the block runs.

    Each forward appends ``keep(name, activation)`` (default the activation itself, in the autograd
    graph) to ``captured[name]``; the activation flows on unchanged. Pieces are keyed by the name
    asked for (a bridge hook point may report an alias). ``stop``: end the forward (and the rest of
    the ``with`` block) once every name was captured, for the activations of a pass that need
    nothing after them.
    """
    captured = Captured({name: [] for name in names})

    def hook_for(name: str) -> HookSpec:
        def hook(act, hook):
            captured[name].append(keep(name, act))
            if stop and all(captured.values()):
                raise _Stop
            return act  # not None: with None, AtP on a bfloat16 bridge gave NaN scores (test_memory.py)

        return name, hook

    try:
        with hooked(model, [hook_for(name) for name in names]):
            yield captured
    except _Stop:
        pass


def hook_count(hook_point) -> int:
    """How many user hook functions are attached to one hook point right now."""
    return (len(hook_point._forward_hooks) + len(hook_point._backward_hooks) + len(hook_point.fwd_hooks)
            + len(hook_point.bwd_hooks))


def attached_hook_count(model: HookedModel) -> int:
    """How many user hook functions are attached to the model's hook points right now."""
    from transformer_lens.hook_points import HookPoint

    return sum(hook_count(module) for module in model.modules() if isinstance(module, HookPoint))
