"""Tests for calm_hf.metrics: the numpy functions and the evaluate modules loaded by path (offline)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from calm_hf.metrics import forecast_metrics, forecast_pearson_r, load_metric, mse, pearson_r_per_neuron, r2_score


def _reference_pearson(pred, truth, session_ids, neuron_mask=None):
    """Independent computation with np.corrcoef loops: neurons -> trials -> sessions."""
    session_means = []
    for session in sorted(set(session_ids.tolist())):
        trial_means = []
        for trial in np.flatnonzero(session_ids == session):
            values = []
            for neuron in range(pred.shape[1]):
                if neuron_mask is not None and not neuron_mask[trial, neuron]:
                    continue
                values.append(np.corrcoef(pred[trial, neuron], truth[trial, neuron])[0, 1])
            trial_means.append(np.mean(values))
        session_means.append(np.mean(trial_means))
    return float(np.mean(session_means)), session_means


@pytest.fixture
def random_forecasts():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(9, 6, 12))
    pred = 0.6 * truth + rng.normal(size=truth.shape)
    session_ids = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2])
    neuron_mask = np.ones((9, 6), dtype=bool)
    neuron_mask[5:7, 4:] = False  # session 1 has only 4 neurons
    return pred, truth, session_ids, neuron_mask


def test_pearson_per_neuron_matches_corrcoef(random_forecasts):
    pred, truth, _, _ = random_forecasts
    r = pearson_r_per_neuron(pred, truth)
    assert r.shape == (9, 6)
    expected = np.array([[np.corrcoef(pred[t, n], truth[t, n])[0, 1] for n in range(6)] for t in range(9)])
    np.testing.assert_allclose(r, expected, atol=1e-12)


def test_forecast_pearson_matches_reference_loops(random_forecasts):
    pred, truth, session_ids, neuron_mask = random_forecasts
    result = forecast_pearson_r(pred, truth, session_ids=session_ids, neuron_mask=neuron_mask)
    expected, expected_sessions = _reference_pearson(pred, truth, session_ids, neuron_mask)
    assert result["pearson_r"] == pytest.approx(expected, abs=1e-12)
    assert list(result["per_session"]) == [0, 1, 2]
    np.testing.assert_allclose(list(result["per_session"].values()), expected_sessions, atol=1e-12)
    assert result["num_nan"] == 0
    assert result["num_scored"] == int(neuron_mask.sum())
    # The padded neurons would change the answer if they were scored.
    unmasked = forecast_pearson_r(pred, truth, session_ids=session_ids)["pearson_r"]
    assert unmasked != pytest.approx(expected, abs=1e-6)


def test_hierarchical_averaging_order():
    """Hand-built: each neuron has r = +1 or -1, so every level's mean is known exactly."""
    base = np.array([0.0, 1.0, 0.0, 2.0, 0.0, 1.0])
    signs = np.array(
        [
            [1, 1, 1, -1],  # session 0, trial mean 0.5
            [1, -1, 0, 0],  # session 1, last two neurons padded: trial mean 0
            [1, 1, 1, 1],  # session 1, trial mean 1
            [1, 1, 1, 1],  # session 1, trial mean 1
        ],
        dtype=float,
    )
    neuron_mask = signs != 0
    truth = np.broadcast_to(base, (4, 4, 6)).copy()
    pred = np.where(signs[..., None] >= 0, truth, -truth)
    result = forecast_pearson_r(pred, truth, session_ids=np.array([7, 3, 3, 3]), neuron_mask=neuron_mask)
    # neurons -> trials -> sessions: (0.5 + (0 + 1 + 1) / 3) / 2
    assert result["pearson_r"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert result["per_session"] == {3: pytest.approx(2 / 3), 7: pytest.approx(0.5)}
    # Other orders give different numbers, so the test pins the order down.
    flat_trials = (0.5 + 0 + 1 + 1) / 4
    flat_neurons = signs[neuron_mask].mean()
    assert not np.isclose(result["pearson_r"], flat_trials)
    assert not np.isclose(result["pearson_r"], flat_neurons)


def test_constant_traces_are_nan_excluded_and_counted():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(2, 3, 10))
    pred = truth.copy()
    truth[0, 1] = 0.5  # constant truth: r undefined
    pred[1, 2] = 0.0  # constant forecast: r undefined
    r = pearson_r_per_neuron(pred, truth)
    assert np.isnan(r[0, 1]) and np.isnan(r[1, 2])
    assert np.sum(np.isnan(r)) == 2
    result = forecast_pearson_r(pred, truth)
    assert result["num_nan"] == 2
    assert result["num_scored"] == 4
    assert result["pearson_r"] == pytest.approx(1.0)
    all_constant = forecast_pearson_r(np.zeros((1, 2, 5)), np.ones((1, 2, 5)))
    assert np.isnan(all_constant["pearson_r"]) and all_constant["num_nan"] == 2


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        forecast_pearson_r(np.zeros((2, 3, 5)), np.zeros((2, 3, 6)))
    with pytest.raises(ValueError, match=r"\(trials, neurons, horizon\)"):
        pearson_r_per_neuron(np.zeros((3, 5)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="one id per trial"):
        forecast_pearson_r(np.ones((2, 3, 5)), np.ones((2, 3, 5)), session_ids=[0])
    with pytest.raises(ValueError, match="multioutput"):
        r2_score(np.zeros((3, 2)), np.zeros((3, 2)), multioutput="variance_weighted")


def test_mse_and_r2_match_direct_numpy():
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(4, 20, 3))
    pred = truth + 0.3 * rng.normal(size=truth.shape)
    assert mse(pred, truth) == pytest.approx(np.mean((pred - truth) ** 2))
    mask = np.array([True, False, True, True])
    assert mse(pred, truth, mask=mask) == pytest.approx(np.mean((pred[mask] - truth[mask]) ** 2))
    flat_pred, flat_truth = pred.reshape(-1, 3), truth.reshape(-1, 3)
    expected = [
        1 - np.sum((flat_truth[:, c] - flat_pred[:, c]) ** 2) / np.sum((flat_truth[:, c] - flat_truth[:, c].mean()) ** 2)
        for c in range(3)
    ]
    np.testing.assert_allclose(r2_score(pred, truth), expected)
    assert r2_score(pred, truth, multioutput="uniform_average") == pytest.approx(np.mean(expected))
    constant = r2_score(np.zeros((5, 2)), np.stack([np.arange(5.0), np.ones(5)], axis=1))
    assert constant[0] < 0 and np.isnan(constant[1])


def test_forecast_metrics_flat_dict(random_forecasts):
    pred, truth, session_ids, neuron_mask = random_forecasts
    metrics = forecast_metrics(pred, truth, session_ids=session_ids, neuron_mask=neuron_mask, prefix="eval_")
    assert metrics["eval_pearson_r"] == pytest.approx(_reference_pearson(pred, truth, session_ids, neuron_mask)[0])
    assert set(metrics) == {
        "eval_pearson_r",
        "eval_pearson_r_session_0",
        "eval_pearson_r_session_1",
        "eval_pearson_r_session_2",
        "eval_mse",
        "eval_num_nan",
    }
    assert metrics["eval_mse"] == pytest.approx(np.mean((pred - truth)[neuron_mask] ** 2))


def test_evaluate_modules_match_functional(random_forecasts):
    pred, truth, session_ids, neuron_mask = random_forecasts
    # Ragged trials as the module sees them: session 1 rows carry only their 4 real neurons.
    rows_pred = [pred[t][neuron_mask[t]] for t in range(len(pred))]
    rows_truth = [truth[t][neuron_mask[t]] for t in range(len(truth))]
    metric = load_metric("forecast_pearson")
    for start in range(0, len(rows_pred), 4):  # add_batch accumulates like Trainer's eval loop
        metric.add_batch(predictions=rows_pred[start : start + 4], references=rows_truth[start : start + 4])
    result = metric.compute(session_ids=session_ids)
    expected = forecast_pearson_r(pred, truth, session_ids=session_ids, neuron_mask=neuron_mask)
    assert result["pearson_r"] == pytest.approx(expected["pearson_r"], abs=1e-6)  # float32 storage
    assert result["num_scored"] == expected["num_scored"]

    mse_metric = load_metric("calm_mse")
    assert mse_metric.compute(predictions=pred[0], references=truth[0])["mse"] == pytest.approx(
        mse(pred[0], truth[0]), rel=1e-5
    )
    r2_metric = load_metric("calm_r2")
    behavior_pred, behavior_truth = pred[:, :, :3], truth[:, :, :3]  # (trials, frames, channels)
    result = r2_metric.compute(predictions=behavior_pred, references=behavior_truth, multioutput="raw_values")
    np.testing.assert_allclose(result["r2_per_channel"], r2_score(behavior_pred, behavior_truth), atol=1e-5)
    assert result["r2"] == pytest.approx(r2_score(behavior_pred, behavior_truth, "uniform_average"), abs=1e-5)


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="forecast_pearson"):
        load_metric("pearson")


@pytest.mark.slow
def test_evaluate_modules_load_offline_in_fresh_process(tmp_path):
    """A fresh interpreter with both offline switches and an empty HF cache still loads the modules by path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1", HF_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    script = (
        "from calm_hf.metrics import load_metric\n"
        "r = load_metric('forecast_pearson').compute(predictions=[[[0.0, 1.0, 2.0]]], references=[[[0.0, 1.0, 3.0]]])\n"
        "m = load_metric('calm_mse').compute(predictions=[1.0, 2.0], references=[1.0, 4.0])\n"
        "q = load_metric('calm_r2').compute(predictions=[[1.0], [2.0]], references=[[1.0], [2.0]])\n"
        "print(round(r['pearson_r'], 6), m['mse'], q['r2'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(round(np.corrcoef([0, 1, 2], [0, 1, 3])[0, 1], 6)), "2.0", "1.0"]
