"""Measuring bias: reading replies, the answer-distribution metric, intervals and tests, the audit,
sampling and its agreement with the metric.
"""
