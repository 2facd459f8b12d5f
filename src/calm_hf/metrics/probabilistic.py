"""Scores of probabilistic forecasts given as quantiles: interval coverage, pinball loss and CRPS.

Every forecaster is scored the same way: from its quantiles at the same levels. A point forecaster gets a Gaussian
band around its forecast whose width per horizon frame is the spread of its residuals on validation trials
(`residual_quantiles`), so coverage and CRPS compare like with like.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CRPS_LEVELS", "interval_coverage", "pinball_loss", "quantile_crps", "residual_quantiles",
           "residual_scale"]

# Levels at which CRPS is approximated (an evenly spaced grid; CRPS = 2 * the mean pinball loss over them).
CRPS_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def _levels(levels: Any, count: int) -> np.ndarray:
    levels = np.asarray(levels, dtype=np.float64)
    if levels.ndim != 1 or len(levels) != count:
        raise ValueError(f"{count} quantile arrays need {count} levels, got {levels.shape}.")
    if not ((levels > 0) & (levels < 1)).all():
        raise ValueError(f"quantile levels must lie strictly between 0 and 1, got {levels.tolist()}.")
    return levels


def pinball_loss(quantiles: Any, levels: Any, truth: Any) -> np.ndarray:
    """Mean pinball (quantile) loss per level: `quantiles` `(levels, ...)`, `truth` `(...)` -> `(levels,)`."""
    quantiles = np.asarray(quantiles, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if quantiles.shape[1:] != truth.shape:
        raise ValueError(f"quantiles {quantiles.shape} must be (levels, *truth.shape) with truth {truth.shape}.")
    levels = _levels(levels, len(quantiles))
    error = truth[None] - quantiles
    shape = (-1,) + (1,) * truth.ndim
    loss = np.maximum(levels.reshape(shape) * error, (levels.reshape(shape) - 1.0) * error)
    return loss.reshape(len(levels), -1).mean(axis=1)


def quantile_crps(quantiles: Any, levels: Any, truth: Any) -> float:
    """CRPS approximated from quantiles at evenly spaced levels: twice the mean pinball loss over the levels."""
    return float(2.0 * pinball_loss(quantiles, levels, truth).mean())


def interval_coverage(lower: Any, upper: Any, truth: Any) -> float:
    """Fraction of true values inside `[lower, upper]` (e.g. the 5% and 95% quantiles: nominal 90%)."""
    lower, upper, truth = (np.asarray(a, dtype=np.float64) for a in (lower, upper, truth))
    if not lower.shape == upper.shape == truth.shape:
        raise ValueError(f"lower {lower.shape}, upper {upper.shape} and truth {truth.shape} must have one shape.")
    return float(((truth >= lower) & (truth <= upper)).mean())


def residual_scale(pred: Any, truth: Any) -> np.ndarray:
    """Residual std per horizon frame, pooled over trials and neurons: `(trials, neurons, horizon)` -> `(horizon,)`."""
    residual = np.asarray(truth, dtype=np.float64) - np.asarray(pred, dtype=np.float64)
    if residual.ndim != 3:
        raise ValueError(f"pred and truth must be (trials, neurons, horizon), got {residual.shape}.")
    return np.sqrt((residual**2).reshape(-1, residual.shape[-1]).mean(axis=0))


def residual_quantiles(pred: Any, scale: Any, levels: Any = CRPS_LEVELS) -> np.ndarray:
    """Gaussian quantiles `(levels, trials, neurons, horizon)` around a point forecast `(trials, neurons, horizon)`
    with a per-frame `scale` `(horizon,)` (from `residual_scale` on validation trials; frames beyond it reuse its
    last value)."""
    pred = np.asarray(pred, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    horizon = pred.shape[-1]
    if len(scale) < horizon:
        scale = np.concatenate([scale, np.full(horizon - len(scale), scale[-1])])
    from scipy.stats import norm  # imported on use: scipy.stats is slow to import

    z = norm.ppf(_levels(levels, len(levels)))
    return pred[None] + z.reshape(-1, 1, 1, 1) * scale[:horizon]
