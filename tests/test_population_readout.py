"""The population readout: a recording's ridge AR across its neurons, blended with the network's direct forecast by
weights chosen on validation; saved with `calm adapt`'s checkpoint, applied by the forecaster and the pipeline."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from calm_hf import CalmConfig, CalmForCausalNeuralModeling, CalmTokenizer, CalmTokenizerConfig
from calm_hf.baselines import RidgeARForecaster
from calm_hf.baselines.forecasting import _lag_stack, _RidgeDual, _RidgeGram, ridge_ar_system
from calm_hf.adaptation import fit_population_readout
from calm_hf.checkpoint import complete_checkpoint
from calm_hf.forecasting import CalmForecaster
from calm_hf.baselines import PerNeuronARForecaster
from calm_hf.population_readout import (READOUT_FILE, PerNeuronTerm, PopulationReadout, blend_weights, frame_blocks,
                                       mix_weights, shape_forecast, simplex_mix)

CONTEXT = 24


def coupled_trials(trials=24, neurons=6, frames=48, seed=0):
    """A slowly decaying rotation of the population (every neuron driven by the others), z-scored per neuron."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(np.random.default_rng(42).standard_normal((neurons, neurons)))
    x = np.zeros((trials, neurons, frames))
    x[:, :, 0] = rng.standard_normal((trials, neurons))
    for t in range(1, frames):
        x[:, :, t] = 0.97 * x[:, :, t - 1] @ rotation.T + 0.1 * rng.standard_normal((trials, neurons))
    return ((x - x.mean(axis=(0, 2), keepdims=True)) / x.std(axis=(0, 2), keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def forecaster():
    torch.manual_seed(0)
    model = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", quantile_levels=[0.1, 0.5, 0.9])).eval()
    assert model.config.neuron_identity == "data"
    return CalmForecaster(model, CalmTokenizer(CalmTokenizerConfig.from_preset("tiny")).eval())


def test_blend_weights_pick_the_forecast_that_matches_the_truth():
    rng = np.random.default_rng(0)
    truth, other = rng.standard_normal((2, 3, 4, 20))
    np.testing.assert_allclose(blend_weights(truth, other, truth, 4), 1.0)
    np.testing.assert_allclose(blend_weights(other, truth, truth, 4), 0.0, atol=1e-12)
    np.testing.assert_allclose(blend_weights(truth, truth, truth, 4), 1.0)  # no gap: the network
    halfway = blend_weights(truth + other, truth - other, truth, 2)
    np.testing.assert_allclose(halfway, 0.5)
    assert blend_weights(truth, other, truth, 40).shape == (40,)  # more blocks than frames: still one weight each


def test_fitting_and_applying_a_blend_use_the_same_frames():
    """A horizon the blocks do not divide (10 frames, 4 blocks): the weights fitted for each block's frames are the
    ones applied to those frames."""
    rng = np.random.default_rng(2)
    truth, other = rng.standard_normal((2, 3, 4, 10))
    block_of = frame_blocks(10, 4)
    network = np.where(block_of == 1, truth, other)  # the network is right exactly on block 1's frames
    weights = blend_weights(network, truth, truth, 4)
    np.testing.assert_allclose(weights, [0, 1, 0, 0], atol=1e-12)
    readout = PopulationReadout(np.zeros((4, 4)), np.zeros(4), 1, weights, validation_horizon=10)
    blended = readout.blend(torch.as_tensor(network), torch.as_tensor(truth)).numpy()
    np.testing.assert_allclose(blended, truth, atol=1e-6)
    np.testing.assert_array_equal(readout.network_weights(14).numpy()[10:], 0)  # later frames: the last block's


def independent_trials(trials=24, neurons=6, frames=48, seed=0):
    """Every neuron its own damped oscillation (an AR(2) with its own frequency), no coupling between neurons."""
    rng = np.random.default_rng(seed)
    angles = np.linspace(0.15, 0.6, neurons)
    x = np.zeros((trials, neurons, frames))
    x[:, :, :2] = rng.standard_normal((trials, neurons, 2))
    for t in range(2, frames):
        x[:, :, t] = 2 * 0.97 * np.cos(angles) * x[:, :, t - 1] - 0.97**2 * x[:, :, t - 2] + \
            0.2 * rng.standard_normal((trials, neurons))
    return ((x - x.mean(axis=(0, 2), keepdims=True)) / x.std(axis=(0, 2), keepdims=True)).astype(np.float32)


def test_simplex_mix_finds_the_best_convex_combination():
    rng = np.random.default_rng(4)
    a, b, c = rng.standard_normal((3, 5, 40))
    np.testing.assert_allclose(simplex_mix([a, b, c], 0.2 * a + 0.3 * b + 0.5 * c), [0.2, 0.3, 0.5], atol=1e-10)
    np.testing.assert_allclose(simplex_mix([a, b, c], c), [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(simplex_mix([a, b, c], 2 * c - a), [0, 0, 1], atol=1e-12)  # outside: the nearest face
    np.testing.assert_allclose(simplex_mix([a, a, a], a), [1, 0, 0])  # a tie keeps the first (the network)
    # against a brute-force grid of the simplex
    truth = rng.standard_normal((5, 40))
    weights = simplex_mix([a, b, c], truth)
    grid = [(i / 50, j / 50, 1 - (i + j) / 50) for i in range(51) for j in range(51 - i)]
    best = min(np.sum((w0 * a + w1 * b + w2 * c - truth) ** 2) for w0, w1, w2 in grid)
    assert np.sum((weights @ np.stack([a, b, c]).reshape(3, -1) - truth.ravel()) ** 2) <= best + 1e-9
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1)
    assert mix_weights([a, b, c], 0.2 * a + 0.8 * c, 3).shape == (3, 3)


@pytest.mark.parametrize("mode", ["autoregressive", "direct"])
def test_per_neuron_term_forecasts_as_the_baseline(mode):
    train, val, test = independent_trials(seed=0), independent_trials(8, seed=1), independent_trials(8, seed=2)
    baseline = PerNeuronARForecaster(context=CONTEXT, lags_grid=(2, 4), modes=(mode,)).fit(train, val)
    term = PerNeuronTerm(baseline.weights_, baseline.bias_, baseline.lags_, baseline.mode_)
    horizon = test.shape[-1] - CONTEXT
    np.testing.assert_allclose(term.predict(torch.from_numpy(test[:, :, :CONTEXT]), horizon).numpy(),
                               baseline.predict(test[:, :, :CONTEXT], horizon), atol=1e-4)
    assert term.frames(horizon + 5) == (horizon + 5 if mode == "autoregressive" else horizon)


def test_readout_gives_independent_neurons_to_the_per_neuron_term(forecaster, tmp_path):
    """Neurons that each follow their own dynamics: the per-neuron AR takes a share, the mix is at least as good as
    any of its parts on validation, and it survives save/load."""
    train, val, test = independent_trials(seed=0), independent_trials(8, seed=1), independent_trials(8, seed=2)
    readout = fit_population_readout(forecaster, train, val, CONTEXT)
    scores = readout.info["validation_mse"]
    assert readout.mix[:, 2].max() > 0.3 and readout.info["per_neuron"]["lags"] >= 2
    assert scores["blend"] <= min(scores["network"], scores["ridge_ar"], scores["per_neuron_ar"]) + 1e-6
    torch.testing.assert_close(readout.mix.sum(-1), torch.ones(len(readout.mix)))
    without = fit_population_readout(forecaster, train, val, CONTEXT, per_neuron=False)
    assert without.per_neuron is None and float(without.mix[:, 2].abs().max()) == 0

    horizon = test.shape[-1] - CONTEXT
    forecaster.population_readout = readout
    try:
        blended = forecaster.forecast(test[:, :, :CONTEXT], horizon, reference=train).forecast
    finally:
        forecaster.population_readout = None
    plain = forecaster.forecast(test[:, :, :CONTEXT], horizon, reference=train).forecast
    truth = test[:, :, CONTEXT:]
    assert np.mean((blended - truth) ** 2) < np.mean((plain - truth) ** 2)

    readout.save(tmp_path)
    loaded = PopulationReadout.load(tmp_path)
    assert loaded.per_neuron.mode == readout.per_neuron.mode and loaded.per_neuron.lags == readout.per_neuron.lags
    torch.testing.assert_close(loaded.mix, readout.mix)
    context = torch.from_numpy(test[:, :, :CONTEXT])
    point = torch.zeros(8, 6, horizon)
    torch.testing.assert_close(loaded.apply(context, point, None, None)[0], readout.apply(context, point, None, None)[0])


def test_a_direct_per_neuron_term_hands_frames_beyond_its_reach_to_the_network():
    term = PerNeuronTerm(np.zeros((2, 1, 3)), np.ones((2, 3)), lags=1, mode="direct")  # forecasts 1.0, 3 frames
    readout = PopulationReadout(np.zeros((2, 2)), np.zeros(2), 1, [[0.5, 0.0, 0.5]], validation_horizon=3,
                                per_neuron=term)
    network = torch.full((1, 2, 5), 3.0)
    blended = readout.apply(torch.zeros(1, 2, 4), network, None, None)[0]
    np.testing.assert_allclose(blended[0, 0].numpy(), [2, 2, 2, 3, 3])
    with pytest.raises(ValueError, match="per-neuron AR a share but no per-neuron term"):
        PopulationReadout(np.zeros((2, 2)), np.zeros(2), 1, [[0.5, 0.0, 0.5]], validation_horizon=3)


def test_a_readout_saved_with_the_network_share_only_still_loads(tmp_path):
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(4, 4), "bias": torch.zeros(4), "network_weight": torch.tensor([1.0, 0.25])},
              str(tmp_path / READOUT_FILE), metadata={"lags": "1", "validation_horizon": "8", "info": "{}"})
    loaded = PopulationReadout.load(tmp_path)
    torch.testing.assert_close(loaded.mix, torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0]]))
    assert loaded.per_neuron is None
    assert (loaded.shape, loaded.shape_scale) == ("mix", 1.0)  # a file from before the shape choice keeps the mix


def level_and_course(trials=12, neurons=5, horizon=20, seed=0):
    """Truth = a level per trial and neuron + a course over the horizon; one forecast with the right course at the
    wrong level (the network), one with the right level and a course of noise (the mix)."""
    rng = np.random.default_rng(seed)
    level = rng.standard_normal((trials, neurons, 1))
    course = np.sin(np.linspace(0, 3, horizon) + rng.uniform(0, 6, (trials, neurons, 1)))
    course -= course.mean(-1, keepdims=True)
    truth = level + course + 0.1 * rng.standard_normal((trials, neurons, horizon))
    network = course.copy()  # no level at all
    mixed = level + 0.3 * rng.standard_normal((trials, neurons, horizon))
    return network, mixed, truth


def test_the_readout_keeps_the_networks_course_at_the_mixs_level_only_where_it_forecasts_the_course_better():
    from calm_hf.adaptation import choose_shape

    network, mixed, truth = level_and_course()
    chosen = choose_shape(network, mixed, truth)
    assert chosen["shape"] == "network" and chosen["scale"] == 1.0
    assert chosen["validation_r"]["network"] > chosen["validation_r"]["mix"] + 0.5
    assert chosen["validation_mse"]["network"] < chosen["validation_mse"]["mix"] / 3
    # a mix that follows the course better than the network: it keeps its own shape
    noisy = network + 0.5 * np.random.default_rng(1).standard_normal(network.shape)
    assert choose_shape(noisy, mixed - mixed.mean(-1, keepdims=True) + truth, truth)["shape"] == "mix"
    # a network course twice too large: the factor halves it
    assert choose_shape(2 * network, mixed, truth)["scale"] == 0.5
    # one scored trial is not enough to leave the mix
    assert choose_shape(network[:1], mixed[:1], truth[:1])["shape"] == "mix"


def test_a_readout_with_the_networks_shape_moves_the_band_with_it_and_is_saved(tmp_path):
    readout = PopulationReadout(np.zeros((2, 2)), np.zeros(2), 1, [[0.0, 1.0, 0.0]], validation_horizon=4,
                                band_scale=[2.0], shape="network", shape_scale=0.5)
    context = torch.ones(1, 2, 3)  # the ridge AR (zero weights, zero bias) forecasts 0 everywhere
    point = torch.tensor([[[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 0.0]]])
    quantiles = point[..., None] + torch.tensor([-1.0, 0.0, 1.0])
    moved, band, _ = readout.apply(context, point, quantiles, None)
    expected = shape_forecast(point, torch.zeros_like(point), 0.5)
    torch.testing.assert_close(moved, expected)
    torch.testing.assert_close(moved[0, 0], torch.tensor([-1.0, -0.5, 0.0, 1.5]))
    torch.testing.assert_close(band[..., 2] - moved, torch.full_like(moved, 2.0))
    readout.save(str(tmp_path))
    loaded = PopulationReadout.load(str(tmp_path))
    assert (loaded.shape, loaded.shape_scale) == ("network", 0.5)
    torch.testing.assert_close(loaded.apply(context, point, quantiles, None)[0], moved)
    for bad in ({"shape": "course"}, {"shape_scale": 0.0}, {"shape_scale": float("nan")}):
        with pytest.raises(ValueError, match="shape"):
            PopulationReadout(np.zeros((2, 2)), np.zeros(2), 1, [1.0], validation_horizon=4, **bad)


def test_band_scale_narrows_a_band_too_wide_for_the_truth():
    """Offsets four times the true spread: the chosen factor brings the band back towards it and lowers the pinball
    loss; offsets already right keep factor 1; the factor is saved."""
    from calm_hf.adaptation import band_scales

    rng = np.random.default_rng(5)
    levels = (0.05, 0.25, 0.5, 0.75, 0.95)
    z = np.array([-1.645, -0.674, 0.0, 0.674, 1.645])
    point = np.zeros((20, 8, 12))
    truth = rng.standard_normal(point.shape)
    scale, loss = band_scales(point, np.broadcast_to(4 * z, point.shape + (5,)), levels, truth, 2)
    assert np.all(scale <= 0.5) and loss["scaled"] < loss["unscaled"]
    scale, _ = band_scales(point, np.broadcast_to(z, point.shape + (5,)), levels, truth, 2)
    np.testing.assert_allclose(scale, 1.0, atol=0.13)
    readout = PopulationReadout(np.zeros((2, 2)), np.zeros(2), 1, [1.0, 1.0], validation_horizon=4,
                                band_scale=[0.5, 2.0])
    quantiles = torch.tensor([-1.0, 0.0, 1.0]).expand(1, 2, 4, 3)
    moved = readout.apply(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), quantiles, None)[1]
    np.testing.assert_allclose(moved[0, 0, :, 2].numpy(), [0.5, 0.5, 2.0, 2.0])
    with pytest.raises(ValueError, match="band_scale must be 2 positive factors"):
        PopulationReadout(np.zeros((2, 2)), np.zeros(2), 1, [1.0, 1.0], validation_horizon=4, band_scale=[0.0, 1.0])


def test_the_dual_solution_is_the_primal_one():
    rng = np.random.default_rng(1)
    trials = rng.standard_normal((2, 30, 20))  # 2 * 16 transitions, 120 features
    features, targets = _lag_stack(trials, 4)
    assert isinstance(ridge_ar_system(trials, 4), _RidgeDual)
    assert isinstance(ridge_ar_system(rng.standard_normal((40, 3, 20)), 4), _RidgeGram)
    primal = _RidgeGram.from_chunks([(features, targets)])
    dual = _RidgeDual(features, targets)
    for alpha in (1e-3, 1.0):
        for a, b in zip(primal.solve(alpha), dual.solve(alpha)):
            np.testing.assert_allclose(a, b, atol=1e-8)


def test_readout_learns_a_coupled_population_and_its_ridge_is_the_baselines(forecaster, tmp_path):
    train, val, test = coupled_trials(seed=0), coupled_trials(8, seed=1), coupled_trials(8, seed=2)
    readout = fit_population_readout(forecaster, train, val, CONTEXT)
    # an untrained network against a well-posed linear system: validation hands the forecast to the ridge AR
    assert readout.network_weight.max() < 0.5
    assert readout.info["validation_mse"]["blend"] <= min(readout.info["validation_mse"].values()) + 1e-6
    ridge = RidgeARForecaster(context=CONTEXT, lags_grid=(1, 2, 4, 8, 16)).fit(train, val)
    horizon = test.shape[-1] - CONTEXT
    np.testing.assert_allclose(readout.predict_ridge(torch.from_numpy(test[:, :, :CONTEXT]), horizon).numpy(),
                               ridge.predict(test[:, :, :CONTEXT], horizon), atol=1e-4)

    plain = forecaster.forecast(test[:, :, :CONTEXT], horizon, reference=train)
    forecaster.population_readout = readout
    try:
        blended = forecaster.forecast(test[:, :, :CONTEXT], horizon, reference=train)
    finally:
        forecaster.population_readout = None
    truth = test[:, :, CONTEXT:]
    assert np.mean((blended.forecast - truth) ** 2) < np.mean((plain.forecast - truth) ** 2)
    # the band moves with the point forecast and keeps the network's spread, times the validation-chosen scale
    scale = readout.band_scales(horizon).numpy()[:, None]
    np.testing.assert_allclose(blended.quantiles - blended.forecast[..., None],
                               scale * (plain.quantiles - plain.forecast[..., None]), atol=1e-4)
    assert readout.info["validation_pinball"]["scaled"] <= readout.info["validation_pinball"]["unscaled"] + 1e-9

    readout.save(tmp_path)
    loaded = PopulationReadout.load(tmp_path)
    assert (tmp_path / READOUT_FILE).is_file() and loaded.lags == readout.lags and loaded.info == readout.info
    torch.testing.assert_close(loaded.weights, readout.weights)
    torch.testing.assert_close(loaded.network_weights(50), readout.network_weights(50))
    assert PopulationReadout.load(tmp_path / "nothing-here") is None


def test_readout_refuses_another_recording_and_bad_trials(forecaster):
    train, val = coupled_trials(seed=0), coupled_trials(8, seed=1)
    readout = fit_population_readout(forecaster, train, val, CONTEXT)
    forecaster.population_readout = readout
    try:
        with pytest.raises(ValueError, match="fitted to a 6-neuron recording and the context has 5 neurons"):
            forecaster.forecast(train[:2, :5, :CONTEXT], 8)
    finally:
        forecaster.population_readout = None
    with pytest.raises(ValueError, match="same recording"):
        fit_population_readout(forecaster, train, val[:, :5], CONTEXT)
    with pytest.raises(ValueError, match="NaN"):
        fit_population_readout(forecaster, np.full_like(train, np.nan), val, CONTEXT)
    with pytest.raises(ValueError, match="nothing to forecast"):
        fit_population_readout(forecaster, train, val, 48)


def test_readout_that_adds_nothing_leaves_the_network_forecast(forecaster):
    """Trials with no structure: validation keeps the network (weight 1) unless the ridge is genuinely better."""
    rng = np.random.default_rng(3)
    train, val = (rng.standard_normal((n, 4, 48)).astype(np.float32) for n in (4, 6))
    readout = fit_population_readout(forecaster, train, val, CONTEXT)
    network, ridge = readout.info["validation_mse"]["network"], readout.info["validation_mse"]["ridge_ar"]
    assert readout.info["validation_mse"]["blend"] <= min(network, ridge) + 1e-6


@pytest.fixture(scope="module")
def adapted_checkpoint(forecaster, tmp_path_factory):
    """The tiny data-identity model saved complete with a population readout of a 6-neuron recording, as
    `calm adapt` leaves it."""
    folder = tmp_path_factory.mktemp("adapted") / "calm-adapted"
    forecaster.model.save_pretrained(folder)
    complete_checkpoint(folder, tokenizer=forecaster.tokenizer)
    fit_population_readout(forecaster, coupled_trials(seed=0), coupled_trials(8, seed=1), CONTEXT).save(folder)
    return folder


def test_the_pipeline_applies_the_saved_readout(adapted_checkpoint):
    from transformers import pipeline

    traces = coupled_trials(1, frames=80, seed=5)[0] * 3 + 10
    with_readout = pipeline("neural-forecasting", model=str(adapted_checkpoint))
    assert with_readout.forecaster.population_readout is not None
    out = with_readout(traces, horizon=12, quantiles=(0.1, 0.9))
    with_readout.forecaster.population_readout = None
    plain = with_readout(traces, horizon=12, quantiles=(0.1, 0.9))
    assert not np.allclose(out["forecast"], plain["forecast"])
    readout = PopulationReadout.load(str(adapted_checkpoint))
    scale = readout.band_scales(12).numpy()  # the band keeps the network's spread, times the saved scale
    np.testing.assert_allclose(out["quantiles"][0.9] - out["forecast"],
                               scale * (plain["quantiles"][0.9] - plain["forecast"]), atol=1e-3)
    with_readout.forecaster.population_readout = readout
    with pytest.raises(ValueError, match="6-neuron recording"):
        with_readout(traces[:4], horizon=12)


@pytest.mark.slow
def test_the_remote_code_pipeline_applies_the_readout_without_calm_hf(adapted_checkpoint):
    traces = coupled_trials(1, frames=80, seed=5)[0] * 3 + 10
    np.save(adapted_checkpoint.parent / "traces.npy", traces)
    script = 'import sys; sys.modules["calm_hf"] = None  # a Python without calm_hf\n' + textwrap.dedent(
        f"""
        import numpy as np
        from transformers import pipeline
        forecaster = pipeline("neural-forecasting", model={str(adapted_checkpoint)!r}, trust_remote_code=True)
        assert type(forecaster).__module__.startswith("transformers_modules"), type(forecaster).__module__
        assert forecaster.forecaster.population_readout is not None
        out = forecaster(np.load({str(adapted_checkpoint.parent / "traces.npy")!r}), horizon=12)
        print("OK", out["forecast"].shape)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK (6, 12)" in result.stdout


@pytest.mark.parametrize("best", ["full", "no_coupling", "zero_shot"])
def test_adapt_reads_the_identity_whose_validation_forecast_is_best(forecaster, monkeypatch, tmp_path, best):
    from calm_hf import adaptation
    from calm_hf.adaptation import AdaptationSettings, adapt

    rank = forecaster.model.config.identity_rank
    seen = []

    def kind(identity) -> str:
        if identity.abs().sum() == 0:
            return "zero_shot"
        return "no_coupling" if identity[:, : 2 * rank].abs().sum() == 0 else "full"

    def scored(model_forecaster, val, context_frames, identity):  # a stand-in score: which identity was it?
        seen.append(kind(identity))
        return np.array([0.3, 0.31, 0.29, 0.3]) if seen[-1] == best else np.array([0.2, 0.22, 0.18, 0.2])

    monkeypatch.setattr(adaptation, "validation_trial_r", scored)
    settings = AdaptationSettings(max_steps=1, eval_every=1, patience=1)
    adapted, info = adapt(forecaster, coupled_trials(seed=0), coupled_trials(4, seed=1), CONTEXT, settings)
    assert seen[:3] == ["full", "no_coupling", "zero_shot"]  # every choice scored before fine-tuning
    assert info["identity"]["chosen"] == best and set(info["identity"]["validation_r"]) == set(seen[:3])
    config = forecaster.model.config  # the original is left untouched
    assert (config.identity_coupling, config.identity_reference) == (True, True)
    assert kind(adapted.neuron_identity(coupled_trials(seed=0))) == best
    assert adapted.model.config.identity_fixed and not config.identity_fixed
    adapted.model.save_pretrained(tmp_path)  # the choice travels with the checkpoint, and is not made again
    loaded = CalmForecaster(CalmForCausalNeuralModeling.from_pretrained(tmp_path), forecaster.tokenizer)
    assert kind(loaded.neuron_identity(coupled_trials(seed=0))) == best
    assert loaded.reference_identity(coupled_trials(seed=0), CONTEXT)[1] == {"chosen": None}
    _, info = adapt(forecaster, coupled_trials(seed=0), coupled_trials(4, seed=1), CONTEXT,
                    AdaptationSettings(max_steps=1, eval_every=1, patience=1, choose_identity=False))
    assert "identity" not in info


def test_a_tie_keeps_the_fuller_identity(forecaster, monkeypatch):
    from calm_hf import adaptation
    from calm_hf.adaptation import choose_identity

    monkeypatch.setattr(adaptation, "validation_trial_r", lambda *args: np.array([0.25, 0.3, 0.2]))
    chosen = choose_identity(CalmForecaster(CalmForCausalNeuralModeling(forecaster.model.config), forecaster.tokenizer),
                             coupled_trials(seed=0), coupled_trials(4, seed=1), CONTEXT)
    assert chosen["chosen"] == "full"


def test_a_lesser_identity_needs_a_gain_beyond_its_standard_error():
    from calm_hf.forecasting import pick_identity

    full = np.array([0.20, 0.25, 0.30, 0.35, 0.40])
    noisy = full + np.array([0.10, -0.08, 0.09, -0.07, 0.01])  # mean gain 0.01, standard error 0.04
    steady = full + np.array([0.05, 0.04, 0.06, 0.05, 0.05])
    assert pick_identity({"full": full, "no_coupling": noisy, "zero_shot": full}) == "full"
    assert pick_identity({"full": full, "no_coupling": noisy, "zero_shot": steady}) == "zero_shot"
    assert pick_identity({"full": full, "no_coupling": steady + 0.01, "zero_shot": steady}) == "no_coupling"
    with_nan = np.where(np.arange(5) == 0, np.nan, steady)
    assert pick_identity({"full": full, "no_coupling": with_nan, "zero_shot": full}) == "no_coupling"


def test_early_stopping_keeps_the_start_unless_a_gain_is_beyond_noise(forecaster, monkeypatch):
    from calm_hf import adaptation
    from calm_hf.adaptation import AdaptationSettings, adapt

    start = np.array([0.2, 0.3, 0.25, 0.35])
    # step 0, then two noisy gains in mean r (each resets the patience), then none
    draws = iter([start, start + [0.08, -0.06, 0.05, -0.05], start + [0.12, -0.07, 0.06, -0.07]] + [start] * 20)
    monkeypatch.setattr(adaptation, "validation_trial_r", lambda *args: next(draws))
    settings = AdaptationSettings(max_steps=4, eval_every=1, patience=2, choose_identity=False)
    _, info = adapt(forecaster, coupled_trials(seed=0), coupled_trials(4, seed=1), CONTEXT, settings)
    assert info["best_step"] == 0 and [step for step, _ in info["validation_history"]] == [0, 1, 2, 3, 4]
    draws = iter([start, start + 0.05] + [start] * 20)  # a gain on every trial is taken
    _, info = adapt(forecaster, coupled_trials(seed=0), coupled_trials(4, seed=1), CONTEXT, settings)
    assert info["best_step"] == 1


def test_a_forecaster_chooses_the_identity_on_a_split_of_its_reference(forecaster, monkeypatch):
    from calm_hf import forecasting

    reference = coupled_trials(seed=0)
    assert len(reference) >= forecasting.CHOICE_MIN_TRIALS
    identity, info = forecaster.reference_identity(reference, CONTEXT)
    assert info["chosen"] in forecasting.IDENTITY_CHOICES
    assert set(info["pearson_r"]) == set(forecasting.IDENTITY_CHOICES)
    assert torch.equal(identity, forecaster.neuron_identity(reference, choice=info["chosen"]))
    context = coupled_trials(2, seed=3)[:, :, :CONTEXT]
    np.testing.assert_allclose(forecaster.forecast(context, 8, reference=reference).forecast,
                               forecaster.forecast(context, 8, neuron_identity=identity).forecast, atol=1e-6)

    calls = []
    real = forecasting.pick_identity
    monkeypatch.setattr(forecasting, "pick_identity", lambda per_trial: calls.append(per_trial) or "zero_shot")
    identity, info = forecaster.reference_identity(reference, CONTEXT)
    assert info["chosen"] == "zero_shot" and identity.abs().sum() == 0
    halves = np.array_split(np.arange(len(reference)), 2)
    assert all(len(r) == sum(min(len(h), forecasting.CHOICE_MAX_TRIALS) for h in halves) for r in calls[0].values())
    monkeypatch.setattr(forecasting, "CHOICE_NEURON_TRIALS", 3 * reference.shape[1])  # a large recording: fewer trials
    calls.clear()
    forecaster.reference_identity(reference, CONTEXT)
    assert all(len(r) == 6 for r in calls[0].values())
    monkeypatch.setattr(forecasting, "pick_identity", real)

    for refused in (reference[:3], reference[:, :, : CONTEXT + 1]):  # too few trials; no frame after the context
        identity, info = forecaster.reference_identity(refused, CONTEXT)
        assert info == {"chosen": None} and torch.equal(identity, forecaster.neuron_identity(refused))
    off = CalmForecaster(forecaster.model, forecaster.tokenizer, choose_identity=False)
    assert off.reference_identity(reference, CONTEXT)[1] == {"chosen": None}
    assert forecaster.model.config.identity_coupling and forecaster.model.config.identity_reference  # untouched


def test_training_from_scratch_leaves_the_pretrained_models_config_alone(forecaster):
    """The scratch model gets a copy of the config: fitting it to one recording fixes its own identity only."""
    from calm_hf.adaptation import AdaptationSettings, train_from_scratch

    scratch, _ = train_from_scratch(forecaster, coupled_trials(seed=0), coupled_trials(4, seed=1), CONTEXT,
                                    AdaptationSettings(max_steps=1, eval_every=1, patience=1))
    assert scratch.model.config.identity_fixed and not forecaster.model.config.identity_fixed
    assert forecaster.reference_identity(coupled_trials(seed=0), CONTEXT)[1]["chosen"] is not None
