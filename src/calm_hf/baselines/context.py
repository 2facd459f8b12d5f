"""Context-only forecasting baselines: what a user has before fitting anything on a new recording.

- `LastSecondMeanForecaster`: each neuron's mean over the last second of its context, held flat (a constant
  forecast: its Pearson r is undefined and reported as NaN; it is compared on MSE).
- `ContextARForecaster`: for every trial and neuron separately, a ridge AR fitted on that trial's own context and
  rolled out (an explosive fit is damped to a stable one); the history length and ridge strength are chosen on the
  validation trials (each validation trial fitted on its own context the same way), never on test data.

Both follow the protocol of `calm_hf.baselines.forecasting` (`fit(train_trials, val_trials)`, `predict(context,
horizon)`), with `train_trials` unused: they need no training recording, which is the zero-shot setting.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .forecasting import DEFAULT_ALPHA_GRID, BaseForecaster, check_trials, forecast_score

__all__ = ["ContextARForecaster", "LastSecondMeanForecaster"]


class LastSecondMeanForecaster(BaseForecaster):
    """The mean of the last `window_seconds` of the context, held flat over the horizon.

    Args:
        context (`int`, *optional*, defaults to 40): Context frames.
        frame_rate_hz (`float`, *optional*, defaults to 5.0): frame rate of the traces.
        window_seconds (`float`, *optional*, defaults to 1.0): how much of the context end is averaged.
    """

    def __init__(self, context: int = 40, frame_rate_hz: float = 5.0, window_seconds: float = 1.0):
        super().__init__(context)
        if not (math.isfinite(frame_rate_hz) and frame_rate_hz > 0 and math.isfinite(window_seconds)
                and window_seconds > 0):
            raise ValueError(f"frame_rate_hz ({frame_rate_hz}) and window_seconds ({window_seconds}) must be positive.")
        self.window = max(1, int(round(window_seconds * frame_rate_hz)))

    def fit(self, train_trials: Any = None, val_trials: Any = None) -> LastSecondMeanForecaster:
        """Nothing to fit; records the neuron count of whichever split is given (a context-only forecaster)."""
        given = val_trials if val_trials is not None else train_trials
        self.num_neurons_ = None if given is None else check_trials("trials", given).shape[1]
        self.search_log_ = {"window_frames": self.window}
        return self

    def predict(self, context: Any, horizon: int) -> np.ndarray:
        array = check_trials("context", context)
        if self.num_neurons_ is not None and array.shape[1] != self.num_neurons_:
            raise ValueError(f"context has {array.shape[1]} neurons, the forecaster saw {self.num_neurons_}.")
        level = array[:, :, -min(self.window, array.shape[-1]) :].mean(axis=-1, keepdims=True)
        return np.repeat(level, int(horizon), axis=-1).astype(np.float32)


def _context_ar_fit(context: np.ndarray, lags: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per (trial, neuron) ridge AR(lags) on that row's own frames: weights `(trials, neurons, lags)`, bias
    `(trials, neurons)`. Ridge relative to the mean diagonal of each row's Gram matrix."""
    frames = context.shape[-1]
    samples = frames - lags
    # (trials, neurons, samples, lags): newest lag first
    features = np.stack([context[:, :, lags - 1 - k : lags - 1 - k + samples] for k in range(lags)], axis=-1)
    targets = context[:, :, lags:]
    x_mean, y_mean = features.mean(axis=2), targets.mean(axis=2)
    xc, yc = features - x_mean[:, :, None], targets - y_mean[:, :, None]
    gram = np.einsum("tnsk,tnsl->tnkl", xc, xc)
    scale = np.trace(gram, axis1=2, axis2=3) / lags + 1e-12
    gram = gram + (alpha * scale)[..., None, None] * np.eye(lags)
    weights = _stabilise(np.linalg.solve(gram, np.einsum("tnsk,tns->tnk", xc, yc)[..., None])[..., 0])
    return weights, y_mean - np.einsum("tnk,tnk->tn", x_mean, weights)


def _stabilise(weights: np.ndarray, max_radius: float = 0.99) -> np.ndarray:
    """AR coefficients `(..., lags)` (newest lag first) whose rollout would grow without bound are damped: scaling
    lag k's coefficient by c^k scales every root of the AR polynomial by c, so c = max_radius / spectral radius
    brings the fit back to a stable process with the same shape (a fit on 40 frames is often explosive)."""
    lags = weights.shape[-1]
    companion = np.zeros(weights.shape[:-1] + (lags, lags))
    companion[..., 0, :] = weights
    if lags > 1:
        companion[..., np.arange(1, lags), np.arange(lags - 1)] = 1.0
    radius = np.abs(np.linalg.eigvals(companion)).max(axis=-1)
    scale = np.where(radius > max_radius, max_radius / np.maximum(radius, 1e-12), 1.0)
    return weights * scale[..., None] ** np.arange(1, lags + 1)


def _context_ar_rollout(context: np.ndarray, weights: np.ndarray, bias: np.ndarray, horizon: int) -> np.ndarray:
    lags = weights.shape[-1]
    history = context[:, :, ::-1][:, :, :lags].copy()
    out = np.empty(context.shape[:2] + (horizon,))
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(horizon):
            nxt = np.einsum("tnk,tnk->tn", history, weights) + bias
            out[:, :, step] = nxt
            history = np.concatenate([nxt[:, :, None], history[:, :, :-1]], axis=2)
    return out


class ContextARForecaster(BaseForecaster):
    """Per trial and neuron, a ridge AR fitted on the trial's own context and rolled out over the horizon.

    Args:
        context (`int`, *optional*, defaults to 40): Context frames.
        lags_grid (`tuple[int, ...]`, *optional*): candidate AR orders (each at most a third of the context).
        alpha_grid (`tuple[float, ...]`, *optional*): candidate relative ridge strengths.
    """

    def __init__(self, context: int = 40, lags_grid: tuple[int, ...] = (1, 2, 4, 8),
                 alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID):
        super().__init__(context)
        self.lags_grid = tuple(int(lag) for lag in lags_grid if 1 <= int(lag) <= max(1, context // 3))
        if not self.lags_grid:
            raise ValueError(f"no AR order in {lags_grid} fits a context of {context} frames (at most context // 3).")
        self.alpha_grid = tuple(float(a) for a in alpha_grid)

    def fit(self, train_trials: Any = None, val_trials: Any = None) -> ContextARForecaster:
        """Choose the AR order and ridge strength on the validation trials (`train_trials` is not used)."""
        if val_trials is None:
            raise ValueError("ContextARForecaster chooses its AR order on validation trials: pass val_trials.")
        val = check_trials("val_trials", val_trials, min_frames=self.context + 2)
        self.num_neurons_ = val.shape[1]
        context, future = val[:, :, : self.context], val[:, :, self.context :]
        results, best = [], None
        for lags in self.lags_grid:
            for alpha in self.alpha_grid:
                pred = _context_ar_rollout(context, *_context_ar_fit(context, lags, alpha), future.shape[-1])
                row = {"lags": lags, "alpha": alpha, "val_pearson_r": forecast_score(pred, future)}
                results.append(row)
                if best is None or row["val_pearson_r"] > best["val_pearson_r"]:
                    best = row
        self.lags_, self.alpha_ = best["lags"], best["alpha"]
        self.search_log_ = {"grid": {"lags": list(self.lags_grid), "alpha": list(self.alpha_grid)},
                            "criterion": "val_pearson_r (each validation trial fitted on its own context)",
                            "results": results, "chosen": {"lags": self.lags_, "alpha": self.alpha_}}
        return self

    def predict(self, context: Any, horizon: int) -> np.ndarray:
        array = self._check_context(context, min_frames=self.lags_ + 2)
        return _context_ar_rollout(array, *_context_ar_fit(array, self.lags_, self.alpha_), int(horizon)).astype(
            np.float32)
