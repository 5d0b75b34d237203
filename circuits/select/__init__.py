"""Choosing components: pair-free and pair scores with exact refinement, the papers' baselines, pruning
strategies.
"""
