"""Forecasting baselines: the bars CalM has to beat.

Protocol (DESIGN.md): trials `(trials, neurons, frames)` z-scored per neuron; the first `context` frames (40) are
given, the remaining `horizon = frames - context` frames (60 in the simulation) are forecast and scored with the
hierarchical Pearson r of `calm_hf.metrics.functional.forecast_pearson_r` (per neuron over the horizon, then
neurons -> trials).

Every forecaster has the same two calls:

- `fit(train_trials, val_trials)`: fits on the training trials and chooses its hyperparameters on the validation
  trials by the ROLLED-OUT forecast Pearson r from their first `context` frames (never on the training trials, never
  on test data). The grid, the score of every point and the choice are recorded in `self.search_log_`.
- `predict(context, horizon)`: `(trials, neurons, context_frames)` -> `(trials, neurons, horizon)`.

A forecaster instance models ONE session (a fixed set of neurons): the population models (ridge AR, TCN) have
neuron-specific weights. Benchmarks fit one instance per session and pool the scores with `session_ids`.

Measured on the simulated benchmark (DESIGN.md): population ridge AR r = 0.57; per-neuron AR 0.28.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from ..metrics.functional import forecast_pearson_r, mse
from .tcn import CalmBaselineTCN, autocast_context, search_learning_rate

__all__ = [
    "BaseForecaster",
    "MeanForecaster",
    "RidgeARForecaster",
    "PerNeuronARForecaster",
    "TCNForecaster",
    "forecast_score",
]

DEFAULT_ALPHA_GRID = tuple(float(a) for a in np.logspace(-4, 2, 7))


def forecast_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Hierarchical forecast Pearson r (neurons -> trials) used for every validation search; NaN counts as -inf."""
    value = forecast_pearson_r(pred, truth)["pearson_r"]
    return value if math.isfinite(value) else -math.inf


def check_trials(name: str, trials: Any, min_frames: int = 2) -> np.ndarray:
    """Validate a `(trials, neurons, frames)` array and return it as float64."""
    if isinstance(trials, torch.Tensor):
        trials = trials.detach().cpu().numpy()
    array = np.asarray(trials)
    if array.dtype == object:
        raise ValueError(f"`{name}` is ragged; pass a rectangular (trials, neurons, frames) array (one session).")
    array = array.astype(np.float64, copy=False)
    if array.ndim != 3:
        raise ValueError(
            f"`{name}` must be (trials, neurons, frames), got shape {array.shape}; add a trial axis with x[None] "
            "for a single trial."
        )
    if array.shape[0] < 1 or array.shape[1] < 1 or array.shape[2] < min_frames:
        raise ValueError(f"`{name}` with shape {array.shape} needs >= 1 trial, >= 1 neuron and >= {min_frames} frames.")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or inf; interpolate or drop those frames before fitting.")
    return array


class BaseForecaster:
    """Shared protocol plumbing: context/horizon split, input checks, scoring.

    Args:
        context (`int`, *optional*, defaults to 40): Context frames given to the forecaster.
    """

    def __init__(self, context: int = 40):
        if context < 1:
            raise ValueError(f"context must be >= 1 frame, got {context}.")
        self.context = context
        self.search_log_: dict[str, Any] = {}
        self.num_neurons_: int | None = None

    def _split(self, name: str, trials: Any) -> tuple[np.ndarray, np.ndarray]:
        array = check_trials(name, trials, min_frames=self.context + 2)
        return array[:, :, : self.context], array[:, :, self.context :]

    def _check_fitted(self) -> None:
        if self.num_neurons_ is None:
            raise ValueError(f"{type(self).__name__} is not fitted yet; call fit(train_trials, val_trials) first.")

    def _check_context(self, context: Any, min_frames: int = 1) -> np.ndarray:
        self._check_fitted()
        array = check_trials("context", context, min_frames=min_frames)
        if array.shape[1] != self.num_neurons_:
            raise ValueError(
                f"context has {array.shape[1]} neurons but the forecaster was fitted on {self.num_neurons_}; fit one "
                "forecaster per session."
            )
        return array

    def _check_fit_inputs(self, train_trials: Any, val_trials: Any) -> tuple[np.ndarray, np.ndarray]:
        train = check_trials("train_trials", train_trials, min_frames=self.context + 2)
        val = check_trials("val_trials", val_trials, min_frames=self.context + 2)
        if train.shape[1] != val.shape[1]:
            raise ValueError(
                f"train_trials has {train.shape[1]} neurons and val_trials {val.shape[1]}; both must come from one "
                "session."
            )
        self.num_neurons_ = train.shape[1]
        return train, val

    def predict(self, context: Any, horizon: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, trials: Any) -> dict[str, float]:
        """Forecast the frames after `context` of every trial and return `pearson_r` and `mse`."""
        context, future = self._split("trials", trials)
        pred = self.predict(context, future.shape[-1])
        return {"pearson_r": forecast_pearson_r(pred, future)["pearson_r"], "mse": mse(pred, future)}


class MeanForecaster(BaseForecaster):
    """Context-free mean forecasts.

    `"per_frame"`: per-neuron mean over training trials at each future frame index (captures trial-locked
    responses). `"global"`: per-neuron mean over all training frames (a constant forecast, so its Pearson r is
    undefined and reported as NaN). `"auto"` picks by validation MSE, because r cannot rank a constant forecast.

    Args:
        context (`int`, *optional*, defaults to 40): Context frames.
        variant (`str`, *optional*, defaults to `"per_frame"`): `"per_frame"`, `"global"` or `"auto"`.
    """

    VARIANTS = ("per_frame", "global")

    def __init__(self, context: int = 40, variant: str = "per_frame"):
        super().__init__(context)
        if variant not in (*self.VARIANTS, "auto"):
            raise ValueError(f"variant must be one of {self.VARIANTS + ('auto',)}, got {variant!r}.")
        self.variant = variant

    def fit(self, train_trials: Any, val_trials: Any) -> MeanForecaster:
        train, val = self._check_fit_inputs(train_trials, val_trials)
        self.frame_mean_ = train.mean(axis=0)  # (neurons, frames)
        self.global_mean_ = train.mean(axis=(0, 2))  # (neurons,)
        self.train_frames_ = train.shape[-1]
        candidates = self.VARIANTS if self.variant == "auto" else (self.variant,)
        val_context, val_future = val[:, :, : self.context], val[:, :, self.context :]
        results = []
        for variant in candidates:
            self.variant_ = variant
            pred = self.predict(val_context, val_future.shape[-1])
            results.append(
                {
                    "variant": variant,
                    "val_mse": mse(pred, val_future),
                    "val_pearson_r": forecast_pearson_r(pred, val_future)["pearson_r"],
                }
            )
        best = min(results, key=lambda row: row["val_mse"])
        self.variant_ = best["variant"]
        self.search_log_ = {"grid": {"variant": list(candidates)}, "criterion": "val_mse", "results": results,
                            "chosen": {"variant": self.variant_}}
        return self

    def predict(self, context: Any, horizon: int) -> np.ndarray:
        context = self._check_context(context)
        trials, neurons, start = context.shape
        if self.variant_ == "global":
            return np.broadcast_to(self.global_mean_[None, :, None], (trials, neurons, horizon)).astype(np.float32)
        if start + horizon > self.train_frames_:
            raise ValueError(
                f"context ({start}) + horizon ({horizon}) frames exceed the {self.train_frames_} frames of the training "
                "trials the per-frame means come from; use variant='global' or a shorter horizon."
            )
        means = self.frame_mean_[:, start : start + horizon]
        return np.broadcast_to(means[None], (trials, neurons, horizon)).astype(np.float32)


def _lag_stack(trials: np.ndarray, lags: int) -> tuple[np.ndarray, np.ndarray]:
    """One-step-ahead design: features `[x[t], x[t-1], ..., x[t-lags+1]]`, target `x[t+1]`.

    Args:
        trials: `(trials, neurons, frames)`.

    Returns:
        features `(trials * (frames - lags), neurons * lags)` (block k holds lag k) and targets
        `(trials * (frames - lags), neurons)`.
    """
    num_trials, neurons, frames = trials.shape
    steps = frames - lags
    blocks = [trials[:, :, lags - 1 - k : lags - 1 - k + steps] for k in range(lags)]  # each (trials, N, steps)
    features = np.concatenate(blocks, axis=1).transpose(0, 2, 1).reshape(num_trials * steps, neurons * lags)
    targets = trials[:, :, lags:].transpose(0, 2, 1).reshape(num_trials * steps, neurons)
    return features, targets


class _RidgeGram:
    """Sufficient statistics of a centred ridge regression, solved for many alphas through one eigendecomposition.

    The penalty is relative: `alpha * trace(X'X) / num_features`, so one alpha grid works for any data scale.
    """

    def __init__(self, xtx: np.ndarray, xty: np.ndarray, x_mean: np.ndarray, y_mean: np.ndarray):
        self.x_mean, self.y_mean, self.xtx = x_mean, y_mean, xtx
        self.eigenvalues, self.eigenvectors = np.linalg.eigh(xtx)
        self.eigenvalues = np.clip(self.eigenvalues, 0.0, None)
        self.projected = self.eigenvectors.T @ xty
        self.scale = max(float(np.trace(xtx)) / xtx.shape[0], 1e-12)

    @classmethod
    def from_chunks(cls, chunks) -> _RidgeGram:
        xtx = xty = x_sum = y_sum = None
        count = 0
        for features, targets in chunks:
            if xtx is None:
                xtx = np.zeros((features.shape[1], features.shape[1]))
                xty = np.zeros((features.shape[1], targets.shape[1]))
                x_sum, y_sum = np.zeros(features.shape[1]), np.zeros(targets.shape[1])
            xtx += features.T @ features
            xty += features.T @ targets
            x_sum += features.sum(axis=0)
            y_sum += targets.sum(axis=0)
            count += features.shape[0]
        x_mean, y_mean = x_sum / count, y_sum / count
        xtx -= count * np.outer(x_mean, x_mean)  # centre: the intercept is not penalised
        xty -= count * np.outer(x_mean, y_mean)
        return cls(xtx, xty, x_mean, y_mean)

    def solve(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Return weights `(features, targets)` and bias `(targets,)` for relative penalty `alpha`."""
        weights = self.eigenvectors @ (self.projected / (self.eigenvalues + alpha * self.scale)[:, None])
        return weights, self.y_mean - self.x_mean @ weights


class _RidgeDual:
    """The same ridge regression as `_RidgeGram`, solved in the dual (samples x samples) when there are fewer samples
    than features -- a population of thousands of neurons with many lags -- where the primal Gram matrix would be too
    large to decompose. `solve` returns the same primal weights."""

    def __init__(self, features: np.ndarray, targets: np.ndarray):
        self.x_mean, self.y_mean = features.mean(axis=0), targets.mean(axis=0)
        self.centred = features - self.x_mean
        kernel = self.centred @ self.centred.T
        self.eigenvalues, self.eigenvectors = np.linalg.eigh(kernel)
        self.eigenvalues = np.clip(self.eigenvalues, 0.0, None)
        self.projected = self.eigenvectors.T @ (targets - self.y_mean)
        self.scale = max(float(np.trace(kernel)) / features.shape[1], 1e-12)  # trace(X'X) = trace(XX')

    def solve(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        dual = self.eigenvectors @ (self.projected / (self.eigenvalues + alpha * self.scale)[:, None])
        weights = self.centred.T @ dual
        return weights, self.y_mean - self.x_mean @ weights


def ridge_system(features: np.ndarray, targets: np.ndarray) -> _RidgeGram | _RidgeDual:
    """The ridge regression of `targets` `(samples, outputs)` on `features` `(samples, features)`, in the primal or,
    with fewer samples than features, in the dual (same solutions)."""
    if len(features) < features.shape[1]:
        return _RidgeDual(features, targets)
    return _RidgeGram.from_chunks([(features, targets)])


def ridge_ar_system(train: np.ndarray, lags: int, chunk_trials: int = 64) -> _RidgeGram | _RidgeDual:
    """The one-step ridge AR(lags) regression of every transition of `train` `(trials, neurons, frames)`, in the
    primal (features x features Gram matrix, accumulated in chunks of trials) or, with fewer transitions than
    features, in the dual."""
    samples = len(train) * (train.shape[-1] - lags)
    if samples < train.shape[1] * lags:
        return ridge_system(*_lag_stack(train, lags))
    return _RidgeGram.from_chunks(_lag_stack(train[i : i + chunk_trials], lags) for i in range(0, len(train), chunk_trials))


class RidgeARForecaster(BaseForecaster):
    """Population ridge autoregression rolled out step by step (the strong linear bar, r = 0.57 in simulation).

    `x[t+1] = W [x[t], ..., x[t-lags+1]] + b` over all neurons of the session, fitted in closed form on every
    one-step transition of the training trials; `lags` and `alpha` are chosen by the rolled-out forecast Pearson r on
    the validation trials.

    Args:
        context (`int`, *optional*, defaults to 40): Context frames.
        lags_grid (`tuple[int, ...]`, *optional*, defaults to `(1, 2, 4, 8)`): Candidate AR orders.
        alpha_grid (`tuple[float, ...]`, *optional*): Candidate relative ridge penalties (multiplied by the mean
            eigenvalue of the centred Gram matrix); default `logspace(-4, 2, 7)`.
        chunk_trials (`int`, *optional*, defaults to 64): Trials per chunk when accumulating the Gram matrix
            (bounds memory at neurons*lags features).
    """

    def __init__(
        self,
        context: int = 40,
        lags_grid: tuple[int, ...] = (1, 2, 4, 8),
        alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID,
        chunk_trials: int = 64,
    ):
        super().__init__(context)
        if not lags_grid or min(lags_grid) < 1 or max(lags_grid) > context:
            raise ValueError(f"every lag in lags_grid={lags_grid} must be in [1, context={context}].")
        if not alpha_grid or min(alpha_grid) < 0:
            raise ValueError(f"alpha_grid={alpha_grid} must be non-empty with alphas >= 0.")
        self.lags_grid = tuple(int(lag) for lag in lags_grid)
        self.alpha_grid = tuple(float(alpha) for alpha in alpha_grid)
        self.chunk_trials = chunk_trials

    def fit(self, train_trials: Any, val_trials: Any) -> RidgeARForecaster:
        train, val = self._check_fit_inputs(train_trials, val_trials)
        val_context, val_future = val[:, :, : self.context], val[:, :, self.context :]
        results, best = [], None
        start = time.perf_counter()
        for lags in self.lags_grid:
            if lags >= train.shape[-1]:
                continue
            gram = ridge_ar_system(train, lags, self.chunk_trials)
            for alpha in self.alpha_grid:
                weights, bias = gram.solve(alpha)
                pred = self._rollout(val_context, weights, bias, lags, val_future.shape[-1])
                row = {"lags": lags, "alpha": alpha, "val_pearson_r": forecast_score(pred, val_future),
                       "val_mse": mse(pred, val_future) if np.isfinite(pred).all() else math.inf}
                results.append(row)
                if best is None or row["val_pearson_r"] > best[0]["val_pearson_r"]:
                    best = (row, weights, bias)
        row, self.weights_, self.bias_ = best
        self.lags_, self.alpha_ = row["lags"], row["alpha"]
        self.search_log_ = {
            "grid": {"lags": list(self.lags_grid), "alpha": list(self.alpha_grid)},
            "criterion": "val_pearson_r (rolled out from the validation context)",
            "results": results,
            "chosen": {"lags": self.lags_, "alpha": self.alpha_},
            "best_val_pearson_r": row["val_pearson_r"],
            "seconds": time.perf_counter() - start,
        }
        return self

    @staticmethod
    def _rollout(context: np.ndarray, weights: np.ndarray, bias: np.ndarray, lags: int, horizon: int) -> np.ndarray:
        trials, neurons, _ = context.shape
        # history[:, k] = x[t-k]: newest first, matching the feature blocks of `_lag_stack`
        history = context[:, :, ::-1][:, :, :lags].transpose(0, 2, 1).copy()  # (trials, lags, neurons)
        out = np.empty((trials, neurons, horizon))
        with np.errstate(over="ignore", invalid="ignore"):
            for step in range(horizon):
                nxt = history.reshape(trials, lags * neurons) @ weights + bias  # (trials, neurons)
                out[:, :, step] = nxt
                history = np.concatenate([nxt[:, None, :], history[:, :-1]], axis=1)
        return out

    def predict(self, context: Any, horizon: int) -> np.ndarray:
        """Roll out `horizon` frames after `context` `(trials, neurons, >= lags frames)`."""
        context = self._check_context(context, min_frames=1)
        if context.shape[-1] < self.lags_:
            raise ValueError(f"context has {context.shape[-1]} frames but the chosen AR order needs {self.lags_}.")
        return self._rollout(context, self.weights_, self.bias_, self.lags_, horizon).astype(np.float32)


class PerNeuronARForecaster(BaseForecaster):
    """Each neuron a linear map of its own history only (no population coupling; r = 0.28 in simulation).

    Two modes are searched on validation: `"autoregressive"`, a per-neuron ridge AR(lags) rolled out step by step,
    and `"direct"`, a per-neuron ridge map from the last `lags` context frames to all horizon frames at once.

    Args:
        context (`int`, *optional*, defaults to 40): Context frames.
        lags_grid (`tuple[int, ...]`, *optional*, defaults to `(1, 2, 4, 8, 16)`): Candidate history lengths.
        alpha_grid (`tuple[float, ...]`, *optional*): Candidate relative ridge penalties.
        modes (`tuple[str, ...]`, *optional*, defaults to `("autoregressive", "direct")`): Modes to search.
    """

    MODES = ("autoregressive", "direct")

    def __init__(
        self,
        context: int = 40,
        lags_grid: tuple[int, ...] = (1, 2, 4, 8, 16),
        alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID,
        modes: tuple[str, ...] = MODES,
    ):
        super().__init__(context)
        if not lags_grid or min(lags_grid) < 1 or max(lags_grid) > context:
            raise ValueError(f"every lag in lags_grid={lags_grid} must be in [1, context={context}].")
        if not modes or any(mode not in self.MODES for mode in modes):
            raise ValueError(f"modes must be a non-empty subset of {self.MODES}, got {modes}.")
        self.lags_grid = tuple(int(lag) for lag in lags_grid)
        self.alpha_grid = tuple(float(alpha) for alpha in alpha_grid)
        self.modes = tuple(modes)

    @staticmethod
    def _per_neuron_grams(features: np.ndarray, targets: np.ndarray):
        """features (samples, neurons, lags), targets (samples, neurons, outputs) -> centred Gram per neuron."""
        x_mean, y_mean = features.mean(axis=0), targets.mean(axis=0)  # (N, lags), (N, outputs)
        xc, yc = features - x_mean, targets - y_mean
        xtx = np.einsum("snk,snl->nkl", xc, xc)
        xty = np.einsum("snk,sno->nko", xc, yc)
        return xtx, xty, x_mean, y_mean

    @staticmethod
    def _solve(xtx, xty, x_mean, y_mean, alpha):
        lags = xtx.shape[-1]
        scale = np.trace(xtx, axis1=1, axis2=2) / lags + 1e-12  # (N,)
        weights = np.linalg.solve(xtx + alpha * scale[:, None, None] * np.eye(lags), xty)  # (N, lags, outputs)
        bias = y_mean - np.einsum("nk,nko->no", x_mean, weights)
        return weights, bias

    @staticmethod
    def _rollout(context, weights, bias, lags, horizon):
        history = context[:, :, ::-1][:, :, :lags].copy()  # (trials, N, lags), newest first
        out = np.empty(context.shape[:2] + (horizon,))
        with np.errstate(over="ignore", invalid="ignore"):
            for step in range(horizon):
                nxt = np.einsum("tnk,nk->tn", history, weights[:, :, 0]) + bias[:, 0]
                out[:, :, step] = nxt
                history = np.concatenate([nxt[:, :, None], history[:, :, :-1]], axis=2)
        return out

    def _design(self, trials: np.ndarray, mode: str, lags: int, horizon: int):
        if mode == "autoregressive":
            steps = trials.shape[-1] - lags
            features = np.stack([trials[:, :, lags - 1 - k : lags - 1 - k + steps] for k in range(lags)], axis=-1)
            features = features.transpose(0, 2, 1, 3).reshape(-1, trials.shape[1], lags)  # (samples, N, lags)
            targets = trials[:, :, lags:].transpose(0, 2, 1).reshape(-1, trials.shape[1], 1)
        else:  # direct: one sample per trial, origin at the end of the context as in the protocol
            features = trials[:, :, self.context - lags : self.context][:, :, ::-1]
            targets = trials[:, :, self.context : self.context + horizon]
        return features, targets

    def _predict_with(self, context, mode, lags, weights, bias, horizon):
        if mode == "autoregressive":
            return self._rollout(context, weights, bias, lags, horizon)
        if horizon > weights.shape[-1]:
            raise ValueError(
                f"the direct per-neuron map was fitted for a horizon of {weights.shape[-1]} frames, {horizon} requested."
            )
        features = context[:, :, ::-1][:, :, :lags]
        return (np.einsum("tnk,nko->tno", features, weights) + bias)[:, :, :horizon]

    def fit(self, train_trials: Any, val_trials: Any) -> PerNeuronARForecaster:
        train, val = self._check_fit_inputs(train_trials, val_trials)
        val_context, val_future = val[:, :, : self.context], val[:, :, self.context :]
        horizon = min(train.shape[-1], val.shape[-1]) - self.context
        results, best = [], None
        for mode in self.modes:
            for lags in self.lags_grid:
                grams = self._per_neuron_grams(*self._design(train, mode, lags, horizon))
                for alpha in self.alpha_grid:
                    weights, bias = self._solve(*grams, alpha)
                    pred = self._predict_with(val_context, mode, lags, weights, bias, val_future.shape[-1])
                    row = {"mode": mode, "lags": lags, "alpha": alpha,
                           "val_pearson_r": forecast_score(pred, val_future)}
                    results.append(row)
                    if best is None or row["val_pearson_r"] > best[0]["val_pearson_r"]:
                        best = (row, weights, bias)
        row, self.weights_, self.bias_ = best
        self.mode_, self.lags_, self.alpha_ = row["mode"], row["lags"], row["alpha"]
        self.search_log_ = {
            "grid": {"mode": list(self.modes), "lags": list(self.lags_grid), "alpha": list(self.alpha_grid)},
            "criterion": "val_pearson_r (forecast from the validation context)",
            "results": results,
            "chosen": {"mode": self.mode_, "lags": self.lags_, "alpha": self.alpha_},
            "best_val_pearson_r": row["val_pearson_r"],
        }
        return self

    def predict(self, context: Any, horizon: int) -> np.ndarray:
        context = self._check_context(context, min_frames=1)
        if context.shape[-1] < self.lags_:
            raise ValueError(f"context has {context.shape[-1]} frames but the chosen history length is {self.lags_}.")
        return self._predict_with(context, self.mode_, self.lags_, self.weights_, self.bias_, horizon).astype(
            np.float32
        )


class TCNForecaster(BaseForecaster):
    """Causal TCN over the whole population, trained one step ahead and rolled out autoregressively.

    Design choice: channels = the neurons of a session (a joint model, like the population ridge AR, so it can use
    cross-neuron coupling); the network predicts the next-frame change (`residual_input`), so an untrained model
    forecasts persistence. Rollouts use `CalmBaselineTCN.stream` (one frame of compute per step). Hyperparameters:
    each learning rate in `learning_rates` is trained in its own share of `max_seconds`; after every epoch the
    rolled-out validation Pearson r is measured and the best (learning rate, epoch) weights are kept.

    Args:
        context (`int`, *optional*, defaults to 40): Context frames.
        hidden_size (`int`, *optional*, defaults to 256), kernel_size (`int`, defaults to 5),
        dilations (`tuple[int, ...]`, defaults to `(1, 2, 4, 8, 16)`): Network size (5 layers by default).
        learning_rates (`tuple[float, ...]`, *optional*, defaults to `(1e-3, 3e-4)`): Learning-rate grid.
        max_epochs (`int`, *optional*, defaults to 50): Epoch cap per learning rate (the best epoch is selected).
        max_seconds (`float`, *optional*, defaults to 300): Total training budget, split evenly over the grid.
        batch_size (`int`, *optional*, defaults to 16): Trials per minibatch.
        dropout (`float`, *optional*, defaults to 0.0), weight_decay (`float`, defaults to 1e-4): Regularisation.
        bf16 (`bool`, *optional*, defaults to False): bf16 autocast for training and rollouts (only faster where
            bf16 is native: AMX CPUs, GPUs; see `tcn.autocast_context`).
        max_val_trials (`int`, *optional*): Score at most this many validation trials per evaluation (speed).
        device (`str`, *optional*, defaults to `"cpu"`), seed (`int`, defaults to 0).
    """

    def __init__(
        self,
        context: int = 40,
        hidden_size: int = 256,
        kernel_size: int = 5,
        dilations: tuple[int, ...] = (1, 2, 4, 8, 16),
        learning_rates: tuple[float, ...] = (1e-3, 3e-4),
        max_epochs: int = 50,
        max_seconds: float = 300.0,
        batch_size: int = 16,
        dropout: float = 0.0,
        weight_decay: float = 1e-4,
        bf16: bool = False,
        max_val_trials: int | None = None,
        device: str = "cpu",
        seed: int = 0,
    ):
        super().__init__(context)
        if not learning_rates or min(learning_rates) <= 0:
            raise ValueError(f"learning_rates={learning_rates} must be non-empty and positive.")
        if max_seconds <= 0 or max_epochs < 1:
            raise ValueError(f"max_seconds ({max_seconds}) must be > 0 and max_epochs ({max_epochs}) >= 1.")
        self.hidden_size, self.kernel_size, self.dilations = hidden_size, kernel_size, tuple(dilations)
        self.learning_rates = tuple(learning_rates)
        self.max_epochs, self.max_seconds, self.batch_size = max_epochs, max_seconds, batch_size
        self.dropout, self.weight_decay, self.bf16 = dropout, weight_decay, bf16
        self.max_val_trials, self.device, self.seed = max_val_trials, torch.device(device), seed

    def _new_model(self, neurons: int) -> CalmBaselineTCN:
        torch.manual_seed(self.seed)
        return CalmBaselineTCN(
            neurons, neurons, self.hidden_size, self.kernel_size, self.dilations, self.dropout, residual_input=True
        ).to(self.device)

    @torch.no_grad()
    def _rollout(self, model: CalmBaselineTCN, context: torch.Tensor, horizon: int) -> torch.Tensor:
        with autocast_context(self.bf16, self.device):
            frame, state = model.prefill(context)  # prediction of the first future frame
            frames = [frame.float()]
            for _ in range(horizon - 1):
                frame = model.stream(frames[-1], state)
                frames.append(frame.float())
        return torch.stack(frames, dim=-1)  # (trials, neurons, horizon)

    def fit(self, train_trials: Any, val_trials: Any) -> TCNForecaster:
        train, val = self._check_fit_inputs(train_trials, val_trials)
        if self.max_val_trials is not None:
            val = val[: self.max_val_trials]
        train_t = torch.as_tensor(train, dtype=torch.float32, device=self.device)
        val_context = torch.as_tensor(val[:, :, : self.context], dtype=torch.float32, device=self.device)
        val_future = val[:, :, self.context :]

        def loss_fn(model, index):
            batch = train_t[index.to(self.device)]
            with autocast_context(self.bf16, self.device):
                pred = model(batch[:, :, :-1])  # one step ahead: frame t predicts frame t+1
            return torch.mean((pred.float() - batch[:, :, 1:]) ** 2)

        def evaluate(model):
            pred = self._rollout(model, val_context, val_future.shape[-1]).cpu().numpy()
            return forecast_score(pred, val_future)

        run, self.learning_rate_, self.model_, results = search_learning_rate(
            lambda: self._new_model(train.shape[1]), loss_fn, len(train), evaluate, self.learning_rates,
            self.max_seconds, max_epochs=self.max_epochs, batch_size=self.batch_size, weight_decay=self.weight_decay,
            seed=self.seed,
        )
        self.epochs_ = run["best_epoch"]
        self.search_log_ = {
            "grid": {"learning_rate": list(self.learning_rates), "epoch": f"1..{self.max_epochs} (evaluated each epoch)"},
            "criterion": "val_pearson_r (rolled out from the validation context)",
            "results": results,
            "chosen": {"learning_rate": self.learning_rate_, "epoch": self.epochs_},
            "best_val_pearson_r": run["best_score"],
            "design": "channels = neurons of the session, residual next-frame prediction, streamed rollout",
        }
        return self

    def predict(self, context: Any, horizon: int) -> np.ndarray:
        context = self._check_context(context, min_frames=1)
        tensor = torch.as_tensor(context, dtype=torch.float32, device=self.device)
        return self._rollout(self.model_, tensor, horizon).cpu().numpy().astype(np.float32)
