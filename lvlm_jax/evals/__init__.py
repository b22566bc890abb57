"""Evaluation: metrics and the runners that compute them from a model and its params."""
