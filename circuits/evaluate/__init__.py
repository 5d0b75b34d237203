"""Evaluating component sets: ablated gaps with intervals and nulls, generalization across levels and
contexts, overlap, component cards.
"""
