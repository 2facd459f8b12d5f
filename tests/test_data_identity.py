"""Data-identity CalM (`neuron_identity="data"`): identities computed from reference activity, the coupling mixer,
the quantile head, and the guarantees every CalM keeps (causality, neuron permutation, cache, save/load)."""

import numpy as np
import pytest
import torch

from calm_hf import CalmConfig, CalmForCausalNeuralModeling, CalmModel
from calm_hf.identity_calm import (
    EXACT_COUPLING_NEURONS,
    compute_neuron_identity,
    config_identity_size,
    coupling_factors,
    coupling_skill_features,
    highway_statistics,
    highway_weights,
    identity_settings,
    identity_size,
    neuron_statistics,
)

RANK = 4


def data_config(**overrides) -> CalmConfig:
    # the per-neuron highway is off in the presets; these tests cover it where the identity allows it
    highway = overrides.get("neuron_identity", "data") == "data"
    return CalmConfig.from_preset("tiny", **{"hidden_dropout": 0.0, "identity_rank": RANK, "identity_highway": highway,
                                             "quantile_levels": [0.1, 0.5, 0.9], **overrides})


def model_and_inputs(neurons=6, steps=6, batch=2, seed=0):
    torch.manual_seed(seed)
    config = data_config()
    model = CalmForCausalNeuralModeling(config).eval()
    for layer in model.model.layers:  # a trained model's coupling mixers are not zero
        torch.nn.init.normal_(layer.coupling.o_proj.weight, std=0.2)
    ids = torch.randint(0, config.vocab_size, (batch, neurons, steps))
    values = torch.randn(batch, neurons, steps * config.window_size)
    identity = compute_neuron_identity(torch.randn(5, neurons, 32), neurons, **identity_settings(config))
    identity = identity.expand(batch, -1, -1)
    return model, ids, values, identity


def test_identity_recovers_a_planted_coupling_and_is_empty_without_reference():
    rng = np.random.default_rng(0)
    neurons, window = 8, 4
    # neuron 0's window means drive neuron 1's next one: the strongest coupling component links them
    means = rng.standard_normal((200, neurons, 12))
    for t in range(1, 12):
        means[:, 1, t] += 0.9 * means[:, 0, t - 1]
    traces = torch.as_tensor(np.repeat(means, window, axis=-1), dtype=torch.float32)
    receives, drives, samples = coupling_factors(traces, window, rank=2, ridge=0.1)
    assert samples == 200 * 11
    coupling = drives @ receives.T  # (in, out)
    assert coupling[0, 1] > 0.7 and coupling.abs().flatten().argmax() == 1  # weight of 0 on 1
    assert torch.all(drives.sum(0) >= 0)  # the sign convention
    empty = compute_neuron_identity(None, 5, RANK)
    assert empty.shape == (5, identity_size(RANK)) and float(empty.abs().sum()) == 0.0
    full = compute_neuron_identity(traces, neurons, RANK, window, 0.1)
    assert float(full[0, -1]) == 1.0  # "has a reference"


def test_large_populations_take_the_principal_component_path():
    traces = torch.randn(3, EXACT_COUPLING_NEURONS + 5, 16)
    identity = compute_neuron_identity(traces, EXACT_COUPLING_NEURONS + 5, RANK)
    assert identity.shape == (EXACT_COUPLING_NEURONS + 5, identity_size(RANK))
    assert torch.isfinite(identity).all()


def test_statistics_are_the_autocorrelation_level_and_spread():
    rng = np.random.default_rng(1)
    slow = np.cumsum(rng.standard_normal((4, 1, 400)), axis=-1) * 0.05
    fast = rng.standard_normal((4, 1, 400))
    stats = neuron_statistics(torch.as_tensor(np.concatenate([slow, fast + 2.0], axis=1), dtype=torch.float32))
    assert stats[0, 0] > 0.9 and abs(float(stats[1, 0])) < 0.2  # lag-1 autocorrelation
    assert abs(float(stats[1, 6]) - 2.0) < 0.1  # mean


def test_identity_refuses_bad_references():
    with pytest.raises(ValueError, match="neurons=4"):
        compute_neuron_identity(torch.randn(2, 3, 16), 4, RANK)
    with pytest.raises(ValueError, match="NaN/Inf"):
        compute_neuron_identity(torch.full((2, 4, 16), float("nan")), 4, RANK)
    with pytest.raises(ValueError, match="two token windows"):
        compute_neuron_identity(torch.randn(2, 4, 5), 4, RANK)


def test_loss_quantiles_and_every_head_backpropagate():
    model, ids, values, identity = model_and_inputs()
    model.train()
    out = model(input_ids=ids, labels=ids, value_labels=values, neuron_identity=identity)
    torch.testing.assert_close(out.loss, out.next_token_loss + out.value_loss + out.quantile_loss)
    out.loss.backward()
    for name in ("model.identity_proj.weight", "quantile_head.weight", "model.layers.0.coupling.o_proj.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    # the quantile head does not pull the point forecast: its loss reaches no value-head weight
    model.zero_grad()
    model(input_ids=ids, value_labels=values, neuron_identity=identity).quantile_loss.backward()
    assert model.value_head.weight.grad is None or float(model.value_head.weight.grad.abs().sum()) == 0.0


def test_pinball_loss_is_minimised_by_the_true_quantiles():
    model, ids, values, identity = model_and_inputs(neurons=3, steps=4)
    steps, windows = ids.shape[-1], model.config.value_head_steps
    targets = torch.randn(2, 3, steps * model.config.window_size)
    point = torch.zeros(2, 3, steps, windows * model.config.window_size)
    constant = torch.zeros(2, 3, steps, windows, 3)
    spread = constant + torch.tensor([-1.2816, 0.0, 1.2816])  # N(0, 1) quantiles at 0.1, 0.5, 0.9
    assert model.quantile_loss(spread, point, targets, None) < model.quantile_loss(constant, point, targets, None)


def test_forecast_quantiles_never_cross_and_bracket_the_point_forecast():
    model, ids, values, identity = model_and_inputs()
    forecast, quantiles = model.forecast_values(ids, context_values=values, neuron_identity=identity,
                                                return_quantiles=True)
    assert quantiles.shape == (*forecast.shape, 3)
    assert torch.all(quantiles.diff(dim=-1) >= 0)


def test_causal_in_time_and_equivariant_under_neuron_permutation():
    model, ids, values, identity = model_and_inputs(neurons=5, steps=6)
    logits = model(input_ids=ids, neuron_identity=identity).logits
    changed = ids.clone()
    changed[:, :, 4:] = (changed[:, :, 4:] + 1) % model.config.vocab_size
    torch.testing.assert_close(model(input_ids=changed, neuron_identity=identity).logits[:, :, :4], logits[:, :, :4])
    permutation = torch.tensor([3, 0, 4, 1, 2])
    permuted = model(input_ids=ids[:, permutation], neuron_identity=identity[:, permutation]).logits
    torch.testing.assert_close(permuted, logits[:, permutation], rtol=1e-5, atol=1e-5)
    # the identity carries information: shuffling it across neurons changes the outputs
    shuffled = model(input_ids=ids[:, permutation], neuron_identity=identity).logits
    assert not torch.allclose(shuffled, logits[:, permutation], atol=1e-4)


def test_cache_gives_the_full_pass_and_sdpa_equals_eager():
    model, ids, values, identity = model_and_inputs()
    full = model(input_ids=ids, neuron_identity=identity).logits
    first = model(input_ids=ids[:, :, :4], neuron_identity=identity, use_cache=True)
    second = model(input_ids=ids[:, :, 4:], neuron_identity=identity, cache=first.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=2), full, rtol=1e-5, atol=1e-5)
    model.config._attn_implementation = "eager"  # the same weights under the eager kernels
    torch.testing.assert_close(model(input_ids=ids, neuron_identity=identity).logits, full, rtol=1e-5, atol=1e-5)


def test_any_neuron_count_zero_shot_and_generate(tmp_path):
    model, ids, values, identity = model_and_inputs()
    for neurons in (1, 300):
        grid = torch.randint(0, model.config.vocab_size, (1, neurons, 4))
        assert model(input_ids=grid).logits.shape[:3] == (1, neurons, 4)  # no ids, no identity: zero-shot
    codes = model.generate(input_ids=ids, neuron_identity=identity[0], max_new_tokens=2, do_sample=True,
                           num_return_sequences=3)
    assert codes.shape == (6, ids.shape[1], ids.shape[2] + 2)
    model.save_pretrained(tmp_path)
    loaded = CalmForCausalNeuralModeling.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids=ids, neuron_identity=identity).logits,
                               model(input_ids=ids, neuron_identity=identity).logits, rtol=0, atol=0)
    backbone = CalmModel.from_pretrained(tmp_path)
    assert backbone.identity_proj is not None and backbone.neuron_embeddings is None


def test_data_models_refuse_tables_and_table_models_refuse_identities():
    model, ids, values, identity = model_and_inputs()
    with pytest.raises(ValueError, match="no session or neuron tables"):
        model.add_session("new", 4)
    with pytest.raises(ValueError, match=r"shape \(batch, neurons, identity_size\)"):
        model(input_ids=ids, neuron_identity=identity[:, :, :3])
    assert identity.shape[-1] == config_identity_size(model.config)
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.forecast_values(ids, context_values=values, neuron_identity=identity * float("nan"))
    table = CalmForCausalNeuralModeling(data_config(neuron_identity="table", quantile_levels=None))
    with pytest.raises(ValueError, match="learned table rows"):
        table(input_ids=ids, neuron_identity=identity)
    with pytest.raises(ValueError, match="no quantile head"):
        table.eval().forecast_values(ids, context_values=values, return_quantiles=True)


def test_the_per_neuron_highway_is_the_shared_one_without_reference_and_each_neurons_own_with_much():
    rng = np.random.default_rng(0)
    window, lookback_windows, horizon_windows = 4, 2, 2
    # two neurons with opposite AR(1) coefficients: one shared map cannot forecast both
    coefficients = np.array([0.9, -0.6])
    trials = np.zeros((400, 2, 40))
    for t in range(1, 40):
        trials[:, :, t] = coefficients * trials[:, :, t - 1] + rng.standard_normal((400, 2))
    statistics = highway_statistics(torch.as_tensor(trials, dtype=torch.float32), window, lookback_windows,
                                    horizon_windows)
    weight, bias = torch.zeros(8, 8), torch.zeros(8)
    none = highway_weights(torch.zeros_like(statistics), weight, bias, torch.tensor(50.0), window)
    torch.testing.assert_close(none, torch.zeros(2, 9, 8))  # the shared map (zero here), whatever the prior
    fitted = highway_weights(statistics, weight, bias, torch.tensor(1e-3), window)
    # the newest frame's weight on the next frame is each neuron's own coefficient
    newest = lookback_windows * window - 1
    assert abs(float(fitted[0, newest, 0]) - 0.9) < 0.05 and abs(float(fitted[1, newest, 0]) + 0.6) < 0.05
    shrunk = highway_weights(statistics, weight, bias, torch.tensor(1e7), window)
    assert float(shrunk.abs().max()) < 0.05  # a strong prior keeps the shared map


def test_the_identity_carries_the_highway_statistics_the_config_asks_for():
    config = data_config()
    assert config.identity_highway and config_identity_size(config) == identity_size(
        RANK, config.value_skip_windows, config.value_head_steps, config.window_size)
    assert not CalmConfig.from_preset("tiny", neuron_identity="table").identity_highway
    with pytest.raises(ValueError, match="identity_highway=True"):
        CalmConfig.from_preset("tiny", neuron_identity="table", identity_highway=True)


def test_coupling_skill_is_positive_for_a_coupling_that_carries_over_and_not_for_one_that_does_not():
    """The cross-validated skill: a planted drive from neuron 0 to neuron 1 forecasts held-out trials (skill of neuron
    1 well above 0); a correlation that changes sign from trial to trial fits each fold and fails on the other (skill
    below 0); with one reference trial there is nothing to cross-validate (zeros)."""
    rng = np.random.default_rng(0)
    window, trials, steps = 4, 40, 12
    means = rng.standard_normal((trials, 4, steps))
    for t in range(1, steps):
        means[:, 1, t] += 0.9 * means[:, 0, t - 1]
    sign = np.where(np.arange(trials) % 2 == 0, 1.0, -1.0)  # the two folds see opposite couplings
    for t in range(1, steps):
        means[:, 3, t] += 0.9 * sign * means[:, 2, t - 1]
    traces = torch.as_tensor(np.repeat(means, window, axis=-1), dtype=torch.float32)
    skill = coupling_skill_features(traces, window, ridge=0.1)
    assert skill.shape == (4, 2)
    assert skill[1, 0] > 0.3 and skill[3, 0] < -0.3 and abs(float(skill[0, 0])) < 0.1
    assert torch.allclose(skill[:, 1], skill[:, 0].mean().expand(4))
    assert float(coupling_skill_features(traces[:1], window).abs().sum()) == 0.0
    # above EXACT_COUPLING_NEURONS the fit goes through principal components, with finite values
    wide = coupling_skill_features(torch.randn(4, EXACT_COUPLING_NEURONS + 5, 16), window)
    assert wide.shape == (EXACT_COUPLING_NEURONS + 5, 2) and torch.isfinite(wide).all()


def test_a_model_with_the_coupling_skill_reads_it_from_its_identity(tmp_path):
    config = data_config(identity_coupling_skill=True)
    assert config_identity_size(config) == identity_size(RANK, config.value_skip_windows, config.value_head_steps,
                                                         config.window_size, coupling_skill=True)
    identity = compute_neuron_identity(torch.randn(5, 6, 32), 6, **identity_settings(config))
    assert identity.shape == (6, config_identity_size(config))
    model = CalmForCausalNeuralModeling(config).eval()
    assert model.model.identity_proj.in_features == identity_size(RANK, coupling_skill=True)
    ids = torch.randint(0, config.vocab_size, (1, 6, 4))
    changed = identity.clone()
    changed[:, identity_size(RANK) : identity_size(RANK, coupling_skill=True)] += 1.0
    assert not torch.allclose(model(input_ids=ids, neuron_identity=identity[None]).logits,
                              model(input_ids=ids, neuron_identity=changed[None]).logits)
    model.save_pretrained(tmp_path)
    assert CalmForCausalNeuralModeling.from_pretrained(tmp_path).config.identity_coupling_skill
    with pytest.raises(ValueError, match="identity_coupling_skill=True"):
        CalmConfig.from_preset("tiny", neuron_identity="table", identity_coupling_skill=True)
    assert not CalmConfig.from_preset("tiny", neuron_identity="table").identity_coupling_skill


@pytest.mark.parametrize("shape", [(40, 300), (300, 40), (30, 30)])
def test_principal_axes_span_the_top_singular_subspace(shape):
    from calm_hf.identity_calm import principal_axes

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(shape[0], 12, dtype=torch.float64, generator=generator) @ torch.randn(
        12, shape[1], dtype=torch.float64, generator=generator)  # rank 12: directions beyond it carry nothing
    inputs += 1e-3 * torch.randn(*shape, dtype=torch.float64, generator=generator)
    axes = principal_axes(inputs, 8)
    reference = torch.linalg.svd(inputs, full_matrices=False)[2][:8].T
    torch.testing.assert_close(axes.T @ axes, torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(axes @ axes.T, reference @ reference.T)
    # a rank-deficient input keeps only the directions it has
    assert principal_axes(inputs[:, :1].expand(-1, shape[1]).contiguous(), 8).shape[1] == 1


@pytest.mark.parametrize("shape", [(60, 60), (20, 70), (70, 20)])
def test_top_singular_triplets_equal_the_svds(shape):
    from calm_hf.identity_calm import top_singular_triplets

    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(*shape, dtype=torch.float64, generator=generator)
    left, singular, right = top_singular_triplets(matrix, 6)
    u, s, vt = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(singular, s[:6])
    signs = torch.sign((left * u[:, :6]).sum(0))  # singular vectors are defined up to a sign per pair
    torch.testing.assert_close(left, u[:, :6] * signs)
    torch.testing.assert_close(right, vt[:6].T * signs)
    assert top_singular_triplets(torch.zeros(5, 5, dtype=torch.float64), 3)[1].numel() == 0  # nothing to keep


def test_an_identity_without_coupling_zeroes_the_factors_and_keeps_everything_else():
    reference = torch.randn(6, 8, 32)
    settings = identity_settings(data_config(identity_coupling_skill=True))
    full = compute_neuron_identity(reference, 8, **settings)
    settings["coupling"] = False
    plain = compute_neuron_identity(reference, 8, **settings)
    assert full[:, : 2 * RANK].abs().sum() > 0 and plain[:, : 2 * RANK].abs().sum() == 0
    torch.testing.assert_close(plain[:, 2 * RANK :], full[:, 2 * RANK :])  # statistics, reliability, skill
    assert identity_settings(data_config(identity_coupling=False))["coupling"] is False
    settings["use_reference"] = False  # the zero-shot identity whatever the reference
    torch.testing.assert_close(compute_neuron_identity(reference, 8, **settings),
                               compute_neuron_identity(None, 8, **settings))
