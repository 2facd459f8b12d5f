"""Loading the real recordings shipped as plain `.npz` files (see `<data dir>/README.md`).

The data folder defaults to `<repo root>/../shared/data` and is overridden by the environment variable
`CALM_DATA_DIR`. Files are read with `np.load(..., allow_pickle=False)`; nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .preprocessing import check_traces, cut_trials
from .session import SessionTrials


DATA_DIR_ENV = "CALM_DATA_DIR"
PARK_FOLDER = "park2024_v1_gratings_behavior"
CASCADE_FILE = "cascade_groundtruth/gt_30hz.npz"
TRIPLETT_FILE = "triplett2018_zf_tectum_spont/zf_20151104-f1.npz"

_STANDARD_KEYS = ("traces", "fs", "behavior", "behavior_names", "trial_starts")


def default_data_dir() -> Path:
    """Folder holding the real recordings: `$CALM_DATA_DIR` if set, else `<repo root>/../shared/data`.

    The repository root is found from this file (`src/calm_hf/data/io.py` -> four levels up).
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[3]
    return (repo_root.parent / "shared" / "data").resolve()


def _missing_file_error(path: Path, what: str = "file") -> FileNotFoundError:
    return FileNotFoundError(
        f"Recording {what} not found: {path}. The data folder is {default_data_dir()} "
        f"(set the environment variable {DATA_DIR_ENV} to the folder holding the .npz recordings)."
    )


@dataclass
class Recording:
    """One continuous (or trial-concatenated) recording as stored in a `.npz` file.

    Attributes:
        name (`str`): file stem.
        traces (`np.ndarray` float32 `(neurons, frames)`): calcium traces in the file's units.
        fs (`float`): frame rate in Hz.
        behavior (`np.ndarray` float32 `(channels, frames)`, *optional*).
        behavior_names (`list[str]`, *optional*).
        trial_starts (`np.ndarray` int64 `(trials,)`, *optional*): first frame of each trial (time is not
            continuous across trials when given).
        extras (`dict[str, np.ndarray]`): every other array in the file (`spikes`, `dataset_id`, `dataset_names`,
            `cell_xy`, `trial_direction_deg`, `source`, ...).
    """

    name: str
    traces: np.ndarray
    fs: float
    behavior: np.ndarray | None = None
    behavior_names: list[str] | None = None
    trial_starts: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_neurons(self) -> int:
        return int(self.traces.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.traces.shape[1])

    def to_session(self, trial_length: int | None = None, stride: int | None = None) -> SessionTrials:
        """Cut into a `SessionTrials`.

        With `trial_starts`, trials are cut at those starts (`trial_length` defaults to the shortest gap between
        starts); otherwise the recording is continuous and `cut_trials(traces, trial_length, stride)` is used
        (`trial_length` required). `extras` are carried over (plus `trial_starts` when cut at them).
        """
        behavior = None
        if self.trial_starts is not None:
            starts = np.asarray(self.trial_starts, dtype=np.int64)
            if trial_length is None:
                gaps = np.diff(np.append(starts, self.num_frames))
                trial_length = int(gaps.min())
            trial_length = int(trial_length)
            if trial_length < 1 or (starts < 0).any() or (starts + trial_length > self.num_frames).any():
                raise ValueError(
                    f"{self.name}: trials of {trial_length} frames starting at trial_starts do not fit in "
                    f"{self.num_frames} frames; pass a shorter trial_length."
                )
            index = starts[:, None] + np.arange(trial_length)[None]  # (trials, L)
            traces = np.moveaxis(self.traces[:, index], 1, 0)
            if self.behavior is not None:
                behavior = np.moveaxis(self.behavior[:, index], 1, 0)
            extras = dict(self.extras)
            extras["trial_starts"] = starts
        else:
            if trial_length is None:
                raise ValueError(
                    f"{self.name} is a continuous recording ({self.num_frames} frames at {self.fs} Hz) without "
                    "trial_starts; pass trial_length (frames per trial) to cut it."
                )
            cut = cut_trials(self.traces, trial_length, stride=stride, behavior=self.behavior)
            traces, behavior = cut if self.behavior is not None else (cut, None)
            extras = dict(self.extras)
        return SessionTrials(
            name=self.name,
            traces=traces,
            fs=self.fs,
            behavior=behavior,
            behavior_names=self.behavior_names,
            extras=extras,
        )


def load_npz_recording(path: str | os.PathLike) -> Recording:
    """Load a `.npz` recording (`traces` `(neurons, frames)` and `fs` required; `behavior`, `behavior_names`,
    `trial_starts` optional; every other array goes to `extras`).

    Raises:
        `FileNotFoundError`: the file does not exist (the message names the data folder and `CALM_DATA_DIR`).
        `ValueError`: a required key is missing, shapes disagree, or a value is NaN/Inf (named by neuron and frame).
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path)
    with np.load(path, allow_pickle=False) as archive:
        data = {key: archive[key] for key in archive.files}
    missing = [key for key in ("traces", "fs") if key not in data]
    if missing:
        raise ValueError(
            f"{path} lacks the key(s) {missing}; a recording needs 'traces' (neurons, frames) and 'fs' (Hz). "
            f"Found keys: {sorted(data)}."
        )
    traces = np.asarray(check_traces(data["traces"], name=f"traces in {path.name}", ndim=2), dtype=np.float32)
    # str() of a float32 scalar is its shortest repr: 2.2 stays 2.2 instead of 2.2000000476837
    fs = float(str(np.asarray(data["fs"]).reshape(-1)[0]))
    if not np.isfinite(fs) or fs <= 0:
        raise ValueError(f"{path}: 'fs' must be a positive frame rate in Hz, got {fs}.")
    behavior = behavior_names = trial_starts = None
    if "behavior" in data:
        behavior = np.asarray(check_traces(data["behavior"], name=f"behavior in {path.name}", ndim=2), np.float32)
        if behavior.shape[1] != traces.shape[1]:
            raise ValueError(
                f"{path}: behavior has {behavior.shape[1]} frames but traces have {traces.shape[1]}; they must match."
            )
        names = data.get("behavior_names")
        behavior_names = (
            [str(n) for n in names.reshape(-1)] if names is not None else [f"behavior_{i}" for i in range(len(behavior))]
        )
        if len(behavior_names) != behavior.shape[0]:
            raise ValueError(
                f"{path}: {len(behavior_names)} behavior_names for {behavior.shape[0]} behavior channels."
            )
    if "trial_starts" in data:
        trial_starts = np.asarray(data["trial_starts"], dtype=np.int64).reshape(-1)
        if (trial_starts < 0).any() or (trial_starts >= traces.shape[1]).any():
            raise ValueError(f"{path}: trial_starts must lie in [0, {traces.shape[1]}), got {trial_starts}.")
    extras = {key: value for key, value in data.items() if key not in _STANDARD_KEYS}
    for key, value in extras.items():
        if value.ndim == 0:
            extras[key] = value.item()
    return Recording(
        name=path.stem,
        traces=traces,
        fs=fs,
        behavior=behavior,
        behavior_names=behavior_names,
        trial_starts=trial_starts,
        extras=extras,
    )


def _resolve(data_dir: str | os.PathLike | None, relative: str) -> Path:
    base = default_data_dir() if data_dir is None else Path(data_dir)
    path = base / relative
    if not path.exists():
        raise _missing_file_error(path, "file" if path.suffix else "folder")
    return path


def load_park_sessions(data_dir: str | os.PathLike | None = None, trial_length: int = 49) -> list[SessionTrials]:
    """Park et al. 2024 mouse V1 gratings: 5 sessions (one per mouse), 16 Hz, each cut at `trial_starts` into
    128 trials of 49 frames, behaviour (pupil, running speed) cut alike.

    Session names are the mouse ids (`"mrcuts24"`, ...); extras per trial: `trial_direction_deg`,
    `stimulus_onset_frames`, `trial_starts`.
    """
    folder = _resolve(data_dir, PARK_FOLDER)
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise _missing_file_error(folder / "*.npz", "files")
    sessions = []
    for file in files:
        recording = load_npz_recording(file)
        session = recording.to_session(trial_length=trial_length)
        mouse = next((part for part in file.stem.split("_") if part.startswith("mrcuts")), file.stem)
        session.name = mouse
        session.extras["file"] = file.name
        sessions.append(session)
    return sessions


def load_cascade_groundtruth(data_dir: str | os.PathLike | None = None) -> Recording:
    """Cascade ground truth at 30 Hz: 764 independent single-neuron windows x 1024 frames (rows are NOT a
    population), with `extras["spikes"]`, `extras["dataset_id"]` and `extras["dataset_names"]`.

    For single-trace use, `recording.traces[:, None]` is `(windows, 1 neuron, frames)`.
    """
    return load_npz_recording(_resolve(data_dir, CASCADE_FILE))


def load_triplett_zebrafish(data_dir: str | os.PathLike | None = None) -> Recording:
    """Triplett et al. 2018 zebrafish tectum, spontaneous activity: one continuous recording of 114 neurons x 4245
    frames at 2.2 Hz, `extras["cell_xy"]`. Cut it with `recording.to_session(trial_length=...)`."""
    return load_npz_recording(_resolve(data_dir, TRIPLETT_FILE))
