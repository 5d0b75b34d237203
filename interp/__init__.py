"""Model-agnostic interpretability engine: loading, components, ablations, patching, attribution.

Vocabulary, the same in ``interp`` and ``circuits``.

Tensor axes (jaxtyping shape strings; checked when the tests run):

- ``prompt``: one entry per prompt of a prompt set (or per pair of a pair set: a pair's two sides
  line up prompt by prompt).
- ``row``: one row of a model batch: a prompt, or a prompt x candidate / sample / packed layout
  when a metric expands it. ``pos``: a token position of a row; ``key``: an attended position.
- ``vocab``, ``d_model``: the model's vocabulary and residual width.
- ``layer``, ``head``; ``index``: a component's index within its layer (a neuron or a head), so a
  component grid of one kind is ``[layer, index]``. In a dict over kinds the index axis differs
  per kind and is written ``_index`` (not bound across entries).
- ``component``: one entry per component of a list or set; ``variant``: one patched or ablated
  variant of a sweep; ``cand``: a candidate answer; ``unit``: a stored unit at one hook point.
- ``sample``, ``feature``, ``node`` (a trie node), ``token``, ``item``, ``entry``: as named; ``stop``: one
  (candidate, token that would continue it) term of the candidates' stop probabilities.

Parameters:

- ``p_value`` (never ``pvalue``) for our own fields; ``p_<test>`` for table columns.
- ``n_resamples``: the resamples of a bootstrap or permutation procedure; ``n_null``: the draws of
  a null distribution of random component sets (StudyConfig keeps its TOML field ``n_bootstrap``).
- ``batch_size``: rows per forward pass; a row is one prompt (a pair's two sides run as separate
  passes of ``batch_size`` rows each; sampling's rows are prompt x sample; a metric that expands a
  prompt into several rows still counts the prompt).
- ``progress``: ``False`` by default everywhere; the CLI and the study pass their own setting.
"""
from interp.models import DEFAULT_MODEL, EMBEDDED, ModelLoadError, load_model

__all__ = ["load_model", "ModelLoadError", "EMBEDDED", "DEFAULT_MODEL"]
