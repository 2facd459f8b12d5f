"""`CalmTraceProcessor`: the one reversible map between a user's calcium traces and what a CalM model reads.

Forward (`__call__`): resample to the model rate keeping the **end** of the context aligned (the last model frame
sits exactly on the last input frame), optional causal EMA, per-neuron z-score (context statistics, or statistics
you pass, with a std floor relative to the data's own scale), and crop the oldest frames to a multiple of the token
window. Inverse: `inverse` undoes all of it for a whole processed context; `postprocess_forecast` maps model-rate
forecasts of the frames after the context back to the user's units and rate, frame `i` at `i / sampling_rate`
seconds after the last input frame.

Saved with a checkpoint as `preprocessor_config.json` (`save_pretrained`) and loaded with
`AutoFeatureExtractor.from_pretrained(path)` (`trust_remote_code=True` without calm_hf): this file imports only
numpy, torch and transformers, so it can travel with the weights.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from transformers.feature_extraction_utils import BatchFeature, FeatureExtractionMixin


# Beyond this, z-scored forecasts mapped back (mean + z * std) can overflow float32 to Inf.
MAX_ABS_INPUT = float(np.finfo(np.float32).max) / 1e3


def _float_array(x: Any) -> np.ndarray:
    """`x` as a float32 or float64 array without a copy when it already is one (float32 values widen to float64
    exactly wherever they are computed with), else as float64."""
    x = np.asarray(x)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)


def _gaussian_taps(sigma: float) -> np.ndarray:
    half = max(1, int(math.ceil(3.0 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    return taps / taps.sum()


def _gaussian_lowpass(x: np.ndarray, sigma: float) -> np.ndarray:
    """Symmetric Gaussian smoothing along the last axis with odd-reflected edges (keeps straight lines straight,
    so a ramp stays exactly a ramp up to the last frame). `x` is float64 `(..., frames)`."""
    x = np.asarray(x, dtype=np.float64)
    taps = _gaussian_taps(sigma)
    half = len(taps) // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)], mode="reflect", reflect_type="odd")
    out = np.zeros(x.shape)
    for k, tap in enumerate(taps):  # one pass per tap over the whole array: no per-row Python loop
        out += tap * padded[..., k : k + x.shape[-1]]
    return out


def _odd_reflect(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """`x[..., index]` for indices up to `frames - 1` outside `[0, frames - 1]`, continued by odd reflection (as
    `np.pad(mode="reflect", reflect_type="odd")`): `x[-m] = 2 x[0] - x[m]`, `x[n-1+m] = 2 x[n-1] - x[n-1-m]`."""
    last = x.shape[-1] - 1
    reflected = (index < 0) | (index > last)
    if not reflected.any():
        return x[..., index]
    mirrored = np.where(index < 0, -index, np.where(index > last, 2 * last - index, index))
    edge = np.where(index < 0, 0, last)
    return np.where(reflected, 2.0 * x[..., edge] - x[..., mirrored], x[..., mirrored])


def _interpolation_weights(frames: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(left frame `(positions,)`, fraction) of linear interpolation at `positions`, extrapolating along the odd
    reflection up to a couple of frames outside `[0, frames - 1]` (the left frame may then lie outside too)."""
    left = np.floor(positions).astype(np.int64)
    left = np.clip(left, -(frames - 1), 2 * (frames - 1) - 1)
    return left, positions - left


def _interpolate(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of `x` `(..., frames)` at fractional frame `positions`; positions up to a couple of
    frames outside `[0, frames - 1]` extrapolate along the odd reflection (linearly for a straight line)."""
    x = np.asarray(x, dtype=np.float64)
    frames = x.shape[-1]
    if frames == 1:
        return np.repeat(x, len(positions), axis=-1)
    left, frac = _interpolation_weights(frames, positions)
    if frames * len(positions) <= 1 << 22:  # a small grid: one matrix product does it all
        lo, hi = min(left.min(), 0), max(left.max() + 1, frames - 1)
        weights = np.zeros((hi - lo + 1, len(positions)))
        columns = np.arange(len(positions))
        np.add.at(weights, (left - lo, columns), 1.0 - frac)
        np.add.at(weights, (left + 1 - lo, columns), frac)
        return _odd_reflect(x, np.arange(lo, hi + 1)) @ weights
    return _odd_reflect(x, left) * (1.0 - frac) + _odd_reflect(x, left + 1) * frac


def _lowpass_at(x: np.ndarray, sigma: float, positions: np.ndarray) -> np.ndarray:
    """`_interpolate(_gaussian_lowpass(x, sigma), positions)` in one pass: each output is a weighted sum of the
    `2 * half + 2` input frames around its position (the Gaussian taps interpolated to the position), so only the
    frames the outputs need are read, and the odd reflection at the edges is the same as smoothing first. Rows are
    taken in chunks, so nothing of the size of the input is copied at once."""
    frames = x.shape[-1]
    taps = _gaussian_taps(sigma)
    half = len(taps) // 2
    left = np.floor(positions).astype(np.int64)
    frac = positions - left
    margin = half + 1 + int(max(0, -left.min(), left.max() + 1 - (frames - 1)))
    start = left - half + margin  # first frame of each output's window in the padded rows
    if margin > frames - 1 or np.any(np.diff(start) < 0):
        # too short for one reflection, or positions out of order: smooth it all, then interpolate
        return _interpolate(_gaussian_lowpass(x, sigma), positions)
    weights = np.zeros((len(positions), len(taps) + 1))
    weights[:, :-1] += (1.0 - frac)[:, None] * taps
    weights[:, 1:] += frac[:, None] * taps
    # consecutive outputs in groups whose windows span a few taps' lengths: one small matrix product per group
    width = weights.shape[1]
    step = max(1.0, float(np.median(np.diff(start)))) if len(start) > 1 else 1.0  # input frames per output
    group = max(4, int(math.ceil(4 * width / step)))
    products = []
    for first in range(0, len(positions), group):
        index = np.arange(first, min(first + group, len(positions)))
        low, high = start[index[0]], start[index[-1]] + width
        matrix = np.zeros((high - low, len(index)))
        rows_at = start[index][:, None] - low + np.arange(width)
        matrix[rows_at, np.arange(len(index))[:, None]] = weights[index]
        products.append((index[0], low, high, matrix))
    rows = x.reshape(-1, frames)
    out = np.empty((rows.shape[0], len(positions)))
    chunk = max(1, (1 << 24) // max(1, frames))  # rows per chunk: about 128 MiB of padded float64
    for first_row in range(0, rows.shape[0], chunk):
        padded = np.pad(rows[first_row : first_row + chunk].astype(np.float64, copy=False), [(0, 0), (margin, margin)],
                        mode="reflect", reflect_type="odd")
        for first, low, high, matrix in products:
            out[first_row : first_row + chunk, first : first + matrix.shape[1]] = padded[:, low:high] @ matrix
    return out.reshape(*x.shape[:-1], len(positions))


def resample_on_grid(x: np.ndarray, fs_in: float, fs_out: float, positions: np.ndarray) -> np.ndarray:
    """Values of `x` (sampled at `fs_in`) at fractional input-frame `positions`, after an anti-alias Gaussian
    low-pass when going to a lower rate (sigma = half an output frame). Computed in float64; float32 input is
    widened a chunk at a time, never copied whole."""
    x = _float_array(x)
    ratio = fs_in / fs_out
    if ratio > 1.0 + 1e-9:
        return _lowpass_at(x, 0.5 * ratio, positions)
    return _interpolate(x, positions)


def _whole_number(value: Any, name: str, least: int) -> int:
    """`value` as an int when it is a whole number >= `least` (2.0 is whole, 2.7 is not: truncating it changes
    the meaning)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, (bool, np.bool_)) or not math.isfinite(number) or number != round(number) or number < least:
        kind = "positive whole number of frames" if least == 1 else f"whole number of frames >= {least}"
        raise ValueError(f"{name} must be a {kind}, got {value}.")
    return int(round(number))


def causal_ema(x: np.ndarray, alpha: float, initial: np.ndarray | None = None) -> np.ndarray:
    """`y[t] = alpha * x[t] + (1 - alpha) * y[t-1]` along the last axis, `y[-1] = initial` (default `x[0]`)."""
    y = np.empty_like(x, dtype=np.float64)
    previous = x[..., 0] if initial is None else initial
    for t in range(x.shape[-1]):
        previous = alpha * x[..., t] + (1.0 - alpha) * previous
        y[..., t] = previous
    return y


def inverse_causal_ema(y: np.ndarray, alpha: float, initial: np.ndarray | None = None) -> np.ndarray:
    """Exact inverse of `causal_ema`: `x[t] = (y[t] - (1 - alpha) * y[t-1]) / alpha`, `y[-1] = initial` (default: the
    forward default, which makes `x[0] = y[0]`)."""
    previous = np.concatenate([(y[..., :1] if initial is None else np.asarray(initial)[..., None]), y[..., :-1]], -1)
    return (y - (1.0 - alpha) * previous) / alpha


class CalmTraceProcessor(FeatureExtractionMixin):
    r"""Reversible pre- and post-processing of calcium traces for CalM.

    Args:
        sampling_rate (`float`, *optional*, defaults to 5.0): the model's frame rate in Hz.
        window_size (`int`, *optional*, defaults to 4): token window L; the model context is cropped (oldest frames
            dropped) to a multiple of it.
        ema_alpha (`float`, *optional*): causal EMA weight applied at the model rate before z-scoring (the CalM
            authors used 0.15); `None` = no smoothing.
        min_std_ratio (`float`, *optional*, defaults to 1e-3): std floor **relative to the data's scale**: a neuron's
            std is raised to `min_std_ratio * scale`, `scale` being the median std of the non-constant neurons. Data
            in units of 1e-29 are z-scored like data in units of 1; a constant neuron becomes zeros (it is only
            centred) and is forecast near its constant value.

    Example:

    ```python
    >>> import numpy as np
    >>> from calm_hf.processing_calm import CalmTraceProcessor
    >>> processor = CalmTraceProcessor(sampling_rate=5.0, window_size=4)
    >>> traces = np.random.randn(12, 241) * 3 + 50            # (neurons, frames) at 30 Hz, any units
    >>> features = processor(traces, sampling_rate=30.0)
    >>> features["input_values"].shape                          # (batch, neurons, frames at 5 Hz, multiple of 4)
    (1, 12, 40)
    >>> back = processor.inverse(features["input_values"], features)   # (1, 12, 241) at 30 Hz, original units
    ```
    """

    model_input_names = ["input_values"]

    def __init__(
        self,
        sampling_rate: float = 5.0,
        window_size: int = 4,
        ema_alpha: float | None = None,
        min_std_ratio: float = 1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.sampling_rate = float(sampling_rate)
        self.window_size = _whole_number(window_size, "window_size", 1)
        self.ema_alpha = None if ema_alpha is None else float(ema_alpha)
        self.min_std_ratio = float(min_std_ratio)
        if not math.isfinite(self.sampling_rate) or self.sampling_rate <= 0:
            raise ValueError(f"sampling_rate must be a positive frame rate in Hz, got {sampling_rate}.")
        if self.window_size < 1:
            raise ValueError(f"window_size must be a positive number of frames, got {window_size}.")
        if self.ema_alpha is not None and not 0.0 < self.ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1] or None, got {ema_alpha}.")
        if not 0.0 < self.min_std_ratio < 1.0:
            raise ValueError(f"min_std_ratio must be in (0, 1), got {min_std_ratio}.")

    @classmethod
    def from_model_config(cls, config, **kwargs) -> CalmTraceProcessor:
        """The processor matching a `CalmConfig` (its `frame_rate_hz` and `window_size`)."""
        return cls(sampling_rate=config.frame_rate_hz, window_size=config.window_size, **kwargs)

    # ------------------------------------------------------------------ resampling (end aligned)

    def model_frames(self, num_frames: int, sampling_rate: float) -> int:
        """Model-rate frames covering the duration of `num_frames` input frames (rounded up, as polyphase resamplers
        do; the earliest model frame may then sit up to one model frame before the first input frame, extrapolated)."""
        return max(1, int(math.ceil(num_frames * self.sampling_rate / sampling_rate - 1e-9)))

    def resample(self, traces: np.ndarray, sampling_rate: float) -> np.ndarray:
        """`(..., frames)` at `sampling_rate` -> `(..., model_frames)` at the model rate; the last output frame is the
        last input frame's time, earlier ones every `1 / self.sampling_rate` s before it."""
        frames = traces.shape[-1]
        if sampling_rate == self.sampling_rate:
            return np.asarray(traces, dtype=np.float64)
        count = self.model_frames(frames, sampling_rate)
        ratio = sampling_rate / self.sampling_rate  # input frames per model frame
        positions = (frames - 1) - (count - 1 - np.arange(count)) * ratio
        return resample_on_grid(traces, sampling_rate, self.sampling_rate, positions)

    def resample_back(self, values: np.ndarray, sampling_rate: float, num_frames: int) -> np.ndarray:
        """Inverse of `resample` for a context: model-rate `(..., frames)` ending at the same instant -> the last
        `num_frames` frames at `sampling_rate`."""
        if sampling_rate == self.sampling_rate:
            return np.asarray(values, dtype=np.float64)[..., -num_frames:]
        ratio = self.sampling_rate / sampling_rate  # model frames per input frame
        positions = (values.shape[-1] - 1) - (num_frames - 1 - np.arange(num_frames)) * ratio
        return resample_on_grid(values, self.sampling_rate, sampling_rate, positions)

    # ------------------------------------------------------------------ statistics

    def fit_stats(self, traces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-neuron mean and floored std of `(neurons, frames)` or `(trials, neurons, frames)` (statistics over
        trials and frames, e.g. of training trials), in the traces' units (float64) -- `(neurons,)` each."""
        values = np.asarray(traces, dtype=np.float64)
        axes = tuple(i for i in range(values.ndim) if i != values.ndim - 2)
        mean = values.mean(axis=axes)
        return mean, self.floor_std(values.std(axis=axes), mean)

    def floor_std(self, std: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """Raise each std of `(..., neurons)` to `min_std_ratio` times the median std of the non-constant neurons of
        the same recording. Raises when every neuron of a recording is constant (no scale to normalise by)."""
        std = np.asarray(std, dtype=np.float64)
        # "constant" relative to the neuron's own level: float rounding leaves stds of ~1e-16 * |mean|
        varying = std > 1e-12 * np.maximum(np.abs(mean), np.finfo(np.float64).tiny)
        if not varying.any(axis=-1).all():
            raise ValueError(
                "every neuron is constant over the given frames, so there is no scale to z-score by and nothing to "
                "forecast from; give a context in which the traces vary."
            )
        scale = np.nanmedian(np.where(varying, std, np.nan), axis=-1, keepdims=True)
        return np.maximum(std, self.min_std_ratio * scale)

    # ------------------------------------------------------------------ forward

    def _check_inputs(self, traces: Any, sampling_rate: float | None, mean: Any, std: Any) -> tuple[np.ndarray, float]:
        """(traces `(batch, neurons, frames)` float64, their rate in Hz), with a clear error for bad input."""
        raw = np.asarray(traces)
        if raw.dtype == object or not (np.issubdtype(raw.dtype, np.number) or raw.dtype == bool):
            raise ValueError(f"traces must be a numeric array (neurons, frames) or (batch, neurons, frames), got dtype "
                             f"{raw.dtype}; ragged lists of traces must be padded or cut first.")
        if np.iscomplexobj(raw):
            raise ValueError(f"traces must be real, got complex dtype {raw.dtype}; pass np.abs(x) or x.real.")
        values = _float_array(raw)  # no copy of float32/64 input: nothing below writes into it
        if values.ndim == 2:
            values = values[None]
        if values.ndim != 3:
            raise ValueError(f"traces must be (neurons, frames) or (batch, neurons, frames), got shape {values.shape}.")
        for axis, what in ((0, "no recordings"), (1, "no neurons"), (2, "no frames")):
            if values.shape[axis] == 0:
                raise ValueError(f"traces have {what} (shape {raw.shape}); give at least one neuron and one frame.")
        highest, lowest = float(values.max()), float(values.min())  # NaN or Inf anywhere shows in these two
        if not (math.isfinite(highest) and math.isfinite(lowest)):
            finite = np.isfinite(values)
            batch, neuron, frame = (int(i) for i in np.argwhere(~finite)[0])
            raise ValueError(f"traces contain {int((~finite).sum())} NaN/Inf value(s), the first at batch {batch}, "
                             f"neuron {neuron}, frame {frame}; interpolate them or drop those neurons first.")
        peak = max(highest, -lowest)
        if peak > MAX_ABS_INPUT:
            raise ValueError(f"traces reach {peak:.2g}, beyond what float32 statistics and forecasts can hold; keep "
                             f"|values| below {MAX_ABS_INPUT:.3g} (e.g. rescale to other units).")
        if isinstance(sampling_rate, (bool, np.bool_)) or np.ndim(sampling_rate) != 0:
            raise ValueError(f"sampling_rate must be one frame rate in Hz (a number), got {sampling_rate!r}.")
        fs = self.sampling_rate if sampling_rate is None else float(sampling_rate)
        if not math.isfinite(fs) or fs <= 0:
            raise ValueError(f"sampling_rate={sampling_rate} must be a positive frame rate in Hz.")
        if (mean is None) != (std is None):
            raise ValueError("pass mean and std together (both in the traces' units), or neither (context statistics).")
        return values, fs

    def _usable_frames(self, model_frames: int, input_frames: int, fs: float, max_frames: int | None) -> int:
        """Most recent model frames kept: a multiple of the window, at most `max_frames`, at least one window."""
        usable = model_frames - model_frames % self.window_size
        if max_frames is not None:
            max_frames = _whole_number(max_frames, "max_frames", self.window_size)
            usable = min(usable, max_frames - max_frames % self.window_size)
        if usable < self.window_size:
            need = int(math.ceil(self.window_size * fs / self.sampling_rate))
            raise ValueError(
                f"the context is {input_frames} frames ({input_frames / fs:g} s at {fs:g} Hz), shorter than one "
                f"token window ({self.window_size} frames at the model's {self.sampling_rate:g} Hz): give at least "
                f"{need} frames."
            )
        return usable

    def __call__(
        self,
        traces: Any,
        sampling_rate: float | None = None,
        mean: Any | None = None,
        std: Any | None = None,
        max_frames: int | None = None,
    ) -> BatchFeature:
        """Map traces in the user's units and rate to z-scored model input.

        Args:
            traces (`array-like` of shape `(neurons, frames)` or `(batch, neurons, frames)`): finite values.
            sampling_rate (`float`, *optional*): rate of `traces` in Hz; default the model's.
            mean, std (`array-like` of shape `(neurons,)` or `(batch, neurons)`, *optional*): z-score statistics in the
                input units (e.g. of training trials), given together; default: each neuron's statistics over the
                given frames (after resampling and smoothing).
            max_frames (`int`, *optional*): keep at most this many (most recent) model frames.

        Returns:
            `BatchFeature` with `input_values` float32 `(batch, neurons, frames)` (frames a multiple of
            `window_size`), `mean`/`std` float64 `(batch, neurons)` and the bookkeeping the inverse needs:
            `sampling_rate`, `num_input_frames`, `last_values` (the last model frame before z-scoring,
            `(batch, neurons)`), `dropped_model_frames`, and `history_values` float32 `(batch, neurons, frames)`: the
            model frames before the kept context, z-scored alike (what a data-identity model reads its neurons'
            identity from).
        """
        values, fs = self._check_inputs(traces, sampling_rate, mean, std)
        resampled = self.resample(values, fs)
        if self.ema_alpha is not None:
            resampled = causal_ema(resampled, self.ema_alpha)
        usable = self._usable_frames(resampled.shape[-1], values.shape[-1], fs, max_frames)
        if mean is None:  # each recording's own statistics over all its frames (also those cropped below)
            mean_ = resampled.mean(axis=-1)
            std_ = self.floor_std(resampled.std(axis=-1), mean_)
        else:
            mean_, std_ = self._check_stats(mean, std, values.shape[:2])
        start = resampled.shape[-1] - usable
        kept = resampled[..., start:]
        z = (kept - mean_[..., None]) / std_[..., None]
        return BatchFeature(
            {
                "input_values": z.astype(np.float32),
                "mean": mean_,
                "std": std_,
                "sampling_rate": fs,
                "num_input_frames": values.shape[-1],
                "last_values": resampled[..., -1].copy(),
                "dropped_model_frames": start,
                "history_values": ((resampled[..., :start] - mean_[..., None]) / std_[..., None]).astype(np.float32),
                # the smoothed frame before the kept span: what the inverse EMA needs for the first kept frame
                "ema_previous": resampled[..., start - 1].copy() if self.ema_alpha is not None and start else None,
            }
        )

    @staticmethod
    def _check_stats(mean: Any, std: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        batch, neurons = shape
        out = []
        for name, value in (("mean", mean), ("std", std)):
            array = np.asarray(value, dtype=np.float64)
            if array.shape not in ((neurons,), (batch, neurons)):
                raise ValueError(
                    f"{name} must have shape ({neurons},) (one value per neuron) or ({batch}, {neurons}), got "
                    f"{array.shape}."
                )
            if not np.isfinite(array).all():
                raise ValueError(f"{name} contains NaN/Inf; give finite statistics.")
            out.append(np.broadcast_to(array, shape).copy())
        if (out[1] <= 0).any():
            raise ValueError(f"std must be positive for every neuron, got a minimum of {out[1].min():g}.")
        return out[0], out[1]

    # ------------------------------------------------------------------ inverse

    def inverse(self, input_values: Any, features: dict) -> np.ndarray:
        """Exact inverse of `__call__` for a processed context: z-scored model-rate `(batch, neurons, frames)` ->
        `(batch, neurons, input frames)` in the input units and rate (frames lost to cropping are not restored: the
        result covers the kept span, ending at the last input frame)."""
        z = np.asarray(input_values, dtype=np.float64)
        values = z * features["std"][..., None] + features["mean"][..., None]
        if self.ema_alpha is not None:
            values = inverse_causal_ema(values, self.ema_alpha, initial=features.get("ema_previous"))
        fs = float(features["sampling_rate"])
        frames = min(int(features["num_input_frames"]), int(math.floor((z.shape[-1] - 1) * fs / self.sampling_rate)) + 1)
        return self.resample_back(values, fs, frames)

    def model_horizon(self, horizon: int, sampling_rate: float) -> int:
        """Model frames needed to cover `horizon` input frames after the context."""
        horizon = _whole_number(horizon, "horizon", 1)
        return max(1, int(math.ceil(horizon * self.sampling_rate / float(sampling_rate) - 1e-9)))

    def postprocess_forecast(self, forecast: Any, features: dict, horizon: int) -> np.ndarray:
        """Model-rate z-scored forecasts `(batch, [samples,] neurons, frames)` of the frames after the context ->
        the next `horizon` frames at the input rate in the input units, `(batch, [samples,] neurons, horizon)`.

        Model frame `k` (1-based) is `k / self.sampling_rate` s after the last input frame; input frame `i` is
        `i / sampling_rate` s after it; the last context value anchors the interpolation at 0 s. EMA smoothing is not
        undone on forecasts (they forecast the smoothed signal)."""
        horizon = _whole_number(horizon, "horizon", 1)
        z = np.asarray(forecast, dtype=np.float64)
        mean, std = features["mean"], features["std"]
        if z.ndim == 4:
            mean, std = mean[:, None], std[:, None]
        values = z * std[..., None] + mean[..., None]
        fs = float(features["sampling_rate"])
        if fs == self.sampling_rate:
            out = values[..., :horizon]
        else:
            anchor = np.broadcast_to(features["last_values"][:, None] if z.ndim == 4 else features["last_values"],
                                     values.shape[:-1])[..., None]
            grid = np.concatenate([anchor, values], axis=-1)  # model frames 0 (last context frame), 1, 2, ...
            positions = np.arange(1, horizon + 1) * (self.sampling_rate / fs)
            if positions[-1] > values.shape[-1] + 1e-9:  # interpolation would extrapolate past the forecast
                raise ValueError(
                    f"the forecast covers {values.shape[-1]} model frames ({values.shape[-1] / self.sampling_rate:g} "
                    f"s) but horizon={horizon} frames at {fs:g} Hz needs {horizon / fs:g} s; forecast "
                    f"{self.model_horizon(horizon, fs)} model frames (`model_horizon`)."
                )
            out = resample_on_grid(grid, self.sampling_rate, fs, positions)
        if out.shape[-1] < horizon:
            raise ValueError(f"the forecast covers {out.shape[-1]} frames, fewer than horizon={horizon}.")
        highest, lowest = float(out.max()), float(out.min())  # NaN/Inf show here too; no temporary arrays
        if not (math.isfinite(highest) and math.isfinite(lowest)) or max(highest, -lowest) > float(
                np.finfo(np.float32).max):
            raise ValueError(
                "the forecast mapped back to the input units is not finite in float32; the inputs' scale is too "
                f"large (keep |values| below {MAX_ABS_INPUT:.3g})."
            )
        return out.astype(np.float32)

__all__ = ["CalmTraceProcessor", "resample_on_grid", "causal_ema", "inverse_causal_ema"]
