"""`load_recording`: one entry for every recording format (it sits above the readers, which build on `io.py`)."""

from __future__ import annotations

import os
from pathlib import Path

from .caiman import load_caiman_recording
from .io import Recording, _missing_file_error, load_npz_recording
from .nwb import load_nwb_recording
from .suite2p import load_suite2p_recording


def load_recording(path: str | os.PathLike, **kwargs) -> Recording:
    """Read any supported recording by its form: a `.nwb` file (`load_nwb_recording`), a suite2p output folder
    (`load_suite2p_recording`), a CaImAn `.hdf5`/`.h5` file (`load_caiman_recording`) or a `.npz` file
    (`load_npz_recording`). Keyword arguments go to that reader."""
    path = Path(path)
    if not path.exists():
        raise _missing_file_error(path, "file" if path.suffix else "folder")
    if path.is_dir():
        return load_suite2p_recording(path, **kwargs)
    suffix = path.suffix.lower()
    if suffix == ".nwb":
        return load_nwb_recording(path, **kwargs)
    if suffix in (".hdf5", ".h5"):
        return load_caiman_recording(path, **kwargs)
    if suffix == ".npz":
        return load_npz_recording(path, **kwargs)
    raise ValueError(
        f"{path}: unknown recording format {suffix!r}; calm_hf reads .nwb, .npz, CaImAn .hdf5/.h5 and suite2p folders."
    )
