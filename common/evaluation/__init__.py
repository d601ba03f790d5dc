"""Metrics, batched greedy generation scored by them, and the training curves' plot. Imports the data and
model layers.
"""
