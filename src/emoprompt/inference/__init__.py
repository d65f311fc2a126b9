"""Inference: the engine (first-token scores, label likelihoods, generation) and its speed-ups."""
