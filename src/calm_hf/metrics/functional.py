"""Plain numpy metrics for CalM: forecast Pearson r, MSE and R^2.

These functions are the single implementation behind the `evaluate` metric modules shipped in this package
(`calm_hf/metrics/<name>/<name>.py`), `Trainer.compute_metrics` and the benchmarks.

NaN handling (forecast Pearson r): the Pearson correlation of a trace that is constant over the horizon (in the
prediction or in the truth) is undefined. `pearson_r_per_neuron` returns NaN there; `forecast_pearson_r` excludes those
NaNs from every mean (a trial whose neurons are all NaN is dropped from its session mean, a session whose trials are all
NaN is dropped from the overall mean) and reports how many neuron-trials were excluded as `num_nan`. Padded neurons
(`neuron_mask == False`) are not scored and not counted in `num_nan`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["pearson_r_per_neuron", "forecast_pearson_r", "mse", "r2_score", "forecast_metrics", "stack_trials"]

# Below this variance (in the traces' units squared) a trace counts as constant and its r is NaN.
_CONSTANT_EPS = 1e-12


def _as_float_array(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensors without importing torch
        value = value.detach().float().cpu().numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.dtype == object:
        raise ValueError(f"`{name}` is ragged; pad it to a rectangular array and pass `neuron_mask`.")
    return array


def _check_same_shape(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape:
        raise ValueError(
            f"`pred` has shape {pred.shape} but `truth` has shape {truth.shape}; pass arrays of the same shape "
            "(crop the forecast to the horizon you score)."
        )


def pearson_r_per_neuron(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson r of every neuron's forecast with its true trace over the forecast horizon.

    Args:
        pred (`np.ndarray` of shape `(trials, neurons, horizon)`):
            Forecast traces.
        truth (`np.ndarray` of shape `(trials, neurons, horizon)`):
            True traces.

    Returns:
        `np.ndarray` of shape `(trials, neurons)`: the correlation over the last axis, NaN where either trace is
        constant over the horizon (the correlation is undefined there).
    """
    pred = _as_float_array("pred", pred)
    truth = _as_float_array("truth", truth)
    _check_same_shape(pred, truth)
    if pred.ndim != 3:
        raise ValueError(
            f"`pred` and `truth` must be (trials, neurons, horizon), got {pred.ndim} dims with shape {pred.shape}; "
            "add the missing axes (e.g. `x[None]` for a single trial)."
        )
    if pred.shape[-1] < 2:
        raise ValueError(f"The horizon must have at least 2 frames to compute a correlation, got {pred.shape[-1]}.")
    pred_centered = pred - pred.mean(axis=-1, keepdims=True)
    truth_centered = truth - truth.mean(axis=-1, keepdims=True)
    pred_ss = (pred_centered**2).sum(axis=-1)
    truth_ss = (truth_centered**2).sum(axis=-1)
    covariance = (pred_centered * truth_centered).sum(axis=-1)
    horizon = pred.shape[-1]
    constant = (pred_ss <= _CONSTANT_EPS * horizon) | (truth_ss <= _CONSTANT_EPS * horizon)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = covariance / np.sqrt(pred_ss * truth_ss)
    r = np.where(constant | ~np.isfinite(r), np.nan, r)
    return np.clip(r, -1.0, 1.0)


def forecast_pearson_r(
    pred: np.ndarray,
    truth: np.ndarray,
    session_ids: np.ndarray | None = None,
    neuron_mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """Hierarchical forecast Pearson r, the paper's headline metric.

    r is computed per neuron over the horizon, averaged over the neurons of each trial, then over the trials of each
    session, then over sessions (so a session with many trials or many neurons does not dominate).

    Args:
        pred (`np.ndarray` of shape `(trials, neurons, horizon)`):
            Forecast traces for the scored horizon only.
        truth (`np.ndarray` of shape `(trials, neurons, horizon)`):
            True traces.
        session_ids (`np.ndarray` of shape `(trials,)`, *optional*):
            Session of every trial. All trials are one session when omitted.
        neuron_mask (`np.ndarray` of shape `(trials, neurons)` or `(neurons,)`, *optional*):
            True for real neurons, False for padding; padded neurons are not scored.

    Returns:
        `dict` with `pearson_r` (float, NaN if nothing could be scored), `per_session` (`{session_id: mean r}`),
        `num_nan` (neuron-trials excluded because a trace was constant) and `num_scored` (neuron-trials that entered
        the means).
    """
    r = pearson_r_per_neuron(pred, truth)  # (trials, neurons)
    num_trials, num_neurons = r.shape
    if neuron_mask is None:
        mask = np.ones_like(r, dtype=bool)
    else:
        mask = np.asarray(neuron_mask, dtype=bool)
        if mask.shape == (num_neurons,):
            mask = np.broadcast_to(mask, r.shape)
        if mask.shape != r.shape:
            raise ValueError(
                f"`neuron_mask` has shape {mask.shape}; expected (trials, neurons) = {r.shape} or (neurons,) = "
                f"({num_neurons},)."
            )
    if session_ids is None:
        sessions = np.zeros(num_trials, dtype=np.int64)
    else:
        sessions = np.asarray(session_ids).reshape(-1)
        if sessions.shape[0] != num_trials:
            raise ValueError(
                f"`session_ids` has {sessions.shape[0]} entries but there are {num_trials} trials; pass one id per trial."
            )
    nan_mask = np.isnan(r) & mask
    valid = mask & ~np.isnan(r)
    counts = valid.sum(axis=1)
    trial_means = np.full(num_trials, np.nan)
    has_neurons = counts > 0
    trial_means[has_neurons] = np.where(valid, r, 0.0).sum(axis=1)[has_neurons] / counts[has_neurons]

    per_session: dict[Any, float] = {}
    for session in np.unique(sessions):
        session_trials = trial_means[sessions == session]
        session_trials = session_trials[~np.isnan(session_trials)]
        key = session.item() if hasattr(session, "item") else session
        per_session[key] = float(session_trials.mean()) if session_trials.size else float("nan")
    session_values = np.array([v for v in per_session.values() if not np.isnan(v)])
    pearson_r = float(session_values.mean()) if session_values.size else float("nan")
    return {
        "pearson_r": pearson_r,
        "per_session": per_session,
        "num_nan": int(nan_mask.sum()),
        "num_scored": int(valid.sum()),
    }


def mse(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared error over all entries, or over the entries where `mask` is True.

    Args:
        pred (`np.ndarray` of any shape): Predictions.
        truth (`np.ndarray` of the same shape): Targets.
        mask (`np.ndarray`, *optional*): Boolean, broadcastable to `pred` from the left (e.g. a `(trials, neurons)`
            neuron mask for `(trials, neurons, frames)` traces). True = scored.

    Returns:
        `float`: the mean squared error (NaN if the mask selects nothing).
    """
    pred = _as_float_array("pred", pred)
    truth = _as_float_array("truth", truth)
    _check_same_shape(pred, truth)
    squared = (pred - truth) ** 2
    if mask is None:
        return float(squared.mean()) if squared.size else float("nan")
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != squared.shape:
        if squared.shape[: mask.ndim] != mask.shape:
            raise ValueError(
                f"`mask` has shape {mask.shape}, which matches neither the data shape {squared.shape} nor its "
                "leading axes; pass a boolean mask of the data shape or of its leading axes."
            )
        mask = np.broadcast_to(mask.reshape(mask.shape + (1,) * (squared.ndim - mask.ndim)), squared.shape)
    if not mask.any():
        return float("nan")
    return float(squared[mask].mean())


def r2_score(pred: np.ndarray, truth: np.ndarray, multioutput: str = "raw_values") -> np.ndarray | float:
    """Coefficient of determination per channel, `1 - SS_res / SS_tot` over all samples.

    Args:
        pred (`np.ndarray` of shape `(..., channels)`): Predictions; every axis but the last is a sample axis
            (e.g. `(trials, frames, channels)` behaviour).
        truth (`np.ndarray` of the same shape): Targets.
        multioutput (`str`, *optional*, defaults to `"raw_values"`): `"raw_values"` returns one R^2 per channel,
            `"uniform_average"` their mean.

    Returns:
        `np.ndarray` of shape `(channels,)` or `float`. A channel whose target is constant gets NaN (R^2 undefined);
        `"uniform_average"` ignores those NaNs.
    """
    if multioutput not in ("raw_values", "uniform_average"):
        raise ValueError(f"`multioutput` must be 'raw_values' or 'uniform_average', got {multioutput!r}.")
    pred = _as_float_array("pred", pred)
    truth = _as_float_array("truth", truth)
    _check_same_shape(pred, truth)
    if pred.ndim == 1:
        pred, truth = pred[:, None], truth[:, None]
    pred = pred.reshape(-1, pred.shape[-1])
    truth = truth.reshape(-1, truth.shape[-1])
    ss_res = ((truth - pred) ** 2).sum(axis=0)
    ss_tot = ((truth - truth.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.nan)
    if multioutput == "raw_values":
        return r2
    finite = r2[~np.isnan(r2)]
    return float(finite.mean()) if finite.size else float("nan")


def forecast_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    session_ids: np.ndarray | None = None,
    neuron_mask: np.ndarray | None = None,
    prefix: str = "",
) -> dict[str, float | int]:
    """All forecasting metrics in one flat dict of scalars, ready for `Trainer` logs or a model card.

    Args:
        pred (`np.ndarray` of shape `(trials, neurons, horizon)`): Forecast traces over the horizon.
        truth (`np.ndarray` of shape `(trials, neurons, horizon)`): True traces.
        session_ids (`np.ndarray` of shape `(trials,)`, *optional*): Session of every trial.
        neuron_mask (`np.ndarray` of shape `(trials, neurons)`, *optional*): True for real neurons.
        prefix (`str`, *optional*): Prepended to every key (e.g. `"eval_"`).

    Returns:
        `dict` with `pearson_r`, `pearson_r_session_<id>` per session, `mse`, `num_nan`.
    """
    pearson = forecast_pearson_r(pred, truth, session_ids=session_ids, neuron_mask=neuron_mask)
    if neuron_mask is not None:
        # A (neurons,) mask applies to every trial; mse wants the leading axes of the data.
        neuron_mask = np.broadcast_to(np.asarray(neuron_mask, dtype=bool), np.shape(pred)[:2])
    metrics: dict[str, float | int] = {"pearson_r": pearson["pearson_r"]}
    if len(pearson["per_session"]) > 1:
        for session, value in pearson["per_session"].items():
            metrics[f"pearson_r_session_{session}"] = value
    metrics["mse"] = mse(pred, truth, mask=neuron_mask)
    metrics["num_nan"] = pearson["num_nan"]
    return {f"{prefix}{key}": value for key, value in metrics.items()}


def stack_trials(trials: Any) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-trial `(neurons, horizon)` arrays whose neuron counts differ into one zero-padded array.

    Used by the `evaluate` modules, whose rows are single trials from sessions of different sizes.

    Args:
        trials (sequence of array-likes of shape `(neurons_i, horizon)`): One entry per trial; the horizon must agree.

    Returns:
        `(stacked, neuron_mask)`: `stacked` of shape `(trials, max_neurons, horizon)` and a boolean `neuron_mask` of
        shape `(trials, max_neurons)` that is False on the padding.
    """
    arrays = [np.asarray(trial, dtype=np.float64) for trial in trials]
    if not arrays:
        raise ValueError("No trials to score; pass at least one (neurons, horizon) trial.")
    for index, array in enumerate(arrays):
        if array.ndim != 2:
            raise ValueError(
                f"Trial {index} has shape {array.shape}; every trial must be (neurons, horizon)."
            )
    horizons = {array.shape[1] for array in arrays}
    if len(horizons) > 1:
        raise ValueError(f"Trials have different horizons {sorted(horizons)}; crop every forecast to the same horizon.")
    max_neurons = max(array.shape[0] for array in arrays)
    stacked = np.zeros((len(arrays), max_neurons, horizons.pop()))
    neuron_mask = np.zeros((len(arrays), max_neurons), dtype=bool)
    for index, array in enumerate(arrays):
        stacked[index, : array.shape[0]] = array
        neuron_mask[index, : array.shape[0]] = True
    return stacked, neuron_mask
