"""Evaluation metrics and report writers."""
