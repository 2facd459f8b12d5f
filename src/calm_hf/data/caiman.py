"""Reading CaImAn results saved as HDF5 (`cnm.save("results.hdf5")`) with `h5py`.

CaImAn keeps the denoised traces in `estimates/C` `(components, frames)`, dF/F in `estimates/F_dff` when
`detrend_df_f` was run, the accepted components in `estimates/idx_components`, and the frame rate in
`params/data/fr`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .io import Recording, _missing_file_error, recording_from_arrays


TRACE_KEYS = ("F_dff", "C")


def _import_h5py():
    try:
        import h5py
    except ImportError as error:  # pragma: no cover
        raise ImportError("Reading CaImAn .hdf5 files needs h5py: `pip install 'calm_hf[caiman]'`.") from error
    return h5py


def load_caiman_recording(
    path: str | os.PathLike, traces_key: str | None = None, accepted_only: bool = True
) -> Recording:
    """Read CaImAn HDF5 results into a `Recording`.

    Args:
        path (`str` or `os.PathLike`): the `.hdf5`/`.h5` file written by `cnm.save`.
        traces_key (`str`, *optional*): `"F_dff"` or `"C"`; default `F_dff` when present and non-empty, else `C`.
        accepted_only (`bool`, *optional*, defaults to `True`): keep only `estimates/idx_components` when stored.

    Returns:
        `Recording` with traces `(components, frames)`, `fs` from `params/data/fr`, `extras["component_index"]`.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path)
    h5py = _import_h5py()
    if traces_key is not None and traces_key not in TRACE_KEYS:
        raise ValueError(f"traces_key={traces_key!r} is not one of {TRACE_KEYS}.")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path} is not a readable HDF5 file ({error}).") from error
    with handle:
        def read(key):
            item = handle.get(key)
            if not isinstance(item, h5py.Dataset) or item.shape is None:  # CaImAn stores None as an empty entry
                return None
            value = item[()]
            return None if np.asarray(value).dtype.kind in "OSU" or np.asarray(value).size == 0 else np.asarray(value)

        keys = [traces_key] if traces_key else list(TRACE_KEYS)
        traces = key = None
        for candidate in keys:
            traces = read(f"estimates/{candidate}")
            if traces is not None:
                key = candidate
                break
        if traces is None:
            raise ValueError(
                f"{path} has no {' or '.join('estimates/' + k for k in keys)} array; is it a CaImAn results file "
                "written by cnm.save(...)?"
            )
        fr = read("params/data/fr")
        if fr is None:
            raise ValueError(f"{path} has no params/data/fr (the frame rate); is it a CaImAn results file?")
        accepted = read("estimates/idx_components") if accepted_only else None
    traces = np.atleast_2d(traces)
    index = np.arange(traces.shape[0])
    if accepted is not None:
        accepted = np.asarray(accepted, dtype=np.int64).reshape(-1)
        if (accepted < 0).any() or (accepted >= traces.shape[0]).any():
            raise ValueError(f"{path}: estimates/idx_components points outside the {traces.shape[0]} components.")
        index = np.sort(accepted)
        traces = traces[index]
    return recording_from_arrays(path, traces, fr, extras={"component_index": index, "caiman_traces": key})
