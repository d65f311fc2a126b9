"""Calibrating label probabilities: each divided by a prior, then renormalised.

- ``contextual`` (Zhao et al. 2021, "Calibrate Before Use"): the prior is the mean
  label probabilities of content-free inputs (``N/A``, an empty tweet, ``[MASK]``) in
  the same prompt.
- ``batch`` (Zhou et al. 2024, "Batch Calibration"): the prior is the mean label
  probabilities of the scored tweets themselves, no extra prompt; each split (the
  validation sample, the test sample) is calibrated by its own mean.
"""

from __future__ import annotations

import numpy as np

#: Content-free inputs of contextual calibration.
CONTENT_FREE = ("N/A", "", "[MASK]")


def divide_by_prior(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Each row of ``probs`` divided by ``prior`` and renormalised to sum to 1 (a row
    that could not be scored, NaN, stays NaN)."""
    out = np.asarray(probs, dtype=np.float64) / np.asarray(prior, dtype=np.float64)
    return out / out.sum(axis=1, keepdims=True)


def batch_prior(probs: np.ndarray) -> np.ndarray:
    """The mean label probabilities of the scored rows (rows with NaN left out)."""
    scored = np.asarray(probs, dtype=np.float64)
    scored = scored[~np.isnan(scored).any(axis=1)]
    if not len(scored):
        raise ValueError("batch calibration needs at least one scored row")
    return scored.mean(axis=0)


def calibrate(
    probs: np.ndarray, method: str, content_free: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``probs`` calibrated by ``method`` (none, contextual: ``content_free`` holds the
    content-free inputs' probabilities; batch), and the prior used (None for none)."""
    if method == "none":
        return np.asarray(probs, dtype=np.float64), None
    if method == "contextual":
        if content_free is None:
            raise ValueError("contextual calibration needs the content-free probabilities")
        prior = batch_prior(content_free)
    elif method == "batch":
        prior = batch_prior(probs)
    else:
        raise ValueError(f"unknown calibration {method!r} (none, contextual, batch)")
    return divide_by_prior(probs, prior), prior
