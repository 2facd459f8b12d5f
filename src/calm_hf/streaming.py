"""Forecasting a recording while it is recorded: `CalmStreamingForecaster` takes one frame of every neuron at a time
and keeps the direct forecast (and its quantile band) of the next frames up to date, for closed-loop experiments.

A token covers a window of `window_size` frames, so the model has something new to read only when a window completes:

- between two window ends a frame costs a copy into the buffer, and the forecast made at the last window end is
  returned shifted by the frames seen since (its first frames are no longer in the future);
- at a window end the tokenizer's causal encoder encodes only the new window on top of its cache, and the dual-axis
  transformer runs one token step on top of its time-axis KV cache; nothing of the past is recomputed.

The model reads at most `config.context_token_steps` token steps (the context length it is run with; unset: its
`max_token_steps`). When the context reaches that, the stream restarts from its most recent `restart_steps` windows
(both caches are rebuilt from those frames once); after it, the forecast equals `CalmForecaster`'s direct forecast
from the frames since that restart. Until the first restart, it equals the direct forecast from every frame since the
stream started (or since the last `reset`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import Cache

from .forecasting import CalmForecaster, check_finite_context, context_token_steps
from .generation_calm import CalmFixedCacheLayer


@dataclass
class StreamingForecast:
    """The forecast after the newest frame, z-scored units at the model rate.

    Attributes:
        forecast: (neurons, horizon) the continuous head's conditional mean of the next `horizon` frames.
        quantiles: (neurons, horizon, levels) quantiles at `quantile_levels` (a model with a quantile head), else None.
        quantile_levels: the levels of `quantiles`.
        frames_seen: frames taken since the stream started.
        context_frames: frames the forecast reads (since the start, or since the last restart), a multiple of the
            window: the frames of a window still being filled are not read yet.
    """

    forecast: np.ndarray
    quantiles: np.ndarray | None
    quantile_levels: tuple[float, ...] | None
    frames_seen: int
    context_frames: int


class CalmStreamingForecaster:
    """Direct forecasts of a stream of frames, updated from the KV caches as each frame arrives.

    Args:
        forecaster (`CalmForecaster`): the model (with a continuous forecast head) and its tokenizer.
        num_neurons (`int`): neurons in every frame.
        horizon (`int`, *optional*): frames to forecast after the newest one; default and most: the head's frames
            minus the `window_size - 1` frames a window can be ahead of the last forecast.
        neuron_ids, session_ids: table-identity models: `(neurons,)` global ids and the session id.
        neuron_identity (`torch.Tensor` of shape `(neurons, identity_size)`, *optional*): data-identity models:
            `forecaster.neuron_identity(reference)` from earlier trials of the same neurons; None is zero-shot.
        restart_steps (`int`, *optional*): windows kept when the context reaches the model's context length
            (`config.context_token_steps`, else `max_token_steps`); default half of them (a restart costs one pass over
            them, so fewer restarts cost less on average).

    Example:

    ```python
    >>> stream = CalmStreamingForecaster(CalmForecaster(model, tokenizer), num_neurons=traces.shape[0])
    >>> for frame in z_scored.T:  # (neurons,) per frame, z-scored, at the model rate
    ...     latest = stream.update(frame)  # None until the first window is complete
    ```
    """

    def __init__(self, forecaster: CalmForecaster, num_neurons: int, horizon: int | None = None,
                 neuron_ids: torch.Tensor | np.ndarray | None = None, session_ids: torch.Tensor | int | None = None,
                 neuron_identity: torch.Tensor | np.ndarray | None = None, restart_steps: int | None = None):
        model, config = forecaster.model, forecaster.model.config
        if getattr(model, "value_head", None) is None:
            raise ValueError("streaming forecasts read the continuous forecast head, which this checkpoint lacks "
                             "(config.value_head_steps=0): forecast windows with CalmForecaster(mode='greedy').")
        if not forecaster.tokenizer.config.causal_encoder:
            raise ValueError("this tokenizer's encoder reads later windows (config.causal_encoder=False), so a window's "
                             "code changes as the stream goes on: use CalmForecaster on each new context instead.")
        self.forecaster, self.model, self.window_size = forecaster, model, config.window_size
        if isinstance(num_neurons, bool) or not isinstance(num_neurons, (int, np.integer)) or num_neurons < 1:
            raise ValueError(f"num_neurons must be a positive integer, got {num_neurons!r}.")
        self.num_neurons = int(num_neurons)
        most = config.value_head_steps * self.window_size - (self.window_size - 1)
        self.horizon = most if horizon is None else int(horizon)
        if not 1 <= self.horizon <= most:
            raise ValueError(f"horizon={horizon} must lie in [1, {most}]: the head forecasts "
                             f"{config.value_head_steps * self.window_size} frames from a window's end, and the newest "
                             f"frame can be up to {self.window_size - 1} frames past it.")
        self.max_steps = context_token_steps(config) or config.max_token_steps
        self.restart_steps = max(1, self.max_steps // 2) if restart_steps is None else int(restart_steps)
        if not 1 <= self.restart_steps < self.max_steps:
            raise ValueError(f"restart_steps={restart_steps} must lie in [1, {self.max_steps - 1}] (the model's "
                             "context length in token steps, minus one).")
        self.identity = {"neuron_ids": forecaster._to_device(neuron_ids),
                         "session_ids": forecaster._to_device(session_ids)}
        if forecaster.uses_data_identity:
            if neuron_identity is None:
                neuron_identity = forecaster.neuron_identity(None, num_neurons=self.num_neurons)
            self.identity = {"neuron_identity": forecaster._to_device(neuron_identity, torch.float32)[None]}
        elif neuron_identity is not None:
            raise ValueError("This model reads neuron identities from its tables: pass neuron_ids / session_ids.")
        self.lookback = getattr(config, "value_skip_windows", 0)
        levels = getattr(config, "quantile_levels", None)
        self.quantile_levels = tuple(levels) if levels and model.quantile_head is not None else None
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next frame starts a new context."""
        self.frames_seen = 0
        self.context = torch.zeros(1, self.num_neurons, 0, device=self.forecaster.device)  # complete windows read
        self.pending: list[torch.Tensor] = []  # frames of the window being filled
        self.encoder_cache = self.cache = None
        self.latest: tuple[torch.Tensor, torch.Tensor | None] | None = None  # head output at the last window end

    @torch.no_grad()
    def prime(self, frames: torch.Tensor | np.ndarray) -> StreamingForecast | None:
        """Start the stream from the recording so far, `(neurons, frames)` z-scored at the model rate, in one pass,
        and return the forecast after its last frame (None when it holds no complete window). Up to the context length
        (in windows) this is the state `update` reaches frame by frame; a longer recording starts from its most recent
        `restart_steps` windows, as a restart does."""
        frames = self.forecaster._to_device(frames, torch.float32)
        if frames.ndim != 2 or frames.shape[0] != self.num_neurons:
            raise ValueError(f"frames must be (neurons={self.num_neurons}, frames), got {tuple(frames.shape)}.")
        check_finite_context(frames[None])
        self.reset()
        complete = frames.shape[-1] - frames.shape[-1] % self.window_size
        self.frames_seen = frames.shape[-1]
        self.pending = list(frames[:, complete:].unbind(-1))
        if complete:
            self._read_windows(frames[None, :, :complete])
        return self._latest()

    @torch.no_grad()
    def update(self, frame: torch.Tensor | np.ndarray) -> StreamingForecast | None:
        """Take the newest frame `(neurons,)` (z-scored, at the model rate) and return the forecast of the `horizon`
        frames after it, or None before the first window is complete."""
        frame = self.forecaster._to_device(frame, torch.float32)
        if frame.shape != (self.num_neurons,):
            raise ValueError(f"a frame holds one value per neuron, shape ({self.num_neurons},); got {tuple(frame.shape)}.")
        check_finite_context(frame[None, :, None])
        self.pending.append(frame)
        self.frames_seen += 1
        if len(self.pending) == self.window_size:
            window = torch.stack(self.pending, dim=-1)[None]  # (1, neurons, window)
            self.pending = []
            self._read_windows(window)
        return self._latest()

    def _latest(self) -> StreamingForecast | None:
        if self.latest is None:
            return None
        forecast, quantiles = self.latest
        ahead = len(self.pending)  # frames of the current window already seen are no longer future
        frames = slice(ahead, ahead + self.horizon)
        return StreamingForecast(
            forecast=forecast[:, frames].cpu().numpy(),
            quantiles=None if quantiles is None else quantiles[:, frames].cpu().numpy(),
            quantile_levels=self.quantile_levels, frames_seen=self.frames_seen,
            context_frames=self.context.shape[-1])

    def _read_windows(self, windows: torch.Tensor) -> None:
        """Completed windows `(1, neurons, k * window_size)`: their codes on top of the tokenizer's cache, their steps
        of the dual-axis transformer on top of its cache (or a restart from the most recent windows when the context
        is full)."""
        self.context = torch.cat([self.context, windows], dim=-1)
        if self.context.shape[-1] > self.max_steps * self.window_size:
            self.context = self.context[..., -self.restart_steps * self.window_size :]
            self.encoder_cache = self.cache = None
        new_frames = self.context if self.cache is None else windows
        if self.cache is None:  # the context never passes max_steps windows: one buffer of that many, written in place
            self.cache = Cache(layers=[CalmFixedCacheLayer(self.max_steps)
                                       for _ in range(self.model.config.num_hidden_layers)])
        if self.encoder_cache is None:
            self.encoder_cache = [[None, None] for _ in range(self.forecaster.tokenizer.config.num_encoder_layers)]
        with self.forecaster._autocast():
            codes = self.forecaster.tokenizer.encode(new_frames, cache=self.encoder_cache).codes
            values = None
            if self.lookback:  # the raw-trace highway reads each neuron's last windows, up to the newest one
                values = self.context[..., -min(self.context.shape[-1], self.lookback * self.window_size) :]
            outputs = self.model(input_ids=codes, cache=self.cache,
                                 use_cache=True, logits_to_keep=1, value_inputs=values, return_dict=True,
                                 **self.identity)
        self.cache = outputs.cache
        point = outputs.value_predictions[:, :, -1].float()  # (1, neurons, frames)
        quantiles = None if outputs.value_quantiles is None else outputs.value_quantiles[:, :, -1].float()
        readout = getattr(self.forecaster, "population_readout", None)
        if readout is not None:  # the recording's population readout, blended in as in the batch direct forecast
            point, quantiles, _ = readout.apply(self.context, point, quantiles, None)
        self.latest = (point[0], None if quantiles is None else quantiles[0])


__all__ = ["CalmStreamingForecaster", "StreamingForecast"]
