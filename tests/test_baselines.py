"""Tests for the forecasting and behaviour-decoding baselines (tiny data, CPU, < 60 s)."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch

from calm_hf.baselines import (
    CalmBaselineTCN,
    MeanForecaster,
    PatchTSTForecaster,
    PerNeuronARForecaster,
    ReducedRankDecoder,
    RidgeARForecaster,
    RidgeGLMDecoder,
    TCNDecoder,
    TCNForecaster,
)
from calm_hf.metrics.functional import forecast_pearson_r

torch.set_num_threads(1)

CONTEXT, FRAMES, NEURONS = 10, 30, 12


def _rotation_system(neurons: int, rng: np.random.Generator, radius: float = 0.98) -> np.ndarray:
    """A stable, non-normal-free linear map: rotations with radius < 1 in a random orthonormal basis."""
    basis, _ = np.linalg.qr(rng.normal(size=(neurons, neurons)))
    blocks = np.zeros((neurons, neurons))
    for index, angle in enumerate(rng.uniform(0.15, 0.6, neurons // 2)):
        c, s = np.cos(angle), np.sin(angle)
        blocks[2 * index : 2 * index + 2, 2 * index : 2 * index + 2] = radius * np.array([[c, -s], [s, c]])
    return basis @ blocks @ basis.T


def _simulate(weights: list[np.ndarray], trials: int, rng: np.random.Generator, frames: int = FRAMES) -> np.ndarray:
    """Noiseless population AR(len(weights)): x[t+1] = sum_k weights[k] x[t-k]; random initial frames."""
    lags, neurons = len(weights), weights[0].shape[0]
    x = np.zeros((trials, neurons, frames))
    x[:, :, :lags] = rng.normal(size=(trials, neurons, lags))
    for t in range(lags - 1, frames - 1):
        x[:, :, t + 1] = sum(x[:, :, t - k] @ w.T for k, w in enumerate(weights))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def linear_splits():
    rng = np.random.default_rng(0)
    system = [_rotation_system(NEURONS, rng)]
    return tuple(_simulate(system, n, rng) for n in (40, 12, 12))


def _check_forecast(model, test: np.ndarray) -> np.ndarray:
    horizon = FRAMES - CONTEXT
    pred = model.predict(test[:, :, :CONTEXT], horizon)
    assert pred.shape == (len(test), NEURONS, horizon)
    assert np.isfinite(pred).all()
    assert {"grid", "chosen", "results"} <= set(model.search_log_)
    return pred


# ---------------------------------------------------------------- forecasters


def test_mean_forecaster_per_frame_and_auto(linear_splits):
    train, val, test = linear_splits
    model = MeanForecaster(context=CONTEXT, variant="auto").fit(train, val)
    _check_forecast(model, test)
    assert model.search_log_["chosen"]["variant"] in ("per_frame", "global")
    per_frame = MeanForecaster(context=CONTEXT).fit(train, val)
    pred = per_frame.predict(test[:, :, :CONTEXT], FRAMES - CONTEXT)
    np.testing.assert_allclose(pred[0], train.mean(axis=0)[:, CONTEXT:], rtol=1e-5, atol=1e-6)
    glob = MeanForecaster(context=CONTEXT, variant="global").fit(train, val)
    np.testing.assert_allclose(glob.predict(test[:, :, :CONTEXT], 5)[1, :, 3], train.mean(axis=(0, 2)), rtol=1e-5)


def test_ridge_ar_recovers_linear_system_and_beats_mean(linear_splits):
    train, val, test = linear_splits
    ridge = RidgeARForecaster(context=CONTEXT, lags_grid=(1, 2, 4)).fit(train, val)
    pred = _check_forecast(ridge, test)
    truth = test[:, :, CONTEXT:]
    ridge_r = forecast_pearson_r(pred, truth)["pearson_r"]
    mean_pred = MeanForecaster(context=CONTEXT).fit(train, val).predict(test[:, :, :CONTEXT], FRAMES - CONTEXT)
    mean_r = forecast_pearson_r(mean_pred, truth)["pearson_r"]
    assert ridge_r > 0.99
    assert ridge_r > mean_r + 0.3
    assert np.mean((pred - truth) ** 2) < 1e-3 * np.mean(truth**2)
    # the search is honest: every grid point is logged and the chosen one has the best validation r
    log = ridge.search_log_
    assert len(log["results"]) == len(log["grid"]["lags"]) * len(log["grid"]["alpha"])
    best = max(log["results"], key=lambda row: row["val_pearson_r"])
    assert (best["lags"], best["alpha"]) == (ridge.lags_, ridge.alpha_)


def test_ridge_ar_needs_and_finds_the_second_lag():
    """An AR(2) population: order 1 cannot forecast it, so the search must pick lags >= 2 (checks lag ordering)."""
    rng = np.random.default_rng(1)
    neurons = 8
    # x[t+1] = 2 c x[t] - x[t-1] damped: per-neuron oscillators mixed by a random orthonormal basis
    basis, _ = np.linalg.qr(rng.normal(size=(neurons, neurons)))
    freqs = np.diag(2 * 0.97 * np.cos(rng.uniform(0.2, 0.7, neurons)))
    weights = [basis @ freqs @ basis.T, -(0.97**2) * np.eye(neurons)]
    train, val, test = (_simulate(weights, n, rng) for n in (40, 10, 10))
    ridge = RidgeARForecaster(context=CONTEXT, lags_grid=(1, 2, 4), alpha_grid=(1e-6, 1e-3)).fit(train, val)
    assert ridge.lags_ >= 2
    lag1 = [row["val_pearson_r"] for row in ridge.search_log_["results"] if row["lags"] == 1]
    assert max(lag1) < ridge.search_log_["best_val_pearson_r"] - 0.05
    pred = ridge.predict(test[:, :, :CONTEXT], FRAMES - CONTEXT)
    assert forecast_pearson_r(pred, test[:, :, CONTEXT:])["pearson_r"] > 0.99


def test_per_neuron_ar_fits_independent_oscillators():
    rng = np.random.default_rng(2)
    neurons = 6
    freqs = np.diag(2 * 0.97 * np.cos(rng.uniform(0.2, 0.7, neurons)))
    weights = [freqs, -(0.97**2) * np.eye(neurons)]  # each neuron only depends on its own history
    train, val, test = (_simulate(weights, n, rng) for n in (30, 10, 10))
    model = PerNeuronARForecaster(context=CONTEXT, lags_grid=(1, 2, 4)).fit(train, val)
    pred = model.predict(test[:, :, :CONTEXT], FRAMES - CONTEXT)
    assert pred.shape == (10, neurons, FRAMES - CONTEXT) and np.isfinite(pred).all()
    assert forecast_pearson_r(pred, test[:, :, CONTEXT:])["pearson_r"] > 0.99
    assert model.search_log_["chosen"]["lags"] >= 2


def test_per_neuron_ar_cannot_use_population_coupling(linear_splits):
    """On a coupled system the per-neuron model must lose to the population ridge AR (it sees no other neuron)."""
    train, val, test = linear_splits
    truth = test[:, :, CONTEXT:]
    per_neuron = PerNeuronARForecaster(context=CONTEXT, lags_grid=(1, 2)).fit(train, val)
    _check_forecast(per_neuron, test)
    pop = RidgeARForecaster(context=CONTEXT, lags_grid=(1,)).fit(train, val)
    score = lambda m: forecast_pearson_r(m.predict(test[:, :, :CONTEXT], FRAMES - CONTEXT), truth)["pearson_r"]
    assert score(pop) > score(per_neuron) + 0.05


def test_tcn_stream_matches_forward_and_is_causal():
    torch.manual_seed(0)
    model = CalmBaselineTCN(5, 5, hidden_size=16, kernel_size=3, dilations=(1, 2, 4), residual_input=True).eval()
    x = torch.randn(3, 5, 20)
    full = model(x)
    out, state = model.prefill(x[:, :, :8])
    torch.testing.assert_close(out, full[:, :, 7], rtol=1e-4, atol=1e-5)
    for t in range(8, 20):
        torch.testing.assert_close(model.stream(x[:, :, t], state), full[:, :, t], rtol=1e-4, atol=1e-5)
    changed = x.clone()
    changed[:, :, 12:] += 5.0
    torch.testing.assert_close(model(changed)[:, :, :12], full[:, :, :12])
    assert not torch.allclose(model(changed)[:, :, 12:], full[:, :, 12:])
    with pytest.raises(ValueError, match="residual_input"):
        CalmBaselineTCN(5, 3, residual_input=True)


def test_tcn_forecaster_trains_within_budget(linear_splits):
    train, val, test = linear_splits
    model = TCNForecaster(context=CONTEXT, hidden_size=32, dilations=(1, 2, 4), learning_rates=(3e-3, 1e-3),
                          max_epochs=200, max_seconds=4.0, batch_size=8)
    start = time.perf_counter()
    model.fit(train, val)
    assert time.perf_counter() - start < 12.0  # budget plus one final evaluation per learning rate
    assert any(run["stopped"] == "max_seconds" for run in model.search_log_["results"])
    pred = _check_forecast(model, test)
    # it learned something: better than forecasting persistence of the last context frame
    persistence = np.repeat(test[:, :, CONTEXT - 1 : CONTEXT], FRAMES - CONTEXT, axis=-1)
    truth = test[:, :, CONTEXT:]
    assert np.mean((pred - truth) ** 2) < np.mean((persistence - truth) ** 2)


def test_patchtst_forecaster_shapes_budget_and_any_neuron_count(linear_splits):
    train, val, test = linear_splits
    model = PatchTSTForecaster(context=CONTEXT, patch_length=4, patch_stride=2, d_model=16, num_hidden_layers=1,
                               num_attention_heads=2, ffn_dim=32, learning_rates=(1e-3, 3e-3), max_seconds=3.0,
                               batch_size=64, batches_per_eval=5)
    start = time.perf_counter()
    model.fit(train, val)
    assert time.perf_counter() - start < 10.0
    _check_forecast(model, test)
    assert model.predict(test[:3, :5, :CONTEXT], 7).shape == (3, 5, 7)  # channel-independent
    with pytest.raises(ValueError, match="horizon"):
        model.predict(test[:, :, :CONTEXT], FRAMES)


def test_forecaster_input_errors(linear_splits):
    train, val, test = linear_splits
    with pytest.raises(ValueError, match="not fitted"):
        RidgeARForecaster(context=CONTEXT).predict(test[:, :, :CONTEXT], 5)
    ridge = RidgeARForecaster(context=CONTEXT, lags_grid=(1,)).fit(train, val)
    with pytest.raises(ValueError, match="neurons"):
        ridge.predict(test[:, :5, :CONTEXT], 5)
    with pytest.raises(ValueError, match="trials, neurons, frames"):
        ridge.predict(test[0, :, :CONTEXT], 5)
    with pytest.raises(ValueError, match="NaN"):
        RidgeARForecaster(context=CONTEXT).fit(np.full_like(train, np.nan), val)
    with pytest.raises(ValueError, match="lags_grid"):
        RidgeARForecaster(context=4, lags_grid=(8,))


def test_neuralforecast_wrapper_without_or_with_the_library(linear_splits):
    from calm_hf.baselines import neuralforecast_models

    if importlib.util.find_spec("neuralforecast") is None:
        with pytest.raises(ImportError, match=r"calm_hf\[bench\]"):
            neuralforecast_models.NeuralForecastPatchTST(context=CONTEXT)
        return
    pytest.importorskip("neuralforecast")
    train, val, test = linear_splits
    model = neuralforecast_models.NeuralForecastPatchTST(
        context=CONTEXT, learning_rates=(1e-3,), max_steps=5, max_seconds=20,
        model_kwargs={"patch_len": 4, "stride": 2, "hidden_size": 16, "encoder_layers": 1, "n_heads": 2},
    ).fit(train, val)
    _check_forecast(model, test)


# ---------------------------------------------------------------- behaviour decoders


def _readout_data(rank: int | None, channels: int, noise: float, seed: int, trials=(40, 15, 15), neurons=10,
                  frames=40):
    """Behaviour = a (reduced-rank) linear readout of 3 causal lags of the neurons plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    lags = 3
    if rank is None:
        weights = rng.normal(size=(lags, neurons, channels))
    else:
        weights = np.einsum("knr,rc->knc", rng.normal(size=(lags, neurons, rank)), rng.normal(size=(rank, channels)))
    splits = []
    for count in trials:
        x = rng.normal(size=(count, neurons, frames))
        y = np.zeros((count, channels, frames))
        for k in range(lags):
            y[:, :, k:] += np.einsum("tnf,nc->tcf", x[:, :, : frames - k], weights[k])
        y += noise * y.std() * rng.normal(size=y.shape)
        splits.append((x.astype(np.float32), y.astype(np.float32)))
    return splits


def test_ridge_glm_recovers_linear_readout():
    (tx, ty), (vx, vy), (sx, sy) = _readout_data(rank=None, channels=3, noise=0.1, seed=3)
    decoder = RidgeGLMDecoder(lags=4).fit(tx, ty, vx, vy)
    pred = decoder.predict(sx)
    assert pred.shape == sy.shape and np.isfinite(pred).all()
    assert decoder.score(sx, sy)["r2"] > 0.9
    best = max(decoder.search_log_["results"], key=lambda row: row["val_r2"])
    assert best["alpha"] == decoder.alpha_
    # causal: with only the current frame (lags=1) the lag-1 and lag-2 terms are missed
    assert RidgeGLMDecoder(lags=1).fit(tx, ty, vx, vy).score(sx, sy)["r2"] < 0.6


def test_reduced_rank_recovers_low_rank_readout_and_true_rank_wins():
    (tx, ty), (vx, vy), (sx, sy) = _readout_data(rank=2, channels=8, noise=1.0, seed=4, trials=(12, 40, 10),
                                                 frames=20)
    decoder = ReducedRankDecoder(lags=4, alpha_grid=(1e-3, 1e-2, 1e-1)).fit(tx, ty, vx, vy)
    assert decoder.rank_ == 2
    assert decoder.predict(sx).shape == sy.shape
    # noise 1.0 caps R^2 at 0.5; compare with the noiseless readout instead
    (tx0, ty0), (vx0, vy0), (sx0, sy0) = _readout_data(rank=2, channels=8, noise=0.05, seed=4)
    clean = ReducedRankDecoder(lags=4).fit(tx0, ty0, vx0, vy0)
    assert clean.score(sx0, sy0)["r2"] > 0.9
    by_rank = {}
    for row in decoder.search_log_["results"]:
        by_rank[row["rank"]] = max(by_rank.get(row["rank"], -np.inf), row["val_r2"])
    assert by_rank[1] < by_rank[2] and by_rank[8] < by_rank[2]


def test_tcn_decoder_trains_within_budget_and_decodes():
    (tx, ty), (vx, vy), (sx, sy) = _readout_data(rank=None, channels=2, noise=0.1, seed=5, neurons=6)
    decoder = TCNDecoder(hidden_size=32, dilations=(1, 2), max_seconds=4.0, max_epochs=500, patience=20,
                         learning_rates=(3e-3,), dropout=0.0, batch_size=8)
    start = time.perf_counter()
    decoder.fit(tx, ty, vx, vy)
    assert time.perf_counter() - start < 8.0
    pred = decoder.predict(sx)
    assert pred.shape == sy.shape and np.isfinite(pred).all()
    assert decoder.score(sx, sy)["r2"] > 0.5
    history = decoder.search_log_["results"][0]["history"]
    assert decoder.search_log_["best_val_mse"] <= -history[0][1]  # early stopping kept the best epoch


def test_decoder_input_errors():
    (tx, ty), (vx, vy), _ = _readout_data(rank=None, channels=2, noise=0.1, seed=6, trials=(5, 3, 1))
    with pytest.raises(ValueError, match="share trials and frames"):
        RidgeGLMDecoder().fit(tx, ty[:, :, :-1], vx, vy)
    with pytest.raises(ValueError, match="not fitted"):
        RidgeGLMDecoder().predict(tx)
    with pytest.raises(ValueError, match="ranks"):
        ReducedRankDecoder(ranks=(5,)).fit(tx, ty, vx, vy)
