"""`SessionTrials`: one recording session cut into equal-length trials, in the recording's own units, and
`check_traces`, the validation every trace array passes on its way in (SessionTrials, readers, preprocessing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np



_AXIS_NAMES = {1: ("frame",), 2: ("neuron", "frame"), 3: ("trial", "neuron", "frame")}


def _check_rank(array: np.ndarray, name: str, ndim: int | tuple[int, ...]) -> None:
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if array.ndim not in allowed:
        layouts = " or ".join(
            "(" + ", ".join(a + "s" for a in _AXIS_NAMES.get(d, ("axis",) * d)) + ")" for d in allowed
        )
        hint = ""
        if array.ndim == 1 and 2 in allowed:
            hint = " A single trace needs x[None] (one neuron)."
        elif array.ndim == 2 and 3 in allowed:
            hint = " A single trial needs x[None] (one trial)."
        raise ValueError(
            f"{name} must have rank {' or '.join(map(str, allowed))} {layouts}, got shape {array.shape}.{hint}"
        )


def _check_finite(array: np.ndarray, name: str, dtype: Any, source_finite: bool | None) -> None:
    """Name the first non-finite value by trial / neuron / frame; values that only overflowed the cast to `dtype`
    get their own message."""
    finite = np.isfinite(array)
    if finite.all():
        return
    bad = tuple(int(i) for i in np.argwhere(~finite)[0])
    axis_names = _AXIS_NAMES.get(array.ndim, tuple(f"axis{i}" for i in range(array.ndim)))
    where = ", ".join(f"{axis} {index}" for axis, index in zip(axis_names, bad))
    count = int((~finite).sum())
    if source_finite:
        raise ValueError(
            f"{name} contains {count} value(s) beyond the range of {np.dtype(dtype).name} (they become inf "
            f"when cast); the first is at {where}. Rescale the traces (e.g. to other units) before use."
        )
    raise ValueError(
        f"{name} contains {count} non-finite value(s) (NaN/Inf); the first is at {where} "
        f"(value {array[bad]}). Interpolate or drop the affected neurons/trials before use."
    )


def check_traces(
    x: Any,
    name: str = "traces",
    ndim: int | tuple[int, ...] | None = None,
    min_frames: int = 1,
    dtype: Any = None,
) -> np.ndarray:
    """Validate a trace array and return it as a floating numpy array.

    Args:
        x (`array-like`):
            Traces, e.g. `(trials, neurons, frames)`, `(neurons, frames)` or `(frames,)`.
        name (`str`, *optional*, defaults to `"traces"`):
            Name used in error messages.
        ndim (`int` or `tuple[int]`, *optional*):
            Accepted rank(s). `None` accepts any rank >= 1.
        min_frames (`int`, *optional*, defaults to 1):
            Minimum length of the last (time) axis.
        dtype (`np.dtype`, *optional*):
            Cast to this float dtype before the finiteness check, so float64 values beyond e.g. float32's range
            (which the cast turns into +-inf) are reported instead of passing silently.

    Returns:
        `np.ndarray`: the traces (float dtype kept, integer input converted to float32, or `dtype` when given).

    Raises:
        `ValueError`: wrong rank, empty array, complex values, too few frames, or a non-finite value (the message
        names the first offending trial / neuron / frame).
    """
    array = np.asarray(x)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(
            f"{name} must be a numeric array, got dtype {array.dtype}. Pass a float array of shape "
            "(trials, neurons, frames) or (neurons, frames); ragged lists of traces must be padded or cut first."
        )
    if np.iscomplexobj(array):
        # a cast to float would silently drop the imaginary part
        raise ValueError(
            f"{name} must be real, got complex dtype {array.dtype}; pass np.abs(x) or x.real explicitly."
        )
    source_finite = None
    if dtype is not None:
        source_finite = bool(np.isfinite(array).all()) if np.issubdtype(array.dtype, np.floating) else True
        with np.errstate(over="ignore"):
            array = array.astype(dtype, copy=False)
    elif not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    if ndim is not None:
        _check_rank(array, name, ndim)
    if array.ndim == 0:
        raise ValueError(f"{name} must be an array with a time axis, got a scalar.")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); every axis needs at least one element.")
    if array.shape[-1] < min_frames:
        raise ValueError(
            f"{name} has {array.shape[-1]} frames but at least {min_frames} are needed; use longer recordings/trials."
        )
    _check_finite(array, name, dtype, source_finite)
    return array


class TrialGrid:
    """`num_trials`, `num_neurons` and `num_frames` of a class whose `traces` are `(trials, neurons, frames)`."""

    traces: np.ndarray

    @property
    def num_trials(self) -> int:
        return int(self.traces.shape[0])

    @property
    def num_neurons(self) -> int:
        return int(self.traces.shape[1])

    @property
    def num_frames(self) -> int:
        return int(self.traces.shape[2])


@dataclass
class SessionTrials(TrialGrid):
    """Trials of one session (one animal/field of view), raw units.

    Validated on construction: `traces` must be a finite 3-D array (a NaN is reported with its trial, neuron and
    frame); `behavior`, when given, must be finite with the same number of trials and frames.

    Attributes:
        name (`str`): session name, e.g. `"sim-s0"` or `"mrcuts24"`.
        traces (`np.ndarray` float32 `(trials, neurons, frames)`): calcium traces in the recording's units.
        fs (`float`): frame rate in Hz.
        behavior (`np.ndarray` float32 `(trials, channels, frames)`, *optional*): behaviour at the same frames.
        behavior_names (`list[str]`, *optional*): one name per behaviour channel.
        extras (`dict`, *optional*): anything else (ground truth of a simulation, per-trial stimulus labels, ...).
    """

    name: str
    traces: np.ndarray
    fs: float
    behavior: np.ndarray | None = None
    behavior_names: list[str] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.name = str(self.name)
        self.traces = np.ascontiguousarray(
            check_traces(self.traces, name=f"traces of session {self.name!r}", ndim=3, dtype=np.float32)
        )
        self.fs = float(self.fs)
        if not np.isfinite(self.fs) or self.fs <= 0:
            raise ValueError(f"Session {self.name!r}: fs must be a positive frame rate in Hz, got {self.fs}.")
        if self.behavior is not None:
            behavior = check_traces(self.behavior, name=f"behavior of session {self.name!r}", ndim=3, dtype=np.float32)
            if behavior.shape[0] != self.traces.shape[0] or behavior.shape[2] != self.traces.shape[2]:
                raise ValueError(
                    f"Session {self.name!r}: behavior has shape {behavior.shape} but traces {self.traces.shape}; "
                    "behavior must be (trials, channels, frames) with the same trials and frames as traces."
                )
            self.behavior = np.ascontiguousarray(behavior, dtype=np.float32)
            if self.behavior_names is None:
                self.behavior_names = [f"behavior_{i}" for i in range(behavior.shape[1])]
        if self.behavior_names is not None:
            self.behavior_names = [str(n) for n in self.behavior_names]
            if self.behavior is None:
                raise ValueError(f"Session {self.name!r}: behavior_names given without behavior.")
            if len(self.behavior_names) != self.behavior.shape[1]:
                raise ValueError(
                    f"Session {self.name!r}: {len(self.behavior_names)} behavior_names for "
                    f"{self.behavior.shape[1]} behavior channels; give one name per channel."
                )
        self.extras = dict(self.extras or {})

    @property
    def num_behavior_channels(self) -> int:
        return 0 if self.behavior is None else int(self.behavior.shape[1])

    def __repr__(self) -> str:
        behavior = "" if self.behavior is None else f", behavior={self.num_behavior_channels} channels"
        return (
            f"SessionTrials(name={self.name!r}, trials={self.num_trials}, neurons={self.num_neurons}, "
            f"frames={self.num_frames}, fs={self.fs}{behavior})"
        )
