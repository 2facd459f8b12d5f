"""No silent wrong results, no obscure crashes: readers, the trace processor and the command line.

Each case builds one bad (or unusual) input and states what must happen: a clear error (its type and the words that
name the problem) or the right result. Before these fixes each one was either accepted with a wrong result or failed
with an error that named neither the problem nor the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from calm_hf.cli import main as calm_main
from calm_hf.data import (
    ZScoreStats,
    cut_trials,
    load_caiman_recording,
    load_npz_recording,
    load_nwb_recording,
    load_suite2p_recording,
    resample,
)
from calm_hf.processing_calm import CalmTraceProcessor
from recording_files import smooth_traces, write_caiman, write_nwb, write_suite2p


@dataclass
class Case:
    """`run(tmp_path)` makes the input and calls the API; then either `error` (type, regex of the message) is raised,
    or `check(result)` holds."""

    name: str
    run: Callable[[Path], Any]
    error: tuple[type, str] | None = None
    check: Callable[[Any], bool] | None = None


def npz(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "rec.npz"
    np.savez(path, **arrays)
    return path


def load_npz(**arrays):
    return lambda tmp: load_npz_recording(npz(tmp, **arrays))


TRACES = smooth_traces(4, 200)


def nwb(**kwargs):
    def run(tmp):
        behavior = kwargs.pop("behavior", None)
        path = write_nwb(tmp / "rec.nwb", TRACES, 10.0, **kwargs)
        return load_nwb_recording(path, behavior_series=behavior)
    return run


def caiman(traces, fr=30.0, **kwargs):
    return lambda tmp: load_caiman_recording(write_caiman(tmp / "rec.hdf5", traces, fr, **kwargs))


def suite2p(fs=30.0, iscell=None):
    def run(tmp):
        fluorescence = smooth_traces(3, 100)
        folder = write_suite2p(tmp, [(fluorescence, fluorescence * 0.1, np.ones((3, 2)))], fs=fs)
        if iscell is not None:
            np.save(folder / "plane0" / "iscell.npy", iscell)
        return load_suite2p_recording(folder)
    return run


def processed(traces, **kwargs):
    return lambda tmp: CalmTraceProcessor(sampling_rate=5.0, window_size=4)(traces, **kwargs)


def postprocess(model_frames: int, horizon: int):
    def run(tmp):
        processor = CalmTraceProcessor(sampling_rate=5.0, window_size=4)
        features = processor(smooth_traces(3, 240), sampling_rate=30.0)
        return processor.postprocess_forecast(np.zeros((1, 3, model_frames)), features, horizon=horizon)
    return run


def cli(*argv, env: dict | None = None):
    """Runs `calm *argv` and returns (exit code, what it printed to stderr)."""
    def run(tmp):
        import contextlib
        import io
        import os

        saved = {name: os.environ.get(name) for name in env or {}}
        os.environ.update(env or {})
        err = io.StringIO()
        try:
            np.savez(tmp / "rec.npz", traces=TRACES, fs=np.float32(10.0))
            np.savez(tmp / "starts.npz", traces=TRACES, fs=np.float32(10.0), trial_starts=np.array([0, 50, 100]))
            with contextlib.redirect_stderr(err):
                code = calm_main([a.format(tmp=tmp) for a in argv])
        except SystemExit as error:  # argparse on an old tree
            code = error.code
        finally:
            for name, value in saved.items():
                os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
        return code, err.getvalue()
    return run


def exits(code: int, message: str):
    return lambda result: result[0] == code and message in result[1]


def flat_z(stats_and_data) -> bool:
    stats, data = stats_and_data
    return abs(float(stats.transform(data).std()) - 1.0) < 0.05


def gap_timestamps():
    return np.concatenate([np.arange(100) / 10.0, 20.0 + np.arange(100) / 10.0])  # 10 s missing in the middle


def shuffled_speed():
    times = np.arange(200) / 10.0
    order = np.random.default_rng(0).permutation(200)
    return {"data": np.sin(times)[order], "timestamps": times[order]}


def hdf5_named_npz(tmp):
    import h5py

    with h5py.File(tmp / "rec.npz", "w") as handle:
        handle.create_dataset("traces", data=TRACES)
    return load_npz_recording(tmp / "rec.npz")


def text_named_npz(tmp):
    (tmp / "rec.npz").write_text("neuron,frame,value\n0,0,1.5\n")
    return load_npz_recording(tmp / "rec.npz")


CASES = [
    # NWB
    Case("nwb-timestamp-gap", nwb(timestamps=gap_timestamps()), error=(ValueError, r"gap of 10\.1 s")),
    Case("nwb-trial-before-imaging", nwb(starting_time=5.0, trial_starts_s=[1.0, 8.0, 14.0]),
         error=(ValueError, r"starts at 1 s, before the first imaging frame \(5 s\)")),
    Case("nwb-trial-at-negative-time", nwb(trial_starts_s=[-2.0, 5.0, 10.0]),
         error=(ValueError, r"starts at -2 s, before the first imaging frame")),
    Case("nwb-unsorted-behaviour-timestamps", nwb(speed=shuffled_speed(), behavior=["running_speed"]),
         error=(ValueError, r"running_speed.*timestamps are not increasing")),
    Case("nwb-behaviour-covers-part", nwb(speed={"data": np.ones(20), "rate": 10.0}, behavior=["running_speed"]),
         error=(ValueError, r"running_speed covers 0-1\.9 s but the imaging runs 0-19\.9 s")),
    # CaImAn
    Case("caiman-duplicated-idx-components", caiman(smooth_traces(4, 100), accepted=np.array([0, 2, 2])),
         error=(ValueError, r"idx_components lists component\(s\) \[2\] more than once")),
    Case("caiman-fractional-idx-components", caiman(smooth_traces(4, 100), accepted=np.array([0.7, 2.9])),
         error=(ValueError, r"idx_components must be whole component indices")),
    Case("caiman-C-transposed", caiman(smooth_traces(5, 100).T),
         error=(ValueError, r"more rows than columns.*layout='frames_neurons'")),
    Case("caiman-C-transposed-with-A", caiman(smooth_traces(5, 100).T, spatial_shape=(64, 5)),
         check=lambda recording: recording.traces.shape == (5, 100)),
    Case("caiman-frame-rate-string", caiman(smooth_traces(4, 100), fr=np.bytes_(b"30")),
         check=lambda recording: recording.fs == 30.0),
    Case("caiman-frame-rate-text", caiman(smooth_traces(4, 100), fr=np.bytes_(b"fast")),
         error=(ValueError, r"params/data/fr must be a frame rate in Hz, a positive number, got 'fast'")),
    # npz
    Case("npz-fs-list", load_npz(traces=TRACES, fs=np.array([5.0, 30.0])),
         error=(ValueError, r"fs must be one number .* got 2 values")),
    Case("npz-fs-with-unit", load_npz(traces=TRACES, fs=np.str_("30Hz")),
         error=(ValueError, r"fs must be a frame rate in Hz, a positive number, got '30Hz'")),
    Case("npz-fs-bool", load_npz(traces=TRACES, fs=np.bool_(True)),
         error=(ValueError, r"fs must be a frame rate.*True")),
    Case("npz-traces-without-frames", load_npz(traces=np.zeros((5, 0)), fs=10.0),
         error=(ValueError, r"traces .* empty \(shape \(5, 0\)\)")),
    Case("npz-trial-starts-unsorted", load_npz(traces=TRACES, fs=10.0, trial_starts=np.array([50, 0, 100])),
         error=(ValueError, r"trial_starts must increase")),
    Case("npz-trial-starts-duplicated", load_npz(traces=TRACES, fs=10.0, trial_starts=np.array([0, 50, 50, 100])),
         error=(ValueError, r"trial_starts must increase.*50 .*twice")),
    Case("npz-trial-starts-empty", load_npz(traces=TRACES, fs=10.0, trial_starts=np.zeros(0, dtype=np.int64)),
         error=(ValueError, r"trial_starts is empty")),
    Case("npz-is-a-text-file", text_named_npz, error=(ValueError, r"not an \.npz archive: it is text starting with")),
    Case("npz-is-an-hdf5-file", hdf5_named_npz, error=(ValueError, r"it is an HDF5 file.*--nwb")),
    Case("cut-trials-fractional-stride", lambda tmp: cut_trials(TRACES, 20, stride=2.5),
         error=(ValueError, r"stride must be a whole number of frames, got 2\.5")),
    Case("cut-trials-fractional-length", lambda tmp: cut_trials(TRACES, 20.5),
         error=(ValueError, r"trial_length must be a whole number of frames, got 20\.5")),
    Case("resample-one-frame", lambda tmp: resample(np.ones((3, 1)), 30.0, 5.0),
         error=(ValueError, r"needs at least 2 frames")),
    # suite2p
    Case("suite2p-fs-text", suite2p(fs="abc"),
         error=(ValueError, r"'fs' must be a frame rate in Hz, a positive number, got 'abc'")),
    Case("suite2p-fs-none", suite2p(fs=None),
         error=(ValueError, r"'fs' must be a frame rate in Hz, a positive number, got None")),
    Case("suite2p-iscell-0d", suite2p(iscell=np.float32(1.0)),
         error=(ValueError, r"iscell\.npy must be \(rois,\) or \(rois, 2\)")),
    # CalmTraceProcessor and ZScoreStats
    Case("processor-1e300", processed(1e300 * (1 + np.random.default_rng(0).random((3, 40)))),
         error=(ValueError, r"reach 2e\+300, beyond .* keep \|values\| below")),
    Case("processor-window-size-2.7", lambda tmp: CalmTraceProcessor(window_size=2.7),
         error=(ValueError, r"window_size must be a positive whole number of frames, got 2\.7")),
    Case("processor-postprocess-beyond-forecast", postprocess(model_frames=2, horizon=60),
         error=(ValueError, r"covers 2 model frames \(0\.4 s\) but horizon=60 frames at 30 Hz needs 2 s")),
    Case("zscore-1e-8-scale", lambda tmp: (lambda data: (ZScoreStats.fit(data), data))(
        1e-8 * np.random.default_rng(0).standard_normal((5, 3, 50))), check=flat_z),
    Case("processor-nan", processed(np.where(np.eye(3, 40) > 0, np.nan, 1.0) + np.arange(40)),
         error=(ValueError, r"NaN/Inf.*neuron 0, frame 0")),
    Case("processor-inf", processed(np.full((3, 40), np.inf)), error=(ValueError, r"NaN/Inf")),
    Case("processor-zero-neurons", processed(np.zeros((0, 40))), error=(ValueError, r"no neurons")),
    Case("processor-zero-frames", processed(np.zeros((3, 0))), error=(ValueError, r"no frames")),
    Case("processor-string", processed("0.1 0.2 0.3"), error=(ValueError, r"numeric array.*got <U11|numeric")),
    Case("processor-sampling-rate-bool", processed(smooth_traces(3, 40), sampling_rate=True),
         error=(ValueError, r"sampling_rate must be one frame rate in Hz \(a number\), got True")),
    Case("processor-sampling-rate-list", processed(smooth_traces(3, 40), sampling_rate=[30.0]),
         error=(ValueError, r"sampling_rate must be one frame rate in Hz \(a number\), got \[30\.0\]")),
    Case("processor-complex", processed(np.ones((3, 40)) * (1 + 1j)), error=(ValueError, r"complex")),
    Case("processor-max-frames-0", processed(smooth_traces(3, 40), max_frames=0),
         error=(ValueError, r"max_frames must be a whole number of frames >= 4, got 0")),
    Case("processor-max-frames-negative", processed(smooth_traces(3, 40), max_frames=-8),
         error=(ValueError, r"max_frames must be a whole number of frames >= 4, got -8")),
    Case("processor-horizon-0", postprocess(model_frames=10, horizon=0),
         error=(ValueError, r"horizon must be a positive whole number of frames, got 0")),
    Case("processor-horizon-negative", postprocess(model_frames=10, horizon=-3),
         error=(ValueError, r"horizon must be a positive whole number of frames, got -3")),
    # command line
    Case("cli-trial-seconds-nan", cli("prepare", "--output_dir", "{tmp}/out", "--npz", "{tmp}/rec.npz",
                                      "--trial_seconds", "nan"),
         check=exits(1, "--trial_seconds must be a positive number of seconds, got nan")),
    Case("cli-stride-with-trial-starts", cli("prepare", "--output_dir", "{tmp}/out", "--npz", "{tmp}/starts.npz",
                                             "--trial_seconds", "2", "--trial_stride_seconds", "1"),
         check=exits(1, "has its own trial starts, so --trial_stride_seconds does not apply")),
    Case("cli-num-sessions-0", cli("prepare", "--output_dir", "{tmp}/out", "--num_sessions", "0"),
         check=exits(1, "--num_sessions must be at least 1, got 0")),
    Case("cli-unknown-flag-exits-2", cli("prepare", "--output_dir", "{tmp}/out", "--no_such_flag", "1"),
         check=exits(2, "unrecognized arguments: --no_such_flag 1")),
    Case("cli-eager-attention-budget-text", cli("prepare", "--output_dir", "{tmp}/out", "--num_sessions", "1",
                                                env={"CALM_EAGER_ATTENTION_MAX_GIB": "abc"}),
         check=exits(1, "CALM_EAGER_ATTENTION_MAX_GIB must be a positive number of GiB, got 'abc'")),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gets_a_clear_error_or_the_right_result(case, tmp_path):
    pytest.importorskip("pynwb")
    pytest.importorskip("h5py")
    if case.error is not None:
        with pytest.raises(case.error[0], match=case.error[1]):
            case.run(tmp_path)
        return
    result = case.run(tmp_path)
    assert case.check(result), result


def classify(case: Case, tmp_path: Path) -> str:
    """What the current code does with a case: clear, right, silent or obscure (for counting probes on any tree)."""
    try:
        result = case.run(tmp_path)
    except Exception as error:  # noqa: BLE001
        if case.error is not None and isinstance(error, case.error[0]) and re.search(case.error[1], str(error)):
            return "clear"
        return "obscure"
    if case.check is not None and case.check(result):
        return "right"
    if isinstance(result, tuple) and result[0] not in (0, None):  # a command that failed with the wrong message/code
        return "obscure"
    return "silent"
