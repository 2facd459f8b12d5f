"""Bring your own recording: NWB (written by pynwb), suite2p folders, CaImAn HDF5 and npz files, read into a
`Recording` and prepared by `calm prepare` through one path; bad files raise errors that name the file."""

import json
import zipfile

import numpy as np
import pytest

from calm_hf.commands import prepare as prepare_command
from calm_hf.data import (
    Recording,
    load_caiman_recording,
    load_npz_recording,
    load_nwb_recording,
    load_recording,
    load_suite2p_recording,
)
from recording_files import smooth_traces, write_caiman, write_nwb, write_suite2p

pytest.importorskip("pynwb")
pytest.importorskip("h5py")


def prepare(argv):
    return prepare_command.run(argv)


# ---------------------------------------------------------------- npz


def test_npz_without_behaviour_prepares(tmp_path):
    np.savez(tmp_path / "rec.npz", traces=smooth_traces(6, 300), fs=np.float32(2.2))
    corpus = prepare(["--output_dir", str(tmp_path / "out"), "--npz", str(tmp_path / "rec.npz"), "--trial_seconds", "20"])
    assert sum(len(s) for s in corpus.values()) == 300 // 44
    meta = json.loads((tmp_path / "out" / "calm_sessions.json").read_text())
    assert "rec" in json.dumps(meta)


def test_npz_trial_starts_are_honoured(tmp_path):
    traces = smooth_traces(3, 200)
    starts = np.array([0, 50, 110, 160])
    recording = Recording("r", traces, 10.0, trial_starts=starts)
    session = recording.to_session()  # default length: shortest gap (40 frames)
    assert session.traces.shape == (4, 3, 40)
    for trial, start in zip(session.traces, starts):
        np.testing.assert_array_equal(trial, traces[:, start : start + 40])
    with pytest.raises(ValueError, match="run across the next trial start"):
        recording.to_session(trial_length=55)
    np.savez(tmp_path / "t.npz", traces=traces, fs=10.0, trial_starts=starts)
    corpus = prepare(["--output_dir", str(tmp_path / "o"), "--npz", str(tmp_path / "t.npz"), "--trial_seconds", "3"])
    assert sum(len(s) for s in corpus.values()) == 4  # cut at the starts, not into 200 // 30 windows


def test_npz_frames_neurons_layout(tmp_path):
    traces = smooth_traces(4, 50)
    np.savez(tmp_path / "fn.npz", traces=traces.T, fs=5.0)
    with pytest.raises(ValueError, match=r"fn.npz.*\(frames, neurons\).*layout='frames_neurons'"):
        load_npz_recording(tmp_path / "fn.npz")
    np.testing.assert_array_equal(load_npz_recording(tmp_path / "fn.npz", layout="frames_neurons").traces, traces)
    # behaviour shares the time axis, so the layout is detected
    np.savez(tmp_path / "fb.npz", traces=traces.T, fs=5.0, behavior=np.zeros((1, 50)))
    assert load_npz_recording(tmp_path / "fb.npz").traces.shape == (4, 50)


def test_bad_npz_files_name_the_file(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, traces=smooth_traces(3, 40), fs=5.0)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.npz.*not a readable .npz"):
        load_npz_recording(truncated)
    garbled = tmp_path / "garbled.npz"
    garbled.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="garbled.npz"):
        load_npz_recording(garbled)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, traces=np.array([{"a": 1}], dtype=object), fs=5.0)
    with pytest.raises(ValueError, match="pickled.npz.*pickled"):
        load_npz_recording(pickled)
    huge = tmp_path / "huge.npz"
    np.savez(huge, traces=np.full((2, 10), 1e300), fs=5.0)
    with pytest.raises(ValueError, match="huge.npz.*float32 range"):
        load_npz_recording(huge)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_npz_recording(tmp_path / "missing.npz")
    assert zipfile.is_zipfile(good)


def test_failed_prepare_writes_nothing(tmp_path):
    np.savez(tmp_path / "rec.npz", traces=smooth_traces(3, 100), fs=5.0)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--trial_seconds"):
        prepare(["--output_dir", str(out), "--npz", str(tmp_path / "rec.npz")])
    assert not out.exists() and not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------- NWB


def test_nwb_reader(tmp_path):
    traces = smooth_traces(5, 120)
    path = write_nwb(tmp_path / "m.nwb", traces, 10.0, trial_starts_s=[0.0, 4.0, 8.07], speed_rate=50.0)
    recording = load_nwb_recording(path, behavior_series=["running_speed"])
    np.testing.assert_array_equal(recording.traces, traces)
    assert recording.fs == 10.0 and recording.trial_starts.tolist() == [0, 40, 81]
    assert recording.behavior.shape == (1, 120) and recording.behavior_names == ["running_speed"]
    np.testing.assert_allclose(recording.behavior[0, :10], np.sin(np.arange(10) / 10.0), atol=1e-3)
    timed = load_nwb_recording(write_nwb(tmp_path / "ts.nwb", traces, 7.5, use_timestamps=True))
    assert timed.fs == 7.5 and timed.trial_starts is None
    assert isinstance(load_recording(path), Recording)


def test_bad_nwb_files(tmp_path):
    empty = write_nwb(tmp_path / "noophys.nwb", smooth_traces(2, 20), 5.0, with_ophys=False, speed_rate=5.0)
    with pytest.raises(ValueError, match="noophys.nwb.*no processing/ophys"):
        load_nwb_recording(empty)
    garbled = tmp_path / "garbled.nwb"
    garbled.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="garbled.nwb.*not a readable NWB"):
        load_nwb_recording(garbled)
    path = write_nwb(tmp_path / "ok.nwb", smooth_traces(2, 20), 5.0)
    with pytest.raises(ValueError, match="no TimeSeries named 'pupil'"):
        load_nwb_recording(path, behavior_series=["pupil"])
    with pytest.raises(ValueError, match="series='DfOverF' matches nothing"):
        load_nwb_recording(path, series="DfOverF")


# ---------------------------------------------------------------- suite2p


def test_suite2p_reader(tmp_path):
    f0, n0 = smooth_traces(4, 60, seed=1), smooth_traces(4, 60, seed=2, offset=20.0)
    f1, n1 = smooth_traces(3, 60, seed=3), smooth_traces(3, 60, seed=4, offset=20.0)
    iscell0 = np.array([[1, 0.9], [0, 0.2], [1, 0.8], [0, 0.6]])
    iscell1 = np.array([[1, 0.9], [1, 0.7], [0, 0.1]])
    folder = write_suite2p(tmp_path / "fov1", [(f0, n0, iscell0), (f1, n1, iscell1)], fs=7.5)
    for path in (folder, folder.parent, folder / "plane0"):
        assert load_recording(path).fs == 7.5
    recording = load_suite2p_recording(folder)
    expected = np.concatenate([(f0 - 0.7 * n0)[[0, 2]], (f1 - 0.7 * n1)[[0, 1]]])
    np.testing.assert_allclose(recording.traces, expected, rtol=1e-5)
    assert recording.extras["plane"].tolist() == [0, 0, 1, 1] and recording.extras["roi_index"].tolist() == [0, 2, 0, 1]
    raw = load_suite2p_recording(folder, neuropil_coefficient=0.0, cells_only=False)
    assert raw.num_neurons == 7
    assert load_suite2p_recording(folder, cell_probability=0.5).num_neurons == 5
    (folder / "plane1" / "iscell.npy").unlink()
    with pytest.raises(FileNotFoundError, match="plane1/iscell.npy is missing"):
        load_suite2p_recording(folder)
    with pytest.raises(ValueError, match="not a suite2p output folder"):
        load_suite2p_recording(tmp_path)


# ---------------------------------------------------------------- CaImAn


def test_caiman_reader(tmp_path):
    traces = smooth_traces(5, 80)
    path = write_caiman(tmp_path / "cnm.hdf5", traces, 15.0, accepted=np.array([3, 0, 4]))
    recording = load_caiman_recording(path)
    np.testing.assert_array_equal(recording.traces, traces[[0, 3, 4]])
    assert recording.fs == 15.0 and recording.extras["caiman_traces"] == "C"
    assert load_caiman_recording(path, accepted_only=False).num_neurons == 5
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle.create_dataset("data", data=traces)
    with pytest.raises(ValueError, match="other.h5 has no estimates/F_dff or estimates/C"):
        load_recording(tmp_path / "other.h5")
    (tmp_path / "bad.hdf5").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.hdf5 is not a readable HDF5"):
        load_caiman_recording(tmp_path / "bad.hdf5")


# ---------------------------------------------------------------- calm prepare, every format


def test_prepare_every_format(tmp_path):
    nwb = write_nwb(tmp_path / "mouse.nwb", smooth_traces(6, 300, seed=5), 10.0, speed_rate=20.0)
    s2p = write_suite2p(tmp_path / "fov", [(smooth_traces(5, 300, 6), smooth_traces(5, 300, 7, 20.0), np.ones((5, 2)))], 10.0)
    cai = write_caiman(tmp_path / "cai.hdf5", smooth_traces(4, 300, seed=8), 10.0)
    np.savez(tmp_path / "fish.npz", traces=smooth_traces(3, 300, seed=9), fs=10.0)
    corpus = prepare(
        ["--output_dir", str(tmp_path / "all"), "--nwb", str(nwb),
         "--suite2p", str(s2p), "--caiman", str(cai), "--npz", str(tmp_path / "fish.npz"), "--trial_seconds", "3"]
    )
    sessions = set(corpus["train"].unique("session_id"))
    assert len(sessions) == 4
    text = (tmp_path / "all" / "calm_sessions.json").read_text()
    for name in ("mouse", "fov", "cai", "fish"):
        assert f'"{name}"' in text
