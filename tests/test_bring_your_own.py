"""`calm prepare` -> `calm tokenize` -> `calm adapt` -> `calm forecast` end to end on a small NWB
file written by pynwb, a suite2p folder and the shared zebrafish recording (tiny models, seconds each)."""

import json

import numpy as np
import pytest

from calm_hf.cli import main as calm
from recording_files import smooth_traces, write_nwb, write_suite2p

pytest.importorskip("pynwb")

TRAIN_FLAGS = ["--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny tokenizer and dual-axis transformer pretrained for a few steps on a tiny simulation."""
    root = tmp_path_factory.mktemp("byo")
    calm(["prepare", "--output_dir", str(root / "sim"), "--num_sessions", "2", "--num_neurons", "10", "--num_trials",
          "12", "--num_steps", "60"])
    calm(["train-tokenizer", "--trials_dataset", str(root / "sim"), "--output_dir", str(root / "tok"), "--preset", "tiny",
          "--max_steps", "3", "--per_device_train_batch_size", "32", *TRAIN_FLAGS])
    calm(["tokenize", "--tokenizer_path", str(root / "tok"), "--trials_dataset", str(root / "sim"),
          "--output_dir", str(root / "sim-tok")])
    calm(["pretrain", "--tokenized_dataset", str(root / "sim-tok"), "--tokenizer_path", str(root / "tok"),
          "--output_dir", str(root / "calm"), "--preset", "tiny", "--max_neurons", "8", "--max_steps", "3",
          "--per_device_train_batch_size", "4", "--forecast_eval_trials", "0", *TRAIN_FLAGS])
    return root


def run_chain(root, name, source_flags, forecast_source, trial_seconds, horizon):
    """prepare -> tokenize -> adapt -> forecast (held-out last frames, with a figure); returns the forecast file."""
    work = root / name
    calm(["prepare", "--output_dir", str(work / "trials"), *source_flags, "--trial_seconds", str(trial_seconds)])
    calm(["tokenize", "--tokenizer_path", str(root / "calm" / "tokenizer"), "--trials_dataset", str(work / "trials"),
          "--output_dir", str(work / "tokenized")])
    # the tiny preset is a data-identity model: no session name to learn, the recording's activity is its identity
    calm(["adapt", "--model_path", str(root / "calm"), "--tokenized_dataset", str(work / "tokenized"),
          "--output_dir", str(work / "adapted"), "--adapt_max_steps", "2", "--per_device_train_batch_size", "4"])
    for required in ("tokenizer/config.json", "preprocessor_config.json", "pipeline_neural_forecasting.py"):
        assert (work / "adapted" / required).is_file(), required
    assert json.loads((work / "adapted" / "config.json").read_text())["neuron_identity"] == "data"
    calm(["forecast", "--model", str(work / "adapted"), "--traces", str(forecast_source),
          "--horizon", str(horizon), "--num_samples", "3", "--holdout", "--plot", str(work / "forecast.png"),
          "--output", str(work / "forecast.npz")])
    assert (work / "forecast.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(work / "forecast.npz") as out:
        assert np.isfinite(out["forecast"]).all() and out["forecast"].shape == out["truth"].shape
        assert np.isfinite(out["pearson_r"])
        return dict(out)


@pytest.mark.slow
def test_nwb_end_to_end(pretrained, tmp_path):
    path = write_nwb(tmp_path / "mouse.nwb", smooth_traces(6, 600, seed=11), 10.0, trial_starts_s=[0, 12, 24, 36, 48],
                     speed_rate=20.0)
    out = run_chain(pretrained, "mouse", ["--nwb", str(path)], path, trial_seconds=10, horizon=15)
    assert out["forecast"].shape == (6, 15)


@pytest.mark.slow
def test_suite2p_end_to_end(pretrained, tmp_path):
    fluorescence, neuropil = smooth_traces(7, 500, seed=12), smooth_traces(7, 500, seed=13, offset=20.0)
    iscell = np.array([[1, 0.9]] * 5 + [[0, 0.1]] * 2)
    folder = write_suite2p(tmp_path / "fov", [(fluorescence, neuropil, iscell)], fs=7.5)
    out = run_chain(pretrained, "fov", ["--suite2p", str(folder)], folder, trial_seconds=8, horizon=12)
    assert out["forecast"].shape == (5, 12)


@pytest.mark.slow
@pytest.mark.data
def test_zebrafish_end_to_end(pretrained, shared_data_dir):
    path = shared_data_dir / "triplett2018_zf_tectum_spont" / "zf_20151104-f1.npz"
    out = run_chain(pretrained, "zf", ["--npz", str(path)], path, trial_seconds=20, horizon=9)
    assert out["forecast"].shape == (114, 9)
