"""Forecasting with a CalM checkpoint: tokenize a context, roll out the dual-axis transformer, decode.

`CalmForecaster` works on z-scored traces at the model's frame rate (`forecast`), or on raw traces through the
checkpoint's `CalmTraceProcessor` (`forecast_traces`); the `"neural-forecasting"` pipeline
(`pipeline_neural_forecasting.py`) wraps the latter. `evaluate_forecasting` scores a held-out split with the paper's
protocol and serves `training/pretrain.py`, the main job and the benchmarks.

This file ships with checkpoints (the pipeline imports it), so it imports only numpy, torch and its siblings.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

ROLLOUT_MODES = ("greedy", "sample", "mean", "soft")


@dataclass
class ForecastResult:
    """Forecast of `horizon` frames for every neuron, z-scored units.

    Attributes:
        forecast: (batch, neurons, horizon) point forecast (the mean of the samples when several were drawn).
        samples: (batch, num_samples, neurons, horizon) sampled futures, or None for a single rollout.
        codes: (batch, num_samples, neurons, context_steps + new_steps) the token grids that were decoded.
    """

    forecast: np.ndarray
    samples: np.ndarray | None
    codes: np.ndarray


def check_tokenizer_matches_model(model, tokenizer) -> None:
    """Raise a ValueError naming the mismatch when a tokenizer cannot feed this dual-axis transformer."""
    codebook = tokenizer.config.codebook_size
    vocab = model.config.vocab_size
    if codebook != vocab:
        raise ValueError(
            f"tokenizer codebook_size={codebook} differs from the model's vocab_size={vocab}: load the tokenizer that "
            "was saved with this checkpoint (its `tokenizer/` subfolder) or retokenize and pretrain with this one."
        )
    if tokenizer.config.window_size != model.config.window_size:
        raise ValueError(
            f"tokenizer window_size={tokenizer.config.window_size} differs from the model's "
            f"window_size={model.config.window_size}: use the tokenizer saved with this checkpoint."
        )


class CalmForecaster:
    """Roll a `CalmForCausalNeuralModeling` forward from a context of z-scored traces.

    Args:
        model: the dual-axis transformer with its next-token head.
        tokenizer: the `CalmTokenizer` it was pretrained on.
        autocast_dtype: `torch.bfloat16` to run under CPU/GPU autocast (fast on AMX CPUs), or None for fp32.
    """

    def __init__(self, model, tokenizer, autocast_dtype: torch.dtype | None = None):
        check_tokenizer_matches_model(model, tokenizer)
        self.model = model.eval()
        self.tokenizer = tokenizer.eval()
        self.autocast_dtype = autocast_dtype
        self.window_size = model.config.window_size

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.model.parameters()).device.type
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def tokenize(self, context_values: torch.Tensor) -> torch.Tensor:
        """(batch, neurons, frames) z-scored -> codes (batch, neurons, frames // L); the OLDEST frames are dropped
        when frames is not a multiple of L, so the context stays aligned with its end."""
        frames = context_values.shape[-1]
        if frames < self.window_size:
            raise ValueError(
                f"context has {frames} frames, shorter than one token window of {self.window_size} frames at the "
                f"model rate: give at least {self.window_size} frames (the paper uses 40)."
            )
        usable = frames - frames % self.window_size
        with self._autocast():
            return self.tokenizer.encode(context_values[..., frames - usable :]).codes

    @torch.no_grad()
    def rollout(
        self,
        context_ids: torch.Tensor,
        new_steps: int,
        neuron_ids: torch.Tensor | None = None,
        session_ids: torch.Tensor | None = None,
        neuron_mask: torch.Tensor | None = None,
        mode: str = "greedy",
        num_samples: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """Token rollout. Returns (batch, num_samples, neurons, context_steps + new_steps) codes.

        `greedy` takes the argmax (one rollout), `sample`/`mean` draw `num_samples` futures (`mean` is `sample`
        whose decoded traces the caller averages), `soft` feeds back the probability-weighted embedding.
        """
        if mode not in ROLLOUT_MODES:
            raise ValueError(f"mode={mode!r} is not one of {ROLLOUT_MODES}.")
        batch, neurons, _ = context_ids.shape
        if mode in ("greedy", "soft"):
            num_samples = 1
        with self._autocast():
            if mode == "soft":
                sequences = self.model.rollout(
                    context_ids,
                    max_new_tokens=new_steps,
                    mode="soft",
                    neuron_ids=neuron_ids,
                    session_ids=session_ids,
                    neuron_mask=neuron_mask,
                ).codes
            else:
                sequences = self.model.generate(
                    input_ids=context_ids,
                    neuron_ids=neuron_ids,
                    session_ids=session_ids,
                    neuron_mask=neuron_mask,
                    max_new_tokens=new_steps,
                    min_new_tokens=new_steps,
                    do_sample=mode != "greedy",
                    temperature=temperature if mode != "greedy" else None,
                    top_k=top_k if mode != "greedy" else None,
                    top_p=top_p if mode != "greedy" else None,
                    num_return_sequences=num_samples,
                )
        return sequences.reshape(batch, num_samples, neurons, -1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., neurons, steps) codes -> (..., neurons, steps * L) z-scored traces."""
        lead = codes.shape[:-2]
        flat = codes.reshape(-1, *codes.shape[-2:])
        with self._autocast():
            values = self.tokenizer.decode(flat).trace_values
        return values.float().reshape(*lead, codes.shape[-2], -1)

    def forecast(
        self,
        context_values: torch.Tensor | np.ndarray,
        horizon: int,
        neuron_ids: torch.Tensor | None = None,
        session_ids: torch.Tensor | None = None,
        neuron_mask: torch.Tensor | None = None,
        context_ids: torch.Tensor | None = None,
        mode: str = "greedy",
        num_samples: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> ForecastResult:
        """Forecast `horizon` frames after a context.

        Args:
            context_values: (batch, neurons, frames) z-scored context at the model rate.
            horizon: number of future frames wanted.
            context_ids: pre-computed context codes (batch, neurons, steps); skips tokenization when given.
            mode, num_samples, temperature, top_k, top_p: see `rollout`.
        """
        if horizon < 1:
            raise ValueError(f"horizon={horizon} must be at least one frame.")
        if context_ids is None:
            values = torch.as_tensor(np.asarray(context_values, dtype=np.float32))
            if values.ndim != 3:
                raise ValueError(
                    f"context_values must be (batch, neurons, frames), got shape {tuple(values.shape)}; "
                    "for one recording use x[None]."
                )
            if not torch.isfinite(values).all():
                bad = torch.nonzero(~torch.isfinite(values))[0].tolist()
                raise ValueError(
                    f"context_values contain NaN/Inf (first at batch {bad[0]}, neuron {bad[1]}, frame {bad[2]}): "
                    "interpolate or drop that neuron before forecasting."
                )
            context_ids = self.tokenize(values)
        return self._predict(
            context_ids,
            horizon,
            neuron_ids=neuron_ids,
            session_ids=session_ids,
            neuron_mask=neuron_mask,
            mode=mode,
            num_samples=num_samples,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )

    def _predict(self, context_ids: torch.Tensor, horizon: int, **rollout_kwargs) -> ForecastResult:
        """The model call: context codes (batch, neurons, steps) -> `horizon` z-scored frames after the context.
        Kept in one place so another point forecast (e.g. a continuous head) can replace the token rollout."""
        new_steps = -(-horizon // self.window_size)
        codes = self.rollout(context_ids, new_steps, **rollout_kwargs)
        # The decoder sees context and rollout together so the seam is decoded with its left context.
        decoded = self.decode(codes)  # (batch, samples, neurons, frames)
        context_frames = context_ids.shape[-1] * self.window_size
        future = decoded[..., context_frames : context_frames + horizon].numpy()
        samples = future if future.shape[1] > 1 else None
        return ForecastResult(forecast=future.mean(axis=1), samples=samples, codes=codes.numpy())

    def forecast_traces(
        self,
        traces: np.ndarray,
        horizon: int,
        processor=None,
        sampling_rate: float | None = None,
        mean: np.ndarray | None = None,
        std: np.ndarray | None = None,
        max_context_frames: int | None = None,
        **forecast_kwargs,
    ) -> dict:
        """Forecast raw traces `(batch, neurons, frames)` (or `(neurons, frames)`) in their own units and rate.

        `processor` (a `CalmTraceProcessor`; default: one matching the model config) resamples (end aligned),
        z-scores and crops; the model forecasts at its rate; the processor maps the forecast back. Returns a dict
        with `forecast` `(batch, neurons, horizon)`, `samples` `(batch, samples, neurons, horizon)` or None, and
        the processor's `features`."""
        if processor is None:
            from .processing_calm import CalmTraceProcessor

            processor = CalmTraceProcessor.from_model_config(self.model.config)
        features = processor(traces, sampling_rate=sampling_rate, mean=mean, std=std, max_frames=max_context_frames)
        fs = features["sampling_rate"]
        result = self.forecast(features["input_values"], horizon=processor.model_horizon(horizon, fs), **forecast_kwargs)
        forecast = processor.postprocess_forecast(result.forecast, features, horizon)
        samples = None if result.samples is None else processor.postprocess_forecast(result.samples, features, horizon)
        return {"forecast": forecast, "samples": samples, "features": features}


def evaluate_forecasting(
    forecaster: CalmForecaster,
    dataset,
    context_frames: int = 40,
    batch_size: int = 8,
    mode: str = "greedy",
    num_samples: int = 1,
    temperature: float = 1.0,
    max_trials: int | None = None,
    return_predictions: bool = False,
    progress: bool = True,
) -> dict:
    """Score forecasts on a split with the paper's protocol.

    Each row needs `input_values` (neurons, frames) z-scored, `input_ids` (neurons, steps) codes of the same trial,
    `neuron_ids` and `session_id`. The context is the first `context_frames` frames; the horizon is the rest of the
    trial. Pearson r per neuron over the horizon, averaged over neurons -> trials -> sessions, and MSE in z-scored
    units. `progress` shows a progress bar over the batches (rollouts are the slow part).
    """
    try:  # imported here, not at the top: this file also ships inside checkpoints, without calm_hf's metrics
        from calm_hf.metrics.functional import forecast_pearson_r, mse
    except ImportError as error:  # pragma: no cover
        raise ImportError("evaluate_forecasting needs the calm_hf package (pip install calm_hf).") from error
    window = forecaster.window_size
    if context_frames % window:
        raise ValueError(f"context_frames={context_frames} must be a multiple of the token window {window}.")
    rows = dataset if max_trials is None else dataset.select(range(min(max_trials, len(dataset))))
    columns = ["input_values", "input_ids", "neuron_ids", "session_id"]
    rows = rows.with_format("numpy", columns=columns)
    predictions, truths, sessions = [], [], []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(rows), batch_size), desc="Forecasting trials", unit="batch", disable=not progress):
        batch = rows[start : start + batch_size]
        values = np.stack(list(batch["input_values"])).astype(np.float32)  # (B, N, F)
        frames = values.shape[-1]
        if frames <= context_frames:
            raise ValueError(
                f"trials have {frames} frames, not more than the context of {context_frames}: nothing to forecast."
            )
        ids = torch.as_tensor(np.stack(list(batch["input_ids"])).astype(np.int64))[..., : context_frames // window]
        result = forecaster.forecast(
            None,
            horizon=frames - context_frames,
            context_ids=ids,
            neuron_ids=torch.as_tensor(np.stack(list(batch["neuron_ids"])).astype(np.int64)),
            session_ids=torch.as_tensor(np.asarray(batch["session_id"], dtype=np.int64)),
            mode=mode,
            num_samples=num_samples,
            temperature=temperature,
        )
        predictions.append(result.forecast)
        truths.append(values[..., context_frames:])
        sessions.append(np.asarray(batch["session_id"]))
    prediction = np.concatenate(predictions)
    truth = np.concatenate(truths)
    session_ids = np.concatenate(sessions)
    scores = forecast_pearson_r(prediction, truth, session_ids=session_ids)
    metrics = {"pearson_r": float(scores["pearson_r"]), "mse": float(mse(prediction, truth))}
    metrics["per_session_pearson_r"] = {str(k): float(v) for k, v in scores["per_session"].items()}
    if return_predictions:
        metrics["predictions"] = prediction
        metrics["truth"] = truth
        metrics["session_ids"] = session_ids
    return metrics
