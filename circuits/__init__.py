"""Bias circuitry: decision contexts, names, counterfactual prompts, bias metrics and audits.

Built on the model-agnostic ``interp`` engine; nothing here attaches hooks itself.
"""
