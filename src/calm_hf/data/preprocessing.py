"""Everyday preprocessing of calcium traces: resampling, smoothing, z-scoring, trial cutting and splitting.

All functions take numpy arrays (anything `np.asarray` accepts) with time on the last axis unless told otherwise
and raise `ValueError` naming the problem and the fix for bad input. `prepare_session` chains them the way the
CalM authors did (resample to the model rate, optional causal EMA, 70/15/15 trial split, per-neuron z-score with
the training trials' statistics only).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from .session import TrialGrid, check_traces


if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .session import SessionTrials


def _check_finite_signal(array: np.ndarray, what: str) -> None:
    """NaN/Inf would spread along the time axis through a filter (silently blanking whole traces): refuse them."""
    if np.iscomplexobj(array):
        raise ValueError(f"{what} needs real traces, got complex dtype {array.dtype}; pass np.abs(x) or x.real.")
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{what} needs a numeric array, got dtype {array.dtype}.")
    finite = np.isfinite(array)
    if not finite.all():
        bad = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(
            f"{what}: the traces contain {int((~finite).sum())} NaN/Inf value(s), the first at index {bad}; the filter "
            "would spread them over the rest of the trace. Interpolate or drop those neurons first."
        )


def _check_rate(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive sampling rate in Hz, got {value}.")
    return value


def resample(traces: Any, fs_in: float, fs_out: float, axis: int = -1, max_denominator: int = 1000) -> np.ndarray:
    """Resample traces from `fs_in` to `fs_out` Hz with an anti-aliased polyphase filter.

    Uses `scipy.signal.resample_poly` with `up/down` the rational approximation of `fs_out / fs_in`
    (denominator at most `max_denominator`) and `padtype="line"`, so traces with a non-zero baseline do not sag
    at the edges. The output has `ceil(frames * up / down)` frames. The filter is symmetric (non-causal): a
    resampled frame mixes raw samples up to a few source frames into its future.

    Args:
        traces (`array-like`): float array, time on `axis`.
        fs_in (`float`): input sampling rate in Hz.
        fs_out (`float`): output sampling rate in Hz.
        axis (`int`, *optional*, defaults to -1): time axis.
        max_denominator (`int`, *optional*, defaults to 1000): bound for the rational approximation.

    Returns:
        `np.ndarray`: the resampled traces (float32 for float32 input). Identity (a copy) when the rates are equal.
    """
    fs_in = _check_rate(fs_in, "fs_in")
    fs_out = _check_rate(fs_out, "fs_out")
    array = np.asarray(traces)
    if array.ndim == 0 or array.size == 0:
        raise ValueError(f"resample needs a non-empty array with a time axis, got shape {array.shape}.")
    _check_finite_signal(array, "resample")
    if array.shape[axis] < 2 and fs_in != fs_out:
        raise ValueError(f"resample needs at least 2 frames along the time axis to change the rate, got shape "
                         f"{array.shape}; a single frame has no rate to change.")
    dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float32
    if fs_in == fs_out:
        return array.astype(dtype, copy=True)
    ratio = Fraction(fs_out / fs_in).limit_denominator(max_denominator)
    if ratio.numerator == 0:
        raise ValueError(
            f"Cannot resample from {fs_in} Hz to {fs_out} Hz: ratio below 1/{max_denominator}; raise max_denominator."
        )
    from scipy import signal  # imported on use: slow to import, and most commands never resample

    out = signal.resample_poly(array.astype(np.float64), ratio.numerator, ratio.denominator, axis=axis, padtype="line")
    with np.errstate(over="ignore"):
        out = out.astype(dtype, copy=False)
    if not np.isfinite(out).all():
        raise ValueError(f"resample: the resampled traces overflow {np.dtype(dtype).name}; rescale the input first.")
    return out


def causal_ema(traces: Any, alpha: float = 0.15, axis: int = -1) -> np.ndarray:
    """Causal exponential moving average `y[t] = alpha * x[t] + (1 - alpha) * y[t-1]` along `axis`.

    The filter starts at `y[-1] = x[0]` (so `y[0] = x[0]`) instead of zero, which avoids a decaying transient
    towards zero at the start of traces with a baseline; it stays causal: `y[t]` depends on `x[0..t]` only.

    Args:
        traces (`array-like`): float array, time on `axis`.
        alpha (`float`, *optional*, defaults to 0.15): smoothing weight of the current frame, in (0, 1]
            (the CalM authors used 0.15 at ~6 Hz). `alpha=1` is the identity.
        axis (`int`, *optional*, defaults to -1): time axis.
    """
    alpha = float(alpha)
    if not (0.0 < alpha <= 1.0):
        raise ValueError(f"alpha must be in (0, 1], got {alpha}. Use e.g. alpha=0.15 (1 = no smoothing).")
    array = np.asarray(traces)
    if array.ndim == 0 or array.size == 0:
        raise ValueError(f"causal_ema needs a non-empty array with a time axis, got shape {array.shape}.")
    _check_finite_signal(array, "causal_ema")
    dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float32
    x = np.moveaxis(array.astype(np.float64), axis, -1)
    b, a = [alpha], [1.0, alpha - 1.0]
    from scipy import signal

    zi = signal.lfilter_zi(b, a)[None] * x[..., :1]  # steady state for a constant input equal to x[0]
    y, _ = signal.lfilter(b, a, x, axis=-1, zi=zi)
    return np.moveaxis(y, -1, axis).astype(dtype, copy=False)


@dataclass
class ZScoreStats:
    """Per-neuron z-score statistics.

    `transform` maps `(..., neurons, frames)` traces to `(x - mean) / std`; `inverse_transform` maps back to the
    original units (it accepts numpy arrays and torch tensors, so model outputs map back directly).

    Std floor: a neuron that is constant during training (its std at the rounding level of its mean) gets std 1.0:
    it is only centred, so a silent neuron becomes zeros instead of dividing by ~0. Other stds are raised to at least
    `min_std` times the median std of the varying neurons, a floor relative to the data's own scale, so traces in
    units of 1e-8 are z-scored like traces in units of 1.

    Args:
        mean (`np.ndarray` of shape `(neurons,)`): per-neuron mean.
        std (`np.ndarray` of shape `(neurons,)`): per-neuron standard deviation (already floored).
        min_std (`float`, *optional*, defaults to 1e-6): relative floor used by `fit`.
    """

    mean: np.ndarray
    std: np.ndarray
    min_std: float = 1e-6

    def __post_init__(self):
        self.mean = np.asarray(self.mean, dtype=np.float32).reshape(-1)
        self.std = np.asarray(self.std, dtype=np.float32).reshape(-1)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"mean and std must have the same shape, got {self.mean.shape} and {self.std.shape}.")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.std).all()) or (self.std <= 0).any():
            raise ValueError("ZScoreStats needs finite means and positive finite stds; refit on finite traces.")

    @property
    def num_neurons(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, trials: Any, min_std: float = 1e-6) -> ZScoreStats:
        """Fit per-neuron mean/std over trials and frames of `trials` `(trials, neurons, frames)` (or
        `(neurons, frames)` for one continuous recording)."""
        array = check_traces(trials, name="trials", ndim=(2, 3)).astype(np.float64)
        if array.ndim == 2:
            array = array[None]
        mean = array.mean(axis=(0, 2))
        std = array.std(axis=(0, 2))
        varying = std > 1e-12 * np.maximum(np.abs(mean), np.finfo(np.float64).tiny)
        scale = float(np.median(std[varying])) if varying.any() else 1.0
        std = np.where(varying, np.maximum(std, min_std * scale), 1.0)
        return cls(mean=mean, std=std, min_std=min_std)

    def _broadcast(self, x: Any):
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) < 2 or shape[-2] != self.num_neurons:
            raise ValueError(
                f"Expected traces of shape (..., {self.num_neurons} neurons, frames), got shape {shape}. "
                "Use the statistics fitted on this session's neurons."
            )
        torch = sys.modules.get("torch")  # a tensor implies torch is imported; numpy input never imports it
        if torch is not None and isinstance(x, torch.Tensor):
            mean = torch.as_tensor(self.mean, device=x.device, dtype=x.dtype)[:, None]
            std = torch.as_tensor(self.std, device=x.device, dtype=x.dtype)[:, None]
            return x, mean, std
        x = np.asarray(x)
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
        return x.astype(dtype, copy=False), self.mean.astype(dtype)[:, None], self.std.astype(dtype)[:, None]

    def transform(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """`(x - mean) / std` for `x` of shape `(..., neurons, frames)`."""
        x, mean, std = self._broadcast(x)
        return (x - mean) / std

    def inverse_transform(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """`x * std + mean` for `x` of shape `(..., neurons, frames)`: back to the fitted traces' units."""
        x, mean, std = self._broadcast(x)
        return x * std + mean

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists of floats)."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "min_std": float(self.min_std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZScoreStats:
        return cls(mean=data["mean"], std=data["std"], min_std=data.get("min_std", 1e-6))


def _whole_frames(value: Any, name: str) -> int:
    """`value` as an int when it is a whole number of frames (2.0 is, 2.7 is not: truncating it cuts other trials)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number of frames, got {value!r}.") from None
    if isinstance(value, (bool, np.bool_)) or not math.isfinite(number) or number != round(number):
        raise ValueError(f"{name} must be a whole number of frames, got {value}.")
    return int(round(number))


def cut_trials(
    traces: Any,
    trial_length: int,
    stride: int | None = None,
    behavior: Any | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Cut a continuous recording `(neurons, frames)` into trials `(trials, neurons, trial_length)`.

    Windows start at `0, stride, 2*stride, ...` (default `stride = trial_length`, non-overlapping); the incomplete
    tail is dropped.

    Args:
        traces (`array-like` of shape `(neurons, frames)`): continuous recording.
        trial_length (`int`): frames per trial.
        stride (`int`, *optional*): frames between trial starts (defaults to `trial_length`).
        behavior (`array-like` of shape `(channels, frames)`, *optional*): cut alike.

    Returns:
        `np.ndarray` `(trials, neurons, trial_length)`, or the tuple `(trials, behavior_trials)` with
        `behavior_trials` `(trials, channels, trial_length)` when `behavior` is given.
    """
    array = check_traces(traces, name="traces", ndim=2)
    trial_length = _whole_frames(trial_length, "trial_length")
    stride = trial_length if stride is None else _whole_frames(stride, "stride")
    if trial_length < 1 or stride < 1:
        raise ValueError(f"trial_length and stride must be positive, got trial_length={trial_length}, stride={stride}.")
    num_frames = array.shape[-1]
    if num_frames < trial_length:
        raise ValueError(
            f"The recording has {num_frames} frames, shorter than one trial of {trial_length} frames; "
            "use a shorter trial_length."
        )
    starts = np.arange(0, num_frames - trial_length + 1, stride)
    index = starts[:, None] + np.arange(trial_length)[None]  # (trials, trial_length)
    trials = np.ascontiguousarray(np.moveaxis(array[:, index], 1, 0))  # (trials, neurons, L)
    if behavior is None:
        return trials
    behavior_array = check_traces(behavior, name="behavior", ndim=2)
    if behavior_array.shape[-1] != num_frames:
        raise ValueError(
            f"behavior has {behavior_array.shape[-1]} frames but traces have {num_frames}; they must share the time axis."
        )
    return trials, np.ascontiguousarray(np.moveaxis(behavior_array[:, index], 1, 0))


def _split_sizes(num_trials: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, validation, test) trial counts: validation and test get `round(fraction * num_trials)` (at least one
    each), train the rest."""
    num_trials = int(num_trials)
    if num_trials < 3:
        raise ValueError(f"Need at least 3 trials to split into train/validation/test, got {num_trials}.")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1 (train, validation, test), got {fractions}."
        )
    num_validation = max(1, int(round(fractions[1] * num_trials)))
    num_test = max(1, int(round(fractions[2] * num_trials)))
    num_train = num_trials - num_validation - num_test
    if num_train < 1:
        raise ValueError(f"fractions {fractions} leave no training trial out of {num_trials}; increase the first one.")
    return num_train, num_validation, num_test


def split_trials(
    num_trials: int, seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> dict[str, np.ndarray]:
    """Deterministic random split of trial indices into train/validation/test.

    Validation and test get `round(fraction * num_trials)` trials (at least one each), train the rest; the three
    index arrays are sorted, disjoint and together cover `range(num_trials)`. Only for trials that share no frames
    (see `split_trials_by_time` for overlapping windows).

    Returns:
        `dict` with keys `"train"`, `"validation"`, `"test"` mapping to int64 index arrays.
    """
    num_train, num_validation, _ = _split_sizes(num_trials, fractions)
    permutation = np.random.default_rng(seed).permutation(int(num_trials))
    return {
        "train": np.sort(permutation[:num_train]),
        "validation": np.sort(permutation[num_train : num_train + num_validation]),
        "test": np.sort(permutation[num_train + num_validation :]),
    }


def trials_overlap(starts: Any, trial_length: int) -> bool:
    """Whether windows of `trial_length` frames starting at `starts` share frames."""
    starts = np.sort(np.asarray(starts, dtype=np.int64).reshape(-1))
    return bool(len(starts) > 1 and np.diff(starts).min() < int(trial_length))


def split_trials_by_time(
    starts: Any, trial_length: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> tuple[dict[str, np.ndarray], int]:
    """Split windows that overlap in time into train, validation and test as contiguous blocks, in that order, with at
    least one trial length of recording between the last trial of a block and the first of the next.

    A random split of overlapping windows puts the same frames into training and test trials. Here no frame is in two
    splits, and neither is the trial length around it; the trials inside the gaps are left out of every split.

    Args:
        starts (`array-like` of int): first frame of each trial (any order; trial `i` starts at `starts[i]`).
        trial_length (`int`): frames per trial, in the units of `starts`.
        fractions (`tuple[float, float, float]`, *optional*): train/validation/test shares before the gaps are cut.

    Returns:
        `(splits, unused)`: trial indices per split (sorted int64 arrays) and how many trials fell into the gaps.
    """
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    trial_length = int(trial_length)
    order = np.argsort(starts, kind="stable")
    # trials lost in each gap at the typical spacing, so the blocks keep the asked-for shares of the rest
    spacing = max(1, int(np.median(np.diff(starts[order])))) if len(starts) > 1 else 1
    gap = max(0, math.ceil(2 * trial_length / spacing) - 1)
    num_train, num_validation, num_test = _split_sizes(max(3, len(starts) - 2 * gap), fractions)
    blocks = [order[:num_train], order[num_train + gap:num_train + gap + num_validation],
              order[num_train + 2 * gap + num_validation:]]
    if not len(blocks[2]):
        blocks[2] = order[-num_test:]
    # drop the end of each block until its last trial ends one trial length before the next block's first trial
    for index in (1, 0):
        block, first_next = blocks[index], starts[blocks[index + 1]].min()
        blocks[index] = block[starts[block] + 2 * trial_length <= first_next]
        if len(blocks[index]) == 0:
            raise ValueError(
                f"the {len(starts)} overlapping trials (starts {int(np.diff(np.sort(starts)).min())} frames apart, "
                f"{trial_length} frames long) are too few to split into train, validation and test blocks separated "
                "by one trial length: use a longer recording, or a trial stride (--trial_stride_seconds) closer to "
                "the trial length."
            )
    splits = {name: np.sort(block).astype(np.int64) for name, block in zip(("train", "validation", "test"), blocks)}
    return splits, len(starts) - sum(len(block) for block in blocks)


def _split_session(session: SessionTrials, seed: int, fractions: tuple[float, float, float]) -> tuple[dict, dict]:
    """(splits, how they were made): at random by trial, or in time blocks when the trials overlap."""
    starts = session.extras.get("trial_starts")
    length = session.num_frames  # at the recording's rate, like the starts
    if starts is not None and len(np.asarray(starts).reshape(-1)) == session.num_trials and trials_overlap(starts,
                                                                                                          length):
        splits, unused = split_trials_by_time(starts, length, fractions)
        return splits, {"method": "time_blocks", "order": ["train", "validation", "test"], "gap_frames": length,
                        "gap_seconds": length / session.fs, "unused_trials": unused,
                        "reason": "the trials overlap in time, so a random split would share frames between splits"}
    return split_trials(session.num_trials, seed=seed, fractions=fractions), {"method": "random_trials", "seed": seed}


@dataclass
class PreparedSession(TrialGrid):
    """A session ready for tokenization: z-scored trials at the model frame rate plus what maps outputs back.

    Attributes:
        name (`str`): session name.
        traces (`np.ndarray` float32 `(trials, neurons, frames)`): z-scored with `stats` (training trials only).
        fs (`float`): frame rate of `traces` (the model rate, 5 Hz by default).
        splits (`dict[str, np.ndarray]`): trial indices for `"train"`, `"validation"`, `"test"`.
        stats (`ZScoreStats`): per-neuron statistics of the (resampled, smoothed) training trials;
            `stats.inverse_transform(traces)` returns to the input units.
        behavior (`np.ndarray` float32 `(trials, channels, frames)` or `None`): z-scored with `behavior_stats`.
        behavior_stats (`ZScoreStats` or `None`): per-channel statistics of the training trials' behaviour.
        behavior_names (`list[str]` or `None`).
        source_fs (`float`): frame rate of the raw session.
        ema_alpha (`float` or `None`): EMA smoothing applied (None = none).
        window_size (`int`): frames are a multiple of it.
        extras (`dict`): per-trial metadata carried over from the session.
        split_method (`dict`): how the trials were split (`{"method": "random_trials", "seed": ...}`, or
            `"time_blocks"` with the gap when the trials overlap in time).
    """

    name: str
    traces: np.ndarray
    fs: float
    splits: dict[str, np.ndarray]
    stats: ZScoreStats
    behavior: np.ndarray | None = None
    behavior_stats: ZScoreStats | None = None
    behavior_names: list[str] | None = None
    source_fs: float | None = None
    ema_alpha: float | None = None
    window_size: int = 4
    extras: dict[str, Any] = field(default_factory=dict)
    split_method: dict[str, Any] | None = None

    def split(self, name: str) -> np.ndarray:
        """Z-scored trials `(trials, neurons, frames)` of split `name` (`"train"`, `"validation"` or `"test"`)."""
        if name not in self.splits:
            raise ValueError(f"Unknown split {name!r}; choose one of {sorted(self.splits)}.")
        return self.traces[self.splits[name]]


def _resample_smooth_crop(session: SessionTrials, processor, ema_alpha: float | None):
    """(traces, behaviour or None) of a session at the processor's rate, EMA-smoothed (traces only) and cropped to a
    multiple of the token window (the oldest frames go)."""
    window_size, target_fs = processor.window_size, processor.sampling_rate
    traces = processor.resample(session.traces, session.fs)
    behavior = None if session.behavior is None else processor.resample(session.behavior, session.fs)
    if ema_alpha is not None:
        traces = causal_ema(traces, alpha=ema_alpha, axis=-1)
    num_frames = traces.shape[-1] - traces.shape[-1] % window_size
    if num_frames < window_size:
        raise ValueError(
            f"Session {session.name!r}: {session.traces.shape[-1]} frames at {session.fs} Hz become {traces.shape[-1]} "
            f"frames at {target_fs} Hz, fewer than one token window of {window_size} frames; use longer trials."
        )
    start = traces.shape[-1] - num_frames
    return traces[..., start:], None if behavior is None else behavior[..., start:]


def prepare_session(
    session: SessionTrials,
    target_fs: float = 5.0,
    ema_alpha: float | None = None,
    split_seed: int = 0,
    window_size: int = 4,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> PreparedSession:
    """Resample, optionally smooth, crop, split and z-score one session.

    Steps, with `CalmTraceProcessor` (the object checkpoints save and the pipeline uses): resample every trial (and
    the behaviour) from `session.fs` to `target_fs`, end of each trial aligned; optional causal EMA with `ema_alpha`
    (traces only); crop frames to a multiple of `window_size` (drops the oldest frames); split trials with
    `split_trials(num_trials, split_seed, fractions)`, or, when the trials overlap in time (their
    `extras["trial_starts"]` closer than a trial), in time blocks with `split_trials_by_time`; z-score traces and
    behaviour with statistics of the training trials only (validation/test never leak into the normalisation; the std
    floor is relative to the session's median std, so recordings in any units are normalised alike).

    Args:
        session (`SessionTrials`): raw trials `(trials, neurons, frames)` in the recording's units.
        target_fs (`float`, *optional*, defaults to 5.0): model frame rate in Hz.
        ema_alpha (`float`, *optional*): causal EMA weight (the authors used 0.15); `None` = no smoothing.
        split_seed (`int`, *optional*, defaults to 0): seed of the trial split.
        window_size (`int`, *optional*, defaults to 4): tokenizer window L; frames are cropped to a multiple of it.
        fractions (`tuple[float, float, float]`, *optional*): train/validation/test fractions.

    Returns:
        `PreparedSession`.
    """
    from ..processing_calm import CalmTraceProcessor

    window_size = int(window_size)
    if window_size < 1:
        raise ValueError(f"window_size must be a positive number of frames, got {window_size}.")
    target_fs = _check_rate(target_fs, "target_fs")
    # The same processor (end-aligned resampling, causal EMA, crop of the oldest frames, relative std floor) that
    # the checkpoint saves and the pipeline applies to a user's context.
    processor = CalmTraceProcessor(sampling_rate=target_fs, window_size=window_size, ema_alpha=ema_alpha)
    traces, behavior = _resample_smooth_crop(session, processor, ema_alpha)
    splits, split_method = _split_session(session, split_seed, fractions)
    stats = ZScoreStats(*processor.fit_stats(traces[splits["train"]]))
    traces = stats.transform(traces).astype(np.float32)
    behavior_stats = None
    if behavior is not None:
        behavior_stats = ZScoreStats.fit(behavior[splits["train"]])
        behavior = behavior_stats.transform(behavior).astype(np.float32)
    return PreparedSession(
        name=session.name,
        traces=np.ascontiguousarray(traces),
        fs=float(target_fs),
        splits=splits,
        stats=stats,
        behavior=None if behavior is None else np.ascontiguousarray(behavior),
        behavior_stats=behavior_stats,
        behavior_names=None if session.behavior_names is None else list(session.behavior_names),
        source_fs=float(session.fs),
        ema_alpha=None if ema_alpha is None else float(ema_alpha),
        window_size=window_size,
        extras=dict(session.extras),
        split_method=split_method,
    )
