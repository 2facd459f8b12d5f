"""Reading a suite2p output folder: `plane*/F.npy`, `Fneu.npy`, `iscell.npy` and `ops.npy` (frame rate `fs`; not
needed when the rate is given).

Traces are neuropil-subtracted, `F - coefficient * Fneu` (suite2p's and most papers' coefficient is 0.7), only the
ROIs that `iscell.npy` accepts are kept, and the planes of a multi-plane recording are concatenated along neurons.
Each kept neuron's suite2p ROI index (its row in its plane's `F.npy`) is kept as `extras["roi_ids"]`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .io import Recording, _missing_file_error, parse_frame_rate, recording_from_arrays


logger = logging.getLogger(__name__)

NEUROPIL_COEFFICIENT = 0.7


def _load_plain(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; a suite2p plane folder needs F.npy, Fneu.npy and iscell.npy (and ops.npy, or the "
            "frame rate given as sampling_rate)."
        )
    try:
        return np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - truncated, garbled or pickled
        raise ValueError(f"{path} is not a readable .npy array ({type(error).__name__}: {error}).") from error


def _load_ops(path: Path) -> dict:
    """suite2p's `ops.npy` is a pickled dict: the only file calm_hf loads with `allow_pickle=True`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; suite2p writes the frame rate `fs` into ops.npy. Without it, give "
                                "the rate: sampling_rate=30.0 (`--sampling_rate 30` on the command line).")
    try:
        ops = np.load(path, allow_pickle=True).item()
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"{path} is not a suite2p ops.npy (a saved dict): {type(error).__name__}: {error}") from error
    if not isinstance(ops, dict) or "fs" not in ops:
        raise ValueError(f"{path} has no 'fs' entry; suite2p's ops.npy is a dict holding the frame rate 'fs'.")
    return ops


def _plane_folders(folder: Path) -> list[Path]:
    if (folder / "F.npy").is_file():
        return [folder]
    for base in (folder, folder / "suite2p"):
        planes = sorted(
            (p for p in base.glob("plane*") if p.is_dir() and p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
        )
        if planes:
            return planes
    raise ValueError(
        f"{folder} is not a suite2p output folder: it has neither F.npy nor plane0/, plane1/, ... folders "
        "(pass the `suite2p` folder that suite2p wrote, or one plane folder)."
    )


def _read_plane(plane: Path, coefficient: float, cells_only: bool, cell_probability: float | None,
                sampling_rate: float | None = None):
    """(neuropil-corrected F `(rois, frames)` float64, which ROIs to keep `(rois,)` bool, frame rate) of one plane;
    `ops.npy` is read only when no `sampling_rate` is given."""
    fluorescence = _load_plain(plane / "F.npy")
    neuropil = _load_plain(plane / "Fneu.npy")
    iscell = _load_plain(plane / "iscell.npy")
    if fluorescence.ndim != 2 or neuropil.shape != fluorescence.shape:
        raise ValueError(f"{plane}: F.npy {fluorescence.shape} and Fneu.npy {neuropil.shape} must both be (rois, frames).")
    if iscell.ndim not in (1, 2):
        raise ValueError(f"{plane}: iscell.npy must be (rois,) or (rois, 2) (suite2p's decision and probability), "
                         f"got shape {iscell.shape}.")
    iscell = iscell.reshape(len(iscell), -1)
    if iscell.shape[0] != fluorescence.shape[0]:
        raise ValueError(f"{plane}: iscell.npy has {iscell.shape[0]} rows for {fluorescence.shape[0]} ROIs in F.npy.")
    if not cells_only:
        keep = np.ones(len(iscell), dtype=bool)
    elif cell_probability is not None:
        keep = iscell[:, min(1, iscell.shape[1] - 1)] >= float(cell_probability)
    else:
        keep = iscell[:, 0] > 0.5
    corrected = fluorescence.astype(np.float64) - coefficient * neuropil.astype(np.float64)
    if sampling_rate is not None:
        return corrected, keep, sampling_rate
    return corrected, keep, parse_frame_rate(_load_ops(plane / "ops.npy")["fs"], str(plane / "ops.npy"), "'fs'")


def load_suite2p_recording(
    path: str | os.PathLike,
    neuropil_coefficient: float = NEUROPIL_COEFFICIENT,
    cells_only: bool = True,
    cell_probability: float | None = None,
    sampling_rate: float | None = None,
) -> Recording:
    """Read a suite2p output folder into a `Recording`.

    Safety: `ops.npy` is a pickled dict in suite2p's format, so it (and only it) is loaded with `allow_pickle=True`
    when you call this reader without `sampling_rate`; `F.npy`, `Fneu.npy` and `iscell.npy` are loaded pickle-free.
    Only read folders you trust (or pass `sampling_rate`, and ops.npy is not read at all).

    Args:
        path (`str` or `os.PathLike`): the `suite2p` folder (holding `plane0/`, `plane1/`, ...), its parent, or one
            plane folder.
        neuropil_coefficient (`float`, *optional*, defaults to 0.7): traces are `F - neuropil_coefficient * Fneu`
            (0 = no subtraction).
        cells_only (`bool`, *optional*, defaults to `True`): keep only ROIs that `iscell.npy` accepts.
        cell_probability (`float`, *optional*): instead of suite2p's own decision (column 0), keep ROIs whose
            classifier probability (column 1) is at least this.
        sampling_rate (`float`, *optional*): the frame rate in Hz (of every plane); when given, `ops.npy` is not
            read, so a folder without it can be read.

    Returns:
        `Recording` with traces `(cells, frames)` of all planes concatenated, `fs` from `ops["fs"]` (or
        `sampling_rate`), and per neuron `extras["roi_ids"]` (the suite2p ROI index: row in its plane's F.npy; also
        as `extras["roi_index"]`) and `extras["plane"]`; `extras["units"]` names what the traces are.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise _missing_file_error(folder, "folder")
    coefficient = float(neuropil_coefficient)
    if not np.isfinite(coefficient) or coefficient < 0:
        raise ValueError(f"neuropil_coefficient must be a finite non-negative number, got {neuropil_coefficient}.")
    if sampling_rate is not None:
        sampling_rate = parse_frame_rate(sampling_rate, str(folder), "sampling_rate")
    traces, planes, rois, rates = [], [], [], []
    for plane_index, plane in enumerate(_plane_folders(folder)):
        corrected, keep, fs = _read_plane(plane, coefficient, cells_only, cell_probability, sampling_rate)
        traces.append(corrected[keep])
        planes.append(np.full(int(keep.sum()), plane_index, dtype=np.int64))
        rois.append(np.flatnonzero(keep))
        rates.append(fs)
    if len(set(rates)) > 1:
        raise ValueError(f"{folder}: the planes have different frame rates {rates}; read them one plane at a time.")
    frames = [t.shape[1] for t in traces]
    if max(frames) - min(frames) > 1:
        raise ValueError(f"{folder}: the planes have different frame counts {frames}; read them one plane at a time.")
    if max(frames) != min(frames):  # suite2p can drop the last frame of some planes of a volume
        logger.warning("%s: planes have %s frames; keeping the first %d of each", folder, frames, min(frames))
    stacked = np.concatenate([t[:, : min(frames)] for t in traces])
    if stacked.shape[0] == 0:
        raise ValueError(f"{folder}: iscell.npy accepts no ROI; pass cells_only=False to read every ROI.")
    return recording_from_arrays(
        folder,
        stacked,
        rates[0],
        extras={"plane": np.concatenate(planes), "roi_index": np.concatenate(rois), "roi_ids": np.concatenate(rois),
                "units": f"F - {coefficient:g} Fneu (suite2p, a.u.)" if coefficient else "F (suite2p, a.u.)"},
        name=folder.name if folder.name not in ("suite2p", "plane0") else folder.resolve().parent.name,
    )
