"""Loading recordings: the `Recording` container and `.npz` files (the real recordings shipped in `<data dir>`). The
NWB (`nwb.py`), suite2p (`suite2p.py`) and CaImAn (`caiman.py`) readers build on it; `readers.load_recording`
dispatches to all of them.

The data folder is the environment variable `CALM_DATA_DIR` when set, else `../shared/data` relative to the current
working directory (the layout of a checkout run from its root); every loader also takes `data_dir=` explicitly. Files are read with `np.load(..., allow_pickle=False)`; nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .preprocessing import cut_trials
from .session import check_traces
from .session import SessionTrials


DATA_DIR_ENV = "CALM_DATA_DIR"
PARK_FOLDER = "park2024_v1_gratings_behavior"
CASCADE_FILE = "cascade_groundtruth/gt_30hz.npz"
TRIPLETT_FILE = "triplett2018_zf_tectum_spont/zf_20151104-f1.npz"

_STANDARD_KEYS = ("traces", "fs", "behavior", "behavior_names", "trial_starts")


def default_data_dir() -> Path:
    """Folder holding the real recordings: `$CALM_DATA_DIR` if set, else `../shared/data` relative to the current
    working directory. The package never looks at where it is installed (a wheel has no repository around it)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return (Path.cwd().parent / "shared" / "data").resolve()


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
            `cell_xy`, `trial_direction_deg`, `source`, ...); `roi_ids` `(neurons,)` int64 is the id each neuron has in
            the software that found it (suite2p ROI index, CaImAn component, NWB ROI id), when known.
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
        (`trial_length` required). `extras` are carried over, plus `trial_starts`, the first frame of each trial
        (`prepare_session` splits trials that overlap in time by blocks, not at random).
        """
        behavior = None
        if self.trial_starts is not None:
            starts = np.asarray(self.trial_starts, dtype=np.int64)
            if trial_length is None:
                gaps = np.diff(np.append(starts, self.num_frames))
                trial_length = int(gaps.min())
            trial_length = int(trial_length)
            if trial_length < 1 or (starts < 0).any():
                raise ValueError(f"{self.name}: trial_length must be positive and trial_starts non-negative.")
            # Time is not continuous across a trial start: a trial that runs into the next one mixes two trials.
            gaps = np.diff(np.append(np.sort(starts), self.num_frames))
            if trial_length > int(gaps.min()):
                raise ValueError(
                    f"{self.name}: trials of {trial_length} frames ({trial_length / self.fs:g} s) would run across the "
                    f"next trial start or the end of the recording (the shortest trial is {int(gaps.min())} frames = "
                    f"{gaps.min() / self.fs:g} s); pass a trial length of at most {int(gaps.min())} frames."
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
            if self.behavior is not None:
                traces, behavior = cut_trials(self.traces, trial_length, stride=stride, behavior=self.behavior)
            else:  # cut_trials returns a bare array without behaviour
                traces = cut_trials(self.traces, trial_length, stride=stride)
            extras = dict(self.extras)
            extras["trial_starts"] = np.arange(len(traces), dtype=np.int64) * int(stride or trial_length)
        return SessionTrials(
            name=self.name,
            traces=traces,
            fs=self.fs,
            behavior=behavior,
            behavior_names=self.behavior_names,
            extras=extras,
        )


LAYOUTS = ("auto", "neurons_frames", "frames_neurons")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _orient_traces(traces: np.ndarray, layout: str, source: str, num_frames_hint: int | None = None) -> np.ndarray:
    """Return `(neurons, frames)` traces from a 2-D array stored either way.

    `layout="auto"` keeps `(neurons, frames)` unless the other arrays of the file (behaviour, timestamps) say the
    frames are on the first axis; an array with more rows than columns and nothing to tell is refused, because a
    silent transpose turns 1000 frames of 50 neurons into 50 frames of 1000 "neurons".
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}.")
    if layout == "frames_neurons":
        return np.ascontiguousarray(traces.T)
    if layout == "neurons_frames":
        return traces
    rows, columns = traces.shape
    if num_frames_hint is not None and rows != columns:
        if rows == num_frames_hint:
            return np.ascontiguousarray(traces.T)
        if columns == num_frames_hint:
            return traces
    if rows > columns:
        raise ValueError(
            f"{source}: traces have shape {traces.shape} (more rows than columns), which looks like (frames, neurons) "
            "but nothing in the file says which axis is time. Pass layout='frames_neurons' to transpose it, or "
            "layout='neurons_frames' if there really are more neurons than frames."
        )
    return traces


def parse_frame_rate(value: Any, source: str, name: str = "fs") -> float:
    """A frame rate stored in a file as a positive number of Hz: one number, or text holding one ("30"); anything else
    (several values, "30Hz", True, None) is refused with a message naming `source` and `name`."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"{source}: {name} must be one number (the frame rate in Hz), got {array.size} values "
                         f"{array.reshape(-1)[:4].tolist()}; store the rate of these traces alone.")
    item = array.reshape(-1)[0]
    if isinstance(item, np.floating):  # a float32 2.2 is the rate 2.2, not 2.2000000477
        item = float(str(item))
    elif isinstance(item, np.generic):
        item = item.item()
    if isinstance(item, bytes):
        item = item.decode(errors="replace")
    rate = None
    if not isinstance(item, (bool, np.bool_)) and item is not None:
        try:
            rate = float(item)
        except (TypeError, ValueError):
            rate = None
    if rate is None or not np.isfinite(rate) or rate <= 0:
        raise ValueError(f"{source}: {name} must be a frame rate in Hz, a positive number, got {item!r}; store the "
                         "number alone (e.g. 30.0).")
    return rate


def check_roi_ids(roi_ids: Any, num_neurons: int, source: str) -> np.ndarray:
    """`roi_ids` as int64 `(neurons,)`: one whole-number id per neuron (a suite2p ROI index, a CaImAn component, an
    NWB ROI id), refused with a message naming `source` otherwise."""
    ids = np.asarray(roi_ids)
    whole = ids.dtype.kind in "iu" or (
        ids.dtype.kind == "f" and bool(np.isfinite(ids).all()) and bool((ids == np.round(ids)).all()))
    if ids.shape != (num_neurons,) or not whole:
        raise ValueError(f"{source}: roi_ids must hold one whole-number id per neuron ({num_neurons}), got shape "
                         f"{ids.shape} of {ids.dtype}; store them as an integer array, or leave them out.")
    return ids.astype(np.int64)


def recording_from_arrays(
    source: str | os.PathLike,
    traces: Any,
    fs: Any,
    behavior: Any | None = None,
    behavior_names: list[str] | None = None,
    trial_starts: Any | None = None,
    extras: dict[str, Any] | None = None,
    name: str | None = None,
) -> Recording:
    """Validate arrays read from `source` and build a `Recording`; every message names `source`.

    Checks: traces numeric, 2-D `(neurons, frames)`, finite and within float32 range (float64 values beyond it would
    become Inf); `fs` positive; behaviour `(channels, frames)` on the same frames; trial starts inside the recording.
    """
    source = str(source)
    label = Path(source).name or source
    array = np.asarray(traces)
    if np.issubdtype(array.dtype, np.floating) and array.size and np.isfinite(array).all():
        peak = float(np.abs(array).max())
        if peak > _FLOAT32_MAX:
            raise ValueError(
                f"{source}: traces reach {peak:.3g}, beyond the float32 range ({_FLOAT32_MAX:.3g}) the model computes "
                "in; rescale the traces (e.g. divide by their median) before use."
            )
    traces = np.asarray(check_traces(array, name=f"traces in {label}", ndim=2), dtype=np.float32)
    fs_value = parse_frame_rate(fs, source)
    if behavior is not None:
        behavior = np.asarray(check_traces(behavior, name=f"behavior in {label}", ndim=(1, 2)), np.float32)
        behavior = behavior[None] if behavior.ndim == 1 else behavior
        if behavior.shape[1] != traces.shape[1]:
            raise ValueError(
                f"{source}: behavior has {behavior.shape[1]} frames but traces have {traces.shape[1]}; they must match."
            )
        behavior_names = (
            [str(n) for n in behavior_names] if behavior_names is not None else [f"behavior_{i}" for i in range(len(behavior))]
        )
        if len(behavior_names) != behavior.shape[0]:
            raise ValueError(f"{source}: {len(behavior_names)} behavior_names for {behavior.shape[0]} behavior channels.")
    else:
        behavior_names = None
    if trial_starts is not None:
        trial_starts = np.asarray(trial_starts).reshape(-1)
        if trial_starts.size == 0:
            raise ValueError(f"{source}: trial_starts is empty; leave it out to cut the recording into windows "
                             "(--trial_seconds), or list the first frame of every trial.")
        if not np.issubdtype(trial_starts.dtype, np.integer):
            if not np.isfinite(trial_starts).all() or (trial_starts != np.round(trial_starts)).any():
                raise ValueError(f"{source}: trial_starts must be whole frame indices, got {trial_starts[:8]}...")
        trial_starts = trial_starts.astype(np.int64)
        if (trial_starts < 0).any() or (trial_starts >= traces.shape[1]).any():
            raise ValueError(f"{source}: trial_starts must lie in [0, {traces.shape[1]}), got {trial_starts}.")
        values, counts = np.unique(trial_starts, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"{source}: trial_starts must increase from trial to trial, but "
                             f"{int(values[counts > 1][0])} appears twice; list each trial once.")
        if (np.diff(trial_starts) < 0).any():
            at = int(np.argmax(np.diff(trial_starts) < 0))
            raise ValueError(f"{source}: trial_starts must increase from trial to trial, but trial {at} starts at "
                             f"{trial_starts[at]} and trial {at + 1} at {trial_starts[at + 1]}; store the trials "
                             "(and their per-trial labels) in time order.")
    extras = dict(extras or {})
    if extras.get("roi_ids") is not None:
        extras["roi_ids"] = check_roi_ids(extras["roi_ids"], traces.shape[0], source)
    return Recording(
        name=name or Path(source).stem,
        traces=traces,
        fs=fs_value,
        behavior=behavior,
        behavior_names=behavior_names,
        trial_starts=trial_starts,
        extras=extras,
    )


def _check_npz_magic(path: Path) -> None:
    """Name what a file is when it is not an .npz archive (np.load would call it pickled data, or load an .npy)."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        what = "an HDF5 file (NWB or CaImAn results?)"
        fix = "read it with `calm prepare --nwb` (load_nwb_recording) or `--caiman` (load_caiman_recording)"
    elif head.startswith(b"\x93NUMPY"):
        what, fix = "a single .npy array", "save the recording with np.savez(path, traces=..., fs=...)"
    else:
        printable = head and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head)
        what = f"{'text' if printable else 'binary data'} starting with {head[:12]!r}"
        fix = "save the recording with np.savez(path, traces=..., fs=...)"
    raise ValueError(f"{path} is not an .npz archive: it is {what}; {fix}.")


def load_npz_recording(path: str | os.PathLike, layout: str = "auto",
                       sampling_rate: float | None = None) -> Recording:
    """Load a `.npz` recording (`traces` required, `fs` unless `sampling_rate` is given; `behavior`,
    `behavior_names`, `trial_starts` optional; every other array goes to `extras`, e.g. `roi_ids`, one id per
    neuron, which `calm forecast` writes next to its forecasts and plots). Read with `allow_pickle=False`.

    Args:
        path (`str` or `os.PathLike`): the `.npz` file.
        layout (`str`, *optional*, defaults to `"auto"`): `"neurons_frames"`, `"frames_neurons"` or `"auto"`
            (`(neurons, frames)` unless `behavior` says the frames are on the first axis; a traces array with more
            rows than columns and nothing to tell is refused with a message naming both options).
        sampling_rate (`float`, *optional*): the frame rate in Hz, instead of the file's `fs` (which may then be
            missing).

    Raises:
        `FileNotFoundError`: the file does not exist (the message names the data folder and `CALM_DATA_DIR`).
        `ValueError`: not a readable npz (corrupt/truncated), a required key is missing, shapes disagree, values
        are NaN/Inf or beyond float32 range (named by neuron and frame).
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path)
    _check_npz_magic(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {key: archive[key] for key in archive.files}
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise ValueError(
                f"{path} holds pickled Python objects, which calm_hf does not load (unsafe). Save plain arrays "
                "(np.savez with numeric/str arrays); for NWB files use load_nwb_recording / `calm prepare --nwb`."
            ) from error
        raise ValueError(f"{path} is not a readable .npz file ({error}); re-export it with np.savez.") from error
    except Exception as error:  # zipfile.BadZipFile, EOFError, OSError of a truncated or garbled file
        raise ValueError(
            f"{path} is not a readable .npz file ({type(error).__name__}: {error}); it may be truncated or corrupt. "
            "Re-export it with np.savez(path, traces=..., fs=...)."
        ) from error
    missing = [key for key in ("traces", "fs") if key not in data and (key == "traces" or sampling_rate is None)]
    if missing:
        raise ValueError(
            f"{path} lacks the key(s) {missing}; a recording needs 'traces' (neurons, frames) and 'fs' (Hz), or the "
            f"rate given as sampling_rate (`--sampling_rate` on the command line). Found keys: {sorted(data)}."
        )
    traces = np.asarray(data["traces"])
    if traces.ndim != 2:
        raise ValueError(f"{path}: traces must be 2-D (neurons, frames), got shape {traces.shape}.")
    if traces.size == 0:
        raise ValueError(f"{path}: traces is empty (shape {traces.shape}); a recording needs neurons and frames.")
    behavior = data.get("behavior")
    frames_hint = None
    if behavior is not None and np.asarray(behavior).ndim >= 1:
        frames_hint = int(np.asarray(behavior).shape[-1])
    traces = _orient_traces(traces, layout, str(path), frames_hint)
    names = data.get("behavior_names")
    extras = {key: value for key, value in data.items() if key not in _STANDARD_KEYS}
    for key, value in extras.items():
        if value.ndim == 0:
            extras[key] = value.item()
    return recording_from_arrays(
        path,
        traces,
        data["fs"] if sampling_rate is None else sampling_rate,
        behavior=behavior,
        behavior_names=None if names is None or behavior is None else list(names.reshape(-1)),
        trial_starts=data.get("trial_starts"),
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
