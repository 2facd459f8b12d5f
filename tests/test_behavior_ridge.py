"""CalmBehaviorRidgeReadout: closed-form fit, validation-only choices, save/load, causality, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calm_hf.behavior_readout import READOUT_FILE, CalmBehaviorRidgeReadout, frame_token_index
from calm_hf.configuration_calm import CalmConfig
from calm_hf.modeling_calm_behavior import CalmForBehaviorRegression

WINDOW, NEURONS, STEPS, HIDDEN = 4, 5, 4, 8
FRAMES = STEPS * WINDOW


def synthetic(trials: int, seed: int, noise: float = 0.05):
    """Traces, hidden states and behaviour whose channel 0 is a lag-2 map of the traces and channel 1 reads the
    neuron-mean hidden state of the last token complete at each frame."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((trials, NEURONS, FRAMES))
    hidden = rng.standard_normal((trials, NEURONS, STEPS, HIDDEN))
    lag_map = np.random.default_rng(99).standard_normal((NEURONS, 2))
    hidden_map = np.random.default_rng(98).standard_normal(HIDDEN)
    behavior = np.zeros((trials, 2, FRAMES))
    behavior[:, 0] = np.einsum("bnt,n->bt", values, lag_map[:, 0])
    behavior[:, 0, 1:] += np.einsum("bnt,n->bt", values[..., :-1], lag_map[:, 1])
    tokens = frame_token_index(FRAMES, WINDOW)
    pooled = hidden.mean(axis=1) @ hidden_map  # (trials, steps)
    behavior[:, 1] = np.where(tokens >= 0, pooled[:, np.clip(tokens, 0, None)], 0.0)
    behavior += noise * rng.standard_normal(behavior.shape)
    return values, hidden, behavior


def fitted(**settings) -> tuple[CalmBehaviorRidgeReadout, tuple]:
    train, val, test = synthetic(60, 0), synthetic(20, 1), synthetic(20, 2)
    readout = CalmBehaviorRidgeReadout(window_size=WINDOW, **settings)
    readout.fit(train[0], train[2], val[0], val[2], train[1], val[1])
    return readout, test


def r2_per_channel(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    error = ((pred - truth) ** 2).sum(axis=(0, 2))
    return 1 - error / ((truth - truth.mean(axis=(0, 2), keepdims=True)) ** 2).sum(axis=(0, 2))


def test_closed_form_fit_recovers_known_linear_map_and_needs_the_backbone_block():
    readout, (values, hidden, behavior) = fitted()
    r2 = r2_per_channel(readout.predict(values, hidden), behavior)
    assert (r2 > 0.97).all(), r2
    assert readout.search_log_["chosen"]["reduction"] == "pooled"
    assert readout.search_log_["chosen"]["lags"] >= 2
    # traces alone cannot decode the channel that lives in the hidden states
    traces_only, _ = fitted(reductions=())
    r2_traces = r2_per_channel(traces_only.predict(values), behavior)
    assert r2_traces[0] > 0.97 and r2_traces[1] < 0.2
    # the lag map itself: weights of neuron n at lag 0 and lag 1 (blocks of `NEURONS` columns)
    lag_map = np.random.default_rng(99).standard_normal((NEURONS, 2))
    np.testing.assert_allclose(readout.weights_[:NEURONS, 0], lag_map[:, 0], atol=0.05)
    np.testing.assert_allclose(readout.weights_[NEURONS : 2 * NEURONS, 0], lag_map[:, 1], atol=0.05)


def test_penalty_and_design_are_chosen_on_validation_trials():
    train, val = synthetic(60, 0), synthetic(20, 1)
    grid = (1e-3, 1.0, 100.0)

    def fit(val_behavior, alpha_grid=grid):
        return CalmBehaviorRidgeReadout(lags_grid=(2,), reductions=("pooled",), hidden_weights=(1.0,),
                                        alpha_grid=alpha_grid, window_size=WINDOW).fit(
            train[0], train[2], val[0], val_behavior, train[1], val[1])

    readout = fit(val[2])
    # each channel's penalty is the grid point with the lowest validation MSE of a readout fitted with that alone
    single = [fit(val[2], alpha_grid=(alpha,)) for alpha in grid]
    val_mse = np.array([((r.predict(val[0], val[1]) - val[2]) ** 2).mean(axis=(0, 2)) for r in single])
    assert readout.alphas_ == [grid[i] for i in val_mse.argmin(axis=0)]
    assert readout.alphas_ == [1e-3, 1e-3]
    # validation behaviour unrelated to the features: the strongest penalty wins, whatever the training trials say
    noise = np.random.default_rng(5).standard_normal(val[2].shape)
    assert fit(noise).alphas_ == [100.0, 100.0]
    assert len(readout.search_log_["results"]) == 1 and readout.search_log_["chosen"]["alpha"] == readout.alphas_


def test_save_load_roundtrip_is_exact(tmp_path):
    for settings in ({}, {"reductions": ("neuron_pca",), "pca_sizes": (3,)}, {"reductions": ()}):
        readout, (values, hidden, _) = fitted(**settings)
        path = readout.save(tmp_path / str(len(settings)))
        assert path.endswith(READOUT_FILE)
        loaded = CalmBehaviorRidgeReadout.load(tmp_path / str(len(settings)))
        np.testing.assert_array_equal(loaded.predict(values, hidden), readout.predict(values, hidden))
        assert loaded.search_log_["chosen"] == readout.search_log_["chosen"]
        assert loaded.causal == readout.causal and loaded.reductions == readout.reductions
    assert CalmBehaviorRidgeReadout.load(tmp_path / "missing") is None


def test_later_frames_do_not_change_earlier_predictions_through_a_real_backbone():
    torch.manual_seed(0)
    config = CalmConfig.from_preset("tiny", hidden_dropout=0.0, neuron_identity="table")
    backbone = CalmForBehaviorRegression(config, num_behavior_channels=2).model.eval()
    rng = np.random.default_rng(0)

    def states(codes):
        with torch.no_grad():
            return backbone(input_ids=codes, use_cache=False).last_hidden_state.numpy()

    trials, neurons, steps = 40, 4, 5
    codes = torch.randint(0, config.vocab_size, (trials, neurons, steps), generator=torch.Generator().manual_seed(0))
    values = rng.standard_normal((trials, neurons, steps * WINDOW))
    behavior = rng.standard_normal((trials, 2, steps * WINDOW))
    hidden = states(codes)
    readout = CalmBehaviorRidgeReadout(window_size=WINDOW, alpha_grid=(1e-2,)).fit(
        values[:30], behavior[:30], values[30:], behavior[30:], hidden[:30], hidden[30:])
    before = readout.predict(values, hidden)
    for first_changed_step in range(1, steps):
        cut = first_changed_step * WINDOW  # frames >= cut belong to tokens >= first_changed_step
        changed_codes = codes.clone()
        changed_codes[..., first_changed_step:] = (codes[..., first_changed_step:] + 1) % config.vocab_size
        changed_values = values.copy()
        changed_values[..., cut:] += 5.0
        after = readout.predict(changed_values, states(changed_codes))
        np.testing.assert_allclose(after[..., :cut], before[..., :cut], rtol=0, atol=1e-9)
        assert not np.allclose(after[..., cut:], before[..., cut:])


def test_causal_readout_ignores_the_token_holding_the_frame_and_look_ahead_reads_it():
    train, val, test = synthetic(60, 0), synthetic(20, 1), synthetic(5, 2)
    values, hidden, _ = test
    changed = hidden.copy()
    changed[:, :, 2] += 3.0  # token 2 holds frames 8..11 and is complete only at frame 11
    for causal, frame_changes in ((True, False), (False, True)):
        readout = CalmBehaviorRidgeReadout(window_size=WINDOW, causal=causal).fit(
            train[0], train[2], val[0], val[2], train[1], val[1])
        before, after = readout.predict(values, hidden), readout.predict(values, changed)
        np.testing.assert_array_equal(after[..., :8], before[..., :8])
        assert (not np.allclose(after[..., 8:11], before[..., 8:11])) == frame_changes
    np.testing.assert_array_equal(frame_token_index(12, 4), [-1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 1, 2])
    np.testing.assert_array_equal(frame_token_index(8, 4, causal=False), [0, 0, 0, 0, 1, 1, 1, 1])


def test_bad_inputs_raise_clear_errors():
    train, val = synthetic(20, 0), synthetic(10, 1)
    readout = CalmBehaviorRidgeReadout(window_size=WINDOW, lags_grid=(1,), alpha_grid=(1.0,), hidden_weights=(1.0,))
    with pytest.raises(ValueError, match="not fitted yet"):
        readout.predict(val[0], val[1])
    with pytest.raises(ValueError, match="`train_hidden` is missing"):
        readout.fit(train[0], train[2], val[0], val[2])
    with pytest.raises(ValueError, match="token_steps=4"):
        readout.fit(train[0], train[2], val[0], val[2], train[1][:, :, :3], val[1])
    with pytest.raises(ValueError, match="last_hidden_state"):
        readout.fit(train[0], train[2], val[0], val[2], train[1][0], val[1])
    nan_values = train[0].copy()
    nan_values[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="`train_values` contains NaN"):
        readout.fit(nan_values, train[2], val[0], val[2], train[1], val[1])
    nan_hidden = val[1].copy()
    nan_hidden[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="`val_hidden` contains NaN or inf"):
        readout.fit(train[0], train[2], val[0], val[2], train[1], nan_hidden)
    with pytest.raises(ValueError, match="must share trials and frames"):
        readout.fit(train[0], train[2][:, :, :-1], val[0], val[2], train[1], val[1])
    with pytest.raises(ValueError, match="disagree on neurons"):
        readout.fit(train[0], train[2], val[0][:, :-1], val[2], train[1], val[1][:, :-1])
    readout.fit(train[0], train[2], val[0], val[2], train[1], val[1])
    with pytest.raises(ValueError, match="fitted on 5; fit one readout per recording"):
        readout.predict(val[0][:, :3], val[1][:, :3])
    with pytest.raises(ValueError, match="hidden size 4 but the readout was fitted on 8"):
        readout.predict(val[0], val[1][..., :4])
    with pytest.raises(ValueError, match="unknown"):
        CalmBehaviorRidgeReadout(reductions=("max",))
    with pytest.raises(ValueError, match="lags_grid"):
        CalmBehaviorRidgeReadout(lags_grid=(0,))
    with pytest.raises(ValueError, match="hidden_weights"):
        CalmBehaviorRidgeReadout(hidden_weights=(0.0,))
