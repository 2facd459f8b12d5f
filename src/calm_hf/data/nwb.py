"""Reading calcium traces from Neurodata Without Borders (`.nwb`) files with `pynwb` (extra: `pip install calm_hf[nwb]`).

NWB keeps optical-physiology traces as `RoiResponseSeries` inside a `Fluorescence` or `DfOverF` container under
`processing/ophys`; the data are stored `(frames, rois)` and the rate is either `.rate` or given by `.timestamps`.
Trials live in the file's `trials` table (`start_time` in seconds), behaviour in any `TimeSeries` (acquisition or
processing modules), often at another rate than the imaging.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .io import Recording, _missing_file_error, parse_frame_rate, recording_from_arrays


_CONTAINERS = ("DfOverF", "Fluorescence")


def _import_pynwb():
    try:
        import pynwb
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Reading .nwb files needs pynwb: `pip install 'calm_hf[nwb]'` (or `pip install pynwb`)."
        ) from error
    return pynwb


def _roi_series(nwbfile, path: Path) -> dict[str, Any]:
    """Every RoiResponseSeries under processing/ophys, keyed `"<container>/<series>"`."""
    if "ophys" not in nwbfile.processing:
        raise ValueError(
            f"{path} has no processing/ophys module, so no fluorescence traces (modules: "
            f"{sorted(nwbfile.processing)}). calm_hf reads RoiResponseSeries from processing/ophys/Fluorescence "
            "or processing/ophys/DfOverF."
        )
    found = {}
    for container_name, container in nwbfile.processing["ophys"].data_interfaces.items():
        series = getattr(container, "roi_response_series", None)
        if series is None:
            continue
        for series_name, item in series.items():
            found[f"{container_name}/{series_name}"] = item
    if not found:
        raise ValueError(
            f"{path}: processing/ophys holds no Fluorescence or DfOverF traces (it has "
            f"{sorted(nwbfile.processing['ophys'].data_interfaces)})."
        )
    return found


def _pick_series(found: dict[str, Any], series: str | None, path: Path):
    if series is not None:
        matches = [key for key in found if key == series or key.split("/")[-1] == series or key.split("/")[0] == series]
        if len(matches) != 1:
            raise ValueError(
                f"{path}: series={series!r} matches {matches or 'nothing'}; choose one of {sorted(found)}."
            )
        return matches[0], found[matches[0]]
    for container in _CONTAINERS:  # prefer dF/F, then raw fluorescence
        matches = [key for key in found if key.split("/")[0] == container]
        if len(matches) == 1:
            return matches[0], found[matches[0]]
        if len(matches) > 1:
            raise ValueError(
                f"{path} holds several {container} series {sorted(matches)}; choose one with series=... "
                "(`calm prepare --nwb_series NAME`)."
            )
    if len(found) == 1:
        key = next(iter(found))
        return key, found[key]
    raise ValueError(f"{path} holds several ROI series {sorted(found)}; choose one with series=....")


# a step between two timestamps longer than this many typical steps is a gap in the recording, not jitter
MAX_STEP_RATIO = 1.5


def _timestamps(series, num_frames: int, what: str) -> tuple[np.ndarray, float]:
    """Sample times in seconds and the rate: from `.rate` when set, else from `.timestamps`, which must increase
    without gaps (everything downstream treats the samples as evenly spaced)."""
    if series.rate is not None:
        rate = float(series.rate)
        start = float(series.starting_time or 0.0)
        return start + np.arange(num_frames) / rate, rate
    times = np.asarray(series.timestamps[:], dtype=np.float64)
    if times.size < 2:
        raise ValueError(f"{what} has neither a rate nor two timestamps, so its sampling rate is unknown.")
    steps = np.diff(times)
    if not np.isfinite(times).all() or (steps <= 0).any():
        first = int(np.argmax(~(steps > 0))) if np.isfinite(times).all() else int(np.argmax(~np.isfinite(times)))
        raise ValueError(
            f"{what}: its timestamps are not increasing (at sample {first}: {times[first]:g} s, then "
            f"{times[min(first + 1, times.size - 1)]:g} s); samples must be stored in time order, once each."
        )
    typical = float(np.median(steps))
    if steps.max() > MAX_STEP_RATIO * typical:
        at = int(np.argmax(steps))
        raise ValueError(
            f"{what}: the timestamps jump from {times[at]:g} s to {times[at + 1]:g} s, a gap of {steps[at]:.3g} s "
            f"where samples are {typical:.3g} s apart, so the recording is not continuous and would be read as if it "
            "were. Read the parts before and after the gap as separate recordings (or fill the gap) first."
        )
    # 10 significant digits: timestamps 0.1 s apart give 10.0 Hz, not 10.000000000000002
    return times, float(f"{1.0 / typical:.10g}")


def _find_time_series(nwbfile, name: str):
    if name in nwbfile.acquisition:
        return nwbfile.acquisition[name]
    for module in nwbfile.processing.values():
        for interface_name, interface in module.data_interfaces.items():
            if interface_name == name and hasattr(interface, "data"):
                return interface
            nested = getattr(interface, "time_series", None)  # BehavioralTimeSeries and friends
            if nested and name in nested:
                return nested[name]
    return None


def _read_behavior(nwbfile, names, times: np.ndarray, path: Path) -> np.ndarray:
    """`(channels, frames)`: each named TimeSeries (multi-column ones averaged) interpolated onto the frame times."""
    channels = []
    for name in names:
        found = _find_time_series(nwbfile, name)
        if found is None:
            raise ValueError(f"{path}: no TimeSeries named {name!r} (acquisition has {sorted(nwbfile.acquisition)}).")
        values = np.asarray(found.data[:], dtype=np.float64)
        values = values if values.ndim == 1 else values.reshape(values.shape[0], -1).mean(axis=1)
        behavior_times, rate = _timestamps(found, values.shape[0], f"{path}: behaviour series {name}")
        # interpolation holds the end values beyond the samples: behaviour must span the imaging (one sample of slack)
        slack = max(1.0 / rate, float(np.median(np.diff(times)))) if len(times) > 1 else 1.0 / rate
        if behavior_times[0] > times[0] + slack or behavior_times[-1] < times[-1] - slack:
            raise ValueError(
                f"{path}: behaviour series {name} covers {behavior_times[0]:g}-{behavior_times[-1]:g} s but the "
                f"imaging runs {times[0]:g}-{times[-1]:g} s; outside its samples it would be made up by holding its "
                "first or last value. Read behaviour that spans the whole imaging, or leave it out."
            )
        channels.append(np.interp(times, behavior_times, values))
    return np.stack(channels)


def _units(key: str, item) -> str:
    """What the traces are, for labels: dF/F for a DfOverF series, else the series' stated unit."""
    if key.split("/")[0] == "DfOverF":
        return "dF/F"
    unit = str(getattr(item, "unit", "") or "")
    return unit if unit and unit.lower() not in ("n.a.", "n/a", "no unit", "unknown") else "fluorescence (a.u.)"


def _roi_ids(item) -> np.ndarray | None:
    """The series' ROI ids, or None when the file has none readable (they are informative only)."""
    rois = getattr(item, "rois", None)
    if rois is None:
        return None
    try:
        return np.asarray(rois.data[:], dtype=np.int64)
    except Exception:  # noqa: BLE001 - ids are informative only
        return None


# a given sampling rate that differs from a series' timestamps by more than this fraction contradicts the file
RATE_TOLERANCE = 0.01


def _given_rate(item, sampling_rate: float, times: np.ndarray, what: str) -> np.ndarray:
    """Frame times at a `sampling_rate` the user gave: it replaces a stored `.rate`; timestamps stay the truth, and a
    rate they contradict is refused (it would misplace trials and behaviour)."""
    if item.rate is not None:
        return float(item.starting_time or 0.0) + np.arange(len(times)) / sampling_rate
    stamped = 1.0 / float(np.median(np.diff(times)))
    if abs(stamped - sampling_rate) > RATE_TOLERANCE * stamped:
        raise ValueError(f"{what}: sampling_rate={sampling_rate:g} Hz contradicts its timestamps, which are "
                         f"{stamped:.4g} Hz apart; leave sampling_rate out to use them.")
    return times


def load_nwb_recording(
    path: str | os.PathLike,
    series: str | None = None,
    behavior_series: list[str] | tuple[str, ...] | None = None,
    sampling_rate: float | None = None,
) -> Recording:
    """Read one `RoiResponseSeries` of an NWB file into a `Recording`.

    Args:
        path (`str` or `os.PathLike`): the `.nwb` file.
        series (`str`, *optional*): which traces when the file has several, as `"DfOverF"`, `"Fluorescence"`, a
            series name, or `"<container>/<series>"`; default: the single DfOverF series, else the single
            Fluorescence series.
        behavior_series (`list[str]`, *optional*): names of `TimeSeries` to read as behaviour (searched in
            `acquisition`, then in every processing module), interpolated onto the imaging frame times.
        sampling_rate (`float`, *optional*): the imaging frame rate in Hz, replacing the series' stored `rate`
            (frame times follow it); a series with timestamps keeps them, and a rate they contradict is refused.

    Returns:
        `Recording` with traces `(rois, frames)`, `fs` from the series' rate or timestamps (or `sampling_rate`),
        `trial_starts` (the frame nearest each `trials.start_time`) when the file has a trials table, and
        `extras["roi_ids"]` (the ids of the series' ROI table) when the file has them, and `extras["units"]`.

    Raises:
        `FileNotFoundError`, `ValueError` (not an NWB file, no ophys traces, an ambiguous or unknown series, a
        behaviour series that does not exist), `ImportError` without pynwb.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path)
    pynwb = _import_pynwb()
    try:
        io = pynwb.NWBHDF5IO(str(path), mode="r")
        nwbfile = io.read()
    except Exception as error:  # h5py OSError on a non-HDF5 file, hdmf errors on a foreign HDF5 layout
        raise ValueError(f"{path} is not a readable NWB file ({type(error).__name__}: {error}).") from error
    try:
        key, item = _pick_series(_roi_series(nwbfile, path), series, path)
        data = np.asarray(item.data[:])
        if data.ndim == 1:
            data = data[:, None]
        if data.ndim != 2:
            raise ValueError(f"{path}: series {key} has shape {data.shape}; expected (frames, rois).")
        times, fs = _timestamps(item, data.shape[0], f"{path}: series {key}")
        if sampling_rate is not None:
            fs = parse_frame_rate(sampling_rate, str(path), "sampling_rate")
            times = _given_rate(item, fs, times, f"{path}: series {key}")
        traces = data.T  # NWB stores (frames, rois)
        trial_starts = None
        if nwbfile.trials is not None and len(nwbfile.trials) > 0:
            starts = np.asarray(nwbfile.trials["start_time"][:], dtype=np.float64)
            if not np.isfinite(starts).all():
                raise ValueError(f"{path}: the trials table has start times that are not finite ({starts[:8]}...).")
            if starts.min() < times[0] - 0.5 / fs:
                raise ValueError(
                    f"{path}: a trial starts at {starts.min():g} s, before the first imaging frame ({times[0]:g} s), "
                    "so it has no traces there. Drop the trials outside the imaging, or check that both use the same "
                    "clock."
                )
            trial_starts = np.searchsorted(times, starts - 0.5 / fs)
            if (trial_starts >= len(times)).any():
                raise ValueError(f"{path}: a trial starts at {starts.max():g} s, after the last imaging frame.")
        behavior = names = None
        if behavior_series:
            behavior, names = _read_behavior(nwbfile, behavior_series, times, path), list(behavior_series)
        roi_ids = _roi_ids(item)
        unit = _units(key, item)
    finally:
        io.close()
    extras = {"nwb_series": key, "units": unit}
    if roi_ids is not None and roi_ids.shape == (traces.shape[0],):
        extras["roi_ids"] = roi_ids
    return recording_from_arrays(
        path, traces, fs, behavior=behavior, behavior_names=names, trial_starts=trial_starts, extras=extras
    )
