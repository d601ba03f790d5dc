"""Metrics, batched greedy generation scored by them, evaluation during training by a run's settings, and the
training curves' plot. Imports the data and model layers.
"""
