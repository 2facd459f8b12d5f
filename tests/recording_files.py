"""Small recordings in every supported format, written with the formats' own tools (pynwb, h5py, numpy), for tests."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def smooth_traces(neurons: int, frames: int, seed: int = 0, offset: float = 100.0) -> np.ndarray:
    """(neurons, frames) slow random traces in raw fluorescence-like units."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((neurons, frames + 20))
    kernel = np.exp(-np.arange(20) / 5.0)
    slow = np.stack([np.convolve(row, kernel, mode="valid")[:frames] for row in noise])
    return (offset + 10.0 * slow).astype(np.float32)


def write_nwb(
    path: Path,
    traces: np.ndarray,
    rate: float,
    trial_starts_s: list[float] | None = None,
    speed_rate: float | None = None,
    with_ophys: bool = True,
    use_timestamps: bool = False,
    timestamps: np.ndarray | None = None,
    starting_time: float = 0.0,
    speed: dict | None = None,
) -> Path:
    """An NWB file with a Fluorescence RoiResponseSeries `(frames, rois)`, an optional trials table and an optional
    running-speed TimeSeries at its own rate, written by pynwb. `timestamps` gives the frame times explicitly;
    `speed` gives the running-speed TimeSeries' own `data` and `timestamps` (or `rate`, `starting_time`)."""
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries
    from pynwb.ophys import Fluorescence, ImageSegmentation, OpticalChannel, RoiResponseSeries

    nwbfile = NWBFile("test", "calm-test", datetime(2024, 1, 1, tzinfo=timezone.utc))
    neurons, frames = traces.shape
    if with_ophys:
        device = nwbfile.create_device(name="scope")
        channel = OpticalChannel(name="green", description="GCaMP", emission_lambda=510.0)
        plane = nwbfile.create_imaging_plane(
            name="plane", optical_channel=channel, imaging_rate=rate, description="tectum", device=device,
            excitation_lambda=920.0, indicator="GCaMP6s", location="V1",
        )
        image_segmentation = ImageSegmentation()
        segmentation = image_segmentation.create_plane_segmentation(name="rois", description="rois", imaging_plane=plane)
        nwbfile.create_processing_module("ophys", "calcium").add(image_segmentation)
        for i in range(neurons):
            mask = np.zeros((4, 4), dtype=np.float32)
            mask[i % 4, (i // 4) % 4] = 1.0
            segmentation.add_roi(image_mask=mask)
        region = segmentation.create_roi_table_region(region=list(range(neurons)), description="all")
        timing = (
            dict(timestamps=np.arange(frames) / rate) if use_timestamps
            else dict(rate=float(rate), starting_time=float(starting_time))
        )
        if timestamps is not None:
            timing = dict(timestamps=np.asarray(timestamps, dtype=np.float64))
        series = RoiResponseSeries(name="RoiResponseSeries", data=traces.T.copy(), rois=region, unit="a.u.", **timing)
        nwbfile.processing["ophys"].add(Fluorescence(name="Fluorescence", roi_response_series=series))
    if trial_starts_s is not None:
        ends = list(trial_starts_s[1:]) + [frames / rate]
        for start, stop in zip(trial_starts_s, ends):
            nwbfile.add_trial(start_time=float(start), stop_time=float(stop))
    if speed_rate is not None:
        count = int(frames / rate * speed_rate)
        speed = dict(data=np.sin(np.arange(count) / speed_rate), rate=float(speed_rate))
    if speed is not None:
        nwbfile.add_acquisition(TimeSeries(name="running_speed", unit="cm/s", **speed))
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    return path


def write_suite2p(folder: Path, planes: list[tuple[np.ndarray, np.ndarray, np.ndarray]], fs: float) -> Path:
    """suite2p/plane<k>/{F,Fneu,iscell,ops}.npy for each (F, Fneu, iscell) tuple."""
    for index, (fluorescence, neuropil, iscell) in enumerate(planes):
        plane = folder / "suite2p" / f"plane{index}"
        plane.mkdir(parents=True)
        np.save(plane / "F.npy", fluorescence.astype(np.float32))
        np.save(plane / "Fneu.npy", neuropil.astype(np.float32))
        np.save(plane / "iscell.npy", iscell.astype(np.float32))
        np.save(plane / "ops.npy", {"fs": fs, "nframes": fluorescence.shape[1]}, allow_pickle=True)
    return folder / "suite2p"


def write_caiman(path: Path, traces: np.ndarray, fr, accepted: np.ndarray | None = None,
                 spatial_shape: tuple[int, int] | None = None) -> Path:
    """CaImAn results as `cnm.save` lays them out; `spatial_shape` adds the sparse `estimates/A` group's shape
    `(pixels, components)`."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle.create_dataset("estimates/C", data=traces)
        handle.create_dataset("params/data/fr", data=fr)
        if accepted is not None:
            handle.create_dataset("estimates/idx_components", data=accepted)
        if spatial_shape is not None:
            handle.create_dataset("estimates/A/shape", data=np.asarray(spatial_shape, dtype=np.int64))
    return path
