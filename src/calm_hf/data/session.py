"""`SessionTrials`: one recording session cut into equal-length trials, in the recording's own units."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .preprocessing import check_traces


@dataclass
class SessionTrials:
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
    def num_trials(self) -> int:
        return int(self.traces.shape[0])

    @property
    def num_neurons(self) -> int:
        return int(self.traces.shape[1])

    @property
    def num_frames(self) -> int:
        return int(self.traces.shape[2])

    @property
    def num_behavior_channels(self) -> int:
        return 0 if self.behavior is None else int(self.behavior.shape[1])

    def __repr__(self) -> str:
        behavior = "" if self.behavior is None else f", behavior={self.num_behavior_channels} channels"
        return (
            f"SessionTrials(name={self.name!r}, trials={self.num_trials}, neurons={self.num_neurons}, "
            f"frames={self.num_frames}, fs={self.fs}{behavior})"
        )
