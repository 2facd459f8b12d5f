"""What a recording says about itself reaches the user: a frame rate given on the command line replaces (or stands in
for) the file's, the ids the segmentation gave the neurons (suite2p ROI index, CaImAn component, NWB ROI id) travel
into the trial datasets and the forecasts, and the forecast figure says what it shows."""

import json

import h5py
import numpy as np
import pytest
import torch

from calm_hf import CalmConfig, CalmForCausalNeuralModeling, CalmTokenizer, CalmTokenizerConfig
from calm_hf.checkpoint import complete_checkpoint
from calm_hf.cli import main as calm_main
from calm_hf.data import load_caiman_recording, load_npz_recording, load_nwb_recording, load_suite2p_recording

from recording_files import smooth_traces, write_caiman, write_nwb, write_suite2p

ISCELL_PLANE0 = np.array([[1, 0.9], [0, 0.1], [1, 0.8], [1, 0.7], [0, 0.2]])  # keeps ROIs 0, 2, 3
ISCELL_PLANE1 = np.array([[0, 0.1], [1, 0.9], [1, 0.9]])  # keeps ROIs 1, 2


def suite2p_without_ops(tmp_path, frames=200):
    """A two-plane suite2p folder whose ops.npy files (the only place suite2p stores the frame rate) are gone."""
    fluorescence = smooth_traces(5, frames)
    folder = write_suite2p(tmp_path, [(fluorescence, 0.1 * fluorescence, ISCELL_PLANE0),
                                      (fluorescence[:3], 0.1 * fluorescence[:3], ISCELL_PLANE1)], fs=10.0)
    for ops in folder.glob("plane*/ops.npy"):
        ops.unlink()
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained data-identity checkpoint with its tokenizer: forecasts of any neuron count."""
    folder = tmp_path_factory.mktemp("ckpt") / "calm-tiny"
    torch.manual_seed(0)
    tokenizer = CalmTokenizer(CalmTokenizerConfig.from_preset("tiny", codebook_size=16)).eval()
    model = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", hidden_dropout=0.0)).eval()
    model.save_pretrained(folder)
    complete_checkpoint(folder, tokenizer=tokenizer)
    return folder


def test_suite2p_folder_without_ops_reads_with_a_given_rate(tmp_path):
    folder = suite2p_without_ops(tmp_path)
    with pytest.raises(FileNotFoundError, match="sampling_rate"):  # the message says how to give the rate
        load_suite2p_recording(folder)
    recording = load_suite2p_recording(folder, sampling_rate=7.5)
    assert recording.fs == 7.5 and recording.traces.shape == (5, 200)
    assert recording.extras["roi_ids"].tolist() == [0, 2, 3, 1, 2]  # each neuron's row in its plane's F.npy
    assert recording.extras["plane"].tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="sampling_rate"):
        load_suite2p_recording(folder, sampling_rate=-1.0)


def test_every_reader_takes_the_given_rate_over_the_files(tmp_path):
    traces = smooth_traces(4, 120)
    np.savez(tmp_path / "no_fs.npz", traces=traces)
    with pytest.raises(ValueError, match="sampling_rate"):
        load_npz_recording(tmp_path / "no_fs.npz")
    assert load_npz_recording(tmp_path / "no_fs.npz", sampling_rate=12.0).fs == 12.0
    np.savez(tmp_path / "fs.npz", traces=traces, fs=30.0)
    assert load_npz_recording(tmp_path / "fs.npz", sampling_rate=15.0).fs == 15.0

    caiman = write_caiman(tmp_path / "cnm.hdf5", traces, 30.0)
    assert load_caiman_recording(caiman, sampling_rate=15.0).fs == 15.0
    with h5py.File(caiman, "a") as handle:
        del handle["params/data/fr"]
    with pytest.raises(ValueError, match="sampling_rate"):
        load_caiman_recording(caiman)
    assert load_caiman_recording(caiman, sampling_rate=15.0).fs == 15.0

    nwb = write_nwb(tmp_path / "rate.nwb", traces, rate=30.0, trial_starts_s=[0.0, 2.0])
    recording = load_nwb_recording(nwb, sampling_rate=15.0)  # a stored rate is replaced; frame times follow it
    assert recording.fs == 15.0 and recording.trial_starts.tolist() == [0, 30]
    stamped = write_nwb(tmp_path / "stamped.nwb", traces, rate=30.0, use_timestamps=True)
    assert load_nwb_recording(stamped, sampling_rate=30.0).fs == 30.0
    with pytest.raises(ValueError, match="contradicts its timestamps"):  # timestamps are the truth
        load_nwb_recording(stamped, sampling_rate=15.0)


def test_readers_keep_the_segmentations_ids(tmp_path):
    traces = smooth_traces(5, 60)
    caiman = write_caiman(tmp_path / "cnm.hdf5", traces, 10.0, accepted=np.array([1, 3, 4]))
    assert load_caiman_recording(caiman).extras["roi_ids"].tolist() == [1, 3, 4]
    nwb = load_nwb_recording(write_nwb(tmp_path / "rois.nwb", traces, rate=10.0))
    assert nwb.extras["roi_ids"].tolist() == [0, 1, 2, 3, 4] and nwb.extras["units"] == "a.u."
    np.savez(tmp_path / "ids.npz", traces=traces, fs=10.0, roi_ids=np.array([7, 8, 9, 10, 11]))
    assert load_npz_recording(tmp_path / "ids.npz").extras["roi_ids"].tolist() == [7, 8, 9, 10, 11]
    np.savez(tmp_path / "bad_ids.npz", traces=traces, fs=10.0, roi_ids=np.array([7, 8]))
    with pytest.raises(ValueError, match="one whole-number id per neuron"):
        load_npz_recording(tmp_path / "bad_ids.npz")


def test_prepare_carries_roi_ids_into_calm_sessions_json(tmp_path):
    folder = suite2p_without_ops(tmp_path)
    caiman = write_caiman(tmp_path / "cnm.hdf5", smooth_traces(5, 200, seed=1), 10.0, accepted=np.array([1, 3, 4]))
    output = tmp_path / "prepared"
    argv = ["prepare", "--output_dir", str(output), "--suite2p", str(folder), "--caiman", str(caiman),
            "--trial_seconds", "2", "--sampling_rate", "10"]
    assert calm_main(argv) == 0
    sessions = {s["name"]: s for s in json.loads((output / "calm_sessions.json").read_text())["calm_sessions"]}
    assert sessions[tmp_path.name]["roi_ids"] == [0, 2, 3, 1, 2]
    assert sessions[tmp_path.name]["roi_planes"] == [0, 0, 0, 1, 1]
    assert sessions["cnm"]["roi_ids"] == [1, 3, 4] and sessions["cnm"]["roi_planes"] is None
    from datasets import load_from_disk

    from calm_hf.data import read_session_metadata

    infos = read_session_metadata(load_from_disk(str(output)))  # the same metadata travels inside the dataset
    assert [info.roi_ids for info in infos] == [[0, 2, 3, 1, 2], [1, 3, 4]]


def test_forecast_of_a_suite2p_folder_without_ops_names_its_rois(tmp_path, checkpoint, capsys):
    folder = suite2p_without_ops(tmp_path)
    argv = ["forecast", "--model", str(checkpoint), "--traces", str(folder), "--horizon", "8"]
    assert calm_main(argv + ["--output", str(tmp_path / "refused.npz")]) == 1
    assert "--sampling_rate" in capsys.readouterr().err
    output = tmp_path / "forecast.npz"
    assert calm_main(argv + ["--sampling_rate", "10", "--output", str(output)]) == 0
    with np.load(output) as out:
        assert out["forecast"].shape == (5, 8) and float(out["sampling_rate"]) == 10.0
        assert out["neuron_ids"].tolist() == [0, 1, 2, 3, 4]  # rows of the input
        assert out["roi_ids"].tolist() == [0, 2, 3, 1, 2] and out["roi_planes"].tolist() == [0, 0, 0, 1, 1]


def test_forecast_of_an_nwb_file_writes_its_roi_ids(tmp_path, checkpoint):
    nwb = write_nwb(tmp_path / "session.nwb", smooth_traces(4, 150), rate=10.0)
    output = tmp_path / "forecast.npz"
    assert calm_main(["forecast", "--model", str(checkpoint), "--traces", str(nwb), "--horizon", "6",
                      "--output", str(output)]) == 0
    with np.load(output) as out:
        assert out["roi_ids"].tolist() == [0, 1, 2, 3] and "roi_planes" not in out.files


def capture_figures(monkeypatch) -> list:
    """The figures `plot_forecast` draws, kept instead of closed."""
    import matplotlib.pyplot as plt

    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)
    return drawn


def test_forecast_plot_says_what_it_shows(tmp_path, checkpoint, monkeypatch):
    drawn = capture_figures(monkeypatch)
    np.savez(tmp_path / "rec.npz", traces=smooth_traces(3, 150), fs=10.0, roi_ids=np.array([12, 40, 41]))
    output, figure_path = tmp_path / "forecast.npz", tmp_path / "forecast.png"
    assert calm_main(["forecast", "--model", str(checkpoint), "--traces", str(tmp_path / "rec.npz"), "--horizon", "10",
                      "--holdout", "--plot", str(figure_path), "--output", str(output), "--units", "dF/F"]) == 0
    assert figure_path.is_file()
    (figure,) = drawn
    heading = figure._suptitle.get_text()
    with np.load(output) as out:
        r, mse, baseline = float(out["pearson_r"]), float(out["mse"]), float(out["last_second_mean_mse"])
    assert "rec: 3 neurons at 10 Hz" in heading and "10 frames (1 s) ahead by calm-tiny" in heading
    assert f"r = {r:.3f}" in heading and f"MSE = {mse:.3g}" in heading and f"MSE = {baseline:.3g}" in heading
    assert "10 Hz" in figure._supxlabel.get_text()
    ylabels = [axis.get_ylabel() for axis in figure.axes]
    assert sorted(label.split("\n")[0] for label in ylabels) == ["ROI 12", "ROI 40", "ROI 41"]
    assert all("dF/F" in label for label in ylabels)
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "last second's mean" in legend and "recorded (held out)" in legend


def test_forecast_plot_heatmap_of_many_neurons_is_z_scored(tmp_path, checkpoint, monkeypatch):
    drawn = capture_figures(monkeypatch)
    np.save(tmp_path / "many.npy", smooth_traces(40, 120))
    assert calm_main(["forecast", "--model", str(checkpoint), "--traces", str(tmp_path / "many.npy"), "--horizon", "8",
                      "--sampling_rate", "10", "--plot", str(tmp_path / "many.png"),
                      "--output", str(tmp_path / "many.npz")]) == 0
    (figure,) = drawn
    colorbar = figure.axes[-1]
    assert "z-score" in colorbar.get_ylabel()
    assert [text.get_text() for text in figure.axes[0].get_yticklabels()][0] == "neuron 0"


def test_forecast_of_a_missing_model_folder_says_so(tmp_path, capsys):
    np.savez(tmp_path / "rec.npz", traces=smooth_traces(3, 60), fs=10.0)
    argv = ["forecast", "--traces", str(tmp_path / "rec.npz"), "--horizon", "4", "--output", str(tmp_path / "f.npz")]
    assert calm_main(argv + ["--model", "nope-ckpt"]) == 1
    err = capsys.readouterr().err
    assert "no such folder" in err and "nope-ckpt" in err and "connect" not in err.lower()
    assert calm_main(argv + ["--model", "runs/nope-ckpt"]) == 1  # a folder path, or a Hub id that is not there
    assert "runs/nope-ckpt: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert calm_main(argv + ["--model", str(tmp_path / "empty")]) == 1
    assert "no config.json" in capsys.readouterr().err
