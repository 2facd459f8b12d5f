"""Reading CaImAn results saved as HDF5 (`cnm.save("results.hdf5")`) with `h5py`.

CaImAn keeps the denoised traces in `estimates/C` `(components, frames)`, dF/F in `estimates/F_dff` when
`detrend_df_f` was run, the accepted components in `estimates/idx_components`, and the frame rate in
`params/data/fr`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .io import Recording, _missing_file_error, _orient_traces, parse_frame_rate, recording_from_arrays


TRACE_KEYS = ("F_dff", "C")


def _import_h5py():
    try:
        import h5py
    except ImportError as error:  # pragma: no cover
        raise ImportError("Reading CaImAn .hdf5 files needs h5py: `pip install 'calm_hf[caiman]'`.") from error
    return h5py


def _accepted_index(accepted: np.ndarray, num_components: int, path: Path) -> np.ndarray:
    """`estimates/idx_components` as sorted unique component indices, refusing what would silently pick others."""
    accepted = np.asarray(accepted).reshape(-1)
    if accepted.dtype.kind not in "iu":
        whole = accepted.dtype.kind == "f" and np.isfinite(accepted).all() and (accepted == np.round(accepted)).all()
        if not whole:
            raise ValueError(f"{path}: estimates/idx_components must be whole component indices, got "
                             f"{accepted[:8]}; rewrite it with integer indices.")
    accepted = accepted.astype(np.int64)
    if (accepted < 0).any() or (accepted >= num_components).any():
        raise ValueError(f"{path}: estimates/idx_components points outside the {num_components} components.")
    values, counts = np.unique(accepted, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{path}: estimates/idx_components lists component(s) {values[counts > 1].tolist()} more than "
                         "once, which would duplicate those neurons; list each accepted component once.")
    return values


def load_caiman_recording(
    path: str | os.PathLike, traces_key: str | None = None, accepted_only: bool = True, layout: str = "auto",
    sampling_rate: float | None = None,
) -> Recording:
    """Read CaImAn HDF5 results into a `Recording`.

    Args:
        path (`str` or `os.PathLike`): the `.hdf5`/`.h5` file written by `cnm.save`.
        traces_key (`str`, *optional*): `"F_dff"` or `"C"`; default `F_dff` when present and non-empty, else `C`.
        accepted_only (`bool`, *optional*, defaults to `True`): keep only `estimates/idx_components` when stored.
        layout (`str`, *optional*, defaults to `"auto"`): `"neurons_frames"` (CaImAn's `(components, frames)`),
            `"frames_neurons"` (stored transposed) or `"auto"`: the component count of `estimates/A` decides; without
            it, traces with more rows than columns are refused (they look transposed).
        sampling_rate (`float`, *optional*): the frame rate in Hz, instead of `params/data/fr` (which may then be
            missing).

    Returns:
        `Recording` with traces `(components, frames)`, `fs` from `params/data/fr` (or `sampling_rate`), and per
        neuron `extras["roi_ids"]` (CaImAn's component index; also as `extras["component_index"]`); `extras["units"]`
        names what the traces are.
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
        item = handle.get("params/data/fr")
        if sampling_rate is not None:
            fr = parse_frame_rate(sampling_rate, str(path), "sampling_rate")
        elif not isinstance(item, h5py.Dataset) or item.shape is None:
            raise ValueError(f"{path} has no params/data/fr (the frame rate); is it a CaImAn results file? If it is, "
                             "give the rate: sampling_rate=30.0 (`--sampling_rate 30` on the command line).")
        else:
            fr = parse_frame_rate(item[()], str(path), "params/data/fr")  # sometimes stored as text ("30")
        accepted = read("estimates/idx_components") if accepted_only else None
        # sparse A is stored as a group with its shape (pixels, components): the number of components
        shape = read("estimates/A/shape")
        components = int(shape.reshape(-1)[-1]) if shape is not None and shape.size == 2 else None
    traces = np.atleast_2d(traces)
    if traces.ndim == 2 and layout == "auto" and components is not None and traces.shape[0] != components:
        layout = "frames_neurons" if traces.shape[1] == components else layout
    if traces.ndim == 2 and traces.size:
        traces = _orient_traces(traces, layout, f"{path} estimates/{key}")
    index = np.arange(traces.shape[0])
    if accepted is not None:
        index = _accepted_index(accepted, traces.shape[0], path)
        traces = traces[index]
    return recording_from_arrays(path, traces, fr,
                                 extras={"component_index": index, "roi_ids": index, "caiman_traces": key,
                                         "units": "dF/F" if key == "F_dff" else "denoised C (CaImAn, a.u.)"})
