"""The pretraining corpus: simulated regimes, shards, the stream, the collator's identity column, context baselines
and probabilistic scores."""

import json

import numpy as np
import pytest
import torch

from calm_hf.baselines.context import ContextARForecaster, LastSecondMeanForecaster
from calm_hf.data import CalmDataCollator, SimulationConfig, simulate_session
from calm_hf.data.corpus import OUT_OF_RANGE, SIMULATION_RANGES, CorpusSpec, build_corpus, draw_simulation_config
from calm_hf.data.streaming import CalmCorpusStream
from calm_hf.metrics.probabilistic import (
    CRPS_LEVELS,
    interval_coverage,
    quantile_crps,
    residual_quantiles,
    residual_scale,
)

SMALL = dict(num_neurons=12, num_trials=6, num_steps=30)


def test_regimes_are_off_by_default_and_change_the_session_when_on():
    plain = simulate_session(SimulationConfig(seed=3, **SMALL))
    again = simulate_session(SimulationConfig(seed=3, **SMALL, shared_input_dims=2, shared_input_std=0.0))
    np.testing.assert_array_equal(plain.traces, again.traces)  # a regime with zero strength is no regime
    for regime in (dict(shared_input_dims=2, shared_input_std=0.8), dict(connectivity_rank=2, connectivity_rank_gain=1.2),
                   dict(rate_heterogeneity=0.7), dict(baseline_drift_std=0.3), dict(continuous=True)):
        changed = simulate_session(SimulationConfig(seed=3, **SMALL, **regime))
        assert changed.traces.shape == plain.traces.shape
        assert not np.allclose(changed.traces, plain.traces), regime


def test_continuous_sessions_carry_over_between_consecutive_trials():
    config = SimulationConfig(seed=1, num_neurons=20, num_trials=16, num_steps=20, continuous=True,
                              calcium_decay_s=3.0, calcium_noise_std=0.0)
    traces = simulate_session(config).traces
    # consecutive trials of one run join up: the last frame of trial j is close to the first of trial j + 1
    # (4 runs of 4 trials: pairs inside a run), unlike independent restarts
    pairs = [(j, j + 1) for j in range(15) if (j + 1) % 4]
    joined = np.mean([np.abs(traces[b, :, 0] - traces[a, :, -1]).mean() for a, b in pairs])
    independent = simulate_session(SimulationConfig(seed=1, num_neurons=20, num_trials=16, num_steps=20,
                                                    calcium_decay_s=3.0, calcium_noise_std=0.0)).traces
    restarted = np.mean([np.abs(independent[b, :, 0] - independent[a, :, -1]).mean() for a, b in pairs])
    assert joined < 0.5 * restarted


def test_substeps_zero_follows_tau_and_negative_is_refused():
    assert SimulationConfig(dt=0.5, tau=0.25, substeps=0).num_substeps == 20
    assert SimulationConfig(dt=1 / 30, tau=1.0, substeps=0).num_substeps == 1
    with pytest.raises(ValueError, match="substeps must be >= 1, or 0"):
        SimulationConfig(substeps=-1)


def test_draws_stay_inside_their_ranges_and_out_of_range_draws_leave_them():
    for index in range(40):
        rng = np.random.default_rng([7, index])
        config = draw_simulation_config(rng, name=f"s{index}", seed=index)
        low, high = SIMULATION_RANGES["num_neurons"][1:]
        assert low <= config.num_neurons <= high
        assert SIMULATION_RANGES["gain"][1] <= config.gain <= SIMULATION_RANGES["gain"][2]
        assert config.calcium_rise_s < config.calcium_decay_s
        outside = draw_simulation_config(np.random.default_rng([7, index]), name="o", seed=index, out_of_range=True)
        assert outside.gain >= OUT_OF_RANGE["gain"][1] and outside.num_neurons >= 1024


def _correlation_carry_over(traces: np.ndarray) -> float:
    """Mean similarity (Pearson r) between the neuron-pair correlations of every two trials."""
    pairs = np.triu_indices(traces.shape[1], 1)
    structure = [np.corrcoef(trial)[pairs] for trial in traces]
    return float(np.mean([np.corrcoef(structure[i], structure[j])[0, 1]
                          for i in range(len(structure)) for j in range(i + 1, len(structure))]))


@pytest.mark.parametrize("continuous", [False, True])
def test_trial_loadings_make_which_neurons_co_vary_change_between_trials(continuous):
    shared = dict(seed=2, num_neurons=24, num_trials=12, num_steps=80, gain=0.5, shared_input_dims=1,
                  shared_input_std=1.5, calcium_noise_std=0.05, continuous=continuous)
    session_loadings = simulate_session(SimulationConfig(**shared)).traces
    np.testing.assert_array_equal(session_loadings,
                                  simulate_session(SimulationConfig(**shared, trial_loading_mix=0.0)).traces)
    per_trial = simulate_session(SimulationConfig(**shared, trial_loading_mix=1.0)).traces
    assert per_trial.shape == session_loadings.shape and np.isfinite(per_trial).all()
    assert _correlation_carry_over(session_loadings) > 0.6  # the same neurons co-vary in every trial
    assert abs(_correlation_carry_over(per_trial)) < 0.15  # and here they do not
    with pytest.raises(ValueError, match="trial_loading_mix must lie in"):
        SimulationConfig(trial_loading_mix=1.5)


def test_trial_loading_draws_leave_every_other_draw_as_it_was():
    from calm_hf.data.corpus import TRIAL_LOADING_RANGES

    switched = 0
    for index in range(30):
        before = draw_simulation_config(np.random.default_rng([3, index]), name="s", seed=index)
        assert before.trial_loading_mix == 0.0
        after = draw_simulation_config(np.random.default_rng([3, index]), name="s", seed=index,
                                       trial_loading_chance=1.0)
        changed = {key for key, value in vars(after).items() if vars(before)[key] != value}
        assert changed <= set(TRIAL_LOADING_RANGES) and "trial_loading_mix" in changed
        low, high = TRIAL_LOADING_RANGES["trial_loading_mix"][1:]
        assert low <= after.trial_loading_mix <= high
        assert after.shared_input_dims >= 1 and after.shared_input_std >= TRIAL_LOADING_RANGES["shared_input_std"][1]
        half = draw_simulation_config(np.random.default_rng([3, index]), name="s", seed=index,
                                      trial_loading_chance=0.5)
        switched += half.trial_loading_mix > 0
    assert 5 <= switched <= 25
    with pytest.raises(ValueError, match="trial_loading_chance must lie in"):
        CorpusSpec(trial_loading_chance=-0.1)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    spec = CorpusSpec(num_simulated_sessions=3, trials_per_session=8, trial_seconds=8.0, max_stored_neurons=10,
                      real_recordings=[], sessions_per_shard=2, seed=5)
    manifest = build_corpus(spec, folder)
    return folder, manifest


def test_corpus_shards_hold_every_session_once_with_global_session_ids(tiny_corpus):
    import datasets

    folder, manifest = tiny_corpus
    assert json.loads((folder / "corpus.json").read_text()) == manifest
    assert manifest["num_sessions"] == 3 and len(manifest["simulation_configs"]) == 3
    seen = {}
    for shard in manifest["shards"]:
        corpus = datasets.load_from_disk(str(folder / shard["path"]))
        for row in corpus["train"]:
            seen.setdefault(row["session_name"], set()).add(row["session_id"])
            assert row["neuron_ids"] == list(range(len(row["input_values"])))  # local ids
            assert len(row["input_values"]) <= 10  # max_stored_neurons
    assert sorted(seen) == sorted(manifest["simulation_configs"])
    assert sorted(i for ids in seen.values() for i in ids) == [0, 1, 2]


def test_corpus_spec_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="unknown real recordings"):
        CorpusSpec(real_recordings=["park/nobody"])
    with pytest.raises(ValueError, match="would be empty"):
        CorpusSpec(num_simulated_sessions=0, real_recordings=[])
    with pytest.raises(ValueError, match="trials_per_session must be >= 3"):
        CorpusSpec(trials_per_session=2)


def test_stream_is_deterministic_and_references_exclude_the_streamed_trial(tiny_corpus):
    folder, _ = tiny_corpus
    seen_references = []

    def identity(reference, num_neurons):
        seen_references.append(None if reference is None else reference.clone())
        count = 0 if reference is None else reference.shape[0]
        return torch.full((num_neurons, 2), float(count))

    stream = CalmCorpusStream(folder, max_neurons=4, reference_trials=(0, 3), identity_fn=identity, seed=1, passes=1)
    first, second = list(stream), list(CalmCorpusStream(folder, max_neurons=4, reference_trials=(0, 3),
                                                         identity_fn=identity, seed=1, passes=1))
    assert len(first) == sum(1 for _ in range(len(first)))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["input_values"], b["input_values"])
        torch.testing.assert_close(a["neuron_identity"], b["neuron_identity"])
    counts = {int(example["neuron_identity"][0, 0]) for example in first}
    assert counts == {0, 3}
    for example, reference in zip(first, seen_references):
        assert example["input_values"].shape[0] <= 4
        if reference is not None:  # never the streamed trial itself
            assert not any(np.allclose(ref.numpy(), example["input_values"]) for ref in reference)


def test_collator_pads_identity_and_crops_to_the_shortest_row():
    rows = [
        {"input_ids": np.zeros((3, 5), np.int64), "input_values": np.ones((3, 20), np.float32),
         "neuron_identity": np.ones((3, 2), np.float32), "session_id": 0},
        {"input_ids": np.zeros((2, 3), np.int64), "input_values": np.ones((2, 12), np.float32),
         "neuron_identity": np.full((2, 2), 2.0, np.float32), "session_id": 1},
    ]
    batch = CalmDataCollator(with_values=True, crop_to_shortest=True, window_size=4)(rows)
    assert batch["input_ids"].shape == (2, 3, 3) and batch["value_labels"].shape == (2, 3, 12)
    assert batch["neuron_identity"].shape == (2, 3, 2)
    assert float(batch["neuron_identity"][1, 2].abs().sum()) == 0.0  # padding
    with pytest.raises(ValueError, match="different numbers of token steps"):
        CalmDataCollator(with_values=True)(rows)


def test_context_baselines_forecast_from_the_context_alone():
    rng = np.random.default_rng(0)
    # an AR(1) per neuron with a different coefficient each: the context AR recovers the decay toward the mean
    coefficients = np.array([0.9, 0.5, -0.3])
    trials = np.zeros((30, 3, 60))
    trials[:, :, 0] = rng.standard_normal((30, 3))
    for t in range(1, 60):
        trials[:, :, t] = coefficients * trials[:, :, t - 1] + 0.3 * rng.standard_normal((30, 3))
    ar = ContextARForecaster(context=40).fit(None, trials[:15])
    pred = ar.predict(trials[15:, :, :40], 5)
    expected = trials[15:, :, 39:40] * coefficients[None, :, None] ** np.arange(1, 6)
    assert np.abs(pred[:, :, 0] - expected[:, :, 0]).mean() < 0.15
    flat = LastSecondMeanForecaster(context=40, frame_rate_hz=5.0).fit(None, trials[:15]).predict(trials[15:, :, :40], 4)
    np.testing.assert_allclose(flat[:, :, 0], trials[15:, :, 35:40].mean(-1), rtol=1e-5)
    assert (flat == flat[:, :, :1]).all()
    with pytest.raises(ValueError, match="pass val_trials"):
        ContextARForecaster().fit(trials, None)


def test_probabilistic_scores_reward_calibration():
    rng = np.random.default_rng(0)
    truth = rng.standard_normal((200, 4, 10))
    pred = np.zeros_like(truth)
    good = residual_quantiles(pred, residual_scale(pred, truth))
    narrow = residual_quantiles(pred, 0.3 * residual_scale(pred, truth))
    lower, upper = CRPS_LEVELS.index(0.05), CRPS_LEVELS.index(0.95)
    assert abs(interval_coverage(good[lower], good[upper], truth) - 0.9) < 0.03
    assert interval_coverage(narrow[lower], narrow[upper], truth) < 0.5
    assert quantile_crps(good, CRPS_LEVELS, truth) < quantile_crps(narrow, CRPS_LEVELS, truth)
    # the CRPS of N(0, 1) forecasts of N(0, 1) truth is 1 / sqrt(pi) = 0.564 (the grid approximates it from below)
    assert 0.5 < quantile_crps(good, CRPS_LEVELS, truth) < 0.6
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        quantile_crps(good[:2], (0.0, 0.5), truth)


def test_context_ar_never_explodes():
    rng = np.random.default_rng(3)
    # random walks: a least-squares AR on 40 frames of them is often explosive; the rollout must stay bounded
    trials = rng.standard_normal((20, 6, 100)).cumsum(axis=-1)
    pred = ContextARForecaster(context=40).fit(None, trials[:10]).predict(trials[10:, :, :40], 60)
    assert np.isfinite(pred).all() and np.abs(pred).max() < 10 * np.abs(trials).max()
