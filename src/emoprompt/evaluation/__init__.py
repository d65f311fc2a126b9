"""Evaluation: strategies, the prediction job, prediction files, metrics, the baseline."""
