"""Bias circuitry in language models, in the order of a study: ``inputs`` (contexts, names, prompts,
pairs, tables) -> ``measure`` (the answer-distribution metric, audit, sampling, agreement) ->
``select`` (component scores, strategies) -> ``evaluate`` (ablated gaps, generalization, overlap)
-> ``report`` (figures, pages) -> ``study`` (config, stages, runner, command line).

Built on the model-agnostic ``interp`` engine; nothing here attaches hooks itself.
"""
